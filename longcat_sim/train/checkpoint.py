"""Training checkpoints: find, read, write (atomically), resume from and grow from.

Layout: ``RUN/checkpoints/step-00000100/`` with ``config.json`` and ``model.safetensors``
(Hugging Face format), ``trainer_state.pt`` (optimizer, controller, step, configs) and the
marker ``COMPLETE``, written last: the step, the parameters' SHA-256 (``param_hash``) and the
SHA-256 of every other file (``files``), each checked before a checkpoint is resumed from. The
directory is assembled under a temporary name and renamed into place, so a crash never leaves a
checkpoint that looks complete. Every process of a run
holds the whole model and optimizer state, so one process writes and any number can read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from longcat_sim.errors import UserError
from longcat_sim.model.balance import BiasController
from longcat_sim.model.checkpoint import load_pretrained, save_pretrained
from longcat_sim.model.config import CHECK_ONLY_FIELDS, ModelConfig, same_model
from longcat_sim.model.growth import grow_config, grow_optimizer_state, grow_state_dict
from longcat_sim.model.hashing import parameter_hash
from longcat_sim.model.optim import build_adamw
from longcat_sim.model.transformer import LongcatFlashForCausalLM
from longcat_sim.runs import write_bytes_atomic, write_json_atomic
from longcat_sim.train.config import RESUMABLE_CHANGES, TrainConfig

CHECKPOINTS_DIR = "checkpoints"
STATE_NAME = "trainer_state.pt"
MARKER_NAME = "COMPLETE"
STATE_FORMAT = "longcat-sim-train-state-v1"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of ``run_dir`` (those with the marker), oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.name.startswith("step-") and (p / MARKER_NAME).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or the latest complete checkpoint of a run directory."""
    path = Path(path)
    if (path / MARKER_NAME).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise UserError(
            f"{str(path)!r} holds no complete checkpoint; give a run directory written by "
            "'longcat-sim train' or one of its checkpoints/step-* folders"
        )
    return latest


