"""What ``longcat-sim report`` needs: run the simulations (cached by their inputs' hash), load
other commands' results from their run directories, and export PNGs through kaleido.

The output is the plain report data documented in ``reports.inputs``; ``reports.page`` renders
it. Simulated sections go through JSON before use, so a section read back from the cache and
one just computed give the same bytes.

Sections and what they compare:

- ``table7``: the paper's theoretical decode (Table 7) under the ``table7`` assumption set on
  H800, EP128, batch 96, MTP 1 draft at 80 % acceptance.
- ``table6``: measured decode (Table 6, and the DeepSeek-V3 profile data) on 128 H800 under
  the configured assumption set.
- ``timelines``: one deployment (model, hardware, GPUs) under every decode schedule.
- ``pareto``: each compared model over batch sizes on the configured deployment.
- ``training_overlap``: the paper's §5 training setting (the training defaults of
  ``longcat-sim simulate --mode train``), without and with ScMoE.

Decode points run through ``longcat-sim simulate``'s setup and runner (``sweep``'s process pool
for many points), so the report and those commands print the same numbers for a deployment.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import shutil
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from longcat_sim import bridge, cluster, scenarios
from longcat_sim.cluster import metrics
from longcat_sim.cluster.assumptions import TABLE7_CONTEXT, Assumptions, get_assumptions
from longcat_sim.cluster.hardware import Hardware, get_hardware
from longcat_sim.cluster.simulator import simulate_train
from longcat_sim.cluster.streams import EventRecord
from longcat_sim.errors import UserError
from longcat_sim.model.config import ModelConfig, load_model_config
from longcat_sim.reports.html import Figure
from longcat_sim.reports.inputs import (
    ReportInputError,
    check_determinism,
    check_sdc,
    check_training_run,
)
from longcat_sim.runs import dumps_json, write_bytes_atomic, write_json_atomic
from longcat_sim.scenarios.decode import (
    DecodeSetup,
    decode_setup,
    resolve_hardware,
    run_decode,
)
from longcat_sim.scenarios.sweep import run_points
from longcat_sim.scenarios.train import TRAIN_DEFAULTS

CACHE_DIR = "cache"
CACHE_FORMAT = "longcat-sim-report-cache-v1"
PNG_DIR = "figures"

# -- published numbers ------------------------------------------------------------------------

# LongCat-Flash paper (arXiv 2509.01322), Table 7: theoretical decode on H800, EP128, batch 96
# per GPU, MTP 1 draft token at 80 % acceptance, FlashMLA 660 TFLOPS, DeepEP 40 GB/s, $2/GPU-h.
TABLE7_PAPER: dict[str, dict[str, Any]] = {
    "deepseek-v3": {
        "overlap": "tbo",
        "attention_tp": 1,
        "attention_us": 471,
        "dispatch_us": 275,
        "moe_us": 77,
        "combine_us": 551,
        "tpot_ms": 30,
        "cost_per_m_tokens": 0.17,
    },
    "qwen3-235b-a22b": {
        "overlap": "tbo",
        "attention_tp": 4,
        "attention_us": 314,
        "dispatch_us": 157,
        "moe_us": 29,
        "combine_us": 315,
        "tpot_ms": 26.2,
        "cost_per_m_tokens": 0.15,
    },
    "longcat-flash": {
        "overlap": "sbo",
        "attention_tp": 1,
        "attention_us": 264,
        "dispatch_us": 236,
        "moe_us": 60,
        "combine_us": 472,
        "tpot_ms": 16,
        "cost_per_m_tokens": 0.09,
    },
}
TABLE7_SETTING = {"gpus": 128, "batch_per_device": 96, "mtp_draft_tokens": 1, "mtp_accept": 0.8}

# LongCat-Flash paper, Table 6: measured decode on 128 Hopper GPUs (EP128), MTP at ~90 %
# acceptance (paper §6). (attention dtype, average context, tokens/GPU/s, TPS per user)
TABLE6_PAPER = (
    ("bf16", 5000, 3785, 35.0),
    ("bf16", 5000, 2205, 68.9),
    ("bf16", 5000, 804, 100.5),
    ("fp8", 5000, 4230, 26.4),
    ("fp8", 8192, 3240, 33.8),
)
TABLE6_MTP_ACCEPT = 0.9
# deepseek-ai/profile-data: decode on EP128, 128 requests per GPU, 4K context, TBO, balanced
# routing, no speculative decoding: 18,598 tokens/s per 8-GPU node = 2,324 per GPU, 20 TPS per
# user (paper Table 6).
DEEPSEEK_PROFILE = {"context": 4096, "batch_per_device": 128, "tgs": 2324, "tps_per_user": 20.0}

# LongCat-Flash paper §5: share of step time in exposed dispatch/combine, EP 32, 200 Gb/s RDMA
# per GPU, context parallelism 8, the MoE split into 2 token chunks. The setting itself is the
# embedded training default of ``longcat-sim simulate --mode train`` (TRAIN_DEFAULTS).
TRAINING_OVERLAP_PAPER = {"baseline": 0.253, "scmoe": 0.084}

# How each compared model is deployed: its overlap schedule and attention tensor parallelism
# (Table 7's choices); other models get SBO on ScMoE layers, TBO otherwise, no attention TP.
DEPLOYMENTS: dict[str, tuple[str, int]] = {
    name: (row["overlap"], row["attention_tp"]) for name, row in TABLE7_PAPER.items()
}


# -- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportConfig:
    """What the report simulates. The defaults are the embedded default: LongCat-Flash decoding
    on 128 H800 GPUs (EP128) with the realistic ``default`` assumption set, as
    ``longcat-sim simulate`` runs it."""

    model: str = "longcat-flash"  # the deployment the timelines show
    hardware: str = "H800"
    gpus: int = 128  # one expert-parallel group over all GPUs
    assumptions: str = "default"
    train_assumptions: str = "train"  # for the training-overlap section
    seed: int = 0  # routing and context draws, as in ``longcat-sim simulate``
    context: int = 5000  # cached tokens per request
    attention_dtype: str = "bf16"
    mtp_draft_tokens: int = 1
    mtp_accept: float = 0.9  # LongCat-Flash's measured MTP acceptance (paper §6)
    timeline_batch: int = 96  # requests per GPU in the timelines
    timeline_layers: int = 2  # consecutive layers shown, from the middle of the model
    compare_models: tuple[str, ...] = ("longcat-flash", "deepseek-v3", "qwen3-235b-a22b")
    batch_sizes: tuple[int, ...] = (4, 8, 16, 32, 48, 64, 96, 128, 192, 256)

    def __post_init__(self) -> None:
        for name in ("gpus", "context", "timeline_batch", "timeline_layers"):
            _positive_int(name, getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UserError(f"report setting 'seed' must be an integer >= 0, got {self.seed!r}")
        if self.attention_dtype not in ("bf16", "fp8"):
            raise UserError(
                f"report setting 'attention_dtype' must be bf16 or fp8, got {self.attention_dtype!r}"
            )
        drafts = self.mtp_draft_tokens
        if isinstance(drafts, bool) or not isinstance(drafts, int) or drafts < 0:
            raise UserError(
                f"report setting 'mtp_draft_tokens' must be an integer >= 0, got {drafts!r}"
            )
        accept = self.mtp_accept
        if isinstance(accept, bool) or not isinstance(accept, int | float) or not 0 <= accept <= 1:
            raise UserError(f"report setting 'mtp_accept' must lie in [0, 1], got {accept!r}")
        for name in ("model", "hardware", "assumptions", "train_assumptions"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise UserError(f"report setting {name!r} must be a non-empty string")
        if not self.compare_models or not all(isinstance(m, str) for m in self.compare_models):
            raise UserError("report setting 'compare_models' must be a non-empty list of names")
        if len(set(self.compare_models)) != len(self.compare_models):
            raise UserError("report setting 'compare_models' names a model twice")
        if not self.batch_sizes:
            raise UserError("report setting 'batch_sizes' must be a non-empty list")
        for batch in self.batch_sizes:
            _positive_int("batch_sizes", batch)
        if len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise UserError("report setting 'batch_sizes' lists a batch size twice")

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in fields(self)
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> ReportConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(
                f"{source}: unknown report setting {unknown[0]!r}; valid: {', '.join(sorted(known))}"
            )
        values = {}
        for key, value in data.items():
            if key in ("compare_models", "batch_sizes"):
                if not isinstance(value, list):
                    raise UserError(f"{source}: report setting {key!r} must be a list")
                value = tuple(value)
            values[key] = value
        accept = values.get("mtp_accept")
        if isinstance(accept, int) and not isinstance(accept, bool):
            values["mtp_accept"] = float(accept)
        return cls(**values)


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"report setting {name!r} must be a positive integer, got {value!r}")


def load_config(path: Path | None) -> ReportConfig:
    """The default, or a TOML file whose ``[report]`` table overrides settings of it."""
    if path is None:
        return ReportConfig()
    if not path.is_file():
        raise UserError(f"--config {str(path)!r} does not exist; pass a TOML file")
    try:
        doc = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--config {str(path)!r} is not valid TOML: {exc}") from None
    extra = sorted(set(doc) - {"report"})
    if extra:
        raise UserError(
            f"--config {str(path)!r}: unknown table or key {extra[0]!r}; put settings under [report]"
        )
    table = doc.get("report", {})
    if not isinstance(table, dict):
        raise UserError(f"--config {str(path)!r}: [report] must be a table")
    return ReportConfig.from_dict(table, f"--config {str(path)!r}")


@dataclass(frozen=True)
class Resolved:
    """A config with its names resolved to the objects they stand for."""

    config: ReportConfig
    model: ModelConfig
    compare: tuple[ModelConfig, ...]
    hardware: Hardware
    assumptions: Assumptions
    train_assumptions: Assumptions

    def identity(self) -> dict[str, Any]:
        """Everything the simulations read: the settings and what each name resolved to."""
        return {
            "settings": self.config.to_dict(),
            "model": self.model.to_dict(),
            "compare": [m.to_dict() for m in self.compare],
            "hardware": dataclasses.asdict(self.hardware),
            "assumptions": dataclasses.asdict(self.assumptions),
            "train_assumptions": dataclasses.asdict(self.train_assumptions),
        }


def resolve(config: ReportConfig) -> Resolved:
    return Resolved(
        config=config,
        model=load_model_config(config.model),
        compare=tuple(load_model_config(m) for m in config.compare_models),
        hardware=get_hardware(config.hardware),
        assumptions=get_assumptions(config.assumptions),
        train_assumptions=get_assumptions(config.train_assumptions),
    )


def config_hash(resolved: Resolved) -> str:
    return hashlib.sha256(dumps_json(resolved.identity()).encode()).hexdigest()


# -- simulations ------------------------------------------------------------------------------
# Decode points go through ``longcat-sim simulate``'s own setup and runner, so a point of the
# report is the number that command prints for the same deployment (every point draws its
# routing and contexts from the same seed, as there).


def _deployment(cfg: ModelConfig) -> tuple[str, int]:
    if cfg.name in DEPLOYMENTS:
        return DEPLOYMENTS[cfg.name]
    return ("sbo" if cfg.layer_type == "scmoe" else "tbo", 1)


def _setup(
    r: Resolved,
    cfg: ModelConfig,
    batch: int,
    schedule: str,
    **changes: Any,
) -> DecodeSetup:
    """A decode deployment of ``cfg`` on the configured cluster; ``changes`` override settings."""
    c = r.config
    _, attention_tp = _deployment(cfg)
    values: dict[str, Any] = {
        "cfg": cfg,
        "hw": r.hardware,
        "assumptions": r.assumptions,
        "gpus": c.gpus,
        "ep": None,
        "batch_per_device": batch,
        "context": c.context,
        "attention_dtype": c.attention_dtype,
        "mtp_draft_tokens": c.mtp_draft_tokens,
        "mtp_accept": c.mtp_accept,
        "schedule": schedule,
        "redundant_experts": 0,
        "attention_tp": attention_tp,
        "ffn_tp": 1,
        "seed": c.seed,
    }
    return decode_setup(**(values | changes))


def _numbers(record: Mapping[str, Any]) -> dict[str, float]:
    return {k: record[k] for k in ("tps_per_user", "tgs", "cost_per_m_tokens", "tpot_ms")}


def _points(setups: Sequence[DecodeSetup]) -> list[dict[str, Any]]:
    """Simulate on every core; records in the order of ``setups``."""
    return run_points(setups, progress=False)


def table7_section(r: Resolved) -> dict[str, Any]:
    """The paper's Table 7 rows rebuilt under the ``table7`` assumptions (no randomness): the
    per-layer rows from one MoE layer's priced stages, TPOT and cost from the simulated step."""
    h800 = get_hardware("H800")
    ideal = get_assumptions("table7")
    s = TABLE7_SETTING
    setups = [
        _setup(
            r,
            load_model_config(name),
            s["batch_per_device"],
            paper["overlap"],
            hw=h800,
            assumptions=ideal,
            gpus=s["gpus"],
            context=TABLE7_CONTEXT,
            attention_dtype="bf16",
            mtp_draft_tokens=s["mtp_draft_tokens"],
            mtp_accept=s["mtp_accept"],
        )
        for name, paper in TABLE7_PAPER.items()
    ]
    rows = []
    for setup, record in zip(setups, _points(setups), strict=True):
        w = bridge.decode_workload(
            setup.cfg,
            hardware=setup.hw,
            assumptions=setup.assumptions,
            ep=setup.ep,
            batch_per_device=setup.batch_per_device,
            context=setup.context,
            mtp_draft_tokens=setup.mtp_draft_tokens,
            mtp_accept=setup.mtp_accept,
            attention_tp=setup.attention_tp,
            micro_batches=(1,),
        )
        layer = w.layers[-1]  # an MoE layer (DeepSeek-V3's first three are dense)
        if layer.kind == "scmoe":
            attention = layer.get("attn0")
        else:
            attention = layer.get("attn_qkv") + layer.get("attn_core")
        simulated = {
            "attention_us": attention * 1e6,
            "dispatch_us": layer.get("dispatch") * 1e6,
            "moe_us": (layer.get("moe") + layer.get("shared")) * 1e6,
            "combine_us": layer.get("combine") * 1e6,
            "tpot_ms": record["tpot_ms"],
            "cost_per_m_tokens": record["cost_per_m_tokens"],
        }
        paper = TABLE7_PAPER[setup.cfg.name]
        rows.append(
            {
                "model": setup.cfg.name,
                "overlap": setup.schedule,
                "paper": {k: float(paper[k]) for k in simulated},
                "simulated": simulated,
            }
        )
    return {"context": TABLE7_CONTEXT, "rows": rows}


