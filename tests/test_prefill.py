"""Prefill and disaggregated serving in closed form and on the event simulator: the published
DeepSeek-V3 prefill profile, the laws of causal attention, chunking and prefix caching, the
throughput kernels' node relay, and the pair of pools."""

from __future__ import annotations

import dataclasses
import math

import pytest

from longcat_sim import bridge
from longcat_sim.cluster import closedform
from longcat_sim.cluster.assumptions import DEFAULT
from longcat_sim.cluster.costmodel import node_relay_shares
from longcat_sim.cluster.hardware import get_hardware
from longcat_sim.cluster.ops import ComputeOp, ExpertOp, LayerOps
from longcat_sim.cluster.simulator import simulate_decode
from longcat_sim.config.serving import DisaggDeployment, PrefillDeployment
from longcat_sim.errors import UserError
from longcat_sim.model.config import get_preset
from longcat_sim.scenarios.decode import decode_workload
from longcat_sim.scenarios.disagg import (
    colocated_results,
    disagg_results,
    merge_layers,
    prompt_kv_bytes,
    resolve_disagg,
)
from longcat_sim.scenarios.prefill import (
    closed_form_figures,
    prefill_memory,
    prefill_workload,
    resolve_prefill,
    run_prefill,
)
from tests.cluster.published import (
    DEEPSEEK_PREFILL_EP,
    DEEPSEEK_PREFILL_PROMPT,
    DEEPSEEK_PREFILL_TGS,
    DEEPSEEK_PREFILL_TOKENS,
    PREFILL_TOLERANCE,
)

BALANCED = ("routing=balanced",)


def deepseek_prefill(**changes) -> PrefillDeployment:
    """The profile's setting: H800, EP32, 4K prompts, 16K tokens per GPU, two micro-batches."""
    values = dict(
        model="deepseek-v3",
        hardware="H800",
        gpus=DEEPSEEK_PREFILL_EP,
        tokens_per_device=DEEPSEEK_PREFILL_TOKENS,
        prompt_len=DEEPSEEK_PREFILL_PROMPT,
        schedule="tbo",
    )
    return PrefillDeployment(**(values | changes))


def test_deepseek_v3_prefill_profile() -> None:
    figures = closed_form_figures(resolve_prefill(deepseek_prefill(), BALANCED))
    assert figures.input_tgs == pytest.approx(DEEPSEEK_PREFILL_TGS, rel=PREFILL_TOLERANCE)


def test_negative_control_prefill_without_overlap_misses() -> None:
    """The same forward without two-batch overlap (dispatch and combine exposed) misses the
    profile beyond the tolerance: the check can fail."""
    setup = resolve_prefill(deepseek_prefill(schedule="sequential"), BALANCED)
    assert closed_form_figures(setup).input_tgs < DEEPSEEK_PREFILL_TGS * (1 - PREFILL_TOLERANCE)


@pytest.mark.parametrize("schedule", ["tbo", "sequential"])
def test_simulated_forward_equals_closed_form(schedule: str) -> None:
    setup = resolve_prefill(deepseek_prefill(schedule=schedule, tokens_per_device=4096), BALANCED)
    result, _workload, closed = run_prefill(setup)
    assert result.step_ms == pytest.approx(closed * 1e3, rel=1e-9)


def test_longcat_sbo_simulated_equals_closed_form() -> None:
    setup = resolve_prefill(PrefillDeployment(tokens_per_device=4096), BALANCED)
    assert setup.schedule == "sbo"
    result, _workload, closed = run_prefill(setup)
    assert result.step_ms == pytest.approx(closed * 1e3, rel=1e-9)


def _attention_flops_per_token(prompt_len: float, **kw) -> float:
    cfg = get_preset("qwen3-235b-a22b")
    layers = bridge.prefill_layer_ops(cfg, DEFAULT, tokens=8192, prompt_len=prompt_len, **kw)
    core = [op for op in layers[0].ops if op.name == "attn.attention"]
    return core[0].flops / 8192


def test_causal_attention_grows_with_the_prompt() -> None:
    """Per token, causal attention attends to (L + 1) / 2 keys on average: doubling the prompt
    doubles it (less the + 1)."""
    short, long = _attention_flops_per_token(2048), _attention_flops_per_token(4096)
    assert long / short == pytest.approx(4097 / 2049, rel=1e-12)


def test_prompt_spread_counts_e_l2_over_e_l() -> None:
    base = _attention_flops_per_token(4096)
    spread = _attention_flops_per_token(4096, prompt_cv=1.0)  # E[L^2]/E[L] = 2 L
    assert spread / base == pytest.approx((2 * 4096 + 1) / 4097, rel=1e-12)


