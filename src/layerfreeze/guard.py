"""Fingerprints that prove frozen parameters did not move.

A fingerprint is the sum of a tensor's raw bits, read as 64-bit integer words
and added modulo 2**64. Integer addition is exact and order-free, so changing
any single element (even by one unit in the last place, or to a NaN with a
different payload) changes its word by a nonzero amount below 2**64, and so
changes the sum: no false negatives for the failure that matters, with one
read of the tensor and no copy kept.

The same argument holds for a sum of fingerprints, which is what
:meth:`Guard.check` compares first: on a GPU, one reduction over all frozen
parameters of a device costs a few kernel launches instead of one per tensor
(a small model's step is bound by launches, not by arithmetic). Only when the
total differs are the tensors summed one by one, to name the ones that
changed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .errors import FrozenParameterChanged
from .selectors import unwrap

__all__ = ["Guard", "fingerprint"]

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Bound on the temporary buffer a batched check concatenates into, in bytes.
_CHUNK_BYTES = 64 << 20


def _batched(device: torch.device) -> bool:
    """Whether to check a device's tensors through one concatenated sum."""
    return device.type != "cpu"


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)  # DTensor under FSDP2: check this rank's shard
    return to_local() if callable(to_local) else t


def _words(t: torch.Tensor) -> torch.Tensor:
    """A flat integer view of ``t``'s bits whose ``sum(dtype=int64)`` is its fingerprint."""
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
            return flat.view(torch.int64)
    return flat.view(_INT_OF_SIZE[flat.element_size()]) if flat.is_floating_point() else flat


def fingerprint(t: torch.Tensor) -> torch.Tensor:
    """A 0-d int64 tensor on ``t``'s device that changes if any element of ``t`` does."""
    return _words(t).sum(dtype=torch.int64)


@dataclass
class _Entry:
    name: str
    param: nn.Parameter
    print: torch.Tensor  # the fingerprint taken when the parameter was frozen
    words: torch.Tensor  # a view of the parameter's storage, kept to skip re-viewing it
    ptr: int  # where that storage starts (``param.data = ...`` moves it); -1: view every time


def _entry(name: str, p: nn.Parameter, prev: torch.Tensor | None = None) -> _Entry:
    words = _words(p)
    # Keep the view only for a plain tensor whose view shares its storage (not a
    # DTensor shard, not a bool parameter, which is converted to read it).
    keep = type(p.detach()) is torch.Tensor and p.dtype != torch.bool
    ptr = p.data_ptr() if keep else -1
    return _Entry(name, p, words.sum(dtype=torch.int64) if prev is None else prev, words, ptr)


class Guard:
    """Remembers fingerprints of a model's frozen parameters and verifies them.

    The set of frozen parameters is read from ``requires_grad`` at every call,
    so parameters frozen by hand are picked up (and fingerprinted) too.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._entries: dict[int, _Entry] = {}
        # per device: (entries in order, the sum of their fingerprints)
        self._totals: dict[torch.device, tuple[list[_Entry], torch.Tensor]] | None = None
        self.refresh()

    def _frozen(self) -> list[tuple[str, nn.Parameter]]:
        # named_parameters() yields each shared tensor once, under its first
        # (canonical) name, without the cost of building a ModelIndex per step.
        return [
            (n, p) for n, p in unwrap(self.model).named_parameters() if not p.requires_grad and not p.is_meta
        ]

    def _set(self, entries: dict[int, _Entry]) -> None:
        self._entries = entries
        self._totals = None

    def refresh(self) -> None:
        """Take new fingerprints of every frozen parameter (accepting any change)."""
        self._set({id(p): _entry(n, p) for n, p in self._frozen()})

    def track(self) -> None:
        """Follow a freeze change without accepting any value change.

        Newly frozen parameters are fingerprinted, unfrozen ones forgotten,
        and parameters that stayed frozen keep their old fingerprints, so a
        change made to them before this call is still reported by the next
        :meth:`check`.
        """
        old = self._entries
        self._set({id(p): old[id(p)] if id(p) in old else _entry(n, p) for n, p in self._frozen()})

    def _grouped(self) -> dict[torch.device, tuple[list[_Entry], torch.Tensor]]:
        if self._totals is None:
            groups: dict[torch.device, list[_Entry]] = {}
            for e in self._entries.values():
                groups.setdefault(e.words.device, []).append(e)
            self._totals = {
                d: (es, torch.stack([e.print for e in es]).sum()) for d, es in groups.items()
            }
        return self._totals

    @staticmethod
    def _total(entries: list[_Entry]) -> torch.Tensor:
        """The sum of the current fingerprints of ``entries``, in few kernels on a GPU."""
        if not _batched(entries[0].words.device):
            # No copy on CPU: one pass per tensor, each already viewed.
            return torch.stack([e.words.sum(dtype=torch.int64) for e in entries]).sum()
        parts: list[torch.Tensor] = []
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for e in entries:
            by_dtype.setdefault(e.words.dtype, []).append(e.words)
        for words in by_dtype.values():
            chunk: list[torch.Tensor] = []
            size = 0
            for w in words:
                chunk.append(w)
                size += w.numel() * w.element_size()
                if size >= _CHUNK_BYTES:
                    parts.append(torch.cat(chunk).sum(dtype=torch.int64))
                    chunk, size = [], 0
            if chunk:
                parts.append(torch.cat(chunk).sum(dtype=torch.int64))
        return torch.stack(parts).sum()

    def check(self) -> None:
        """Raise :class:`FrozenParameterChanged` if a frozen parameter changed.

        Parameters frozen since the last call are fingerprinted, not checked;
        parameters unfrozen since are forgotten.
        """
        current = self._frozen()
        ids = {id(p) for _, p in current}
        if ids != self._entries.keys():
            old = self._entries
            self._set({id(p): old[id(p)] if id(p) in old else _entry(n, p) for n, p in current})
        changed: list[str] = []
        for e in self._entries.values():
            if e.ptr == -1:
                e.words = _words(e.param)
            elif e.param.data_ptr() != e.ptr:  # storage replaced (``param.data = ...``): view it again
                e.words, e.ptr = _words(e.param), e.param.data_ptr()
        for entries, then in self._grouped().values():
            if bool(self._total(entries) != then):
                changed += [e.name for e in entries if bool(e.words.sum(dtype=torch.int64) != e.print)]
        if changed:
            for e in self._entries.values():
                if e.name in changed:
                    self._entries[id(e.param)] = _entry(e.name, e.param)
            self._totals = None
            shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
            raise FrozenParameterChanged(
                f"frozen parameters changed value: {shown}. Likely causes: an optimizer stepping a "
                "parameter whose .grad was set by hand; an in-place edit (.data, copy_, "
                "load_state_dict) of a frozen weight; a frozen tensor sharing storage with a "
                "trainable one. If the change was intended, call Freezer.refresh() to accept it.",
                changed,
            )
