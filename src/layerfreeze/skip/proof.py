"""Forwards the party runs on its own: the proof that a boundary may be skipped,
and what it needs (no trace left behind, readers of placeholders found, outputs compared)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..feature_cache.check import _close
from ..feature_cache.layout import _CONST_TYPES, _build, _flatten, _unflatten
from .levels import _Level, _Plan, _Stop

if TYPE_CHECKING:
    from .party import SkipParty

__all__ = ["prove"]

#: The proof runs on this many samples of a batch (in a padded batch the one
#: with the fewest real tokens and the shortest of those with more, else the
#: first ones): it compares the same computation done two ways, row by row, at a
#: fraction of a batch's cost (two extra forwards of them, cut to the longer
#: row's length where the batch is padded longer). What it guards against does
#: not need more rows: a placeholder's values read by anything after the
#: boundary refuse it whatever the rows show, and a model that reads padded
#: positions is seen on the shorter row's padding (or on the extra padded
#: position it gets in a batch without padding). Fewer would not do: batch
#: statistics after the boundary (BatchNorm in training mode) need more than one
#: row. Each row is a fixed cost per boundary: at 4 rows of the batch's length
#: the proof was about a third of a one-layer move over a few hundred samples.
PROOF_ROWS = 2

# Torch functions that read a tensor's metadata, not its values: a placeholder's
# shape, dtype and device are those of the output it stands for.
_METADATA = frozenset({"size", "dim", "ndimension", "numel", "nelement", "stride", "storage_offset",
                       "is_floating_point", "is_complex", "is_contiguous", "element_size", "get_device",
                       "__get__", "__len__", "__format__", "__repr__", "new_zeros", "new_ones", "new_empty",
                       "new_full", "zeros_like", "ones_like", "empty_like", "full_like", "to", "type_as"})

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
    the boundary was served (``readers`` gets its name and the placeholder's id).
    Before that, what a function computes from a placeholder is tracked as one
    (``torch.tanh(embeddings)`` read later is a connection around the boundary too)."""

    def __init__(self, plan: _Plan, readers: list[Any]) -> None:
        super().__init__()
        self.plan = plan
        self.readers = readers

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        track = self.plan.track
        name = getattr(func, "__name__", str(func))
        hit = None
        if track and name not in _METADATA:
            hit = next((id(x) for x in _leaves(args, kwargs) if id(x) in track), None)
            if hit is not None and self.plan.served and not self.readers:
                self.readers.extend([name, hit])
        out = func(*args, **kwargs)
        if hit is not None and track is not None and not self.plan.served:
            for t in _leaves(out, {}):
                if isinstance(t, torch.Tensor) and id(t) not in track:
                    track[id(t)] = track[hit]
                    self.plan.keep.append(t)
        return out


def _leaves(args: Any, kwargs: Any) -> list[Any]:
    leaves: list[Any] = []
    _flatten((args, kwargs), leaves)
    return leaves


def _named(args: Any, kwargs: Any, positional: Sequence[str] = ()) -> tuple[Any, list[Any], list[str | None]]:
    """The call's structure, leaves and their names (a positional argument named by the
    entry's signature, ``positional``)."""
    leaves: list[Any] = []
    names: list[str | None] = []
    arg_specs = tuple(_flatten(a, leaves, names, positional[i] if i < len(positional) else None)
                      for i, a in enumerate(args))
    spec = (arg_specs, _flatten(dict(kwargs), leaves, names))
    return spec, leaves, names


def _mask_in(leaves: list[Any], names: list[str | None], padding: str | None) -> torch.Tensor | None:
    return next((x for x, n in zip(leaves, names, strict=True)
                 if n == padding and isinstance(x, torch.Tensor) and x.dim() == 2), None)


def _mask(args: Any, kwargs: Any, padding: str | None, positional: Sequence[str] = ()) -> torch.Tensor | None:
    """The call's 2-D ``padding`` mask (an argument or dict entry of that name), or None."""
    _, leaves, names = _named(args, kwargs, positional)
    return _mask_in(leaves, names, padding)


