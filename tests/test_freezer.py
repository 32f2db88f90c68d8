"""Freezer: optimizer sync, guard, schedule transitions, and the seed experiment."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import layerfreeze as lf

FC2 = ["fc2.weight", "fc2.bias"]


def step(model: nn.Module, opt: torch.optim.Optimizer, *, set_to_none: bool = True) -> None:
    opt.zero_grad(set_to_none=set_to_none)
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(2))
    model(x).pow(2).mean().backward()
    opt.step()


def group_ids(opt: torch.optim.Optimizer) -> list[list[int]]:
    return [[id(p) for p in g["params"]] for g in opt.param_groups]


def filtered_adam(net: nn.Module, **kw: float) -> torch.optim.Optimizer:
    """The seed's alternative: an optimizer built from the trainable parameters only."""
    return torch.optim.Adam(filter(lambda p: p.requires_grad, net.parameters()), **kw)


# --------------------------------------------------------------------------- optimizer sync


def test_freeze_and_unfreeze_with_an_optimizer_holding_everything(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    groups = group_ids(opt)
    fz = lf.Freezer(net, opt)
    assert fz.freeze("fc2") == FC2
    assert not net.fc2.weight.requires_grad and lf.count_parameters(net).trainable == 61
    assert fz.unfreeze("fc2") == FC2
    assert net.fc2.weight.requires_grad
    assert group_ids(opt) == groups  # already held: nothing added


def test_unfreeze_adds_a_missing_parameter_as_a_new_group(net):
    lf.freeze(net, "fc2")
    opt = filtered_adam(net, lr=0.1)
    fz = lf.Freezer(net, opt)
    fz.unfreeze("fc2")
    assert len(opt.param_groups) == 2
    new = opt.param_groups[1]
    assert new["params"][0] is net.fc2.weight and new["params"][1] is net.fc2.bias
    assert new["lr"] == 0.1 and new["initial_lr"] == 0.1
    # the defaults of the optimizer fill the rest of the group
    assert new["betas"] == opt.param_groups[0]["betas"]


@pytest.mark.parametrize(
    ("unfreeze_lr", "lr", "expected"),
    [(None, None, 0.1), (0.05, None, 0.05), (0.05, 0.01, 0.01), (None, 0.02, 0.02)],
)
def test_new_group_lr_precedence(net, unfreeze_lr, lr, expected):
    lf.freeze(net, "fc2")
    opt = filtered_adam(net, lr=0.1)
    fz = lf.Freezer(net, opt, unfreeze_lr=unfreeze_lr)
    fz.unfreeze("fc2", lr=lr)
    assert opt.param_groups[1]["lr"] == expected
    assert opt.param_groups[1]["initial_lr"] == expected


def test_group_zero_lr_is_its_initial_lr_under_a_scheduler(net):
    lf.freeze(net, "fc2")
    opt = filtered_adam(net, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    step(net, opt)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    fz = lf.Freezer(net, opt, lr_scheduler=sched)
    fz.unfreeze("fc2")
    assert opt.param_groups[1]["initial_lr"] == pytest.approx(0.1)
    # a scheduler resumed on this optimizer needs initial_lr in every group
    resumed = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5, last_epoch=3)
    assert len(resumed.base_lrs) == 2


def test_newly_added_group_actually_trains(net):
    lf.freeze(net, "fc2")
    opt = filtered_adam(net, lr=0.1)
    fz = lf.Freezer(net, opt)
    fz.unfreeze("fc2")
    w = net.fc2.weight.detach().clone()
    step(net, opt)
    assert not torch.equal(net.fc2.weight, w)


def test_unfreezing_twice_adds_no_second_group(net):
    lf.freeze(net, "fc2")
    opt = filtered_adam(net, lr=0.1)
    fz = lf.Freezer(net, opt)
    fz.unfreeze("fc2")
    fz.freeze("fc2")
    fz.unfreeze("fc2")
    assert len(opt.param_groups) == 2
    assert sum(len(g["params"]) for g in opt.param_groups) == 10


def test_on_missing_raise_refuses_and_changes_nothing(net, take_snapshot):
    lf.freeze(net, "fc2", "fc3")
    opt = filtered_adam(net, lr=0.1)
    fz = lf.Freezer(net, opt, on_missing="raise")
    before = take_snapshot(net, opt)
    with pytest.raises(lf.OptimizerSyncError, match=r"fc2\.weight, fc2\.bias.*belong to no param group") as info:
        fz.unfreeze("fc2")
    assert isinstance(info.value, ValueError)
    assert take_snapshot(net, opt) == before
    # the plain function goes through the same road, so it is refused too
    with pytest.raises(lf.OptimizerSyncError, match="on_missing='add'"):
        lf.unfreeze(net, "fc3")
    assert take_snapshot(net, opt) == before


def test_bad_arguments(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="on_missing='skip' must be 'add' or 'raise'"):
        lf.Freezer(net, opt, on_missing="skip")
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got list"):
        lf.Freezer(net, [opt])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="guard must be True, False or a positive step interval"):
        lf.Freezer(net, opt, guard=-1)
    fz = lf.Freezer(net, opt)
    with pytest.raises(ValueError, match="lr must be a finite non-negative number"):
        fz.unfreeze("fc2", lr=-1.0)


