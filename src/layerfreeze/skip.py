"""Skipping the frozen prefix's forward: a Freezer party (``Freezer(..., cache=...)``).

While the bottom groups of a schedule's rule are frozen in eval mode, every
module the forward runs up to the last of them (the *boundary*, embeddings and
stems included) computes the same output for a sample at every step. The
party stores the boundary's output per sample, keyed like :func:`layerfreeze.cache`
(content, real tokens, sample ids), and on a batch it has seen makes the
prefix cost nothing: the modules before the boundary return a placeholder of
their output structure and the boundary returns the stored rows.

How it decides and stays correct:

* **The order.** The first forward runs with hooks on every module and records
  which module runs inside which, and in what order. A group's *boundary* is the
  module of the group that finishes last; its *prefix* is every module that
  finishes before it (except the modules that contain it).
* **The boundary.** The highest group (of any rule's groups) whose prefix has no
  trainable parameter, no module in training mode where that matters (dropout,
  batch statistics, a class whose ``forward`` reads ``self.training``) and no
  hooks. Otherwise nothing is skipped and :class:`SkipStats` says why.
* **The proof.** Before the first skip at a new boundary, one batch runs both
  ways (the full forward and the skipped one, from the same random state, with
  buffers restored after) and every output tensor is compared (real positions
  only, in a padded batch). A model that reads a prefix output the boundary does
  not carry (a connection around the boundary) is refused: a warning names the
  module that read a placeholder when one is found, and training goes on
  without skipping.
* **Levels.** Each boundary is a level: a :class:`~layerfreeze.feature_cache.call._FeatureCache`
  over a view of its prefix, so keys, padding, stores, the disk layout and
  validity are those of :func:`layerfreeze.cache` (the disk directory is named
  by the prefix's weights, its module tree and the boundary). When the boundary
  moves up, a missing sample of the new level is computed from the level below
  (its stored row through the newly frozen group only); the lower level is
  dropped once every sample it held is stored above. When it moves down, levels
  above are dropped.
"""

from __future__ import annotations

import contextlib
import itertools
import types
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .core import Change
from .errors import ArgumentError, ArgumentTypeError, CacheError, CacheTypeError
from .feature_cache.api import cache_config
from .feature_cache.call import _FeatureCache, _positional_names
from .feature_cache.check import _close
from .feature_cache.layout import _CONST_TYPES, _flatten, _unflatten
from .rules import _roots
from .selectors import ModelIndex

__all__ = ["SkipParty", "SkipStats", "skip_config"]

_KEYS = ("store", "path", "max_bytes", "verify_every", "padding", "pad_value", "key", "dtype")

# torch.nn classes whose forward depends on the training flag
_MODAL = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._NormBase, nn.MultiheadAttention,
          nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.RNNBase)


@dataclass(frozen=True)
class SkipStats:
    """What skipping the frozen prefix does now (:meth:`layerfreeze.Freezer.skip_stats`).

    Attributes:
        boundary: the label of the highest frozen group whose output is stored
            (``"encoder.layer.2"``), or None.
        module: the module whose output is stored (the group's last module).
        groups: how many groups of that rule it covers, from the bottom (0: none).
        skipping: whether forwards skip the prefix now.
        reason: why not, when not skipping (None otherwise).
        hits: samples whose boundary output was served from the store (the
            skipped forward of a boundary's proof included).
        misses: samples whose boundary output was computed.
        bytes_held: bytes of stored outputs in memory.
        bytes_on_disk: bytes of stored outputs on disk.
        entries: samples stored at the boundary.
    """

    boundary: str | None
    module: str | None
    groups: int
    skipping: bool
    reason: str | None
    hits: int
    misses: int
    bytes_held: int
    bytes_on_disk: int
    entries: int


