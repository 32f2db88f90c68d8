"""Fingerprints that prove frozen parameters did not move, checked on the device.

A fingerprint is a pair of 64-bit integers computed from a tensor's raw bits,
read as integer words ``w_0 .. w_{n-1}`` in the order they lie in memory:

* ``S0 = sum(w_p)`` (mod 2**64): changing any single element, even by one unit
  in the last place or to a NaN with another payload, changes its word by a
  nonzero amount below 2**64, so ``S0`` changes: no false negative for a
  single change;
* ``S1 = sum(p * w_p)`` (mod 2**64): a position-weighted sum, so swapping two
  different words ``p`` and ``q`` changes ``S1`` by ``(p - q) * (w_q - w_p)``,
  which is nonzero unless that product happens to be a multiple of 2**64.
  ``w.copy_(w.flip(0))``, swapped rows and shuffles are seen.

``S1`` is computed exactly without an index tensor of the tensor's size: the
words are viewed as a few strips (a ``[C, R]`` matrix, no copy); the strip
sums and the column sums (one pass each) give
``S1 = R * sum(c * strip_c) + S1(columns)``, and the column vector is ``C``
times shorter, so the recursion costs a few percent more. Both integer sums are
exact, so the fingerprint does not depend on thread count or reduction order.

The words are a view of the parameter's real storage, never a copy: a
``channels_last`` convolution or a transposed parameter is read in its memory
order (such a tensor is dense, its elements fill one stretch of memory), so an
edit of the weight is seen. Only a parameter with gaps or overlaps in its
storage is copied, afresh at each check.

:class:`Guard` keeps the fingerprints and the comparison on the parameters'
device: :meth:`Guard.observe` records, in a device tensor, the first step at
which a frozen value differed, without asking the device anything;
:meth:`Guard.verdict` reads that record (the only host round trip) and raises.
On a GPU, :class:`~layerfreeze.Freezer` reads it every ``read_every`` checks,
at each freeze change, epoch and checkpoint, and whenever an earlier copy of it
has already reached the host without waiting; on a CPU there is no round trip
and every check is read at once.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import FrozenParameterChanged
from .selectors import unwrap

__all__ = ["Guard", "GuardListener", "fingerprint"]

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Bound on the temporary buffer a batched check concatenates into, in bytes.
_CHUNK_BYTES = 64 << 20
# Vectors up to this many words are weighted with an index vector directly.
_SMALL = 4096
# Strips of the [C, R] view in the recursion.
_STRIPS = 8
# Checks between two forced reads of the verdict on an accelerator.
READ_EVERY = 50


def _batched(device: torch.device) -> bool:
    """Whether to check a device's tensors through concatenated chunks."""
    return device.type != "cpu"


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)  # DTensor under FSDP2: check this rank's shard
    return to_local() if callable(to_local) else t


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill one gap-free stretch of its storage."""
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(t.shape, t.stride(), strict=True) if s != 1),
                               key=lambda pair: pair[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _memory(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A flat view of ``t``'s elements in memory order, and whether it shares storage."""
    if t.is_contiguous():
        return t.reshape(-1), True
    if _dense(t):
        return t.as_strided((t.numel(),), (1,), t.storage_offset()), True
    return t.contiguous().reshape(-1), False


