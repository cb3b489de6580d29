"""MLA: full form against a naive per-head reference; absorbed cached form against the full form."""

from __future__ import annotations

import cmath
import math

import pytest
import torch
from torch import nn

from longcat_sim.model.config import get_preset
from longcat_sim.model.kv_cache import LatentKVCache
from longcat_sim.model.layers import RMSNorm, RotaryEmbedding
from longcat_sim.model.mla import MLA

TINY = get_preset("tiny")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mla(cfg, seed: int, dtype=torch.float64) -> MLA:
    """An MLA with weights large enough that attention is far from uniform."""
    with torch.device("meta"):
        mla = MLA(cfg)
    mla.to_empty(device="cpu").to(dtype)
    g = _gen(seed)
    with torch.no_grad():
        for module in mla.modules():
            if isinstance(module, nn.Linear):
                fan_in = module.weight.shape[1]
                module.weight.normal_(0.0, 1.5 / math.sqrt(fan_in), generator=g)
            elif isinstance(module, RMSNorm):
                module.weight.copy_(1.0 + 0.3 * torch.randn(module.weight.shape, generator=g))
    return mla


def _rope(cfg, seq: int):
    return RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope_theta)(torch.arange(seq))


def _rms(v: list[float], w: list[float], eps: float) -> list[float]:
    r = math.sqrt(sum(a * a for a in v) / len(v) + eps)
    return [a / r * b for a, b in zip(v, w, strict=True)]


def _matvec(w: torch.Tensor, v: list[float]) -> list[float]:
    return [sum(a * b for a, b in zip(row, v, strict=True)) for row in w.tolist()]


