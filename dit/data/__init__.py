"""Data: the image reader, the latent cache, the training input pipeline, the demo dataset."""
