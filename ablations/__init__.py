"""Launching ablation runs: presets and the `ablations/run.py` command."""
