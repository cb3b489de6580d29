"""One training step of one MoE layer, written stage by stage so faults and checks can sit
between the stages. It is the unit the SDC campaign corrupts, checks and replays.

Stages (LongCat-Flash's MoE, spec §1.3): router logits -> softmax -> stable top-k over FFN and
zero experts -> tokens-per-expert counts -> dispatch (FFN slots sorted by expert; expert ``e``
owns rows ``[start_e, end_e)`` computed from the counts, as a grouped GEMM's offsets are) ->
expert GEMMs (fused gate and up; SwiGLU; down) -> combine (each token's K slots summed in slot
order in float32, zero experts contributing ``gate * x``) -> loss ``<out, grad_out>`` ->
backward -> AdamW.

Expert weights are stored checksum-encoded, as ABFT keeps them: each expert's weight
``[out, in]`` carries ``CHECK_ROWS`` more rows, the sum of its rows and zeros (so the GEMM's
output width stays a multiple of 8), and every expert GEMM produces each output row's reference
checksum in column ``out`` and zeros in the padding columns after it, at the cost of 8 more
output columns. The optimizer updates the weights, re-encodes the checksum rows (and each
expert's error scale, the sum of its row norms) and resets the padding rows to zero; the
gradient and both moments of the checksum and padding rows are kept at zero. So weights are
covered while at rest, padding rows included: a corrupted checksum row breaks the row
checksum, a corrupted padding row makes its output column nonzero.

The step reads a :class:`StepState` and never modifies it: a copy is the snapshot a replay
starts from. Everything runs on fixed shapes with deterministic kernels, so two executions of
the same state are bitwise equal; :meth:`StepResult.digest` hashes every compared value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from longcat_sim.model.config import ModelConfig
from longcat_sim.model.hashing import hash_named_tensors
from longcat_sim.repro.inject import StepInjector

PARAMS = ("router", "gate_up", "down")
EXPERT_WEIGHTS = ("gate_up", "down")  # gate and up projections fused into one GEMM


class StepCrash(RuntimeError):
    """The step could not run (e.g. a corrupted expert id points outside the expert table)."""


@dataclass(frozen=True)
class MoEStepConfig:
    """Shapes and optimizer settings of the step (the MoE of ``model``)."""

    model: ModelConfig
    tokens: int = 128
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1


CHECK_ROWS = 8  # rows appended to each expert weight: the checksum row, then zeros


def encode_checksums(w_NYX: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ABFT encoding of stacked expert weights ``[N, out, in]``: the weights with the checksum
    row (the sum of the rows) and ``CHECK_ROWS - 1`` zero rows appended,
    ``[N, out + CHECK_ROWS, in]``, and each expert's sum of output-row L2 norms (``[N]``, the
    scale of its rounding errors)."""
    w = w_NYX.detach()
    pad = w.new_zeros(w.shape[0], CHECK_ROWS - 1, w.shape[2])
    encoded = torch.cat((w, w.sum(dim=1, keepdim=True), pad), dim=1)
    return encoded, torch.linalg.vector_norm(w, dim=2).sum(dim=1)


def plain_weight(encoded_NYX: torch.Tensor) -> torch.Tensor:
    """The weights of an encoded tensor (a view without the checksum rows)."""
    return encoded_NYX[:, :-CHECK_ROWS]


def reencode_(encoded_NYX: torch.Tensor) -> torch.Tensor:
    """Recompute the checksum rows of encoded weights in place (after an update) and reset the
    padding rows to zero; returns the experts' error scales."""
    w = plain_weight(encoded_NYX)
    encoded_NYX[:, -CHECK_ROWS] = w.sum(dim=1)
    encoded_NYX[:, -CHECK_ROWS + 1 :] = 0.0
    return torch.linalg.vector_norm(w, dim=2).sum(dim=1)


def clear_check_rows_(t_NYX: torch.Tensor) -> torch.Tensor:
    """Zero the checksum and padding rows of a gradient or moment of encoded weights (in
    place): the optimizer never moves them, re-encoding sets them."""
    t_NYX[:, -CHECK_ROWS:] = 0.0
    return t_NYX


