"""Comparing trainer states (checkpoints, resumed trainers) value for value, for the resume and checkpoint tests."""

from __future__ import annotations

import torch


def equal_states(a, b) -> bool:
    """Two (nested) states hold the same values: tensors equal bit for bit and of one dtype, dicts with the same keys,
    sequences of the same length, everything else equal."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal_states(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(
            equal_states(x, y) for x, y in zip(a, b, strict=True))
    return a == b