def _rotate(v: list[float], position: int, theta: float) -> list[float]:
    out = []
    d = len(v)
    for j in range(d // 2):
        z = complex(v[2 * j], v[2 * j + 1]) * cmath.exp(1j * position * theta ** (-2 * j / d))
        out += [z.real, z.imag]
    return out


def naive_mla(mla: MLA, cfg, x_TD: torch.Tensor, alpha_q: float, alpha_kv: float) -> torch.Tensor:
    """Per-token, per-head MLA written from the equations with plain Python floats."""
    nh, dn, dr, dv = (
        cfg.num_attention_heads,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
    )
    eps = cfg.latent_norm_eps
    rows = x_TD.tolist()
    queries, keys, values = [], [], []
    for t, x in enumerate(rows):
        if cfg.q_lora_rank:
            cq = _rms(_matvec(mla.q_a_proj.weight, x), mla.q_a_layernorm.weight.tolist(), eps)
            q = _matvec(mla.q_b_proj.weight, cq)
        else:
            q = _matvec(mla.q_proj.weight, x)
        q = [alpha_q * a for a in q]
        ckv_kr = _matvec(mla.kv_a_proj_with_mqa.weight, x)
        ckv = _rms(ckv_kr[: cfg.kv_lora_rank], mla.kv_a_layernorm.weight.tolist(), eps)
        ckv = [alpha_kv * a for a in ckv]
        k_rope = _rotate(ckv_kr[cfg.kv_lora_rank :], t, cfg.rope_theta)
        kv = _matvec(mla.kv_b_proj.weight, ckv)
        q_heads, k_heads, v_heads = [], [], []
        for h in range(nh):
            qh = q[h * (dn + dr) : (h + 1) * (dn + dr)]
            q_heads.append(qh[:dn] + _rotate(qh[dn:], t, cfg.rope_theta))
            kvh = kv[h * (dn + dv) : (h + 1) * (dn + dv)]
            k_heads.append(kvh[:dn] + k_rope)
            v_heads.append(kvh[dn:])
        queries.append(q_heads)
        keys.append(k_heads)
        values.append(v_heads)
    scale = 1 / math.sqrt(dn + dr)
    outputs = []
    for t in range(len(rows)):
        concat = []
        for h in range(nh):
            scores = [
                scale * sum(a * b for a, b in zip(queries[t][h], keys[s][h], strict=True))
                for s in range(t + 1)
            ]
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            total = sum(weights)
            concat += [
                sum(weights[s] / total * values[s][h][i] for s in range(t + 1)) for i in range(dv)
            ]
        outputs.append(_matvec(mla.o_proj.weight, concat))
    return torch.tensor(outputs, dtype=torch.float64)


@pytest.mark.parametrize(
    ("overrides", "scaled_q", "scaled_kv"),
    [
        ({}, True, True),
        ({"mla_scale_q_lora": False}, False, True),
        ({"mla_scale_kv_lora": False}, True, False),
        ({"q_lora_rank": 0}, False, True),
    ],
)
def test_full_mla_matches_naive_per_head(overrides, scaled_q, scaled_kv) -> None:
    cfg = TINY.replace(rope_theta=50.0, **overrides)
    mla = _mla(cfg, seed=7)
    seq = 6
    x = torch.randn(1, seq, cfg.hidden_size, generator=_gen(8), dtype=torch.float64)
    cos, sin = _rope(cfg, seq)
    got = mla(x, cos, sin)[0]
    alpha_q = math.sqrt(cfg.hidden_size / cfg.q_lora_rank) if scaled_q else 1.0
    alpha_kv = math.sqrt(cfg.hidden_size / cfg.kv_lora_rank) if scaled_kv else 1.0
    want = naive_mla(mla, cfg, x[0], alpha_q, alpha_kv)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # negative control: the reference notices a wrong scale
    wrong = naive_mla(mla, cfg, x[0], alpha_q, alpha_kv * 1.1)
    assert (got - wrong).abs().max() > 1e-4


def test_scale_factors_of_released_config() -> None:
    """alpha_q = sqrt(6144/1536) = 2, alpha_kv = sqrt(6144/512); shapes per spec §9."""
    cfg = get_preset("longcat-flash")
    with torch.device("meta"):
        mla = MLA(cfg)
    assert mla.q_scale == 2.0
    assert mla.kv_scale == pytest.approx(3.4641016, rel=1e-7)
    assert mla.softmax_scale == pytest.approx(1 / math.sqrt(192))
    assert mla.kv_a_proj_with_mqa.weight.shape == (512 + 64, 6144)
    assert mla.q_b_proj.weight.shape == (64 * 192, 1536)
    assert mla.kv_b_proj.weight.shape == (64 * 256, 512)
    assert mla.o_proj.weight.shape == (6144, 64 * 128)
    assert mla.q_a_layernorm.eps == mla.kv_a_layernorm.eps == 1e-6


def test_mla_is_causal() -> None:
    cfg = TINY
    mla = _mla(cfg, seed=9, dtype=torch.float32)
    x = torch.randn(2, 8, cfg.hidden_size, generator=_gen(10))
    cos, sin = _rope(cfg, 8)
    base = mla(x, cos, sin)
    x2 = x.clone()
    x2[:, 5] += 1.0
    moved = mla(x2, cos, sin)
    torch.testing.assert_close(moved[:, :5], base[:, :5], rtol=0, atol=0)
    assert (moved[:, 5:] - base[:, 5:]).abs().amax(dim=-1).min() > 1e-4


@pytest.mark.parametrize("chunks", [[9], [1] * 9, [4, 1, 3, 1]])
def test_absorbed_cached_mla_matches_full_form(chunks: list[int]) -> None:
    """float32; tolerance rtol 1e-5 with atol 1e-5 of the output's largest magnitude."""
    cfg = TINY.replace(rope_theta=1e4)
    mla = _mla(cfg, seed=11, dtype=torch.float32)
    mla.block_idx = 1
    seq = sum(chunks)
    x = torch.randn(2, seq, cfg.hidden_size, generator=_gen(12))
    cos, sin = _rope(cfg, seq)
    full = mla(x, cos, sin)
    cache = LatentKVCache(cfg, batch_size=2, capacity=seq, num_blocks=2)
    parts, start = [], 0
    for n in chunks:
        sl = slice(start, start + n)
        parts.append(mla(x[:, sl], cos[sl], sin[sl], cache))
        cache.advance(n)
        start += n
    cached = torch.cat(parts, dim=1)
    scale = full.abs().max().item()
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5 * scale)
    assert cache.data_NBSC.shape == (2, 2, seq, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    assert torch.count_nonzero(cache.data_NBSC[0]) == 0  # only this block's slot is written


def test_cache_holds_scaled_latent_and_rotated_rope_key() -> None:
    cfg = TINY
    mla = _mla(cfg, seed=13, dtype=torch.float64)
    x = torch.randn(1, 5, cfg.hidden_size, generator=_gen(14), dtype=torch.float64)
    cos, sin = _rope(cfg, 5)
    cache = LatentKVCache(cfg, batch_size=1, capacity=5, num_blocks=1, dtype=torch.float64)
    mla(x, cos, sin, cache)
    _, _, latent, k_rope = mla.project(x, cos, sin)
    stored = cache.data_NBSC[0, 0]
    torch.testing.assert_close(stored[:, : cfg.kv_lora_rank], latent[0], rtol=0, atol=0)
    torch.testing.assert_close(stored[:, cfg.kv_lora_rank :], k_rope[0], rtol=0, atol=0)
    raw = x[0] @ mla.kv_a_proj_with_mqa.weight.T
    for t in range(5):
        rotated = _rotate(raw[t, cfg.kv_lora_rank :].tolist(), t, cfg.rope_theta)
        want = torch.tensor(rotated, dtype=torch.float64)
        torch.testing.assert_close(stored[t, cfg.kv_lora_rank :], want, rtol=1e-9, atol=1e-9)
        normed = _rms(raw[t, : cfg.kv_lora_rank].tolist(), mla.kv_a_layernorm.weight.tolist(), 1e-6)
        want = torch.tensor(normed, dtype=torch.float64) * math.sqrt(64 / 16)
        torch.testing.assert_close(stored[t, : cfg.kv_lora_rank], want, rtol=1e-9, atol=1e-9)


def test_cache_grows_by_doubling() -> None:
    cfg = TINY
    cache = LatentKVCache(cfg, batch_size=1, capacity=1, num_blocks=1)
    capacities = []
    for t in range(100):
        cache.reserve(1)
        cache.write(0, torch.full((1, 1, cfg.kv_lora_rank), float(t)), torch.zeros(1, 1, 8))
        cache.advance(1)
        capacities.append(cache.capacity)
    assert sorted(set(capacities)) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert cache.data_NBSC[0, 0, :100, 0].tolist() == [float(t) for t in range(100)]
    assert cache.stored_values() == 100 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)


def test_cache_rejects_overflow_and_wrong_batch() -> None:
    cache = LatentKVCache(TINY, batch_size=2, capacity=2, num_blocks=1)
    with pytest.raises(ValueError, match="reserve"):
        cache.write(0, torch.zeros(2, 3, 16), torch.zeros(2, 3, 8))
    with pytest.raises(ValueError, match="batch"):
        cache.write(0, torch.zeros(1, 1, 16), torch.zeros(1, 1, 8))
