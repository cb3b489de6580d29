"""Kernels: pure-torch references and Triton implementations, chosen by explicit argument."""
