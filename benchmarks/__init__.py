"""rba-store's benchmark suite: ``python -m benchmarks`` (see :mod:`benchmarks.suite`)."""
