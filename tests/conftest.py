"""Suite-wide settings.

Hypothesis: no per-example deadline. The suite runs on a 2-core machine next to integration
tests that saturate it; a slow example is not a failure (timing is measured in benchmarks/).
Tests that set their own @settings still inherit this profile's deadline unless they override it.
"""

from hypothesis import settings

settings.register_profile("tether", deadline=None, print_blob=True)
settings.load_profile("tether")
