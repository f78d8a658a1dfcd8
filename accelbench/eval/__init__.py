"""Accuracy evaluations run on trained checkpoints."""
