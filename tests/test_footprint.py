"""Per-GPU HBM footprint: published deployments fit, the next smaller ones do not, and
``max_batch`` is the exact boundary."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longcat_sim.cluster.assumptions import DEFAULT
from longcat_sim.cluster.errors import ClusterInputError
from longcat_sim.cluster.hardware import Hardware, get_hardware
from longcat_sim.footprint import (
    FP8_SCALE_BYTES_PER_WEIGHT,
    Footprint,
    decode_footprint,
    infeasible_message,
    prefill_footprint,
    weight_bytes_per_gpu,
)
from longcat_sim.model import costs
from longcat_sim.model.config import get_preset
from tests.cluster.published import DEEPSEEK_PROFILE_BATCH, DEEPSEEK_PROFILE_CONTEXT

B = 1e9
LONGCAT = get_preset("longcat-flash")
DSV3 = get_preset("deepseek-v3")
QWEN3 = get_preset("qwen3-235b-a22b")
TINY = get_preset("tiny")
BF16 = DEFAULT.replace(linear_precision="bf16", expert_precision="bf16")
FP8 = DEFAULT.replace(linear_precision="fp8", expert_precision="fp8")
H800 = get_hardware("H800")


def _h20_141g() -> Hardware:
    try:
        return get_hardware("H20-141G")
    except ClusterInputError:  # the catalogue entry may not be there yet
        return get_hardware("H20").replace(name="H20-141G", hbm_gb=141.0, hbm_tb_s=4.8)


def _tp_decode(cfg, hw, a, gpus: int, *, batch: int = 1, context: int = 4096) -> Footprint:
    """SGLang ``--tp gpus --enable-ep-moe``: attention, dense FFNs and experts over all GPUs."""
    return decode_footprint(
        cfg,
        hw,
        a,
        ep=gpus,
        attention_tp=gpus,
        ffn_tp=gpus,
        batch_per_device=batch,
        context=context,
    )


def test_longcat_weights_sum_to_published_parameter_count() -> None:
    # spec/validation.md V5: 560.67 B parameters (arXiv 2509.01322 sec. 1); BF16 is 2 B each,
    # the float32 router adds 28 x 6144 x 768 x 2 B = 0.26 GB
    bf16 = weight_bytes_per_gpu(LONGCAT, BF16, ep=1)
    assert bf16 == pytest.approx(560.67 * B * 2, rel=1e-3)
    assert bf16 > costs.total_params(LONGCAT) * 2
    # FP8: 1 B per weight plus a float32 scale per 128 x 128 block; embedding/LM head stay BF16
    fp8 = weight_bytes_per_gpu(LONGCAT, FP8, ep=1)
    assert fp8 == pytest.approx(560.67 * B * (1 + 4 / 128**2), rel=5e-3)
    assert bf16 / 2 < fp8 < 0.51 * bf16
    assert FP8_SCALE_BYTES_PER_WEIGHT == 4 / 16384


def test_mtp_weights_are_the_mtp_module() -> None:
    # the MTP module's parameters (model.costs.mtp_params), all BF16 when replicated
    extra = weight_bytes_per_gpu(LONGCAT, BF16, ep=1, mtp=True) - weight_bytes_per_gpu(
        LONGCAT, BF16, ep=1
    )
    assert extra == pytest.approx(costs.mtp_params(LONGCAT) * 2)


def test_experts_split_over_ep_and_redundant_slots_add() -> None:
    one = weight_bytes_per_gpu(LONGCAT, BF16, ep=1)
    ep8 = weight_bytes_per_gpu(LONGCAT, BF16, ep=8)
    per_expert_layer = costs.expert_params(LONGCAT) * 2 * costs.moe_layer_count(LONGCAT)
    assert one - ep8 == pytest.approx((512 - 64) * per_expert_layer)
    extra = weight_bytes_per_gpu(LONGCAT, BF16, ep=8, redundant_experts=8) - ep8
    assert extra == pytest.approx(per_expert_layer)


def test_longcat_bf16_on_16_h800_fits_and_8_do_not() -> None:
    # SGLang's LongCat-Flash recipe: BF16 on 2 nodes of 8 H800-80G, --tp 16 --enable-ep-moe.
    # MLA under attention TP 16 keeps every request's latent on all 16 ranks: one 4096-token
    # request per GPU (16 per group) is 4.2 GB per GPU against ~4.0 GB left after 70.6 GB of
    # weights and DEFAULT's 5.4 GB reserve, so the check runs at 1024 tokens (1.06 GB each).
    fp = _tp_decode(LONGCAT, H800, BF16, 16, context=1024)
    assert fp.fits and fp.max_batch >= 1
    at_4096 = _tp_decode(LONGCAT, H800, BF16, 16, context=4096)
    assert at_4096.weights_gb + at_4096.reserve_gb < H800.hbm_gb
    smaller = _tp_decode(LONGCAT, H800, BF16, 8, context=1024)
    assert not smaller.fits and smaller.max_batch == 0


def test_longcat_fp8_on_8_h20_141g_fits_and_4_do_not() -> None:
    # LongCat-Flash FP8 recipe: one node of 8 H20-141G, --tp 8 --enable-ep-moe
    h20 = _h20_141g()
    fp = _tp_decode(LONGCAT, h20, FP8, 8)
    assert fp.fits and fp.max_batch >= 1
    smaller = _tp_decode(LONGCAT, h20, FP8, 4)
    assert not smaller.fits and smaller.max_batch == 0


def test_qwen3_kv_cache_alone_overflows_an_h800() -> None:
    # 128 requests x 4096 tokens x (4 KV heads x 128 x 2 x 94 layers x 2 B) = 100.9 GB > 80 GB
    fp = decode_footprint(
        QWEN3, H800, FP8, ep=128, attention_tp=4, batch_per_device=128, context=4096
    )
    assert fp.kv_cache_gb == pytest.approx(128 * 4096 * 4 * 128 * 2 * 94 * 2 / B)
    assert fp.kv_cache_gb == pytest.approx(100.9, abs=0.05)
    assert not fp.fits
    assert fp.max_batch < 128


def test_gqa_kv_is_replicated_only_beyond_the_kv_heads() -> None:
    tp4 = decode_footprint(QWEN3, H800, FP8, ep=1, attention_tp=4, batch_per_device=1, context=8)
    tp8 = decode_footprint(QWEN3, H800, FP8, ep=1, attention_tp=8, batch_per_device=1, context=8)
    tp1 = decode_footprint(QWEN3, H800, FP8, ep=1, batch_per_device=1, context=8)
    assert tp4.kv_cache_gb == pytest.approx(tp1.kv_cache_gb)  # 4 KV heads over 4 ranks
    assert tp8.kv_cache_gb == pytest.approx(2 * tp1.kv_cache_gb)  # each head on 2 ranks


def test_mla_latent_is_kept_whole_on_every_tp_rank() -> None:
    # 56 attention blocks x (512 + 64) x 2 B per token (spec V5), on all 16 ranks
    tp1 = decode_footprint(LONGCAT, H800, BF16, ep=16, batch_per_device=1, context=4096)
    tp16 = _tp_decode(LONGCAT, H800, BF16, 16)
    assert tp1.kv_cache_gb == pytest.approx(4096 * 56 * 576 * 2 / B)
    assert tp16.kv_cache_gb == pytest.approx(16 * tp1.kv_cache_gb)


def test_deepseek_v3_needs_more_than_one_h800() -> None:
    # deepseek-ai/profile-data decode: EP128, 128 requests per GPU, 4K context (FP8 weights)
    one = decode_footprint(DSV3, H800, FP8, ep=1, batch_per_device=1, context=4096)
    assert not one.fits and one.max_batch == 0
    profile = decode_footprint(
        DSV3,
        H800,
        FP8,
        ep=128,
        batch_per_device=DEEPSEEK_PROFILE_BATCH,
        context=DEEPSEEK_PROFILE_CONTEXT,
    )
    assert profile.fits and profile.max_batch >= DEEPSEEK_PROFILE_BATCH


def test_reserve_is_fixed_plus_fragmentation() -> None:
    fp = decode_footprint(TINY, H800, DEFAULT, ep=1, batch_per_device=1, context=16)
    assert fp.reserve_gb == pytest.approx(DEFAULT.hbm_runtime_gb + DEFAULT.hbm_fragmentation * 80)


def test_prefill_micro_batches_halve_activations_beyond_two() -> None:
    kw = dict(ep=32, tokens_per_device=16384, prompt_len=4096)
    one = prefill_footprint(DSV3, H800, FP8, **kw, micro_batches=1)
    two = prefill_footprint(DSV3, H800, FP8, **kw, micro_batches=2)
    four = prefill_footprint(DSV3, H800, FP8, **kw, micro_batches=4)
    assert two.activations_gb == pytest.approx(one.activations_gb)  # both live at once
    assert four.activations_gb == pytest.approx(one.activations_gb / 2)
    assert one.kv_cache_gb == pytest.approx(16384 * costs.kv_cache_bytes_per_token(DSV3) / B)
    assert "max_tokens_per_device" in one.to_dict()


CASES = [
    (LONGCAT, H800, BF16, dict(ep=16, attention_tp=16, ffn_tp=16)),
    (LONGCAT, H800, FP8, dict(ep=128)),
    (DSV3, H800, FP8, dict(ep=128)),
    (QWEN3, H800, FP8, dict(ep=128, attention_tp=4)),
    (TINY, H800, FP8, dict(ep=1)),
]


def _is_boundary(at, n: int) -> bool:
    """``n`` fits (or is 0) and ``n + 1`` does not."""
    return (n == 0 or at(n).fits) and not at(n + 1).fits


@settings(max_examples=40)
@given(
    case=st.sampled_from(CASES),
    context=st.integers(1, 131072),
    prefill=st.booleans(),
    extra=st.integers(0, 2),
)
def test_max_batch_is_the_boundary(case, context: int, prefill: bool, extra: int) -> None:
    cfg, hw, a, par = case

    def at(n: int) -> Footprint:
        if prefill:
            return prefill_footprint(
                cfg, hw, a, **par, tokens_per_device=n, prompt_len=context, micro_batches=extra + 1
            )
        return decode_footprint(
            cfg, hw, a, **par, batch_per_device=n, context=context, mtp_draft_tokens=extra
        )

    n = at(1).max_batch
    assert at(n).max_batch == n  # independent of the batch it is measured at
    assert _is_boundary(at, n)
    assert not _is_boundary(at, n + 1)  # negative control: a max_batch one too large is caught


def test_infeasible_message_is_one_line_and_names_the_overflow() -> None:
    fp = decode_footprint(DSV3, H800, FP8, ep=1, batch_per_device=128, context=4096)
    text = infeasible_message(fp, "deepseek-v3 on 1 x H800")
    assert "\n" not in text
    assert text.startswith("deepseek-v3 on 1 x H800 does not fit: needs ")
    assert f"{fp.used_gb - 80:.1f} GB over" in text
    assert "of 80 GB" in text and "0 requests per GPU" in text
    assert "weights and reserve alone exceed HBM" in text


def test_to_dict_names_the_breakdown() -> None:
    fp = _tp_decode(LONGCAT, _h20_141g(), FP8, 8)
    d = fp.to_dict()
    assert d["fits"] is True and d["hbm_gb"] == 141.0
    assert d["max_batch_per_device"] == fp.max_batch
    parts = d["hbm_breakdown_gb"]
    assert set(parts) == {"weights", "kv_cache", "activations", "reserve"}
    assert sum(parts.values()) == pytest.approx(d["hbm_used_gb"])


@pytest.mark.parametrize(
    "kwargs",
    [dict(ep=0), dict(attention_tp=0), dict(batch_per_device=-1), dict(attention_dtype="fp4")],
)
def test_bad_inputs_are_one_line_errors(kwargs) -> None:
    args = dict(ep=1, batch_per_device=1, context=16) | kwargs
    with pytest.raises(ClusterInputError) as info:
        decode_footprint(TINY, H800, DEFAULT, **args)
    assert "\n" not in str(info.value)