def skip_config(value: object) -> dict[str, Any] | None:
    """Check the ``cache=`` argument of :class:`~layerfreeze.Freezer`.

    Args:
        value: None/False (off), True or ``"memory"``, ``"disk"`` (with a
            path: pass a dict), or a dict of :func:`layerfreeze.cache` keyword
            arguments (``store``, ``path``, ``max_bytes``, ``padding``,
            ``pad_value``, ``key``, ``dtype``, ``verify_every``).

    Returns:
        The store's settings, or None when off.

    Raises:
        ArgumentTypeError: not one of those types.
        ArgumentError: an unknown key or a value :func:`layerfreeze.cache` refuses.

    Example:
        >>> from layerfreeze.skip import skip_config
        >>> skip_config(True)["store"], skip_config(None)
        ('memory', None)
    """
    if value is None or value is False:
        return None
    if value is True:
        value = {"store": "memory"}
    elif isinstance(value, str):
        if value == "disk":
            raise ArgumentError("cache='disk' needs a directory: pass cache={'store': 'disk', 'path': '...'}")
        value = {"store": value}
    elif not isinstance(value, dict):
        raise ArgumentTypeError(
            f"cache must be None, True, 'memory', or a dict of lf.cache arguments (e.g. "
            f"{{'store': 'disk', 'path': '...'}}), got {type(value).__name__}"
        )
    unknown = [k for k in value if k not in _KEYS]
    if unknown:
        raise ArgumentError(f"cache= has unknown key(s) {unknown}; accepted: {', '.join(_KEYS)}")
    try:
        return cache_config(**value, batch_dim=0)
    except CacheTypeError as e:
        raise ArgumentTypeError(f"cache=: {e}") from None
    except CacheError as e:
        raise ArgumentError(f"cache=: {e}") from None


class _Stop(BaseException):
    """Ends a forward at the boundary (a BaseException: model code catching Exception does not swallow it)."""

    def __init__(self, out: Any) -> None:
        self.out = out


@dataclass
class _Call:
    name: str
    start: int
    parent: int | None
    end: int = -1


@dataclass
class _Candidate:
    label: str
    count: int  # groups of its rule from the bottom, this one included
    b: str  # the boundary module
    params: list[str]  # parameters of those groups


@dataclass
class _Plan:
    """What one forward does: serve a level's stored output, stop at a module, or neither."""

    batch: int
    length: int | None
    device: torch.device
    serve: Any = None  # the level whose boundary returns ``out``
    out: Any = None
    stop: nn.Module | None = None
    outer: bool = False
    entry: nn.Module | None = None
    served: bool = False
    track: dict[int, str] | None = None  # placeholder ids -> producing module (the proof)
    keep: list[Any] = field(default_factory=list)


def _skip_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The instance ``forward`` of a prefix module: asks its party what to do."""
    ref = _WRAPPED.get(self)
    party = ref() if ref is not None else None
    if party is None:
        return type(self).forward(self, *args, **kwargs)
    return party._module_call(self, args, kwargs)


_WRAPPED: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


def _mode_matters(m: nn.Module) -> bool:
    if isinstance(m, _MODAL):
        return True
    if type(m).__module__.startswith("torch.nn."):
        return False
    code = getattr(getattr(type(m), "forward", None), "__code__", None)
    return code is not None and "training" in code.co_names


class _PrefixView(nn.Module):
    """The prefix of one boundary as a module tree: what a level's cache checks and names its disk store by."""

    def __init__(self, parts: dict[str, nn.Module], boundary: str, party: SkipParty) -> None:
        super().__init__()
        self.parts = nn.ModuleDict({n.replace(".", "/"): m for n, m in parts.items()})
        self.boundary = boundary
        self._party = weakref.ref(party)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        party = self._party()
        assert party is not None
        return party._compute(self.boundary, args, kwargs)


