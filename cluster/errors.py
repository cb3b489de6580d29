"""The input-error type of the simulator; the command line turns it into one line and exit 2."""


class ClusterInputError(ValueError):
    """Bad cluster, hardware or workload input; the message says what is wrong and how to fix it."""