def _one_padded(calls: list[tuple[tuple[Any, ...], dict[str, Any]]], padding: str | None,
                positional: Sequence[str]) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """The proof's calls with a padded position in them: where the ``padding`` mask marks
    every position real, the last token of the row with the most real tokens is masked
    out, in a copy of the mask; where the rows are one token long, every per-token
    argument gets one more position, padded (zeros). A model that reads a padded
    position (an unmasked mean, say) is then seen whatever the padding of the batch at hand."""
    first = _mask(*calls[0], padding, positional)
    if first is None or first.shape[1] < 1 or not bool((first != 0).all()):
        return calls
    if first.shape[1] == 1:
        return [_per_token(call, first.shape, lambda x: torch.cat([x, x.new_zeros(x[:, :1].shape)], 1))
                for call in calls]
    row = int((first != 0).sum(1).argmax())
    out = []
    for args, kwargs in calls:
        spec, leaves, names = _named(args, kwargs, positional)
        mask = _mask_in(leaves, names, padding)
        if mask is None or mask.shape != first.shape:
            return calls
        new = mask.clone()
        new[row, -1] = 0
        it = iter([new if x is mask else x for x in leaves])
        arg_specs, kw_spec = spec
        out.append((tuple(_build(a, it) for a in arg_specs), dict(_build(kw_spec, it))))
    return out


