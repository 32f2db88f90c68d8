"""Frozen BatchNorm as a fixed affine map: outputs, modes, counts, state dicts, optimizers."""

from __future__ import annotations

import copy
import importlib.util
import pathlib
from typing import Any

import pytest
import torch
from torch import nn

import layerfreeze as lf


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 8),
                        nn.BatchNorm1d(8), nn.Linear(8, 1))
    net.train()
    with torch.no_grad():  # statistics worth keeping
        for _ in range(3):
            net(torch.randn(16, 3, 6, 6))
    return net


def test_frozen_layers_are_a_fixed_affine_map_in_any_mode() -> None:
    net = _net()
    reference = copy.deepcopy(net).eval()
    ids = {id(p) for p in net.parameters()}
    assert lf.freeze_batchnorm(net) == ["1", "5"]
    assert {id(p) for p in net.parameters()} == ids  # the same Parameter objects
    x = torch.randn(8, 3, 6, 6)
    stats = net[1].running_mean.clone()
    for out in (net.train()(x), net.eval()(x)):
        torch.testing.assert_close(out, reference(x), rtol=1e-6, atol=1e-6)
    assert torch.equal(net[1].running_mean, stats)  # nothing updated, even in train mode
    counts = lf.count_parameters(net)
    assert counts.frozen == 2 * 4 + 2 * 8
    assert "FrozenBatchNorm" in repr(net)


def test_state_dicts_load_both_ways() -> None:
    plain, frozen = _net(), _net()
    lf.freeze_batchnorm(frozen)
    assert list(plain.state_dict()) == list(frozen.state_dict())
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.5)
    frozen.load_state_dict(plain.state_dict())
    torch.testing.assert_close(frozen[1].weight, plain[1].weight, rtol=0, atol=0)
    back = _net()
    back.load_state_dict(frozen.state_dict())
    torch.testing.assert_close(back[5].running_var, plain[5].running_var, rtol=0, atol=0)


def test_a_selection_and_the_way_back_keep_the_optimizer_in_step() -> None:
    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.5)
    fz = lf.Freezer(net, opt)
    assert lf.freeze_batchnorm(net, "[0:3]") == ["1"]
    assert isinstance(net[5], nn.BatchNorm1d)
    w = net[1].weight.detach().clone()
    x = torch.randn(8, 3, 6, 6)
    for _ in range(2):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()  # the guard checks after each step: no weight decay moved it
    assert torch.equal(net[1].weight, w)
    fz.check()
    assert lf.unfreeze_batchnorm(net) == ["1"]
    assert type(net[1]) is nn.BatchNorm2d and net[1].training and net[1].weight.requires_grad
    opt.zero_grad()
    net(x).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(net[1].weight, w)


def test_in_lightning() -> None:
    pytest.importorskip("lightning.pytorch")
    spec = importlib.util.spec_from_file_location("_lf_lt", pathlib.Path(__file__).with_name("test_lightning.py"))
    assert spec is not None and spec.loader is not None
    lt: Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lt)
    from layerfreeze.lightning import LayerFreeze

    class WithNorm(lt.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.backbone.insert(1, nn.BatchNorm1d(8))
            lf.freeze_batchnorm(self, "backbone")

    module = WithNorm()
    stats = module.backbone[1].running_mean.clone()
    w = module.backbone[1].weight.detach().clone()
    lt._trainer(2, [LayerFreeze(lf.Schedule().freeze("head", until_epoch=1))]).fit(module, lt._loader())
    assert torch.equal(module.backbone[1].running_mean, stats)
    assert torch.equal(module.backbone[1].weight, w)
