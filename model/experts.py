"""Routed SwiGLU experts stored stacked, applied to rows already grouped by expert.

The per-expert kernels below run one GEMM per non-empty expert and write straight into
preallocated outputs: weight gradients land in stacked [N, ...] tensors without a per-expert
stack/copy, and an expert that received no rows costs one zero-fill of its gradient.
``model/moe.py`` runs them inside its own autograd node; ``GroupedExperts.forward`` (rows
already grouped) is ``model/kernels/grouped_gemm.py``'s grouped SwiGLU.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from longcat_sim.model.config import ModelConfig
from longcat_sim.model.kernels.batch_invariant import mm_rows, mm_t_rows, silu_forward, silu_grad
from longcat_sim.model.kernels.grouped_gemm import grouped_swiglu
from longcat_sim.model.probes import GEMMS, GemmHook
from longcat_sim.model.router import default_generator

# gate [N, I, H], up [N, I, H], down [N, H, I]
Weights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class Checksum:
    """One stacked expert weight's ABFT encoding (``model/abft.py``): column sums ``[N, in]``
    and error scales ``[N]``."""

    sums_NX: torch.Tensor
    scales_N: torch.Tensor


def column_checksum(weight_NYX: torch.Tensor) -> Checksum:
    """The encoding of stacked weights ``W [N, out, in]``: per expert the column sums
    ``sum_y W[y, :]`` and the error scale ``sum_y ||W[y]||_2``."""
    return Checksum(weight_NYX.sum(dim=1), torch.linalg.vector_norm(weight_NYX, dim=2).sum(dim=1))


def expert_forward(
    x_rD: torch.Tensor,
    w_gate_DI: torch.Tensor,
    w_up_DI: torch.Tensor,
    w_down_ID: torch.Tensor,
    pre_gate_rI: torch.Tensor,
    pre_up_rI: torch.Tensor,
    y_rD: torch.Tensor | None = None,
    *,
    deterministic: bool = False,
    gemm_hook: GemmHook | None = None,
) -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))`` for one expert's rows, given the *transposed* weights
    (views from ``transposed_experts``). Writes the two pre-activations (kept for backward)
    and returns y (written into ``y_rD`` when given). No autograd. ``deterministic``:
    batch-invariant GEMMs (``batch_invariant.mm_rows``) and SiLU, so a row's result does not
    depend on the expert's other rows. ``gemm_hook(name, output)`` runs after each GEMM
    (``model/probes.py``)."""
    mm = mm_rows if deterministic else _mm
    mm(x_rD, w_gate_DI, out=pre_gate_rI)
    if gemm_hook is not None:
        gemm_hook("gate", pre_gate_rI)
    mm(x_rD, w_up_DI, out=pre_up_rI)
    if gemm_hook is not None:
        gemm_hook("up", pre_up_rI)
    silu = silu_forward(pre_gate_rI) if deterministic else F.silu(pre_gate_rI)
    y_rD = mm(silu.mul_(pre_up_rI), w_down_ID, out=y_rD)
    if gemm_hook is not None:
        gemm_hook("down", y_rD)
    return y_rD


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)


def per_expert(weights: Weights | tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, ...]]:
    """Per-expert views of stacked tensors: one ``unbind`` each, no per-expert indexing."""
    return [w.unbind(0) for w in weights]


def transposed_experts(weights: Weights) -> list[tuple[torch.Tensor, ...]]:
    """Per-expert transposed views (``w[e].t()``) of stacked weights, for the forward GEMMs."""
    return [w.transpose(1, 2).unbind(0) for w in weights]


def expert_backward_from_hidden(
    x_rD: torch.Tensor,
    grad_hidden_rI: torch.Tensor,
    pre_gate_rI: torch.Tensor,
    pre_up_rI: torch.Tensor,
    silu_rI: torch.Tensor,
    w_gate_ID: torch.Tensor,
    w_up_ID: torch.Tensor,
    grad_gate_ID: torch.Tensor,
    grad_up_ID: torch.Tensor,
    grad_x_rD: torch.Tensor | None = None,
    *,
    deterministic: bool = False,
) -> torch.Tensor:
    """Given d loss / d hidden (hidden = silu(pre_gate) * pre_up), write the gate and up weight
    gradients and return d loss / d x (into ``grad_x_rD`` when given). Overwrites
    ``grad_hidden_rI``. ``deterministic``: batch-invariant GEMMs and SiLU derivative, weight
    gradients with a fixed summation order (thread-count invariant)."""
    grad_pre_up_rI = grad_hidden_rI * silu_rI
    if deterministic:
        grad_pre_gate_rI = silu_grad(grad_hidden_rI.mul_(pre_up_rI), pre_gate_rI)
        mm_t_rows(grad_pre_gate_rI, x_rD, out=grad_gate_ID)
        mm_t_rows(grad_pre_up_rI, x_rD, out=grad_up_ID)
        dx = mm_rows(grad_pre_gate_rI, w_gate_ID, out=grad_x_rD)
        return mm_rows(grad_pre_up_rI, w_up_ID, out=dx, accumulate=True)
    grad_pre_gate_rI = torch.ops.aten.silu_backward(grad_hidden_rI.mul_(pre_up_rI), pre_gate_rI)
    torch.mm(grad_pre_gate_rI.t(), x_rD, out=grad_gate_ID)
    torch.mm(grad_pre_up_rI.t(), x_rD, out=grad_up_ID)
    if grad_x_rD is None:
        grad_x_rD = torch.mm(grad_pre_gate_rI, w_gate_ID)
    else:
        torch.mm(grad_pre_gate_rI, w_gate_ID, out=grad_x_rD)
    return grad_x_rD.addmm_(grad_pre_up_rI, w_up_ID)


