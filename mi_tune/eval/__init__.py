"""Evaluation: the layer probe and downstream embedding tasks. CLI: python -m mi_tune.eval."""
