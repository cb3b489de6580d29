"""Report tests. ``sample_report_data`` builds small, hand-made report data in the documented
shapes (``reports.inputs``), with every optional section present, so figure and page tests
need no simulation."""

from __future__ import annotations

import copy
from typing import Any

from tests.cluster.published import TABLE7


def _events(schedule: str) -> list[dict[str, Any]]:
    """Two layers of an ScMoE decode with made-up but consistent times (µs)."""
    rows = []
    for layer in (3, 4):
        t = 1000.0 * (layer - 3) + (50.0 if schedule == "tbo" else 0.0)
        for mb in (0, 1) if schedule == "tbo" else (0,):
            rows += [
                {
                    "name": "attn0",
                    "group": "attention",
                    "stream": "compute",
                    "start_us": t,
                    "end_us": t + 200,
                    "layer": layer,
                    "microbatch": mb,
                },
                {
                    "name": "dispatch",
                    "group": "dispatch",
                    "stream": "rdma",
                    "start_us": t + 200,
                    "end_us": t + 400,
                    "layer": layer,
                    "microbatch": mb,
                },
                {
                    "name": "moe",
                    "group": "routed_experts",
                    "stream": "compute",
                    "start_us": t + 400,
                    "end_us": t + 450,
                    "layer": layer,
                    "microbatch": mb,
                },
                {
                    "name": "combine",
                    "group": "combine",
                    "stream": "rdma",
                    "start_us": t + 450,
                    "end_us": t + 850,
                    "layer": layer,
                    "microbatch": mb,
                },
            ]
            t += 25.0
    return rows


def _paper(model: str) -> dict[str, float]:
    """The published Table 7 row of ``model`` as a report's ``paper`` record."""
    row = TABLE7[model]
    return {
        "attention_us": row.attention_us,
        "dispatch_us": row.dispatch_us,
        "experts_us": row.moe_us,
        "combine_us": row.combine_us,
        "tpot_ms": row.tpot_ms,
        "cost_per_m_tokens": row.cost_per_m_tokens,
    }


def _memory_point(batch: int, per_request_gb: float, fits: bool) -> dict[str, Any]:
    """A decode point's HBM: 30 GB of weights, 3 GB reserve, the rest per request."""
    parts = {
        "weights": 30.0,
        "kv_cache": 0.9 * per_request_gb * batch,
        "activations": 0.1 * per_request_gb * batch,
        "reserve": 3.0,
    }
    return {
        "batch_per_device": batch,
        "hbm_used_gb": sum(parts.values()),
        "fits": fits,
        "hbm_breakdown_gb": parts,
    }


def _prefill_points(forward_ms: float, used_gb: float) -> list[dict[str, Any]]:
    """Prompts of 1K to 32K tokens, 16K tokens per GPU (one prompt when longer); the forward
    grows with the prompt and the 32K one does not fit in 80 GB."""
    points = []
    for i, prompt in enumerate(1024 * 2**k for k in range(6)):
        tokens = max(16384, prompt)
        ms = forward_ms * (1.0 + 0.1 * i) * tokens / 16384
        points.append(
            {
                "prompt_len": prompt,
                "tokens_per_device": tokens,
                "forward_ms": ms,
                "ttft_ms": ms,
                "input_tgs": tokens / ms * 1e3,
                "cost_per_m_input_tokens": 2.0 / (tokens / ms * 1e3 * 3600) * 1e6,
                "hbm_used_gb": used_gb * tokens / 16384,
                "fits": used_gb * tokens / 16384 <= 80.0,
            }
        )
    return points


def _cdf(low_ms: float, high_ms: float) -> list[float]:
    """Percentiles 0..100 growing geometrically from ``low_ms`` to ``high_ms``."""
    return [low_ms * (high_ms / low_ms) ** (q / 100) for q in range(101)]


def _pool(load: float, capacity: int | None, bins: int = 12) -> dict[str, Any]:
    """A pool's load over ``bins`` 5-s bins, rising with ``load`` (requests per bin)."""
    running = [load * (1 + (i % 4)) for i in range(bins)]
    return {
        "instances": 1,
        "busy_share": min(1.0, 0.1 * load),
        "kv_capacity_tokens": capacity,
        "timeline": {
            "t_s": [5.0 * i for i in range(bins)],
            "queued": [0.1 * load * (i % 3) for i in range(bins)],
            "running": running,
            "kv_tokens": [1500.0 * r for r in running],
            "busy_share": [min(1.0, 0.05 * r) for r in running],
        },
    }