def table6_section(r: Resolved) -> dict[str, Any]:
    """Table 6 rows and the DeepSeek-V3 profile, simulated on 128 H800 under the configured
    assumption set."""
    common = {"hw": get_hardware("H800"), "gpus": 128}
    longcat = load_model_config("longcat-flash")
    setups = [
        _setup(
            r,
            longcat,
            round(tgs / tps),
            "sbo",
            context=context,
            attention_dtype=dtype,
            mtp_draft_tokens=1,
            mtp_accept=TABLE6_MTP_ACCEPT,
            **common,
        )
        for dtype, context, tgs, tps in TABLE6_PAPER
    ]
    p = DEEPSEEK_PROFILE
    setups.append(
        _setup(
            r,
            load_model_config("deepseek-v3"),
            p["batch_per_device"],
            "tbo",
            assumptions=r.assumptions.replace(routing="balanced", context_cv=0.0),
            context=p["context"],
            attention_dtype="bf16",
            mtp_draft_tokens=0,
            attention_tp=1,
            **common,
        )
    )
    papers = [{"tgs": float(tgs), "tps_per_user": tps} for _, _, tgs, tps in TABLE6_PAPER]
    papers.append({"tgs": float(p["tgs"]), "tps_per_user": p["tps_per_user"]})
    labels = [f"LongCat-Flash, row {i + 1}" for i in range(len(TABLE6_PAPER))]
    labels.append("DeepSeek-V3 profile (balanced)")
    rows = []
    for setup, record, paper, label in zip(setups, _points(setups), papers, labels, strict=True):
        rows.append(
            {
                "label": label,
                "model": setup.cfg.name,
                "schedule": setup.schedule,
                "attention_dtype": setup.attention_dtype,
                "context": int(setup.context),
                "batch_per_device": setup.batch_per_device,
                "paper": paper,
                "simulated": {k: record[k] for k in ("tgs", "tps_per_user", "tpot_ms")},
            }
        )
    return {"assumptions": r.assumptions.name, "rows": rows}


