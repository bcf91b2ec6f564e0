"""LLaVA-MoLE training: model building, data, two-stage training, checkpoints, analytics.

Run the commands from the repository root as ``python -m training.<command>``:
``train`` (either stage, from a JSON config), ``demo`` (the CPU-sized end-to-end run),
``generate`` (greedy or sampled generation from a run directory).
"""
