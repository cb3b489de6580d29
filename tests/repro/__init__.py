"""Reproducibility harness: determinism, batch invariance, fingerprints, SDC detection."""
