"""FSDP2 (``fully_shard``) under freeze changes: 2 gloo processes on CPU.

Frozen and trainable parameters are mixed in one sharded model, a frozen one
is unfrozen and a trainable one frozen mid-run; each phase is compared with
the same training done unsharded on the whole batch.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from tests.conftest import Mlp, gloo_exit
from torch import nn

import layerfreeze as lf

fsdp = pytest.importorskip("torch.distributed.fsdp")
WORLD = 2


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(4, 4, generator=g), torch.randn(4, 1, generator=g)


def _full(p: torch.Tensor) -> torch.Tensor:
    full = getattr(p, "full_tensor", None)
    return (full() if callable(full) else p).detach().clone()


def _worker(rank: int, port: int, q: Any) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    out: dict[str, Any] = {"rank": rank}
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))
        torch.manual_seed(0)
        ref = Mlp()
        torch.manual_seed(0)
        net = Mlp()
        lf.freeze(ref, "fc2")
        lf.freeze(net, "fc2")  # frozen at shard time
        for layer in (net.fc1, net.fc2, net.fc3):
            fsdp.fully_shard(layer, mesh=mesh)
        fsdp.fully_shard(net, mesh=mesh)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
        fz = lf.Freezer(net, opt)
        ref_fz = lf.Freezer(ref, ref_opt)
        out["attached"] = fz.distributed is not None
        phases = [("start", None), ("unfreeze", "fc2"), ("freeze", "fc1")]
        step = 0
        out["phases"] = []
        for action, sel in phases:
            if action == "unfreeze":
                fz.unfreeze(sel)
                ref_fz.unfreeze(sel)
            elif action == "freeze":
                fz.freeze(sel)
                ref_fz.freeze(sel)
            before = {n: _full(p) for n, p in net.named_parameters()}
            grads_none = set()
            for _ in range(2):
                x, y = _batch(rank, step)
                opt.zero_grad()
                nn.functional.mse_loss(net(x), y).backward()
                grads_none = {n for n, p in net.named_parameters() if p.grad is None}
                opt.step()
                # the reference sees the whole global batch
                xs, ys = zip(*[_batch(r, step) for r in range(WORLD)], strict=True)
                ref_opt.zero_grad()
                nn.functional.mse_loss(ref(torch.cat(xs)), torch.cat(ys)).backward()
                ref_opt.step()
                step += 1
            after = {n: _full(p) for n, p in net.named_parameters()}
            out["phases"].append(
                {
                    "frozen": sorted(n for n, p in net.named_parameters() if not p.requires_grad),
                    "grads_none": sorted(grads_none),
                    "unchanged": sorted(n for n in after if torch.equal(after[n], before[n])),
                    "max_err": max(
                        float((after[n] - dict(ref.named_parameters())[n].detach()).abs().max()) for n in after
                    ),
                }
            )
    except Exception as e:  # report instead of hanging the parent
        out["crash"] = repr(e)
    gloo_exit(q, out)


@pytest.fixture(scope="module")
def results(spawn_gloo: Any) -> list[dict[str, Any]]:
    return spawn_gloo(_worker)


def test_fsdp2_follows_freeze_changes_mid_run(results: list[dict[str, Any]]) -> None:
    for r in results:
        assert r["attached"]
        start, unfrozen, refrozen = r["phases"]
        assert start["frozen"] == start["grads_none"] == start["unchanged"] == ["fc2.bias", "fc2.weight"]
        assert unfrozen["frozen"] == unfrozen["grads_none"] == unfrozen["unchanged"] == []
        assert refrozen["frozen"] == refrozen["grads_none"] == refrozen["unchanged"] == ["fc1.bias", "fc1.weight"]
        for phase in r["phases"]:
            assert phase["max_err"] < 1e-5  # same training as unsharded on the whole batch
