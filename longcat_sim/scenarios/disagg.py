"""A prefill pool beside a decode pool (prefill/decode disaggregation), and the same traffic
served co-located (chunked prefill mixed into decode steps), priced in closed form.

Disaggregated: the prefill pool computes prompts (``scenarios.prefill``) and sends each
prompt's KV cache to the decode pool over RDMA, layer by layer as prefill finishes each layer
(``layerwise``: only the last layer's share is exposed) or after the whole forward
(``after_prefill``: the whole prompt's cache is exposed). The cache shares the prefill GPU's NIC
with dispatch and combine; when both together need longer than a forward, the forward waits.
TTFT counts the exposed transfer (the decode pool returns the first token). The pools run at
the rate of the slower one; the prefill:decode GPU ratio that balances them is reported.

Co-located: every decode step also computes ``chunk`` prompt tokens, chosen so that prompts
enter as fast as requests finish: chunk = batch x tokens per request-step x prompt_len /
output_len. The mixed step is priced as one pass: ops of the same name add their FLOPs,
activations and cache traffic and read their weights once.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from longcat_sim import bridge
from longcat_sim.cluster import closedform, costmodel
from longcat_sim.cluster.ops import CommOp, ComputeOp, ExpertOp, LayerOps
from longcat_sim.cluster.workload import DecodeWorkload
from longcat_sim.config.deployment import DecodeDeployment
from longcat_sim.config.serving import DisaggDeployment, PrefillDeployment
from longcat_sim.footprint import prefill_footprint
from longcat_sim.model import costs
from longcat_sim.scenarios.decode import (
    DecodeSetup,
    decode_memory,
    decode_workload,
    resolve_decode,
)
from longcat_sim.scenarios.prefill import (
    PrefillSetup,
    prefill_figures,
    prefill_workload,
    resolve_prefill,
)

_BYTES = {"bf16": 2, "fp8": 1}


@dataclass(frozen=True)
class DisaggSetup:
    prefill: PrefillSetup
    decode: DecodeSetup
    output_len: float
    kv_transfer: str


def _fields(cls: type, dep: Any, **renamed: str) -> dict[str, Any]:
    """``cls``'s fields taken from ``dep`` (``renamed``: cls field -> dep field)."""
    names = [f.name for f in dataclasses.fields(cls)]
    return {n: getattr(dep, renamed.get(n, n)) for n in names}


def resolve_disagg(dep: DisaggDeployment, assume: list[str] | tuple[str, ...] = ()) -> DisaggSetup:
    """The two pools of a disaggregated deployment, each checked like its own mode."""
    renamed = dict(gpus="prefill_gpus", ep="prefill_ep", schedule="prefill_schedule")
    if dep.prefill_hardware is not None:
        renamed["hardware"] = "prefill_hardware"
    prefill = PrefillDeployment(**_fields(PrefillDeployment, dep, **renamed))
    values = _fields(DecodeDeployment, dep)
    if dep.context is None:  # a request's mean context over its decode
        values["context"] = float(dep.prompt_len) + float(dep.output_len) / 2
    decode = DecodeDeployment(**values)
    return DisaggSetup(
        prefill=resolve_prefill(prefill, assume, "prefill-"),
        decode=resolve_decode(decode, assume),
        output_len=float(dep.output_len),
        kv_transfer=dep.kv_transfer,
    )


def prompt_kv_bytes(setup: PrefillSetup) -> float:
    """Bytes of one prompt's KV cache (every attention block) that move to the decode pool."""
    per_token = costs.kv_cache_bytes_per_token(setup.cfg, _BYTES[setup.attention_dtype])
    return setup.prompt_len * per_token


def exposed_transfer(setup: DisaggSetup, prompt_tokens: Any) -> Any:
    """Seconds of a prompt's KV transfer the decode pool waits for: the whole cache, or
    layer-wise the last layer's share after the forward, plus the RDMA latency
    (``prompt_tokens``: a number or an array)."""
    p = setup.prefill
    bandwidth = p.hw.rdma_bytes_per_s * p.assumptions.ep_normal_rdma_fraction
    own = prompt_tokens * (prompt_kv_bytes(p) / p.prompt_len) / bandwidth
    if setup.kv_transfer == "layerwise":
        own = own / p.cfg.num_layers
    return own + p.hw.rdma_latency_s


