"""Deployment scenarios: resolve a deployment's values and run its step simulations."""
