"""Model-growth initialisation (spec §3.4): stack a trained shallow model into a deeper one.

The paper trains a 14-layer model and stacks it r = 2 times: layer order [1..14, 1..14], so
layer i of the grown model (0-based) takes the weights of layer ``i mod L_small``. Everything
outside the layers (embeddings, final norm, LM head, MTP head) is copied once. Each layer's
router bias (a buffer in the state dict) is copied with its layer. Optimizer moments can be
carried over the same way; the step counter and LR schedule continue on the caller's side.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from longcat_sim.model.config import ConfigError, ModelConfig
from longcat_sim.model.transformer import LongcatFlashForCausalLM

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def source_layer(layer_idx: int, small_layers: int) -> int:
    """The shallow-model layer whose weights grown layer ``layer_idx`` starts from."""
    return layer_idx % small_layers


def source_name(name: str, small_layers: int) -> str:
    """The shallow model's parameter/buffer name for grown-model name ``name``."""
    match = _LAYER_KEY.match(name)
    if match is None:
        return name
    return f"model.layers.{source_layer(int(match[1]), small_layers)}.{match[2]}"


def grow_config(cfg: ModelConfig, factor: int = 2) -> ModelConfig:
    """``cfg`` with ``factor`` times as many layers."""
    if factor < 1:
        raise ConfigError(f"growth factor must be >= 1, got {factor}")
    return cfg.replace(num_layers=cfg.num_layers * factor)


def grow_state_dict(
    small_state: dict[str, torch.Tensor], small_layers: int, factor: int = 2
) -> dict[str, torch.Tensor]:
    """State dict of the ``factor * small_layers``-layer model stacked from ``small_state``.

    Tensors are cloned, so the copies of one layer train independently.
    """
    if factor < 1:
        raise ConfigError(f"growth factor must be >= 1, got {factor}")
    found = {int(m[1]) for key in small_state if (m := _LAYER_KEY.match(key))}
    if found != set(range(small_layers)):
        raise ConfigError(
            f"the checkpoint holds layers {sorted(found)}, expected 0..{small_layers - 1}; "
            "pass the number of layers it was saved with"
        )
    grown: dict[str, torch.Tensor] = {}
    for key, tensor in small_state.items():
        match = _LAYER_KEY.match(key)
        if match is None:
            grown[key] = tensor.detach().clone()
            continue
        for copy in range(factor):
            layer = copy * small_layers + int(match[1])
            grown[f"model.layers.{layer}.{match[2]}"] = tensor.detach().clone()
    return grown


def grow_model(small: LongcatFlashForCausalLM, factor: int = 2) -> LongcatFlashForCausalLM:
    """A new model with ``factor`` times the layers of ``small``, stacked in order."""
    cfg = grow_config(small.config, factor)
    grown = LongcatFlashForCausalLM(cfg)
    weight = small.lm_head.weight
    grown.to(device=weight.device, dtype=weight.dtype)
    grown.load_state_dict(grow_state_dict(small.state_dict(), small.config.num_layers, factor))
    return grown


@torch.no_grad()
def grow_optimizer_state(
    small_model: nn.Module,
    small_optimizer: torch.optim.Optimizer,
    grown_model: nn.Module,
    grown_optimizer: torch.optim.Optimizer,
    small_layers: int,
) -> int:
    """Copy each parameter's optimizer state (Adam moments, step) to its grown copies.

    Both optimizers must hold the parameters of their models; returns how many grown
    parameters received a state.
    """
    small_params = dict(small_model.named_parameters())
    copied = 0
    for name, param in grown_model.named_parameters():
        source = small_params.get(source_name(name, small_layers))
        if source is None:
            raise ConfigError(f"grown parameter {name!r} has no counterpart in the small model")
        if source.shape != param.shape:
            raise ConfigError(
                f"{name!r} is {tuple(param.shape)} but its source is {tuple(source.shape)}"
            )
        state = small_optimizer.state.get(source)
        if state:
            grown_optimizer.state[param] = {
                k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                for k, v in state.items()
            }
            copied += 1
    return copied
