"""Selectors: the one place that turns what a user wrote into parameter names.

Every selector form (a name, a glob, an index or slice, ``re:``, ``type:``, a
module class, a callable) is parsed once here into a matcher, and every other
module of layerfreeze asks :func:`resolve` which parameters and modules a
selector picks. Nothing else parses names.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import torch
from torch import nn

from .errors import ArgumentTypeError, SelectorError, SelectorTypeError

__all__ = ["Selector", "SelectorLike", "ModelIndex", "Resolution", "resolve", "select", "unwrap"]

Selector: TypeAlias = str | type | Callable[[str, nn.Module], bool]
SelectorLike: TypeAlias = Selector | Sequence[Selector]


def unwrap(model: object) -> nn.Module:
    """Return the module whose names the user wrote.

    ``DistributedDataParallel``, ``DataParallel`` and ``torch.compile`` wrap a
    model and prefix its names (``module.``, ``_orig_mod.``); selectors are
    always written against the inner model.

    Raises:
        ArgumentTypeError: if ``model`` is not an ``nn.Module`` (also a ``TypeError``).
    """
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(
            f"expected a torch.nn.Module, got {type(model).__name__}; "
            "pass the model itself (not its state_dict or parameters())"
        )
    module: nn.Module = model
    while True:
        inner = getattr(module, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(inner, nn.Module):
            module = inner
            continue
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
            continue
        return module


class ModelIndex:
    """Names of one model's modules and parameters, built once per call.

    Shared (tied) parameters and modules are reachable under every name they
    are registered as, but each parameter has one canonical name: the first
    under which ``model.named_parameters()`` yields it.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = unwrap(model)
        self.modules: dict[str, nn.Module] = dict(self.model.named_modules(remove_duplicate=False))
        self.params: dict[str, nn.Parameter] = dict(
            self.model.named_parameters(remove_duplicate=False)
        )
        self.canonical: dict[int, str] = {}
        for name, p in self.params.items():
            self.canonical.setdefault(id(p), name)
        self.order: list[str] = list(dict.fromkeys(self.canonical[id(p)] for p in self.params.values()))
        self.position = {name: i for i, name in enumerate(self.order)}
        self.by_canonical: dict[str, nn.Parameter] = {n: self.params[n] for n in self.order}

    def names(self) -> list[str]:
        """Every module and parameter name, for suggestions."""
        return [n for n in self.modules if n] + list(self.params)

    def subtree_params(self, module_name: str) -> Iterator[str]:
        module = self.modules[module_name]
        prefix = f"{module_name}." if module_name else ""
        for name, _ in module.named_parameters(prefix=prefix.rstrip("."), remove_duplicate=False):
            yield name

    def subtree_modules(self, module_name: str) -> Iterator[str]:
        module = self.modules[module_name]
        for name, _ in module.named_modules(prefix=module_name, remove_duplicate=False):
            yield name


@dataclass(frozen=True)
class Resolution:
    """What a set of selectors picked in one model.

    Attributes:
        params: canonical names of the selected parameters, in model order.
        modules: names of modules wholly inside the selection (matched
            subtrees, less excluded subtrees and modules keeping any of their
            own parameters out of the selection), in model order.
    """

    params: list[str]
    modules: list[str]


# --------------------------------------------------------------------------- parsing

_SEGMENT = re.compile(r"^(?P<name>[^\[\]]*)(?P<brackets>(?:\[[^\[\]]*\])*)$")
_BRACKET = re.compile(r"\[([^\[\]]*)\]")
_INDEX = re.compile(r"^\s*(-?\d+)\s*$")
_SLICE = re.compile(r"^\s*(-?\d+)?\s*:\s*(-?\d+)?\s*(?::\s*(-?\d+)?\s*)?$")


@dataclass(frozen=True)
class _Segment:
    name: str  # a glob on one name segment, "**", or "" (brackets only)
    picks: tuple[int | slice, ...]  # index/slice applied to children, in order


class _Matcher:
    """A parsed selector: yields the module and parameter names it matches."""

    def match(self, index: ModelIndex) -> tuple[list[str], list[str]]:  # pragma: no cover
        raise NotImplementedError

    def suggestions(self, index: ModelIndex) -> list[str]:
        return []