def test_prefix_cache_skips_compute_but_not_attention_reach() -> None:
    """Half the prompt cached: the new half attends to the cached half plus its causal part,
    3/4 of the prompt on average; throughput of served prompt tokens doubles the computed."""
    base = _attention_flops_per_token(4096)
    hit = _attention_flops_per_token(4096, prefix_hit=0.5)
    assert hit / base == pytest.approx((2048 + 2049 / 2) / (4097 / 2), rel=1e-12)
    setup = resolve_prefill(deepseek_prefill(prefix_hit=0.5), BALANCED)
    figures = closed_form_figures(setup)
    assert figures.input_tgs == pytest.approx(2 * figures.computed_tgs, rel=1e-12)


def test_chunked_prefill_ttft_counts_forwards() -> None:
    whole = resolve_prefill(deepseek_prefill(), BALANCED)
    chunked = resolve_prefill(deepseek_prefill(chunk_size=1024), BALANCED)
    assert whole.forwards_per_prompt == 1 and chunked.forwards_per_prompt == 4
    a, b = closed_form_figures(whole), closed_form_figures(chunked)
    assert b.ttft_s == pytest.approx(4 * b.forward_s, rel=1e-12)
    # each chunk re-reads (and under MLA re-projects) its prompt's cache so far: slower
    assert a.forward_s < b.forward_s < 1.1 * a.forward_s
    # the forward's prompts hold 4x the cache entries they compute
    assert prefill_memory(chunked).kv_cache_gb == pytest.approx(
        4 * prefill_memory(whole).kv_cache_gb, rel=1e-9
    )


@pytest.mark.parametrize(("ep", "k"), [(32, 8), (16, 8), (64, 12)])
def test_node_relay_shares_closed_form(ep: int, k: int) -> None:
    hw = get_hardware("H800")
    nodes = ep // hw.gpus_per_node
    nvlink, rdma = node_relay_shares(ep, hw, k)
    assert nvlink == pytest.approx((ep - 1) / ep)
    assert rdma == pytest.approx((nodes - 1) * (1 - (1 - 1 / nodes) ** k) / k)
    assert node_relay_shares(8, hw, k)[1] == 0.0  # one node: no RDMA


def test_sbo_refused_without_a_shortcut_branch() -> None:
    with pytest.raises(UserError, match="sbo needs ScMoE"):
        resolve_prefill(deepseek_prefill(schedule="sbo"))


def test_overlap_shares_the_sms() -> None:
    """Under TBO compute runs on the SMs the normal kernels leave: 1 / (1 - 24/132) slower."""
    setup = resolve_prefill(deepseek_prefill(tokens_per_device=4096), BALANCED)
    stretched = prefill_workload(setup)
    plain = prefill_workload(
        dataclasses.replace(setup, assumptions=setup.assumptions.replace(comm_sm_share=0.0))
    )
    a, b = stretched.layers_half[5], plain.layers_half[5]
    assert a.get("moe") / b.get("moe") == pytest.approx(132 / 108, rel=1e-9)
    assert a.get("dispatch") == b.get("dispatch")


# -- disaggregated pools ----------------------------------------------------------------------


def _pair(**changes) -> dict:
    dep = DisaggDeployment(**({"prefill_gpus": 16, "gpus": 64} | changes))
    return disagg_results(resolve_disagg(dep, (*BALANCED, "context_cv=0")))


def test_pools_run_at_the_slower_rate_and_balance_at_the_ratio() -> None:
    r = _pair()
    assert r["requests_per_s"] == min(r["prefill_requests_per_s"], r["decode_requests_per_s"])
    per_prefill_gpu = r["prefill_requests_per_s"] / r["prefill_gpus"]
    per_decode_gpu = r["decode_requests_per_s"] / r["decode_gpus"]
    assert r["balanced_prefill_per_decode_gpu"] == pytest.approx(per_decode_gpu / per_prefill_gpu)
    gpus = r["prefill_gpus"] + r["decode_gpus"]
    dollars_per_hour = gpus * get_hardware("H800").gpu_hour_usd
    out_per_hour = r["requests_per_s"] * 1024 * 3600
    assert r["cost_per_m_tokens"] == pytest.approx(dollars_per_hour / out_per_hour * 1e6)


def test_layerwise_transfer_hides_all_but_the_last_layer() -> None:
    layerwise, after = _pair(), _pair(kv_transfer="after_prefill")
    setup = resolve_disagg(DisaggDeployment(prefill_gpus=16, gpus=64), BALANCED)
    hw = setup.prefill.hw
    own = prompt_kv_bytes(setup.prefill) / (hw.rdma_bytes_per_s * DEFAULT.ep_normal_rdma_fraction)
    assert after["kv_transfer_exposed_ms"] == pytest.approx((own + hw.rdma_latency_s) * 1e3)
    assert layerwise["kv_transfer_exposed_ms"] == pytest.approx(
        (own / 28 + hw.rdma_latency_s) * 1e3
    )
    assert layerwise["ttft_ms"] < after["ttft_ms"]


