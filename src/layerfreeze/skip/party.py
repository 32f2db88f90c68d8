"""The party: learns the order of the calls, decides the boundary, serves the
stored output and placeholders during a forward (see :mod:`layerfreeze.skip`)."""

from __future__ import annotations

import itertools
import sys
import threading
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..core import Change
from ..feature_cache.call import _positional_names
from ..feature_cache.layout import _flatten, _unflatten
from ..hooks import ModelHook, call_eagerly
from ..rules import _roots
from ..selectors import ModelIndex
from .levels import (
    _NESTED,
    GLOBAL_HOOKS,
    SkipStats,
    _around,
    _Call,
    _Candidate,
    _Level,
    _mode_matters,
    _obstacle,
    _Plan,
    _pre_hooked,
    _Stop,
    _Unseen,
    capturing,
    global_hooked,
)
from .proof import _dims, _leaves, _untouched, copied, prove

__all__ = ["SkipParty"]

class _SkipForward:
    """The instance ``forward`` of a prefix module: asks its party what to do. In a
    copy of the model (``copy.deepcopy``, ``torch.save``) it belongs to no party and
    runs the class's own forward."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return call_eagerly(self._call, args, kwargs)

    def _call(self, *args: Any, **kwargs: Any) -> Any:
        m = self.module
        ref = _WRAPPED.get(m)
        party = ref() if ref is not None else None
        if party is None:
            return type(m).forward(m, *args, **kwargs)
        return party._module_call(m, args, kwargs)

    def __reduce__(self) -> Any:
        return (_SkipForward, (self.module,))


_WRAPPED: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


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
        ('2', True, 6, 8)
    """

    def __init__(self, model: nn.Module, schedule: Any, config: dict[str, Any]) -> None:
        self._model = weakref.ref(model)
        self.schedule = schedule
        self.config = config
        self._positional: list[str] = []
        # each thread's forwards have their own plans; decisions and lookups take the lock
        self._local = threading.local()
        self._lock = threading.RLock()
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
        self._arm_mark: object | None = None  # the trace hooks now armed (see _arm)
        self._unseen_handles: list[Any] = []
        self._unseen_ran: str | None = None  # a module the learnt order lacks ran before the boundary
        self._unseen_call_args: Any = None  # ... in this call: the order is learnt again on it
        self._name_of: dict[int, str] = {}
        self._wrapped: list[weakref.ref[nn.Module]] = []
        self._watched: set[int] = set()
        # the module (hooks, an instance forward, training mode) that keeps the top frozen group from
        # being skipped: watched at every forward, so that skipping resumes once it is cleared
        self._blocker: tuple[nn.Module, str] | None = None  # the module, and what stands: see _blocks
        self._last_blocker: tuple[nn.Module, str] | None = None
        self._arm()

    @property
    def model(self) -> nn.Module:
        m = self._model()
        assert m is not None
        return m

    # what one thread's forward is doing
    @property
    def _stack(self) -> list[_Plan]:
        """The plans of this thread's forwards in progress (the party's own forwards nest)."""
        stack: list[_Plan] | None = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    @property
    def _proving(self) -> bool:
        """Whether the proof is looking samples up now (they are looked up again right after)."""
        return bool(getattr(self._local, "proving", False))

    @_proving.setter
    def _proving(self, value: bool) -> None:
        self._local.proving = value

    @property
    def _scans(self) -> dict[int, Any] | None:
        """Each level's walk over its tree during this forward (no module moves within one), else None."""
        return getattr(self._local, "scans", None)

    @_scans.setter
    def _scans(self, value: dict[int, Any] | None) -> None:
        self._local.scans = value

    @property
    def _memo(self) -> dict[int, tuple[int, list[torch.Tensor]]] | None:
        """Fingerprints read during this forward's lookup (no value moves within one), else None."""
        return getattr(self._local, "memo", None)

    @_memo.setter
    def _memo(self, value: dict[int, tuple[int, list[torch.Tensor]]] | None) -> None:
        self._local.memo = value

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
        self._disarm()
        for h in self._handles + self._unseen_handles:
            h.remove()
        self._handles.clear()
        self._unseen_handles.clear()
        for ref in self._wrapped:
            m = ref()
            if m is not None and isinstance(m.__dict__.get("forward"), _SkipForward):
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
        reason = self._reason
        if level is not None:  # an active level whose store keeps nothing saves nothing
            reason = level.bypass if level.bypass is not None and entries == 0 else None
        return SkipStats(cand.label if cand else None, cand.b if cand else None, cand.count if cand else 0,
                         level is not None and reason is None, reason, self._hits,
                         self._misses, mem, disk, entries)

    def _note(self, message: str, key: str | None = None) -> None:
        """Warn once per ``key`` (the message itself by default)."""
        key = message if key is None else key
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"layerfreeze: {message}", stacklevel=4)

    # ---------------------------------------------------------------- the order

    def _arm(self, thread: int | None = None) -> None:
        """Hooks that learn the order of the calls on the first forward.

        The model's own forward is watched from the start. While every parameter
        is trainable (nothing could be skipped yet) its first call is learnt as
        it runs; otherwise that call first runs the batch once more under hooks
        (no grad, same random state, buffers restored) and is then served like
        any later one. A forward
        that starts at a submodule instead (a trainer's step calling
        ``self.net(x)``) is learnt while it runs, and its module watched from then on.

        Until a forward starts, only the model and the modules that hold a group
        (the forwards that can start one worth learning) carry hooks; the first of them
        called hooks every module for the rest of its call. So a module called on its
        own before (``model.embed(ids)``, a frozen ``nn.TransformerEncoderLayer``) runs
        as without the Freezer: a hook on it or inside it would turn off PyTorch's fast
        paths.
        """
        model = self.model
        names: dict[int, str] = {}
        for name, m in model.named_modules():
            names.setdefault(id(m), name)
        holders = {""} | {".".join(r.split(".")[:k]) for r in self._group_roots() for k in range(1, r.count(".") + 1)}
        gates = [m for n, m in model.named_modules() if n in holders]
        gated = {id(g) for g in gates}
        # these hooks' own mark: a hook removed while a call runs is still called for that
        # call, and must then do nothing (the order may have been learnt meanwhile)
        arm = self._arm_mark = object()
        calls: list[_Call] = []
        outs: dict[str, tuple[Any, list[Any]]] = {}
        stack: list[int] = []
        count = itertools.count()
        me = weakref.ref(self)
        entry: list[Any] = []
        done: list[bool] = []
        failed: list[bool] = []  # a call inside the learnt one raised
        extra: list[Any] = []  # the hooks of the modules that are not gates, for one call
        # the thread whose forward is learnt (others run as they are): the first to call, or the one tracing
        owner: list[int] = [] if thread is None else [thread]
        padding = self.config["padding"]

        # both take their kwargs as optional: a hook removed while a call runs is
        # still called for that call, without them
        def pre(m: nn.Module, args: Any, kwargs: Any = None) -> None:
            if done or id(m) not in names:  # a copy of the model made before its first forward
                return
            party = me()
            if party is None or party._arm_mark is not arm:
                return
            if not owner:
                owner.append(threading.get_ident())
            if owner[0] != threading.get_ident():
                return
            if not stack and not entry:
                entry.append((m, _dims(args, kwargs or {}, padding)))
                for other in model.modules():  # hooked for the rest of this call
                    if id(other) not in gated:
                        extra.extend(hook(other))
            if entry:
                stack.append(len(calls))
                calls.append(_Call(names[id(m)], next(count), stack[-2] if len(stack) > 1 else None))

        def post(m: nn.Module, args: Any, *rest: Any) -> None:
            if done or not stack or id(m) not in names or owner[0] != threading.get_ident():
                return
            party = me()
            if party is None or party._arm_mark is not arm:
                return
            out = rest[-1]
            if out is None and sys.exc_info()[0] is not None:  # this call raised (before its pre-hook, maybe)
                failed.append(True)
            if failed and m is entry[0][0]:  # what was recorded is not the whole order: learn it next time
                for h in extra:
                    h.remove()
                for held in (extra, calls, stack, entry, failed):
                    held.clear()
                outs.clear()
                if thread is None:
                    owner.clear()
                return
            if failed:
                return
            c = calls[stack.pop()]
            c.end = next(count)
            if c.name not in outs and out is not None:
                leaves: list[Any] = []
                spec = _flatten(out, leaves)
                outs[c.name] = (spec, [_NESTED if isinstance(x, torch.Tensor) and x.is_nested
                                       else (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else x
                                       for x in leaves])
            if not stack:
                done.append(True)
                party._learnt(entry[0], calls, outs)

        def hook(m: nn.Module) -> list[Any]:
            handles = [m.register_forward_pre_hook(ModelHook(pre), with_kwargs=True),
                       m.register_forward_hook(ModelHook(post), with_kwargs=True, always_call=True)]
            self._trace_handles.extend(handles)
            return handles

        if id(model) not in self._watched:
            self._watch_entry(model)
        for m in gates:
            hook(m)

    def _disarm(self) -> None:
        """Remove the trace hooks; those still called for a call in flight do nothing."""
        for h in self._trace_handles:
            h.remove()
        self._trace_handles.clear()
        self._arm_mark = None

    def _watch_entry(self, module: nn.Module) -> None:
        self._watched.add(id(module))
        me = weakref.ref(self)

        def pre(m: nn.Module, args: Any, kwargs: Any) -> Any:
            party = me()
            return party._pre(m, args, kwargs) if party is not None else None

        def post(m: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
            party = me()
            if party is not None and party._stack and party._stack[-1].outer and party._stack[-1].entry is m:
                party._stack.pop()

        self._handles.append(module.register_forward_pre_hook(ModelHook(pre), with_kwargs=True))
        self._handles.append(module.register_forward_hook(ModelHook(post), with_kwargs=True, always_call=True))

    def _learnt(self, entry: tuple[nn.Module, tuple[int, int | None]], calls: list[_Call],
                outs: dict[str, tuple[Any, list[Any]]]) -> None:
        self._disarm()
        module, dims = entry
        if module is not self.model and not self._holds_a_group(calls[0].name, calls):
            # a direct call of a module with no group inside (model.embed(ids) to log
            # embeddings): nothing can be skipped in it, so the next forward is learnt
            self._arm()
            return
        self._entry, self._trace_dims, self._calls, self._outs = module, dims, calls, outs
        self._name_of = {id(m): n for n, m in reversed(list(self.model.named_modules()))}
        self._positional = _positional_names(type(module))
        if id(module) not in self._watched:
            self._watch_entry(module)
        me = weakref.ref(self)

        def unseen(m: nn.Module, args: Any) -> None:
            party = me()
            if party is not None:
                party._unseen_call(m)

        called = {c.name for c in calls}
        modules = dict(self.model.named_modules())
        for name, m in modules.items():
            if name in called:
                continue
            # a module inside one of PyTorch's own that was called (the projection that
            # MultiheadAttention reads the weights of) never runs on a path of its own; a hook
            # there would also turn off nn.TransformerEncoderLayer's fast path
            owner = name
            while owner and owner not in called:
                owner = owner.rpartition(".")[0]
            if owner in called and owner in modules and type(modules[owner]).__module__.startswith("torch.nn."):
                continue
            self._unseen_handles.append(m.register_forward_pre_hook(_Unseen(unseen)))
        self._dirty = True

    def _something_frozen(self) -> bool:
        return any(not p.requires_grad for p in self.model.parameters())

    def _trace(self, m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Learn the order on this batch, from ``m``'s own forward (see :meth:`_arm`)."""
        self._disarm()  # hooks of this thread's own, that no forward in flight records into
        self._arm(thread=threading.get_ident())
        with _untouched(self.model):
            self._stack.append(self._plan(args, kwargs))
            try:
                call_args, call_kwargs = copied(args, kwargs)
                m(*call_args, **call_kwargs)
            finally:
                self._stack.pop()

    def _relearn(self, why: str) -> None:
        """Forget the order, the levels and the refusals (a module of the prefix was
        replaced in the model): the next forward learns them again."""
        self._note(f"{why}; stored outputs dropped, the order of the modules is learnt again")
        for b in list(self._levels):
            self._drop(b)
        # the skipped modules keep their instance forwards (close() removes them): another
        # thread's forward in flight still routes them through its own plan
        self._disarm()
        for h in self._unseen_handles:
            h.remove()
        self._unseen_handles.clear()
        self._unseen_ran = self._unseen_call_args = None
        self._calls, self._outs, self._entry = [], {}, None
        self._refused.clear()
        self._active = self._cand = self._blocker = None
        self._dirty = True  # the caller learns the order at once (_trace): no hooks another thread could record into

    # ---------------------------------------------------------------- the boundary

    def _first_calls(self) -> dict[str, int]:
        first: dict[str, int] = {}
        for i, c in enumerate(self._calls):
            first.setdefault(c.name, i)
        return first

    def _groups(self) -> Iterator[list[tuple[str, Any]]]:
        """Each rule's groups, bottom first: (label, resolved selection)."""
        index = ModelIndex(self.model)
        for i, rule in enumerate(self.schedule.rules):
            yield rule.groups(index, origin=self.schedule.origin(i))

    def _group_roots(self) -> set[str]:
        """The outermost modules of every group of every rule, by name."""
        return {r for groups in self._groups() for _, res in groups for r in _roots(res.modules)}

    def _holds_a_group(self, name: str, calls: list[_Call]) -> bool:
        """Whether a forward of module ``name`` calls some group's module inside it."""
        called = {c.name for c in calls}
        inside = f"{name}." if name else ""
        return any(r in called and r.startswith(inside) and r != name for r in self._group_roots())

    def _candidates(self) -> list[_Candidate]:
        first = self._first_calls()
        out = []
        for groups in self._groups():
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
        if global_hooked():
            self._last_blocker = (self.model, "global")
            return GLOBAL_HOOKS
        index = ModelIndex(self.model)
        for n in cand.params:
            if index.by_canonical[n].requires_grad:
                return f"{n} is trainable"
        before, _ = self._prefix(cand.b)
        modules = dict(self.model.named_modules())
        for top in [*before, cand.b]:
            for n, m in modules[top].named_modules(prefix=top):
                why = _obstacle(n, m, self)
                if why is not None:
                    self._last_blocker = (m, "obstacle")
                    return why
                if m.training and _mode_matters(m):
                    self._last_blocker = (m, "mode")
                    return (f"{n} ({type(m).__name__}) is in training mode (dropout or batch statistics stay on with "
                            "mode='norm'); freeze with mode='eval' to let the Freezer skip it")
            for pn, p in modules[top].named_parameters(prefix=top):
                if p.requires_grad:
                    return (f"{pn} runs before the boundary {cand.b} and is trainable; freeze it with the bottom "
                            "group to let the Freezer skip the prefix")
        for m in _around(self, cand.b, modules):
            if _pre_hooked(m):
                self._last_blocker = (m, "prehook")
                name = self._name_of.get(id(m)) or "the model"
                return (f"{name} has a forward pre-hook, which may change what reaches the prefix; remove it to let "
                        "the Freezer skip the prefix")
        return None

    def _nested(self, cand: _Candidate) -> str | None:
        """Why the boundary's output, or a placeholder it needs, cannot be made: a nested
        tensor (``nn.TransformerEncoder``'s fast path in eval mode passes them between its
        layers) has no per-sample rows of one shape."""
        before, _ = self._prefix(cand.b)
        for n in [*before, cand.b]:
            got = self._outs.get(n)
            if got is not None and any(x is _NESTED for x in got[1]):
                return (f"{n} returns a nested tensor (the fast path of nn.TransformerEncoder in eval mode), "
                        "which has no rows to store; build the encoder with enable_nested_tensor=False, or "
                        "freeze it whole, to let the Freezer skip it")
        return None

    def _blocks(self, blocker: tuple[nn.Module, str]) -> bool:
        """Whether what kept the top group from being skipped still does."""
        m, kind = blocker
        if kind == "global":
            return global_hooked()
        if kind == "obstacle":
            return _obstacle("", m, self) is not None
        if kind == "mode":
            return m.training and _mode_matters(m)
        return _pre_hooked(m)

    def _sync(self) -> None:
        """Decide the boundary after a change; make, keep or drop levels."""
        if not self._dirty or not self._calls:
            return
        self._dirty = False
        first = self._first_calls()
        best, reason = None, "no group of the schedule is frozen"
        frozen = [c for c in self._candidates() if not self._trainable(c)]
        frozen.sort(key=lambda c: self._calls[first[c.b]].end, reverse=True)
        self._blocker = None
        for i, c in enumerate(frozen):
            self._last_blocker = None
            why = self._eligible(c)
            if why is None:
                up = self._climb(c)
                why = self._nested(up)
                if why is None:
                    best = up
                    break
            if i == 0:
                reason = why
                self._blocker = self._last_blocker

        def end(b: str) -> int:
            return self._calls[first[b]].end

        for b in list(self._levels):
            if best is None or end(b) > end(best.b):
                self._drop(b)
        self._cand = best if best is not None else (frozen[0] if frozen else None)  # what stands in the way
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
            level.settle()
        self._active, self._reason = self._levels[best.b], None

    def _climb(self, cand: _Candidate) -> _Candidate:
        """The outermost module around ``cand``'s boundary that is frozen through and
        through (a ``BertModel`` once its embeddings and every layer are frozen): its
        output is stored instead, so the code around the skipped layers (masks, the
        loop over layers) is skipped too. It stops below the module the forward starts
        at, a module whose forward calls one from outside its own tree, a module
        :meth:`_eligible` refuses, and a boundary the proof refused."""
        calls = self._calls
        c = calls[self._first_calls()[cand.b]]
        while c.parent is not None:
            p = calls[c.parent]
            if p.parent is None or p.name in self._refused:  # the forward's own module
                break
            inside = [x.name for x in calls if p.start < x.start and x.end < p.end]
            if any(not x.startswith(p.name + ".") for x in inside):
                break
            up = _Candidate(cand.label, cand.count, p.name, cand.params, cand.group_b or cand.b)
            if self._eligible(up) is not None:
                break
            cand, c = up, p
        return cand

    def _trainable(self, cand: _Candidate) -> bool:
        """Whether some parameter of the candidate's groups is trainable."""
        index = ModelIndex(self.model)
        return any(index.by_canonical[n].requires_grad for n in cand.params)

    def _drop(self, b: str) -> None:
        level = self._levels.pop(b)
        if self._scans is not None:  # its id may be taken by a new level within this forward
            self._scans.pop(id(level), None)
        if level.cache.memory is not None:
            level.cache.memory.clear()
        if self._active is level:
            self._active = None

    def _wrap(self, names: list[str]) -> None:
        modules = dict(self.model.named_modules())
        for n in names:
            m = modules[n]
            ref = _WRAPPED.get(m)
            if ref is None or ref() is None:  # unwrapped, or its party dropped without close()
                m.__dict__["forward"] = _SkipForward(m)
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
        return _Plan(batch, length, device, learnt=(self._name_of, self._outs, self._trace_dims), **how)

    def _pre(self, m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._stack:  # a forward this party runs itself
            return None
        with self._lock:
            self._memo, self._scans = {}, {}
            try:
                return self._start(m, args, kwargs)
            finally:
                self._memo = self._scans = None

    def _start(self, m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        plain = self._strip(args, kwargs)
        if self._entry is None and m is self.model and self._trace_handles and self._something_frozen():
            self._trace(m, *plain)  # else nothing can be skipped yet: this forward itself is learnt
        if m is not self._entry:
            return plain
        if self._blocker is not None and not self._blocks(self._blocker):
            self._dirty = True  # what stood in the way is gone
        self._sync()
        level = self._active
        gone = (level.replaced() if level is not None else None) or self._unseen_ran
        if gone is not None:
            call = self._unseen_call_args or plain  # the call that took the other path, if one did
            self._relearn(gone)
            self._trace(m, *call)
            self._sync()
            level = self._active
        if level is not None and level.unsafe() is not None:
            self._dirty = True
            self._sync()
            level = self._active
        if level is None:
            return plain
        if level.around_changed():
            level.proven = False  # a parameter around the prefix was frozen or unfrozen: prove again
        if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in _leaves(*plain)):
            self._note("not skipping the frozen prefix for a call whose input requires grad: gradients flow "
                       "through the prefix to it, so the full forward runs")
            return plain
        if not level.proven and torch.is_inference_mode_enabled():
            return plain  # the proof needs autograd (what feeds the prefix): it runs at the next forward outside
        if not level.proven and not prove(self, level, args, kwargs, plain):
            return plain
        with torch.no_grad():
            out = self._lookup(level, args, kwargs)
        self._migrate(level)
        self._stack.append(self._plan(*plain, serve=level, out=out, outer=True, entry=m, call=plain))
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
            call_args, call_kwargs = copied(args, kwargs)
            with torch.no_grad():
                entry(*call_args, **call_kwargs)
        except _Stop as stop:
            return stop.out
        finally:
            self._stack.remove(plan)
        raise RuntimeError(f"layerfreeze: the forward did not call {b}, the boundary it was learnt with")

    def _module_call(self, m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        plan = self._stack[-1] if self._stack else None
        if plan is not None and plan.serve is not None and not plan.served and not plan.handed and (
                m is plan.serve.b_module or id(m) in plan.serve.before_ids) and capturing(
                x for _, x in plan.serve.tree):
            plan.serve = None  # hooks record the prefix's outputs in this call: it runs in full
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

    def _unseen_call(self, m: nn.Module) -> None:
        """A module the learnt forward did not call is called: fine after the boundary
        or inside the prefix; before the boundary the order is learnt again, and this
        forward runs in full, or, when placeholders were already returned, fails."""
        plan = self._stack[-1] if self._stack else None
        if plan is None or plan.serve is None or plan.served or id(m) in plan.serve.tree_ids:
            return
        name = self._name_of.get(id(m)) or type(m).__name__
        self._unseen_call_args = plan.call
        self._unseen_ran = (f"{name} ran before the boundary {plan.serve.b}, but not in the forward the order "
                            "was learnt on")
        if not plan.handed:
            plan.serve = None  # nothing stands in for a prefix module yet: this forward runs in full
            return
        raise RuntimeError(
            f"layerfreeze: {self._unseen_ran}, and after modules of the prefix were skipped in this forward, so "
            "its values cannot be trusted. The Freezer learns the order again at the next forward: run this "
            "batch again (or learn the order on a batch that takes every path, with cache= set before the "
            "first forward)")

    def _placeholder(self, m: nn.Module, plan: _Plan) -> Any:
        plan.handed += 1
        name_of, outs, (tb, tl) = plan.learnt  # as learnt when this forward began (a relearn may follow)
        name = name_of[id(m)]
        spec, leaves = outs[name]
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
