"""Fingerprints that prove frozen parameters did not move.

A fingerprint is the sum of a tensor's raw bits, read as 64-bit integer words
and added modulo 2**64. Integer addition is exact and order-free, so changing
any single element (even by one unit in the last place, or to a NaN with a
different payload) changes its word by a nonzero amount below 2**64, and so
changes the sum: no false negatives for the failure that matters, with one
read of the tensor and no copy kept.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .errors import FrozenParameterChanged
from .selectors import unwrap

__all__ = ["Guard", "fingerprint"]

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)  # DTensor under FSDP2: check this rank's shard
    return to_local() if callable(to_local) else t


def fingerprint(t: torch.Tensor) -> torch.Tensor:
    """A 0-d int64 tensor on ``t``'s device that changes if any element of ``t`` does."""
    t = _local(t.detach())
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    flat = t.reshape(-1)
    if flat.element_size() < 8 and flat.numel() * flat.element_size() % 8 == 0:
        # Summing whole 64-bit words is ~10x faster than widening each 32-bit
        # element to int64 first; a misaligned storage offset refuses the view.
        with contextlib.suppress(RuntimeError):
            return flat.view(torch.int64).sum()
    bits = flat.view(_INT_OF_SIZE[flat.element_size()]) if flat.is_floating_point() else flat
    return bits.sum(dtype=torch.int64)


class Guard:
    """Remembers fingerprints of a model's frozen parameters and verifies them.

    The set of frozen parameters is read from ``requires_grad`` at every call,
    so parameters frozen by hand are picked up (and fingerprinted) too.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._prints: dict[int, tuple[str, nn.Parameter, torch.Tensor]] = {}
        self.refresh()

    def _frozen(self) -> list[tuple[str, nn.Parameter]]:
        # named_parameters() yields each shared tensor once, under its first
        # (canonical) name, without the cost of building a ModelIndex per step.
        return [
            (n, p) for n, p in unwrap(self.model).named_parameters() if not p.requires_grad and not p.is_meta
        ]

    def refresh(self) -> None:
        """Take new fingerprints of every frozen parameter (accepting any change)."""
        self._prints = {id(p): (n, p, fingerprint(p)) for n, p in self._frozen()}

    def track(self) -> None:
        """Follow a freeze change without accepting any value change.

        Newly frozen parameters are fingerprinted, unfrozen ones forgotten,
        and parameters that stayed frozen keep their old fingerprints, so a
        change made to them before this call is still reported by the next
        :meth:`check`.
        """
        self._prints = {
            id(p): self._prints[id(p)] if id(p) in self._prints else (n, p, fingerprint(p))
            for n, p in self._frozen()
        }

    def check(self) -> None:
        """Raise :class:`FrozenParameterChanged` if a frozen parameter changed.

        Parameters frozen since the last call are fingerprinted, not checked;
        parameters unfrozen since are forgotten.
        """
        current = self._frozen()
        known = [(n, p) for n, p in current if id(p) in self._prints]
        changed: list[str] = []
        by_device: dict[torch.device, list[tuple[str, nn.Parameter]]] = {}
        for n, p in known:
            by_device.setdefault(p.device, []).append((n, p))
        for items in by_device.values():
            now = torch.stack([fingerprint(p) for _, p in items])
            then = torch.stack([self._prints[id(p)][2] for _, p in items])
            diff = now != then
            if bool(diff.any()):
                changed.extend(items[i][0] for i in diff.nonzero().flatten().tolist())
        self._prints = {
            id(p): (n, p, self._prints[id(p)][2] if id(p) in self._prints else fingerprint(p))
            for n, p in current
        }
        if changed:
            for n, p in current:
                if n in changed:
                    self._prints[id(p)] = (n, p, fingerprint(p))
            shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
            raise FrozenParameterChanged(
                f"frozen parameters changed value: {shown}. Likely causes: an optimizer stepping a "
                "parameter whose .grad was set by hand; an in-place edit (.data, copy_, "
                "load_state_dict) of a frozen weight; a frozen tensor sharing storage with a "
                "trainable one. If the change was intended, call Freezer.refresh() to accept it.",
                changed,
            )