def test_stale_zero_grad_of_a_frozen_parameter_does_not_move_it(net):
    opt = torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.5)
    fz = lf.Freezer(net, opt)
    step(net, opt)  # every parameter has Adam state now
    fz.freeze("fc2")
    w = net.fc2.weight.detach().clone()
    for _ in range(2):
        net.fc2.weight.grad = torch.zeros_like(net.fc2.weight)  # stale grad left by other code
        step(net, opt, set_to_none=False)
    assert torch.equal(net.fc2.weight, w)


# --------------------------------------------------------------------------- optimizer state


def test_release_state_drops_optimizer_state_of_frozen_params(net):
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    fz = lf.Freezer(net, opt, release_state=True)
    step(net, opt)
    assert net.fc2.weight in opt.state
    fz.freeze("fc2")
    assert net.fc2.weight not in opt.state and net.fc2.bias not in opt.state
    assert net.fc1.weight in opt.state
    fz.unfreeze("fc2")
    step(net, opt)
    assert float(opt.state[net.fc2.weight]["step"]) == 1  # momentum starts afresh
    assert float(opt.state[net.fc1.weight]["step"]) == 2


def test_kept_state_lets_momentum_resume(net):
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    fz = lf.Freezer(net, opt)
    step(net, opt)
    fz.freeze("fc2")
    saved = {k: v.clone() for k, v in opt.state[net.fc2.weight].items()}
    step(net, opt)
    for k, v in opt.state[net.fc2.weight].items():  # untouched while frozen
        assert torch.equal(v, saved[k]), k
    fz.unfreeze("fc2")
    step(net, opt)
    assert float(opt.state[net.fc2.weight]["step"]) == 2


# --------------------------------------------------------------------------- guard


def nudge(t: torch.Tensor, index: int, toward: float = float("inf")) -> None:
    """Move one element by the smallest float step."""
    flat = t.data.view(-1)
    flat[index] = torch.nextafter(flat[index], torch.tensor(toward, dtype=t.dtype))


@pytest.mark.parametrize("toward", [float("inf"), float("-inf")], ids=["up", "down"])
def test_guard_catches_a_one_ulp_change_of_any_single_element(net, toward):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    fz = lf.Freezer(net, opt)
    fz.freeze("fc2")
    for name in FC2:
        p = net.get_parameter(name)
        for i in range(p.numel()):
            before = p.detach().clone()
            nudge(p, i, toward)
            assert not torch.equal(p, before)
            with pytest.raises(lf.FrozenParameterChanged, match=rf"frozen parameters changed value: {name}\.") as info:
                step(net, opt)  # raised by the optimizer's step post-hook
            assert info.value.names == [name]
            assert isinstance(info.value, RuntimeError)
            p.data.copy_(before)
            fz.refresh()
            fz.check()


