"""The public face: :func:`cache`, :func:`precompute`, :func:`is_cached`."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..errors import CacheError, CacheTypeError
from .call import CacheStats, _FeatureCache, _StopForward

__all__ = ["cache", "is_cached", "precompute"]

_STORES = ("memory", "disk")


def _cached_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return self.__dict__["_lf_cache"](args, kwargs)


_COMPILE_SAFE: list[Any] = []


def _compile_safe_forward() -> Any:
    """The cached forward, hidden from ``torch.compile``: a compiled model calls it
    as one graph break, and the compiler never traces (nor recompiles for) a lookup."""
    if not _COMPILE_SAFE:
        _COMPILE_SAFE.append(torch.compiler.disable(_cached_forward, recursive=True))
    return _COMPILE_SAFE[0]


def _new_cached(base: type) -> nn.Module:
    """Unpickling: an empty module of the cached class (``__setstate__`` fills it)."""
    obj: nn.Module = object.__new__(_cached_class(base))
    return obj


class _CachedMixin:
    """Methods added to a cached module's class (see :func:`cache`)."""

    _lf_base: type

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return _cached_forward(self, *args, **kwargs)  # type: ignore[arg-type]

    def stats(self) -> CacheStats:
        """Hits, misses, bytes held in memory and on disk (see :class:`CacheStats`)."""
        return self.__dict__["_lf_cache"].stats()

    def clear_cache(self) -> None:
        """Forget every stored feature of the current weights (disk files of a
        temporary spill directory included; a ``path`` given by the user keeps
        its files, which stay valid for these weights)."""
        with self.__dict__["_lf_cache"].lock:
            self.__dict__["_lf_cache"].invalidate()

    def verify_cache(self) -> bool:
        """Check the weights' content and the module tree against what they were
        when the cache was filled; drop the cache if they differ. Returns whether
        it was valid."""
        with self.__dict__["_lf_cache"].lock:
            return bool(self.__dict__["_lf_cache"].verify())

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Pickling (torch.save) and copy.deepcopy keep the module and the cache's
        # settings, never the features: the copy gets a new, empty cache of its own
        # (a disk store re-opens its path and finds what is stored there).
        state = dict(self.__dict__)
        config = state.pop("_lf_cache").config
        state["_lf_cache_config"] = config
        return (_new_cached, (type(self)._lf_base,), state)

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        config = state.pop("_lf_cache_config")
        base = type(self)._lf_base
        base.__setstate__(self, state)  # type: ignore[attr-defined]
        self.__dict__["_lf_cache"] = _FeatureCache(self, base, config)  # type: ignore[arg-type]


_CLASSES: dict[type, type] = {}


def _cached_class(cls: type) -> type:
    if cls not in _CLASSES:
        # The same module, name and qualified name as the class it extends: libraries
        # that look things up by the class's name (transformers keys the outputs a
        # model can record by ``str(type(model))``) find what they know, and the
        # module's repr is unchanged. The object stays a distinct subclass.
        _CLASSES[cls] = type(cls.__name__, (_CachedMixin, cls),
                             {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "_lf_base": cls,
                              "forward": _compile_safe_forward()})
    return _CLASSES[cls]


def is_cached(module: nn.Module) -> bool:
    """Whether ``module`` was wrapped by :func:`cache`.

    Example:
        >>> import torch.nn as nn, layerfreeze as lf
        >>> from layerfreeze.feature_cache import is_cached
        >>> is_cached(lf.cache(nn.Linear(2, 2))), is_cached(nn.Linear(2, 2))
        (True, False)
    """
    return "_lf_cache" in module.__dict__


