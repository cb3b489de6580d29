"""SHA-256 fingerprints of tensors and model parameters, stable across processes and machines.

A tensor's digest covers its name, dtype, shape and raw bytes (C order, little-endian as stored
on CPU), so two tensors hash equal only when they are bitwise equal and described alike.
Collections are hashed in sorted-name order, so the registration order of modules does not
matter.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch
from torch import nn


def _update(digest: hashlib._Hash, name: str, tensor: torch.Tensor) -> None:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    header = f"{name}|{str(flat.dtype).removeprefix('torch.')}|{tuple(tensor.shape)}|"
    digest.update(len(header).to_bytes(8, "little"))
    digest.update(header.encode())
    raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    digest.update(len(raw).to_bytes(8, "little"))
    digest.update(raw)


def update_digest(digest: hashlib._Hash, name: str, tensor: torch.Tensor) -> None:
    """Feed one named tensor (dtype, shape, bytes) into a running SHA-256."""
    _update(digest, name, tensor)


def tensor_hash(tensor: torch.Tensor, name: str = "") -> str:
    """Hex SHA-256 of one tensor's dtype, shape and bytes (and ``name``)."""
    digest = hashlib.sha256()
    _update(digest, name, tensor)
    return digest.hexdigest()


def hash_named_tensors(
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
) -> str:
    """Hex SHA-256 over ``(name, tensor)`` pairs taken in sorted-name order."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    pairs = sorted(items, key=lambda item: item[0])
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError("tensor names must be unique to hash a collection")
    digest = hashlib.sha256()
    for name, tensor in pairs:
        _update(digest, name, tensor)
    return digest.hexdigest()


def parameter_hash(module: nn.Module, *, include_buffers: bool = False) -> str:
    """Hex SHA-256 over every parameter of ``module`` (shared ones once), in sorted-name order.

    With ``include_buffers`` the persistent buffers (e.g. router biases) are hashed too.
    """
    named = dict(module.named_parameters())
    if include_buffers:
        persistent = module.state_dict(keep_vars=True)
        named.update((name, buf) for name, buf in module.named_buffers() if name in persistent)
    return hash_named_tensors(named)
