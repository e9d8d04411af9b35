# The two commands a new user runs: `make demo` and `make test`.  Both install what is missing first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: deps demo test unit integration bench clean

deps:
	./scripts/install-deps.sh

demo: deps
	$(PY) scripts/demo.py

test: deps
	$(PY) -m pytest -ra tests

unit: deps
	$(PY) -m pytest -ra tests/unit

integration: deps
	$(PY) -m pytest -ra tests/integration

bench: deps
	$(PY) benchmarks/run.py

clean:
	rm -rf build src/*.egg-info .pytest_cache .hypothesis
