"""Forwards the party runs on its own: the proof that a boundary may be skipped,
and what it needs (no trace left behind, readers of placeholders found, outputs compared)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..feature_cache.check import _close
from ..feature_cache.layout import _CONST_TYPES, _flatten, _unflatten
from .levels import _Level, _Plan, _Stop

if TYPE_CHECKING:
    from .party import SkipParty

__all__ = ["prove"]

#: The proof runs on the first this many samples of a batch: it compares the
#: same computation done two ways, row by row, so a few rows prove it as well
#: as a whole batch, at a fraction of the cost (two extra forwards of them).
PROOF_ROWS = 2

@contextlib.contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Run extra forwards that leave no trace: no grad, the random state as it
    was before, buffers of modules in training mode (running statistics) restored."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    kept = [(b, b.clone()) for m in model.modules() if m.training for b in m._buffers.values() if b is not None]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            yield
    finally:
        with torch.no_grad():
            for b, v in kept:
                if not torch.equal(b, v):
                    b.copy_(v)


class _Readers(TorchFunctionMode):
    """During the proof: the first torch function that reads a placeholder after
    the boundary was served (``readers`` gets its name and the placeholder's id)."""

    def __init__(self, plan: _Plan, readers: list[Any]) -> None:
        super().__init__()
        self.plan = plan
        self.readers = readers

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        track = self.plan.track
        if self.plan.served and not self.readers and track:
            hit = next((id(x) for x in _leaves(args, kwargs) if id(x) in track), None)
            if hit is not None:
                self.readers.extend([getattr(func, "__name__", str(func)), hit])
        return func(*args, **kwargs)


def _leaves(args: Any, kwargs: Any) -> list[Any]:
    leaves: list[Any] = []
    _flatten((args, kwargs), leaves)
    return leaves


def _dims(args: Any, kwargs: Any, padding: str | None) -> tuple[int, int | None]:
    """The batch size and padded length of a call (length: the ``padding`` mask's,
    else dimension 1 of the first tensor with two or more)."""
    leaves: list[Any] = []
    names: list[str | None] = []
    _flatten((tuple(args), dict(kwargs)), leaves, names)
    tensors = [(x, n) for x, n in zip(leaves, names, strict=True) if isinstance(x, torch.Tensor) and x.dim() >= 1]
    if not tensors:
        return 0, None
    batch = tensors[0][0].shape[0]
    mask = next((x for x, n in tensors if n == padding and x.dim() == 2), None)
    if mask is None:
        mask = next((x for x, _ in tensors if x.dim() >= 2), None)
    return batch, None if mask is None else mask.shape[1]


def _ids_list(spec: Any, batch: int) -> bool:
    """Whether ``spec`` holds a list or tuple of ``batch`` plain values (ids, say)."""
    if spec[0] == "map":
        return any(_ids_list(c, batch) for c in spec[3])
    if spec[0] == "seq":
        if len(spec[2]) == batch and all(c == ("C",) for c in spec[2]):
            return True
        return any(_ids_list(c, batch) for c in spec[2])
    return False


def _first_rows(call: tuple[tuple[Any, ...], dict[str, Any]], batch: int,
                n: int) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The call on its first ``n`` samples: every tensor argument with ``batch``
    rows cut to ``n``; None when that cannot be done safely (a leaf that is not a
    tensor or a plain value, or a list of one plain value per sample)."""
    leaves: list[Any] = []
    spec = _flatten(call, leaves)
    if _ids_list(spec, batch):
        return None
    cut: list[Any] = []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            cut.append(x[:n] if x.dim() >= 1 and x.shape[0] == batch else x)
        elif isinstance(x, _CONST_TYPES):
            cut.append(x)
        else:
            return None
    args, kwargs = _unflatten(spec, cut)
    return tuple(args), dict(kwargs)


def _differ(full: Any, skipped: Any, plan: _Plan, padding: str | None, args: Any, kwargs: Any) -> str | None:
    """Why the skipped forward's output is not the full one's, or None."""
    a: list[Any] = []
    b: list[Any] = []
    names: list[str | None] = []
    if _flatten(full, a, names) != _flatten(skipped, b):
        return "the output's structure differs"
    real = None
    leaves: list[Any] = []
    lnames: list[str | None] = []
    _flatten((tuple(args), dict(kwargs)), leaves, lnames)
    mask = next((x for x, n in zip(leaves, lnames, strict=True)
                 if n == padding and isinstance(x, torch.Tensor) and x.dim() == 2), None)
    if mask is not None:
        real = mask != 0
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        what = f"output {names[i] or i}"
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if plan.track is not None and id(y) in plan.track:
                return f"{what} is the output of {plan.track[id(y)]}"
            if (real is not None and x.dim() >= 2 and x.shape[:2] == real.shape and y.shape == x.shape):
                m = real.to(x.device)
                x, y = x[m], y[m]
            if not _close(x.detach(), y.detach()):
                return f"{what} differs"
        elif isinstance(x, _CONST_TYPES) and x != y:
            return f"{what} differs"
    return None


def prove(party: SkipParty, level: _Level, args: tuple[Any, ...], kwargs: dict[str, Any],
           plain: tuple[tuple[Any, ...], dict[str, Any]]) -> bool:
    """Run the batch's first :data:`PROOF_ROWS` samples fully and skipped; refuse
    the boundary if an output differs."""
    batch, _ = _dims(*plain, party.config["padding"])
    if batch > PROOF_ROWS:
        cut, cut_plain = _first_rows((args, kwargs), batch, PROOF_ROWS), _first_rows(plain, batch, PROOF_ROWS)
        if cut is not None and cut_plain is not None:
            (args, kwargs), plain = cut, cut_plain
    entry = party._entry
    assert entry is not None
    model = party.model
    readers: list[Any] = []
    plan = party._plan(*plain, serve=level, track={})
    try:
        with _untouched(model):
            party._stack.append(party._plan(*plain))
            try:
                full = entry(*plain[0], **plain[1])
            finally:
                party._stack.pop()
        with _untouched(model):
            party._proving = True
            try:
                plan.out = party._lookup(level, args, kwargs)
            finally:
                party._proving = False
            handles = _watch(party, level, plan, readers)
            party._stack.append(plan)
            try:
                with _Readers(plan, readers):
                    skipped = entry(*plain[0], **plain[1])
            finally:
                party._stack.pop()
                for h in handles:
                    h.remove()
        why = _differ(full, skipped, plan, party.config["padding"], *plain)
    except _Stop:
        raise
    except Exception as e:  # the skipped forward failed
        why = f"the skipped forward failed ({type(e).__name__}: {e})"
    if why is None:
        level.proven = True
        return True
    key = reason = (f"not skipping up to {level.b}: the skipped forward differs from the full one ({why}); "
                    "training goes on without skipping")
    if readers:
        producer = plan.track.get(readers[1], "a prefix module") if plan.track is not None else "?"
        key = f"{readers[0]} reads {producer}"
        reason = (f"not skipping up to {level.b}: {readers[0]} reads the output of {producer}, which the "
                  "boundary does not carry (a connection around it); training goes on without skipping")
    party._refused[level.b] = reason
    party._active, party._reason = None, reason
    if level.cand.group_b is not None:  # a climbed boundary: the group's own may still hold
        party._dirty = True
    party._note(reason, key)
    return False

def _watch(party: SkipParty, level: _Level, plan: _Plan, readers: list[Any]) -> list[Any]:
    """Pre-hooks on modules outside the prefix: the first to receive a placeholder."""
    track = plan.track
    assert track is not None
    handles = []
    for name, m in party.model.named_modules():
        if name in level.prefix:
            continue

        def look(mod: nn.Module, args: Any, kwargs: Any, name: str = name) -> None:
            if plan.served and not readers:
                hit = next((id(x) for x in _leaves(args, kwargs) if id(x) in track), None)
                if hit is not None:
                    readers.extend([name, hit])

        handles.append(m.register_forward_pre_hook(look, with_kwargs=True))
    return handles
