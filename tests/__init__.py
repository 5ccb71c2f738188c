"""The test suite. A package, so that tests/api/ imports as `tests.api` and never shadows the real `api`
package (pytest's default import mode names a package by its topmost folder with an __init__.py)."""
