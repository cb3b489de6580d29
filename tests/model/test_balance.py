"""Expert-bias controller (Eq. 2), device-level balance loss (Eqs. 3-5), hidden z-loss (Eq. 10)
and router metrics (Eq. 9), on synthetic router outputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from longcat_sim.model.balance import (
    BiasController,
    BiasRateSchedule,
    all_reduce_counts,
    device_balance_loss,
    expert_bias_delta,
    expert_groups,
    find_routers,
    gradient_norm_ratio,
    gradient_wrt_mean_probs,
    hidden_z_loss,
    router_stats,
    router_weight_similarity,
    slot_share_error,
    total_balance_loss,
)
from longcat_sim.model.config import ConfigError, ModelConfig
from longcat_sim.model.router import RouterOutput, TopkRouter


def routing_config(n: int = 16, z: int = 8, k: int = 4, k_e: float = 2.0) -> ModelConfig:
    return ModelConfig(n_routed_experts=n, zero_expert_num=z, moe_topk=k, target_ffn_experts=k_e)


def make_output(topk_idx_TK: torch.Tensor, scores_TE: torch.Tensor) -> RouterOutput:
    counts = torch.bincount(topk_idx_TK.reshape(-1), minlength=scores_TE.shape[-1])
    gates = scores_TE.gather(1, topk_idx_TK)
    return RouterOutput(topk_idx_TK, gates, scores_TE, counts)


def random_output(cfg: ModelConfig, n_tokens: int, gen: torch.Generator) -> RouterOutput:
    n_total = cfg.num_experts_total
    logits = torch.randn(n_tokens, n_total, generator=gen, dtype=torch.float64)
    scores = logits.softmax(-1).requires_grad_(True)
    choice = torch.rand(n_tokens, n_total, generator=gen).argsort(dim=-1)[:, : cfg.moe_topk]
    return make_output(choice, scores)


class BiasOnly(nn.Module):
    """A stand-in router: just the bias buffer the controller edits."""

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("e_score_correction_bias", bias.clone())


# -- Eq. 2 ---------------------------------------------------------------------------------------


def test_bias_delta_matches_hand_computed_example() -> None:
    # N=4, Z=2, K=2, K_e=1.5; 5 tokens fill 10 slots. Target share K_e/(K·N) = 0.1875.
    cfg = routing_config(n=4, z=2, k=2, k_e=1.5)
    counts = torch.tensor([4, 3, 1, 0, 1, 1])
    delta = expert_bias_delta(counts, cfg, rate=0.1)
    expected = torch.tensor([-0.02125, -0.01125, 0.00875, 0.01875, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(delta, expected, rtol=0, atol=1e-15)


def test_fixed_point_gives_zero_update_and_a_moved_slot_does_not() -> None:
    # N=4, Z=4, K=4, K_e=2, 8 tokens = 32 slots: each FFN expert's share is 2/16 = 4 slots.
    cfg = routing_config(n=4, z=4, k=4, k_e=2.0)
    balanced = torch.tensor([4, 4, 4, 4, 10, 2, 4, 0])
    assert torch.equal(
        expert_bias_delta(balanced, cfg, rate=0.5), torch.zeros(8, dtype=torch.float64)
    )
    moved = torch.tensor([5, 3, 4, 4, 10, 2, 4, 0])
    delta = expert_bias_delta(moved, cfg, rate=0.5)
    assert delta[0] < 0 < delta[1] and delta[2] == delta[3] == 0


@given(
    counts=st.lists(st.integers(0, 50), min_size=12, max_size=12).filter(lambda c: sum(c) > 0),
    steps=st.integers(1, 5),
    gains=st.tuples(st.floats(0, 2), st.floats(0, 2)),
)
def test_zero_expert_biases_never_move(
    counts: list[int], steps: int, gains: tuple[float, float]
) -> None:
    cfg = routing_config(n=8, z=4, k=3, k_e=2.0)
    start = torch.linspace(-1, 1, 12)
    router = BiasOnly(start)
    controller = BiasController(cfg, 0.7, integral_gain=gains[0], derivative_gain=gains[1])
    for step in range(steps):
        controller.update([router], torch.tensor([counts]), step)
    bias = router.e_score_correction_bias
    assert torch.equal(bias[8:], start[8:])
    error = slot_share_error(torch.tensor(counts), cfg)
    assert torch.equal(error[8:], torch.zeros(4, dtype=torch.float64))
    if error[:8].abs().max() > 1e-9:  # control: the FFN biases do move
        assert not torch.equal(bias[:8], start[:8])


def closed_loop(rate: float | BiasRateSchedule, steps: int) -> tuple[float, float, list[float]]:
    """Route a fixed pool of tokens repeatedly, updating the bias after every step.

    Returns the average FFN experts per token over the last 20 steps, the per-token std at the
    end, and the history of the average.
    """
    cfg = routing_config(n=16, z=8, k=4, k_e=2.0)
    gen = torch.Generator().manual_seed(1)
    scores_TE = (2.0 * torch.randn(1024, 24, generator=gen)).softmax(-1)
    router = BiasOnly(torch.zeros(24))
    controller = BiasController(cfg, rate)
    history, per_token = [], torch.zeros(0)
    for step in range(steps):
        idx_TK = torch.topk(scores_TE + router.e_score_correction_bias, 4, dim=-1).indices
        per_token = (idx_TK < 16).sum(-1).double()
        history.append(per_token.mean().item())
        controller.update([router], [torch.bincount(idx_TK.reshape(-1), minlength=24)], step)
    return sum(history[-20:]) / 20, per_token.std().item(), history


def test_closed_loop_reaches_target_experts_per_token() -> None:
    mean, spread, history = closed_loop(0.3, 100)
    assert abs(history[0] - 2.0) > 0.5  # starts far away: 4·16/24 ≈ 2.67
    assert abs(mean - 2.0) / 2.0 < 0.02
    assert spread > 0.5  # allocation still differs across tokens


def test_closed_loop_with_decaying_rate_also_converges() -> None:
    schedule = BiasRateSchedule(0.5, kind="cosine", final=0.05, total_steps=100)
    mean, spread, _ = closed_loop(schedule, 100)
    assert abs(mean - 2.0) / 2.0 < 0.02 and spread > 0.5


def test_closed_loop_without_updates_stays_off_target() -> None:
    mean, _, _ = closed_loop(0.0, 30)
    assert abs(mean - 2.0) / 2.0 > 0.2


def test_controller_edits_real_router_buffers_in_order() -> None:
    cfg = routing_config(n=8, z=4, k=3, k_e=2.0).replace(hidden_size=16)
    model = nn.Sequential(TopkRouter(cfg), nn.Linear(2, 2), TopkRouter(cfg))
    routers = find_routers(model)
    assert routers == [model[0], model[2]]
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    counts = [r(x).counts_E for r in routers]
    counts[1] = torch.tensor([96, 0, 0, 0, 0, 0, 0, 0, 32, 32, 16, 16])
    delta = BiasController(cfg, 0.1).update(routers, counts, step=0)
    assert torch.equal(routers[1].e_score_correction_bias, delta[1].float())
    assert routers[1].e_score_correction_bias[0] < 0 < routers[1].e_score_correction_bias[1]


def test_integral_term_accumulates_and_state_round_trips() -> None:
    cfg = routing_config(n=4, z=2, k=2, k_e=1.5)
    counts = torch.tensor([[4, 3, 1, 0, 1, 1]])
    p_only = BiasController(cfg, 1.0).deltas(counts, 0)
    pid = BiasController(cfg, 1.0, integral_gain=0.5, derivative_gain=2.0)
    first = pid.deltas(counts, 0)
    torch.testing.assert_close(first, 1.5 * p_only)  # e + 0.5·e + 2·(e − e)
    resumed = BiasController(cfg, 1.0, integral_gain=0.5, derivative_gain=2.0)
    resumed.load_state_dict(pid.state_dict())
    torch.testing.assert_close(pid.deltas(counts, 1), 2.0 * p_only)  # e + 0.5·2e + 0
    torch.testing.assert_close(resumed.deltas(counts, 1), 2.0 * p_only)


def test_rate_schedules() -> None:
    cosine = BiasRateSchedule(1.0, kind="cosine", final=0.2, total_steps=100)
    assert cosine.rate_at(0) == 1.0 and cosine.rate_at(100) == cosine.rate_at(500) == 0.2
    assert math.isclose(cosine.rate_at(50), 0.6)
    exponential = BiasRateSchedule(1.0, kind="exponential", decay=0.9, final=0.1)
    assert math.isclose(exponential.rate_at(3), 0.729) and exponential.rate_at(1000) == 0.1
    assert BiasRateSchedule(0.3).rate_at(10**6) == 0.3
    with pytest.raises(ConfigError, match="total_steps"):
        BiasRateSchedule(1.0, kind="cosine")
    with pytest.raises(ConfigError, match="linear"):
        BiasRateSchedule(1.0, kind="linear")  # type: ignore[arg-type]


def test_counts_pass_through_without_a_process_group() -> None:
    counts = torch.tensor([[1, 2, 3]])
    assert all_reduce_counts(counts) is counts


def _all_reduce_worker(rank: int, init_file: str, results: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        cfg = routing_config(n=4, z=2, k=2, k_e=1.5)
        local = [torch.tensor([[4, 0, 1, 0, 0, 0]]), torch.tensor([[0, 3, 0, 0, 1, 1]])][rank]
        router = BiasOnly(torch.zeros(6))
        BiasController(cfg, 0.1, process_group=dist.group.WORLD).update([router], local, 0)
        torch.save(router.e_score_correction_bias, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_apply_the_update_of_the_global_batch(tmp_path) -> None:
    import torch.multiprocessing as mp

    results = str(tmp_path / "bias")
    mp.spawn(_all_reduce_worker, args=(str(tmp_path / "init"), results), nprocs=2)
    expected = torch.tensor([-0.02125, -0.01125, 0.00875, 0.01875, 0.0, 0.0])  # the global batch
    for rank in range(2):
        torch.testing.assert_close(torch.load(f"{results}.{rank}"), expected)


# -- Eqs. 3-5 ------------------------------------------------------------------------------------


def balance_loss_oracle(out: RouterOutput, cfg: ModelConfig, n_groups: int, alpha: float) -> float:
    """Eqs. 3-5 by loops over tokens, choices and experts."""
    n, z, k, k_e = cfg.n_routed_experts, cfg.zero_expert_num, cfg.moe_topk, cfg.target_ffn_experts
    size = n // n_groups
    n_tokens = out.scores_TE.shape[0]
    scores = out.scores_TE.tolist()
    loss = 0.0
    for j in range(n_groups + 1):
        members = range(n, n + z) if j == n_groups else range(j * size, (j + 1) * size)
        p_j = sum(scores[t][i] for t in range(n_tokens) for i in members) / n_tokens
        hits = sum(int(e) in members for t in range(n_tokens) for e in out.topk_idx_TK[t].tolist())
        f_j = hits / ((k - k_e) * n_tokens) if j == n_groups else n_groups * hits / (k_e * n_tokens)
        loss += f_j * p_j
    return alpha * loss


@given(
    seed=st.integers(0, 2**31),
    n_tokens=st.integers(1, 24),
    groups=st.sampled_from([1, 2, 4, 8]),
    k=st.integers(2, 5),
    alpha=st.floats(0.001, 10),
)
def test_balance_loss_matches_per_token_oracle(
    seed: int, n_tokens: int, groups: int, k: int, alpha: float
) -> None:
    cfg = routing_config(n=8, z=4, k=k, k_e=1.5)
    out = random_output(cfg, n_tokens, torch.Generator().manual_seed(seed))
    loss = device_balance_loss(out, cfg, groups, alpha)
    assert math.isclose(loss.item(), balance_loss_oracle(out, cfg, groups, alpha), rel_tol=1e-12)


def test_balance_loss_gradient_is_the_group_frequency() -> None:
    cfg = routing_config(n=8, z=4, k=3, k_e=2.0)
    out = random_output(cfg, 10, torch.Generator().manual_seed(3))
    loss = device_balance_loss(out, cfg, n_groups=4, alpha=1.0)
    (grad,) = torch.autograd.grad(loss, out.scores_TE)
    groups = expert_groups(cfg, 4)
    slots = torch.bincount(groups[out.topk_idx_TK.reshape(-1)], minlength=5).double()
    f = torch.cat([slots[:4] * 4 / (2.0 * 10), slots[4:] / (1.0 * 10)])
    torch.testing.assert_close(grad, f[groups].expand(10, -1) / 10)


def indicator_output(choices: list[list[int]], n_total: int, k: int) -> RouterOutput:
    """Router whose probabilities equal its choices (1/K on each chosen expert)."""
    idx = torch.tensor(choices)
    scores = torch.zeros(len(choices), n_total, dtype=torch.float64).scatter(1, idx, 1.0 / k)
    return make_output(idx, scores)


def test_balanced_assignment_gives_alpha_and_an_unbalanced_one_more() -> None:
    # N=4 in D=2 groups, Z=2, K=3, K_e=2: each token two FFN experts (one per group) + one zero.
    cfg = routing_config(n=4, z=2, k=3, k_e=2.0)
    balanced = indicator_output([[0, 2, 4], [1, 3, 5]], 6, 3)
    assert math.isclose(device_balance_loss(balanced, cfg, 2, alpha=0.3).item(), 0.3)
    skewed = indicator_output([[0, 1, 4], [0, 1, 5]], 6, 3)
    assert device_balance_loss(skewed, cfg, 2, alpha=0.3).item() > 0.3 + 1e-3


@given(data=st.data(), n_tokens=st.integers(1, 12))
def test_no_assignment_beats_the_balanced_one(data: st.DataObject, n_tokens: int) -> None:
    cfg = routing_config(n=8, z=4, k=3, k_e=2.0)
    choices = [
        data.draw(st.lists(st.integers(0, 11), min_size=3, max_size=3, unique=True))
        for _ in range(n_tokens)
    ]
    loss = device_balance_loss(indicator_output(choices, 12, 3), cfg, 4, alpha=1.0).item()
    assert loss >= 1.0 - 1e-12
    shares = torch.bincount(expert_groups(cfg, 4)[torch.tensor(choices).reshape(-1)], minlength=5)
    if loss <= 1.0 + 1e-12:  # the minimum is reached only at the target shares 1:1:1:1:2
        assert shares[:4].tolist() == [shares[4].item() // 2] * 4


def test_total_balance_loss_sums_layers_and_rejects_bad_groups() -> None:
    cfg = routing_config(n=8, z=4, k=3, k_e=2.0)
    gen = torch.Generator().manual_seed(0)
    outs = [random_output(cfg, 5, gen) for _ in range(3)]
    expected = sum(device_balance_loss(o, cfg, 2, 0.5) for o in outs)
    torch.testing.assert_close(total_balance_loss(outs, cfg, 2, 0.5), expected)
    with pytest.raises(ConfigError, match="divisor"):
        device_balance_loss(outs[0], cfg, 3)


# -- Eq. 10 --------------------------------------------------------------------------------------


def test_hidden_z_loss_closed_form() -> None:
    # Rows of ±c_t: logsumexp(|z_t|) = c_t + log H exactly.
    gen = torch.Generator().manual_seed(0)
    c = torch.rand(2, 5, 1, generator=gen) * 3
    signs = torch.randint(0, 2, (2, 5, 16), generator=gen) * 2 - 1
    z = c * signs
    expected = 1e-3 * ((c.reshape(-1) + math.log(16)) ** 2).mean()
    torch.testing.assert_close(hidden_z_loss(z, 1e-3), expected)
    assert hidden_z_loss(z, 0.0) == 0
    assert hidden_z_loss(-z, 1e-3) == hidden_z_loss(z, 1e-3)


# -- metrics -------------------------------------------------------------------------------------


def test_router_weight_similarity() -> None:
    same = torch.tensor([[1.0, 2.0, 3.0]]).repeat(4, 1) * torch.tensor([[1.0], [2.0], [0.5], [3.0]])
    assert math.isclose(router_weight_similarity(same, 4), 1.0, rel_tol=1e-12)
    assert router_weight_similarity(torch.eye(5), 4) == 0.0
    mixed = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert math.isclose(router_weight_similarity(mixed, 3), (0 + 2 * 2**-0.5) / 3)
    # zero-expert rows are left out
    assert router_weight_similarity(torch.cat([torch.eye(3), torch.ones(2, 3)]), 3) == 0.0


def test_router_stats_on_a_hand_example() -> None:
    # N=4 FFN experts; token 0 picks 2 FFN, token 1 none, token 2 one: mean 1, std sqrt(2/3).
    out = make_output(torch.tensor([[0, 1], [4, 5], [1, 4]]), torch.full((3, 6), 1 / 6))
    (stats,) = router_stats([out], n_ffn=4)
    assert stats.ffn_experts_mean == 1.0
    assert math.isclose(stats.ffn_experts_std, math.sqrt(2 / 3))
    assert stats.zero_slot_share == 0.5
    assert math.isclose(stats.max_load_ratio, 2 / 0.75)  # expert 1: 2 slots; mean 3/4


def test_gradient_wrt_mean_probs_is_exact_for_functions_of_p() -> None:
    cfg = routing_config(n=8, z=4, k=3, k_e=2.0)
    out = random_output(cfg, 7, torch.Generator().manual_seed(5))
    weights = torch.arange(12, dtype=torch.float64)
    p = out.scores_TE.mean(0)
    loss = (weights * p.square()).sum()
    (grad,) = gradient_wrt_mean_probs(loss, [out])
    torch.testing.assert_close(grad, 2 * weights * p.detach())


def test_gradient_norm_ratio_from_the_two_gradients() -> None:
    cfg = routing_config(n=8, z=4, k=3, k_e=2.0)
    gen = torch.Generator().manual_seed(6)
    outs = [random_output(cfg, 9, gen) for _ in range(2)]
    lm = sum((o.topk_gate_TK.log()).sum() for o in outs)
    lb = total_balance_loss(outs, cfg, n_groups=2)
    ratios = gradient_norm_ratio(lm, lb, outs, alpha=0.01)
    for out, ratio in zip(outs, ratios, strict=True):
        g_lm = torch.autograd.grad(lm, out.scores_TE, retain_graph=True)[0].sum(0)
        g_lb = torch.autograd.grad(lb, out.scores_TE, retain_graph=True)[0].sum(0)
        assert math.isclose(ratio, 0.01 * g_lb.norm().item() / g_lm.norm().item(), rel_tol=1e-9)
    assert gradient_norm_ratio(lm, lb, outs, alpha=0.02)[0] == pytest.approx(2 * ratios[0])
