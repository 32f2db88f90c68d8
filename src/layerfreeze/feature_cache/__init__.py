"""A per-sample feature cache that makes a frozen submodule nearly free.

``lf.cache(model.encoder)`` makes the encoder remember its output for every
sample it has seen. A sample is recognised by content: the bytes of its row
(dimension 0 is the batch) in every tensor argument, plus the shapes, dtypes
and non-tensor arguments of the call, hashed with BLAKE2b to 128 bits. Shuffled
batches, other batch sizes and a short last batch therefore all hit.

What "identical" means: a hit returns, bit for bit, the values the module
produced for that sample when it was first computed. A fresh forward of the
same batch gives the same bits when the module's kernels do not depend on the
batch composition; some CPU/GPU kernels pick a different reduction order for a
different batch size (on CPU, MiniLM run on 1 sample instead of 32 differs by
about 1e-6), so re-batched samples agree to that rounding, not bitwise.

The cache is only used while it cannot be wrong: the module is fully frozen
(no parameter requires grad), every submodule is in eval mode (use
``lf.freeze(..., mode="eval")``) and no input requires grad. Otherwise the
module runs normally and a warning says why, once per reason.

Invalidation, checked on every call: parameter and buffer objects, their data
pointers, their in-place version counters and ``requires_grad`` flags. This
covers optimizer steps, ``load_state_dict``, in-place edits under
``torch.no_grad()``, ``param.data = ...``, and Freezer transitions. Edits made
through ``param.data.<op>_()`` bypass version counters; they are caught by an
exact content fingerprint (:func:`layerfreeze.guard.fingerprint`) taken when
the cache is first filled, at every :func:`precompute`, every ``verify_every``
calls and on ``verify()``.

The package's parts: :mod:`.layout` (output structure), :mod:`.stores`
(memory and disk stores), :mod:`.call` (the keyed call) and :mod:`.api`
(:func:`cache`, :func:`precompute`). The package is named ``feature_cache``
so that ``layerfreeze.cache``, the function, does not hide it: import a part as
``from layerfreeze.feature_cache import stores``.
"""

from .api import cache, is_cached, precompute
from .call import CacheStats

__all__ = ["CacheStats", "cache", "is_cached", "precompute"]
