"""Multi-process harnesses, run on every rank by torchrun as modules (``-m harness.parallel``,
``-m harness.inference``; see conftest.torchrun) and imported by the tests for the
single-process reference."""