@dataclass
class StepState:
    """Everything a step reads: parameters (expert weights checksum-encoded), router bias,
    AdamW moments, the experts' ABFT error scales, the data."""

    params: dict[str, torch.Tensor]
    bias: torch.Tensor
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor]
    step: int
    x_TD: torch.Tensor
    grad_out_TD: torch.Tensor

    def clone(self) -> StepState:
        def c(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.clone() for k, v in d.items()}

        return StepState(
            c(self.params),
            self.bias.clone(),
            c(self.exp_avg),
            c(self.exp_avg_sq),
            c(self.scales),
            self.step,
            self.x_TD.clone(),
            self.grad_out_TD.clone(),
        )


def initial_state(sc: MoEStepConfig, seed: int, *, outlier: float = 0.0) -> StepState:
    """A random state drawn from ``seed``: weights ~ N(0, 1/fan_in), inputs ~ N(0, 1).

    ``outlier > 0`` scales the first token by that factor: a genuine, data-driven loss spike.
    """
    cfg = sc.model
    gen = torch.Generator().manual_seed(seed)
    h, n, i, e = (
        cfg.hidden_size,
        cfg.n_routed_experts,
        cfg.expert_ffn_hidden_size,
        cfg.num_experts_total,
    )

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    plain = {
        "router": normal(e, h, std=h**-0.5),
        "gate": normal(n, i, h, std=h**-0.5),
        "up": normal(n, i, h, std=h**-0.5),
        "down": normal(n, h, i, std=i**-0.5),
    }
    params, scales = {"router": plain["router"]}, {}
    plain["gate_up"] = torch.cat((plain.pop("gate"), plain.pop("up")), dim=1)
    for name in EXPERT_WEIGHTS:
        params[name], scales[name] = encode_checksums(plain[name])
    x_TD = normal(sc.tokens, h, std=1.0)
    if outlier:
        x_TD[0] *= outlier
    return StepState(
        params=params,
        bias=torch.zeros(e),
        exp_avg={k: torch.zeros_like(v) for k, v in params.items()},
        exp_avg_sq={k: torch.zeros_like(v) for k, v in params.items()},
        scales=scales,
        step=0,
        x_TD=x_TD,
        grad_out_TD=normal(sc.tokens, h, std=(sc.tokens * h) ** -0.5),
    )


@dataclass
class StepResult:
    """The values a step produces (all compared bitwise) and the state it leaves."""

    tensors: dict[str, torch.Tensor]
    loss: float
    next_state: StepState
    _digest: str | None = field(default=None, repr=False)

    def digest(self) -> str:
        if self._digest is None:
            self._digest = hash_named_tensors(self.tensors)
        return self._digest


@dataclass(frozen=True)
class ExpertRows:
    """Expert e owns dispatch rows ``[starts[e], ends[e])``; ``expert_of_row`` (-1: none)."""

    starts: list[int]
    ends: list[int]
    expert_of_row: torch.Tensor
    uncovered: bool = False  # some row belongs to no expert (only under corrupted counts)


@dataclass(frozen=True)
class ExpertGemms:
    """GEMMs ``names`` (outputs ``C = A W^T``) that all read ``a_SX``: ``references`` are the
    checksum columns their encoded weights produced, ``paddings`` the padding columns (exactly
    zero unless a padding row is corrupted), ``scales`` the experts' error scales, ``a_norms_S``
    the rows' L2 norms if the caller has them."""

    names: tuple[str, ...]
    a_SX: torch.Tensor
    outputs: tuple[torch.Tensor, ...]
    references: tuple[torch.Tensor, ...]
    rows: ExpertRows
    scales: tuple[torch.Tensor, ...]
    a_norms_S: torch.Tensor | None = None
    paddings: tuple[torch.Tensor, ...] | None = None


@dataclass(frozen=True)
class ExpertFfn:
    """The expert FFN of step ``step``: its input rows, weights, stage outputs (``gate_up``,
    ``hidden``, ``down``, ...) and the rows of each expert."""

    x_SD: torch.Tensor
    weights: dict[str, torch.Tensor]
    stages: dict[str, torch.Tensor]
    rows: ExpertRows
    step: int


@dataclass(frozen=True)
class CombineOutputs:
    """The combine's output, gates and per-slot expert outputs; ``dispatch`` is
    ``(slot_S, x_TD)``: where each dispatched row's output went, and the tokens."""

    out_TD: torch.Tensor
    gate_TK: torch.Tensor
    y_TKD: torch.Tensor
    dispatch: tuple[torch.Tensor, torch.Tensor] | None = None


