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
* **Climbing.** When a module around the boundary is frozen through and
  through (every parameter, every module it calls, a ``BertModel`` once its
  embeddings and every layer are frozen), the outermost such module below the
  one the forward starts at stores its output instead, so its own code around
  the layers (attention masks, the loop) is skipped too. If the proof refuses
  it, the group's own boundary is tried next.
* **The proof.** Before the first skip at a new boundary, a few samples of a batch
  (:data:`~layerfreeze.skip.proof.PROOF_ROWS`: the shortest of a padded batch
  and the shortest of those longer than it, cut to that one's length, else the
  first ones) run both ways (the full forward, with grad, and the skipped one,
  from the same random state, with buffers restored after) and every output
  tensor is compared (real positions only, in a padded batch). Should the cut
  rows refuse, they are proved again at the batch's length, which decides. A
  model that reads a prefix output the boundary does not carry (a connection
  around the boundary, or a value computed from a placeholder) is refused even
  where the outputs agree: a warning names the reader, and training goes on
  without skipping. So is a boundary whose output needs grad: something
  trainable outside the frozen groups feeds the prefix.
* **The model around the prefix.** The modules whose calls contain the
  boundary's (the forward's own module, containers) are watched at every call:
  their frozen parameters, buffers and tensor attributes, their mode where their
  forward reads it, and forward pre-hooks (refused); their plain attributes join
  the deep check.
* **Changes.** A prefix module replaced in the model (or a submodule or parameter
  inside one), or a module the learnt forward never called running before the
  boundary, makes the party learn the order again.
* **Levels.** Each boundary is a level: a :class:`~layerfreeze.feature_cache.call._FeatureCache`
  over a view of its prefix, so keys, padding, stores, the disk layout and
  validity are those of :func:`layerfreeze.cache` (the disk directory is named
  by the prefix's weights, its module tree and the boundary). When the boundary
  moves up, a missing sample of the new level is computed from the level below
  (its stored row through the newly frozen group only); the lower level is
  dropped once every sample it held is stored above. When it moves down, levels
  above are dropped.
"""

from .levels import SkipStats, skip_config
from .party import SkipParty

__all__ = ["SkipParty", "SkipStats", "skip_config"]
