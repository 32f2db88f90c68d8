"""freeze / unfreeze / frozen: flags, gradients, module modes, identity, wrappers."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from tests.conftest import encoder_layer as layer
from torch import nn

import layerfreeze as lf
from layerfreeze.core import kept_in_eval

# torch.compile imports torch.jit, which warns about its own deprecation
COMPILE_WARNINGS = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def flags(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def backward(model: nn.Module, x: torch.Tensor) -> None:
    model(x).sum().backward()


def images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 5, 5, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- flags and gradients


def test_freeze_sets_flags_drops_grads_and_returns_names(net):
    backward(net, torch.randn(2, 10))
    assert all(p.grad is not None for p in net.parameters())
    names = lf.freeze(net, "fc2")
    assert names == ["fc2.weight", "fc2.bias"]
    assert flags(net) == {n: not n.startswith("fc2") for n, _ in net.named_parameters()}
    assert net.fc2.weight.grad is None and net.fc2.bias.grad is None
    assert net.fc1.weight.grad is not None  # untouched outside the selection


def test_frozen_parameter_gets_no_gradient(net):
    lf.freeze(net, "fc2")
    backward(net, torch.randn(2, 10))
    assert net.fc2.weight.grad is None
    assert net.fc1.weight.grad is not None  # gradients still flow through fc2


def test_unfreeze_reverses_and_returns_names(net):
    lf.freeze(net)
    assert not any(flags(net).values())
    assert lf.unfreeze(net, "fc2", "fc4.bias") == ["fc2.weight", "fc2.bias", "fc4.bias"]
    assert {n for n, f in flags(net).items() if f} == {"fc2.weight", "fc2.bias", "fc4.bias"}
    assert lf.unfreeze(net) == [n for n, _ in net.named_parameters()]
    assert all(flags(net).values())


def test_freeze_is_idempotent(net):
    lf.freeze(net, "fc2")
    assert lf.freeze(net, "fc2") == ["fc2.weight", "fc2.bias"]
    assert lf.count_parameters(net).trainable == 61


def test_parameters_are_never_replaced(cnn):
    ids = {n: id(p) for n, p in cnn.named_parameters()}
    buffers = {n: id(b) for n, b in cnn.named_buffers()}
    lf.freeze(cnn, "features", mode="eval")
    lf.unfreeze(cnn, "features[0:2]")
    with lf.frozen(cnn):
        pass
    lf.unfreeze(cnn)
    assert {n: id(p) for n, p in cnn.named_parameters()} == ids
    assert {n: id(b) for n, b in cnn.named_buffers()} == buffers
    assert all(isinstance(p, nn.Parameter) for p in cnn.parameters())


def test_state_dict_keys_unchanged_by_a_hold(cnn):
    keys = list(cnn.state_dict())
    lf.freeze(cnn, "features", mode="eval")
    assert list(cnn.state_dict()) == keys
    assert type(cnn.features[1]) is nn.BatchNorm2d


def test_tied_weight_freezes_with_its_alias(tied_lm):
    assert lf.freeze(tied_lm, "lm_head") == ["embed.weight", "lm_head.bias"]
    assert not tied_lm.embed.weight.requires_grad
    assert tied_lm.block.weight.requires_grad
    lf.unfreeze(tied_lm, "embed")
    assert tied_lm.lm_head.weight.requires_grad


# --------------------------------------------------------------------------- mode="norm"


def test_norm_mode_holds_batchnorm_in_eval_across_train(cnn):
    lf.freeze(cnn, "features")
    cnn.train()
    bn = [cnn.features[1], cnn.features[4]]
    assert [m.training for m in bn] == [False, False]
    # only normalization layers are held: conv and dropout follow model.train()
    assert cnn.features[0].training and cnn.features[6].training and cnn.features.training
    assert kept_in_eval(cnn) == {"features.1": "norm", "features.4": "norm"}


def test_norm_mode_keeps_running_stats_in_train_mode(cnn):
    lf.freeze(cnn, "features")
    cnn.train()
    stats = {n: b.clone() for n, b in cnn.named_buffers()}
    cnn(images())
    for n, b in cnn.named_buffers():
        assert torch.equal(b, stats[n]), n


def test_norm_mode_skips_a_batchnorm_only_partly_selected(cnn):
    lf.freeze(cnn, "features.1.weight")
    cnn.train()
    assert cnn.features[1].training
    assert kept_in_eval(cnn) == {}


def test_unfreeze_lets_batchnorm_follow_model_mode_again(cnn):
    lf.freeze(cnn, "features")
    cnn.eval()
    lf.unfreeze(cnn, "features")
    assert kept_in_eval(cnn) == {}
    cnn.train()
    assert cnn.features[1].training and cnn.features[4].training
    before = cnn.features[1].running_mean.clone()
    cnn(images())
    assert not torch.equal(cnn.features[1].running_mean, before)
    cnn.eval()
    assert not cnn.features[1].training


def test_unfreeze_restores_the_mode_last_requested(cnn):
    lf.freeze(cnn, "features")
    cnn.eval()
    lf.unfreeze(cnn)
    assert not cnn.features[1].training  # model.eval() was asked for while held


def test_partial_unfreeze_releases_only_modules_without_frozen_params(cnn):
    lf.freeze(cnn, "features")
    lf.unfreeze(cnn, "features.1")
    assert kept_in_eval(cnn) == {"features.4": "norm"}
    lf.unfreeze(cnn, "features.4.weight")  # features.4.bias still frozen: keep the hold
    assert kept_in_eval(cnn) == {"features.4": "norm"}
    lf.unfreeze(cnn, "features.4.bias")
    assert kept_in_eval(cnn) == {}


# --------------------------------------------------------------------------- mode="eval"


def test_eval_mode_holds_the_whole_subtree_and_is_deterministic(cnn):
    lf.freeze(cnn, "features", mode="eval")
    cnn.train()
    assert not any(m.training for m in cnn.features.modules())
    assert cnn.head.training
    x = images()
    stats = {n: b.clone() for n, b in cnn.named_buffers()}
    feats = [cnn.features(x) for _ in range(3)]
    assert torch.equal(feats[0], feats[1]) and torch.equal(feats[1], feats[2])
    assert all(torch.equal(b, stats[n]) for n, b in cnn.named_buffers())


def test_without_eval_mode_dropout_makes_features_random(cnn):
    # the contrast to the test above: same model, mode="norm" leaves dropout on
    lf.freeze(cnn, "features")
    cnn.train()
    x = images()
    assert not torch.equal(cnn.features(x), cnn.features(x))


def test_eval_hold_survives_eval_then_train(cnn):
    lf.freeze(cnn, "features", mode="eval")
    cnn.eval()
    cnn.train()
    assert not cnn.features[6].training
    lf.unfreeze(cnn, "features")
    cnn.train()
    assert all(m.training for m in cnn.modules())


def test_eval_upgrades_an_existing_norm_hold(cnn):
    lf.freeze(cnn, "features")
    lf.freeze(cnn, "features", mode="eval")
    assert kept_in_eval(cnn)["features.1"] == "eval"
    assert kept_in_eval(cnn)["features.6"] == "eval"


# --------------------------------------------------------------------------- mode="keep"


def test_keep_mode_touches_no_modes(cnn):
    lf.freeze(cnn, "features", mode="keep")
    assert kept_in_eval(cnn) == {}
    cnn.train()
    assert all(m.training for m in cnn.modules())
    before = cnn.features[1].running_var.clone()
    cnn(images())
    assert not torch.equal(cnn.features[1].running_var, before)
    assert not cnn.features[1].weight.requires_grad


# --------------------------------------------------------------------------- wrappers


@COMPILE_WARNINGS
def test_compiled_model_uses_inner_names(net):
    compiled = torch.compile(net)
    assert [n for n, _ in compiled.named_parameters()][0].startswith("_orig_mod.")
    assert lf.freeze(compiled, "fc2") == ["fc2.weight", "fc2.bias"]
    assert not net.fc2.weight.requires_grad
    assert lf.select(compiled, "fc2.bias") == ["fc2.bias"]
    assert lf.count_parameters(compiled).trainable == 61
    assert lf.unfreeze(compiled) == [n for n, _ in net.named_parameters()]


@COMPILE_WARNINGS
def test_compiled_model_errors_name_inner_model(net):
    with pytest.raises(lf.SelectorError, match=r"matches nothing in Net(.|\n)*closest names: 'fc2'"):
        lf.freeze(torch.compile(net), "_orig_mod.fc2x")


# --------------------------------------------------------------------------- frozen()


def test_frozen_restores_flags_modes_and_holds(cnn, take_snapshot):
    lf.freeze(cnn, "features[0]", mode="eval")  # a freeze made before the block
    cnn.train()
    before = take_snapshot(cnn)
    with lf.frozen(cnn, "features", mode="eval") as names:
        assert names == [n for n, _ in cnn.features.named_parameters(prefix="features")]
        assert not any(p.requires_grad for p in cnn.features.parameters())
        assert not any(m.training for m in cnn.features.modules())
        cnn.eval()  # mode changes inside the block are undone too
    assert take_snapshot(cnn) == before
    assert kept_in_eval(cnn) == {"features.0": "eval"}
    assert not cnn.features[0].weight.requires_grad
    assert cnn.features[1].training


def test_frozen_restores_on_exception(cnn, take_snapshot):
    cnn.train()
    before = take_snapshot(cnn)
    with pytest.raises(RuntimeError, match="boom"):
        with lf.frozen(cnn, nn.BatchNorm2d):
            assert kept_in_eval(cnn) == {"features.1": "norm", "features.4": "norm"}
            raise RuntimeError("boom")
    assert take_snapshot(cnn) == before
    assert kept_in_eval(cnn) == {}


def test_frozen_puts_dropped_grads_back(net):
    backward(net, torch.randn(2, 10))
    grads = {n: p.grad for n, p in net.named_parameters()}
    with lf.frozen(net, "fc2", "fc3.bias"):
        assert net.fc2.weight.grad is None and net.fc3.bias.grad is None
    for n, p in net.named_parameters():
        assert p.grad is grads[n], n
        assert p.requires_grad


def test_frozen_blocks_training_inside(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    w = net.fc2.weight.detach().clone()
    with lf.frozen(net, "fc2"):
        opt.zero_grad()
        backward(net, torch.randn(2, 10))
        opt.step()
    assert torch.equal(net.fc2.weight, w)
    opt.zero_grad()
    backward(net, torch.randn(2, 10))
    opt.step()
    assert not torch.equal(net.fc2.weight, w)


def test_frozen_whole_model_on_tied_weights(tied_lm):
    with lf.frozen(tied_lm) as names:
        assert names == ["embed.weight", "block.weight", "block.bias", "lm_head.bias"]
        assert not tied_lm.lm_head.weight.requires_grad
    assert tied_lm.lm_head.weight.requires_grad and tied_lm.embed.weight.requires_grad


def test_frozen_restores_what_an_earlier_hold_remembers(cnn, take_snapshot):
    lf.freeze(cnn, "features")  # norm holds on both BatchNorms
    lf.freeze(cnn, "head", mode="eval")
    cnn.train()
    before = take_snapshot(cnn)
    with lf.frozen(cnn, mode="eval"):
        assert kept_in_eval(cnn)["features.1"] == "eval"  # upgraded inside the block
        cnn.eval()
    assert take_snapshot(cnn) == before
    assert kept_in_eval(cnn)["features.1"] == "norm"
    # the held modules remember that model.train() was the last request
    lf.unfreeze(cnn)
    assert all(m.training for m in cnn.modules())


def test_unfreezing_every_piece_releases_containers_and_dropout(cnn):
    lf.freeze(cnn, "features", mode="eval")
    lf.unfreeze(cnn, r"re:features\.\d\.(weight|bias)")  # every parameter, named one by one
    assert kept_in_eval(cnn) == {}
    cnn.train()
    assert all(m.training for m in cnn.modules())


def test_unfreezing_all_children_releases_the_root(cnn):
    lf.freeze(cnn, mode="eval")
    lf.unfreeze(cnn, "features")
    assert set(kept_in_eval(cnn)) == {"", "head"}  # head is still frozen
    lf.unfreeze(cnn, "head")
    assert kept_in_eval(cnn) == {}
    cnn.train()
    assert cnn.training


def test_a_deliberate_dropout_hold_survives_unrelated_unfreezes(cnn):
    assert lf.freeze(cnn, "features[6]", mode="eval") == []  # no parameters, only the mode
    lf.freeze(cnn, "head")
    lf.unfreeze(cnn, "head")
    assert kept_in_eval(cnn) == {"features.6": "eval"}
    lf.unfreeze(cnn, "features[6]")
    assert kept_in_eval(cnn) == {}


def test_norm_mode_holds_only_norm_layers_with_running_statistics():
    """What the README says mode="norm" holds: BatchNorm/InstanceNorm that track
    running statistics go to eval mode; LayerNorm, GroupNorm and untracked
    InstanceNorm stay in train mode (they have nothing to protect)."""
    net = nn.Sequential(
        nn.Linear(4, 4), nn.BatchNorm1d(4), nn.LayerNorm(4), nn.GroupNorm(2, 4),
        nn.InstanceNorm1d(4, track_running_stats=True), nn.InstanceNorm1d(4), nn.Dropout(0.1),
    )
    lf.freeze(net)
    net.train()
    assert [m.training for m in net] == [True, False, True, True, False, True, True]


# --------------------------------------------------------------------------- the functions on a BERT-shaped model


@pytest.mark.parametrize(
    "bad",
    [
        lambda m: lf.freeze(m, 3),  # an unknown selector form
        lambda m: lf.freeze(m, "norm", exclude="norm"),  # exclude removes everything
        lambda m: lf.freeze(m.state_dict()),  # not a Module
    ],
)
def test_bad_input_raises_and_changes_nothing(encoder, bad: Any) -> None:
    m = encoder
    with pytest.raises((ValueError, TypeError)):
        bad(m)
    assert all(p.requires_grad for p in m.parameters())


def test_freeze_unfreeze_and_their_modes(encoder) -> None:
    m = encoder
    m.train()
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    names = lf.freeze(m, "encoder.layer[0]", "norm")  # mode="norm" by default
    assert names == layer(0) + ["norm.weight", "norm.bias"]
    assert all(not p.requires_grad and p.grad is None for n, p in m.named_parameters() if n in names)
    m.train()
    assert not m.norm.training  # running statistics stay frozen across model.train()
    assert m.encoder.layer[0]["dropout"].training  # "norm" leaves dropout alone
    assert lf.unfreeze(m, "norm") == ["norm.weight", "norm.bias"]
    m.train()
    assert m.norm.training

    lf.freeze(m, "encoder.layer[1]", mode="eval")
    m.train()
    assert not m.encoder.layer[1]["dropout"].training  # the whole subtree is held in eval
    lf.freeze(m, "norm", mode="keep")
    m.train()
    assert m.norm.training  # "keep" touches no modes

    assert lf.unfreeze(m) == lf.select(m)  # no selector: the whole model
    m.train()
    assert all(p.requires_grad for p in m.parameters()) and all(x.training for x in m.modules())
    assert lf.freeze(m) == lf.select(m)
    assert lf.count_parameters(m).trainable == 0


def test_frozen_context_restores_flags_and_modes_even_on_error(encoder) -> None:
    m = encoder
    lf.freeze(m, "norm")
    m.train()
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    modes = {n: x.training for n, x in m.named_modules()}
    with pytest.raises(RuntimeError, match="inside"):
        with lf.frozen(m, "encoder", mode="eval") as names:
            assert names == lf.select(m, "encoder")
            m.train()
            assert not m.encoder.layer[0]["dropout"].training
            raise RuntimeError("inside")
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    assert {n: x.training for n, x in m.named_modules()} == modes
    m.train()
    assert not m.norm.training and m.encoder.layer[0]["dropout"].training


def test_frozen_restores_gradients_even_when_the_block_unfreezes(net) -> None:
    net(torch.randn(2, 10)).sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    with lf.frozen(net):
        lf.unfreeze(net)
    for n, p in net.named_parameters():
        assert p.requires_grad
        assert p.grad is not None and torch.equal(p.grad, grads[n]), n


# --------------------------------------------------------------------------- tied weights: the trap and the fix


def test_trap_tied_weights_silent_alias_and_double_count(tied_lm):
    def plain_freeze(prefix: str, flag: bool = False) -> None:  # what the seed does: flip requires_grad by name
        for name, p in tied_lm.named_parameters():
            if name.count(prefix):
                p.requires_grad = flag

    # freezing the embedding by name silently freezes the head's weight too
    plain_freeze("embed")
    assert not tied_lm.lm_head.weight.requires_grad
    # ... while freezing the head by name misses its weight: named_parameters()
    # yields the shared tensor only under its first name
    plain_freeze("embed", flag=True)
    plain_freeze("lm_head")
    assert tied_lm.lm_head.weight.requires_grad
    # and counting module by module, or by state dict, counts it twice
    unique = 252
    per_module = sum(p.numel() for m in tied_lm.children() for p in m.parameters())
    by_state_dict = sum(t.numel() for t in tied_lm.state_dict().values())
    assert per_module == by_state_dict == unique + tied_lm.embed.weight.numel()


def test_layerfreeze_handles_tied_weights(tied_lm, caplog):
    assert lf.freeze(tied_lm, "lm_head") == ["embed.weight", "lm_head.bias"]
    assert not tied_lm.lm_head.weight.requires_grad  # the head's weight is frozen as asked
    assert lf.count_parameters(tied_lm) == lf.ParamCount(trainable=72, frozen=180, total=252)
    lf.unfreeze(tied_lm)
    with caplog.at_level(logging.INFO, logger="layerfreeze"):
        lf.freeze(tied_lm, "embed")
    assert "embed.weight is shared with lm_head.weight: both change together" in caplog.text


# --------------------------------------------------------------------------- apply_change


def test_apply_change_with_an_unknown_name_is_a_selector_error(net) -> None:
    with pytest.raises(lf.SelectorError, match=r"freeze= names parameter\(s\) this model does not have: \['nope'\]"):
        lf.apply_change(net, freeze=["nope"])
    with pytest.raises(lf.SelectorError, match="closest names: 'fc1.weight'"):
        lf.apply_change(net, freeze=["fc1.wieght"])
    with pytest.raises(lf.SelectorError, match="hold= names module"):
        lf.apply_change(net, freeze=["fc1.weight"], hold={"fc9": "eval"})
    assert net.fc1.weight.requires_grad  # nothing changed
