"""kdstore's test suite (a package so that `tests.fixtures_models:FACTORY` works as a teacher spec)."""
