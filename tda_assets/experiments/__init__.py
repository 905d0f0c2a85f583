"""Experiments over the asset graph: the phase runner (used by the CLI and tests) and the grid search."""
