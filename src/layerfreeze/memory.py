"""How much memory a model's training state takes, split by freeze state.

Counts parameters, gradients and optimizer state in bytes, each tensor's
storage once (tied weights and views are not counted twice), and the features
held by layerfreeze caches inside the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields

import torch
from torch import nn

from .selectors import unwrap

__all__ = ["MemoryReport", "memory_report"]


@dataclass(frozen=True)
class MemoryReport:
    """Bytes of training state, trainable vs frozen.

    Attributes:
        params_trainable, params_frozen: parameter storage.
        grads_trainable, grads_frozen: ``.grad`` storage (frozen should be 0).
        optimizer_trainable, optimizer_frozen: optimizer state tensors of
            trainable/frozen parameters (``release_state=True`` makes the
            frozen part 0).
        cache_memory, cache_disk: features held by ``lf.cache`` modules inside
            the model, in memory and on disk.
    """

    params_trainable: int
    params_frozen: int
    grads_trainable: int
    grads_frozen: int
    optimizer_trainable: int
    optimizer_frozen: int
    cache_memory: int
    cache_disk: int

    @property
    def trainable(self) -> int:
        """Bytes for trainable parameters: values, gradients, optimizer state."""
        return self.params_trainable + self.grads_trainable + self.optimizer_trainable

    @property
    def frozen(self) -> int:
        """Bytes for frozen parameters: values, gradients, optimizer state."""
        return self.params_frozen + self.grads_frozen + self.optimizer_frozen

    @property
    def total(self) -> int:
        """Everything in memory: parameters, gradients, optimizer state, cached features."""
        return self.trainable + self.frozen + self.cache_memory

    def as_dict(self) -> dict[str, int]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(trainable=self.trainable, frozen=self.frozen, total=self.total)
        return out

    def __str__(self) -> str:
        def mib(n: int) -> str:
            return f"{n / 2**20:,.1f} MiB"

        rows = [
            ("parameters", self.params_trainable, self.params_frozen),
            ("gradients", self.grads_trainable, self.grads_frozen),
            ("optimizer state", self.optimizer_trainable, self.optimizer_frozen),
        ]
        lines = [f"{'':16} {'trainable':>12} {'frozen':>12}"]
        lines += [f"{name:16} {mib(t):>12} {mib(f):>12}" for name, t, f in rows]
        lines.append(f"cached features: {mib(self.cache_memory)} in memory, {mib(self.cache_disk)} on disk")
        lines.append(f"total in memory: {mib(self.total)}")
        return "\n".join(lines)


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    s = t.untyped_storage()
    return (str(t.device), s.data_ptr())


def _bytes(tensors: Iterable[torch.Tensor], seen: set[tuple[str, int]]) -> int:
    total = 0
    for t in tensors:
        if t.is_meta:
            continue
        key = _storage_key(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def memory_report(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> MemoryReport:
    """Bytes of parameters, gradients and optimizer state, trainable vs frozen.

    Args:
        model: the model (wrappers are looked through).
        optimizer: its optimizer; state of parameters outside ``model`` is
            counted by their own ``requires_grad``.

    Returns:
        A :class:`MemoryReport`; ``str()`` of it is a small table.

    Example:
        >>> import torch, torch.nn as nn, layerfreeze as lf
        >>> net = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 1))
        >>> _ = lf.freeze(net, "[0]")
        >>> r = lf.memory_report(net)
        >>> r.params_frozen, r.params_trainable
        (440, 44)
    """
    from .feature_cache import is_cached

    root = unwrap(model)
    params = list(dict.fromkeys(root.parameters()))
    if optimizer is not None:
        held = {id(p) for p in params}
        params += [p for g in optimizer.param_groups for p in g["params"] if id(p) not in held]
    train = [p for p in params if p.requires_grad]
    frozen = [p for p in params if not p.requires_grad]
    seen: set[tuple[str, int]] = set()
    counts = {
        "params_trainable": _bytes(train, seen),
        "params_frozen": _bytes(frozen, seen),
        "grads_trainable": _bytes((p.grad for p in train if p.grad is not None), seen),
        "grads_frozen": _bytes((p.grad for p in frozen if p.grad is not None), seen),
        "optimizer_trainable": 0,
        "optimizer_frozen": 0,
    }
    if optimizer is not None:
        for p, state in optimizer.state.items():
            tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
            key = "optimizer_trainable" if p.requires_grad else "optimizer_frozen"
            counts[key] += _bytes(tensors, seen)
    mem = disk = 0
    for m in root.modules():
        if is_cached(m):
            s = m.stats()  # type: ignore[operator]
            mem += s.bytes_held
            disk += s.bytes_on_disk
    return MemoryReport(**counts, cache_memory=mem, cache_disk=disk)
