"""tether: give a process, sandbox or container exactly the network its owner allows."""

__version__ = "0.1.0"
