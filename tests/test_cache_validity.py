"""Each way the cache used to return values a fresh forward would not give."""

import copy
import io
import pickle
import warnings

import pytest
import torch
from tests.conftest import run_threads
from torch import nn

import layerfreeze as lf

TOL = {"rtol": 1e-5, "atol": 1e-5}  # another batch composition may round differently


def frozen(m):
    lf.freeze(m, mode="eval")
    return m


def fresh(module, *args, **kwargs):
    """A forward of an uncached twin of ``module`` (same weights, same class)."""
    twin = copy.deepcopy(module)
    if "_lf_cache" in twin.__dict__:
        twin.__class__ = twin._lf_base
        del twin.__dict__["_lf_cache"]
    with torch.no_grad():
        return twin(*args, **kwargs)


# --------------------------------------------------------------------------- batch axis


def transformer(batch_first):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested-tensor advice of batch_first=False layers
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=batch_first)
        return frozen(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))


def test_batch_first_false_transformer_is_keyed_by_its_batch_axis():
    enc = transformer(batch_first=False)
    cached = lf.cache(enc)
    x = torch.randn(5, 4, 8)  # (sequence, batch, feature)
    cached(x)
    y = x.clone()
    y[-1] = torch.randn(4, 8)  # the last position of every sample changes
    torch.testing.assert_close(cached(y), fresh(cached, y), **TOL)
    assert cached.stats().hits == 0
    perm = torch.tensor([2, 0, 3, 1])
    out = cached(x[:, perm])  # the same samples in another order: hits
    assert cached.stats().hits == 4
    torch.testing.assert_close(out, fresh(cached, x[:, perm]), **TOL)


