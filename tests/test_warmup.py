"""lr warm-up after unfreeze: plain loop, composition with LR schedulers, resume."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import sibling
from torch import nn
from torch.optim import lr_scheduler as sched

import layerfreeze as lf


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))


def _step(net: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    opt.zero_grad()
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(seed))
    nn.functional.mse_loss(net(x), torch.zeros(8, 1)).backward()
    opt.step()


def _record(opt: torch.optim.Optimizer, seen: list[list[float]]) -> None:
    # a pre-hook registered after the Freezer's runs after the warm-up scaled the lrs
    opt.register_step_pre_hook(lambda o, a, k: seen.append([g["lr"] for g in o.param_groups]))


def _group(opt: torch.optim.Optimizer, p: nn.Parameter) -> int:
    return next(i for i, g in enumerate(opt.param_groups) if any(q is p for q in g["params"]))


@pytest.mark.parametrize("built_from", ["trainable", "all"])
def test_unfrozen_group_ramps_over_steps_under_a_scheduler(built_from: str) -> None:
    net = _net()
    lf.freeze(net, "0")
    opt = torch.optim.SGD(net[1].parameters() if built_from == "trainable" else net.parameters(), lr=0.1)
    fz = lf.Freezer(net, opt, lf.Schedule().freeze("0", until_step=2), unfreeze_lr=0.01,
                    warmup=lf.Warmup(steps=4, start=0.2))
    s = sched.ExponentialLR(opt, gamma=0.9)  # made after the Freezer
    seen: list[list[float]] = []
    _record(opt, seen)
    for step in range(8):
        fz.set_step(step)
        _step(net, opt, step)
        s.step()
    g = _group(opt, net[0].weight)
    assert g != _group(opt, net[1].weight)
    for step, lrs in enumerate(seen):
        factor = 0.9**step
        assert lrs[0] == pytest.approx(0.1 * factor, rel=1e-9)  # the head: the scheduler alone
        if step >= 2:
            ramp = min(1.0, 0.2 + 0.8 * (step - 2) / 4)
            assert lrs[g] == pytest.approx(0.01 * factor * ramp, rel=1e-9)
    # between steps the groups hold the scheduler's lrs: no factor leaks into it
    assert opt.param_groups[g]["lr"] == pytest.approx(0.01 * 0.9**8, rel=1e-9)


def test_warmup_over_epochs_and_resume_equal_an_uninterrupted_run() -> None:
    def run(stop: int | None, state: dict | None = None) -> tuple[list[list[float]], dict, nn.Module]:
        net = _net()
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        fz = lf.Freezer(net, opt, lf.Schedule().freeze("0", until_epoch=1), warmup=lf.Warmup(epochs=3, start=0.25))
        seen: list[list[float]] = []
        _record(opt, seen)
        first = 0
        if state is not None:
            fz.load_state_dict(state["freezer"])
            opt.load_state_dict(state["opt"])
            net.load_state_dict(state["net"])
            first = state["epoch"]
        for epoch in range(first, 5 if stop is None else stop):
            fz.set_epoch(epoch)
            for i in range(2):
                _step(net, opt, 2 * epoch + i)
        return seen, {"freezer": fz.state_dict(), "opt": opt.state_dict(), "net": net.state_dict(),
                      "epoch": stop}, net

    straight, _, net_a = run(None)
    _, state, _ = run(2)
    tail, _, net_b = run(None, state)
    g = 1  # the backbone's own group
    assert [round(lrs[g] / 0.1, 9) for lrs in straight[2::2]] == [0.25, 0.5, 0.75, 1.0]
    assert tail == straight[4:]
    for p, q in zip(net_a.parameters(), net_b.parameters(), strict=True):
        assert torch.equal(p, q)  # bitwise: the same computation


def test_bad_warmups_are_refused() -> None:
    with pytest.raises(lf.ArgumentError, match="steps= or epochs="):
        lf.Warmup()
    with pytest.raises(lf.ArgumentError, match="steps= must be an int >= 1"):
        lf.Warmup(steps=0)
    with pytest.raises(lf.ArgumentError, match=r"start= must be a number in \[0, 1\)"):
        lf.Warmup(steps=3, start=1.5)
    net = _net()
    with pytest.raises(lf.ArgumentTypeError, match="warmup must be a layerfreeze Warmup"):
        lf.Freezer(net, torch.optim.SGD(net.parameters(), lr=0.1), warmup=3)  # type: ignore[arg-type]


# ---------------------------------------------------------------- in the trainers



class _StepLrs:
    """The lrs each optimizer step used (a pre-hook made after the Freezer's)."""

    def __init__(self) -> None:
        self.seen: list[list[float]] = []

    def attach(self, optimizer: object) -> None:
        from layerfreeze.lrsched import unwrap_optimizer

        unwrap_optimizer(optimizer).register_step_pre_hook(
            lambda o, a, k: self.seen.append([g["lr"] for g in o.param_groups])
        )


def test_hf_trainer_warms_up_and_resumes_mid_warmup(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = sibling("test_transformers_callback")
    _args, _data, _model = hf._args, hf._data, hf._model

    from layerfreeze.transformers import LayerFreezeCallback

    class Probe(transformers.TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.lrs = _StepLrs()

        def on_train_begin(self, args, state, control, optimizer=None, **kw) -> None:
            self.lrs.attach(optimizer)

    def trainer(out: str, probe: Probe) -> object:
        args = _args(tmp_path / out, epochs=3)
        args.save_strategy = "epoch"
        cb = LayerFreezeCallback(lf.Schedule().freeze("bert", until_epoch=1), unfreeze_lr=1e-3,
                                 warmup=lf.Warmup(steps=4, start=0.5))
        return transformers.Trainer(model=_model(), args=args, train_dataset=_data(), callbacks=[cb, probe])

    straight = Probe()
    t = trainer("run", straight)
    t.train()
    bert = next(i for i, g in enumerate(t.optimizer.param_groups)
                if any(p is t.model.bert.encoder.layer[0].output.dense.weight for p in g["params"]))
    assert len(straight.lrs.seen) == 6
    for step, lrs in enumerate(straight.lrs.seen):
        factor = lrs[0] / 1e-2  # the linear schedule on the Trainer's first group
        if step >= 2:
            ramp = min(1.0, 0.5 + 0.5 * (step - 2) / 4)
            assert lrs[bert] == pytest.approx(1e-3 * factor * ramp, rel=1e-9)

    resumed = Probe()
    trainer("again", resumed).train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    # mid warm-up, continued
    assert sum(resumed.lrs.seen, []) == pytest.approx(sum(straight.lrs.seen[4:], []), rel=1e-12)


def test_lightning_warms_up_and_resumes(tmp_path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    lt = sibling("test_lightning")
    Module, _loader, _trainer = lt.Module, lt._loader, lt._trainer

    from layerfreeze.lightning import LayerFreeze

    class Probe(pl.Callback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.lrs = _StepLrs()

        def on_train_start(self, trainer, pl_module) -> None:
            self.lrs.attach(trainer.optimizers[0])

    def cb() -> LayerFreeze:
        return LayerFreeze(lf.Schedule().freeze("backbone", until_epoch=1), unfreeze_lr=0.01,
                           warmup=lf.Warmup(epochs=2, start=0.5))

    straight, probe = Module(trainable_only=False), Probe()
    _trainer(4, [cb(), probe]).fit(straight, _loader())
    g = 1  # the backbone's own group, moved out of the optimizer's
    ratios = [round(lrs[g] / lrs[0] / 0.2, 9) for lrs in probe.lrs.seen]  # 0.01 / 0.05 = 0.2 without warm-up
    assert ratios[2:] == [0.5, 0.5, 0.75, 0.75, 1.0, 1.0]

    first = Module(trainable_only=False)
    t = _trainer(2, [cb()])
    t.fit(first, _loader())
    t.save_checkpoint(tmp_path / "mid.ckpt")
    again, probe2 = Module(trainable_only=False), Probe()
    _trainer(4, [cb(), probe2]).fit(again, _loader(), ckpt_path=tmp_path / "mid.ckpt")
    assert sum(probe2.lrs.seen, []) == pytest.approx(sum(probe.lrs.seen[4:], []), rel=1e-12)
    for p, q in zip(straight.parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q)
