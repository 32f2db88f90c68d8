"""The Hugging Face Trainer callback, on a small BertForSequenceClassification."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import layerfreeze as lf

transformers = pytest.importorskip("transformers")
from layerfreeze.transformers import LayerFreezeCallback  # noqa: E402


def _model() -> Any:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        vocab_size=50,
        max_position_embeddings=16,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


def _data(n: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (n, 8), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": labels[i]} for i in range(n)]


def _args(tmp_path: Any, epochs: int = 3) -> Any:
    return transformers.TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=epochs,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )


class Probe(transformers.TrainerCallback):  # type: ignore[misc]
    """Records a weight of the encoder and the lrs at each epoch start."""

    def __init__(self) -> None:
        self.encoder_at_epoch: list[torch.Tensor] = []
        self.lrs: list[list[float]] = []

    def on_epoch_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self.encoder_at_epoch.append(model.bert.encoder.layer[0].attention.self.query.weight.detach().clone())

    def on_step_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any) -> None:
        self.lrs.append([g["lr"] for g in optimizer.param_groups])


class PlainUnfreeze(transformers.TrainerCallback):  # type: ignore[misc]
    """What a hand-written callback does: flip requires_grad at epoch 1."""

    def on_epoch_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if round(state.epoch) == 1:
            model.bert.requires_grad_(True)


def _query(model: Any) -> torch.Tensor:
    return model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()


def test_plain_trainer_never_trains_a_parameter_unfrozen_later(tmp_path: Any) -> None:
    model = _model()
    model.bert.requires_grad_(False)
    before = _query(model)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=_data(), callbacks=[PlainUnfreeze()])
    trainer.train()
    assert model.bert.encoder.layer[0].attention.self.query.weight.requires_grad
    assert torch.equal(_query(model), before)  # the trap: unfrozen, yet never trained


@pytest.mark.parametrize("when", ["init", "added_later"])
def test_callback_trains_unfrozen_parameters_and_keeps_the_scheduler(tmp_path: Any, when: str) -> None:
    model = _model()
    model.bert.requires_grad_(False)  # the usual "freeze the backbone first"
    before = _query(model)
    classifier_before = model.classifier.weight.detach().clone()
    cb = LayerFreezeCallback(lf.Schedule().freeze("bert", until_epoch=1))
    probe = Probe()
    callbacks = [cb, probe] if when == "init" else [probe]
    trainer = transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=_data(), callbacks=callbacks)
    if when == "added_later":
        trainer.add_callback(cb)  # no on_init_end: the Freezer adds a group
    trainer.train()

    # frozen through epoch 0, trained from epoch 1
    assert torch.equal(probe.encoder_at_epoch[0], before)
    assert torch.equal(probe.encoder_at_epoch[1], before)
    assert not torch.equal(_query(model), before)
    assert not torch.equal(model.classifier.weight, classifier_before)
    expected = ["freeze", "unfreeze"] if when == "init" else ["unfreeze"]
    assert [t.action for t in cb.transitions] == expected

    opt = trainer.optimizer
    n_groups = len(opt.param_groups)
    assert n_groups == (2 if when == "init" else 3)
    # the linear schedule runs on every group: all lrs share the same factor
    # of the base lr at every step, down to 0 at the end
    for lrs in probe.lrs:
        assert len(set(round(lr, 12) for lr in lrs)) == 1
    steps = len(probe.lrs)
    assert steps == 6
    assert probe.lrs[0][0] == pytest.approx(1e-2 * (steps - 1) / steps)
    assert probe.lrs[-1][0] == pytest.approx(0.0)


def test_callback_rejects_a_non_schedule() -> None:
    with pytest.raises(TypeError, match="schedule must be a layerfreeze Schedule"):
        LayerFreezeCallback("bert")  # type: ignore[arg-type]


def test_callback_rejects_a_selector_the_model_lacks(tmp_path: Any) -> None:
    cb = LayerFreezeCallback(lf.Schedule().freeze("bertt", until_epoch=1))
    with pytest.raises(lf.SelectorError, match="bertt"):
        transformers.Trainer(model=_model(), args=_args(tmp_path), train_dataset=_data(), callbacks=[cb])


def _decay_schedule() -> lf.Schedule:
    return lf.Schedule().freeze("bert.embeddings", until_epoch=1).gradual_unfreeze(
        "bert.encoder.layer", start_epoch=1, lr_decay=0.5
    )


def _layout(opt: Any) -> list[tuple[int, float, float]]:
    return [(len(g["params"]), g["initial_lr"], g["weight_decay"]) for g in opt.param_groups]


@pytest.mark.parametrize("kwargs", [{}, {"unfreeze_lr": 5e-3}], ids=["lr_decay", "lr_decay+unfreeze_lr"])
def test_resume_from_checkpoint_with_lr_decay(tmp_path: Any, kwargs: dict) -> None:
    args = _args(tmp_path / "run", epochs=3)
    args.save_strategy = "epoch"
    args.weight_decay = 0.1
    model = _model()
    straight = transformers.Trainer(model=model, args=args, train_dataset=_data(),
                                    callbacks=[LayerFreezeCallback(_decay_schedule(), **kwargs)])
    straight.train()

    again = _model()
    resumed = transformers.Trainer(model=again, args=_args(tmp_path / "again", epochs=3), train_dataset=_data(),
                                   callbacks=[LayerFreezeCallback(_decay_schedule(), **kwargs)])
    resumed.args.weight_decay = 0.1
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))  # no ValueError
    assert _layout(resumed.optimizer) == _layout(straight.optimizer)
    assert [g["lr"] for g in resumed.optimizer.param_groups] == pytest.approx(
        [g["lr"] for g in straight.optimizer.param_groups], rel=1e-12
    )
    for (name, p), q in zip(again.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


def test_unfreeze_lr_moves_the_trainer_groups(tmp_path: Any) -> None:
    model = _model()
    probe = Probe()
    cb = LayerFreezeCallback(lf.Schedule().freeze("bert", until_epoch=1), unfreeze_lr=1e-3)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=_data(), callbacks=[cb, probe])
    trainer.train()
    opt = trainer.optimizer
    lr_of = {id(p): g["initial_lr"] for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(model.bert.encoder.layer[0].attention.self.query.weight)] == 1e-3
    assert lr_of[id(model.classifier.weight)] == 1e-2
    # the linear schedule scales both by the same factor at every step
    bases = [g["initial_lr"] for g in opt.param_groups]
    for lrs in probe.lrs:
        factors = {round(lr / base, 9) for lr, base in zip(lrs, bases, strict=True)}
        assert len(factors) == 1


def test_epoch_transitions_carry_the_step_they_happen_at(tmp_path: Any) -> None:
    # the step first, then the epoch, as in Lightning: the unfreeze at epoch 1
    # happens before optimizer step 2 (2 steps an epoch)
    cb = LayerFreezeCallback(lf.Schedule().freeze("bert", until_epoch=1))
    transformers.Trainer(model=_model(), args=_args(tmp_path, epochs=2), train_dataset=_data(), callbacks=[cb]).train()
    assert [(t.action, t.epoch, t.step) for t in cb.transitions] == [("freeze", 0, 0), ("unfreeze", 1, 2)]


def test_transformers_callback_takes_freezer_kwargs(tmp_path: Any) -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8,
        vocab_size=30, max_position_embeddings=8, num_labels=2,
    )
    model = transformers.BertForSequenceClassification(config)
    ids = torch.randint(1, 30, (8, 6), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": ids[i], "labels": torch.tensor(i % 2)} for i in range(8)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=3, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
    )
    layer0 = model.bert.encoder.layer[0].output.dense.weight
    before = layer0.detach().clone()
    schedule = lf.Schedule().gradual_unfreeze("bert.encoder.layer", start_epoch=1, lr_decay=0.5)
    cb = LayerFreezeCallback(schedule, guard=True, release_state=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    trainer.train()
    assert isinstance(cb.freezer, lf.Freezer)
    # layer 1 unfreezes at epoch 1, layer 0 at epoch 2, and then really trains
    assert [t.action for t in cb.transitions] == ["freeze", "unfreeze", "unfreeze"]
    assert not torch.equal(layer0, before)
    lr_of = {id(p): g["initial_lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    top = model.bert.encoder.layer[1].output.dense.weight
    assert lr_of[id(layer0)] == pytest.approx(0.5 * lr_of[id(top)])  # lr_decay holds under the Trainer
