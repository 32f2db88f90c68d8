"""A per-sample feature cache that makes a frozen submodule nearly free.

``lf.cache(model.encoder)`` makes the encoder remember its output for every
sample it has seen; :func:`cache` states the contract, the keys, padding,
the first check, the validity guarantee and the stores.

The package's parts:

* :mod:`.layout`: the structure of an output and its per-sample/per-token rows;
* :mod:`.keys`: what makes two samples the same (content, real tokens, ids);
* :mod:`.validity`: the deep check (weight fingerprints, module tree, code);
* :mod:`.stores`: the memory store; :mod:`.disk`: the shared disk store;
* :mod:`.check`: the first check of a call signature (rows independent, padding ignored);
* :mod:`.call`: the keyed call (lookups, computing misses, assembly);
* :mod:`.api`: :func:`cache`, :func:`precompute`, :func:`is_cached`.

The package is named ``feature_cache`` so that ``layerfreeze.cache``, the
function, does not hide it: reach a part as
``from layerfreeze.feature_cache import disk``.
"""

from .api import cache, is_cached, precompute
from .call import CacheStats

__all__ = ["CacheStats", "cache", "is_cached", "precompute"]
