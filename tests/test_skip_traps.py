"""Skipping the frozen prefix where something outside the prefix's modules feeds
it, or the model changes under it: each case trains (or runs) the same model
with and without ``cache=`` and asks for the same numbers."""

import copy
import gc
import threading
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import layerfreeze as lf
from layerfreeze.skip.proof import PROOF_ROWS

TOL = {"rtol": 1e-5, "atol": 1e-6}


def lockstep(net, schedule, batches, loss, epochs=3, each_epoch=None, each_step=None):
    """Train ``net`` without cache and a copy with ``cache=True`` side by side
    (SGD, same batches); return both models, the cached Freezer and the warnings."""
    ref, cached = net, copy.deepcopy(net)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, cached)]
    fa = lf.Freezer(ref, opts[0], copy.deepcopy(schedule))
    fb = lf.Freezer(cached, opts[1], schedule, cache=True)
    step = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(epochs):
            fa.set_epoch(epoch)
            fb.set_epoch(epoch)
            if each_epoch is not None:
                for m in (ref, cached):
                    each_epoch(epoch, m)
            for batch in batches:
                if each_step is not None:
                    for m in (ref, cached):
                        each_step(step, m)
                losses = []
                for m, opt in zip((ref, cached), opts, strict=True):
                    opt.zero_grad()
                    value = loss(m, batch)
                    value.backward()
                    opt.step()
                    losses.append(value.detach())
                torch.testing.assert_close(losses[1], losses[0], **TOL, msg=f"step {step}")
                step += 1
    return ref, cached, fb, [str(w.message) for w in caught if "layerfreeze" in str(w.message)]


def beside(net, schedule):
    """A plain copy of ``net`` under a Freezer without cache, and ``net``'s Freezer with it, at epoch 0."""
    ref = copy.deepcopy(net)
    lf.Freezer(ref, None, copy.deepcopy(schedule)).set_epoch(0)
    fz = lf.Freezer(net, None, schedule, cache=True)
    fz.set_epoch(0)
    return ref, fz


class Scaled(nn.Module):
    """The forward's own module touches the input before the frozen body sees it."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.ones(5))
        self.register_buffer("mean", torch.zeros(5))
        self.temperature = 1.0
        self.shift = torch.zeros(5)  # a plain tensor attribute, not a buffer
        self.settings = {"gain": 1.0}

    def forward(self, x):
        if self.how == "scale":
            x = x * self.scale
        elif self.how == "mean":
            x = x - self.mean
        elif self.how == "shift":
            x = x - self.shift
        elif self.how == "settings":
            x = x * self.settings["gain"]
        elif self.how == "mode":
            x = x * 2 if self.training else x
        else:
            x = x * self.temperature
        return self.head(self.body(x))


def data(n=16, features=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, features, generator=g), torch.randint(0, 3, (n,), generator=g)
    return [(x[:8], y[:8]), (x[8:], y[8:])]


def ce(m, batch):
    return F.cross_entropy(m(batch[0]), batch[1])


BODY = lf.Schedule().freeze(["body.0", "body.2"], mode="eval")


def test_a_trainable_parameter_of_the_forwards_own_module_before_the_prefix_is_refused():
    torch.manual_seed(0)
    ref, cached, fz, said = lockstep(Scaled("scale"), copy.deepcopy(BODY), data(), ce)
    torch.testing.assert_close(cached.scale, ref.scale, **TOL)  # it trained in both
    assert not torch.equal(cached.scale, torch.ones(5))
    assert not fz.skip_stats().skipping
    assert "requires grad" in fz.skip_stats().reason and "scale" in fz.skip_stats().reason
    assert sum("scale" in w for w in said) == 1


def test_a_parameter_of_the_forwards_own_module_unfrozen_later_is_proved_again():
    def unfreeze(epoch, m):
        m.scale.requires_grad_(epoch >= 2)

    torch.manual_seed(0)
    net = Scaled("scale")
    ref, cached, fz, _ = lockstep(net, copy.deepcopy(BODY), data(), ce, epochs=4, each_epoch=unfreeze)
    assert not torch.equal(cached.scale, torch.ones(5))  # it trained from epoch 2
    assert not fz.skip_stats().skipping and "requires grad" in fz.skip_stats().reason


def test_a_buffer_of_the_forwards_own_module_changed_in_place_drops_the_stored_outputs():
    def shift(epoch, m):
        m.mean.fill_(0.5 * epoch)

    torch.manual_seed(0)
    _, _, fz, _ = lockstep(Scaled("mean"), copy.deepcopy(BODY), data(), ce, epochs=4, each_epoch=shift)
    assert fz.skip_stats().skipping and fz.skip_stats().hits > 0


def test_a_plain_attribute_of_the_forwards_own_module_is_checked_with_the_weights():
    def heat(epoch, m):
        m.temperature = 1.0 + epoch

    torch.manual_seed(0)
    _, _, fz, _ = lockstep(Scaled("temperature"), copy.deepcopy(BODY), data(), ce, epochs=4, each_epoch=heat)
    assert fz.skip_stats().skipping and fz.skip_stats().hits > 0


@pytest.mark.parametrize("how", ["shift", "settings"])
def test_a_tensor_or_dict_attribute_of_the_forwards_own_module_changed_in_place(how):
    def change(epoch, m):
        m.shift.fill_(0.3 * epoch)
        m.settings["gain"] = 1.0 + epoch

    torch.manual_seed(0)
    _, _, fz, _ = lockstep(Scaled(how), copy.deepcopy(BODY), data(), ce, epochs=4, each_epoch=change)
    assert fz.skip_stats().skipping and fz.skip_stats().hits > 0


def test_the_forwards_own_module_reading_its_mode_before_the_prefix():
    def validate(epoch, m):  # an eval pass over the training samples between epochs
        m.eval()
        with torch.no_grad():
            for x, _ in data():
                m(x)
        m.train()

    torch.manual_seed(0)
    _, _, fz, _ = lockstep(Scaled("mode"), copy.deepcopy(BODY), data(), ce, epochs=4, each_epoch=validate)
    assert fz.skip_stats().skipping


def test_a_forward_pre_hook_on_the_forwards_own_module_stops_the_skipping():
    factor = [1.0]

    def hooked(epoch, m):
        factor[0] = 1.0 + epoch
        if epoch == 0:
            m.register_forward_pre_hook(lambda mod, args: (args[0] * factor[0],))

    torch.manual_seed(0)
    _, _, fz, said = lockstep(Scaled("temperature"), copy.deepcopy(BODY), data(), ce, epochs=3, each_epoch=hooked)
    assert not fz.skip_stats().skipping and "pre-hook" in fz.skip_stats().reason
    assert sum("pre-hook" in w for w in said) == 1


def test_a_module_replaced_deep_inside_a_prefix_part_is_learnt_again():
    torch.manual_seed(1)
    other = nn.Linear(8, 8)  # trainable: its group is then no longer frozen

    def swap(step, m):
        if step == 5:  # the last step: set_epoch does not freeze it with its group before it
            m.body[2] = copy.deepcopy(other)

    class Deep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Sequential(nn.Linear(8, 8), nn.Tanh()))
            self.top = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.top(self.body(x))))

    torch.manual_seed(0)
    ref, cached, _, said = lockstep(Deep(), lf.Schedule().freeze(["body", "top"], mode="eval"), data(), ce,
                                    epochs=3, each_step=swap)
    assert cached.body[2].weight.grad is not None  # gradients reach it (the last step's)
    torch.testing.assert_close(cached.body[2].weight.grad, ref.body[2].weight.grad, **TOL)
    assert any("was replaced" in w and "body" in w for w in said)


def test_a_prefix_module_replaced_in_the_model_is_learnt_again():
    torch.manual_seed(1)
    other = nn.Linear(6, 8).requires_grad_(False)

    def swap(step, m):
        if step == 3:
            m[1] = nn.ReLU()  # "a ReLU swapped for a Tanh"
        if step == 6:
            m[0] = copy.deepcopy(other)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    _, cached, fz, said = lockstep(net, lf.Schedule().freeze(["[0]", "[2]"], mode="eval"), data(features=6), ce,
                                   epochs=5, each_step=swap)
    assert sum("1 was replaced" in w for w in said) == 1 and sum("0 was replaced" in w for w in said) == 1
    st = fz.skip_stats()
    assert st.skipping and st.hits > 0
    assert type(cached[1]).forward is nn.ReLU.forward and "forward" in cached[1].__dict__  # the new one is skipped


class MultiTask(nn.Module):
    """Task 0 rows read the top of the stack, task 1 rows the first layer's output."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x, task):
        h1 = torch.tanh(self.a(x))
        h3 = torch.tanh(self.c(torch.tanh(self.b(h1))))
        return self.head(torch.where(task[:, None] == 0, h3, h1))