def _words(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A flat integer view of ``t``'s bits, and whether it is a view of ``t``'s storage."""
    t = _local(t.detach())
    if t.is_complex():
        t = torch.view_as_real(t)
    shared = True
    if t.dtype == torch.bool:
        t, shared = t.to(torch.uint8), False
    flat, dense = _memory(t)
    shared = shared and dense
    if flat.element_size() < 8 and flat.numel() * flat.element_size() % 8 == 0:
        # Summing whole 64-bit words is ~10x faster than widening each 32-bit
        # element to int64 first; a misaligned storage offset refuses the view.
        with contextlib.suppress(RuntimeError):
            return flat.view(torch.int64), shared
    return flat.view(_INT_OF_SIZE[flat.element_size()]), shared


@functools.lru_cache(maxsize=16)
def _index(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64, device=device)


def _moments(w: torch.Tensor) -> torch.Tensor:
    """``[sum(w_p), sum(p * w_p)]`` mod 2**64 of a flat integer tensor, on its device."""
    n = w.numel()
    if n <= _SMALL:
        wide = w.to(torch.int64)
        return torch.stack([wide.sum(), (wide * _index(n, w.device)[:n]).sum()]) if n else wide.new_zeros(2)
    rows = n // _STRIPS
    head = w[: rows * _STRIPS].view(_STRIPS, rows)
    strips = head.sum(1, dtype=torch.int64)
    sub = _moments(head.sum(0, dtype=torch.int64))
    s1 = sub[1] + rows * (strips * _index(_STRIPS, w.device)).sum()
    tail = w[rows * _STRIPS :]
    if tail.numel():
        t = _moments(tail)
        return torch.stack([sub[0] + t[0], s1 + t[1] + rows * _STRIPS * t[0]])
    return torch.stack([sub[0], s1])


def fingerprint(t: torch.Tensor) -> torch.Tensor:
    """A fingerprint of ``t``'s content: an int64 tensor of two values on ``t``'s device.

    It changes if any element of ``t`` changes, and if two different elements
    swap places (see the module docstring for the exact guarantee).

    Args:
        t: any tensor (non-contiguous, ``channels_last``, a DTensor's local
            shard, any dtype).

    Returns:
        ``tensor([S0, S1])``, dtype int64.

    Example:
        >>> import torch
        >>> w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> torch.equal(fingerprint(w), fingerprint(w.flip(0)))
        False
        >>> torch.equal(fingerprint(w.t()), fingerprint(w.t().contiguous()))  # read in memory order
        False
    """
    return _moments(_words(t)[0])


@dataclass
class _Entry:
    name: str
    param: nn.Parameter
    print: torch.Tensor  # the fingerprint taken when the parameter was frozen
    words: torch.Tensor  # a view of the parameter's storage, kept to skip re-viewing it
    ptr: int  # where that storage starts (``param.data = ...`` moves it); -1: view every time

    def current(self) -> torch.Tensor:
        if self.ptr == -1:
            return _words(self.param)[0]
        if self.param.data_ptr() != self.ptr:  # storage replaced (``param.data = ...``): view it again
            self.words, shared = _words(self.param)
            self.ptr = self.param.data_ptr() if shared else -1
        return self.words


def _entry(name: str, p: nn.Parameter, prev: torch.Tensor | None = None) -> _Entry:
    words, shared = _words(p)
    # Keep the view only when it is the parameter's own storage (not a copy of
    # a gappy tensor, not a DTensor shard, not a bool parameter's conversion).
    keep = shared and type(p.detach()) is torch.Tensor
    ptr = p.data_ptr() if keep else -1
    return _Entry(name, p, _moments(words) if prev is None else prev, words, ptr)


@dataclass
class _Device:
    """One device's frozen parameters, their reference total, and the record of a change."""

    entries: list[_Entry]
    offsets: list[int]  # each entry's first position in the device's word sequence
    then: torch.Tensor  # the reference fingerprint of that sequence
    first: torch.Tensor | int  # the step of the first check that saw a difference, -1: none
    pending: Any = None  # (pinned host copy of ``first``, CUDA event) of the last check
    base: torch.Tensor | None = None  # start positions of _total's parts, cached

    def reset(self) -> None:
        # on a CPU the record is a plain int: there is no device to keep it on
        self.first = -1 if self.then.device.type == "cpu" else torch.full((), -1, dtype=torch.int64,
                                                                             device=self.then.device)
        self.pending = None


class Guard:
    """Remembers fingerprints of a model's frozen parameters and verifies them.

    The set of frozen parameters is read from ``requires_grad`` at every call,
    so parameters frozen by hand are picked up (and fingerprinted) too.

    Args:
        model: the model.
        read_every: on an accelerator, read the verdict every this many
            :meth:`observe` calls (default 50); on a CPU it is read at once.

    Example:
        >>> import torch.nn as nn, layerfreeze as lf
        >>> net = nn.Linear(2, 2)
        >>> _ = lf.freeze(net)
        >>> g = Guard(net)
        >>> net.weight.data[0, 0] += 1
        >>> try:
        ...     g.check()
        ... except lf.FrozenParameterChanged as e:
        ...     print(e.names)
        ['weight']
    """

    def __init__(self, model: nn.Module, *, read_every: int = READ_EVERY) -> None:
        self.model = model
        self.read_every = read_every
        self._entries: dict[int, _Entry] = {}
        self._devices: dict[torch.device, _Device] | None = None
        self._observed = 0
        self.refresh()

    def _frozen(self) -> list[tuple[str, nn.Parameter]]:
        # named_parameters() yields each shared tensor once, under its first
        # (canonical) name, without the cost of building a ModelIndex per step.
        return [
            (n, p) for n, p in unwrap(self.model).named_parameters() if not p.requires_grad and not p.is_meta
        ]

    def _set(self, entries: dict[int, _Entry]) -> None:
        self._entries = entries
        self._devices = None

    def refresh(self) -> None:
        """Take new fingerprints of every frozen parameter (accepting any change)."""
        self._set({id(p): _entry(n, p) for n, p in self._frozen()})

    def track(self) -> None:
        """Follow a freeze change without accepting any value change.

        Newly frozen parameters are fingerprinted, unfrozen ones forgotten,
        and parameters that stayed frozen keep their old fingerprints, so a
        change made to them before this call is still reported by the next
        :meth:`check`. Read :meth:`verdict` first: a record of
        :meth:`observe` not read yet is dropped here.
        """
        old = self._entries
        self._set({id(p): old[id(p)] if id(p) in old else _entry(n, p) for n, p in self._frozen()})

    def _grouped(self) -> dict[torch.device, _Device]:
        if self._devices is None:
            groups: dict[torch.device, list[_Entry]] = {}
            for e in self._entries.values():
                groups.setdefault(e.words.device, []).append(e)
            self._devices = {}
            for device, entries in groups.items():
                # by dtype, so that _total concatenates words of one kind only
                entries = sorted(entries, key=lambda e: str(e.words.dtype))
                offsets, at = [], 0
                for e in entries:
                    offsets.append(at)
                    at += e.words.numel()
                prints = torch.stack([e.print for e in entries])
                starts = torch.tensor(offsets, dtype=torch.int64, device=device)
                then = torch.stack([prints[:, 0].sum(), (prints[:, 1] + starts * prints[:, 0]).sum()])
                self._devices[device] = _Device(entries, offsets, then, -1)
                self._devices[device].reset()
        return self._devices

    @staticmethod
    def _total(d: _Device) -> torch.Tensor:
        """The fingerprint of the entries' words laid end to end, in few kernels.

        Small tensors are concatenated (one short copy) and fingerprinted
        together; on a CPU a large tensor is read in place, on an accelerator
        everything goes through chunks of at most ``_CHUNK_BYTES`` (a small
        model's step is bound by kernel launches there, not by bandwidth).
        """
        entries = d.entries
        batched = _batched(entries[0].words.device)
        parts: list[torch.Tensor] = []
        starts: list[int] = []
        chunk: list[torch.Tensor] = []
        state = {"at": 0, "chunk_at": 0, "size": 0}

        def flush() -> None:
            if chunk:
                parts.append(_moments(torch.cat(chunk) if len(chunk) > 1 else chunk[0]))
                starts.append(state["chunk_at"])
                chunk.clear()
                state["size"] = 0

        for e in entries:
            w = e.current()
            if not batched and w.numel() > _SMALL:
                flush()
                parts.append(_moments(w))
                starts.append(state["at"])
            else:
                if chunk and (w.dtype != chunk[0].dtype or state["size"] >= _CHUNK_BYTES):
                    flush()
                if not chunk:
                    state["chunk_at"] = state["at"]
                chunk.append(w)
                state["size"] += w.numel() * w.element_size()
            state["at"] += w.numel()
        flush()
        if len(parts) == 1:
            return parts[0]
        m = torch.stack(parts)
        if d.base is None or d.base.numel() != len(starts):
            d.base = torch.tensor(starts, dtype=torch.int64, device=m.device)
        return torch.stack([m[:, 0].sum(), (m[:, 1] + d.base * m[:, 0]).sum()])

    def _sync_entries(self) -> None:
        current = self._frozen()
        ids = {id(p) for _, p in current}
        if ids != self._entries.keys():
            self.verdict()
            old = self._entries
            self._set({id(p): old[id(p)] if id(p) in old else _entry(n, p) for n, p in current})

    def observe(self, step: int | None = None) -> None:
        """Compare the frozen parameters with their fingerprints on their device,
        recording the first ``step`` at which they differ; no host round trip.

        Parameters frozen since the last call are fingerprinted, not checked;
        parameters unfrozen since are forgotten. On a CPU, or every
        ``read_every`` calls, or when an earlier record already reached the
        host, the verdict is read as by :meth:`verdict`.

        Raises:
            FrozenParameterChanged: when the verdict is read and a change was recorded.
        """
        self._sync_entries()
        self._observed += 1
        read = False
        for device, d in self._grouped().items():
            self._record(d, step)
            if isinstance(d.first, int):
                read = read or d.first != -1
            elif device.type == "cuda":
                read = read or self._arrived(d)
                host = torch.empty((), dtype=torch.int64, pin_memory=True)
                host.copy_(d.first, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                d.pending = (host, event)
        if read or (self.read_every and self._observed % self.read_every == 0):
            self.verdict()

    def _record(self, d: _Device, step: int | None) -> None:
        """Compare ``d``'s parameters with the reference; remember the first step that differs."""
        at = -2 if step is None else int(step)
        total = self._total(d)
        if isinstance(d.first, int):  # a CPU: comparing costs no round trip
            if d.first == -1 and not torch.equal(total, d.then):
                d.first = at
            return
        bad = (total != d.then).any()
        d.first = torch.where((d.first < 0) & bad, torch.full((), at, dtype=torch.int64, device=d.then.device),
                              d.first)

    @staticmethod
    def _arrived(d: _Device) -> bool:
        """Whether the copy of an earlier record reached the host and shows a change (no wait)."""
        if d.pending is None:
            return False
        host, event = d.pending
        return bool(event.query()) and int(host) != -1

    def verdict(self) -> None:
        """Read what :meth:`observe` recorded (one host round trip per device).

        Raises:
            FrozenParameterChanged: naming the parameters that changed and the
                step of the first check that saw it; they are accepted as
                the new reference, so the change is reported once.
        """
        if self._devices is None:
            return
        steps = {device: int(d.first) for device, d in self._devices.items()}
        changed_at = [s for s in steps.values() if s != -1]
        if not changed_at:
            return
        changed: list[str] = []
        for device, d in self._devices.items():
            d.reset()
            if steps[device] != -1:
                changed += [e.name for e in d.entries if not torch.equal(_moments(e.current()), e.print)]
        for e in list(self._entries.values()):
            if e.name in changed:
                self._entries[id(e.param)] = _entry(e.name, e.param)
        self._devices = None
        known = [s for s in changed_at if s >= 0]
        when = f" First seen by the check after optimizer step {min(known)}." if known else ""
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        if not changed:
            shown = "(changed back since; values now match the reference)"
        raise FrozenParameterChanged(
            f"frozen parameters changed value: {shown}.{when} Likely causes: an optimizer stepping a "
            "parameter whose .grad was set by hand; an in-place edit (.data, copy_, "
            "load_state_dict) of a frozen weight; a frozen tensor sharing storage with a "
            "trainable one. If the change was intended, call Freezer.refresh() to accept it.",
            changed,
            step=min(known) if known else None,
        )

    def check(self, step: int | None = None) -> None:
        """:meth:`observe`, then :meth:`verdict`: raise now if a frozen parameter changed.

        Raises:
            FrozenParameterChanged: naming the parameters that changed.
        """
        self._sync_entries()
        for d in self._grouped().values():
            self._record(d, step)
        self.verdict()


class GuardListener:
    """The guard as a party on the freeze road and on an optimizer.

    It follows every freeze change of the model (new frozen parameters are
    fingerprinted, unfrozen ones forgotten), reads any recorded change before
    a freeze change is made (so a change is reported before the reference
    moves on, and the freeze change is refused with it), and after every
    ``every``-th ``optimizer.step()`` compares on the device.

    Args:
        guard: the :class:`Guard`.
        optimizer: the torch optimizer whose steps are checked (None: only
            on demand).
        every: check after every this many steps (0: never after steps).
        clock: an object whose ``count`` is the number of optimizer steps
            taken (the step named in a report).
    """

    def __init__(self, guard: Guard, optimizer: Any = None, *, every: int = 1, clock: Any = None) -> None:
        self.guard = guard
        self.every = every
        self.clock = clock
        self._handle = None
        if optimizer is not None and every:
            ref = weakref.ref(self)

            def after_step(optimizer: Any, args: Any, kwargs: Any) -> None:
                party = ref()
                if party is not None:
                    party.after_step()

            self._handle = optimizer.register_step_post_hook(after_step)
            weakref.finalize(self, self._handle.remove)

    def after_step(self) -> None:
        step = self.clock.count if self.clock is not None else None
        if step is None or step % self.every == 0:
            self.guard.observe(step=step)

    def validate(self, change: Any) -> None:
        self.guard.verdict()

    def apply(self, change: Any) -> None:
        self.guard.track()

    def close(self) -> None:
        """Stop checking after optimizer steps."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