def _per_token(call: tuple[tuple[Any, ...], dict[str, Any]], shape: torch.Size,
               edit: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call with ``edit`` applied to every per-token argument: a tensor with the
    ``padding`` mask's rows and length (``shape``) in dimensions 0 and 1, as keys read them."""
    leaves: list[Any] = []
    spec = _flatten(call, leaves)
    made = [edit(x) if isinstance(x, torch.Tensor) and x.dim() >= 2 and tuple(x.shape[:2]) == tuple(shape)
            else x for x in leaves]
    args, kwargs = _unflatten(spec, made)
    return tuple(args), dict(kwargs)


def copied(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call with its tensors copied, for a forward the party runs itself (learning the order,
    the proof, a miss): the caller's tensors stay as they were, even under a model that edits its
    input in place (``x.div_(255)``), which the training forward then does once, as without skipping."""
    leaves: list[Any] = []
    spec = _flatten((tuple(args), dict(kwargs)), leaves)
    made = [x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x for x in leaves]
    a, k = _unflatten(spec, made)
    return tuple(a), dict(k)


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


def _proof_rows(call: tuple[tuple[Any, ...], dict[str, Any]], batch: int, padding: str | None,
                positional: Sequence[str] = ()) -> list[int]:
    """Which samples the proof runs: in a padded batch the shortest and the shortest
    of those longer than it (so it has a padded position, and the proof can be cut
    to the longer one's length, see :func:`_narrowed`), then the first ones."""
    if batch <= PROOF_ROWS:
        return list(range(batch))
    mask = _mask(*call, padding, positional)
    first: list[int] = []
    if mask is not None and mask.shape[0] == batch:
        real = (mask != 0).sum(1)
        short = int(real.argmin())
        longer = torch.where(real > real[short], real, real.max() + 1)
        first = [short, int(longer.argmin())]
    picked: list[int] = []
    for r in [*first, *range(PROOF_ROWS)]:
        if r not in picked and len(picked) < PROOF_ROWS:
            picked.append(r)
    return sorted(picked)


def _narrowed(calls: list[tuple[tuple[Any, ...], dict[str, Any]]], padding: str | None,
              positional: Sequence[str]) -> list[tuple[tuple[Any, ...], dict[str, Any]]] | None:
    """The proof's calls without their trailing padded positions (those no row of the
    ``padding`` mask marks real), or None when there are none. Every per-token argument
    (:func:`_per_token`) is cut; each row keeps its real tokens. The proof's forwards then
    cost what the rows cost, not the batch's padded length."""
    first = _mask(*calls[0], padding, positional)
    if first is None or first.dim() != 2:
        return None
    real = (first != 0).any(0)
    if not bool(real.any()):
        return None
    keep = int(real.nonzero().max()) + 1
    if keep == first.shape[1]:
        return None
    return [_per_token(call, first.shape, lambda x: x[:, :keep].contiguous()) for call in calls]


def _first_rows(call: tuple[tuple[Any, ...], dict[str, Any]], batch: int,
                rows: list[int]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The call on the samples ``rows``: every tensor argument with ``batch``
    rows cut to them; None when that cannot be done safely (a leaf that is not a
    tensor or a plain value, or a list of one plain value per sample)."""
    leaves: list[Any] = []
    spec = _flatten(call, leaves)
    if _ids_list(spec, batch):
        return None
    cut: list[Any] = []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            cut.append(x[rows] if x.dim() >= 1 and x.shape[0] == batch else x)
        elif isinstance(x, _CONST_TYPES):
            cut.append(x)
        else:
            return None
    args, kwargs = _unflatten(spec, cut)
    return tuple(args), dict(kwargs)


def _differ(full: Any, skipped: Any, plan: _Plan, padding: str | None, args: Any, kwargs: Any,
            positional: Sequence[str] = ()) -> str | None:
    """Why the skipped forward's output is not the full one's, or None."""
    a: list[Any] = []
    b: list[Any] = []
    names: list[str | None] = []
    if _flatten(full, a, names) != _flatten(skipped, b):
        return "the output's structure differs"
    mask = _mask(args, kwargs, padding, positional)
    real = None if mask is None else mask != 0
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
    """Run :data:`PROOF_ROWS` samples of the batch fully and skipped; refuse
    the boundary if an output differs.

    The samples run cut to their own length where the batch is padded longer
    (:func:`_narrowed`); should that refuse, they run again at the batch's length,
    and that decides (a model that reads a fixed position, say). Either way
    :func:`_one_padded` makes sure they hold a padded position."""
    padding, positional = party.config["padding"], party._positional
    batch, _ = _dims(*plain, padding)
    if batch > PROOF_ROWS:
        rows = _proof_rows(plain, batch, padding, positional)
        cut, cut_plain = _first_rows((args, kwargs), batch, rows), _first_rows(plain, batch, rows)
        if cut is not None and cut_plain is not None:
            (args, kwargs), plain = cut, cut_plain
    calls = [(args, kwargs), plain]
    narrow = _narrowed(calls, padding, positional)
    if narrow is not None:
        (n_args, n_kwargs), n_plain = _one_padded(narrow, padding, positional)
        if _attempt(party, level, n_args, n_kwargs, n_plain)[0] is None:
            level.proven = True
            return True
    (args, kwargs), plain = _one_padded(calls, padding, positional)
    why, key, readers, plan = _attempt(party, level, args, kwargs, plain)
    if why is None:
        level.proven = True
        return True
    reason = (f"not skipping up to {level.b}: the skipped forward differs from the full one ({why}); "
              "training goes on without skipping")
    if key is not None:
        reason = f"not skipping up to {level.b}: {why}; training goes on without skipping"
    elif readers:
        producer = plan.track.get(readers[1], "a prefix module") if plan.track is not None else "?"
        key = f"{readers[0]} reads {producer}"
        reason = (f"not skipping up to {level.b}: {readers[0]} reads the output of {producer}, which the "
                  "boundary does not carry (a connection around it); training goes on without skipping")
    party._refused[level.b] = reason
    if level.b in party._levels:  # what the proof stored is of no use now
        party._drop(level.b)
    party._active, party._reason = None, reason
    if level.cand.group_b is not None:  # a climbed boundary: the group's own may still hold
        party._dirty = True
    party._note(reason, key)
    return False


def _attempt(party: SkipParty, level: _Level, args: tuple[Any, ...], kwargs: dict[str, Any],
             plain: tuple[tuple[Any, ...], dict[str, Any]]) -> tuple[str | None, str | None, list[Any], _Plan]:
    """One run of the proof's call both ways: why the skipped forward is refused (None:
    it is not), the warning's key, the placeholder's reader and the skipped forward's plan."""
    padding, positional = party.config["padding"], party._positional
    entry = party._entry
    assert entry is not None
    model = party.model
    readers: list[Any] = []
    plan = party._plan(*plain, serve=level, track={})
    fed: list[bool] = []  # whether the boundary's output needs grad: something trainable feeds the prefix
    key: str | None = None

    seen: list[list[Any]] = []  # the boundary's output leaves, per full forward

    def needs_grad(m: nn.Module, args: Any, out: Any) -> None:
        fed.append(any(isinstance(x, torch.Tensor) and x.requires_grad for x in _leaves(out, {})))
        seen.append([x.detach() if isinstance(x, torch.Tensor) else x for x in _leaves(out, {})])

    try:
        with _untouched(model):
            party._stack.append(party._plan(*plain))
            handle = level.b_module.register_forward_hook(needs_grad)
            try:
                call = copied(*plain)
                with torch.enable_grad():
                    full = entry(*call[0], **call[1])
            finally:
                party._stack.pop()
                handle.remove()
        if level.modal_around:
            level.mode_matters = _mode_changes_boundary(party, level, plain, needs_grad, seen)
        with _untouched(model):
            party._proving = True
            try:
                plan.out = party._lookup(level, args, kwargs)
            finally:
                party._proving = False
            handles = _watch(party, level, plan, readers)
            party._stack.append(plan)
            try:
                call = copied(*plain)
                with _Readers(plan, readers):
                    skipped = entry(*call[0], **call[1])
            finally:
                party._stack.pop()
                for h in handles:
                    h.remove()
        why = _differ(full, skipped, plan, padding, *plain, positional)
        if why is None and readers:
            why = "a placeholder's values were read"
        if any(fed):
            why = f"its output requires grad: a trainable tensor outside the frozen groups feeds the prefix " \
                  f"({_trainable_around(party, level)})"
            key = why  # the same for the group's own boundary below a climbed one: said once
    except _Stop:
        raise
    except Exception as e:  # the skipped forward failed
        why = f"the skipped forward failed ({type(e).__name__}: {e})"
    return why, key, readers, plan


def _mode_changes_boundary(party: SkipParty, level: _Level, plain: Any, hook: Any, seen: list[list[Any]]) -> bool:
    """Whether the boundary's output changes when the modules around the prefix whose
    forward reads ``self.training`` are in the other mode (a read before the boundary):
    then the stored outputs are dropped at each switch; a read after it changes nothing."""
    entry = party._entry
    assert entry is not None
    flags = [m.training for m in level.modal_around]
    handle = level.b_module.register_forward_hook(hook)
    try:
        with _untouched(party.model):
            for m in level.modal_around:
                m.training = not m.training  # that module only, not its children
            party._stack.append(party._plan(*plain))
            try:
                call = copied(*plain)
                entry(*call[0], **call[1])
            finally:
                party._stack.pop()
    finally:
        handle.remove()
        for m, flag in zip(level.modal_around, flags, strict=True):
            m.training = flag
    if len(seen) < 2 or len(seen[0]) != len(seen[-1]):
        return True
    for a, b in zip(seen[0], seen[-1], strict=True):
        same = (_close(a, b) if a.shape == b.shape else False) if isinstance(a, torch.Tensor) and isinstance(
            b, torch.Tensor) else a == b
        if not same:
            return True
    return False


def _trainable_around(party: SkipParty, level: _Level) -> str:
    """The trainable direct parameters of the modules whose code runs around the prefix, named."""
    names = []
    for m in level.around:
        mod = party._name_of.get(id(m), "")
        names += [f"{mod}.{n}" if mod else n for n, p in m._parameters.items() if p is not None and p.requires_grad]
    return "perhaps " + ", ".join(names) if names else "a tensor the forward's own code makes"


def _watch(party: SkipParty, level: _Level, plan: _Plan, readers: list[Any]) -> list[Any]:
    """Pre-hooks on modules outside the prefix: the first to receive a placeholder."""
    track = plan.track
    assert track is not None
    handles = []
    me = threading.get_ident()
    for name, m in party.model.named_modules():
        if name in level.prefix:
            continue

        # kwargs optional: another thread's forward that was running when the hook went may call it without
        def look(mod: nn.Module, args: Any, kwargs: Any = None, name: str = name) -> None:
            if threading.get_ident() != me:
                return
            if plan.served and not readers:
                hit = next((id(x) for x in _leaves(args, kwargs) if id(x) in track), None)
                if hit is not None:
                    readers.extend([name, hit])

        handles.append(m.register_forward_pre_hook(look, with_kwargs=True))
    return handles