def timeline_layers(n_layers: int, count: int) -> list[int]:
    """``count`` consecutive layers from the middle of the model (steady state)."""
    count = min(count, n_layers)
    first = (n_layers - count) // 2
    return list(range(first, first + count))


def _event(record: EventRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "group": metrics.STAGE_GROUPS.get(record.name, record.name),
        "stream": record.stream,
        "start_us": record.start * 1e6,
        "end_us": record.end * 1e6,
        "layer": record.layer,
        "microbatch": record.microbatch,
    }


def timelines_section(r: Resolved) -> dict[str, Any]:
    """The configured deployment under every decode schedule; events of the middle layers."""
    c = r.config
    layers = timeline_layers(r.model.num_layers, c.timeline_layers)
    wanted = set(layers)
    schedules = {}
    for schedule in ("sequential", "tbo", "sbo"):
        result, _ = run_decode(_setup(r, r.model, c.timeline_batch, schedule))
        schedules[schedule] = {
            "tpl_us": result.tpl_us,
            "tpot_ms": result.tpot_ms,
            "step_ms": result.step_ms,
            "tgs": result.tgs,
            "exposed_comm_share": result.exposed_comm_share,
            "events": [_event(e) for e in result.records if e.layer in wanted],
        }
    return {
        "model": r.model.name,
        "batch_per_device": c.timeline_batch,
        "layers": layers,
        "schedules": schedules,
    }


