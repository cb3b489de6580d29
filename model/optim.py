"""AdamW with parameter groups, width-transfer of hyper-parameters (spec §3.3) and the LR schedule.

Parameter groups:

- ``embedding``: weights of ``nn.Embedding`` modules (token embeddings, the MTP embedding).
- ``unembedding``: the LM head (``lm_head.weight``), unless tied to the embedding.
- ``hidden``: every other matrix or stacked-matrix weight (attention, dense FFNs, experts,
  router classifier, MTP projection).
- ``vector``: one-dimensional parameters (norm gains, biases): no weight decay.

Width transfer follows the paper's Table 1 ("Adam LR Full Align", standard parameterisation):
with s = n_target / n_proxy, embedding σ² and η stay as on the proxy, hidden and unembedding σ²
and η are divided by s. Table 1 says nothing of vector parameters; they keep the proxy values
(width-independent, as vector-like parameters are treated in the cited scaling rules).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from longcat_sim.model.config import ConfigError

GroupName = Literal["embedding", "hidden", "unembedding", "vector"]
GROUP_NAMES: tuple[GroupName, ...] = ("embedding", "hidden", "unembedding", "vector")
PAPER_ADAM_EPS = 1e-16
_WIDTH_SCALED: frozenset[str] = frozenset({"hidden", "unembedding"})


def group_parameters(model: nn.Module) -> dict[GroupName, list[tuple[str, nn.Parameter]]]:
    """Every trainable parameter (shared ones once) under exactly one group name."""
    embedding_ids = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
    }
    groups: dict[GroupName, list[tuple[str, nn.Parameter]]] = {g: [] for g in GROUP_NAMES}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in embedding_ids:
            group: GroupName = "embedding"
        elif param.dim() < 2:
            group = "vector"
        elif name == "lm_head.weight" or name.endswith(".lm_head.weight"):
            group = "unembedding"
        else:
            group = "hidden"
        groups[group].append((name, param))
    return groups


@dataclass(frozen=True)
class GroupHyperParams:
    """Learning rate and initialisation variance σ² of one parameter group."""

    lr: float
    init_variance: float

    @property
    def init_std(self) -> float:
        return math.sqrt(self.init_variance)


def uniform_hyperparameters(lr: float, init_std: float) -> dict[GroupName, GroupHyperParams]:
    """The same LR and σ = ``init_std`` for every group (a proxy-model starting point)."""
    return {g: GroupHyperParams(lr, init_std**2) for g in GROUP_NAMES}


def transfer_hyperparameters(
    proxy: Mapping[GroupName, GroupHyperParams], proxy_width: int, target_width: int
) -> dict[GroupName, GroupHyperParams]:
    """Table 1: hidden and unembedding σ² and η divided by s = target/proxy width; rest kept."""
    if proxy_width <= 0 or target_width <= 0:
        raise ConfigError(
            f"widths must be positive, got proxy {proxy_width} and target {target_width}"
        )
    missing = [g for g in GROUP_NAMES if g not in proxy]
    if missing:
        raise ConfigError(f"proxy hyper-parameters lack the group(s) {', '.join(missing)}")
    s = target_width / proxy_width
    return {
        g: replace(proxy[g], lr=proxy[g].lr / s, init_variance=proxy[g].init_variance / s)
        if g in _WIDTH_SCALED
        else proxy[g]
        for g in GROUP_NAMES
    }


@torch.no_grad()
def initialize_parameters(
    model: nn.Module,
    hyper: Mapping[GroupName, GroupHyperParams],
    generator: torch.Generator,
) -> None:
    """Redraw embedding, hidden and unembedding weights from N(0, σ²) of their group.

    Vector parameters (norm gains) are left as they are. Draws follow ``named_parameters``
    order, so one generator state gives one model.
    """
    groups = group_parameters(model)
    order = {id(p): g for g, members in groups.items() for _, p in members}
    for _, param in model.named_parameters():
        group = order.get(id(param))
        if group is None or group == "vector":
            continue
        param.normal_(0.0, hyper[group].init_std, generator=generator)


def build_adamw(
    model: nn.Module,
    lr: float | Mapping[GroupName, float],
    *,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = PAPER_ADAM_EPS,
) -> torch.optim.AdamW:
    """AdamW over the four groups (empty ones left out); ``vector`` has no weight decay.

    Each group keeps its name (``"name"``) and its peak learning rate (``"base_lr"``), which
    :func:`set_lr_multiplier` scales. ``eps`` defaults to the paper's 1e-16 (spec §3.2).
    """
    if eps < 0 or weight_decay < 0:
        raise ConfigError(f"eps and weight_decay must be >= 0, got {eps} and {weight_decay}")
    rates = {g: lr for g in GROUP_NAMES} if isinstance(lr, int | float) else dict(lr)
    param_groups = []
    for group, members in group_parameters(model).items():
        if not members:
            continue
        if group not in rates:
            raise ConfigError(f"no learning rate given for parameter group {group!r}")
        param_groups.append(
            {
                "params": [p for _, p in members],
                "name": group,
                "lr": float(rates[group]),
                "base_lr": float(rates[group]),
                "weight_decay": 0.0 if group == "vector" else weight_decay,
            }
        )
    return torch.optim.AdamW(param_groups, betas=betas, eps=eps, foreach=False)


def lr_multiplier(
    step: int, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.1
) -> float:
    """Linear warmup to 1 over ``warmup_steps``, then cosine decay to ``min_ratio`` at
    ``total_steps`` and ``min_ratio`` after. Step 0 gets 1/warmup_steps (never exactly 0)."""
    if step < 0 or warmup_steps < 0 or total_steps <= 0 or warmup_steps > total_steps:
        raise ConfigError(
            f"need step >= 0 and 0 <= warmup_steps <= total_steps, total_steps > 0; got step "
            f"{step}, warmup {warmup_steps}, total {total_steps}"
        )
    if not 0.0 <= min_ratio <= 1.0:
        raise ConfigError(f"min_ratio must lie in [0, 1], got {min_ratio}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= total_steps:
        return min_ratio
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr_multiplier(optimizer: torch.optim.Optimizer, multiplier: float) -> None:
    """Set every group's learning rate to its ``base_lr`` times ``multiplier``."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * multiplier
