"""Worker processes of the library, one fresh interpreter each:

- ``python -m longcat_sim.repro.entry_worker run SPEC.json OUT.pt``: fingerprint the steps of
  one :class:`~longcat_sim.repro.library.EntrySpec` (rerun determinism);
- ``python -m longcat_sim.repro.entry_worker rank SPEC.json OUT.pt``: one rank of a gloo world
  (world-size invariance).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

USAGE = "usage: python -m longcat_sim.repro.entry_worker run|rank SPEC.json OUT.pt"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] not in ("run", "rank"):
        print(USAGE, file=sys.stderr)
        return 2
    kind, spec_path, out_path = args
    spec = json.loads(Path(spec_path).read_text())
    if kind == "run":
        from longcat_sim.repro.library import EntrySpec, run_entry

        torch.save(run_entry(EntrySpec.from_dict(spec)).to_payload(), out_path)
    else:
        from longcat_sim.repro.world import run_rank

        run_rank(spec, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