def cache(
    module: nn.Module,
    *,
    store: str = "memory",
    max_bytes: int | None = None,
    path: str | os.PathLike[str] | None = None,
    verify_every: int = 100,
    padding: str | None = "attention_mask",
    pad_value: float | int | None = None,
    key: str | Callable[[tuple[Any, ...], dict[str, Any]], Any] | None = None,
    batch_dim: int | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Cache a frozen submodule's output per sample: compute once, then look up.

    The module object itself is returned, its class swapped for a subclass
    whose ``forward`` consults the cache (as ``torch.nn.utils.parametrize``
    does), so parameter names, the state dict, ``isinstance`` checks and
    selectors are unchanged: ``model.bert = lf.cache(model.bert)`` is the same
    object as ``model.bert``.

    **The contract.** A hit returns what a fresh forward of the current module
    gives for that sample, equal up to floating-point reduction order (another
    batch composition may round differently; with ``dtype=`` up to that
    dtype's rounding). Otherwise the call computes normally and warns once why.
    The cache is used only while the module is fully frozen, every submodule in
    eval mode (``lf.freeze(..., mode="eval")``) and no input requires grad.

    **Keys.** A sample is recognised by content (BLAKE2b-128 of its rows and of
    the call's other arguments, dtypes and shapes; see
    :mod:`layerfreeze.feature_cache.keys`) or, with ``key=``, by an id the
    loader gives. Shuffled batches, other batch sizes and a short last batch
    hit. **Padding**: when the call carries an ``attention_mask`` (a keyword or
    an entry of a dict argument), each sample is keyed and stored by its real
    tokens only, so a sentence padded to 17 tokens in one batch and to 40 in
    the next is one entry; outputs come back padded to the batch's length, real
    positions holding the module's values and *padded positions holding 0*.
    A sample's pad offset (left padding) is part of its key.

    **The first check.** Before anything of a call signature is stored, a few
    samples of a batch are computed on their own (with one more padded position
    when padded) and compared with the batch: if they differ, rows are not
    independent along ``batch_dim`` and the signature is never cached (a
    warning names the module); if only the extra padding changes them, samples
    are keyed with their padding. This costs one forward of two samples per
    signature; until a batch with two new samples arrives nothing is stored.

    **Validity.** Every call compares module and tensor objects, data pointers,
    in-place version counters, submodule classes, instance forwards and hooks:
    optimizer steps, ``load_state_dict``, ``param.data = ...``, Freezer
    transitions and swapped submodules empty the cache before the next lookup.
    Edits that no version counter sees (``p.data.copy_(ema)``) and changed
    plain attributes of submodules (``act.negative_slope = 0.3``) or forward
    code are caught by a deep check (exact weight fingerprints and a digest of
    the module tree) that runs when the cache is first filled, *before serving
    any sample a second time since the last deep check* (so at least once per
    epoch of a loop that revisits its samples), every ``verify_every`` calls and
    on ``verify_cache()``. Such an edit is therefore served stale at most once
    per sample, and never after ``verify_every`` calls. Under a
    :class:`~layerfreeze.Freezer` with its guard on, such an edit of the
    frozen weights raises :class:`~layerfreeze.FrozenParameterChanged` after
    the next optimizer step; accepting a deliberate edit with
    ``Freezer.refresh()`` also checks every cache in the model, which drops
    features of the old weights.

    **Copies.** ``copy.deepcopy`` and pickling (``torch.save(model)``) keep
    the settings, not the features: the copy starts with an empty cache of its
    own (a disk store re-opens its ``path``). Calls are thread-safe (one lock
    per cache).

    Args:
        module: the submodule to cache.
        store: ``"memory"``: host memory (pinned when the module runs on CUDA;
            kept on the GPU when ``max_bytes`` is given and the rows fit; that
            path is not yet tested on a GPU); with ``max_bytes``, samples past
            the bound *spill to disk* (under ``path``, or a temporary directory
            removed when the cache goes). ``"disk"``: memory-mapped files under
            ``path`` in a directory named by a hash of the weights and module
            tree, shared safely by processes on one machine (see
            :mod:`layerfreeze.feature_cache.disk`).
        max_bytes: bound on feature bytes in memory (``"memory"``) or on disk
            (``"disk"``; past it, samples are computed and not stored).
        path: directory of the disk store (required for ``"disk"``).
        verify_every: run the deep check every this many calls; 0 leaves only
            the other occasions.
        padding: the keyword argument (or dict entry) that tells real tokens
            apart: a ``[batch, length]`` mask (nonzero: real) or ``[batch]``
            lengths (right padding). None: never read padding.
        pad_value: when no such argument is given: the value that marks
            padding in the first tensor argument with a token dimension
            (``input_ids`` with pad id 0: ``pad_value=0``).
        key: take sample ids from the loader instead of hashing content: the
            name of a keyword argument (or dict entry) holding one id per
            sample (ints, strings, or a 1-D integer tensor), removed before the
            module is called (ids passed by position, to a ``forward`` with a
            parameter of that name, are read and left in place), or
            ``key(args, kwargs) -> ids``. The ids are trusted: one id must always
            mean the same input.
        batch_dim: the batch axis of the arguments and outputs. Default 0, or
            1 for a PyTorch layer built with ``batch_first=False``.
        dtype: store floating outputs in this dtype (``torch.bfloat16`` halves
            memory; hits are then rounded to it); default exact.

    Returns:
        ``module``, now cached, with ``stats()``, ``clear_cache()`` and
        ``verify_cache()``.

    Raises:
        CacheTypeError: ``module`` is not an ``nn.Module`` (a ``TypeError``).
        CacheError: an unknown store, ``"disk"`` without ``path``, a bad
            ``max_bytes``/``verify_every``/``batch_dim``/``dtype``, or a module
            that is already cached (a ``ValueError``).

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
        raise CacheTypeError(f"lf.cache expects an nn.Module, got {type(module).__name__}")
    config = cache_config(store=store, max_bytes=max_bytes, path=path, verify_every=verify_every, padding=padding,
                          pad_value=pad_value, key=key, batch_dim=batch_dim, dtype=dtype)
    if is_cached(module):
        raise CacheError(f"{type(module).__name__} is already cached; use that module as it is")
    if "forward" in module.__dict__:
        raise CacheError("the module has a per-instance forward attribute; cache a module without one")
    base = type(module)
    module.__dict__["_lf_cache"] = _FeatureCache(module, base, config)
    module.__class__ = _cached_class(base)
    return module


def _unusable(path: Any) -> str | None:
    """Why ``path`` cannot be a disk store's directory, or None (it is created then, as the store would)."""
    try:
        text = os.fspath(path)
    except TypeError:
        return f"path must be a str or os.PathLike, got {type(path).__name__}"
    if not isinstance(text, str) or not text:
        return "path is empty: pass the directory to keep the stored features in (it is created if missing)"
    if os.path.exists(text) and not os.path.isdir(text):
        return f"path {text!r} exists and is not a directory; pass a directory (it is created if missing)"
    try:  # made now, as the store would: what access() cannot tell (a root process, /proc) shows here
        os.makedirs(text, exist_ok=True)
    except OSError as e:
        return f"path {text!r} cannot be created ({e.strerror or e}); pass a writable directory"
    return None if os.access(text, os.W_OK | os.X_OK) else f"path {text!r} is not writable"


def cache_config(
    *,
    store: str = "memory",
    max_bytes: int | None = None,
    path: str | os.PathLike[str] | None = None,
    verify_every: int = 100,
    padding: str | None = "attention_mask",
    pad_value: float | int | None = None,
    key: str | Callable[[tuple[Any, ...], dict[str, Any]], Any] | None = None,
    batch_dim: int | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """The settings of a cache (the keyword arguments of :func:`cache`), checked.

    Returns:
        The settings as a dict (``path`` as a string).

    Raises:
        CacheError: a value :func:`cache` does not accept (see there).

    Example:
        >>> from layerfreeze.feature_cache.api import cache_config
        >>> cache_config(store="memory")["store"]
        'memory'
    """
    if store not in _STORES:
        raise CacheError(f"store={store!r} is not one of 'memory', 'disk'")
    if store == "disk" and path is None:
        raise CacheError("store='disk' needs a directory: pass path=... (it is created if missing)")
    if path is not None:
        where = _unusable(path)
        if where is not None:
            raise CacheError(where)
    if pad_value is not None and (isinstance(pad_value, bool) or not isinstance(pad_value, (int, float))):
        raise CacheError(f"pad_value must be a number (the padding id) or None, got {pad_value!r}")
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
        raise CacheError(f"max_bytes must be a non-negative int or None, got {max_bytes!r}")
    if isinstance(verify_every, bool) or not isinstance(verify_every, int) or verify_every < 0:
        raise CacheError(f"verify_every must be a non-negative int, got {verify_every!r}")
    if batch_dim is not None and (isinstance(batch_dim, bool) or not isinstance(batch_dim, int) or batch_dim < 0):
        raise CacheError(f"batch_dim must be a non-negative int or None, got {batch_dim!r}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise CacheError(f"dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}")
    if padding is not None and not isinstance(padding, str):
        raise CacheError(f"padding must be the name of an argument (a str) or None, got {padding!r}")
    if key is not None and not (isinstance(key, str) or callable(key)):
        raise CacheError(f"key must be the name of an argument or a callable, got {key!r}")
    return {"store": store, "max_bytes": max_bytes, "path": None if path is None else os.fspath(path),
            "verify_every": verify_every, "padding": padding, "pad_value": pad_value, "key": key,
            "batch_dim": batch_dim, "dtype": dtype}


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise CacheError("precompute: an empty batch")
        return model(batch[0])
    return model(batch)


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

    **Under DDP** (ranks on one machine): cache with ``store="disk"`` and the
    same ``path`` on every rank, give each rank a loader over its own shard (a
    ``DistributedSampler``), call ``precompute`` on the unwrapped model
    (``ddp.module``, or before wrapping: DDP's forward adds nothing to a
    no-grad pass and may run collectives, such as buffer broadcasts, that
    every rank must join), then ``dist.barrier()``, so that every rank's
    features are on disk before training starts. Each rank computes its shard
    only; afterwards the samples any rank computed are hits for all of them,
    whatever shard a later epoch's shuffle gives it, and each sample is on
    disk once::

        model.encoder = lf.cache(model.encoder, store="disk", path="/scratch/features")
        ddp = DistributedDataParallel(model)
        sampler = DistributedSampler(dataset)
        lf.precompute(ddp.module, DataLoader(dataset, batch_size=32, sampler=sampler))
        dist.barrier()
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            ...  # the training loop, unchanged

    Args:
        model: a model holding modules wrapped by :func:`cache`.
        loader: an iterable of batches (a ``DataLoader``).
        forward: ``forward(model, batch)``. The default: ``model(**batch)``
            for a dict batch (Hugging Face), ``model(batch[0])`` for a tuple
            or list (``(inputs, target)`` from a ``TensorDataset``) and
            ``model(batch)`` for a tensor.
        progress: show a progress bar (tqdm, else rich, if installed).

    Returns:
        Stats of each cache after the pass, by module name.

    Raises:
        CacheError: ``model`` holds no cached module, a cached module is not
            frozen in eval mode (nothing is run then), or calling the model on
            a batch failed (the error names ``forward=``; the original error is
            its ``__cause__``).

    Example:
        >>> import torch, torch.nn as nn, layerfreeze as lf
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
        >>> _ = lf.freeze(model, "[0]", mode="eval")
        >>> model[0] = lf.cache(model[0])
        >>> loader = DataLoader(TensorDataset(torch.randn(10, 4), torch.zeros(10)), batch_size=4)
        >>> lf.precompute(model, loader, progress=False)["0"].misses
        10
    """
    caches = {name: m.__dict__["_lf_cache"] for name, m in model.named_modules() if is_cached(m)}
    if not caches:
        raise CacheError("precompute: the model holds no cached module; wrap the frozen part first, "
                         "e.g. model.encoder = lf.cache(model.encoder)")
    for name, c in caches.items():
        reason = c._why_not([])
        if reason is not None:
            raise CacheError(f"precompute: cached module {name or '(root)'!r} cannot be cached: {reason}")
    call = forward if forward is not None else _default_forward
    for c in caches.values():
        with c.lock:
            c.verify()
    calls = {id(c): c.calls + c.bypassed for c in caches.values()}
    bar = _progress(loader, progress)
    early = False
    try:
        with torch.no_grad():
            for i, batch in enumerate(bar):
                try:
                    call(model, batch)
                except _StopForward:
                    pass
                except CacheError:
                    raise
                except Exception as e:
                    how = "the forward= given" if forward is not None else "the default call"
                    raise CacheError(
                        f"precompute: {how} failed on batch {i} ({_describe(batch)}): {type(e).__name__}: {e}; "
                        "pass forward=lambda model, batch: model(...) to say how to call the model on a batch"
                    ) from e
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


def _describe(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return f"a tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, dict):
        return f"a dict with keys {list(batch)[:6]}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)}: " + ", ".join(
            f"{type(b).__name__}{tuple(b.shape) if isinstance(b, torch.Tensor) else ''}" for b in batch[:4])
    return f"a {type(batch).__name__}"


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
