//! xlb tests: see `tests/`.
