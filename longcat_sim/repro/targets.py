"""Where a bit flip lands in a model no one annotated: default targets for each site."""

from __future__ import annotations

from torch import nn

from longcat_sim.errors import UserError

MODEL_SITES = ("weight", "activation", "gradient", "optimizer_state")


def default_target(model: nn.Module, site: str) -> str:
    """The parameter (weight, gradient, optimizer_state: the first matrix) or module
    (activation: the first leaf module) a fault at ``site`` hits when it names none."""
    if site not in MODEL_SITES:
        raise UserError(f"site {site!r} cannot be placed in a model; choose from {MODEL_SITES}")
    if site == "activation":
        for name, module in model.named_modules():
            if name and not any(True for _ in module.children()):
                return name
        raise UserError("the model has no submodule to flip an activation in")
    params = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    if not params:
        raise UserError("the model has no floating-point parameter to flip a bit in")
    matrices = [n for n, p in params if p.dim() >= 2]
    return matrices[0] if matrices else params[0][0]


MOMENTS = ("exp_avg", "exp_avg_sq")


def check_target(model: nn.Module, site: str, target: str) -> None:
    """One line naming the problem when ``target`` is not in the model for ``site``
    (``optimizer_state`` also takes ``NAME:exp_avg`` or ``NAME:exp_avg_sq``)."""
    if site == "activation":
        if target not in dict(model.named_modules()):
            raise UserError(f"module {target!r} is not in the model; name one of its submodules")
        return
    name, colon, moment = target.partition(":")
    if site != "optimizer_state" and colon:
        name = target
    elif colon and moment not in MOMENTS:
        raise UserError(
            f"optimizer moment {moment!r} of {target!r} is unknown; use exp_avg or exp_avg_sq"
        )
    if name not in dict(model.named_parameters()):
        raise UserError(f"parameter {name!r} is not in the model; name one of its parameters")
