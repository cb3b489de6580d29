"""longcat-sim: the testbed that ties the model, the cluster simulator and the reports together."""

__version__ = "0.1.0"
