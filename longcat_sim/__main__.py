"""``python -m longcat_sim``: the command line; Ctrl-C while it loads is one line too."""

import sys

try:
    from longcat_sim.cli import entry
except KeyboardInterrupt:
    print("longcat-sim: stopped by SIGINT; no results were written", file=sys.stderr)
    sys.exit(130)

entry()