def _serve_run(layout: str, scale: float) -> dict[str, Any]:
    """A serving run whose latencies grow with the rate (``scale``)."""
    slow = 1.0 + 0.1 * scale
    capacity = 16_500_000
    if layout == "colocated":
        pools = {"colocated": _pool(scale, capacity)}
    else:
        pools = {"prefill": _pool(0.2 * scale, None), "decode": _pool(scale, capacity)}
    gpus = 32 if layout == "colocated" else 48
    rate = 3.2 * scale
    return {
        "layout": layout,
        "rate_scale": scale,
        "rate": rate,
        "requests": round(rate * 60),
        "requests_finished": round(rate * 60) - 5,
        "total_gpus": gpus,
        "kv_capacity_tokens": capacity,
        "slo_met": True,
        "ttft_p50_ms": 50.0 * slow,
        "ttft_p90_ms": 90.0 * slow,
        "ttft_p99_ms": 200.0 * slow,
        "tpot_p50_ms": 11.0 * slow,
        "tpot_p90_ms": 11.5 * slow,
        "tpot_p99_ms": 12.5 * slow,
        "e2e_p50_ms": 2500.0 * slow,
        "e2e_p90_ms": 4700.0 * slow,
        "e2e_p99_ms": 9000.0 * slow,
        "goodput_requests_per_s": 0.95 * rate,
        "slo_attainment": 1.0,
        "tgs": 8.0 * scale,
        "input_tgs": 100.0 * scale,
        "cost_per_m_tokens": 25.0 / scale,
        "ttft_cdf_ms": _cdf(30.0 * slow, 250.0 * slow),
        "tpot_cdf_ms": _cdf(10.0 * slow, 14.0 * slow),
        "e2e_cdf_ms": _cdf(150.0 * slow, 12000.0 * slow),
        "pools": pools,
    }


