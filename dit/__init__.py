"""dit: the shared core of the DiT ablation harness (model, layers, configs, counting, import)."""