class _PathMatcher(_Matcher):
    def __init__(self, text: str, segments: tuple[_Segment, ...]) -> None:
        self.text = text
        self.segments = segments

    def match(self, index: ModelIndex) -> tuple[list[str], list[str]]:
        nodes: list[str] = [""]
        params: list[str] = []
        last = len(self.segments) - 1
        for i, seg in enumerate(self.segments):
            nxt: list[str] = []
            if seg.name == "**":
                for node in nodes:
                    nxt.extend(index.subtree_modules(node))
            elif seg.name:
                for node in nodes:
                    module = index.modules[node]
                    prefix = f"{node}." if node else ""
                    for child, sub in module._modules.items():
                        if sub is not None and fnmatch.fnmatchcase(child, seg.name):
                            nxt.append(prefix + child)
                    if i == last and not seg.picks:
                        for pname, p in module._parameters.items():
                            if p is not None and fnmatch.fnmatchcase(pname, seg.name):
                                params.append(prefix + pname)
                        params.extend(_originals(module, prefix, seg.name))
            else:
                nxt = list(nodes)
            for pick in seg.picks:
                nxt = self._pick(index, nxt, pick)
            nodes = list(dict.fromkeys(nxt))
        return nodes if self.segments else [], params

    def _pick(self, index: ModelIndex, nodes: list[str], pick: int | slice) -> list[str]:
        out: list[str] = []
        for node in nodes:
            module = index.modules[node]
            children = [(n, m) for n, m in module._modules.items() if m is not None]
            prefix = f"{node}." if node else ""
            label = node or "the model"
            if not children:
                raise SelectorError(
                    f"{self.text!r}: {label} ({type(module).__name__}) has no child modules to index",
                    selector=self.text,
                )
            if isinstance(pick, int):
                if not -len(children) <= pick < len(children):
                    raise SelectorError(
                        f"{self.text!r}: index {pick} is out of range for {label}, "
                        f"which has {len(children)} children (valid: {-len(children)}..{len(children) - 1})",
                        selector=self.text,
                    )
                out.append(prefix + children[pick][0])
            else:
                out.extend(prefix + n for n, _ in children[pick])
        return out

    def suggestions(self, index: ModelIndex) -> list[str]:
        plain = re.sub(r"\[[^\]]*\]", "", self.text).replace("**.", "").replace("*", "")
        return difflib.get_close_matches(plain, index.names(), n=3, cutoff=0.5) or difflib.get_close_matches(
            self.text, index.names(), n=3, cutoff=0.3
        )


def _originals(module: nn.Module, prefix: str, pattern: str) -> list[str]:
    """Names of the parameters behind a parametrized tensor's visible name.

    ``weight_norm`` and other parametrizations replace ``weight`` by a computed
    attribute and keep the stored tensors elsewhere
    (``parametrizations.weight.original0``; ``weight_g``/``weight_v`` for the
    old hook-based ``torch.nn.utils.weight_norm``): the visible name selects those.
    """
    out: list[str] = []
    plists = module._modules.get("parametrizations")
    if isinstance(plists, nn.ModuleDict):
        for key, plist in plists.items():
            if fnmatch.fnmatchcase(key, pattern):
                out += [n for n, _ in plist.named_parameters(prefix=f"{prefix}parametrizations.{key}",
                                                             remove_duplicate=False)]
    for hook in module._forward_pre_hooks.values():
        name = getattr(hook, "name", None)
        if type(hook).__name__ == "WeightNorm" and isinstance(name, str) and fnmatch.fnmatchcase(name, pattern):
            out += [prefix + n for n in (f"{name}_g", f"{name}_v") if module._parameters.get(n) is not None]
    return out


class _RegexMatcher(_Matcher):
    def __init__(self, text: str, pattern: re.Pattern[str]) -> None:
        self.text = text
        self.pattern = pattern

    def match(self, index: ModelIndex) -> tuple[list[str], list[str]]:
        modules = [n for n in index.modules if n and self.pattern.fullmatch(n)]
        params = [n for n in index.params if self.pattern.fullmatch(n)]
        return modules, params

    def suggestions(self, index: ModelIndex) -> list[str]:
        hits = [n for n in index.names() if self.pattern.search(n)]
        if hits:  # it matches somewhere, just not in full: show where
            return hits[:3]
        return difflib.get_close_matches(self.pattern.pattern, index.names(), n=3, cutoff=0.3)


class _TypeMatcher(_Matcher):
    def __init__(self, text: str, cls: type | None = None, name: str | None = None) -> None:
        self.text = text
        self.cls = cls
        self.name = name

    def _hit(self, module: nn.Module) -> bool:
        if self.cls is not None:
            return isinstance(module, self.cls)
        for klass in type(module).__mro__:
            if self.name in (klass.__name__, f"{klass.__module__}.{klass.__qualname__}"):
                return True
        return False

    def match(self, index: ModelIndex) -> tuple[list[str], list[str]]:
        return [n for n, m in index.modules.items() if self._hit(m)], []

    def suggestions(self, index: ModelIndex) -> list[str]:
        present = sorted({type(m).__name__ for m in index.modules.values()})
        wanted = self.cls.__name__ if self.cls is not None else (self.name or "")
        return [f"type:{n}" for n in difflib.get_close_matches(wanted, present, n=3, cutoff=0.4)]


