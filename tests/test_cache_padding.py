"""Padding-aware keys: a sample padded to another length in another batch is the
same entry; outputs come back padded to the batch, real positions carrying a
fresh forward's values and padded positions 0."""

import copy

import pytest
import torch
from torch import nn

import layerfreeze as lf

TOL = {"rtol": 1e-5, "atol": 1e-5}  # another batch composition/length may round differently


def small_bert(hidden=32, max_pos=64):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=100, max_position_embeddings=max_pos)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def sentences(n, lo=3, hi=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 100, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g)
            for _ in range(n)]


def pad(batch, extra=0, left=False):
    """Pad to the longest sentence (+ ``extra``), pad id 0, like a HF collator."""
    length = max(len(s) for s in batch) + extra
    ids = torch.zeros(len(batch), length, dtype=torch.long)
    mask = torch.zeros(len(batch), length, dtype=torch.long)
    for i, s in enumerate(batch):
        if left:
            ids[i, length - len(s):], mask[i, length - len(s):] = s, 1
        else:
            ids[i, :len(s)], mask[i, :len(s)] = s, 1
    return ids, mask


def frozen(m):
    lf.freeze(m, mode="eval")
    return m


def reference_of(module):
    ref = small_bert()
    ref.load_state_dict(module.state_dict())
    return ref


def check_against_fresh(out, ref, ids, mask):
    """Real positions: a fresh forward's values; padded positions: exactly 0."""
    with torch.no_grad():
        fresh = ref(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(out.last_hidden_state[real], fresh.last_hidden_state[real], **TOL)
    assert torch.count_nonzero(out.last_hidden_state[~real]) == 0
    torch.testing.assert_close(out.pooler_output, fresh.pooler_output, **TOL)


def epochs(cached, sents, n_epochs, batch=5, seed=0):
    ref = reference_of(cached)
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_epochs):
        order = torch.randperm(len(sents), generator=g).tolist()
        for k in range(0, len(order), batch):
            ids, mask = pad([sents[i] for i in order[k:k + batch]])
            out = cached(input_ids=ids, attention_mask=mask)
            check_against_fresh(out, ref, ids, mask)


def test_repadded_sentences_hit_after_the_first_epoch():
    sents = sentences(30)
    cached = lf.cache(frozen(small_bert()))
    epochs(cached, sents, 1)
    first = cached.stats()
    assert first.misses == 30 and first.entries == 30
    epochs(cached, sents, 2, seed=1)
    s = cached.stats()
    assert (s.misses, s.hits, s.entries) == (30, 60, 30)  # every sentence hits, whatever its padding


def test_store_holds_real_tokens_only():
    sents = sentences(20)
    cached = lf.cache(frozen(small_bert()))
    for k in range(0, 20, 4):
        ids, mask = pad(sents[k:k + 4], extra=7)  # generous padding is not stored
        cached(input_ids=ids, attention_mask=mask)
    tokens = sum(len(s) for s in sents)
    store = cached.__dict__["_lf_cache"].memory
    (lid,) = store.used
    assert store.used[lid] == [tokens, 20]


def test_padded_positions_hold_zero_for_hits_misses_and_mixed_batches():
    sents = sentences(12)
    cached = lf.cache(frozen(small_bert()))
    ref = reference_of(cached)
    for batch in (sents[:6], sents[3:9], sents[6:12] + sents[:2], sents[::-1]):
        ids, mask = pad(batch, extra=2)
        out = cached(input_ids=ids, attention_mask=mask)
        check_against_fresh(out, ref, ids, mask)
    assert cached.stats().misses == 12 and cached.stats().hits == 3 + 5 + 12


def test_dict_argument_with_attention_mask():
    class DictEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = small_bert()

        def forward(self, batch):
            return self.bert(**batch).last_hidden_state

    enc = DictEncoder()
    lf.freeze(enc, mode="eval")
    ref = copy.deepcopy(enc)
    cached = lf.cache(enc)
    sents = sentences(8)
    for extra in (0, 5):
        ids, mask = pad(sents, extra=extra)
        out = cached({"input_ids": ids, "attention_mask": mask})
    assert cached.stats().hits == 8
    with torch.no_grad():
        fresh = ref.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out[mask.bool()], fresh[mask.bool()], **TOL)


def test_left_padding_with_absolute_positions_is_not_shared():
    sents = sentences(6, lo=3, hi=8)
    cached = lf.cache(frozen(small_bert()))
    ref = reference_of(cached)
    for extra in (0, 3):
        ids, mask = pad(sents, extra=extra, left=True)
        out = cached(input_ids=ids, attention_mask=mask)
        check_against_fresh(out, ref, ids, mask)  # BERT's absolute positions shift with left padding
    assert cached.stats().hits == 0 and cached.stats().misses == 12
    ids, mask = pad(sents, extra=3, left=True)
    check_against_fresh(cached(input_ids=ids, attention_mask=mask), ref, ids, mask)
    assert cached.stats().hits == 6  # the same pad offsets do hit