def kv_transfer_s(setup: DisaggSetup, forward_s: float, comm_s: float) -> tuple[float, float]:
    """(exposed transfer per prompt, forward time with the NIC shared) in seconds."""
    p = setup.prefill
    bandwidth = p.hw.rdma_bytes_per_s * p.assumptions.ep_normal_rdma_fraction
    prompts = p.tokens_per_device / p.new_tokens_per_prompt
    per_forward = prompts * prompt_kv_bytes(p) / bandwidth
    paced = max(forward_s, comm_s + per_forward)
    return exposed_transfer(setup, p.prompt_len), paced


def comm_seconds(workload: Any) -> float:
    layers = workload.layers or workload.layers_half
    scale = 1 if workload.layers else 2
    return scale * sum(st.comm_total for st in layers)


def decode_batch_in_flight(
    setup: DisaggSetup, rate: float, tpot_at_cap: float, rounds: int = 4
) -> tuple[int, float]:
    """(batch per GPU, TPOT in s) of the decode pool at the batch the pair's request rate keeps
    in flight (Little's law: requests decoding = rate x output_len x TPOT, over the pool's
    GPUs), at most its ``batch_per_device``: a few rounds of the fixed point from the cap (TPOT
    falls with the batch, so the rounds only go down)."""
    d = setup.decode
    batch, tpot = d.batch_per_device, tpot_at_cap
    for _ in range(rounds):
        needed = max(1, math.ceil(rate * setup.output_len * tpot / d.gpus))
        if needed >= batch:
            break
        batch = needed
        tpot = closedform.tpot_s(
            decode_workload(dataclasses.replace(d, batch_per_device=batch)), d.schedule
        )
    return batch, tpot


def _prefill_side(setup: DisaggSetup) -> tuple[float, float, float, float]:
    """(TTFT, exposed KV transfer, prompt tokens per GPU per second, $ per GPU-hour) of the
    prefill pool with its NIC shared by dispatch, combine and the KV transfer."""
    p = setup.prefill
    pw = prefill_workload(p)
    forward_s = closedform.step_time(pw, p.schedule)
    exposed_s, paced_s = kv_transfer_s(setup, forward_s, comm_seconds(pw))
    pf = prefill_figures(p, paced_s, pw.gpu_hour_usd)
    return pf.ttft_s + exposed_s, exposed_s, pf.input_tgs, pw.gpu_hour_usd


