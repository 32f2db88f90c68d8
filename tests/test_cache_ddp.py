"""The feature cache under DDP: 2 gloo processes on one machine sharing one
``store="disk"`` path, a ``DistributedSampler`` reshuffling every epoch.

One spawn runs both scenarios (spawning is the slow part): training a head
under DDP over a cached frozen encoder, and :func:`layerfreeze.precompute`
with each rank computing its own shard. The tests below each assert on one
scenario's results and on the files the ranks left on disk.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from tests.conftest import gloo_exit
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import layerfreeze as lf
from layerfreeze.feature_cache import disk

WORLD = 2
N = 45  # odd: the sampler pads one rank's shard with a sample of the other's
REPEAT = (44, 2)  # the data set holds sample 2's content twice: both in rank 0's first batch
DISTINCT = N - 1
WIDTH = 8  # encoder output features: one stored row is WIDTH float32
BATCH = 6
EPOCHS = 3
TOL = {"rtol": 1e-5, "atol": 1e-6}  # another batch composition may round differently


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, WIDTH))
        self.head = nn.Linear(WIDTH, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, 6, generator=g)
    x[REPEAT[0]] = x[REPEAT[1]]
    return TensorDataset(x, torch.randint(0, 2, (N,), generator=g))


def _cached_model(path: str) -> tuple[Model, nn.Module]:
    """The model with its encoder frozen and cached on ``path``, and a plain copy of the encoder."""
    torch.manual_seed(0)
    model = Model()
    lf.freeze(model, "encoder", mode="eval")
    reference = copy.deepcopy(model.encoder)
    model.encoder = lf.cache(model.encoder, store="disk", path=path)
    return model, reference


def _loader(data: TensorDataset, rank: int) -> tuple[DataLoader, DistributedSampler]:
    sampler = DistributedSampler(data, num_replicas=WORLD, rank=rank, shuffle=True, seed=0)
    return DataLoader(data, batch_size=BATCH, sampler=sampler), sampler


def _counts(model: Model) -> tuple[int, int]:
    s = model.encoder.stats()
    return s.hits, s.misses


def _train_epoch(ddp: nn.Module, opt: torch.optim.Optimizer, loader: DataLoader) -> None:
    for xb, yb in loader:
        loss = nn.functional.cross_entropy(ddp(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _same_on_all_ranks(t: torch.Tensor) -> bool:
    out = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(out, t.contiguous())
    return all(torch.equal(out[0], o) for o in out[1:])


def _served_everything_right(model: Model, reference: nn.Module, data: TensorDataset) -> dict[str, Any]:
    """Look up every sample of the data set: how many hit, and whether each equals a fresh forward."""
    before = _counts(model)
    x = data.tensors[0]
    out = model.encoder(x)
    hits, misses = (a - b for a, b in zip(_counts(model), before, strict=True))
    with torch.no_grad():
        fresh = reference(x)
    try:
        torch.testing.assert_close(out, fresh, **TOL)
        error = ""
    except AssertionError as e:
        error = str(e)
    return {"all_hits": hits, "all_misses": misses, "values_error": error}


def _training(rank: int, path: str) -> dict[str, Any]:
    data = _data()
    model, reference = _cached_model(path)
    ddp = nn.parallel.DistributedDataParallel(model)
    head_before = torch.cat([p.detach().reshape(-1) for p in model.head.parameters()])
    opt = torch.optim.SGD(model.head.parameters(), lr=0.5)
    loader, sampler = _loader(data, rank)
    ddp.train()  # the frozen encoder stays in eval mode (mode="eval" holds it there)
    epochs = []
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        before = _counts(model)
        _train_epoch(ddp, opt, loader)
        hits, misses = (a - b for a, b in zip(_counts(model), before, strict=True))
        epochs.append({"hits": hits, "misses": misses, "lookups": len(sampler)})
    head = torch.cat([p.detach().reshape(-1) for p in model.head.parameters()])
    return {"epochs": epochs, "head_trained": not torch.equal(head, head_before),
            "head_same_on_ranks": _same_on_all_ranks(head), "bypassed": model.encoder.stats().bypassed,
            **_served_everything_right(model, reference, data)}


def _precompute(rank: int, path: str) -> dict[str, Any]:
    data = _data()
    model, reference = _cached_model(path)
    ddp = nn.parallel.DistributedDataParallel(model)
    loader, sampler = _loader(data, rank)
    sampler.set_epoch(0)
    stats = lf.precompute(ddp.module, loader, progress=False)["encoder"]  # this rank's shard
    dist.barrier()  # every rank's shard is on disk
    opt = torch.optim.SGD(model.head.parameters(), lr=0.5)
    sampler.set_epoch(1)  # another shuffle: most samples were computed by the other rank
    before = _counts(model)
    _train_epoch(ddp, opt, loader)
    hits, misses = (a - b for a, b in zip(_counts(model), before, strict=True))
    return {"pre_hits": stats.hits, "pre_misses": stats.misses, "shard": len(sampler),
            "epoch_hits": hits, "epoch_misses": misses, **_served_everything_right(model, reference, data)}


def _worker(rank: int, port: int, q: Any, train_path: str, pre_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    out: dict[str, Any] = {"rank": rank}
    try:
        out["training"] = _training(rank, train_path)
        out["precompute"] = _precompute(rank, pre_path)
    except Exception as e:  # report instead of hanging the parent
        out["crash"] = repr(e)
    gloo_exit(q, out)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, spawn_gloo: Any) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("cache_ddp")
    train_path, pre_path = root / "train", root / "pre"
    results = spawn_gloo(_worker, str(train_path), str(pre_path))
    return {"results": results, "train_path": train_path, "pre_path": pre_path}


def _on_disk(path: Path) -> tuple[int, int]:
    """Records in the index and rows in the feature file of the one weight version stored under ``path``."""
    (d,) = [p for p in path.iterdir() if p.is_dir()]
    (smp,) = list(d.glob("*.smp"))
    return (d / "index").stat().st_size // disk._REC.size, smp.stat().st_size // (WIDTH * 4)


def test_distributed_sampler_overlaps_shards_and_data_repeats_a_sample() -> None:
    # what the scenarios rely on: the padded shard repeats a sample of the other
    # rank's shard, and the data set holds one content twice
    shards = [list(DistributedSampler(_data(), num_replicas=WORLD, rank=r, shuffle=True, seed=0)) for r in range(WORLD)]
    assert len(set(shards[0]) & set(shards[1])) == 1 and len(set(shards[0]) | set(shards[1])) == N
    assert torch.equal(_data().tensors[0][REPEAT[0]], _data().tensors[0][REPEAT[1]])


def test_ddp_every_lookup_hits_from_the_second_epoch_on(run: dict[str, Any]) -> None:
    for r in run["results"]:
        t = r["training"]
        assert t["bypassed"] == 0
        first, *later = t["epochs"]
        assert first["hits"] + first["misses"] == first["lookups"] == (N + 1) // WORLD
        for e in later:  # reshuffled, so most samples come from the other rank's first epoch
            assert (e["hits"], e["misses"]) == (e["lookups"], 0), t["epochs"]
    # across both ranks, the first epoch computed every distinct sample at least once
    assert sum(r["training"]["epochs"][0]["misses"] for r in run["results"]) >= DISTINCT


def test_ddp_features_on_disk_are_written_once(run: dict[str, Any]) -> None:
    records, rows = _on_disk(run["train_path"])
    assert (records, rows) == (DISTINCT, DISTINCT)


def test_ddp_hits_equal_a_fresh_forward_and_the_head_trains(run: dict[str, Any]) -> None:
    for r in run["results"]:
        t = r["training"]
        assert (t["all_hits"], t["all_misses"]) == (N, 0)
        assert t["values_error"] == ""
        assert t["head_trained"] and t["head_same_on_ranks"]


def test_precompute_under_ddp_each_rank_its_shard_then_everything_hits(run: dict[str, Any]) -> None:
    pre = [r["precompute"] for r in run["results"]]
    for p in pre:
        assert p["pre_hits"] + p["pre_misses"] == p["shard"] == (N + 1) // WORLD
        # after the barrier, a reshuffled epoch and a pass over all samples only hit
        assert (p["epoch_hits"], p["epoch_misses"]) == (p["shard"], 0)
        assert (p["all_hits"], p["all_misses"]) == (N, 0)
        assert p["values_error"] == ""
    assert sum(p["pre_misses"] for p in pre) >= DISTINCT  # each distinct sample computed by some rank
    assert _on_disk(run["pre_path"]) == (DISTINCT, DISTINCT)