class TokenNet(nn.Module):
    """Per-token features and a per-sample summary over real tokens; positions absolute."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 8, padding_idx=0)
        self.pos = nn.Embedding(64, 8)
        self.lin = nn.Linear(8, 8)

    def forward(self, ids, lengths=None):
        h = torch.tanh(self.lin(self.emb(ids) + self.pos(torch.arange(ids.shape[1]))))
        real = (ids != 0).float() if lengths is None else (
            torch.arange(ids.shape[1])[None] < lengths[:, None]).float()
        return h, (h * real[..., None]).sum(1) / real.sum(1, keepdim=True)


@pytest.mark.parametrize("how", ["lengths", "pad_value"])
def test_other_modules_name_how_to_find_real_tokens(how):
    torch.manual_seed(0)
    net = TokenNet()
    lf.freeze(net, mode="eval")
    ref = copy.deepcopy(net)
    cached = lf.cache(net, padding="lengths") if how == "lengths" else lf.cache(net, pad_value=0)
    sents = sentences(10)
    for extra in (0, 4, 1):
        ids, mask = pad(sents[::-1] if extra == 4 else sents, extra=extra)
        kw = {"lengths": mask.sum(1)} if how == "lengths" else {}
        h, summary = cached(ids, **kw)
        with torch.no_grad():
            fh, fs = ref(ids, **kw)
        real = mask.bool()
        torch.testing.assert_close(h[real], fh[real], **TOL)
        assert torch.count_nonzero(h[~real]) == 0
        torch.testing.assert_close(summary, fs, **TOL)
    assert cached.stats().misses == 10 and cached.stats().hits == 20


def test_module_whose_real_tokens_see_padding_is_keyed_with_its_padding():
    class MeanOverAll(nn.Module):  # mixes padded positions into every token
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(100, 4)

        def forward(self, input_ids, attention_mask):
            e = self.emb(input_ids)
            return e + e.mean(1, keepdim=True)

    torch.manual_seed(0)
    net = MeanOverAll()
    lf.freeze(net, mode="eval")
    ref = copy.deepcopy(net)
    cached = lf.cache(net)
    sents = sentences(6)
    for extra in (0, 3, 0):
        ids, mask = pad(sents, extra=extra)
        out = cached(input_ids=ids, attention_mask=mask)
        with torch.no_grad():
            torch.testing.assert_close(out, ref(ids, mask), **TOL)  # whole rows: padded positions as computed
    assert cached.stats().hits == 6  # only the repeat with the same padding


def test_pooled_size_equal_to_the_padded_length_is_told_apart():
    # hidden size 16 and a batch padded to 16 tokens: pooler_output [B, 16] looks like a per-token leaf
    cached = lf.cache(frozen(small_bert(hidden=16)))
    ref = small_bert(hidden=16)
    ref.load_state_dict(cached.state_dict())
    sents = sentences(6, lo=10, hi=16)
    for extra in (16 - max(len(s) for s in sents), 20 - max(len(s) for s in sents)):
        ids, mask = pad(sents, extra=extra)
        out = cached(input_ids=ids, attention_mask=mask)
        check_against_fresh(out, ref, ids, mask)
    assert cached.stats().hits == 6


def test_key_ids_from_the_loader_skip_hashing():
    cached = lf.cache(frozen(small_bert()), key="idx")
    ref = reference_of(cached)
    sents = sentences(8)
    for order in (list(range(8)), [7, 2, 5, 0, 1, 3, 4, 6]):
        batch = [sents[i] for i in order]
        ids, mask = pad(batch, extra=order[0] % 3)
        out = cached(input_ids=ids, attention_mask=mask, idx=torch.tensor(order))
        check_against_fresh(out, ref, ids, mask)
    assert cached.stats().hits == 8
    with pytest.warns(UserWarning, match="no key ids"):
        cached(input_ids=ids, attention_mask=mask)


def test_mask_passed_by_position_is_found_by_its_parameter_name():
    cached = lf.cache(frozen(small_bert()))
    ref = reference_of(cached)
    sents = sentences(6)
    for extra in (0, 4):
        ids, mask = pad(sents[::-1] if extra else sents, extra=extra)
        out = cached(ids, mask)  # BertModel.forward(input_ids, attention_mask, ...)
        check_against_fresh(out, ref, ids, mask)
    assert cached.stats().hits == 6
