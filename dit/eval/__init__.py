"""Evaluation: the FID Inception network, reference statistics, FID."""