class _CallableMatcher(_Matcher):
    def __init__(self, fn: Callable[[str, nn.Module], bool]) -> None:
        self.fn = fn
        self.text = getattr(fn, "__qualname__", repr(fn))

    def match(self, index: ModelIndex) -> tuple[list[str], list[str]]:
        hits = []
        for name, module in index.modules.items():
            try:
                hit = bool(self.fn(name, module))
            except Exception as exc:
                # a bug in the user's function must not pass for "no match",
                # nor escape without saying which selector and module it hit
                where = f"module {name!r}" if name else "the root module ''"
                kind = SelectorTypeError if isinstance(exc, TypeError) else SelectorError
                raise kind(
                    f"callable selector {self.text!r} raised {type(exc).__name__} on {where} "
                    f"({type(module).__name__}): {exc}; a callable selector takes (name, module) "
                    "and returns a bool",
                    selector=self.fn,
                ) from exc
            if hit:
                hits.append(name)
        return hits, []


@functools.lru_cache(maxsize=1024)
def _parse_string(text: str) -> _Matcher:
    if not text.strip():
        raise SelectorError(
            "an empty selector matches nothing; pass no selector at all to mean the whole model",
            selector=text,
        )
    if text.startswith("re:"):
        try:
            return _RegexMatcher(text, re.compile(text[3:]))
        except re.error as exc:
            raise SelectorError(f"{text!r} is not a valid regular expression: {exc}", selector=text) from None
    if text.startswith("type:"):
        name = text[5:].strip()
        if not name:
            raise SelectorError(f"{text!r} names no class; write e.g. 'type:BatchNorm2d'", selector=text)
        return _TypeMatcher(text, name=name)
    segments = []
    for raw in text.split("."):
        m = _SEGMENT.match(raw)
        if m is None or (not m.group("name") and not m.group("brackets")):
            raise SelectorError(
                f"{text!r} is not a valid name pattern (bad segment {raw!r}); names are dotted, "
                "'*' is one segment, '**' any number, '[i]' or '[a:b]' picks children",
                selector=text,
            )
        picks: list[int | slice] = []
        for body in _BRACKET.findall(m.group("brackets")):
            if (im := _INDEX.match(body)) is not None:
                picks.append(int(im.group(1)))
            elif (sm := _SLICE.match(body)) is not None:
                start, stop, step = (int(g) if g else None for g in sm.groups())
                if step == 0:
                    raise SelectorError(f"{text!r}: slice step cannot be zero", selector=text)
                picks.append(slice(start, stop, step))
            else:
                raise SelectorError(
                    f"{text!r}: [{body}] is neither an index like [3] nor a slice like [0:6] or [-2:]",
                    selector=text,
                )
        name = m.group("name")
        if name == "**" and picks:
            raise SelectorError(f"{text!r}: '**' cannot be indexed; index a named container", selector=text)
        segments.append(_Segment(name, tuple(picks)))
    return _PathMatcher(text, tuple(segments))


def _compile(selector: object) -> _Matcher:
    if isinstance(selector, str):
        return _parse_string(selector)
    if isinstance(selector, type):
        if not issubclass(selector, nn.Module):
            raise SelectorTypeError(
                f"class {selector.__name__} is not an nn.Module subclass; "
                "a class selector picks modules of that class",
                selector=selector,
            )
        return _TypeMatcher(selector.__name__, cls=selector)
    if isinstance(selector, (nn.Module, torch.Tensor)):
        raise SelectorTypeError(
            f"a {type(selector).__name__} object is not a selector; "
            "select it by its name in the model (see lf.summary(model)) or by its class",
            selector=selector,
        )
    if callable(selector):
        return _CallableMatcher(selector)
    raise SelectorTypeError(
        f"{selector!r} ({type(selector).__name__}) is not a selector; use a name or glob string, "
        "'re:<regex>', 'type:<Class>', an nn.Module class, or a callable (name, module) -> bool",
        selector=selector,
    )


def _flatten(selectors: Iterable[object]) -> list[object]:
    out: list[object] = []
    for s in selectors:
        if isinstance(s, (list, tuple)):
            out.extend(_flatten(s))
        else:
            out.append(s)
    return out


def _as_list(selectors: object) -> list[object]:
    if selectors is None:
        return []
    if isinstance(selectors, (list, tuple)):
        return _flatten(selectors)
    return [selectors]


def _match_one(
    index: ModelIndex, selector: object, origin: str | None
) -> tuple[list[str], list[str]]:
    try:
        matcher = _compile(selector)
        modules, params = matcher.match(index)
    except SelectorError as exc:
        if exc.origin is None:
            # keep the cause (an error raised inside a callable selector)
            raise type(exc)(
                str(exc), selector=selector, origin=origin, suggestions=exc.suggestions
            ) from exc.__cause__
        raise
    if not modules and not params:
        shown = selector if isinstance(selector, str) else getattr(selector, "__name__", repr(selector))
        raise SelectorError(
            f"selector {shown!r} matches nothing in {type(index.model).__name__}",
            selector=selector,
            origin=origin,
            suggestions=matcher.suggestions(index),
        )
    return modules, params