class StepMonitor(Protocol):
    """A check riding along a step (ABFT, in-place recompute)."""

    def on_expert_gemm(self, gemms: ExpertGemms) -> None:
        """Expert GEMMs that share their input (:class:`ExpertGemms`)."""

    def on_expert_ffn(self, ffn: ExpertFfn) -> None:
        """The expert FFN of a step (:class:`ExpertFfn`)."""

    def on_combine(self, combine: CombineOutputs) -> None:
        """The combine (:class:`CombineOutputs`)."""


def stable_topk(values_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values per row; exact ties go to the lower index."""
    return torch.sort(values_TE, dim=-1, descending=True, stable=True).indices[:, :k]


def expert_rows(counts_N: torch.Tensor, rows: int) -> ExpertRows:
    """Row ranges from per-expert counts (prefix sums clamped to the rows that exist)."""
    ends_t = counts_N.cumsum(0).clamp(0, rows)
    starts_t = torch.cat((ends_t.new_zeros(1), ends_t[:-1]))
    starts, ends = starts_t.tolist(), ends_t.tolist()
    owner = torch.full((rows,), -1, dtype=torch.int64)
    for e, (s, t) in enumerate(zip(starts, ends, strict=True)):
        if t > s:
            owner[s:t] = e
    return ExpertRows(starts, ends, owner, bool((owner < 0).any()))


class _EncodedGroupedGemm(torch.autograd.Function):
    """``c[r] = a[r] @ w[e]^T`` for the rows r of each expert e (one GEMM per expert) with
    encoded weights ``[N, out + CHECK_ROWS, in]``: column ``out`` is the checksum reference,
    the columns after it the padding rows' outputs. Rows of no expert stay zero. Backward uses
    the weights without their checksum rows (whose gradient is zero)."""

    @staticmethod
    def forward(ctx, a_SX, w_NYX, rows):  # type: ignore[override]
        c_SY = a_SX.new_empty(a_SX.shape[0], w_NYX.shape[1])
        if rows.uncovered:
            c_SY.zero_()
        for e, (s, t) in enumerate(zip(rows.starts, rows.ends, strict=True)):
            if t > s:
                torch.mm(a_SX[s:t], w_NYX[e].t(), out=c_SY[s:t])
        ctx.rows = rows
        ctx.save_for_backward(a_SX, w_NYX)
        return c_SY

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_SY):  # type: ignore[override]
        a_SX, w_NYX = ctx.saved_tensors
        grad = grad_SY[:, :-CHECK_ROWS].contiguous()
        grad_a = torch.zeros_like(a_SX)
        grad_w = torch.zeros_like(w_NYX)
        for e, (s, t) in enumerate(zip(ctx.rows.starts, ctx.rows.ends, strict=True)):
            if t > s:
                torch.mm(grad[s:t], w_NYX[e, :-CHECK_ROWS], out=grad_a[s:t])
                torch.mm(grad[s:t].t(), a_SX[s:t], out=grad_w[e, :-CHECK_ROWS])
        return grad_a, grad_w, None


def grouped_gemm(
    a_SX: torch.Tensor, encoded_NYX: torch.Tensor, rows: ExpertRows
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(C, reference checksums, padding columns) of the expert GEMMs with encoded weights:
    ``C = A W^T`` (differentiable; a view), ``A s_e`` per row and the ``CHECK_ROWS - 1``
    padding columns, zero while the padding rows are (both detached views)."""
    c_ext = _EncodedGroupedGemm.apply(a_SX, encoded_NYX, rows)
    checks = c_ext[:, -CHECK_ROWS:].detach()
    return c_ext[:, :-CHECK_ROWS], checks[:, 0], checks[:, 1:]


def swiglu_ffn(
    x_SD: torch.Tensor,
    weights: dict[str, torch.Tensor],
    rows: ExpertRows,
    injector: StepInjector | None = None,
    monitors: tuple[StepMonitor, ...] = (),
    scales: dict[str, torch.Tensor] | None = None,
    x_norms_S: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The expert FFN stages over dispatched rows: gate_up (the fused gate and up GEMM), gate,
    up, hidden, down (``weights`` checksum-encoded). ``x_norms_S``: the rows' L2 norms when
    known (monitors need them)."""
    stages: dict[str, torch.Tensor] = {}
    refs: dict[str, torch.Tensor] = {}
    pads: dict[str, torch.Tensor] = {}
    gate_up, refs["gate_up"], pads["gate_up"] = grouped_gemm(x_SD, weights["gate_up"], rows)
    if injector is not None:
        gate_up = injector.at("expert_gemm", gate_up, target="gate_up")
    inter = gate_up.shape[1] // 2
    stages["gate_up"] = gate_up
    stages["gate"], stages["up"] = gate_up[:, :inter], gate_up[:, inter:]
    hidden = F.silu(stages["gate"]) * stages["up"]
    if injector is not None:
        hidden = injector.at("activation", hidden)
    stages["hidden"] = hidden
    # the down check's row norms, taken while the hidden rows are still in cache
    h_norms_S = torch.linalg.vector_norm(hidden.detach(), dim=1) if monitors else None
    y, refs["down"], pads["down"] = grouped_gemm(hidden, weights["down"], rows)
    if injector is not None:
        y = injector.at("expert_gemm", y, target="down")
    # the checks run after the three GEMMs, which thus keep their operands in cache
    gemms = (("gate_up", x_SD, gate_up, x_norms_S), ("down", hidden, y, h_norms_S))
    for m in monitors:
        for name, a_SX, c_SY, a_norms_S in gemms:
            m.on_expert_gemm(
                ExpertGemms(
                    (name,),
                    a_SX.detach(),
                    (c_SY.detach(),),
                    (refs[name],),
                    rows,
                    (scales[name],),
                    a_norms_S=a_norms_S,
                    paddings=(pads[name],),
                )
            )
    stages["down"] = y
    return stages


def _route(
    x_TD: torch.Tensor,
    params: dict[str, torch.Tensor],
    bias: torch.Tensor,
    cfg: ModelConfig,
    injector: StepInjector | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-k expert ids, gates, per-expert slot counts) of every token."""
    n, k, e_total = cfg.n_routed_experts, cfg.moe_topk, cfg.num_experts_total
    logits_TE = x_TD @ params["router"].t()
    scores_TE = logits_TE.softmax(dim=-1)
    idx_TK = stable_topk(scores_TE.detach() + bias, k)
    if injector is not None:
        idx_TK = injector.at("routing_indices", idx_TK)
    if int(idx_TK.min()) < 0 or int(idx_TK.max()) >= e_total:
        raise StepCrash("routing index outside the expert table")
    gate_TK = scores_TE.gather(1, idx_TK) * cfg.routed_scaling_factor
    if not cfg.scale_zero_expert_gates:
        gate_TK = torch.where(idx_TK >= n, gate_TK / cfg.routed_scaling_factor, gate_TK)
    counts_E = torch.bincount(idx_TK.reshape(-1), minlength=e_total)
    if injector is not None:
        counts_E = injector.at("routing_counts", counts_E)
    return idx_TK, gate_TK, counts_E


def _combine(
    x_TD: torch.Tensor,
    idx_TK: torch.Tensor,
    gate_TK: torch.Tensor,
    slot_S: torch.Tensor,
    down_SD: torch.Tensor,
    n_routed: int,
    injector: StepInjector | None,
    monitors: tuple[StepMonitor, ...],
) -> torch.Tensor:
    """Slot layout, zero experts as the identity; the K slots summed in slot order."""
    tokens, k = idx_TK.shape
    y_slots = x_TD.new_zeros(tokens * k, x_TD.shape[1])
    y_slots = y_slots.index_copy(0, slot_S, down_SD)
    is_zero_S = (idx_TK.reshape(-1) >= n_routed).unsqueeze(-1)
    token_of_slot = torch.arange(tokens * k) // k
    y_TKD = torch.where(is_zero_S, x_TD.index_select(0, token_of_slot), y_slots).view(tokens, k, -1)
    out_TD = gate_TK[:, 0:1] * y_TKD[:, 0]
    for slot in range(1, k):
        out_TD = out_TD + gate_TK[:, slot : slot + 1] * y_TKD[:, slot]
    if injector is not None:
        out_TD = injector.at("combine", out_TD)
    for m in monitors:
        m.on_combine(
            CombineOutputs(out_TD.detach(), gate_TK.detach(), y_TKD.detach(), (slot_S, x_TD))
        )
    return out_TD


def _adamw(
    work: StepState,
    params: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    sc: MoEStepConfig,
    injector: StepInjector | None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """(new parameters, first moments, second moments, step) after one AdamW update."""
    step = work.step + 1
    b1, b2 = sc.betas
    new_params, new_m, new_v = {}, {}, {}
    with torch.no_grad():
        for name in PARAMS:
            g, p = grads[name], params[name].detach()
            if name in EXPERT_WEIGHTS:
                clear_check_rows_(g)
            m = work.exp_avg[name] * b1 + g * (1 - b1)
            v = work.exp_avg_sq[name] * b2 + g * g * (1 - b2)
            if name in EXPERT_WEIGHTS:  # a corrupted moment of a check row dies here
                clear_check_rows_(m)
                clear_check_rows_(v)
            update = (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + sc.eps)
            new_params[name] = p * (1 - sc.lr * sc.weight_decay) - sc.lr * update
            new_m[name], new_v[name] = m, v
    if injector is not None:
        for name in PARAMS:
            injector.at_("optimizer_state", new_m[name], target=f"{name}:exp_avg")
            injector.at_("optimizer_state", new_v[name], target=f"{name}:exp_avg_sq")
    return new_params, new_m, new_v, step


def moe_step(
    state: StepState,
    sc: MoEStepConfig,
    *,
    injector: StepInjector | None = None,
    monitors: tuple[StepMonitor, ...] = (),
) -> StepResult:
    """Run one step from ``state`` (left untouched); faults from ``injector``, checks from
    ``monitors``. Raises :class:`StepCrash` where a real kernel would fault."""
    cfg = sc.model
    n, k = cfg.n_routed_experts, cfg.moe_topk
    work = state.clone()
    if injector is not None:
        for name in PARAMS:
            injector.at_("weight", work.params[name], target=name)
    params = {name: p.requires_grad_() for name, p in work.params.items()}
    x_TD = work.x_TD
    idx_TK, gate_TK, counts_E = _route(x_TD, params, work.bias, cfg, injector)

    # dispatch: FFN slots sorted by expert, stable (token order inside an expert)
    flat_S = idx_TK.reshape(-1)
    ffn_slots = torch.nonzero(flat_S < n).squeeze(1)
    slot_S = ffn_slots[torch.argsort(flat_S[ffn_slots], stable=True)]
    token_S = torch.div(slot_S, k, rounding_mode="floor")
    rows = expert_rows(counts_E[:n], slot_S.shape[0])
    x_SD = x_TD.index_select(0, token_S)
    weights = {name: params[name] for name in EXPERT_WEIGHTS}
    # the dispatched rows are copies of tokens: their norms are the tokens' norms
    x_norms_S = torch.linalg.vector_norm(x_TD, dim=1)[token_S] if monitors else None
    stages = swiglu_ffn(x_SD, weights, rows, injector, monitors, work.scales, x_norms_S)
    for m in monitors:
        m.on_expert_ffn(ExpertFfn(x_SD.detach(), weights, stages, rows, work.step))
    out_TD = _combine(x_TD, idx_TK, gate_TK, slot_S, stages["down"], n, injector, monitors)

    # loss and backward
    loss = (out_TD.double() * work.grad_out_TD.double()).sum()
    out_TD.backward(work.grad_out_TD)
    grads = {name: p.grad for name, p in params.items()}
    if injector is not None:
        for name in PARAMS:
            injector.at_("gradient", grads[name], target=name)
    new_params, new_m, new_v, step = _adamw(work, params, grads, sc, injector)
    with torch.no_grad():
        scales = {name: reencode_(new_params[name]) for name in EXPERT_WEIGHTS}

    tensors: dict[str, torch.Tensor] = {
        "routing.idx": idx_TK,
        "routing.counts": counts_E,
        "out": out_TD.detach(),
        "loss": loss.detach(),
    }
    for name in PARAMS:
        tensors[f"grad.{name}"] = grads[name]
        tensors[f"param.{name}"] = new_params[name]
        tensors[f"exp_avg.{name}"] = new_m[name]
        tensors[f"exp_avg_sq.{name}"] = new_v[name]
    next_state = dataclasses.replace(
        work, params=new_params, exp_avg=new_m, exp_avg_sq=new_v, scales=scales, step=step
    )
    return StepResult(tensors, float(loss.detach()), next_state)
