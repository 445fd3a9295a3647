"""Module-level plain-PyTorch reference models: the test oracles of the graph passes."""
