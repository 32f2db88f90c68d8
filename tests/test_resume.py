"""Checkpoint resume in the middle of a schedule: bitwise identical training."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

import layerfreeze as lf

JOB = textwrap.dedent(
    """
    import sys

    import torch
    from torch import nn

    import layerfreeze as lf


    def build(seed=0):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Sequential(*[nn.Linear(6, 6) for _ in range(3)]), nn.Linear(6, 1))
        opt = torch.optim.AdamW(model[1].parameters(), lr=0.05, weight_decay=0.1)
        schedule = lf.Schedule().gradual_unfreeze("0", start_epoch=1, lr_decay=0.7)
        fz = lf.Freezer(model, opt, schedule)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.95**e)
        return model, opt, sched, fz


    def train(model, opt, sched, fz, epochs):
        for epoch in epochs:
            fz.set_epoch(epoch)
            gen = torch.Generator().manual_seed(100 + epoch)
            for _ in range(4):
                x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 1, generator=gen)
                opt.zero_grad(set_to_none=False)  # stale zero grads on frozen layers, on purpose
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
                sched.step()


    if __name__ == "__main__":
        checkpoint, out = sys.argv[1], sys.argv[2]
        model, opt, sched, fz = build(seed=1)  # a different init: everything must come from the checkpoint
        state = torch.load(checkpoint)  # weights_only: the Freezer state is plain data
        model.load_state_dict(state["model"])  # first: the guard fingerprints the loaded weights
        fz.load_state_dict(state["freezer"])  # before the optimizer: it owns the added groups
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        train(model, opt, sched, fz, range(3, 6))
        torch.save(model.state_dict(), out)
    """
)


@pytest.fixture
def job(tmp_path: Path) -> tuple[Path, ModuleType]:
    path = tmp_path / "resume_job.py"
    path.write_text(JOB)
    spec = importlib.util.spec_from_file_location("resume_job", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return path, module


def test_resume_in_a_fresh_process_is_bitwise_identical(tmp_path: Path, job: tuple[Path, ModuleType]) -> None:
    path, module = job
    model, opt, sched, fz = module.build()
    module.train(model, opt, sched, fz, range(6))
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt, sched, fz = module.build()
    module.train(model, opt, sched, fz, range(3))
    checkpoint = tmp_path / "ckpt.pt"
    torch.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "freezer": fz.state_dict()},
        checkpoint,
    )
    out = tmp_path / "resumed.pt"
    subprocess.run([sys.executable, str(path), str(checkpoint), str(out)], check=True, capture_output=True)
    resumed = torch.load(out)
    assert resumed.keys() == straight.keys()
    for key, value in straight.items():
        assert torch.equal(resumed[key], value), key
    # the run really trained every layer in its second half
    assert not torch.equal(straight["0.0.weight"], module.build()[0].state_dict()["0.0.weight"])


def test_state_dict_holds_names_position_and_added_groups(job: tuple[Path, ModuleType]) -> None:
    _, module = job
    model, opt, sched, fz = module.build()
    module.train(model, opt, sched, fz, range(2))
    state = fz.state_dict()
    assert state["epoch"] == 1
    assert state["frozen"] == ["0.0.weight", "0.0.bias", "0.1.weight", "0.1.bias"]
    assert [g["params"] for g in state["added_groups"]] == [
        ["0.0.weight", "0.0.bias"],
        ["0.1.weight", "0.1.bias"],
        ["0.2.weight", "0.2.bias"],
    ]
    assert [g["lr"] for g in state["added_groups"]] == pytest.approx([0.05 * 0.49, 0.05 * 0.7, 0.05])


def two_models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    a = nn.Sequential(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)), nn.Linear(3, 1))
    b = nn.Sequential(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)), nn.Linear(3, 1))
    lf.freeze(b, "0.2")  # so that b's state is not the default one
    return a, b


def test_state_from_a_different_model_is_refused_and_nothing_changes(take_snapshot: Callable[..., Any]) -> None:
    a, b = two_models()
    fa = lf.Freezer(a, torch.optim.SGD(a.parameters(), lr=0.1), lf.Schedule().gradual_unfreeze("0", start_epoch=1))
    fa.set_epoch(0)
    fb_opt = torch.optim.SGD(b.parameters(), lr=0.1)
    fb = lf.Freezer(b, fb_opt, lf.Schedule().freeze("0.0", until_epoch=2))
    bad = fa.state_dict()
    bad["frozen"] = bad["frozen"] + ["encoder.layer.0.weight"]
    before = take_snapshot(b, fb_opt)
    with pytest.raises(lf.StateDictError, match=r"does not have \(encoder.layer.0.weight\).*different model\? Nothing was changed"):
        fb.load_state_dict(bad)
    assert take_snapshot(b, fb_opt) == before
    assert fb.epoch is None


def test_state_with_another_schedule_is_refused_and_nothing_changes(take_snapshot: Callable[..., Any]) -> None:
    a, _ = two_models()
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    saved = lf.Freezer(a, opt, lf.Schedule().gradual_unfreeze("0", start_epoch=1).freeze("1", until_epoch=1))
    saved.set_epoch(0)
    state = saved.state_dict()
    saved.close()
    lf.unfreeze(a)
    fz = lf.Freezer(a, opt, lf.Schedule().gradual_unfreeze("0", start_epoch=1))
    before = take_snapshot(a, opt)
    with pytest.raises(lf.StateDictError, match="schedule state has 2 rules, this schedule has 1.*Nothing was changed"):
        fz.load_state_dict(state)
    assert take_snapshot(a, opt) == before
    with pytest.raises(lf.StateDictError, match="not a layerfreeze Freezer state"):
        fz.load_state_dict({"frozen": []})


def adaptive_run(split: int | None) -> tuple[list[int], dict[str, torch.Tensor]]:
    def build() -> tuple[nn.Module, torch.optim.Optimizer, lf.Freezer]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Sequential(*[nn.Linear(6, 6) for _ in range(4)]), nn.Linear(6, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        return model, opt, lf.Freezer(model, opt, lf.Schedule().adaptive_freeze("0", check_every=4))

    model, opt, fz = build()
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 6, generator=gen), torch.randn(32, 1, generator=gen)
    history = []
    for step in range(30):
        if step == split:  # a checkpoint in the middle of a check window, loaded into fresh objects
            state = {"model": model.state_dict(), "opt": opt.state_dict(), "fz": fz.state_dict()}
            model, opt, fz = build()
            model.load_state_dict(state["model"])
            fz.load_state_dict(state["fz"])
            opt.load_state_dict(state["opt"])
        fz.set_step(step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        history.append(fz.schedule.rules[0].frozen_groups)  # type: ignore[union-attr, attr-defined]
    return history, model.state_dict()


def test_adaptive_statistics_survive_a_checkpoint() -> None:
    straight, params = adaptive_run(None)
    resumed, params2 = adaptive_run(split=14)
    assert straight[-1] >= 1  # something was frozen along the way
    assert resumed == straight
    assert all(torch.equal(params[k], params2[k]) for k in params)