def disagg_results(setup: DisaggSetup, in_flight: bool = True) -> dict[str, Any]:
    """Steady-state figures of the pair of pools (closed form). The pair runs at the slower
    pool's request rate; when the prefill pool binds, the decode pool runs the smaller batch
    that rate keeps in flight (:func:`decode_batch_in_flight`; ``in_flight`` False: priced at
    its cap, a screening bound that costs two pricings instead of up to six)."""
    p, d = setup.prefill, setup.decode
    ttft_s, exposed_s, input_tgs, price_p = _prefill_side(setup)
    dw = decode_workload(d)
    tpot_cap = closedform.tpot_s(dw, d.schedule)
    tgs = d.batch_per_device / tpot_cap
    prefill_rate = p.gpus * input_tgs / p.prompt_len  # requests per second
    decode_rate = d.gpus * tgs / setup.output_len
    rate = min(prefill_rate, decode_rate)
    batch, tpot_s = d.batch_per_device, tpot_cap
    if in_flight and prefill_rate < decode_rate:
        batch, tpot_s = decode_batch_in_flight(setup, rate, tpot_cap)
    price_d, gpus = dw.gpu_hour_usd, p.gpus + d.gpus
    out_tokens, in_tokens = rate * setup.output_len, rate * p.prompt_len
    return {
        "mode": "disagg",
        "prefill_gpus": p.gpus,
        "decode_gpus": d.gpus,
        "kv_transfer": setup.kv_transfer,
        "ttft_ms": ttft_s * 1e3,
        "kv_transfer_exposed_ms": exposed_s * 1e3,
        "tpot_ms": tpot_s * 1e3,
        "decode_batch_in_flight": batch,
        "input_tgs": input_tgs,
        "tgs": batch / tpot_s,  # output tokens per decode GPU per second, as it runs
        "prefill_requests_per_s": prefill_rate,
        "decode_requests_per_s": decode_rate,
        "requests_per_s": rate,
        "bottleneck": "prefill" if prefill_rate < decode_rate else "decode",
        "balanced_prefill_per_decode_gpu": (tgs / setup.output_len) / (input_tgs / p.prompt_len),
        "output_tokens_per_gpu_s": out_tokens / gpus,
        "prefill_gpu_hour_usd": price_p,
        "cost_per_m_input_tokens": p.gpus * price_p / (in_tokens * 3600.0) * 1e6,
        "cost_per_m_output_tokens": d.gpus * price_d / (out_tokens * 3600.0) * 1e6,
        "cost_per_m_tokens": (p.gpus * price_p + d.gpus * price_d) / (out_tokens * 3600.0) * 1e6,
    }


# -- co-located: chunked prefill inside decode steps ---------------------------------------------


def _merge_ops(a: ComputeOp | ExpertOp, b: ComputeOp | ExpertOp) -> ComputeOp | ExpertOp:
    if isinstance(a, ExpertOp) and isinstance(b, ExpertOp):
        return dataclasses.replace(a, pairs=a.pairs + b.pairs)
    assert isinstance(a, ComputeOp) and isinstance(b, ComputeOp)
    return dataclasses.replace(
        a,
        flops=a.flops + b.flops,
        weight_bytes=max(a.weight_bytes, b.weight_bytes),
        act_bytes=a.act_bytes + b.act_bytes,
        kv_bytes=a.kv_bytes + b.kv_bytes,
    )


def merge_layers(first: LayerOps, second: LayerOps) -> LayerOps:
    """One pass over both op lists: same-named ops fused (work adds, weights read once), the
    others kept; collectives of the same name carry both payloads (low-latency kernels)."""
    ops: dict[str, ComputeOp | ExpertOp] = {}
    for op in (*first.ops, *second.ops):
        ops[op.name] = _merge_ops(ops[op.name], op) if op.name in ops else op
    comms: dict[str, CommOp] = {}
    for c in (*first.comms, *second.comms):
        c = dataclasses.replace(c, copies_per_token=0.0)
        prev = comms.get(c.name)
        comms[c.name] = dataclasses.replace(c, bytes=prev.bytes + c.bytes) if prev else c
    return LayerOps(first.index, first.kind, tuple(ops.values()), tuple(comms.values()))


def colocated_chunk(setup: DisaggSetup) -> int:
    """Prompt tokens per GPU per step that admit requests as fast as they finish."""
    d = setup.decode
    per_step = 1.0 + d.mtp_accept * d.mtp_draft_tokens
    new_tokens = setup.prefill.new_tokens_per_prompt
    return max(1, round(d.batch_per_device * per_step * new_tokens / setup.output_len))


