"""Evaluation: reconstruction, editing and generation metrics."""
