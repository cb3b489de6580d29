"""Calibration: measure this host (compute, collectives, contention) for the host step model."""