def colocated_workload(
    setup: DisaggSetup, batch: int, context: float, chunk: int
) -> DecodeWorkload:
    """One step of the decode pool's deployment holding ``batch`` decoding requests per GPU
    of ``context`` cached tokens each, also computing ``chunk`` prompt tokens per GPU (prompts
    of the prefill pool's lengths), priced as one pass."""
    d, p = setup.decode, setup.prefill
    queries = 1 + d.mtp_draft_tokens
    decode_tokens = batch * queries

    def ops_for_tokens(tokens: int) -> tuple[LayerOps, ...]:
        share = tokens / decode_tokens
        dec = bridge.decode_layer_ops(
            d.cfg, d.assumptions, tokens=tokens, context=context,
            attention_dtype=d.attention_dtype, queries_per_request=queries,
            attention_tp=d.attention_tp, ffn_tp=d.ffn_tp,
        )  # fmt: skip
        pre = bridge.prefill_layer_ops(
            d.cfg, d.assumptions, tokens=max(1, round(chunk * share)),
            prompt_len=p.prompt_len, prompt_cv=p.prompt_cv, prefix_hit=p.prefix_hit,
            chunk_size=p.chunk_size, attention_dtype=d.attention_dtype,
            attention_tp=d.attention_tp, ffn_tp=d.ffn_tp,
        )  # fmt: skip
        return tuple(merge_layers(x, y) for x, y in zip(dec, pre, strict=True))

    def step_ops(tokens: int) -> tuple[ComputeOp, ...]:
        return bridge.decode_step_ops(
            d.cfg, d.assumptions, tokens=tokens, requests=batch, context=context,
            attention_dtype=d.attention_dtype, mtp_draft_tokens=d.mtp_draft_tokens,
        )  # fmt: skip

    return costmodel.decode_workload(
        ops_for_tokens,
        hardware=d.hw,
        assumptions=d.assumptions,
        ep=d.ep,
        batch_per_device=batch,
        mtp_draft_tokens=d.mtp_draft_tokens,
        mtp_accept=d.mtp_accept,
        redundant_experts=d.redundant_experts,
        rng=np.random.default_rng(d.seed),
        step_ops_for_tokens=step_ops if d.assumptions.step_work else None,
        micro_batches=(2,) if d.schedule == "tbo" else (1,),
    )


def colocated_results(setup: DisaggSetup) -> dict[str, Any]:
    """The same traffic on the decode pool's deployment (its hardware, EP and schedule) with
    chunked prefill in every step; per-GPU figures, so any GPU count of that layout reads
    them."""
    d, p = setup.decode, setup.prefill
    chunk = colocated_chunk(setup)
    workload = colocated_workload(setup, d.batch_per_device, d.context, chunk)
    step_s = closedform.step_time(workload, d.schedule)
    per_request_step = closedform.tokens_per_request_step(workload)
    tgs = d.batch_per_device * per_request_step / step_s
    return {
        "chunk_tokens": chunk,
        "step_ms": step_s * 1e3,
        "ttft_ms": math.ceil(p.new_tokens_per_prompt / chunk) * step_s * 1e3,
        "tpot_ms": step_s / per_request_step * 1e3,
        "tgs": tgs,
        "input_tgs": chunk / step_s * p.prompt_len / p.new_tokens_per_prompt,
        "cost_per_m_tokens": workload.gpu_hour_usd / (tgs * 3600.0) * 1e6,
    } | colocated_memory(setup, chunk)


def colocated_memory(setup: DisaggSetup, chunk: int) -> dict[str, Any]:
    """HBM per co-located GPU: the decode batch's footprint, plus the KV cache of the prompt
    being prefilled in chunks and the activations of one chunk."""
    d, p = setup.decode, setup.prefill
    decode = decode_memory(d)
    layout = dict(
        ep=d.ep,
        prompt_len=max(1, round(p.prompt_len)),
        attention_dtype=d.attention_dtype,
        redundant_experts=d.redundant_experts,
        attention_tp=d.attention_tp,
        ffn_tp=d.ffn_tp,
    )
    prompt = prefill_footprint(
        d.cfg, d.hw, d.assumptions, tokens_per_device=round(p.new_tokens_per_prompt), **layout
    )
    step = prefill_footprint(d.cfg, d.hw, d.assumptions, tokens_per_device=chunk, **layout)
    used = decode.used_gb + prompt.kv_cache_gb + step.activations_gb
    return {"hbm_used_gb": used, "hbm_gb": decode.hbm_gb, "fits": used <= decode.hbm_gb}


__all__ = [
    "DisaggSetup",
    "colocated_results",
    "colocated_workload",
    "disagg_results",
    "merge_layers",
    "resolve_disagg",
]
