"""Computations the reproducibility tests run in this process and in the 2-thread worker.

Each takes plain values (config dicts, seeds, tensors) and returns tensors, so the same call can
be made in a helper process (``tests/repro/thread_worker.py``) and compared bitwise.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import lru_cache

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from longcat_sim.model.config import ModelConfig, get_preset
from longcat_sim.model.determinism import DeterministicMode
from longcat_sim.model.hashing import tensor_hash
from longcat_sim.model.moe import MoE
from longcat_sim.model.transformer import LongcatFlashForCausalLM


@st.composite
def small_model_dicts(draw: st.DrawFn, *, deterministic: bool = True) -> dict:
    """Tiny LongCat variants (as dicts, to cross process boundaries): widths, heads, experts,
    zero experts, top-k and the MTP head vary."""
    n = draw(st.integers(2, 8))
    z = draw(st.integers(0, 4))
    k = draw(st.integers(1, min(4, n + z)))
    hidden = draw(st.sampled_from([32, 64]))
    return (
        get_preset("tiny")
        .replace(
            name="repro-case",
            vocab_size=draw(st.sampled_from([128, 512])),
            hidden_size=hidden,
            num_layers=draw(st.integers(1, 2)),
            num_attention_heads=draw(st.sampled_from([2, 4])),
            n_routed_experts=n,
            zero_expert_num=z,
            moe_topk=k,
            target_ffn_experts=float(max(0, k - z)),
            mtp_layers=draw(st.integers(0, 1)),
            initializer_range=hidden**-0.5,
            deterministic=deterministic,
        )
        .to_dict()
    )


@lru_cache(maxsize=16)
def _model(cfg_items: tuple, seed: int) -> LongcatFlashForCausalLM:
    cfg = ModelConfig.from_dict(dict(cfg_items))
    return LongcatFlashForCausalLM(cfg, generator=torch.Generator().manual_seed(seed)).eval()


def model_for(cfg: dict, seed: int) -> LongcatFlashForCausalLM:
    return _model(tuple(sorted(cfg.items())), seed)


def _mode(cfg: dict):
    """Deterministic mode (torch flags) for deterministic configs, nothing otherwise."""
    return DeterministicMode() if cfg["deterministic"] else nullcontext()


def logits(cfg: dict, seed: int, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), _mode(cfg):
        return model_for(cfg, seed)(input_ids)


def training_grads(cfg: dict, seed: int, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Next-token loss (plus MTP loss when the model has the head), its gradients, the logits."""
    model = model_for(cfg, seed)
    model.zero_grad(set_to_none=True)
    with _mode(cfg):
        out = model.forward_detailed(input_ids[:, :-1])
        targets = input_ids[:, 1:]
        loss = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())
        if out.mtp_logits is not None and targets.shape[1] > 1:
            mtp = out.mtp_logits[:, :-1].flatten(0, 1)
            loss = loss + F.cross_entropy(mtp, targets[:, 1:].flatten())
        loss.backward()
    grads = {f"grad.{n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return {"loss": loss.detach(), "logits": out.logits.detach(), **grads}


@lru_cache(maxsize=16)
def _moe(cfg_items: tuple, seed: int) -> MoE:
    return MoE(
        ModelConfig.from_dict(dict(cfg_items)), generator=torch.Generator().manual_seed(seed)
    )


def moe_output(
    cfg: dict, seed: int, x_TD: torch.Tensor, upstream_TD: torch.Tensor
) -> dict[str, torch.Tensor]:
    """MoE output, routing and input/weight gradients for the upstream gradient given."""
    moe = _moe(tuple(sorted(cfg.items())), seed)
    moe.zero_grad(set_to_none=True)
    x = x_TD.clone().requires_grad_()
    with _mode(cfg):
        out, routing = moe(x)
        out.backward(upstream_TD)
    result = {"out": out.detach(), "idx": routing.topk_idx_TK, "grad_x": x.grad}
    result.update({f"grad.{n}": p.grad.clone() for n, p in moe.named_parameters()})
    moe.zero_grad(set_to_none=True)
    return result


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (unlike ``torch.equal``, -0.0 differs from 0.0)."""
    return tensor_hash(a) == tensor_hash(b)


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names of the entries that are not bitwise equal, or present on one side only."""
    bad = [k for k in a if k not in b or not bitwise_equal(a[k], b[k])]
    return bad + [k for k in b if k not in a]
