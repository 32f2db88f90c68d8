"""Shared models for the test suite.

- ``Net``: the seed's toy net, five linear layers 10-3-3-3-3-1 (73 parameters;
  fc2 holds 12 of them).
- ``TiedLM``: a tiny language model whose output head shares its weight with
  the token embedding.
- ``SmallCNN``: conv/BatchNorm/Dropout features and a linear head.
- ``Encoder``: a BERT-shaped toy (``encoder.layer[i]`` with attention,
  LayerNorm and dropout; a BatchNorm ``norm``; a head tied to the embedding).
- ``Mlp``: three linear layers 4-8-8-1 with an activation between them.
- ``stack(n, width)``: ``n`` linear layers in ``[0]`` and a linear head
  ``[1]``, the usual model of the schedule and lr tests.
- ``tiny_bert``: a randomly initialised ``transformers.BertModel`` from a
  small ``BertConfig`` (no download).
- ``roundtrip(obj, how)``: ``obj`` through ``copy.deepcopy``, ``pickle`` or
  ``torch.save``/``torch.load``.
- ``run_threads(work, n)``: ``work(k)`` in ``n`` threads started together.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import os
import pickle
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import layerfreeze as lf

# LAYERFREEZE_TEST_SEED_OFFSET=N shifts every torch.manual_seed(s) made in this
# process to s + N: the suite must pass with other random draws, not only with
# the ones its seeds happen to give.
_SEED_OFFSET = int(os.environ.get("LAYERFREEZE_TEST_SEED_OFFSET", "0"))
if _SEED_OFFSET:
    _manual_seed = torch.manual_seed

    def _offset_manual_seed(seed: int) -> torch.Generator:
        return _manual_seed(int(seed) + _SEED_OFFSET)

    torch.manual_seed = _offset_manual_seed  # type: ignore[assignment]


class Net(nn.Module):
    """The seed's 5-layer toy net."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 3)
        self.fc2 = nn.Linear(3, 3)
        self.fc3 = nn.Linear(3, 3)
        self.fc4 = nn.Linear(3, 3)
        self.fc5 = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (self.fc1, self.fc2, self.fc3, self.fc4, self.fc5):
            x = layer(x)
        return x


class TiedLM(nn.Module):
    """Embedding -> block -> head, with ``lm_head.weight is embed.weight``."""

    def __init__(self, vocab: int = 20, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.block = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab)
        self.lm_head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.block(self.embed(tokens))))


class SmallCNN(nn.Module):
    """features: conv, BN, ReLU, conv, BN, ReLU, Dropout; then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Dropout(0.5),
        )
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class Encoder(nn.Module):
    """A BERT-shaped toy: encoder.layer[i].attention / .LayerNorm / .dropout."""

    def __init__(self, n: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 4)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            nn.ModuleDict({"attention": nn.Linear(4, 4), "LayerNorm": nn.LayerNorm(4), "dropout": nn.Dropout(0.5)})
            for _ in range(n)
        )
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 10)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens).mean(1)
        for block in self.encoder.layer:
            h = block["dropout"](block["LayerNorm"](block["attention"](h)))
        return self.head(self.norm(h))


def encoder_layer(i: int) -> list[str]:
    """The parameter names of ``Encoder``'s block ``i``, in model order."""
    return [f"encoder.layer.{i}.{m}.{p}" for m in ("attention", "LayerNorm") for p in ("weight", "bias")]


class Mlp(nn.Module):
    """fc1 4-8, fc2 8-8, fc3 8-1 with ``act`` between them."""

    def __init__(self, act: Callable[[torch.Tensor], torch.Tensor] = torch.tanh) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 1)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