def pareto_section(r: Resolved) -> dict[str, Any]:
    """Every compared model at every batch size, on its own overlap schedule."""
    batches = sorted(r.config.batch_sizes)
    setups = [_setup(r, cfg, batch, _deployment(cfg)[0]) for cfg in r.compare for batch in batches]
    records = iter(_points(setups))
    models = {}
    for cfg in r.compare:
        points = [{"batch_per_device": b, **_numbers(next(records))} for b in batches]
        models[cfg.name] = {"schedule": _deployment(cfg)[0], "points": points}
    return {"models": models}


def training_overlap_section(r: Resolved) -> dict[str, Any]:
    """LongCat-Flash training in the paper's §5 setting (``longcat-sim simulate --mode train``
    defaults), without (baseline) and with ScMoE."""
    d = TRAIN_DEFAULTS
    w = bridge.train_workload(
        load_model_config(d["model"]),
        hardware=resolve_hardware(d["hardware"], d["rdma_gb_s"]),
        assumptions=r.train_assumptions,
        microbatch_tokens=d["tokens_per_microbatch"],
        microbatches=d["microbatches"],
        pipeline_stages=d["pp"],
        data_parallel=1,
        seq_len=d["seq_len"],
        ep=d["ep"],
        cp=d["cp"],
        moe_chunks=d["moe_chunks"],
        rng=np.random.default_rng(r.config.seed),
    )
    simulated = {}
    for schedule in ("baseline", "scmoe"):
        result = simulate_train(w, schedule, d["pipeline"])
        simulated[schedule] = {
            "non_overlapped_comm_share": result.non_overlapped_comm_share,
            "step_ms": result.step_ms,
            "comm_ms": result.comm_ms,
            "exposed_comm_ms": result.exposed_comm_ms,
        }
    return {"paper": dict(TRAINING_OVERLAP_PAPER), "simulated": simulated}


