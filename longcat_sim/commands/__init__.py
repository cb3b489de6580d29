"""One module per user-facing job. Each exposes ``add_arguments(parser)`` and ``run(args) -> dict``."""