def new_weight_grads(weights: Weights, counts: list[int]) -> tuple[torch.Tensor, ...]:
    """Gradient buffers for the stacked weights, zeroed only for experts without rows."""
    grads = tuple(torch.empty_like(w) for w in weights)
    unused = [e for e, count in enumerate(counts) if not count]
    if unused:
        unused_rows = torch.tensor(unused)
        for g in grads:
            g.index_fill_(0, unused_rows, 0.0)
    return grads


def used_experts(counts: list[int], *stacked: torch.Tensor | list) -> Iterator[tuple]:
    """(expert, its piece of every ``stacked`` argument) for experts with rows, ascending.

    A tensor argument is split along dim 0 into per-expert row blocks of ``counts``; a list
    argument is indexed by expert (e.g. the ``unbind(0)`` of a stacked weight)."""
    pieces = [s if isinstance(s, list | tuple) else s.split(counts) for s in stacked]
    for e, count in enumerate(counts):
        if count:
            yield e, *(p[e] for p in pieces)


def _encode_after_load(module: GroupedExperts, _incompatible_keys: object) -> None:
    module.encode_checksums()


class GroupedExperts(nn.Module):
    """N SwiGLU experts: ``down(silu(gate(x)) * up(x))`` per expert, one GEMM per non-empty expert.

    Weights are stacked per expert (``gate_proj``/``up_proj`` [N, I, H], ``down_proj`` [N, H, I])
    so the checkpoint code can split them into Hugging Face per-expert keys. The computation runs
    in the activations' dtype.
    """

    def __init__(self, cfg: ModelConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        n, h, i = cfg.n_routed_experts, cfg.hidden_size, cfg.expert_ffn_hidden_size
        self.n_experts = n
        self.kernels = cfg.kernels
        self.initializer_range = cfg.initializer_range
        self.gate_proj = nn.Parameter(torch.empty(n, i, h))
        self.up_proj = nn.Parameter(torch.empty(n, i, h))
        self.down_proj = nn.Parameter(torch.empty(n, h, i))
        self.expert_checksums = cfg.expert_checksums
        if self.expert_checksums:  # derived from the weights: never saved, encoded on load
            for gemm, weight in self._stacked():
                n_experts, _, width = weight.shape
                self.register_buffer(f"{gemm}_sums", torch.empty(n_experts, width), False)
                self.register_buffer(f"{gemm}_scales", torch.empty(n_experts), False)
            self.register_load_state_dict_post_hook(_encode_after_load)
        self.reset_parameters(generator)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        """Module-wide casts and moves (``.to(torch.bfloat16)``, ``.to(device)``) encode the
        checksums again from the weights as they now are."""
        super()._apply(fn, recurse)
        self.encode_checksums()
        return self

    def _stacked(self) -> tuple[tuple[str, torch.Tensor], ...]:
        return tuple(zip(GEMMS, (self.gate_proj, self.up_proj, self.down_proj), strict=True))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        gen = generator if generator is not None else default_generator()
        for weight in (self.gate_proj, self.up_proj, self.down_proj):
            weight.normal_(0.0, self.initializer_range, generator=gen)
        self.encode_checksums()

    @torch.no_grad()
    def encode_checksums(self) -> None:
        """Re-encode each weight's checksum buffers in place from the weight as it is now (a
        no-op without ``expert_checksums``); call it whenever the weights were written."""
        if not self.expert_checksums:
            return
        for gemm, weight in self._stacked():
            code = column_checksum(weight)
            getattr(self, f"{gemm}_sums").copy_(code.sums_NX)
            getattr(self, f"{gemm}_scales").copy_(code.scales_N)

    def checksum(self, gemm: str) -> Checksum:
        """The encoding of ``gemm``'s stacked weight (``"gate"``, ``"up"`` or ``"down"``)."""
        if not self.expert_checksums:
            raise ValueError(
                "these experts carry no checksums: build the model with expert_checksums=True"
            )
        return Checksum(getattr(self, f"{gemm}_sums"), getattr(self, f"{gemm}_scales"))

    def weights(self, dtype: torch.dtype) -> Weights:
        """(gate, up, down) in ``dtype`` (differentiable casts; no copy when already there)."""
        return self.gate_proj.to(dtype), self.up_proj.to(dtype), self.down_proj.to(dtype)

    def forward(self, x_SD: torch.Tensor, counts_N: torch.Tensor | list[int]) -> torch.Tensor:
        """``x_SD``: rows sorted by expert, ``counts_N[e]`` of them for expert e; returns ``y_SD``
        (``kernels.grouped_gemm.grouped_swiglu`` on ``cfg.kernels``)."""
        return grouped_swiglu(x_SD, *self.weights(x_SD.dtype), counts_N, backend=self.kernels)


def encode_checksums(model: nn.Module) -> None:
    """Re-encode the checksums of every :class:`GroupedExperts` in ``model`` that has them."""
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            module.encode_checksums()
