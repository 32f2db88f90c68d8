"""Fingerprints that prove frozen parameters did not move, checked on the device.

Every tensor is read from its real storage (no copy, see below) as integer
words ``w_0 .. w_{n-1}`` in memory order: 64-bit words where the storage is
aligned (two float32 or four bfloat16 values a word), the element's own width
otherwise. All arithmetic is integer (mod 2**64), so a fingerprint is exact:
no float rounding, no false alarm, the same on any thread count.

**The guard's fingerprint** lays the words out as a grid of rows of
``_ROW`` (128) words, ``w[r, c]``, plus a tail of fewer than 128 words, and
keeps the *row sums* ``sum_c w[r, c]``, the *column sums* ``sum_r w[r, c]``
and the tail words themselves. What that sees, exactly (not with some
probability):

* **any change of a single element**: its word changes by a nonzero amount
  mod 2**64, so its row sum (or its tail word) changes; more generally any
  change confined to one word, one row (each column sum shows it) or one
  column (each row sum shows it) is seen;
* **two different elements swapping places**: in one word, that word changes;
  in two rows, each of those row sums changes; in one row, the two words are
  in different columns and each of those column sums changes. So
  ``w.copy_(w.flip(0))``, swapped rows and shuffles are seen (a general
  permutation changes many sums at once; it goes unseen only if every row
  sum and every column sum happens to come out equal).

Row sums cost one pass over the words, about as much as a plain sum. Column sums
are a second, slower pass (a reduction across rows), so :class:`Guard` spreads
them: each :meth:`Guard.observe` compares every row sum and tail word (so any
value change is seen at the check right after it) and the column sums of one
slice of rows in ``order_every`` (8 by default) in turn, so a change that
only moves values *within* one row of 128 words is seen within
``order_every`` checks; the report then names the window of steps in which it
happened. Words read together that come to at most ``_SMALL`` (4096) words
(small tensors are concatenated), and :meth:`Guard.check` (on demand, at
epoch ends), have all their column sums compared at once. ``order_every=1``
compares everything at every check.

:func:`fingerprint` (used by the feature cache) is a shorter pair of 64-bit
integers: ``S0 = sum(w_p)``, which any single change moves, and
``S1 = sum(p * w_p)``, which a swap of words ``p`` and ``q`` moves by
``(p - q) * (w_q - w_p)``: nonzero unless that product is a multiple of 2**64
(for instance two words that differ only in their top bit, an even distance
apart), which the grid above has no need to exclude.

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
and every check is read at once. The guard keeps about 2 * 8 / 128 bytes of
reference sums per frozen 8-byte word (1.6% of the frozen parameters' size).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import ArgumentError, FrozenParameterChanged
from .selectors import unwrap

__all__ = ["Guard", "GuardListener", "fingerprint"]

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Bound on the temporary buffer a batched check concatenates into, in bytes.
_CHUNK_BYTES = 64 << 20
# Tensors up to this many words are checked together (concatenated), and
# completely (every column sum) at every check.
_SMALL = 4096
# Words per row of the guard's grid.
_ROW = 128
# Strips of the [C, R] view in fingerprint()'s recursion.
_STRIPS = 8
# Checks between two forced reads of the verdict on an accelerator.
READ_EVERY = 50
# Checks per round of the column (order) sums of large tensors.
ORDER_EVERY = 8


def _batched(device: torch.device) -> bool:
    """Whether to check a device's tensors through concatenated chunks."""
    return device.type != "cpu"


def _keeps_record(device: torch.device) -> bool:
    """Whether a device's record of a change stays on it (a tensor) rather than on the host (an int)."""
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


