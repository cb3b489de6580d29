"""The training loss of one slice: LM + MTP + balance + hidden z-loss, and its named terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longcat_sim.model.balance import hidden_z_loss, total_balance_loss
from longcat_sim.model.config import ModelConfig
from longcat_sim.model.transformer import ModelOutput
from longcat_sim.train.config import TrainConfig

# the record keys of the terms, in the order a step's statistics carry them
LOSS_TERMS = ("loss", "lm_loss", "mtp_loss", "balance_loss", "z_loss")


def slice_loss(
    out: ModelOutput, targets: torch.Tensor, cfg: ModelConfig, tc: TrainConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss of one slice (token means; the balance loss reads the slice's routing) and
    its terms keyed as in :data:`LOSS_TERMS` (absent terms left out)."""
    lm = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten())
    total = lm
    terms = {"lm_loss": lm}
    if out.mtp_logits is not None:
        mtp = F.cross_entropy(
            out.mtp_logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten()
        )
        total = total + tc.mtp_weight * mtp
        terms["mtp_loss"] = mtp
    if tc.balance_alpha > 0:
        balance = total_balance_loss(out.router, cfg, tc.balance_groups, tc.balance_alpha)
        total = total + balance
        terms["balance_loss"] = balance
    if tc.z_loss > 0:
        z = hidden_z_loss(out.hidden_pre_norm, tc.z_loss)
        total = total + z
        terms["z_loss"] = z
    return total, {"loss": total, **terms}
