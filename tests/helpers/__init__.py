"""Helpers shared by the tests (test modules import from here, never from each other).

- `models`: tiny random-weight transformers models and small modules, token ids; imports no
  qcompile (a test runs it in a fresh interpreter before qcompile is imported);
- `passes`: toy passes (registered by the `toy_passes` fixture of tests/conftest.py), tiny graphs,
  running one pass the way the pass manager does;
- `backend`: compiling and running through `torch.compile(..., backend="q4")`.

Fixtures (the pass registry's restore, the toy passes, the real models' session-wide runs) are in
tests/conftest.py.
"""