class _LevelCache(_FeatureCache):
    """A level's store: the feature cache of its prefix view."""

    def __init__(self, view: _PrefixView, config: dict[str, Any], level: _Level, party: SkipParty) -> None:
        super().__init__(view, _PrefixView, config)
        self._positional = party._positional
        self.name = f"the frozen prefix up to {level.b}"
        self._level = level
        self._party = weakref.ref(party)

    def _scan(self) -> tuple[tuple[Any, ...], bool]:
        token, hooks, _ = self._scan_all()
        return (token, hooks), self._level.unsafe() is not None

    def _why_not(self, inputs: list[Any]) -> str | None:
        reason = self._level.unsafe()
        if reason is not None:
            return reason
        if any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs):
            return "an input requires grad, so gradients must flow through the prefix"
        return None

    def _warn(self, reason: str) -> None:
        party = self._party()
        if party is not None:
            party._note(f"{self.name}: {reason}; computed, not stored")


class _Level:
    """One boundary: its prefix, the modules that return placeholders, its store."""

    def __init__(self, party: SkipParty, cand: _Candidate, before: list[str], prefix: list[str]) -> None:
        modules = dict(party.model.named_modules())
        self.cand = cand
        self.b = cand.b
        self.b_module = modules[cand.b]
        self.before = before
        self.before_ids = {id(modules[n]) for n in before}
        self.prefix = set(prefix)
        parts = {n: modules[n] for n in [*before, cand.b]}
        self.params = [p for m in parts.values() for p in m.parameters()]
        self.modal = [(n, m) for top, mod in parts.items() for n, m in mod.named_modules(prefix=top) if _mode_matters(m)]
        self.view = _PrefixView(parts, cand.b, party)
        self.cache = _LevelCache(self.view, party.config, self, party)
        self.proven = False

    def unsafe(self) -> str | None:
        for p in self.params:
            if p.requires_grad:
                return "a parameter of the prefix is trainable"
        for n, m in self.modal:
            if m.training:
                return f"{n} is in training mode"
        return None

    def entries(self) -> set[bytes]:
        c = self.cache
        keys = set(c.memory.index) if c.memory is not None else set()
        if c.disk is not None:
            keys |= set(c.disk.index)
        return keys


