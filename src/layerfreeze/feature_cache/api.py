"""The public face: :func:`cache`, :func:`precompute`, :func:`is_cached`."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .call import CacheStats, _FeatureCache, _StopForward

__all__ = ["cache", "is_cached", "precompute"]

_STORES = ("memory", "disk")


class _CachedMixin:
    """Methods added to a cached module's class (see :func:`cache`)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.__dict__["_lf_cache"](args, kwargs)

    def stats(self) -> CacheStats:
        """Hits, misses, bytes held in memory and on disk (see :class:`CacheStats`)."""
        return self.__dict__["_lf_cache"].stats()

    def clear_cache(self) -> None:
        """Forget every stored feature of the current weights (disk files of a
        temporary spill directory included; a ``path`` given by the user keeps
        its files, which stay valid for these weights)."""
        self.__dict__["_lf_cache"].invalidate()

    def verify_cache(self) -> bool:
        """Compare the weights' content with the fingerprint taken when the cache
        was filled; drop the cache if they differ. Returns whether it was valid."""
        return bool(self.__dict__["_lf_cache"].verify())


_CLASSES: dict[type, type] = {}


def _cached_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Cached{cls.__name__}", (_CachedMixin, cls), {"__module__": cls.__module__})
    return _CLASSES[cls]


def is_cached(module: nn.Module) -> bool:
    """Whether ``module`` was wrapped by :func:`cache`."""
    return "_lf_cache" in module.__dict__


def cache(
    module: nn.Module,
    *,
    store: str = "memory",
    max_bytes: int | None = None,
    path: str | os.PathLike[str] | None = None,
    verify_every: int = 100,
) -> nn.Module:
    """Cache a frozen submodule's output per sample: compute once, then look up.

    The module object itself is returned, its class swapped for a subclass
    whose ``forward`` consults the cache (as ``torch.nn.utils.parametrize``
    does), so parameter names, the state dict, ``isinstance`` checks and
    selectors are unchanged: ``model.bert = lf.cache(model.bert)`` is the same
    object as ``model.bert``.

    Args:
        module: the submodule to cache; it must be frozen in eval mode when
            called (``lf.freeze(model, "bert", mode="eval")``), otherwise it is
            computed normally with a warning.
        store: ``"memory"``: host memory (pinned when the module runs on CUDA);
            with ``max_bytes``, samples past the bound *spill to disk* (under
            ``path``, or a temporary directory removed when the cache goes).
            ``"disk"``: memory-mapped files under ``path``, written as features
            are produced, in a directory named by a hash of the weights: a new
            process with the same weights reuses them, changed weights do not.
        max_bytes: bound on feature bytes in memory (``"memory"``) or on disk
            (``"disk"``; past it, samples are computed and not stored).
        path: directory of the disk store (required for ``"disk"``).
        verify_every: take an exact fingerprint of the weights every this many
            calls to catch edits that bypass version counters (``.data``); 0
            turns it off.

    Returns:
        ``module``, now cached, with ``stats()``, ``clear_cache()`` and
        ``verify_cache()``.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
        ValueError: an unknown store, ``"disk"`` without ``path``, a bad
            ``max_bytes``, or a module that is already cached.

    Example:
        >>> import torch, torch.nn as nn, layerfreeze as lf
        >>> enc = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        >>> _ = lf.freeze(enc, mode="eval")
        >>> enc = lf.cache(enc)
        >>> x = torch.randn(6, 4)
        >>> torch.equal(enc(x), enc(x.flip(0)).flip(0))
        True
        >>> s = enc.stats(); (s.hits, s.misses)
        (6, 6)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"lf.cache expects an nn.Module, got {type(module).__name__}")
    if store not in _STORES:
        raise ValueError(f"store={store!r} is not one of 'memory', 'disk'")
    if store == "disk" and path is None:
        raise ValueError("store='disk' needs a directory: pass path=... (it is created if missing)")
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
        raise ValueError(f"max_bytes must be a non-negative int or None, got {max_bytes!r}")
    if not isinstance(verify_every, int) or verify_every < 0:
        raise ValueError(f"verify_every must be a non-negative int, got {verify_every!r}")
    if is_cached(module):
        raise ValueError(f"{type(module).__name__} is already cached; use that module as it is")
    if "forward" in module.__dict__:
        raise ValueError("the module has a per-instance forward attribute; cache a module without one")
    cls = type(module)
    original = cls.forward

    def run(*args: Any, **kwargs: Any) -> Any:
        return original(module_ref(), *args, **kwargs)

    module_ref = weakref.ref(module)
    module.__dict__["_lf_cache"] = _FeatureCache(
        module, run, store, max_bytes, None if path is None else os.fspath(path), verify_every
    )
    module.__class__ = _cached_class(cls)
    return module


def precompute(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool = True,
) -> dict[str, CacheStats]:
    """Fill every cache inside ``model`` with one pass over ``loader``.

    Runs under ``torch.no_grad()``. When each cache is called once per batch
    (checked on the first batch), the rest of the model's forward is skipped
    once the features are stored, so the pass costs about as much as running
    the cached modules alone, plus the rest of the model's forward on the
    first batch (the check).

    Args:
        model: a model holding modules wrapped by :func:`cache`.
        loader: an iterable of batches (a ``DataLoader``).
        forward: ``forward(model, batch)``; default ``model(**batch)`` for a
            dict batch and ``model(batch)`` otherwise.
        progress: show a progress bar (tqdm, else rich, if installed).

    Returns:
        Stats of each cache after the pass, by module name.

    Raises:
        ValueError: ``model`` holds no cached module, or a cached module is not
            frozen in eval mode (nothing is run then).
    """
    caches = {name: m.__dict__["_lf_cache"] for name, m in model.named_modules() if is_cached(m)}
    if not caches:
        raise ValueError("precompute: the model holds no cached module; wrap the frozen part first, "
                         "e.g. model.encoder = lf.cache(model.encoder)")
    for name, c in caches.items():
        reason = c._why_not([])
        if reason is not None:
            raise ValueError(f"precompute: cached module {name or '(root)'!r} cannot be cached: {reason}")
    if forward is None:
        def forward(m: nn.Module, batch: Any) -> Any:
            return m(**batch) if isinstance(batch, dict) else m(batch)
    for c in caches.values():
        c.verify()
    calls = {id(c): c.calls + c.bypassed for c in caches.values()}
    bar = _progress(loader, progress)
    early = False
    try:
        with torch.no_grad():
            for i, batch in enumerate(bar):
                try:
                    forward(model, batch)
                except _StopForward:
                    pass
                if i == 0:
                    once = all(c.calls + c.bypassed - calls[id(c)] == 1 for c in caches.values())
                    early = once and len(caches) == 1
                    for c in caches.values():
                        c.stop_after = early
    finally:
        for c in caches.values():
            c.stop_after = False
        close = getattr(bar, "close", None)
        if callable(close):
            close()
    return {name: c.stats() for name, c in caches.items()}


def _progress(loader: Iterable[Any], enabled: bool) -> Iterable[Any]:
    if not enabled:
        return loader
    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    try:
        from tqdm.auto import tqdm

        return tqdm(loader, total=total, desc="precompute", leave=False)
    except ImportError:
        pass
    try:
        from rich.progress import track

        return track(loader, total=total, description="precompute")
    except ImportError:
        return loader