def test_batch_statistics_above_the_boundary_are_proved_on_more_than_one_row():
    # BatchNorm in training mode after the boundary needs more than one value per
    # channel: a proof on one row would fail and refuse a model that skips correctly
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(24, 6), torch.randint(0, 3, (24,))
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 24, 8)]

    def loss(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    ref, cached, fz, said = lockstep(net, lf.Schedule().freeze("[0]", mode="eval"), batches, loss)
    assert fz.skip_stats().skipping and fz.skip_stats().hits >= 24, fz.skip_stats()
    assert said == []
    torch.testing.assert_close(cached[3].running_mean, ref[3].running_mean, **TOL)


def test_a_placeholder_read_by_rows_the_proof_does_not_run_is_refused():
    torch.manual_seed(0)
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    task = torch.tensor([0] * PROOF_ROWS + [1, 0] * 6)[:12]  # the proof's rows are all task 0

    def loss(m, batch):
        return F.cross_entropy(m(batch[0], batch[2]), batch[1])

    _, _, fz, said = lockstep(MultiTask(), lf.Schedule().freeze(["a", "b"], mode="eval"), [(x, y, task)], loss)
    assert not fz.skip_stats().skipping
    assert any("reads the output of a" in w for w in said)


def test_a_left_padded_classifier_is_proved_on_its_shortest_row():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  num_labels=2)
    torch.manual_seed(0)
    net = transformers.BertForSequenceClassification(cfg)
    ref, fz = beside(net, lf.Schedule().freeze(["bert.embeddings", "bert.encoder"], mode="eval"))
    g = torch.Generator().manual_seed(0)
    lengths = [8] * PROOF_ROWS + [5, 3, 8, 2]  # the first rows are whole; the pooled position 0 is padding below
    ids = torch.zeros(len(lengths), 8, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for k, n in enumerate(lengths):
        ids[k, 8 - n:] = torch.randint(1, 60, (n,), generator=g)
        mask[k, 8 - n:] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            torch.testing.assert_close(net(input_ids=ids, attention_mask=mask).logits,
                                       ref(input_ids=ids, attention_mask=mask).logits, **TOL)


def test_an_input_that_requires_grad_gets_its_gradient():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    ref, fz = beside(net, lf.Schedule().freeze(["[0]", "[2]"], mode="eval"))
    x = torch.randn(8, 6)
    for _ in range(2):
        net(x)  # stored, then served
    assert fz.skip_stats().hits > 0
    grads = []
    for m in (ref, net):
        xi = x.clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m(xi).square().sum().backward()
        grads.append(xi.grad)
    assert grads[1] is not None
    torch.testing.assert_close(grads[1], grads[0], **TOL)
    assert fz.skip_stats().skipping  # later calls without grad still skip


def test_a_hook_added_after_skipping_started_sees_the_real_output():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    fz = lf.Freezer(net, None, lf.Schedule().freeze(["[0]", "[2]"], mode="eval"), cache=True)
    fz.set_epoch(0)
    x = torch.randn(8, 6)
    for _ in range(3):
        net(x)
    assert fz.skip_stats().hits > 0
    seen = {}
    handle = net[0].register_forward_hook(lambda m, i, o: seen.__setitem__("out", o))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net(x)
    torch.testing.assert_close(seen["out"], F.linear(x, net[0].weight, net[0].bias), **TOL)
    assert "0 has hooks" in fz.skip_stats().reason
    assert any("0 has hooks" in str(w.message) for w in caught)
    handle.remove()  # skipping resumes
    net(x)
    hits = fz.skip_stats().hits
    net(x)
    assert fz.skip_stats().skipping and fz.skip_stats().hits == hits + len(x)


def test_a_new_freezer_after_the_old_one_was_dropped_without_close_skips():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(8, 6)
    schedule = lf.Schedule().freeze(["[0]", "[2]"], mode="eval")
    old = lf.Freezer(net, None, copy.deepcopy(schedule), cache=True)
    old.set_epoch(0)
    net(x)
    net(x)
    assert old.skip_stats().hits > 0
    del old
    gc.collect()
    fz = lf.Freezer(net, None, schedule, cache=True)
    fz.set_epoch(0)
    h = torch.tanh(F.linear(torch.tanh(F.linear(x, net[0].weight, net[0].bias)), net[2].weight, net[2].bias))
    expected = F.linear(h, net[4].weight, net[4].bias)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            torch.testing.assert_close(net(x), expected, **TOL)
    assert not caught
    st = fz.skip_stats()
    assert st.skipping and st.hits > 0


class Centered(nn.Module):
    """Rows of a batch depend on each other: the batch mean is taken away."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True)


def test_a_prefix_whose_rows_depend_on_each_other_says_it_skips_nothing():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), Centered(), nn.Linear(8, 8), nn.Linear(8, 3))
    fz = lf.Freezer(net, None, lf.Schedule().freeze(["[0]", "[2]"], mode="eval"), cache=True)
    fz.set_epoch(0)
    x = torch.randn(8, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            net(x)
    st = fz.skip_stats()
    assert not st.skipping and st.entries == 0 and "not independent" in st.reason
    said = [str(w.message) for w in caught if "not independent" in str(w.message)]
    assert len(said) == 1 and said[0].count("computed, not stored") == 1


@pytest.mark.parametrize("bad", [{"pad_value": "x"}, {"pad_value": True}, {"store": "disk", "path": ""},
                                 {"store": "disk", "path": "FILE"}, {"store": "disk", "path": "FILE/below"},
                                 {"store": "disk", "path": "/proc/layerfreeze-cannot-be-made"}])
def test_a_bad_store_setting_is_refused_when_the_freezer_is_made(tmp_path, bad):
    bad = {k: str(tmp_path / "file") + v[4:] if isinstance(v, str) and v.startswith("FILE") else v
           for k, v in bad.items()}
    (tmp_path / "file").write_text("not a directory")
    net = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises((lf.ArgumentError, lf.ArgumentTypeError)) as info:
        lf.Freezer(net, None, lf.Schedule().freeze(["[0]"], mode="eval"), cache=bad)
    assert list(bad)[-1] in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before and "forward" not in net[0].__dict__
    lin = nn.Linear(2, 2)
    lf.freeze(lin, mode="eval")
    with pytest.raises(lf.CacheError):
        lf.cache(lin, **bad)


def test_nested_groups_are_labelled_by_their_selectors():
    net = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3))
    schedule = lf.Schedule().progressive_freeze([["[0]", "[1]"], "[2]"], start=0, end=1, total_epochs=2, mode="eval")
    fz = lf.Freezer(net, None, schedule, cache=True)
    fz.set_epoch(0)  # the first group only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net(torch.randn(4, 6))
    assert fz.skip_stats().boundary == "[0], [1]"


class Detour(nn.Module):
    """A trainable module runs before the frozen prefix on some batches only."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where
        self.a, self.b, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.extra6, self.extra8 = nn.Linear(6, 6), nn.Linear(8, 8)

    def forward(self, x, detour=False):
        if detour and self.where == "first":
            x = self.extra6(x)
        h = torch.tanh(self.a(x))
        if detour and self.where == "inside":
            h = self.extra8(h)
        return self.head(torch.tanh(self.b(h)))


def test_a_module_that_runs_before_the_prefix_on_later_batches_only_is_learnt_then():
    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    batches = [(x[i:i + 8], y[i:i + 8], i >= 16) for i in range(0, 32, 8)]  # the detour from the third batch

    def loss(m, batch):
        return F.cross_entropy(m(batch[0], detour=batch[2]), batch[1])

    ref, cached, fz, said = lockstep(Detour("first"), lf.Schedule().freeze(["a", "b"], mode="eval"), batches, loss)
    torch.testing.assert_close(cached.extra6.weight, ref.extra6.weight, **TOL)
    assert not torch.equal(cached.extra6.weight, Detour("first").extra6.weight)
    assert sum("extra6 ran before the boundary" in w for w in said) == 1
    assert not fz.skip_stats().skipping and "extra6.weight" in fz.skip_stats().reason


def test_a_module_that_runs_between_skipped_modules_on_a_later_batch_fails_that_forward_loudly():
    torch.manual_seed(0)
    net = Detour("inside")
    ref, fz = beside(net, lf.Schedule().freeze(["a", "b"], mode="eval"))
    x = torch.randn(8, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net(x)
        net(x)
        assert fz.skip_stats().hits > 0
        with pytest.raises(RuntimeError, match="extra8 ran before the boundary b"):
            net(x, detour=True)
        torch.testing.assert_close(net(x, detour=True), ref(x, detour=True), **TOL)  # learnt again
        torch.testing.assert_close(net(x), ref(x), **TOL)
    assert not fz.skip_stats().skipping and "extra8" in fz.skip_stats().reason


def test_a_first_fill_under_inference_mode_does_not_break_training():
    torch.manual_seed(0)
    net = Scaled("scale")
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    fz = lf.Freezer(net, torch.optim.SGD(net.parameters(), lr=0.1), copy.deepcopy(BODY), cache=True)
    fz.set_epoch(0)
    ref = copy.deepcopy(net)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.inference_mode():  # a validation pass first: it must not prove the trainable scale away
            net(x[:8])
        loss = F.cross_entropy(net(x[:40]), y[:40])  # new samples: the store grows past its first buffers
        loss.backward()
    assert net.scale.grad is not None
    ref_loss = F.cross_entropy(ref(x[:40]), y[:40])
    ref_loss.backward()
    torch.testing.assert_close(net.scale.grad, ref.scale.grad, **TOL)
    assert any("requires grad" in str(w.message) for w in caught)


def test_lf_cache_filled_under_inference_mode_then_used_normally():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
    lf.freeze(enc, mode="eval")
    cached = lf.cache(enc)
    with torch.inference_mode():
        cached(torch.randn(4, 6))
    x = torch.randn(8, 6)  # new samples written into the buffers made under inference_mode
    torch.testing.assert_close(cached(x), torch.tanh(F.linear(x, enc[0].weight, enc[0].bias)), **TOL)


def test_a_container_swapped_for_one_that_holds_the_same_frozen_modules_is_learnt_again():
    class Boxed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.body(x))

    torch.manual_seed(0)
    net = Boxed()
    ref, fz = beside(net, lf.Schedule().freeze(["body.0", "body.2"], mode="eval"))
    x = torch.randn(8, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            net(x)
        assert fz.skip_stats().hits > 0
        for m in (net, ref):
            b = m.body
            m.body = nn.Sequential(b[0], nn.ReLU(), b[2], b[3], b[4])  # the same Linears, a new activation
        for _ in range(2):
            torch.testing.assert_close(net(x), ref(x), **TOL)
    assert any("was replaced in the model" in str(w.message) for w in caught)
    assert fz.skip_stats().skipping


class HandDropout(nn.Module):
    """The model's own forward reads ``self.training`` after the boundary only."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        return self.head(F.dropout(h, 0.1, self.training))


def test_a_mode_read_after_the_boundary_keeps_the_store_across_evaluation_passes():
    torch.manual_seed(0)
    net = HandDropout()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    fz = lf.Freezer(net, opt, lf.Schedule().freeze(["a", "b"], mode="eval"), cache=True)
    x, y, x_val = torch.randn(64, 6), torch.randint(0, 3, (64,)), torch.randn(16, 6)
    for epoch in range(3):
        fz.set_epoch(epoch)
        net.train()
        misses = fz.skip_stats().misses
        for i in torch.randperm(64).split(16):
            opt.zero_grad()
            F.cross_entropy(net(x[i]), y[i]).backward()
            opt.step()
        if epoch:
            assert fz.skip_stats().misses == misses  # every training sample served again
        net.eval()
        with torch.no_grad():
            net(x_val)


def test_threads_running_forwards_while_a_prefix_module_is_replaced():
    class Act(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.act, self.b, self.head = nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.b(self.act(self.a(x)))))

    torch.manual_seed(0)
    net = Act()
    xs = [torch.randn(8, 6) for _ in range(4)]
    with torch.no_grad():
        expected = [net(x) for x in xs]
    fz = lf.Freezer(net, None, lf.Schedule().freeze(["a", "b"], mode="eval"), cache=True)
    fz.set_epoch(0)
    errors: list[str] = []
    wrong = [0]

    def work(k: int) -> None:
        try:
            for n in range(150):
                with torch.no_grad():
                    out = net(xs[(n + k) % 4])
                if not torch.allclose(out, expected[(n + k) % 4], atol=1e-5):
                    wrong[0] += 1
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for _ in range(15):
            net.act = nn.Tanh()  # a new module object each time: the order is learnt again
            time.sleep(0.005)
        for t in threads:
            t.join()
    assert errors == [] and wrong[0] == 0


# ----------------------------------------------------------------- nested tensors


class Encoded(nn.Module):
    """``nn.TransformerEncoder`` with its defaults (``enable_nested_tensor=True``):
    in eval mode with a padding mask its layers pass nested tensors."""

    def __init__(self, norm: bool) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16) if norm else None)
        self.head = nn.Linear(16, 3)

    def forward(self, x, pad):
        h = self.encoder(x, src_key_padding_mask=pad)
        keep = (~pad).float()[..., None]
        return self.head((h * keep).sum(1) / keep.sum(1))


def padded_data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 6, 16, generator=g), torch.randint(0, 3, (16,), generator=g)
    pad = torch.zeros(16, 6, dtype=torch.bool)
    pad[::2, 4:] = True
    return [(x[:8], pad[:8], y[:8]), (x[8:], pad[8:], y[8:])]


def ce_padded(m, batch):
    return F.cross_entropy(m(batch[0], batch[1]), batch[2])


LAYERS = lf.Schedule().freeze(["encoder.layers.0", "encoder.layers.1"], mode="eval")


@pytest.mark.filterwarnings("ignore:enable_nested_tensor")
@pytest.mark.filterwarnings("ignore:.*nested tensors is in prototype")
def test_a_transformer_encoder_on_its_nested_fast_path_frozen_whole_is_skipped():
    torch.manual_seed(0)
    _, _, fz, _ = lockstep(Encoded(norm=False), copy.deepcopy(LAYERS), padded_data(), ce_padded)
    stats = fz.skip_stats()
    assert stats.skipping and stats.module == "encoder" and stats.hits > 0


@pytest.mark.filterwarnings("ignore:enable_nested_tensor")
@pytest.mark.filterwarnings("ignore:.*nested tensors is in prototype")
def test_nested_outputs_inside_a_partly_frozen_encoder_are_refused_with_the_way_out():
    torch.manual_seed(0)  # the norm trains: the boundary is a layer, whose output is nested
    _, _, fz, said = lockstep(Encoded(norm=True), copy.deepcopy(LAYERS), padded_data(), ce_padded)
    stats = fz.skip_stats()
    assert not stats.skipping
    assert "nested tensor" in stats.reason and "enable_nested_tensor=False" in stats.reason
    assert sum("nested tensor" in w for w in said) == 1


# ------------------------------------------------------- transformers' output capture


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)  # the same numbers in both runs
    return transformers.BertModel(config, add_pooling_layer=False)


class Tagger(nn.Module):
    def __init__(self, pool: str = "masked") -> None:
        super().__init__()
        self.bert = tiny_bert()
        self.head = nn.Linear(32, 3)
        self.pool = pool

    def forward(self, input_ids, attention_mask, **kw):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, **kw)
        h = out.last_hidden_state
        if self.pool == "mean":  # reads padded positions
            return self.head(h.mean(1)), out
        if self.pool == "first":
            return self.head(h[:, 0]), out
        m = attention_mask[..., None].float()
        return self.head((h * m).sum(1) / m.sum(1)), out


BERT_GROUPS = lf.Schedule().freeze(["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1"], mode="eval")


def token_batch(lengths, seed=0, left=False):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(1, 100, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        if left:
            ids[i, width - len(s):] = s
        else:
            ids[i, : len(s)] = s
    return ids, (ids != 0).long()


def test_hidden_states_asked_for_after_skipping_are_the_real_ones_and_skipping_goes_on():
    torch.manual_seed(0)
    net = Tagger()
    ref = copy.deepcopy(net)
    lf.Freezer(ref, None, copy.deepcopy(BERT_GROUPS)).set_epoch(0)
    fz = lf.Freezer(net, None, BERT_GROUPS, cache=True)
    fz.set_epoch(0)
    ids, mask = token_batch([5, 7, 4, 7, 6, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: transformers' idle hooks do not stop the skipping
        for _ in range(2):
            net(ids, mask)
        assert fz.skip_stats().skipping and fz.skip_stats().hits > 0
        with torch.no_grad():
            got = net(ids, mask, output_hidden_states=True)[1].hidden_states
            want = ref(ids, mask, output_hidden_states=True)[1].hidden_states
        assert len(got) == len(want) == 4
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, **TOL)
        hits = fz.skip_stats().hits
        net(ids, mask)
        net(ids, mask)
    stats = fz.skip_stats()
    assert stats.skipping and stats.reason is None and stats.hits > hits


# ------------------------------------------------------------- the proof's padding


def bert_batches(first_whole: bool, left: bool = False):
    lengths = [7, 7, 7, 7, 7, 7] if first_whole else [7, 3, 5, 7, 4, 6]
    return [(*token_batch(lengths, seed=1, left=left), torch.tensor([0, 1, 2, 0, 1, 2])),
            (*token_batch([7, 2, 6, 4, 7, 3], seed=2, left=left), torch.tensor([2, 1, 0, 2, 1, 0]))]


def ce_tokens(m, batch):
    return F.cross_entropy(m(batch[0], batch[1])[0], batch[2])


@pytest.mark.parametrize("first_whole", [False, True])
def test_a_head_reading_padded_positions_is_refused_whatever_the_first_batch(first_whole):
    torch.manual_seed(0)
    _, _, fz, said = lockstep(Tagger("mean"), copy.deepcopy(BERT_GROUPS), bert_batches(first_whole), ce_tokens,
                              epochs=2)
    assert not fz.skip_stats().skipping
    assert "differs" in fz.skip_stats().reason
    assert sum("differs" in w for w in said) == 1


def test_a_mask_passed_by_position_picks_the_proofs_padded_rows():
    torch.manual_seed(0)  # left padding, pooled at position 0: a padded position for the shorter rows
    batches = bert_batches(first_whole=False, left=True)
    ids, mask = token_batch([7, 7, 7, 7, 3, 5], seed=3, left=True)  # the first PROOF_ROWS rows whole
    batches[0] = (ids, mask, batches[0][2])
    _, _, fz, _ = lockstep(Tagger("first"), copy.deepcopy(BERT_GROUPS), batches, ce_tokens, epochs=2)
    assert not fz.skip_stats().skipping
    assert "differs" in fz.skip_stats().reason


def test_a_masked_head_still_skips_after_the_proofs_padded_position():
    torch.manual_seed(0)
    _, _, fz, said = lockstep(Tagger(), copy.deepcopy(BERT_GROUPS), bert_batches(first_whole=True), ce_tokens,
                              epochs=2)
    assert fz.skip_stats().skipping and fz.skip_stats().hits > 0
    assert said == []


class WidthsSeen(nn.Embedding):
    """An embedding table that notes the padded length of every call (no hook, which would stop the skipping)."""

    widths: list[int] = []

    def forward(self, ids):
        WidthsSeen.widths.append(ids.shape[1])
        return super().forward(ids)


def test_the_proof_runs_its_rows_at_their_own_length_not_the_batchs():
    torch.manual_seed(0)
    net = Tagger()
    net.bert.embeddings.word_embeddings.__class__ = WidthsSeen
    widths = WidthsSeen.widths
    widths.clear()
    ref, fz = beside(net, copy.deepcopy(BERT_GROUPS))
    ids, mask = token_batch([5, 3, 5, 4, 5, 5])
    ids, mask = F.pad(ids, (0, 6)), F.pad(mask, (0, 6))  # padded to a fixed 11, as padding="max_length" does
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            torch.testing.assert_close(net(ids, mask)[0], ref(ids, mask)[0], **TOL)
    assert fz.skip_stats().skipping and fz.skip_stats().hits > 0
    # the order is learnt on the batch (11); the proof's rows (3 and 4 tokens) run at 4, and at 5 where the
    # store checks that their rows do not depend on padding (one more padded position); the batch's misses at 11
    assert sorted(set(widths)) == [4, 5, 11]


class FixedWidthHead(nn.Module):
    """Reads every position of a batch padded to a fixed length (padded ones zeroed)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.bert = tiny_bert()
        self.head = nn.Linear(32 * width, 3)

    def forward(self, input_ids, attention_mask):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head((h * attention_mask[..., None]).flatten(1)), None


def test_a_head_that_needs_the_batchs_length_is_proved_at_that_length():
    torch.manual_seed(0)
    batches = []
    for seed, lengths in ((1, [7, 3, 5, 7, 4, 6]), (2, [7, 2, 6, 4, 7, 3])):
        ids, mask = token_batch(lengths, seed=seed)
        batches.append((F.pad(ids, (0, 2)), F.pad(mask, (0, 2)), torch.tensor([0, 1, 2, 0, 1, 2])))
    _, _, fz, said = lockstep(FixedWidthHead(9), copy.deepcopy(BERT_GROUPS), batches, ce_tokens, epochs=2)
    # cut to its rows' length the head cannot run; at the batch's length the proof holds
    assert fz.skip_stats().skipping and fz.skip_stats().hits > 0
    assert said == []


@pytest.mark.parametrize("first", [[3], [1], [1, 1, 1]], ids=["one-row", "one-token", "one-token-rows"])
def test_a_head_reading_padded_positions_is_refused_after_a_first_batch_without_any(first):
    # a single row, or rows of one token: the proof still gets a padded position to look at
    torch.manual_seed(0)
    net = Tagger("mean")
    ref, fz = beside(net, copy.deepcopy(BERT_GROUPS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, lengths in enumerate([first, [3, 1, 2], first]):
            ids, mask = token_batch(lengths, seed=k)
            with torch.no_grad():
                torch.testing.assert_close(net(ids, mask)[0], ref(ids, mask)[0], **TOL)
    assert not fz.skip_stats().skipping and "differs" in fz.skip_stats().reason


padded_batch = st.tuples(st.lists(st.integers(1, 7), min_size=1, max_size=6),  # real tokens per row
                         st.integers(0, 3))  # padded positions past the longest row


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(padded_batch, min_size=2, max_size=4), left=st.booleans(),
       pool=st.sampled_from(["masked", "mean"]), seed=st.integers(0, 1000))
def test_any_padding_proves_a_masked_head_and_refuses_one_that_reads_padding(batches, left, pool, seed):
    torch.manual_seed(seed)
    net = Tagger(pool)
    ref, fz = beside(net, copy.deepcopy(BERT_GROUPS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, (lengths, extra) in enumerate(batches):
            ids, mask = token_batch(lengths, seed=seed + k, left=left)
            ids, mask = F.pad(ids, (extra, 0) if left else (0, extra)), F.pad(mask, (extra, 0) if left else (0, extra))
            with torch.no_grad():
                got, want = net(ids, mask)[0], ref(ids, mask)[0]
            torch.testing.assert_close(got, want, **TOL)
    stats = fz.skip_stats()
    if pool == "mean":  # the proof's shorter row has a padded position whatever the batch
        assert not stats.skipping and "differs" in stats.reason
    else:
        assert stats.skipping and stats.reason is None


# -------------------------------------------------------------- inputs edited in place


class Scales(nn.Module):
    """Scales its input in place before the frozen layers (``x /= 255`` style)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x.div_(2)
        return self.head(self.body(x))


def test_a_model_that_edits_its_input_in_place_sees_it_edited_once():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
    seen = []

    def loss(m, batch):
        i = batch
        x = xs[i].clone()
        out = m(x)
        seen.append(torch.allclose(x, xs[i] / 2))
        return F.cross_entropy(out, ys[i])

    schedule = lf.Schedule().freeze(["body.0", "body.2"], mode="eval")
    _, _, fz, said = lockstep(Scales(), schedule, [torch.arange(8), torch.arange(8, 16)], loss)
    assert all(seen) and len(seen) == 12
    stats = fz.skip_stats()
    assert stats.skipping and stats.hits > 0 and said == []


class SequenceFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=False)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):  # x: (batch, sequence, 16)
        return self.head(self.encoder(x.transpose(0, 1)).mean(0))


def test_a_sequence_first_encoder_is_named_as_in_the_model():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 5, 16, generator=g), torch.randint(0, 3, (16,), generator=g)
    schedule = lf.Schedule().freeze(["encoder.layers.0"], mode="eval")
    _, _, fz, said = lockstep(SequenceFirst(), schedule, [(x[:8], y[:8]), (x[8:], y[8:])], ce)
    stats = fz.skip_stats()
    assert not stats.skipping and "batch_first=True" in stats.reason
    assert "encoder.layers.0.self_attn" in stats.reason and "parts." not in stats.reason
    assert any("encoder.layers.0.self_attn" in w for w in said) and not any("parts." in w for w in said)


def test_a_module_two_models_share_under_two_freezers_says_so_and_trains_the_same():
    torch.manual_seed(0)
    shared = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = shared, nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.body(x))

    nets = [Net(), Net()]
    refs = copy.deepcopy(nets)  # one deepcopy: the copies share their body too
    opts = [torch.optim.SGD(n.parameters(), lr=0.1) for n in nets + refs]
    fzs = [lf.Freezer(n, o, lf.Schedule().freeze(["body"], mode="eval"), cache=True) for n, o in zip(nets, opts[:2], strict=True)]
    for n, o in zip(refs, opts[2:], strict=True):
        lf.Freezer(n, o, lf.Schedule().freeze(["body"], mode="eval")).set_epoch(0)
    for fz in fzs:
        fz.set_epoch(0)
    batches = data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            for batch in batches:
                losses = []
                for n, o in zip(nets + refs, opts, strict=True):
                    o.zero_grad()
                    value = ce(n, batch)
                    value.backward()
                    o.step()
                    losses.append(value.detach())
                torch.testing.assert_close(losses[0], losses[2], **TOL)
                torch.testing.assert_close(losses[1], losses[3], **TOL)
    reasons = [fz.skip_stats().reason or "" for fz in fzs]
    assert any("another Freezer" in r for r in reasons) and not any("remove them" in r for r in reasons)
    assert [fz.skip_stats().skipping for fz in fzs] == [True, False]  # the first to skip it keeps it
    assert any("another Freezer" in str(w.message) for w in caught)


class Recording(nn.Module):
    """Keeps a history its forward never reads (a LightningModule's ``self.losses``), and a gain
    its forward reads through a method of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)
        self.history: list[float] = []
        self.gain = 1.0

    def scaled(self, x):
        return x * self.gain

    def forward(self, x):
        return self.head(self.body(self.scaled(x)))


def test_an_attribute_the_forward_never_reads_keeps_the_stored_outputs():
    def record(step, m):
        m.history.append(float(step))  # changes at every step

    torch.manual_seed(0)
    _, _, fz, _ = lockstep(Recording(), copy.deepcopy(BODY), data(), ce, epochs=4, each_step=record)
    stats = fz.skip_stats()
    assert stats.skipping and stats.misses == 16 and stats.hits >= 3 * 16


def test_an_attribute_read_through_a_method_of_the_forwards_module_is_checked():
    def heat(epoch, m):
        m.gain = 1.0 + epoch

    torch.manual_seed(0)  # lockstep asserts the losses: a stale row would show
    _, _, fz, _ = lockstep(Recording(), copy.deepcopy(BODY), data(), ce, epochs=4, each_epoch=heat)
    assert fz.skip_stats().skipping


class WithIds(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x, ids=None):
        return self.head(self.body(x))


def test_key_ids_passed_by_position_are_read():
    torch.manual_seed(0)
    net = WithIds()
    ref = copy.deepcopy(net)
    fz = lf.Freezer(net, None, copy.deepcopy(BODY), cache={"key": "ids"})
    lf.Freezer(ref, None, copy.deepcopy(BODY)).set_epoch(0)
    fz.set_epoch(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 5, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            for i in torch.randperm(16, generator=g).split(8):
                torch.testing.assert_close(net(x[i], i), ref(x[i]), **TOL)
    stats = fz.skip_stats()
    assert stats.skipping and stats.misses == 16 and stats.hits >= 32


def test_a_hook_on_every_module_stops_the_skipping_until_it_is_removed():
    handle = None

    def toggle(epoch, m):
        nonlocal handle
        if epoch == 1 and handle is None:  # one hook on every module, for both runs
            handle = nn.modules.module.register_module_forward_hook(
                lambda mod, args, out: out * 1.5 if isinstance(mod, nn.Linear) else None)
        if epoch == 3 and handle is not None:
            handle.remove()
            handle = None

    torch.manual_seed(0)
    try:
        _, _, fz, said = lockstep(Scaled("none"), copy.deepcopy(BODY), data(), ce, epochs=5, each_epoch=toggle)
    finally:
        if handle is not None:
            handle.remove()
    stats = fz.skip_stats()
    assert stats.skipping and stats.hits > 0
    assert any("every module" in w for w in said)


def test_a_hook_on_every_module_drops_what_lf_cache_stored():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8))
    lf.freeze(body, mode="eval")
    ref = copy.deepcopy(body)
    cached = lf.cache(body)
    x = torch.randn(6, 5)
    cached(x)
    handle = nn.modules.module.register_module_forward_hook(
        lambda mod, args, out: out * 1.5 if isinstance(mod, nn.Linear) else None)
    try:
        torch.testing.assert_close(cached(x), ref(x), **TOL)
    finally:
        handle.remove()
    torch.testing.assert_close(cached(x), ref(x), **TOL)


class Stacked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
                                    for _ in range(3))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean(1))


def test_the_freezer_leaves_no_hook_that_turns_off_pytorchs_encoder_fast_path():
    torch.manual_seed(0)
    net = Stacked()
    fz = lf.Freezer(net, None, lf.Schedule().freeze(["layers.0", "layers.1"], mode="eval"), cache=True)
    fz.set_epoch(0)
    x = torch.randn(4, 5, 16)
    net(x)
    net(x)
    assert fz.skip_stats().skipping
    hooked = [n for n, m in net.layers.named_modules() if n and (m._forward_hooks or m._forward_pre_hooks)]
    assert hooked == []  # nn.TransformerEncoderLayer takes its fast path only without hooks inside


class Embedded(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.embed = nn.Embedding(30, d)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
                                    for _ in range(2))
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean(1))


@pytest.mark.parametrize("first", ["embed", "layer"])
def test_a_module_called_on_its_own_before_the_first_forward_is_plain_and_skipping_follows(first):
    """``model.embed(ids)`` (to log embeddings) or a frozen layer called on its own before
    the model's first forward: it used to become the forward the order was learnt from, so
    the model's own forwards were never skipped, and the hooks left inside the frozen
    layers turned off PyTorch's encoder fast path (other numbers under a global hook)."""
    torch.manual_seed(0)
    net = Embedded()
    ref, fz = beside(net, lf.Schedule().freeze(["embed", "layers.0"], mode="eval"))
    ids = torch.randint(0, 30, (4, 6))

    def hooks_on(m, args, out):  # linear1 of each layer: called off the fast path only
        return out * 1.25 if isinstance(m, nn.Linear) and m.out_features == 32 else None

    with torch.no_grad():
        if first == "embed":
            torch.testing.assert_close(net.embed(ids), ref.embed(ids), rtol=0, atol=0)
        else:
            x = ref.embed(ids)
            h = nn.modules.module.register_module_forward_hook(hooks_on)
            try:
                torch.testing.assert_close(net.layers[0](x), ref.layers[0](x), **TOL)
            finally:
                h.remove()
    hooked = [n for top in ("embed", "layers.0", "layers.1") for n, m in net.get_submodule(top).named_modules(prefix=top)
              if m._forward_hooks or m._forward_pre_hooks]
    assert hooked == []  # the modules' own calls run as without the Freezer
    h = nn.modules.module.register_module_forward_hook(hooks_on)
    try:
        with torch.no_grad():
            torch.testing.assert_close(net(ids), ref(ids), **TOL)
    finally:
        h.remove()
    for _ in range(3):
        torch.testing.assert_close(net(ids), ref(ids), **TOL)
    stats = fz.skip_stats()
    assert stats.skipping and stats.hits > 0, stats


def test_a_step_that_calls_a_submodule_holding_the_groups_is_learnt_and_skipped():
    """A trainer's step calling ``self.net(x)`` on a module whose own forward never runs:
    ``net`` holds the groups, so its forward is the one learnt, and it skips."""

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))

        def forward(self, x):
            raise AssertionError("a trainer's module that is never called itself")

    torch.manual_seed(0)
    wrapper = Wrapper()
    plain = copy.deepcopy(wrapper.net)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (wrapper, plain)]
    fz = lf.Freezer(wrapper, opts[0], lf.Schedule().freeze(["net.0", "net.2"], mode="eval"), cache=True)
    lf.Freezer(plain, opts[1], lf.Schedule().freeze(["0", "2"], mode="eval")).set_epoch(0)
    fz.set_epoch(0)
    for _ in range(3):
        for x, y in data():
            losses = []
            for net, opt in ((wrapper.net, opts[0]), (plain, opts[1])):
                opt.zero_grad()
                value = F.cross_entropy(net(x), y)
                value.backward()
                opt.step()
                losses.append(value.detach())
            torch.testing.assert_close(losses[0], losses[1], **TOL)
    stats = fz.skip_stats()
    assert stats.skipping and stats.module == "net.2" and stats.hits > 0, stats


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return torch.tanh(self.lin(x))


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.layers = nn.ModuleList(_Block() for _ in range(3))

    def forward(self, x):
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return x


