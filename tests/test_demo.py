"""The seed demo: 61 then 73 trainable, fc2 held bitwise while frozen, in every optimizer set-up."""

from __future__ import annotations

import pytest
import torch

from layerfreeze.demos import seed


def test_seed_run_counts_and_fc2_values():
    records = seed.run()
    assert [r.epoch for r in records] == list(range(1, 10))
    assert [r.trainable for r in records] == [61, 61, 61] + [73] * 6
    net, _, _ = seed.build()
    for r in records[:3]:
        assert torch.equal(r.fc2_weight, net.fc2.weight.detach())
        assert torch.equal(r.fc2_bias, net.fc2.bias.detach())
        assert r.unchanged and not r.moved
    assert all(r.moved for r in records[3:])
    assert not torch.equal(records[3].fc2_weight, net.fc2.weight.detach())
    assert [t for r in records for t in r.transitions] == [
        "epoch 1: froze 12 params (fc2.weight, fc2.bias); trainable now 61",
        "epoch 4: unfroze 12 params (fc2.weight, fc2.bias); trainable now 73",
    ]


@pytest.mark.parametrize("variant", seed.VARIANTS, ids=lambda v: v.label.split(",")[0])
def test_every_variant_holds_with_layerfreeze(variant):
    ok, sentence = seed.verdict(seed.run(variant))
    assert ok, sentence
    assert sentence == "fc2 stayed bitwise unchanged in epochs 1-3 and moved in every epoch from epoch 4 on."


def test_trap_trainable_only_optimizer_never_trains_fc2_in_plain_pytorch():
    variant = next(v for v in seed.VARIANTS if v.trainable_only)
    records = seed.run(variant, plain=True)
    ok, sentence = seed.verdict(records)
    assert not ok
    assert "did not move in epochs 4-9 although trainable" in sentence
    assert all(r.unchanged for r in records)  # fc2 never trained at all


def test_trap_adamw_stale_grads_move_frozen_fc2_in_plain_pytorch():
    variant = next(v for v in seed.VARIANTS if v.optimizer == "adamw")
    assert variant.weight_decay > 0 and not variant.set_to_none
    records = seed.run(variant, plain=True)
    ok, sentence = seed.verdict(records)
    assert not ok
    assert sentence.startswith("fc2 changed while frozen, in epochs 1-3")
    assert seed.verdict(seed.run(variant))[0]


def test_run_is_deterministic_and_leaves_the_callers_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = seed.run(epochs=5)
    after = torch.rand(3)
    b = seed.run(epochs=5)
    assert torch.equal(after, expected)
    for ra, rb in zip(a, b, strict=True):
        assert torch.equal(ra.fc2_weight, rb.fc2_weight) and ra.loss == rb.loss
    other = seed.run(epochs=5, seed=1)
    assert not torch.equal(other[0].fc2_weight, a[0].fc2_weight)


def test_verdict_reports_what_went_wrong():
    records = seed.run(epochs=5)
    # Judged against a schedule that should have unfrozen at epoch 3, fc2 did not move then.
    ok, sentence = seed.verdict(records, unfreeze_epoch=3)
    assert not ok
    assert "did not move in epoch 3 although trainable" in sentence


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_run_rejects_bad_epochs(bad):
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        seed.run(epochs=bad)


def test_main_prints_table_and_computed_verdict(capsys):
    assert seed.main() == 0
    out = capsys.readouterr().out
    assert "trainable params: 73" in out
    lines = [line for line in out.splitlines() if line.startswith("│")]
    epoch_rows = [line.split("│")[1:3] for line in lines if line.split("│")[1].strip().isdigit()]
    assert [(int(e), int(t)) for e, t in epoch_rows] == [(e, 61 if e < 4 else 73) for e in range(1, 10)]
    assert "fc2 stayed bitwise unchanged in epochs 1-3 and moved in every epoch from epoch 4" in " ".join(out.split())
    assert out.count("ok: ") == 4  # three set-ups with layerfreeze, one plain
    assert out.count("broken: ") == 2