def _grid(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` as rows of ``_ROW`` words (a view) and the tail of fewer words."""
    rows = w.numel() // _ROW
    return w[: rows * _ROW].view(rows, _ROW), w[rows * _ROW :]


def _grid_print(w: torch.Tensor) -> torch.Tensor:
    """Row sums, column sums and tail words of flat integer words ``w`` (int64, on its device)."""
    head, tail = _grid(w)
    parts = [head.sum(1, dtype=torch.int64), tail.to(torch.int64)]
    if len(head):
        parts.append(head.sum(0, dtype=torch.int64))
    return torch.cat(parts)


def grid_print(t: torch.Tensor) -> torch.Tensor:
    """The guard's fingerprint of ``t``: row sums, column sums and tail words.

    It changes if any element of ``t`` changes and if any two different
    elements swap places, with no exception (see the module docstring).

    Args:
        t: any tensor (non-contiguous, ``channels_last``, a DTensor's local
            shard, any dtype).

    Returns:
        A 1-D int64 tensor on ``t``'s device, about ``1/128`` of the number
        of words long.

    Example:
        >>> import torch
        >>> w = torch.randn(300, 2)
        >>> torch.equal(grid_print(w), grid_print(w.flip(0)))
        False
    """
    return _grid_print(_words(t)[0])


@dataclass
class _Entry:
    name: str
    param: nn.Parameter
    print: torch.Tensor  # the grid fingerprint taken when the parameter was frozen
    words: torch.Tensor  # a view of the parameter's storage, kept to skip re-viewing it
    ptr: int  # where that storage starts (``param.data = ...`` moves it); -1: view every time

    def current(self) -> torch.Tensor:
        if self.ptr == -1:
            return _words(self.param)[0]
        if self.param.data_ptr() != self.ptr:  # storage replaced (``param.data = ...``): view it again
            self.words, shared = _words(self.param)
            self.ptr = self.param.data_ptr() if shared else -1
        return self.words

    def changed(self) -> bool:
        return not torch.equal(_grid_print(self.current()), self.print)


def _entry(name: str, p: nn.Parameter) -> _Entry:
    words, shared = _words(p)
    # Keep the view only when it is the parameter's own storage (not a copy of
    # a gappy tensor, not a DTensor shard, not a bool parameter's conversion).
    keep = shared and type(p.detach()) is torch.Tensor
    ptr = p.data_ptr() if keep else -1
    return _Entry(name, p, _grid_print(words), words, ptr)


@dataclass
class _Device:
    """One device's frozen parameters, their reference sums, and the record of a change.

    The entries' words are read as parts: a large tensor in place, or
    several small ones (or, on an accelerator, everything) concatenated.
    """

    entries: list[_Entry]
    parts: list[_Part]
    exact: torch.Tensor  # reference: every row sum, tail word and column sum checked at every check
    slices: list[torch.Tensor]  # reference: the column sums of slice j of the rotating parts
    first: torch.Tensor | int = -1  # the step of the first check that saw a difference, -1: none
    since: torch.Tensor | int = -1  # -1: a value changed at that step; >= 0 (-2 unknown): order only, after it
    checked: list[int] = field(default_factory=list)  # per slice: the step it was last seen unchanged
    pending: Any = None  # (pinned host copy of ``first``, CUDA event) of the last check

    def reset(self) -> None:
        device = self.exact.device
        # on a CPU the record is a plain int: there is no device to keep it on
        if not _keeps_record(device):
            self.first, self.since = -1, -1
        else:
            self.first = torch.full((), -1, dtype=torch.int64, device=device)
            self.since = torch.full((), -1, dtype=torch.int64, device=device)
        self.pending = None


def _differs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Whether two vectors of sums differ, as a bool tensor on their device (no host round trip)."""
    if a.shape != b.shape:  # a storage replaced by one of another size
        return torch.ones((), dtype=torch.bool, device=a.device)
    return (a != b).any()


class _Part:
    """Words of one or more entries read as one grid; the views are kept while the storage is."""

    def __init__(self, entries: list[_Entry], rotating: bool, order_every: int) -> None:
        self.entries = entries
        self.rotating = rotating
        self.order_every = order_every
        self._words: torch.Tensor | None = None
        self._views: tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]] = (_EMPTY, _EMPTY, [])

    def views(self) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """The grid's rows, its tail, and its slices of rows (one per check in a round)."""
        if len(self.entries) == 1:
            w = self.entries[0].current()
            if w is self._words:
                return self._views
        else:
            w = torch.cat([e.current() for e in self.entries])
        head, tail = _grid(w)
        k, rows = self.order_every, len(head)
        slices = [head[rows * j // k : rows * (j + 1) // k] for j in range(k)] if self.rotating else []
        self._views = head, tail, slices
        # only a single entry's own storage stays valid; a concatenation is new each time
        self._words = w if len(self.entries) == 1 and self.entries[0].ptr != -1 else None
        return self._views


_EMPTY = torch.zeros(0, dtype=torch.int64)


def _sums(parts: list[_Part], slices: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The sums compared at every check, and those of each slice in ``slices``, in few kernels."""
    exact: list[torch.Tensor] = []
    cols: list[list[torch.Tensor]] = [[] for _ in slices]
    for part in parts:
        head, tail, rows = part.views()
        if tail.numel():
            exact.append(tail.to(torch.int64))
        if not len(head):
            continue
        exact.append(head.sum(1, dtype=torch.int64))
        if not part.rotating:
            exact.append(head.sum(0, dtype=torch.int64))
            continue
        for out, j in zip(cols, slices, strict=True):
            out.append(rows[j].sum(0, dtype=torch.int64))
    if not exact:  # only empty tensors
        exact.append(torch.zeros(0, dtype=torch.int64, device=parts[0].entries[0].words.device))
    return exact[0] if len(exact) == 1 else torch.cat(exact), [torch.cat(c) for c in cols]


class Guard:
    """Remembers fingerprints of a model's frozen parameters and verifies them.

    The set of frozen parameters is read from ``requires_grad`` at every call,
    so parameters frozen by hand are picked up (and fingerprinted) too.

    Args:
        model: the model.
        read_every: on an accelerator, read the verdict every this many
            :meth:`observe` calls (default 50; 0: only when asked); on a CPU
            it is read at once.
        order_every: :meth:`observe` compares the column (order) sums of
            large tensors for one slice of rows in this many (default 8), so
            a change of order only within rows of 128 words is seen within
            this many checks; 1 compares everything at every check.

    Raises:
        ArgumentError: ``read_every`` or ``order_every`` is not a count.

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

    def __init__(self, model: nn.Module, *, read_every: int = READ_EVERY, order_every: int = ORDER_EVERY) -> None:
        for name, value, least in (("read_every", read_every, 0), ("order_every", order_every, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ArgumentError(f"Guard {name} must be an int >= {least}, got {value!r}; "
                                    f"for example {name}={READ_EVERY if least == 0 else ORDER_EVERY}")
        self.model = model
        self.read_every = read_every
        self.order_every = order_every
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

    def _plan(self, device: torch.device, entries: list[_Entry]) -> list[_Part]:
        """Split a device's entries into parts: large ones alone on a CPU, the rest concatenated."""
        batched = _batched(device)
        parts: list[list[_Entry]] = []
        chunk: list[_Entry] = []
        size = 0
        for e in entries:
            w = e.words
            if not batched and w.numel() > _SMALL:
                parts.append([e])
                continue
            if chunk and (w.dtype != chunk[0].words.dtype or size >= _CHUNK_BYTES):
                parts.append(chunk)
                chunk, size = [], 0
            chunk.append(e)
            size += w.numel() * w.element_size()
        if chunk:
            parts.append(chunk)
        k = self.order_every
        return [_Part(p, k > 1 and sum(e.words.numel() for e in p) > _SMALL, k) for p in parts]

    def _grouped(self, step: int) -> dict[torch.device, _Device]:
        """Each device's parts and reference sums, taken now; entries changed since they were
        fingerprinted are recorded as a change seen at ``step``."""
        if self._devices is None:
            groups: dict[torch.device, list[_Entry]] = {}
            for e in self._entries.values():
                groups.setdefault(e.words.device, []).append(e)
            self._devices = {}
            for device, entries in groups.items():
                # by dtype, so that parts concatenate words of one kind only
                entries = sorted(entries, key=lambda e: str(e.words.dtype))
                parts = self._plan(device, entries)
                rotating = any(part.rotating for part in parts)
                exact, slices = _sums(parts, list(range(self.order_every)) if rotating else [])
                d = _Device(entries, parts, exact, slices)
                d.checked = [step] * self.order_every
                d.reset()
                # The references are read now; the entries' fingerprints are
                # older. Compare them, so that nothing that changed in between
                # is taken as the reference.
                if isinstance(d.first, int):
                    if any(e.changed() for e in entries):
                        d.first, d.since = step, -1
                else:
                    bad = torch.stack([_differs(_grid_print(e.current()), e.print) for e in entries]).any()
                    d.first = torch.where(bad, step, d.first)
                self._devices[device] = d
        return self._devices

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

        Every value is compared, and the order of the values in one slice of
        rows in ``order_every`` of the large tensors (see the module docstring).
        Parameters frozen since the last call are fingerprinted; parameters
        unfrozen since are forgotten. On a CPU, or every ``read_every`` calls,
        or when an earlier record already reached the host, the verdict is read
        as by :meth:`verdict`.

        Raises:
            FrozenParameterChanged: when the verdict is read and a change was recorded.
        """
        self._sync_entries()
        self._observed += 1
        read = False
        at = -2 if step is None else int(step)
        for device, d in self._grouped(at).items():
            self._record(d, at, [self._observed % self.order_every])
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

    def _record(self, d: _Device, at: int, slices: list[int]) -> None:
        """Compare ``d``'s parameters with the reference; remember the first step that differs."""
        if not d.slices:  # no tensor large enough to spread its column sums
            slices = []
        exact, cols = _sums(d.parts, slices)
        # The window of an order-only change: since the oldest of these slices was last seen unchanged.
        since = min((d.checked[j] for j in slices), default=-2)
        for j in slices:
            d.checked[j] = at
        if isinstance(d.first, int):  # a CPU: comparing costs no round trip
            if d.first == -1:
                if not torch.equal(exact, d.exact):
                    d.first, d.since = at, -1
                elif not all(torch.equal(c, d.slices[j]) for c, j in zip(cols, slices, strict=True)):
                    d.first, d.since = at, since
            return
        bad_exact = _differs(exact, d.exact)
        bad = bad_exact
        for c, j in zip(cols, slices, strict=True):
            bad = bad | _differs(c, d.slices[j])
        new = (d.first < 0) & bad
        d.since = torch.where(new, torch.where(bad_exact, -1, since), d.since)
        d.first = torch.where(new, at, d.first)

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
                step of the first check that saw it (for a change of order
                only, also the step after which it happened); they are
                accepted as the new reference, so the change is reported once.
        """
        if self._devices is None:
            return
        seen = {device: (int(d.first), int(d.since)) for device, d in self._devices.items()}
        changed_at = [s for s, _ in seen.values() if s != -1]
        if not changed_at:
            return
        changed: list[str] = []
        for device, d in self._devices.items():
            d.reset()
            if seen[device][0] != -1:
                changed += [e.name for e in d.entries if e.changed()]
        for e in list(self._entries.values()):
            if e.name in changed:
                self._entries[id(e.param)] = _entry(e.name, e.param)
        self._devices = None
        known = [(s, since) for s, since in seen.values() if s >= 0]
        when = ""
        if known:
            step, since = min(known)
            when = f" First seen by the check after optimizer step {step}."
            if since != -1:
                after = f"after optimizer step {since}" if since >= 0 else f"within the {self.order_every} checks before"
                when += (f" Only the order of values changed, which each check compares for one part in "
                         f"{self.order_every} of the weights: it changed {after}.")
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        if not changed:
            shown = "(changed back since; values now match the reference)"
        raise FrozenParameterChanged(
            f"frozen parameters changed value: {shown}.{when} Likely causes: an optimizer stepping a "
            "parameter whose .grad was set by hand; an in-place edit (.data, copy_, "
            "load_state_dict) of a frozen weight; a frozen tensor sharing storage with a "
            "trainable one. If the change was intended, call Freezer.refresh() to accept it.",
            changed,
            step=min(known)[0] if known else None,
        )

    def check(self, step: int | None = None) -> None:
        """Compare everything (every value and its place) and raise now if a frozen parameter changed.

        Raises:
            FrozenParameterChanged: naming the parameters that changed.
        """
        self._sync_entries()
        at = -2 if step is None else int(step)
        for d in self._grouped(at).values():
            self._record(d, at, list(range(self.order_every)))
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
