"""Reproducibility harness: fingerprints of tensors, parameters and runs."""