def test_guard_sees_sign_of_zero(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    fz = lf.Freezer(net, opt)
    fz.freeze("fc2")
    net.fc2.bias.data[1] = 0.0
    fz.refresh()
    net.fc2.bias.data[1] = -0.0
    with pytest.raises(lf.FrozenParameterChanged, match="fc2.bias"):
        fz.check()


def test_guard_names_the_likely_cause_and_check_runs_on_demand(net):
    fz = lf.Freezer(net)  # no optimizer: only check() verifies
    fz.freeze("fc2", "fc4.bias")
    with torch.no_grad():
        net.fc4.bias.add_(1.0)
    with pytest.raises(lf.FrozenParameterChanged, match=r"fc4\.bias\. Likely causes: .*Freezer\.refresh\(\)") as info:
        fz.check()
    assert info.value.names == ["fc4.bias"]


def test_refresh_accepts_a_deliberate_change(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    fz = lf.Freezer(net, opt)
    fz.freeze("fc2")
    with torch.no_grad():
        net.fc2.weight.mul_(2)
    fz.refresh()
    fz.check()
    step(net, opt)


def test_guard_off_does_not_check_after_steps(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    fz = lf.Freezer(net, opt, guard=False)
    fz.freeze("fc2")
    with torch.no_grad():
        net.fc2.weight.add_(1.0)
    step(net, opt)  # no per-step verification


def test_check_with_guard_off_compares_with_the_freeze_time_fingerprint(net):
    # check() used to fingerprint the parameters afresh when guard=False, so it
    # could never see a change made before it was called
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    fz = lf.Freezer(net, opt, guard=False)
    fz.freeze("fc2")
    step(net, opt)
    fz.check()  # nothing moved yet
    with torch.no_grad():
        net.fc2.bias[1] += 1e-3  # one element, changed in place
    with pytest.raises(lf.FrozenParameterChanged, match="fc2.bias") as info:
        fz.check()
    assert info.value.names == ["fc2.bias"]
    fz.check()  # reported once: the new value is the reference from now on


def test_check_with_guard_off_sees_parameters_frozen_before_the_freezer(net):
    lf.freeze(net, "fc3")
    fz = lf.Freezer(net, guard=False)
    with torch.no_grad():
        net.fc3.weight.mul_(2)
    with pytest.raises(lf.FrozenParameterChanged, match="fc3.weight"):
        fz.check()


def test_guard_every_n_steps(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    fz = lf.Freezer(net, opt, guard=3)
    fz.freeze("fc2")
    with torch.no_grad():
        net.fc2.weight.add_(1.0)
    step(net, opt)
    step(net, opt)
    with pytest.raises(lf.FrozenParameterChanged):
        step(net, opt)


def test_guard_follows_parameters_frozen_by_hand(net):
    fz = lf.Freezer(net)
    net.fc5.bias.requires_grad_(False)  # not through layerfreeze: fingerprinted at next check
    fz.check()
    with torch.no_grad():
        net.fc5.bias.add_(1.0)
    with pytest.raises(lf.FrozenParameterChanged, match="fc5.bias"):
        fz.check()


def test_close_detaches_the_hooks(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    fz = lf.Freezer(net, opt)
    fz.freeze("fc2")
    fz.close()
    with torch.no_grad():
        net.fc2.weight.add_(1.0)
    step(net, opt)  # no guard any more
    assert fz.optimizer_steps == 0


# --------------------------------------------------------------------------- schedule


def test_set_epoch_returns_transitions(net):
    fz = lf.Freezer(net, None, lf.Schedule().freeze("fc2", until_epoch=4))
    made = fz.set_epoch(1)
    assert len(made) == 1
    t = made[0]
    assert isinstance(t, lf.Transition)
    assert (t.action, t.names, t.count, t.trainable, t.epoch) == ("freeze", tuple(FC2), 12, 61, 1)
    assert fz.set_epoch(2) == [] and fz.set_epoch(3) == []
    (t,) = fz.set_epoch(4)
    assert (t.action, t.names, t.count, t.trainable, t.epoch) == ("unfreeze", tuple(FC2), 12, 73, 4)
    assert "unfroze 12 params" in str(t)


def test_set_step_and_bad_time(net):
    fz = lf.Freezer(net, None, lf.Schedule().freeze("fc1", from_step=10))
    assert fz.set_step(9) == []
    (t,) = fz.set_step(10)
    assert t.step == 10 and t.action == "freeze"
    with pytest.raises(TypeError, match="epoch must be an int"):
        fz.set_epoch(1.5)  # type: ignore[arg-type]


def test_schedule_is_checked_against_the_model_up_front(net):
    with pytest.raises(lf.SelectorError, match=r"rule 0 \(freeze\).*selector 'fc6' matches nothing"):
        lf.Freezer(net, None, lf.Schedule().freeze("fc6", until_epoch=2))


# --------------------------------------------------------------------------- the seed experiment


def run_seed(net: nn.Module, opt: torch.optim.Optimizer, *, set_to_none: bool = True) -> tuple[list[int], list]:
    gen = torch.Generator().manual_seed(3)
    x, target = torch.randn(10, generator=gen), torch.randn(1, generator=gen)
    fz = lf.Freezer(net, opt, lf.Schedule().freeze("fc2", until_epoch=4))
    trainable, values = [], []
    for epoch in range(1, 10):
        fz.set_epoch(epoch)
        trainable.append(lf.count_parameters(net).trainable)
        opt.zero_grad(set_to_none=set_to_none)
        nn.functional.mse_loss(net(x), target).backward()
        opt.step()
        values.append({n: p.detach().clone() for n, p in net.named_parameters()})
    return trainable, values


def load_pretrained_fc2(net: nn.Module) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        net.fc2.weight.copy_(torch.rand(3, 3, generator=gen))
        net.fc2.bias.copy_(torch.rand(3, generator=gen))
    return {n: net.get_parameter(n).detach().clone() for n in FC2}


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def check_seed(trainable: list[int], values: list, pretrained: dict[str, torch.Tensor]) -> None:
    assert trainable == [61, 61, 61] + [73] * 6
    for epoch in (1, 2, 3):
        for n in FC2:
            assert bitwise_equal(values[epoch - 1][n], pretrained[n]), (epoch, n)
    for n in FC2:
        assert not torch.equal(values[3][n], pretrained[n]), n  # moved at epoch 4
    assert not torch.equal(values[0]["fc1.weight"], values[1]["fc1.weight"])  # the rest trained all along


def test_seed_with_adam_on_all_parameters(net):
    pretrained = load_pretrained_fc2(net)
    check_seed(*run_seed(net, torch.optim.Adam(net.parameters(), lr=0.1)), pretrained)


def test_seed_with_adamw_weight_decay_and_zero_grads(net):
    pretrained = load_pretrained_fc2(net)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.1)
    for p in net.parameters():  # zero grads left over from earlier code
        p.grad = torch.zeros_like(p)
    check_seed(*run_seed(net, opt, set_to_none=False), pretrained)


def test_seed_with_an_optimizer_of_trainable_params_only(net):
    pretrained = load_pretrained_fc2(net)
    lf.freeze(net, "fc2")
    opt = filtered_adam(net, lr=0.1)
    assert len(opt.param_groups[0]["params"]) == 8
    check_seed(*run_seed(net, opt), pretrained)
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.1


def test_a_later_freeze_does_not_accept_an_earlier_change(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    fz = lf.Freezer(net, opt)
    fz.freeze("fc2")
    with torch.no_grad():
        net.fc2.weight.add_(1.0)
    fz.freeze("fc4")  # following this change must not bless fc2's new values
    fz.unfreeze("fc5.bias")
    with pytest.raises(lf.FrozenParameterChanged, match=r"fc2\.weight") as info:
        step(net, opt)
    assert info.value.names == ["fc2.weight"]


def test_unfreeze_then_refreeze_takes_new_fingerprints(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    fz = lf.Freezer(net, opt)
    fz.freeze("fc2")
    fz.unfreeze("fc2")
    step(net, opt)  # fc2 trains while unfrozen
    fz.freeze("fc2")
    step(net, opt)
    fz.check()