def test_merged_pass_reads_weights_once() -> None:
    gemm = ComputeOp("w", "ffn", "gemm", flops=10.0, weight_bytes=100.0, act_bytes=5.0)
    experts = ExpertOp("e", "moe", 4.0, 2.0, 1.0, 50.0, 8)
    a = LayerOps(0, "moe", (gemm, experts))
    b = LayerOps(
        0, "moe", (dataclasses.replace(gemm, flops=30.0), dataclasses.replace(experts, pairs=6.0))
    )
    merged = {op.name: op for op in merge_layers(a, b).ops}
    assert merged["w"].flops == 40.0 and merged["w"].weight_bytes == 100.0
    assert merged["w"].act_bytes == 10.0 and merged["e"].pairs == 10.0


def test_colocated_step_between_decode_alone_and_two_passes() -> None:
    """One fused pass of the decode batch and its prompt chunk costs more than the decode step
    alone and less than the two passes run one after the other (the weights are read once)."""
    screen = (*BALANCED, "context_cv=0")
    setup = resolve_disagg(DisaggDeployment(gpus=64, batch_per_device=32), screen)
    colocated = colocated_results(setup)
    decode = closedform.step_time(decode_workload(setup.decode), setup.decode.schedule)
    chunk = resolve_prefill(
        PrefillDeployment(gpus=64, tokens_per_device=colocated["chunk_tokens"], schedule="sbo"),
        screen,
    )
    alone = dataclasses.replace(chunk, assumptions=setup.decode.assumptions)
    prefill = closedform.step_time(prefill_workload(alone), "sbo")
    assert decode * 1e3 < colocated["step_ms"] < (decode + prefill) * 1e3
    assert colocated["ttft_ms"] == pytest.approx(
        math.ceil(4096 / colocated["chunk_tokens"]) * colocated["step_ms"]
    )


def test_simulated_trace_carries_prefill_layers() -> None:
    setup = resolve_prefill(deepseek_prefill(tokens_per_device=2048), BALANCED)
    result = simulate_decode(prefill_workload(setup), "tbo")
    assert {r.layer for r in result.records} >= set(range(61))


def test_decode_pool_runs_the_batch_the_rate_keeps_in_flight() -> None:
    """Prefill-bound pair: the decode pool holds rate x output_len x TPOT requests (Little's
    law), fewer than its cap, and its TPOT is priced at that batch."""
    setup = resolve_disagg(DisaggDeployment(), (*BALANCED, "context_cv=0"))
    r = disagg_results(setup)
    assert r["bottleneck"] == "prefill" and r["decode_batch_in_flight"] < 96
    in_flight = r["requests_per_s"] * 1024 * r["tpot_ms"] / 1e3 / r["decode_gpus"]
    assert r["decode_batch_in_flight"] == pytest.approx(in_flight, abs=1.5)
    capped = disagg_results(resolve_disagg(DisaggDeployment(prefill_gpus=512), BALANCED))
    assert capped["bottleneck"] == "decode" and capped["decode_batch_in_flight"] == 96


def test_decode_context_follows_the_traffic() -> None:
    setup = resolve_disagg(DisaggDeployment(prompt_len=2000, output_len=1000), BALANCED)
    assert setup.decode.context == 2500
    stated = resolve_disagg(DisaggDeployment(prompt_len=2000, context=800.0), BALANCED)
    assert stated.decode.context == 800


def test_paced_prefill_counts_the_nic_wait_once() -> None:
    """A slow NIC stretches the forward (the KV cache shares it with dispatch and combine);
    TTFT then is the stretched forward plus the last layer's share, not both waits."""
    slow = resolve_disagg(DisaggDeployment(rdma_gb_s=2.0), BALANCED)
    r = disagg_results(slow)
    own = prompt_kv_bytes(slow.prefill) / (2e9 * DEFAULT.ep_normal_rdma_fraction)
    exposed = own / 28 + get_hardware("H800").rdma_latency_s
    assert r["kv_transfer_exposed_ms"] == pytest.approx(exposed * 1e3)
    workload = prefill_workload(slow.prefill)
    forward = closedform.step_time(workload, "sbo")
    comm = sum(st.comm_total for st in workload.layers)
    prompts = slow.prefill.tokens_per_device / slow.prefill.prompt_len
    paced = max(forward, comm + prompts * own)
    assert paced > forward  # the NIC binds here
    assert r["ttft_ms"] == pytest.approx((paced + exposed) * 1e3)