_DEPLOYMENT_SETTINGS = (
    "gpus",
    "seed",
    "context",
    "attention_dtype",
    "mtp_draft_tokens",
    "mtp_accept",
)


def _reads(r: Resolved, *settings: str, model: bool = False, compare: bool = False) -> dict:
    """The part of a resolved config a decode section reads (its cache key)."""
    reads: dict[str, Any] = {
        "settings": {k: v for k, v in r.config.to_dict().items() if k in settings},
        "hardware": dataclasses.asdict(r.hardware),
        "assumptions": dataclasses.asdict(r.assumptions),
    }
    if model:
        reads["model"] = r.model.to_dict()
    if compare:
        reads["compare"] = [m.to_dict() for m in r.compare]
    return reads


# Section -> (how to compute it, what it reads). Table 7 reads nothing configurable; Table 6
# runs on the paper's H800 and reads the assumptions and seed; the training overlap reads the
# training assumptions and seed.
SECTIONS: dict[str, tuple[Callable[[Resolved], dict[str, Any]], Callable[[Resolved], Any]]] = {
    "table7": (table7_section, lambda r: None),
    "table6": (
        table6_section,
        lambda r: {"assumptions": dataclasses.asdict(r.assumptions), "seed": r.config.seed},
    ),
    "timelines": (
        timelines_section,
        lambda r: _reads(r, *_DEPLOYMENT_SETTINGS, "timeline_batch", "timeline_layers", model=True),
    ),
    "pareto": (
        pareto_section,
        lambda r: _reads(r, *_DEPLOYMENT_SETTINGS, "batch_sizes", compare=True),
    ),
    "training_overlap": (
        training_overlap_section,
        lambda r: {
            "assumptions": dataclasses.asdict(r.train_assumptions),
            "seed": r.config.seed,
        },
    ),
}


