"""cache= through the trainer callbacks: Lightning's and the Hugging Face Trainer's."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import layerfreeze as lf


def _lightning_module(pl: Any) -> Any:
    class Module(pl.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.backbone = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
            self.head = nn.Linear(8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(x))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05)

    return Module()


def test_lightning_callback_passes_cache_and_trains_the_same() -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from layerfreeze.lightning import LayerFreeze

    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g))
    results = {}
    for cache in (None, True):
        module = _lightning_module(pl)
        cb = LayerFreeze(lf.Schedule().freeze(["backbone.0", "backbone.2"], mode="eval"), cache=cache)
        trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                             callbacks=[cb])
        trainer.fit(module, torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True,
                                                        generator=torch.Generator().manual_seed(1)))
        results[cache] = (module.head.weight.detach().clone(), cb.driver.last)
    torch.testing.assert_close(results[True][0], results[None][0], atol=1e-6, rtol=1e-5)
    st = results[True][1].skip_stats()
    assert st.module == "backbone" and st.hits >= 16 and st.misses == 16  # the whole backbone is frozen
    assert results[None][1].skip is None


def test_hf_trainer_callback_passes_cache_and_trains_the_same(tmp_path: Any) -> None:
    transformers = pytest.importorskip("transformers")
    from layerfreeze.transformers import LayerFreezeCallback

    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=24, vocab_size=50, max_position_embeddings=16,
                                     num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (16, 8), generator=g)
    lengths = torch.randint(3, 9, (16,), generator=g)
    labels = torch.randint(0, 2, (16,), generator=g)
    data = [{"input_ids": ids[i, :lengths[i]], "attention_mask": torch.ones(int(lengths[i]), dtype=torch.long),
             "labels": labels[i]} for i in range(16)]
    results = {}
    for cache in (None, {"store": "memory"}):
        torch.manual_seed(0)
        model = transformers.BertForSequenceClassification(config)
        schedule = lf.Schedule().freeze(["bert.embeddings", "bert.encoder.layer.0"], mode="eval")
        cb = LayerFreezeCallback(schedule, cache=cache)
        args = transformers.TrainingArguments(output_dir=str(tmp_path / str(cache is None)), num_train_epochs=3,
                                              per_device_train_batch_size=8, learning_rate=1e-2, report_to=[],
                                              save_strategy="no", logging_strategy="no", use_cpu=True,
                                              disable_tqdm=True, seed=0)
        collate = transformers.DataCollatorWithPadding(_Pad())
        transformers.Trainer(model=model, args=args, train_dataset=data, data_collator=collate,
                             callbacks=[cb]).train()
        results[cache is None] = (model.classifier.weight.detach().clone(), cb.driver.last)
    torch.testing.assert_close(results[False][0], results[True][0], atol=1e-5, rtol=1e-4)
    st = results[False][1].skip_stats()
    assert st.module == "bert.encoder.layer.0" and st.hits >= 16 and st.misses == 16


class _Pad:
    """The little of a tokenizer that DataCollatorWithPadding uses: right padding with id 0."""

    padding_side = "right"
    pad_token_id = 0
    model_input_names = ["input_ids", "attention_mask"]

    def pad(self, features: Any, padding: Any = True, max_length: Any = None, pad_to_multiple_of: Any = None,
            return_tensors: Any = None, **kw: Any) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        out: dict[str, Any] = {"input_ids": [], "attention_mask": []}
        for f in features:
            pad = length - len(f["input_ids"])
            out["input_ids"].append(torch.cat([torch.as_tensor(f["input_ids"]), torch.zeros(pad, dtype=torch.long)]))
            out["attention_mask"].append(torch.cat([torch.as_tensor(f["attention_mask"]),
                                                    torch.zeros(pad, dtype=torch.long)]))
        batch = {k: torch.stack(v) for k, v in out.items()}
        batch["labels"] = torch.stack([torch.as_tensor(f["labels"]) for f in features])
        return batch
