"""Discrete-event model of a GPU cluster serving or training an MoE model. Never imports torch."""
