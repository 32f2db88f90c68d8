"""The cache contract under generated use: whatever the batch compositions,
orders, paddings and weight changes, an output equals a fresh forward of the
current module within float32 rounding (padded positions: 0)."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import layerfreeze as lf

TOL = {"rtol": 1e-4, "atol": 1e-5}  # other batch compositions and lengths round differently
SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])

batch_op = st.tuples(
    st.just("batch"),
    st.lists(st.integers(0, 11), min_size=1, max_size=7),  # which sentences, in this order (repeats allowed)
    st.integers(0, 4),  # extra padding
    st.booleans(),  # left padding
)
weight_op = st.tuples(st.sampled_from(["no_grad_step", "load_state_dict", "assign_data", "data_then_verify"]),
                      st.integers(0, 10_000))


def change_weights(module, kind, seed):
    g = torch.Generator().manual_seed(seed)
    params = [p for _, p in sorted(module.named_parameters())]
    p = params[seed % len(params)]
    delta = torch.randn(p.shape, generator=g) * 0.1
    if kind == "no_grad_step":
        with torch.no_grad():
            p.add_(delta)
    elif kind == "load_state_dict":
        name = sorted(n for n, _ in module.named_parameters())[seed % len(params)]
        state = module.state_dict()
        state[name] = state[name] + delta
        module.load_state_dict(state)
    elif kind == "assign_data":
        p.data = p.data + delta
    else:  # an edit no version counter sees, then the documented check
        p.data.add_(delta)
        module.verify_cache()


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, vocab_size=50, max_position_embeddings=40)
    torch.manual_seed(0)
    bert = transformers.BertModel(cfg)
    lf.freeze(bert, mode="eval")
    return bert


SENTS = [torch.randint(1, 50, (n,), generator=torch.Generator().manual_seed(n)) for n in
         (3, 7, 12, 5, 9, 16, 4, 11, 8, 14, 6, 10)]


def padded(which, extra, left):
    batch = [SENTS[i] for i in which]
    length = max(len(s) for s in batch) + extra
    ids = torch.zeros(len(batch), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(batch):
        sl = slice(length - len(s), length) if left else slice(0, len(s))
        ids[r, sl], mask[r, sl] = s, 1
    return ids, mask


@SETTINGS
@given(st.lists(st.one_of(batch_op, batch_op, weight_op), min_size=1, max_size=8))
def test_padded_encoder_always_equals_a_fresh_forward(ops):
    cached = lf.cache(tiny_bert())
    twin = copy.deepcopy(cached)
    twin.__class__ = twin._lf_base
    del twin.__dict__["_lf_cache"]
    for op in ops:
        if op[0] != "batch":
            change_weights(cached, *op)
            twin.load_state_dict(cached.state_dict())
            continue
        _, which, extra, left = op
        ids, mask = padded(which, extra, left)
        out = cached(input_ids=ids, attention_mask=mask)
        with torch.no_grad():
            want = twin(input_ids=ids, attention_mask=mask)
        real = mask.bool()
        torch.testing.assert_close(out.last_hidden_state[real], want.last_hidden_state[real], **TOL)
        assert torch.count_nonzero(out.last_hidden_state[~real]) == 0
        torch.testing.assert_close(out.pooler_output, want.pooler_output, **TOL)


@SETTINGS
@given(st.lists(st.one_of(st.tuples(st.just("batch"), st.lists(st.integers(0, 19), min_size=1, max_size=9)),
                          weight_op), min_size=1, max_size=10),
       st.sampled_from(["memory", "spill", "disk"]))
def test_plain_batches_always_equal_a_fresh_forward(tmp_path_factory, ops, store):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    lf.freeze(net, mode="eval")
    twin = copy.deepcopy(net)
    kw = {} if store == "memory" else {"max_bytes": 40 * 4, "path": tmp_path_factory.mktemp("c")} \
        if store == "spill" else {"store": "disk", "path": tmp_path_factory.mktemp("c")}
    cached = lf.cache(net, **kw)
    x = torch.randn(20, 5, generator=torch.Generator().manual_seed(7))
    for op in ops:
        if op[0] != "batch":
            change_weights(cached, *op)
            twin.load_state_dict(cached.state_dict())
            continue
        idx = torch.tensor(op[1])
        out = cached(x[idx])
        with torch.no_grad():
            torch.testing.assert_close(out, twin(x[idx]), **TOL)