class _Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder, self.head = _Encoder(), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.encoder(x))


@pytest.mark.parametrize("where", ["encoder.inp", "encoder.layers.0.lin", "head"])
def test_a_first_forward_that_raises_leaves_the_order_to_the_next_one(where):
    """A first step that fails (a bad batch, out of memory) used to leave the order cut where the
    error struck: the prefix was never skipped, or skipped only up to the module that raised."""
    torch.manual_seed(0)
    schedule = lf.Schedule().freeze(["encoder.inp", "encoder.layers.0", "encoder.layers.1"], mode="eval")
    net = _Classifier()
    ref, fz = beside(net, schedule)
    once = [True]

    def boom(m, args):
        if once[0]:
            once[0] = False
            raise ValueError("a bad first batch")

    handle = net.get_submodule(where).register_forward_pre_hook(boom)
    with pytest.raises(ValueError, match="bad first batch"):
        net(torch.randn(8, 5))
    handle.remove()
    x = torch.randn(8, 5)
    for _ in range(3):
        torch.testing.assert_close(net(x), ref(x), **TOL)
    stats = fz.skip_stats()
    assert stats.skipping and stats.module == "encoder.layers.1" and stats.hits > 0, stats
    fz.close()
    assert [n for n, m in net.named_modules() if m._forward_hooks or m._forward_pre_hooks] == []