# -- cache ----------------------------------------------------------------------------------


def code_fingerprint() -> str:
    """SHA-256 of the sources the simulations depend on; editing them invalidates the cache."""
    from longcat_sim.model import config as model_config
    from longcat_sim.model import costs as model_costs

    files = sorted(Path(cluster.__file__).parent.glob("*.py"))
    files += [Path(model_config.__file__), Path(model_costs.__file__)]
    files += sorted(Path(scenarios.__file__).parent.glob("*.py"))
    files += [Path(bridge.__file__), Path(__file__)]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def cached_section(
    cache_dir: Path, name: str, inputs: Any, compute: Callable[[], dict[str, Any]], code: str
) -> tuple[dict[str, Any], bool]:
    """(section, whether it came from the cache). The key hashes the section's inputs and the
    code fingerprint; a missing, unreadable or mismatched cache file is recomputed."""
    key = hashlib.sha256(
        dumps_json(
            {"format": CACHE_FORMAT, "section": name, "inputs": inputs, "code": code}
        ).encode()
    ).hexdigest()
    path = cache_dir / f"{name}-{key[:16]}.json"
    try:
        doc = json.loads(path.read_text())
        if isinstance(doc, dict) and doc.get("key") == key and isinstance(doc.get("result"), dict):
            return doc["result"], True
    except (OSError, ValueError):
        pass
    result = json.loads(dumps_json(compute()))
    write_json_atomic(path, {"format": CACHE_FORMAT, "key": key, "section": name, "result": result})
    return result, False


# -- other commands' results ------------------------------------------------------------------


