"""Examples run as convergence tests: ``pytest --convergence examples/``."""
