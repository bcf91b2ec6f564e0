"""Experiments over the training package. ``python -m training.experiments.conflict``: does mixing
domains hurt a plain LoRA, and does MoLE remove that loss (issue 6)."""