def _read_json(path: Path, flag: str) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise UserError(f"{flag}: cannot read {str(path)!r}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UserError(f"{flag}: {str(path)!r} is not valid JSON: {exc}") from None


def load_training_run(run_dir: Path) -> dict[str, Any]:
    """A ``longcat-sim train`` run directory -> TRAIN_RUN (``reports.inputs``): the loss and
    FFN-experts columns of ``metrics.jsonl`` and the target from ``results.json`` (or, for a
    run still in progress, from the model config in ``manifest.json``)."""
    flag = f"--train-run {str(run_dir)!r}"
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise UserError(f"{flag} holds no metrics.jsonl; pass a longcat-sim train run directory")
    records = []
    for number, line in enumerate(metrics_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise UserError(f"{flag}: metrics.jsonl line {number} is not JSON: {exc}") from None
        if not isinstance(record, dict):
            raise UserError(f"{flag}: metrics.jsonl line {number} is not a JSON object")
        keep = ("step", "lm_loss", "ffn_experts_mean", "val_loss")
        records.append({k: record[k] for k in keep if k in record})
    if (run_dir / "results.json").is_file():
        results = _read_json(run_dir / "results.json", flag)
        model, target = results.get("model"), results.get("target_ffn_experts")
    elif (run_dir / "manifest.json").is_file():
        model_cfg = _read_json(run_dir / "manifest.json", flag).get("config", {}).get("model", {})
        model, target = model_cfg.get("name"), model_cfg.get("expected_ffn_experts")
    else:
        raise UserError(f"{flag} holds neither results.json nor manifest.json")
    run = {
        "name": run_dir.resolve().name,
        "model": model,
        "target_ffn_experts": target,
        "records": records,
    }
    try:
        check_training_run(run, flag)
    except ReportInputError as exc:
        raise UserError(str(exc)) from None
    return run


def load_result(
    path: Path,
    flag: str,
    check: Callable[[Any, str], None],
    adapt: Callable[[Any], Any] = lambda result: result,
) -> dict[str, Any]:
    """``results.json`` of a run directory (or the JSON file itself), put into the report's
    input shape by ``adapt`` and checked against it."""
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{flag} {str(path)!r}: no results.json there; pass a run directory")
    result = adapt(_read_json(file, flag))
    try:
        check(result, f"{flag} {str(path)!r}")
    except ReportInputError as exc:
        raise UserError(str(exc)) from None
    return result


def determinism_input(result: Any) -> Any:
    """``longcat-sim determinism`` results (``identical``, ``runs``, ``first_divergence`` with
    ``module``, ``tensor`` and ``max_ulp``) in the report's determinism shape; results already in
    that shape pass unchanged."""
    if not isinstance(result, dict) or "verdict" in result or "identical" not in result:
        return result
    adapted = {k: v for k, v in result.items() if k not in ("identical", "first_divergence")}
    adapted["verdict"] = "identical" if result["identical"] is True else "diverged"
    divergence = result.get("first_divergence")
    if isinstance(divergence, dict):
        divergence = dict(divergence)
        module = divergence.pop("module", None)
        if module and isinstance(divergence.get("tensor"), str):
            divergence["tensor"] = f"{module}: {divergence['tensor']}"
        divergence = {
            k: v for k, v in divergence.items() if k in ("step", "tensor", "max_abs_diff")
        }
    adapted["first_divergence"] = divergence
    return adapted


def sdc_input(result: Any) -> Any:
    """``longcat-sim sdc`` results (``results``: per site, bit and detector, counts of detected,
    masked and missed flips) as the report's per-trial records: masked flips change nothing a
    detector compares, so each detector's share is detected / (detected + missed)."""
    if not isinstance(result, dict) or "trials" in result or "results" not in result:
        return result
    trials = []
    detectors: list[str] = []
    for row in result["results"]:
        if not isinstance(row, dict):
            return result  # let the shape check name what is wrong
        detector = row.get("detector")
        if detector not in detectors:
            detectors.append(detector)
        for hit, count in ((True, row.get("detected", 0)), (False, row.get("missed", 0))):
            trials.extend(
                {"site": row.get("site"), "bit": row.get("bit"), "detected": {detector: hit}}
                for _ in range(int(count))
            )
    return {"trials": trials, "detectors": detectors}


def load_determinism(path: Path) -> dict[str, Any]:
    return load_result(path, "--determinism-run", check_determinism, determinism_input)


def load_sdc(path: Path) -> dict[str, Any]:
    return load_result(path, "--sdc-run", check_sdc, sdc_input)


# -- gathering --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gathered:
    data: dict[str, Any]
    computed: tuple[str, ...]  # sections simulated now
    reused: tuple[str, ...]  # sections read from the cache


def title(r: Resolved) -> str:
    from longcat_sim.reports.tables import model_label

    return f"{model_label(r.model.name)} on {r.config.gpus} {r.hardware.name} GPUs"


def gather(
    resolved: Resolved,
    run_dir: Path,
    *,
    train_runs: Sequence[Path] = (),
    determinism_run: Path | None = None,
    sdc_run: Path | None = None,
) -> Gathered:
    """Report data for ``resolved``: simulated sections (cached under ``run_dir/cache``) and the
    results of the runs given."""
    training = [load_training_run(p) for p in train_runs]
    determinism = load_determinism(determinism_run) if determinism_run else None
    sdc = load_sdc(sdc_run) if sdc_run else None
    code = code_fingerprint()
    data: dict[str, Any] = {
        "meta": {
            "title": title(resolved),
            "config_hash": config_hash(resolved),
            "config": resolved.config.to_dict(),
        }
    }
    computed, reused = [], []
    for name, (compute, inputs) in SECTIONS.items():
        section, hit = cached_section(
            run_dir / CACHE_DIR, name, inputs(resolved), lambda c=compute: c(resolved), code
        )
        data[name] = section
        (reused if hit else computed).append(name)
    data["training_runs"] = training
    data["determinism"] = determinism
    data["sdc"] = sdc
    return Gathered(data=data, computed=tuple(computed), reused=tuple(reused))


# -- PNG export -------------------------------------------------------------------------------

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
PNG_WIDTH = 1100


def find_browser() -> str | None:
    """A Chromium-family browser on PATH for kaleido, or None."""
    for name in BROWSER_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


async def _render_pngs(figures: Sequence[Figure], browser: str) -> list[bytes]:
    import kaleido

    out = []
    async with kaleido.Kaleido(n=1, timeout=120, mathjax=False, path=browser) as k:
        for f in figures:
            height = f.figure.layout.height or 500
            opts = {"format": "png", "width": PNG_WIDTH, "height": height, "scale": 1}
            out.append(await k.calc_fig(f.figure, opts=opts))
    return out


@dataclass(frozen=True)
class PngResult:
    written: tuple[str, ...]  # paths relative to the run directory
    skipped: str | None  # why no PNGs were written, else None


def write_pngs(figures: Sequence[Figure], run_dir: Path) -> PngResult:
    """One PNG per figure under ``run_dir/figures`` through kaleido and a system Chromium;
    skipped, with the reason, when either is missing or the export fails."""
    try:
        import kaleido  # noqa: F401
        from kaleido.errors import ChromeNotFoundError, KaleidoError
    except ImportError:
        return PngResult((), "kaleido is not installed (pip install kaleido)")
    browser = find_browser()
    if browser is None:
        return PngResult((), "no Chromium on PATH (install chromium to get PNG figures)")
    try:
        images = asyncio.run(_render_pngs(figures, browser))
    except (ChromeNotFoundError, KaleidoError, RuntimeError, OSError, TimeoutError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return PngResult((), f"PNG export through kaleido failed: {reason}")
    written = []
    for f, image in zip(figures, images, strict=True):
        relative = f"{PNG_DIR}/{f.div_id}.png"
        write_bytes_atomic(run_dir / relative, image)
        written.append(relative)
    return PngResult(tuple(written), None)