class SeqFirst(nn.Module):
    """A user module that passes (sequence, batch, ...) through a batch_first=False layer."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = transformer(batch_first=False)

    def forward(self, x):
        return self.inner(x)


def test_rows_that_are_not_independent_bypass_with_a_warning_naming_the_module():
    m = frozen(SeqFirst())
    cached = lf.cache(m)
    x = torch.randn(6, 3, 8)
    with pytest.warns(UserWarning, match=r"SeqFirst.*not independent.*batch_first=False.*batch_dim=1"):
        out = cached(x)
    torch.testing.assert_close(out, fresh(cached, x), **TOL)
    y = x.clone()
    y[-1] = 0
    torch.testing.assert_close(cached(y), fresh(cached, y), **TOL)
    assert cached.stats().hits == 0 and cached.stats().entries == 0


def test_batch_dim_names_the_batch_axis():
    cached = lf.cache(frozen(SeqFirst()), batch_dim=1)
    x = torch.randn(6, 3, 8)
    cached(x)
    out = cached(x[:, [2, 1, 0]])
    assert cached.stats().hits == 3
    torch.testing.assert_close(out, fresh(cached, x[:, [2, 1, 0]]), **TOL)


# --------------------------------------------------------------------------- copies


def test_deepcopy_is_an_independent_cache_bound_to_the_copy():
    torch.manual_seed(0)
    cached = lf.cache(frozen(nn.Linear(4, 3)))
    x = torch.randn(5, 4)
    first = cached(x)
    twin = copy.deepcopy(cached)
    with torch.no_grad():
        twin.weight.add_(1.0)
    torch.testing.assert_close(twin(x), nn.functional.linear(x, twin.weight, twin.bias))
    assert torch.equal(cached(x), first)  # the original still serves its own features
    assert twin.stats().misses == 5 and cached.stats().hits == 5
    assert twin.__dict__["_lf_cache"].module is twin


def test_torch_save_and_pickle_keep_settings_not_features(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1))
    lf.freeze(model, "[0]", mode="eval")
    model[0] = lf.cache(model[0], verify_every=7)
    x = torch.randn(5, 4)
    model(x)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    again = pickle.loads(pickle.dumps(model))
    for m in (loaded, again):
        assert m[0].stats().entries == 0  # the store is not pickled: re-opened empty
        assert m[0].__dict__["_lf_cache"].verify_every == 7
        torch.testing.assert_close(m(x), model(x))
        m(x)
        assert m[0].stats().hits == 5


# --------------------------------------------------------------------------- threads


def test_threads_calling_one_cache_get_their_own_rows():
    torch.manual_seed(0)
    lin = nn.Linear(16, 32)
    cached = lf.cache(frozen(copy.deepcopy(lin)))
    data = [torch.randn(40, 16) for _ in range(4)]
    errors = []

    def work(k):
        g = torch.Generator().manual_seed(k)
        for _ in range(30):
            idx = torch.randint(0, 40, (7,), generator=g)
            x = data[k][idx]
            got = cached(x)
            with torch.no_grad():
                want = lin(x)
            if not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
                errors.append(k)

    run_threads(work)
    assert not errors
    s = cached.stats()
    assert s.hits + s.misses == 4 * 30 * 7 and s.entries <= 160


# --------------------------------------------------------------------------- module tree and code


def test_swapped_parameter_free_submodule_invalidates_memory():
    torch.manual_seed(0)
    net = frozen(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    cached = lf.cache(net)
    x = torch.randn(6, 4)
    cached(x)
    net[1] = nn.Tanh().eval()
    torch.testing.assert_close(cached(x), torch.tanh(net[0](x)).detach())
    assert cached.stats().hits == 0


def test_disk_store_of_another_structure_is_not_reused(tmp_path):
    torch.manual_seed(0)
    a = frozen(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    b = copy.deepcopy(a)
    b[1] = nn.Tanh().eval()
    x = torch.randn(6, 4)
    lf.cache(a, store="disk", path=tmp_path)(x)
    cb = lf.cache(b, store="disk", path=tmp_path)
    torch.testing.assert_close(cb(x), torch.tanh(b[0](x)).detach())
    assert cb.stats().hits == 0
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


def test_changed_configuration_and_code_are_caught_by_the_deep_check():
    torch.manual_seed(0)
    net = frozen(nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU(0.1)))
    cached = lf.cache(net, verify_every=0)
    x = -torch.rand(6, 4) - 5  # negative: the slope shows
    cached(x)
    net[1].negative_slope = 0.5
    assert not cached.verify_cache()
    torch.testing.assert_close(cached(x), nn.functional.leaky_relu(net[0](x), 0.5).detach())

    class Act(nn.Module):
        def forward(self, h):
            return h * 2

    net[1] = Act().eval()
    cached(x)
    Act.forward = lambda self, h: h * 3  # new code, same objects
    cached(x)  # x again: served only after the deep check
    torch.testing.assert_close(cached(x), (net[0](x) * 3).detach())


def test_data_edit_is_caught_before_a_sample_is_served_again():
    torch.manual_seed(0)
    cached = lf.cache(frozen(nn.Linear(5, 3)))  # default verify_every=100
    x = torch.randn(10, 5)
    cached(x)
    ema = torch.randn(3, 5)
    cached.weight.data.copy_(ema)  # no version counter sees this
    torch.testing.assert_close(cached(x), nn.functional.linear(x, ema, cached.bias).detach())
    assert cached.stats().misses == 20


# --------------------------------------------------------------------------- transformers outputs


@pytest.mark.parametrize("flag", ["output_hidden_states", "output_attentions"])
def test_hf_recorded_outputs_are_complete(flag):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=100, max_position_embeddings=32)
    torch.manual_seed(0)
    bert = frozen(transformers.BertModel(cfg))
    ref = copy.deepcopy(bert)
    cached = lf.cache(bert)
    ids = torch.randint(1, 100, (4, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    field = "hidden_states" if flag == "output_hidden_states" else "attentions"
    with torch.no_grad():
        want = getattr(ref(input_ids=ids, attention_mask=mask, **{flag: True}), field)
    for _ in range(2):  # a miss, then a hit
        got = getattr(cached(input_ids=ids, attention_mask=mask, **{flag: True}), field)
        assert got is not None and len(got) == len(want)
        real = mask.bool()
        for g, w in zip(got, want, strict=True):
            if field == "hidden_states":
                torch.testing.assert_close(g[real], w[real], **TOL)
            else:
                torch.testing.assert_close(g, w, **TOL)
    assert cached.stats().hits == 4
    plain = cached(input_ids=ids, attention_mask=mask)
    assert getattr(plain, field) is None  # another signature, another entry


def test_empty_batches_numpy_scalars_and_non_contiguous_inputs():
    np = pytest.importorskip("numpy")

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x, scale):
            return self.lin(x) * float(scale)

    torch.manual_seed(0)
    cached = lf.cache(frozen(Scaled()))
    assert cached(torch.randn(0, 4), np.float32(2.0)).shape == (0, 3)
    x = torch.randn(4, 8).t()  # a transposed (non-contiguous) layout
    assert not x.is_contiguous()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = cached(x, np.float32(2.0))
        b = cached(x.contiguous(), np.float32(2.0))  # the same values: hits
        c = cached(x, np.float64(3.0))  # another scalar: another key
    assert cached.stats().hits == 8 and cached.stats().misses == 16
    assert torch.equal(a, b)
    torch.testing.assert_close(c, a * 1.5)


# --------------------------------------------------------------------------- under a Freezer


class _EncoderHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.encoder(x))


def _cached_under_freezer() -> tuple[_EncoderHead, torch.optim.Optimizer, lf.Freezer]:
    """A model whose encoder is frozen in eval mode by a Freezer, then cached."""
    torch.manual_seed(0)
    model = _EncoderHead()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fz = lf.Freezer(model, opt)
    fz.freeze("encoder", mode="eval")
    model.encoder = lf.cache(model.encoder)
    return model, opt, fz


def test_a_data_edit_of_a_cached_module_under_a_freezer_is_caught_at_the_next_step():
    model, opt, fz = _cached_under_freezer()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 2, generator=g)
    batches = list(zip(x.split(4), y.split(4), strict=True))

    def forward_backward(xb, yb):
        opt.zero_grad()
        nn.functional.mse_loss(model(xb), yb).backward()

    for xb, yb in batches + batches[:1]:  # an epoch fills the cache, the next one starts hitting
        forward_backward(xb, yb)
        opt.step()  # the guard checks the frozen encoder after every step: unchanged so far
    assert model.encoder.stats().hits == 4
    with torch.no_grad():
        model.encoder[0].weight.data.mul_(1.5)  # an edit no version counter sees, mid-epoch
    forward_backward(*batches[1])
    with pytest.raises(lf.FrozenParameterChanged, match=r"encoder\.0\.weight") as info:
        opt.step()  # the guard's check after the step
    assert info.value.names == ["encoder.0.weight"]
    # a deliberate edit is accepted with refresh(), which tells the cache: no stale hit after it
    fz.refresh()
    assert model.encoder.verify_cache() is True  # already checked and re-keyed by refresh()
    for xb, _ in batches:
        torch.testing.assert_close(model.encoder(xb), fresh(model.encoder, xb), **TOL)
    fz.check()


def test_refresh_after_a_deliberate_edit_drops_the_cached_features_of_the_old_weights():
    model, _opt, fz = _cached_under_freezer()  # the optimizer kept alive beside the Freezer
    xs = torch.randn(16, 6).split(4)
    for xb in xs + xs[:1]:  # an epoch fills the cache; the next one starts with a hit
        model.encoder(xb)
    assert model.encoder.stats().hits == 4
    with torch.no_grad():
        model.encoder[0].weight.data.mul_(1.5)  # an EMA-style edit no version counter sees
    fz.refresh()  # accepted on purpose
    misses = model.encoder.stats().misses
    out = model.encoder(xs[1])  # not served since the last deep check: would be a stale hit
    assert model.encoder.stats().misses == misses + 4
    torch.testing.assert_close(out, fresh(model.encoder, xs[1]), **TOL)


# --------------------------------------------------------------------------- the deep check's fingerprint

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from layerfreeze.feature_cache.validity import fingerprints  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8]


@settings(max_examples=40, deadline=None)
@given(numel=st.integers(1, 20_000), dtype=st.sampled_from(DTYPES), where=st.floats(0, 1, exclude_max=True),
       bit=st.integers(0, 62), seed=st.integers(0, 2**16))
def test_the_deep_check_sees_any_single_bit_change(numel, dtype, where, bit, seed):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(numel, generator=g) * 50).to(dtype)
    other = torch.randn(3, 5, generator=g)
    before = fingerprints([other, t])
    assert torch.equal(fingerprints([other, t.clone()]), before)  # same values, same fingerprint
    i = int(where * numel)
    bits = t.data.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    bits[i] ^= 1 << (bit % (8 * t.element_size() - 1))  # an edit through .data: no version counter moves
    assert not torch.equal(fingerprints([other, t]), before), f"element {i} of {numel} ({dtype})"


@settings(max_examples=30, deadline=None)
@given(numel=st.integers(2, 4096 * 2), i=st.integers(0, 10**6), j=st.integers(0, 10**6))
def test_the_deep_check_sees_swaps_in_small_tensors_and_across_rows(numel, i, j):
    t = torch.arange(numel, dtype=torch.float32)  # distinct values
    i, j = i % numel, j % numel
    if i == j or t[i] == t[j]:
        return
    per_word = 2 if numel % 2 == 0 else 1  # float32 read as 64-bit words when the storage allows
    words_i, words_j = i // per_word, j // per_word
    small = numel // per_word <= 4096
    if not small and (words_i // 128 == words_j // 128):
        return  # a swap within one row of a large tensor: not promised
    before = fingerprints([t])
    t[[i, j]] = t[[j, i]]
    assert not torch.equal(fingerprints([t]), before)


def test_the_deep_check_reads_channels_last_storage_in_place():
    w = torch.randn(8, 16, 3, 3).to(memory_format=torch.channels_last)
    before = fingerprints([w])
    w.data[0, 1, 0, 0] += 1  # a view's edit of the real storage
    assert not torch.equal(fingerprints([w]), before)
    assert torch.equal(fingerprints([w.clone(memory_format=torch.channels_last)]), fingerprints([w]))


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 3000), min_size=2, max_size=6), a=st.integers(0, 10**6), b=st.integers(0, 10**6),
       whole=st.booleans())
def test_the_deep_check_sees_swaps_between_small_tensors(sizes, a, b, whole):
    # small tensors are summed together; each keeps its own row and column sums
    ts = [torch.arange(n, dtype=torch.float32) + 10_000 * k for k, n in enumerate(sizes)]  # distinct values
    before = fingerprints(ts)
    assert torch.equal(fingerprints([t.clone() for t in ts]), before)
    if whole:  # two tensors of one size trade their contents (their sums may be equal)
        u = ts[0]
        ts.append(u.flip(0).clone() if len(u) > 1 else u + 0.5)
        before = fingerprints(ts)
        kept = u.clone()
        u.data.copy_(ts[-1])
        ts[-1].data.copy_(kept)
    else:
        i, j = a % len(ts), b % len(ts)
        p, q = a % sizes[i], b % sizes[j]
        if i == j and p == q:
            return
        ts[i].data[p], ts[j].data[q] = ts[j][q].item(), ts[i][p].item()
    assert not torch.equal(fingerprints(ts), before)