def resolve(
    model: nn.Module | ModelIndex,
    selectors: Sequence[object],
    exclude: object = (),
    *,
    origin: str | None = None,
    default_all: bool = True,
) -> Resolution:
    """Resolve selectors (and exclusions) against a model.

    Args:
        model: the model, or a prebuilt :class:`ModelIndex`.
        selectors: selectors; no selector means the whole model when
            ``default_all`` is true; an explicit empty list selects nothing.
        exclude: a selector or sequence of selectors to take back out.
        origin: how to name the selectors' source in errors (e.g. a rule or
            a command-line option); None names only the selector, and its
            position (``selector 2 of 3``) when there are several.

    Raises:
        SelectorError: a selector is malformed or matches nothing, or
            ``exclude`` removes every selected parameter.
    """
    index = model if isinstance(model, ModelIndex) else ModelIndex(model)
    items = _flatten(selectors)
    picked_params: set[str] = set()
    module_roots: list[str] = []
    if not items:
        if not default_all:
            raise SelectorError("no selector given", origin=origin)
        if selectors:
            # an explicit empty list (``lf.freeze(net, [])``, a list computed
            # elsewhere that came out empty) selects nothing, not everything
            for i, sel in enumerate(_as_list(exclude), start=1):
                _match_one(index, sel, f"exclude {i}")
            return Resolution(params=[], modules=[])
        module_roots = [""]
    for i, sel in enumerate(items, start=1):
        if len(items) == 1:
            where = origin
        else:
            where = f"selector {i} of {len(items)}" if origin is None else f"{origin} {i}"
        mods, params = _match_one(index, sel, where)
        module_roots.extend(mods)
        picked_params.update(params)

    excl_items = _as_list(exclude)
    excl_params: set[str] = set()
    excl_roots: list[str] = []
    for i, sel in enumerate(excl_items, start=1):
        where = f"exclude {i}" if len(excl_items) > 1 else "exclude"
        mods, params = _match_one(index, sel, where)
        excl_roots.extend(mods)
        excl_params.update(params)

    chosen_modules: set[str] = set()
    for root in module_roots:
        picked_params.update(index.subtree_params(root))
        chosen_modules.update(index.subtree_modules(root))
    excluded_modules: set[str] = set()
    for root in excl_roots:
        excl_params.update(index.subtree_params(root))
        excluded_modules.update(index.subtree_modules(root))

    selected_ids = {id(index.params[n]) for n in picked_params}
    excluded_ids = {id(index.params[n]) for n in excl_params}
    final_ids = selected_ids - excluded_ids
    if selected_ids and not final_ids:
        raise SelectorError(
            "exclude= removes every parameter the selectors picked; nothing would change. "
            "Narrow the exclusion or widen the selection",
            selector=items,
            origin="exclude",
        )
    params = sorted({index.canonical[i] for i in final_ids}, key=index.position.__getitem__)

    modules = []
    for name in index.modules:
        if name not in chosen_modules or name in excluded_modules:
            continue
        own = [p for p in index.modules[name]._parameters.values() if p is not None]
        if all(id(p) in final_ids for p in own):
            modules.append(name)
    return Resolution(params=params, modules=list(dict.fromkeys(modules)))


def select(model: nn.Module, *selectors: object, exclude: object = ()) -> list[str]:
    """Names of the parameters the selectors pick, in model order.

    Each shared (tied) parameter appears once, under the first name
    ``model.named_parameters()`` gives it. With no selector, every parameter.

    Args:
        model: the model (a DDP or compiled wrapper is looked through).
        *selectors: names, globs (``*`` one segment, ``**`` any), index or
            slice (``"encoder.layer[-2:]"``), ``"re:<regex>"`` (full match),
            ``"type:<Class>"``, an ``nn.Module`` class, or ``(name, module) -> bool``.
            The visible name of a parametrized tensor (``"0.weight"`` after
            ``weight_norm``) selects the tensors stored behind it. No selector
            means every parameter; an explicit empty list (``select(net, [])``)
            selects none.
        exclude: a selector or a sequence of them to leave out.

    Returns:
        list[str]: canonical parameter names.

    Raises:
        SelectorError: a selector is malformed or matches nothing.

    Example:
        >>> import torch.nn as nn, layerfreeze as lf
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> lf.select(net, "[0]")
        ['0.weight', '0.bias']
        >>> lf.select(net, nn.Linear, exclude="**.bias")
        ['0.weight', '2.weight']
    """
    return resolve(model, selectors, exclude).params