class SkipParty:
    """Skips the forward of a model's frozen prefix; made by :class:`~layerfreeze.Freezer`
    for ``cache=`` (see :mod:`layerfreeze.skip`). Follows the freeze road
    (a change marks the boundary for a new decision at the next forward), holds
    the model weakly, and ``close()`` removes every hook and instance forward.

    Args:
        model: the unwrapped model.
        schedule: the schedule whose rules' groups are the possible boundaries.
        config: the store's settings (:func:`skip_config`).

    Example:
        >>> import torch, torch.nn as nn, layerfreeze as lf
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 1))
        >>> s = lf.Schedule().freeze(["[0]", "[1]", "[2]"], mode="eval")
        >>> fz = lf.Freezer(net, torch.optim.SGD(net.parameters(), lr=0.1), s, cache=True)
        >>> _ = fz.set_epoch(0)
        >>> x = torch.randn(6, 4)
        >>> _ = net(x)          # learns the order, proves the boundary on x, stores
        >>> _ = net(x.flip(0))  # served from the store
        >>> st = fz.skip_stats(); (st.module, st.skipping, st.misses, st.hits)
        ('2', True, 6, 12)
    """

    def __init__(self, model: nn.Module, schedule: Any, config: dict[str, Any]) -> None:
        self._model = weakref.ref(model)
        self.schedule = schedule
        self.config = config
        self._positional: list[str] = []
        self._stack: list[_Plan] = []
        self._levels: dict[str, _Level] = {}
        self._active: _Level | None = None
        self._cand: _Candidate | None = None
        self._reason: str | None = "the order of the modules is learnt on the first forward"
        self._refused: dict[str, str] = {}
        self._warned: set[str] = set()
        self._dirty = True
        self._hits = self._misses = 0
        self._calls: list[_Call] = []
        self._outs: dict[str, tuple[Any, list[Any]]] = {}
        self._trace_dims: tuple[int, int | None] = (0, None)
        self._entry: nn.Module | None = None
        self._handles: list[Any] = []
        self._trace_handles: list[Any] = []
        self._wrapped: list[weakref.ref[nn.Module]] = []
        self._arm()

    @property
    def model(self) -> nn.Module:
        m = self._model()
        assert m is not None
        return m

    # ---------------------------------------------------------------- the road

    def validate(self, change: Change) -> None:
        """Nothing to veto."""

    def apply(self, change: Change) -> None:
        """A new frozen set: decide the boundary again at the next forward."""
        self._dirty = True

    def verify(self) -> None:
        """Check every level's weights and module tree now (drops stale outputs)."""
        for level in self._levels.values():
            with level.cache.lock:
                level.cache.verify()

    def close(self) -> None:
        """Remove every hook and instance forward; drop stored outputs held in memory."""
        for h in self._handles + self._trace_handles:
            h.remove()
        self._handles.clear()
        self._trace_handles.clear()
        for ref in self._wrapped:
            m = ref()
            if m is not None and m.__dict__.get("forward") is not None:
                del m.__dict__["forward"]
                _WRAPPED.pop(m, None)
        self._wrapped.clear()
        for b in list(self._levels):
            self._drop(b)
        self._active = None
        self._reason = "closed"

    # ---------------------------------------------------------------- stats

    def stats(self) -> SkipStats:
        """The boundary, whether it skips and why not, counters (see :class:`SkipStats`)."""
        cand = self._cand
        level = self._active
        mem = sum(lv.cache.memory.nbytes for lv in self._levels.values() if lv.cache.memory is not None)
        disk = sum(lv.cache.disk.nbytes for lv in self._levels.values() if lv.cache.disk is not None)
        entries = level.cache.stats().entries if level is not None else 0
        return SkipStats(cand.label if cand else None, cand.b if cand else None, cand.count if cand else 0,
                         level is not None, None if level is not None else self._reason, self._hits,
                         self._misses, mem, disk, entries)

    def _note(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(f"layerfreeze: {message}", stacklevel=4)

    # ---------------------------------------------------------------- the order

    def _arm(self) -> None:
        """Hooks that learn the order of the calls on the first forward.

        The model's own forward is watched from the start: its first call first
        runs the batch once more under hooks (no grad, same random state,
        buffers restored) and is then served like any later one. A forward
        that starts at a submodule instead (a trainer's step calling
        ``self.net(x)``) is learnt while it runs, and its module watched from then on.
        """
        model = self.model
        names: dict[int, str] = {}
        for name, m in model.named_modules():
            names.setdefault(id(m), name)
        calls: list[_Call] = []
        outs: dict[str, tuple[Any, list[Any]]] = {}
        stack: list[int] = []
        count = itertools.count()
        me = weakref.ref(self)
        entry: list[Any] = []
        done: list[bool] = []
        padding = self.config["padding"]

        # both take their kwargs as optional: a hook removed while a call runs is
        # still called for that call, without them
        def pre(m: nn.Module, args: Any, kwargs: Any = None) -> None:
            if done:
                return
            if not stack and not entry:
                entry.append((m, _dims(args, kwargs or {}, padding)))
            if entry:
                stack.append(len(calls))
                calls.append(_Call(names[id(m)], next(count), stack[-2] if len(stack) > 1 else None))

        def post(m: nn.Module, args: Any, *rest: Any) -> None:
            if done or not stack:
                return
            out = rest[-1]
            c = calls[stack.pop()]
            c.end = next(count)
            if c.name not in outs and out is not None:
                leaves: list[Any] = []
                spec = _flatten(out, leaves)
                outs[c.name] = (spec, [(tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else x
                                       for x in leaves])
            party = me()
            if not stack:
                done.append(True)
                if party is not None:
                    party._learnt(entry[0], calls, outs)

        self._watch_entry(model)
        for m in model.modules():
            self._trace_handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            self._trace_handles.append(m.register_forward_hook(post, with_kwargs=True, always_call=True))

    def _watch_entry(self, module: nn.Module) -> None:
        me = weakref.ref(self)

        def pre(m: nn.Module, args: Any, kwargs: Any) -> Any:
            party = me()
            return party._pre(m, args, kwargs) if party is not None else None

        def post(m: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
            party = me()
            if party is not None and party._stack and party._stack[-1].outer and party._stack[-1].entry is m:
                party._stack.pop()

        self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self._handles.append(module.register_forward_hook(post, with_kwargs=True, always_call=True))

    def _learnt(self, entry: tuple[nn.Module, tuple[int, int | None]], calls: list[_Call],
                outs: dict[str, tuple[Any, list[Any]]]) -> None:
        for h in self._trace_handles:
            h.remove()
        self._trace_handles.clear()
        module, dims = entry
        self._entry, self._trace_dims, self._calls, self._outs = module, dims, calls, outs
        self._positional = _positional_names(type(module))
        if module is not self.model:
            self._watch_entry(module)
        self._dirty = True

    def _trace(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Learn the order on this batch, from the model's own forward (see :meth:`_arm`)."""
        with _untouched(self.model):
            self._stack.append(self._plan(args, kwargs))
            try:
                self.model(*args, **kwargs)
            finally:
                self._stack.pop()

    # ---------------------------------------------------------------- the boundary

    def _first_calls(self) -> dict[str, int]:
        first: dict[str, int] = {}
        for i, c in enumerate(self._calls):
            first.setdefault(c.name, i)
        return first

    def _candidates(self) -> list[_Candidate]:
        index = ModelIndex(self.model)
        first = self._first_calls()
        out = []
        for i, rule in enumerate(self.schedule.rules):
            groups = rule.groups(index, origin=self.schedule.origin(i))
            below: list[str] = []
            for g, (label, res) in enumerate(groups):
                below = below + res.params
                called = [first[r] for r in _roots(res.modules) if r in first and r != ""]
                if called:
                    b = max(called, key=lambda k: self._calls[k].end)
                    out.append(_Candidate(label, g + 1, self._calls[b].name, below))
        return out

    def _prefix(self, b: str) -> tuple[list[str], list[str]]:
        """Modules before ``b`` that return placeholders (outermost only), and every prefix module."""
        calls = self._calls
        bc = calls[self._first_calls()[b]]

        def around(k: int | None) -> bool:  # a call that contains the boundary's
            return k is None or (calls[k].start < bc.start and calls[k].end > bc.end)

        prefix = sorted({c.name for c in calls if c.end <= bc.end})
        before = []
        for c in calls:
            if c.end < bc.start and around(c.parent) and c.name not in before:
                before.append(c.name)
        return before, prefix

    def _eligible(self, cand: _Candidate) -> str | None:
        index = ModelIndex(self.model)
        for n in cand.params:
            if index.by_canonical[n].requires_grad:
                return f"{n} is trainable"
        before, _ = self._prefix(cand.b)
        modules = dict(self.model.named_modules())
        for top in [*before, cand.b]:
            for n, m in modules[top].named_modules(prefix=top):
                if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
                    return f"{n} has hooks, which would not run if it were skipped; remove them to let the Freezer skip it"
                own = m.__dict__.get("forward")
                if own is not None and not (isinstance(own, types.MethodType) and own.__func__ is _skip_forward):
                    return f"{n} has an instance forward; the Freezer skips only modules without one"
                if m.training and _mode_matters(m):
                    return (f"{n} ({type(m).__name__}) is in training mode (dropout or batch statistics stay on with "
                            "mode='norm'); freeze with mode='eval' to let the Freezer skip it")
            for pn, p in modules[top].named_parameters(prefix=top):
                if p.requires_grad:
                    return (f"{pn} runs before the boundary {cand.b} and is trainable; freeze it with the bottom "
                            "group to let the Freezer skip the prefix")
        return None

    def _sync(self) -> None:
        """Decide the boundary after a change; make, keep or drop levels."""
        if not self._dirty or not self._calls:
            return
        self._dirty = False
        first = self._first_calls()
        best, reason = None, "no group of the schedule is frozen"
        frozen = [c for c in self._candidates() if not self._eligible_params(c)]
        frozen.sort(key=lambda c: self._calls[first[c.b]].end, reverse=True)
        for i, c in enumerate(frozen):
            why = self._eligible(c)
            if why is None:
                best = c
                break
            if i == 0:
                reason = why

        def end(b: str) -> int:
            return self._calls[first[b]].end

        for b in list(self._levels):
            if best is None or end(b) > end(best.b):
                self._drop(b)
        self._cand = best
        if best is None:
            self._active, self._reason = None, reason
            if frozen:
                self._note(f"not skipping the frozen prefix: {reason}")
            return
        if best.b in self._refused:
            self._active, self._reason = None, self._refused[best.b]
            return
        below = sorted((b for b in self._levels if end(b) < end(best.b)), key=end)
        for b in below[:-1]:  # keep the nearest lower level only: the new one is computed from it
            self._drop(b)
        if best.b not in self._levels:
            before, prefix = self._prefix(best.b)
            level = _Level(self, best, before, prefix)
            self._levels[best.b] = level
            self._wrap([*before, best.b])
        self._active, self._reason = self._levels[best.b], None

    def _eligible_params(self, cand: _Candidate) -> bool:
        """Whether some parameter of the candidate's groups is trainable."""
        index = ModelIndex(self.model)
        return any(index.by_canonical[n].requires_grad for n in cand.params)

    def _drop(self, b: str) -> None:
        level = self._levels.pop(b)
        if level.cache.memory is not None:
            level.cache.memory.clear()
        if self._active is level:
            self._active = None

    def _wrap(self, names: list[str]) -> None:
        modules = dict(self.model.named_modules())
        for n in names:
            m = modules[n]
            if m not in _WRAPPED:
                m.__dict__["forward"] = types.MethodType(_skip_forward, m)
                _WRAPPED[m] = weakref.ref(self)
                self._wrapped.append(weakref.ref(m))

    def _lower(self, level: _Level) -> _Level | None:
        first = self._first_calls()
        end = self._calls[first[level.b]].end
        lower = [lv for lv in self._levels.values() if self._calls[first[lv.b]].end < end]
        return max(lower, key=lambda lv: self._calls[first[lv.b]].end) if lower else None

    # ---------------------------------------------------------------- forwards

    def _strip(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The call without the ``key=`` ids (the model never sees them)."""
        name = self.config["key"]
        if not isinstance(name, str):
            return args, kwargs
        kwargs = {k: v for k, v in kwargs.items() if k != name}
        args = tuple({k: v for k, v in a.items() if k != name} if isinstance(a, dict) else a for a in args)
        return args, kwargs

    def _plan(self, args: tuple[Any, ...], kwargs: dict[str, Any], **how: Any) -> _Plan:
        batch, length = _dims(args, kwargs, self.config["padding"])
        device = next((x.device for x in _leaves(args, kwargs) if isinstance(x, torch.Tensor)), torch.device("cpu"))
        return _Plan(batch, length, device, **how)

    def _pre(self, m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._stack:  # a forward this party runs itself
            return None
        plain = self._strip(args, kwargs)
        if self._entry is None and m is self.model and self._trace_handles:
            self._trace(*plain)
        if m is not self._entry:
            return plain
        self._sync()
        level = self._active
        if level is not None and level.unsafe() is not None:
            self._dirty = True
            self._sync()
            level = self._active
        if level is None:
            return plain
        if not level.proven and not self._prove(level, args, kwargs, plain):
            return plain
        with torch.no_grad():
            out = self._lookup(level, args, kwargs)
        self._migrate(level)
        self._stack.append(self._plan(*plain, serve=level, out=out, outer=True, entry=m))
        return plain

    def _lookup(self, level: _Level, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The boundary's output for a call from ``level``'s store (misses computed), counted."""
        c = level.cache
        hits, misses = c.hits, c.misses
        out = c(args, kwargs)
        self._hits += c.hits - hits
        self._misses += c.misses - misses
        return out

    def _compute(self, b: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The boundary ``b``'s output for a call (its cache's misses): from the
        level below when there is one, else from the input."""
        level = self._levels[b]
        lower = self._lower(level)
        out = None
        if lower is not None:
            out = lower.cache(args, kwargs)
        plan = self._plan(args, kwargs, serve=lower, out=out, stop=level.b_module)
        self._stack.append(plan)
        try:
            entry = self._entry
            assert entry is not None
            with torch.no_grad():
                entry(*args, **kwargs)
        except _Stop as stop:
            return stop.out
        finally:
            self._stack.remove(plan)
        raise RuntimeError(f"layerfreeze: the forward did not call {b}, the boundary it was learnt with")

    def _module_call(self, m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        plan = self._stack[-1] if self._stack else None
        if plan is not None and plan.serve is not None and not plan.served:
            if m is plan.serve.b_module:
                plan.served = True
                return plan.out
            if id(m) in plan.serve.before_ids:
                return self._placeholder(m, plan)
        out = type(m).forward(m, *args, **kwargs)
        if plan is not None and plan.stop is m and (plan.serve is None or plan.served):
            raise _Stop(out)
        return out

    def _placeholder(self, m: nn.Module, plan: _Plan) -> Any:
        name = next(n for n, x in self.model.named_modules() if x is m)
        spec, leaves = self._outs[name]
        tb, tl = self._trace_dims
        made = []
        for x in leaves:
            if isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], torch.dtype):
                shape = list(x[0])
                if shape and shape[0] == tb:
                    shape[0] = plan.batch
                if len(shape) > 1 and tl is not None and plan.length is not None and shape[1] == tl:
                    shape[1] = plan.length
                fill = float("nan") if x[1].is_floating_point or x[1].is_complex else 0
                t = torch.full((), fill, dtype=x[1], device=plan.device).expand(shape)
                if plan.track is not None:
                    plan.track[id(t)] = name
                    plan.keep.append(t)
                made.append(t)
            else:
                made.append(x)
        return _unflatten(spec, made)

    def _migrate(self, level: _Level) -> None:
        """Drop the level below once every sample it holds is stored at ``level`` too."""
        lower = self._lower(level)
        if lower is None or level.cache.stats().entries < lower.cache.stats().entries:
            return
        if lower.entries() <= level.entries():
            self._drop(lower.b)

    # ---------------------------------------------------------------- the proof

    def _prove(self, level: _Level, args: tuple[Any, ...], kwargs: dict[str, Any],
               plain: tuple[tuple[Any, ...], dict[str, Any]]) -> bool:
        """Run the batch fully and skipped; refuse the boundary if an output differs."""
        entry = self._entry
        assert entry is not None
        model = self.model
        readers: list[Any] = []
        plan = self._plan(*plain, serve=level, track={})
        try:
            with _untouched(model):
                self._stack.append(self._plan(*plain))
                try:
                    full = entry(*plain[0], **plain[1])
                finally:
                    self._stack.pop()
            with _untouched(model):
                plan.out = self._lookup(level, args, kwargs)
                handles = self._watch(level, plan, readers)
                self._stack.append(plan)
                try:
                    with _Readers(plan, readers):
                        skipped = entry(*plain[0], **plain[1])
                finally:
                    self._stack.pop()
                    for h in handles:
                        h.remove()
            why = _differ(full, skipped, plan, self.config["padding"], *plain)
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
        self._refused[level.b] = reason
        self._active, self._reason = None, reason
        if key not in self._warned:
            self._warned.add(key)
            self._note(reason)
        return False

    def _watch(self, level: _Level, plan: _Plan, readers: list[Any]) -> list[Any]:
        """Pre-hooks on modules outside the prefix: the first to receive a placeholder."""
        track = plan.track
        assert track is not None
        handles = []
        for name, m in self.model.named_modules():
            if name in level.prefix:
                continue

            def look(mod: nn.Module, args: Any, kwargs: Any, name: str = name) -> None:
                if plan.served and not readers:
                    hit = next((id(x) for x in _leaves(args, kwargs) if id(x) in track), None)
                    if hit is not None:
                        readers.extend([name, hit])

            handles.append(m.register_forward_pre_hook(look, with_kwargs=True))
        return handles


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