def stack(n: int = 3, width: int = 4) -> nn.Sequential:
    """``n`` linear layers ``width``-``width`` in ``[0]``, a linear head to 1 in ``[1]`` (seed 0)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(*[nn.Linear(width, width) for _ in range(n)]), nn.Linear(width, 1))


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()


@pytest.fixture
def make_net() -> Callable[[], Net]:
    """A factory, for tests that need several identical seed nets."""

    def make() -> Net:
        torch.manual_seed(0)
        return Net()

    return make


@pytest.fixture
def tied_lm() -> TiedLM:
    torch.manual_seed(0)
    return TiedLM()


@pytest.fixture
def cnn() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN()


@pytest.fixture
def encoder() -> Encoder:
    return Encoder()


@pytest.fixture
def tiny_bert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=100,
    )
    return transformers.BertModel(config)


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Everything a freeze change may touch, in comparable form."""
    from layerfreeze.core import _keeper

    out: dict[str, Any] = {
        "flags": {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)},
        "grads": {n: id(p.grad) if p.grad is not None else None for n, p in model.named_parameters()},
        "ids": {n: id(p) for n, p in model.named_parameters(remove_duplicate=False)},
        "training": {n: m.training for n, m in model.named_modules()},
        "holds": {
            n: (k.mode, k.requested) for n, m in model.named_modules() if (k := _keeper(m)) is not None
        },
        "counts": lf.count_parameters(model),
    }
    if optimizer is not None:
        out["groups"] = [
            ([id(p) for p in g["params"]], {k: v for k, v in g.items() if k != "params"})
            for g in optimizer.param_groups
        ]
        out["state"] = {id(p): sorted(s) for p, s in optimizer.state.items()}
    return out


@pytest.fixture
def take_snapshot() -> Callable[..., dict[str, Any]]:
    return snapshot


# --------------------------------------------------------------------------- several processes

GLOO_WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(worker: Callable[..., None], *args: Any) -> list[dict[str, Any]]:
    """Run ``worker(rank, port, queue, *args)`` on ``GLOO_WORLD`` processes.

    Each worker puts one dict with its ``rank`` on the queue (``crash`` holds
    an exception it caught instead of hanging the parent), flushes the queue,
    then ends with ``dist.barrier(); dist.destroy_process_group();
    os._exit(0)``: torch's gloo teardown otherwise aborts about half the time.
    Returns the dicts by rank.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # pytest imports test files as ``tests.test_x`` (importlib mode); the
    # children unpickle the worker by that name, so they need the root
    sys.path.insert(0, root)
    try:
        q = mp.get_context("spawn").Queue()
        procs = mp.spawn(worker, args=(_free_port(), q, *args), nprocs=GLOO_WORLD, join=False)
        got = [q.get(timeout=150) for _ in range(GLOO_WORLD)]
        procs.join(timeout=60)
    finally:
        sys.path.remove(root)
    got.sort(key=lambda r: r["rank"])
    for r in got:
        assert "crash" not in r, r["crash"]
    return got


@pytest.fixture(scope="session")
def spawn_gloo() -> Callable[..., list[dict[str, Any]]]:
    """:func:`_spawn`: run a worker on 2 gloo processes, results by rank."""
    return _spawn


def sibling(name: str) -> Any:
    """Another test module of this folder, loaded from its file (the suite runs with
    ``--import-mode=importlib``, so test modules are not importable by name)."""
    spec = importlib.util.spec_from_file_location(f"_lf_{name}", Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gloo_exit(q: Any, out: dict[str, Any]) -> None:
    """End a gloo worker: hand ``out`` to the parent, flush the queue, then leave
    together and at once (torch's CPU build can abort in its own teardown otherwise)."""
    import torch.distributed as dist

    q.put(out)
    q.close()
    q.join_thread()
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def roundtrip(obj: Any, how: str) -> Any:
    """``obj`` through ``"deepcopy"``, ``"pickle"`` or ``"torch.save"`` (then ``torch.load``)."""
    if how == "deepcopy":
        return copy.deepcopy(obj)
    if how == "pickle":
        return pickle.loads(pickle.dumps(obj))
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def run_threads(work: Callable[[int], None], n: int = 4, *, switch: float | None = None) -> None:
    """Run ``work(k)`` for ``k`` in ``range(n)``, each in its own thread, all
    released at once; re-raise the first error a thread raised. ``switch``: the
    interpreter's thread switch interval meanwhile (small: more interleaving)."""
    start = threading.Barrier(n)
    failed: list[BaseException] = []

    def run(k: int) -> None:
        try:
            start.wait()
            work(k)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            failed.append(e)

    interval = sys.getswitchinterval()
    if switch is not None:
        sys.setswitchinterval(switch)
    try:
        threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    if failed:
        raise failed[0]
