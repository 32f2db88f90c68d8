"""DDP under freeze changes: 2 gloo processes on CPU.

One spawn runs every scenario (spawning is the slow part); the tests below
each assert on one scenario's results.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from tests.conftest import Mlp, gloo_exit
from torch import nn

import layerfreeze as lf
from layerfreeze.distributed import RankMismatchError, check_frozen_set, frozen_set_digest

WORLD = 2


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    # different data on each rank: without gradient averaging they diverge
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(6, 4, generator=g), torch.randn(6, 1, generator=g)


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, rank: int, step: int) -> None:
    x, y = _batch(rank, step)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def _same_on_all_ranks(t: torch.Tensor) -> bool:
    out = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(out, t.contiguous())
    return all(torch.equal(out[0], o) for o in out[1:])


def _plain_unfreeze(rank: int) -> dict[str, Any]:
    torch.manual_seed(0)
    net = Mlp(torch.relu)
    net.fc2.requires_grad_(False)
    ddp = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(2):
        _train_step(ddp, opt, rank, step)
    same_before = _same_on_all_ranks(_flat(net))
    net.fc2.requires_grad_(True)  # what a hand-written schedule does
    for step in range(2, 4):
        _train_step(ddp, opt, rank, step)
    return {"same_before": same_before, "same_after": _same_on_all_ranks(_flat(net))}


def _plain_freeze(rank: int) -> dict[str, Any]:
    torch.manual_seed(0)
    net = Mlp(torch.relu)
    ddp = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    _train_step(ddp, opt, rank, 0)
    net.fc2.requires_grad_(False)
    error = ""
    try:
        for step in range(1, 3):
            _train_step(ddp, opt, rank, step)
    except RuntimeError as e:
        error = str(e)
    return {"error": error}


def _with_layerfreeze(rank: int, bucket_view: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    net = Mlp(torch.relu)
    ddp = nn.parallel.DistributedDataParallel(net, gradient_as_bucket_view=bucket_view)
    opt = torch.optim.AdamW(net.parameters(), lr=0.05)
    schedule = lf.Schedule().freeze("fc2", until_epoch=2).freeze("fc1", from_epoch=3)
    fz = lf.Freezer(ddp, opt, schedule)  # selectors name the inner model: no "module."
    init = {n: p.detach().clone() for n, p in net.named_parameters()}
    same, frozen_sets, step = [], [], 0
    fc2_moved_at = None
    fc1_before_freeze = None
    for epoch in range(5):
        fz.set_epoch(epoch)
        if epoch == 3:
            fc1_before_freeze = net.fc1.weight.detach().clone()
        for _ in range(3):
            _train_step(fz.model, opt, rank, step)
            step += 1
        same.append(_same_on_all_ranks(_flat(net)))
        frozen_sets.append(sorted(n for n, p in net.named_parameters() if not p.requires_grad))
        if fc2_moved_at is None and not torch.equal(net.fc2.weight, init["fc2.weight"]):
            fc2_moved_at = epoch
    assert fc1_before_freeze is not None
    return {
        "same": same,
        "frozen": frozen_sets,
        "same_object": fz.model is ddp,
        "rebuilds": fz.distributed.rebuilds,
        "fc2_moved_at": fc2_moved_at,
        "fc1_kept": torch.equal(net.fc1.weight, fc1_before_freeze),
    }


def _mismatch(rank: int) -> dict[str, Any]:
    torch.manual_seed(0)
    net = Mlp(torch.relu)
    ddp = nn.parallel.DistributedDataParallel(net)
    fz = lf.Freezer(ddp, torch.optim.SGD(net.parameters(), lr=0.1))
    error = ""
    try:
        fz.freeze("fc1" if rank == 0 else "fc2")  # a rank-dependent decision
    except RankMismatchError as e:
        error = str(e)
    untouched = all(p.requires_grad for p in net.parameters())
    # a plain check with agreeing ranks passes
    check_frozen_set(["fc3.bias"])
    return {"error": error, "untouched": untouched}


def _worker(rank: int, port: int, q: Any) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.use_deterministic_algorithms(True)
    out: dict[str, Any] = {"rank": rank}
    try:
        out["plain_unfreeze"] = _plain_unfreeze(rank)
        out["plain_freeze"] = _plain_freeze(rank)
        out["layerfreeze"] = _with_layerfreeze(rank, bucket_view=False)
        out["layerfreeze_bucket_view"] = _with_layerfreeze(rank, bucket_view=True)
        out["mismatch"] = _mismatch(rank)
    except Exception as e:  # report instead of hanging the parent
        out["crash"] = repr(e)
    gloo_exit(q, out)


@pytest.fixture(scope="module")
def results(spawn_gloo: Any) -> list[dict[str, Any]]:
    return spawn_gloo(_worker)


def test_plain_ddp_diverges_after_unfreeze(results: list[dict[str, Any]]) -> None:
    for r in results:
        assert r["plain_unfreeze"]["same_before"]
        assert not r["plain_unfreeze"]["same_after"]  # the trap: ranks silently differ


def test_plain_ddp_fails_after_freeze(results: list[dict[str, Any]]) -> None:
    for r in results:
        assert "Expected to have finished reduction" in r["plain_freeze"]["error"]


@pytest.mark.parametrize("key", ["layerfreeze", "layerfreeze_bucket_view"])
def test_freezer_keeps_ranks_identical(results: list[dict[str, Any]], key: str) -> None:
    for r in results:
        got = r[key]
        assert got["same"] == [True] * 5  # bitwise identical after every epoch
        assert got["frozen"][0] == ["fc2.bias", "fc2.weight"]
        assert got["frozen"][2] == []
        assert got["frozen"][3] == ["fc1.bias", "fc1.weight"]
        assert got["same_object"]
        assert got["rebuilds"] == 3  # freeze fc2, unfreeze fc2, freeze fc1
        assert got["fc2_moved_at"] == 2  # kept while frozen, trained once unfrozen
        assert got["fc1_kept"]


def test_ranks_that_disagree_fail_loudly(results: list[dict[str, Any]]) -> None:
    for r in results:
        msg = r["mismatch"]["error"]
        assert "ranks disagree about the frozen set" in msg
        assert "fc1.weight: frozen on ranks [0], trainable on ranks [1]" in msg
        assert "Nothing was changed" in msg
        assert r["mismatch"]["untouched"]


def test_digest_is_order_free_and_single_process_check_is_a_no_op() -> None:
    assert frozen_set_digest(["a", "b"]) == frozen_set_digest(["b", "a", "a"])
    assert frozen_set_digest(["a"]) != frozen_set_digest(["b"])
    check_frozen_set(["anything"])  # no process group: nothing to compare
    net = Mlp(torch.relu)
    fz = lf.Freezer(net)
    assert fz.distributed is None
