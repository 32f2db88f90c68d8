"""Gradual fine-tuning with the Hugging Face Trainer.

A small BertForSequenceClassification (built from a config: nothing is
downloaded) learns a toy task: the encoder is frozen for the first epoch
(only the classifier trains), then the top encoder layer joins, then the
whole encoder. The Trainer's own optimizer and linear LR schedule cover every
parameter from the start, so the unfrozen layers really train.

    python examples/hf_trainer.py
"""

from __future__ import annotations

import tempfile

import torch
import transformers

import layerfreeze as lf
from layerfreeze.transformers import LayerFreezeCallback


def main() -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, max_position_embeddings=32, num_labels=2,
    )
    model = transformers.BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (128, 12), generator=g)
    labels = (ids[:, 0] > 50).long()  # the first token decides the label
    data = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y} for i, y in zip(ids, labels, strict=True)]

    schedule = (
        lf.Schedule()
        .freeze("bert.embeddings", until_epoch=2)
        .freeze("bert.encoder.layer[0]", until_epoch=2)
        .freeze("bert.encoder.layer[1]", until_epoch=1)
    )
    callback = LayerFreezeCallback(schedule)
    watched = model.bert.encoder.layer[0].attention.self.query.weight
    start = watched.detach().clone()
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, num_train_epochs=3, per_device_train_batch_size=16, learning_rate=5e-3,
            report_to=[], save_strategy="no", logging_strategy="epoch", use_cpu=True, disable_tqdm=True,
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
        trainer.train()
    for t in callback.transitions:
        print(t)
    print(f"optimizer groups: {len(trainer.optimizer.param_groups)}, final lr: {trainer.lr_scheduler.get_last_lr()}")
    print(f"encoder layer 0 moved after its unfreeze at epoch 2: {not torch.equal(watched, start)}")


if __name__ == "__main__":
    main()
