"""RMSNorm, interleaved RoPE and the SwiGLU MLP against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longcat_sim.model.layers import DenseMLP, RMSNorm, RotaryEmbedding, apply_rope_interleaved


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- RMSNorm ---------------------------------------------------------------------------------


def test_rmsnorm_matches_closed_form() -> None:
    g = _gen(0)
    x = torch.randn(3, 5, 24, generator=g, dtype=torch.float64) * 3.0
    norm = RMSNorm(24, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(24, generator=g, dtype=torch.float64) + 0.5)
    expected = torch.empty_like(x)
    for idx in range(x.shape[0] * x.shape[1]):
        row = x.view(-1, 24)[idx]
        rms = math.sqrt(sum(v * v for v in row.tolist()) / 24 + 1e-5)
        expected.view(-1, 24)[idx] = row / rms * norm.weight
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=40)
@given(scale=st.floats(1e-2, 1e3), seed=st.integers(0, 2**16))
def test_rmsnorm_output_rms_closed_form(scale: float, seed: int) -> None:
    """With unit weight, rms(y)^2 = ms(x) / (ms(x) + eps) for every row."""
    x = torch.randn(4, 16, generator=_gen(seed), dtype=torch.float64) * scale
    eps = 1e-5
    y = RMSNorm(16, eps).double()(x)
    ms = x.pow(2).mean(-1)
    torch.testing.assert_close(y.pow(2).mean(-1), ms / (ms + eps), rtol=1e-10, atol=0.0)


# -- RoPE ------------------------------------------------------------------------------------


def _rope_at(x: torch.Tensor, position: int, theta: float) -> torch.Tensor:
    rope = RotaryEmbedding(x.shape[-1], theta)
    cos, sin = rope(torch.tensor([position]))
    return apply_rope_interleaved(x[None], cos, sin)[0]


def test_rotary_frequencies_closed_form() -> None:
    rope = RotaryEmbedding(8, 1e7)
    expected = torch.tensor([1e7 ** (-2 * j / 8) for j in range(4)], dtype=torch.float64)
    torch.testing.assert_close(rope.inv_freq(), expected, rtol=1e-15, atol=0)
    cos, sin = rope(torch.tensor([0, 3]))
    assert cos.shape == sin.shape == (2, 4)
    torch.testing.assert_close(cos[1], torch.cos(3 * expected))
    torch.testing.assert_close(sin[1], torch.sin(3 * expected))


@pytest.mark.parametrize("j", [0, 1, 3])
def test_rope_rotates_adjacent_pairs(j: int) -> None:
    """Unit vectors e_2j and e_2j+1 rotate only inside the pair (2j, 2j+1) by p * theta_j."""
    dim, theta, position = 8, 100.0, 5
    angle = position * theta ** (-2 * j / dim)
    e_even = torch.zeros(dim, dtype=torch.float64)
    e_even[2 * j] = 1.0
    e_odd = torch.zeros(dim, dtype=torch.float64)
    e_odd[2 * j + 1] = 1.0
    want_even = torch.zeros(dim, dtype=torch.float64)
    want_even[2 * j], want_even[2 * j + 1] = math.cos(angle), math.sin(angle)
    want_odd = torch.zeros(dim, dtype=torch.float64)
    want_odd[2 * j], want_odd[2 * j + 1] = -math.sin(angle), math.cos(angle)
    torch.testing.assert_close(_rope_at(e_even, position, theta), want_even, atol=1e-7, rtol=0)
    torch.testing.assert_close(_rope_at(e_odd, position, theta), want_odd, atol=1e-7, rtol=0)


def test_rope_equals_complex_multiplication() -> None:
    dim, theta = 16, 1e4
    x = torch.randn(7, dim, generator=_gen(2), dtype=torch.float64)
    positions = torch.arange(7) * 13
    cos, sin = RotaryEmbedding(dim, theta)(positions)
    got = apply_rope_interleaved(x, cos.double(), sin.double())
    freqs = torch.tensor([theta ** (-2 * j / dim) for j in range(dim // 2)], dtype=torch.float64)
    z = torch.view_as_complex(x.view(7, dim // 2, 2).contiguous())
    want = torch.view_as_real(
        z * torch.polar(torch.ones(1, dtype=torch.float64), positions[:, None] * freqs)
    )
    torch.testing.assert_close(got, want.view(7, dim), atol=1e-6, rtol=1e-6)


def _dot_after_rope(rope_fn, q, k, m: int, n: int, theta: float) -> float:
    rope = RotaryEmbedding(q.shape[-1], theta)
    cos_m, sin_m = rope(torch.tensor([m]))
    cos_n, sin_n = rope(torch.tensor([n]))
    qm = rope_fn(q[None], cos_m.double(), sin_m.double())[0]
    kn = rope_fn(k[None], cos_n.double(), sin_n.double())[0]
    return float(qm @ kn)


def _broken_rope(x, cos, sin):
    """Negative control: rotates the first element of each pair but leaves the second alone."""
    pairs = x.unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x1), dim=-1).flatten(-2)


@settings(max_examples=50)
@given(
    m=st.integers(0, 4000),
    n=st.integers(0, 4000),
    shift=st.integers(-4000, 4000),
    seed=st.integers(0, 2**16),
)
def test_rope_dot_product_depends_only_on_offset(m: int, n: int, shift: int, seed: int) -> None:
    shift = max(shift, -min(m, n))
    g = _gen(seed)
    q = torch.randn(8, generator=g, dtype=torch.float64)
    k = torch.randn(8, generator=g, dtype=torch.float64)
    base = _dot_after_rope(apply_rope_interleaved, q, k, m, n, 1e4)
    moved = _dot_after_rope(apply_rope_interleaved, q, k, m + shift, n + shift, 1e4)
    assert moved == pytest.approx(base, abs=1e-5 * (q.norm() * k.norm()).item())


def test_rope_offset_property_can_fail() -> None:
    """The same check rejects a rotation that is not a proper 2-D rotation of each pair."""
    g = _gen(3)
    q = torch.randn(8, generator=g, dtype=torch.float64)
    k = torch.randn(8, generator=g, dtype=torch.float64)
    base = _dot_after_rope(_broken_rope, q, k, 3, 1, 1e4)
    moved = _dot_after_rope(_broken_rope, q, k, 103, 101, 1e4)
    assert abs(moved - base) > 1e-2


def test_rope_preserves_norm() -> None:
    x = torch.randn(5, 3, 16, generator=_gen(4), dtype=torch.float64)
    cos, sin = RotaryEmbedding(16, 1e7)(torch.arange(5) * 1000)
    y = apply_rope_interleaved(x, cos[:, None].double(), sin[:, None].double())
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-6, atol=0)


def test_rotary_rejects_odd_dimension() -> None:
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(7, 1e4)


# -- SwiGLU ----------------------------------------------------------------------------------


def test_dense_mlp_is_swiglu() -> None:
    mlp = DenseMLP(12, 20).double()
    x = torch.randn(4, 12, generator=_gen(5), dtype=torch.float64)
    gate = x @ mlp.gate_proj.weight.T
    up = x @ mlp.up_proj.weight.T
    expected = (gate * torch.sigmoid(gate) * up) @ mlp.down_proj.weight.T
    torch.testing.assert_close(mlp(x), expected, rtol=1e-12, atol=1e-12)
    assert mlp.gate_proj.bias is None and mlp.up_proj.bias is None and mlp.down_proj.bias is None