def read_checkpoint_state(checkpoint: str | Path) -> dict[str, Any]:
    """The trainer state of a complete checkpoint (configs as objects, tensors on CPU)."""
    path = Path(checkpoint)
    try:
        state = torch.load(io.BytesIO((path / STATE_NAME).read_bytes()), weights_only=True)
    except Exception as exc:  # a damaged file fails torch.load with many exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read {str(path / STATE_NAME)!r}: {first}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"{str(path)!r} is not a {STATE_FORMAT} checkpoint")
    try:
        state["model_config"] = ModelConfig.from_dict(state["model_config"])
        state["train_config"] = TrainConfig.from_dict(state["train_config"])
        for key in ("step", "optimizer", "bias_controller"):
            state[key]
        int(state["step"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(
            f"{str(path / STATE_NAME)!r} is damaged ({type(exc).__name__}: {exc}); resume from "
            "another checkpoint (--resume latest-valid)"
        ) from None
    return state


def _sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks (never whole into memory)."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def file_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file of a checkpoint folder but the marker, by name."""
    out = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != MARKER_NAME:
            out[path.name] = _sha256_file(path)
    return out


_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _marker_problem(marker: Any) -> str | None:
    """What makes a parsed marker damaged (None when its fields are all well formed)."""
    if not isinstance(marker, dict):
        return "not a JSON object"
    step, param_hash = marker.get("step"), marker.get("param_hash")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return "no step (a whole number >= 0)"
    if not isinstance(param_hash, str) or not _HEX64.match(param_hash):
        return "no param_hash (64 hex digits)"
    if "files" not in marker:
        return None  # an older checkpoint: the parameter hash is its only check
    files = marker["files"]
    if not isinstance(files, dict) or not all(
        isinstance(d, str) and _HEX64.match(d) for d in files.values()
    ):
        return "files is not a map of file names to SHA-256 digests (64 hex digits)"
    return None


def read_marker(checkpoint: Path) -> dict[str, Any]:
    """The marker of a complete checkpoint (step, param_hash and, unless it is an older one,
    files), or a one-line error naming it."""
    path = checkpoint / MARKER_NAME
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"checkpoint marker {str(path)!r} is damaged: {exc}") from None
    problem = _marker_problem(marker)
    if problem is not None:
        raise UserError(
            f"checkpoint marker {str(path)!r} is damaged: {problem}; resume from an older "
            "checkpoint with --resume latest-valid"
        )
    return marker


def verify_checkpoint(checkpoint: str | Path) -> dict[str, Any]:
    """Check every file of a checkpoint against the SHA-256 its marker records, and that the
    marker records every file; the marker, or a one-line error naming the damaged file. A
    marker without digests (an older checkpoint) leaves the parameter hash, checked after
    loading, as the only check."""
    path = Path(checkpoint)
    marker = read_marker(path)
    if "files" not in marker:
        return marker
    recorded: dict[str, str] = marker["files"]
    for name, digest in recorded.items():
        target = path / name
        if Path(name).name != name or name in ("", ".", ".."):
            raise UserError(f"checkpoint {str(path)!r} is damaged: its marker names {name!r}")
        if not target.is_file():
            raise UserError(f"checkpoint {str(path)!r} is damaged: {name} is missing or not a file")
        if _sha256_file(target) != digest:
            raise UserError(
                f"checkpoint {str(path)!r} is damaged: {name} does not match the SHA-256 its "
                "marker records; resume from an older one with --resume latest-valid"
            )
    files = {p.name for p in path.iterdir() if p.is_file() and p.name != MARKER_NAME}
    extra = sorted(files - set(recorded))
    if extra:
        raise UserError(
            f"checkpoint {str(path)!r} is damaged: {extra[0]} is not recorded in its marker; "
            "resume from an older one with --resume latest-valid"
        )
    return marker


def newest_intact(run_dir: str | Path) -> tuple[Path | None, list[str]]:
    """(the newest checkpoint whose files match their digests, why each newer one was
    skipped)."""
    skipped = []
    for path in reversed(checkpoint_dirs(run_dir)):
        try:
            if "files" not in verify_checkpoint(path):  # older: no digest covers its state
                read_checkpoint_state(path)
        except UserError as exc:
            skipped.append(str(exc))
            continue
        return path, skipped
    return None, skipped


def check_param_hash(model: torch.nn.Module, marker: dict[str, Any], path: Path) -> None:
    """The loaded parameters must hash to what the checkpoint recorded."""
    if parameter_hash(model) != marker["param_hash"]:
        raise UserError(
            f"checkpoint {str(path)!r} is damaged: its weights do not hash to the recorded "
            "param_hash; resume from an older one with --resume latest-valid"
        )


def remove_stale(run_dir: Path) -> None:
    """Temporary folders left by a crash mid-save (one writer per run)."""
    for stale in (run_dir / CHECKPOINTS_DIR).glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(
    run_dir: Path, model: LongcatFlashForCausalLM, state: dict[str, Any], keep: int
) -> Path:
    """Write ``checkpoints/step-N`` atomically (temporary folder, marker last, rename) and
    keep the newest ``keep``; ``state`` is the trainer state (its ``step`` names the folder)."""
    root = run_dir / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    step = int(state["step"])
    final = root / step_name(step)
    tmp = root / f".tmp-{step_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_pretrained(model, tmp)
    buffer = io.BytesIO()
    torch.save({"format": STATE_FORMAT, **state}, buffer)
    write_bytes_atomic(tmp / STATE_NAME, buffer.getvalue())
    marker = {"step": step, "param_hash": parameter_hash(model), "files": file_digests(tmp)}
    write_json_atomic(tmp / MARKER_NAME, marker)
    if final.exists():
        _discard(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        _discard(old)
    return final


def _discard(checkpoint: Path) -> None:
    """Remove a checkpoint folder: renamed out of sight first, so a process killed while
    deleting leaves a stale temporary folder, never a checkpoint with files missing."""
    doomed = checkpoint.with_name(f".tmp-{checkpoint.name}-discarded-{os.getpid()}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(checkpoint, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def check_resumable(state: dict[str, Any], model_cfg: ModelConfig, tc: TrainConfig, path) -> None:
    """The checkpoint's model config must equal ``model_cfg`` (bar :data:`CHECK_ONLY_FIELDS`),
    and its train config ``tc`` except for :data:`RESUMABLE_CHANGES`."""
    if not same_model(state["model_config"], model_cfg):
        raise UserError(f"checkpoint {str(path)!r} was written for a different model config")
    saved, ours = state["train_config"].to_dict(), tc.to_dict()
    differ = sorted(k for k in ours if ours[k] != saved[k] and k not in RESUMABLE_CHANGES)
    if differ:
        raise UserError(
            f"cannot resume with changed train settings ({', '.join(differ)}); use the "
            "checkpoint's settings or start a new run directory"
        )


def check_growable(small_cfg: ModelConfig, target_cfg: ModelConfig) -> int:
    """The depth factor from ``small_cfg`` to ``target_cfg``, or a one-line error."""
    factor, rest = divmod(target_cfg.num_layers, small_cfg.num_layers)
    expected = grow_config(small_cfg, max(factor, 1)).to_dict()
    target = target_cfg.to_dict()
    ignored = ("name", *CHECK_ONLY_FIELDS)
    differ = sorted(k for k in target if k not in ignored and target[k] != expected[k])
    if rest or factor < 2 or differ:
        raise UserError(
            f"cannot grow {small_cfg.name!r} ({small_cfg.num_layers} layers) into "
            f"{target_cfg.name!r} ({target_cfg.num_layers} layers): the target must "
            "have a whole multiple (>= 2) of its layers and otherwise the same fields"
            + (f" (differs in {', '.join(differ)})" if differ else "")
        )
    return factor


def grow_into(
    path: Path,
    state: dict[str, Any],
    model: LongcatFlashForCausalLM,
    optimizer: torch.optim.Optimizer,
    controller: BiasController,
) -> None:
    """Stack the checkpoint's weights, Adam moments and controller state into ``model``'s depth
    (layer ``i`` from layer ``i mod L_small``, spec §3.4)."""
    small_cfg: ModelConfig = state["model_config"]
    factor = model.config.num_layers // small_cfg.num_layers
    small = load_pretrained(path).train()
    model.load_state_dict(grow_state_dict(small.state_dict(), small_cfg.num_layers, factor))
    small_optimizer = build_adamw(small, 1.0)
    small_optimizer.load_state_dict(state["optimizer"])
    grow_optimizer_state(small, small_optimizer, model, optimizer, small_cfg.num_layers)
    controller.load_state_dict(
        {
            key: None if value is None else value.repeat(factor, 1)
            for key, value in state["bias_controller"].items()
        }
    )