_SAMPLE: dict[str, Any] = {
    "meta": {
        "title": "Sample report",
        "config_hash": "0123456789abcdef" * 4,
        "config": {"model": "longcat-flash", "gpus": 128, "batch_per_device": [8, 16]},
    },
    "table7": {
        "context": 5000,
        "rows": [
            {
                "model": "longcat-flash",
                "overlap": "sbo",
                "paper": _paper("longcat-flash"),
                "simulated": {
                    "attention_us": 220.0,
                    "dispatch_us": 236.0,
                    "experts_us": 61.0,
                    "combine_us": 472.0,
                    "tpot_ms": 15.5,
                    "cost_per_m_tokens": 0.089,
                },
            },
            {
                "model": "deepseek-v3",
                "overlap": "tbo",
                "paper": _paper("deepseek-v3"),
                "simulated": {
                    "attention_us": 441.0,
                    "dispatch_us": 275.0,
                    "experts_us": 77.0,
                    "combine_us": 551.0,
                    "tpot_ms": 30.3,
                    "cost_per_m_tokens": 0.175,
                },
            },
        ],
    },
    "table6": {
        "assumptions": "default",
        "rows": [
            {
                "label": "LongCat-Flash, row 1",
                "model": "longcat-flash",
                "schedule": "sbo",
                "attention_dtype": "bf16",
                "context": 5000,
                "batch_per_device": 108,
                "paper": {"tgs": 3785.0, "tps_per_user": 35.0},
                "simulated": {"tgs": 4011.0, "tps_per_user": 37.1, "tpot_ms": 26.9},
            },
        ],
    },
    "timelines": {
        "model": "longcat-flash",
        "batch_per_device": 96,
        "layers": [3, 4],
        "schedules": {
            s: {"tpl_us": 1000.0, "tpot_ms": 20.0, "exposed_comm_share": 0.25, "events": _events(s)}
            for s in ("sequential", "sbo", "tbo")
        },
    },
    "pareto": {
        "models": {
            "longcat-flash": {
                "schedule": "sbo",
                "points": [
                    {
                        "batch_per_device": 8,
                        "tps_per_user": 90.0,
                        "tgs": 700.0,
                        "cost_per_m_tokens": 0.8,
                        "tpot_ms": 11.1,
                        "hbm_used_gb": 36.0,
                        "fits": True,
                    },
                    {
                        "batch_per_device": 16,
                        "tps_per_user": 80.0,
                        "tgs": 1300.0,
                        "cost_per_m_tokens": 0.43,
                        "tpot_ms": 12.5,
                        "hbm_used_gb": 38.0,
                        "fits": True,
                    },
                    {
                        "batch_per_device": 32,
                        "tps_per_user": 70.0,
                        "tgs": 1200.0,
                        "cost_per_m_tokens": 0.46,
                        "tpot_ms": 14.3,
                        "hbm_used_gb": 44.0,
                        "fits": True,
                    },
                    {
                        # would dominate batch 16 and 32 on throughput, but does not fit
                        "batch_per_device": 256,
                        "tps_per_user": 85.0,
                        "tgs": 5000.0,
                        "cost_per_m_tokens": 0.11,
                        "tpot_ms": 13.3,
                        "hbm_used_gb": 118.0,
                        "fits": False,
                    },
                ],
            },
            "deepseek-v3": {
                "schedule": "tbo",
                "points": [
                    {
                        "batch_per_device": 8,
                        "tps_per_user": 40.0,
                        "tgs": 320.0,
                        "cost_per_m_tokens": 1.7,
                        "tpot_ms": 25.0,
                        "hbm_used_gb": 33.0,
                        "fits": True,
                    },
                    {
                        "batch_per_device": 16,
                        "tps_per_user": 35.0,
                        "tgs": 560.0,
                        "cost_per_m_tokens": 1.0,
                        "tpot_ms": 28.6,
                        "hbm_used_gb": 36.0,
                        "fits": True,
                    },
                ],
            },
        }
    },
    "memory": {
        "hardware": "H800",
        "hbm_gb": 80.0,
        "gpus": 128,
        "context": 5000,
        "models": {
            name: {
                "schedule": schedule,
                "max_batch_per_device": largest,
                "points": [_memory_point(b, per_request, b <= largest) for b in (8, 64, 192)],
            }
            for name, schedule, largest, per_request in (
                ("longcat-flash", "sbo", 141, 0.33),
                ("deepseek-v3", "tbo", 142, 0.35),
            )
        },
    },
    "prefill": {
        "hardware": "H800",
        "gpus": 32,
        "tokens_per_device": 16384,
        "assumptions": "default",
        "models": {
            "longcat-flash": {"schedule": "sbo", "points": _prefill_points(1100.0, 56.0)},
            "deepseek-v3": {"schedule": "tbo", "points": _prefill_points(2150.0, 53.0)},
        },
        "profile": {
            "label": "DeepSeek-V3 prefill profile (balanced)",
            "model": "deepseek-v3",
            "hardware": "H800",
            "ep": 32,
            "prompt_len": 4096,
            "tokens_per_device": 16384,
            "schedule": "tbo",
            "routing": "balanced",
            "measured_tgs": 7839.0,
            "simulated_tgs": 8021.0,
        },
    },
    "training_overlap": {
        "paper": {"baseline": 0.253, "scmoe": 0.084},
        "simulated": {
            "baseline": {
                "exposed_comm_share": 0.3,
                "step_ms": 100.0,
                "comm_ms": 40.0,
                "exposed_comm_ms": 30.0,
            },
            "scmoe": {
                "exposed_comm_share": 0.1,
                "step_ms": 80.0,
                "comm_ms": 40.0,
                "exposed_comm_ms": 8.0,
            },
        },
    },
    "serving": {
        "model": "longcat-flash",
        "hardware": "H800",
        "trace": "azure-conv",
        "recorded_rate": 5.53,
        "duration_s": 60.0,
        "gpus": 32,
        "prefill_gpus": 16,
        "slo_ttft_ms": 2000.0,
        "slo_tpot_ms": 50.0,
        "slo_percentile": 90.0,
        "runs": [
            _serve_run(layout, scale) for layout in ("colocated", "disagg") for scale in (1.0, 10.0)
        ],
    },
    "training_runs": [
        {
            "name": "tiny-run",
            "model": "tiny",
            "target_ffn_experts": 2.0,
            "records": [
                {"step": s, "lm_loss": 6.0 - 0.1 * s, "ffn_experts_mean": [2.5 - 0.05 * s, 1.8]}
                | ({"val_loss": 6.1 - 0.1 * s} if s % 5 == 4 else {})
                for s in range(10)
            ],
        }
    ],
    "determinism": {
        "verdict": "identical",
        "runs": 2,
        "steps": 10,
        "first_divergence": None,
        "fingerprints": ["ab" * 32, "ab" * 32],
    },
    "sdc": {
        "trials": [
            {"site": site, "bit": bit, "detected": {"checksum": bit >= 20, "replay": True}}
            for site in ("layers.0.attn", "layers.0.moe")
            for bit in (0, 10, 20, 30)
        ],
    },
}


def sample_report_data(**changes: Any) -> dict[str, Any]:
    """A deep copy of the sample, with top-level sections replaced by ``changes``."""
    data = copy.deepcopy(_SAMPLE)
    data.update(copy.deepcopy(changes))
    return data
