import json
import os
import subprocess
import sys
import warnings
from collections import namedtuple

import pytest
import torch
from torch import nn

import layerfreeze as lf

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 5)

    def forward(self, x, scale=1.0):
        h = torch.tanh(self.lin(x)) * scale
        return h, h.sum(-1), None


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 4)

    def forward(self, x, mask):
        h = self.lin(x) * mask[:, None]
        return {"h": h, "n": 3, "pair": (h.relu(), h.exp())}


Pair = namedtuple("Pair", "a b")


class NamedOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, x):
        return Pair(self.lin(x), self.lin(x).sigmoid())


def small_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.BertModel(cfg)


def frozen_cached(module, **kw):
    lf.freeze(module, mode="eval")
    return lf.cache(module, **kw)


def leaves(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in leaves(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in leaves(v)]
    return [out]


def same(a, b, *, exact=True):
    """Same structure and values: bitwise where the same computation ran twice,
    else within float32 rounding (another batch composition or row order may
    pick another reduction order, and PyTorch does not promise bitwise results)."""
    la, lb = leaves(a), leaves(b)
    assert type(a) is type(b) and len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape
            if exact:
                assert torch.equal(x, y)
            else:
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
        else:
            assert x == y


def permuted(out, idx):
    """``out`` with its batch rows (dimension 0 of every tensor) taken at ``idx``."""
    if isinstance(out, torch.Tensor):
        return out[idx]
    if isinstance(out, dict):
        return type(out)(**{k: permuted(v, idx) for k, v in out.items()})
    if hasattr(out, "_fields"):
        return type(out)(*(permuted(v, idx) for v in out))
    if isinstance(out, (tuple, list)):
        return type(out)(permuted(v, idx) for v in out)
    return out


def make(kind):
    torch.manual_seed(1)
    if kind == "bert":
        module = small_bert()
        ids = torch.randint(0, 100, (24, 12))
        mask = torch.ones_like(ids)
        mask[::3, 8:] = 0
        return module, (), {"input_ids": ids, "attention_mask": mask}
    x = torch.randn(24, 6)
    if kind == "tensor":
        return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 2)), (x,), {}
    if kind == "tuple":
        return TupleOut(), (x,), {"scale": 2.0}
    if kind == "dict":
        return DictOut(), (x, (torch.arange(24) % 2).float()), {}
    return NamedOut(), (x,), {}


def zero_pads(out, kwargs):
    """``out`` as the cache returns it for a padded batch: per-token outputs hold 0
    at padded positions (a fresh forward leaves whatever the module computed there)."""
    mask = kwargs.get("attention_mask")
    if mask is None:
        return out
    return type(out)(**{k: v * mask[..., None] if isinstance(v, torch.Tensor) and v.dim() == 3 else v
                        for k, v in out.items()})


def rows(args, kwargs, idx):
    pick = lambda t: t[idx] if isinstance(t, torch.Tensor) else t  # noqa: E731
    return tuple(pick(a) for a in args), {k: pick(v) for k, v in kwargs.items()}


@pytest.mark.parametrize("kind", ["tensor", "tuple", "dict", "namedtuple", "bert"])
def test_hits_equal_fresh_forward_of_same_batch(kind):
    module, args, kwargs = make(kind)
    reference = make(kind)[0]
    reference.load_state_dict(module.state_dict())
    lf.freeze(reference, mode="eval")
    cached = frozen_cached(module)
    first = cached(*args, **kwargs)
    same(first, zero_pads(reference(*args, **kwargs), kwargs))
    perm = torch.randperm(24)
    a, k = rows(args, kwargs, perm)
    hit = cached(*a, **k)
    assert cached.stats().hits == 24 and cached.stats().misses == 24
    same(hit, permuted(first, perm))  # a hit serves exactly what was stored
    same(hit, zero_pads(reference(*a, **k), k), exact=False)  # and what a fresh forward gives, within rounding
    assert all(not t.requires_grad for t in leaves(hit) if isinstance(t, torch.Tensor))


def test_rebatched_and_partial_batches_hit_and_match():
    module, _, kw = make("bert")
    reference = make("bert")[0]
    reference.load_state_dict(module.state_dict())
    lf.freeze(reference, mode="eval")
    cached = frozen_cached(module)
    full = cached(**kw)
    # other batch sizes, a short last batch: all hits, bitwise what was stored
    order = torch.randperm(24)
    for chunk in order.split(7):
        out = cached(**rows((), kw, chunk)[1])
        assert torch.equal(out.last_hidden_state, full.last_hidden_state[chunk])
        # against a fresh forward of that same batch: batch-size dependent kernels
        # may round differently, so equal up to float32 rounding
        ref = zero_pads(reference(**rows((), kw, chunk)[1]), rows((), kw, chunk)[1])
        torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=1e-5, atol=1e-5)
    assert cached.stats().hits == 24 and cached.stats().misses == 24
    # a batch mixing seen and new samples computes only the new ones
    new_ids = torch.randint(0, 100, (5, 12))
    mixed = {
        "input_ids": torch.cat([kw["input_ids"][:3], new_ids]),
        "attention_mask": torch.cat([kw["attention_mask"][:3], torch.ones_like(new_ids)]),
    }
    out = cached(**mixed)
    assert cached.stats().misses == 29
    torch.testing.assert_close(out.last_hidden_state, zero_pads(reference(**mixed), mixed).last_hidden_state,
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(out.last_hidden_state[:3], full.last_hidden_state[:3])


def test_shuffled_epochs_through_a_dataloader_all_hit():
    module, (x,), _ = make("tensor")
    cached = frozen_cached(module)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=5, shuffle=True)
    for _ in range(3):
        for (batch,) in loader:
            cached(batch)
    s = cached.stats()
    assert (s.misses, s.hits, s.entries) == (24, 48, 24)
    assert s.bytes_held >= 24 * 2 * 4


def test_keys_see_non_tensor_arguments_and_dtype():
    module, (x,), _ = make("tuple")
    cached = frozen_cached(module)
    a = cached(x, scale=1.0)
    b = cached(x, scale=2.0)
    assert cached.stats().misses == 48
    assert torch.equal(b[0], a[0] * 2)
    cached(x.double().float(), scale=1.0)
    assert cached.stats().hits == 24


def test_module_identity_names_and_params_unchanged():
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    ids = [id(p) for p in net.parameters()]
    keys = list(net.state_dict())
    lf.freeze(net, "[0]", mode="eval")
    enc = lf.cache(net[0])
    assert enc is net[0] and isinstance(enc, nn.Linear)
    assert [id(p) for p in net.parameters()] == ids and list(net.state_dict()) == keys
    assert lf.select(net, "[0]") == ["0.weight", "0.bias"]


@pytest.mark.parametrize(
    "setup, match",
    [
        ("unfrozen", "requires grad, so the module is not frozen"),
        ("train", "training mode"),
        ("input_grad", "an input requires grad"),
    ],
)
def test_bypass_with_one_warning(setup, match):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.5))
    x = torch.randn(8, 6)
    if setup == "unfrozen":
        module.eval()
    elif setup == "train":
        lf.freeze(module, mode="norm")  # dropout stays in training mode
        module.train()
    else:
        lf.freeze(module, mode="eval")
        x.requires_grad_(True)
    cached = lf.cache(module)
    with pytest.warns(UserWarning, match=match):
        out = cached(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached(x)
    s = cached.stats()
    assert (s.hits, s.entries, s.bypassed) == (0, 0, 2)
    if setup != "train":
        out.sum().backward()  # gradients flow as without a cache
        grad_holder = x if setup == "input_grad" else module[0].weight
        assert grad_holder.grad is not None


def test_trap_precomputed_features_go_stale_but_cache_follows_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 1))
    x = torch.randn(16, 6)
    lf.freeze(model, "[0]", mode="eval")
    features = model[0](x).detach()  # the plain way: computed once, kept
    cached = lf.cache(model[0])
    cached(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    fz = lf.Freezer(model, opt)
    fz.unfreeze("[0]")
    with pytest.warns(UserWarning, match="not frozen"):
        out = model(x)
    out.pow(2).mean().backward()  # gradients reach the unfrozen encoder
    assert model[0].weight.grad is not None
    opt.step()
    fz.freeze("[0]", mode="eval")
    fresh = nn.functional.linear(x, model[0].weight, model[0].bias)
    assert not torch.allclose(features, fresh)  # plain precomputed features are stale
    assert torch.equal(cached(x), fresh)  # the cache recomputed
    assert cached.stats().misses == 32


@pytest.mark.parametrize("edit", ["no_grad", "load_state_dict", "assign_data", "through_data"])
def test_any_weight_change_invalidates(edit):
    torch.manual_seed(0)
    module = frozen_cached(nn.Linear(5, 3), verify_every=1)
    x = torch.randn(10, 5)
    before = cached_out = module(x)
    if edit == "no_grad":
        with torch.no_grad():
            module.weight[1, 2] += 1.0
    elif edit == "load_state_dict":
        state = {k: v + 1 for k, v in module.state_dict().items()}
        module.load_state_dict(state)
    elif edit == "assign_data":
        module.weight.data = module.weight.data * 2
    else:
        module.weight.data[0, 0] += 1.0  # no version counter sees this
    cached_out = module(x)
    assert not torch.equal(cached_out, before)
    assert torch.equal(cached_out, nn.functional.linear(x, module.weight, module.bias))
    assert module.stats().misses == 20


def test_data_edit_caught_by_verify_cache():
    torch.manual_seed(0)
    module = frozen_cached(nn.Linear(5, 3), verify_every=0)
    x = torch.randn(10, 5)
    module(x)
    assert module.verify_cache()
    module.weight.data[2, 4] *= 1.5
    assert not module.verify_cache()
    assert torch.equal(module(x), nn.functional.linear(x, module.weight, module.bias))
    assert module.stats().misses == 20


def test_memory_bound_spills_to_disk(tmp_path):
    module, (x,), _ = make("tensor")
    row = 2 * 4  # two float32 outputs per sample
    cached = frozen_cached(module, max_bytes=10 * row, path=tmp_path)
    first = cached(x)
    s = cached.stats()
    assert s.bytes_held <= 10 * row and s.bytes_on_disk == (24 - s.bytes_held // row) * row
    again = cached(x.flip(0))
    assert torch.equal(again, first.flip(0)) and cached.stats().hits == 24


def test_memory_bound_without_path_uses_a_temporary_spill_directory():
    module, (x,), _ = make("tensor")
    cached = frozen_cached(module, max_bytes=0)
    cached(x)
    s = cached.stats()
    assert s.bytes_held == 0 and s.bytes_on_disk == 24 * 8
    spill = cached.__dict__["_lf_cache"].disk.dir
    assert os.path.isdir(spill)
    del cached, module
    import gc

    gc.collect()
    assert not os.path.exists(spill)


def test_disk_bound_stops_storing_with_a_warning(tmp_path):
    module, (x,), _ = make("tensor")
    cached = frozen_cached(module, store="disk", path=tmp_path, max_bytes=50)
    with pytest.warns(UserWarning, match="max_bytes reached"):
        cached(x)
    s = cached.stats()
    assert s.bytes_on_disk <= 50 and s.entries == 50 // 8 and s.bytes_held == 0
    cached(x)
    assert cached.stats().hits == 6


_CHILD = """
import json, sys, torch, layerfreeze as lf
from torch import nn
torch.manual_seed(int(__import__("os").environ.get("LAYERFREEZE_TEST_SEED_OFFSET", "0")))  # the parent's seed 0, shifted as conftest shifts it
net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
if sys.argv[2] == "changed":
    with torch.no_grad():
        net[0].weight[0, 0] += 0.5
lf.freeze(net, mode="eval")
net = lf.cache(net, store="disk", path=sys.argv[1])
x = torch.randn(12, 6)
out = net(x[torch.arange(11, -1, -1)])
s = net.stats()
print(json.dumps({"hits": s.hits, "misses": s.misses, "out": out.tolist()}))
"""


def run_child(path, variant):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", _CHILD, str(path), variant], capture_output=True, text=True,
                         env=env, timeout=120, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_disk_store_reused_by_a_new_process_not_after_weight_change(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    lf.freeze(net, mode="eval")
    net = lf.cache(net, store="disk", path=tmp_path)
    x = torch.randn(12, 6)
    mine = net(x)
    assert net.stats().bytes_on_disk == 12 * 2 * 4
    same_weights = run_child(tmp_path, "same")
    assert (same_weights["hits"], same_weights["misses"]) == (12, 0)
    assert torch.equal(torch.tensor(same_weights["out"]), mine.flip(0))
    changed = run_child(tmp_path, "changed")
    assert (changed["hits"], changed["misses"]) == (0, 12)
    assert len(os.listdir(tmp_path)) == 2  # one directory per weight version


def test_precompute_fills_cache_and_skips_the_rest_of_the_model():
    torch.manual_seed(0)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Linear(6, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.enc(x))

    model = Model()
    calls = []
    model.head.register_forward_hook(lambda *a: calls.append(1))
    lf.freeze(model, "enc", mode="eval")
    model.enc = lf.cache(model.enc)
    data = torch.randn(20, 6)
    loader = torch.utils.data.DataLoader(data, batch_size=6, shuffle=True)
    stats = lf.precompute(model, loader, progress=False)
    assert stats["enc"].misses == 20 and stats["enc"].hits == 0
    assert len(calls) == 1  # head ran on the first batch only
    model(data)
    assert model.enc.stats().hits == 20
    dict_loader = [{"x": data[:4]}]
    lf.precompute(model, dict_loader, forward=lambda m, b: m(b["x"]), progress=False)
    assert model.enc.stats().hits == 24


def test_precompute_refuses_before_running():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    with pytest.raises(ValueError, match="holds no cached module"):
        lf.precompute(model, [torch.ones(2, 3)], progress=False)
    model[0] = lf.cache(model[0])
    with pytest.raises(ValueError, match=r"'0' cannot be cached: .*requires grad"):
        lf.precompute(model, [torch.ones(2, 3)], progress=False)
    assert model[0].stats().misses == 0


def test_bad_arguments():
    with pytest.raises(TypeError, match="expects an nn.Module"):
        lf.cache("bert")
    with pytest.raises(ValueError, match="store='ram' is not one of"):
        lf.cache(nn.Linear(2, 2), store="ram")
    with pytest.raises(ValueError, match="needs a directory: pass path="):
        lf.cache(nn.Linear(2, 2), store="disk")
    with pytest.raises(ValueError, match="max_bytes must be"):
        lf.cache(nn.Linear(2, 2), max_bytes=-1)
    lin = lf.cache(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="already cached"):
        lf.cache(lin)


def test_memory_store_grows_and_gathers_in_any_order():
    torch.manual_seed(3)
    lin = nn.Linear(6, 5)
    cached = frozen_cached(nn.Sequential(lin))
    x = torch.randn(300, 6)
    with torch.no_grad():  # in the batches the cache computes them: a 300-row matmul may round differently
        ref = torch.cat([lin(x[i:i + 50]) for i in range(0, 300, 50)])
    store = cached.__dict__["_lf_cache"].memory
    caps = []
    for i in range(0, 300, 50):
        cached(x[i:i + 50])
        caps.append(next(iter(store.bufs.values()))[0].shape[0])
    assert caps == [64, 128, 256, 256, 256, 512]  # capacity doubles
    s = cached.stats()
    assert s.bytes_held == 512 * 5 * 4 and s.entries == 300
    perm = torch.randperm(300)
    for idx in (torch.arange(70, 120), perm[:37], perm, torch.tensor([299, 0, 64, 128, 5])):
        assert torch.equal(cached(x[idx]), ref[idx])  # bitwise what was stored, any order
    assert cached.stats().misses == 300
    more = torch.randn(400, 6)
    with torch.no_grad():
        ref_more = lin(more)
    assert torch.equal(cached(more), ref_more)  # growth after hits
    idx = torch.randperm(700)
    both = torch.cat([x, more])
    assert torch.equal(cached(both[idx]), torch.cat([ref, ref_more])[idx])
    assert cached.stats().entries == 700 and cached.stats().misses == 700


def test_a_memory_bound_caps_the_memory_store():
    cached = frozen_cached(nn.Linear(6, 5), max_bytes=100 * 5 * 4)
    x = torch.randn(150, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cached(x)
    s = cached.stats()
    assert s.bytes_held == 100 * 5 * 4 and s.entries == 150  # the rest spilled to disk
    assert s.bytes_on_disk == 50 * 5 * 4


@pytest.mark.parametrize("kind", ["tensor", "tuple", "dict", "namedtuple", "bert"])
def test_outputs_are_freed_without_the_cycle_collector(kind):
    import gc
    import weakref

    module, args, kwargs = make(kind)
    cached = frozen_cached(module)
    refs = []
    gc.disable()
    try:
        for _ in range(2):  # a miss, then a hit
            out = cached(*args, **kwargs)
            refs += [weakref.ref(t) for t in leaves(out) if isinstance(t, torch.Tensor)]
            del out
        assert refs and all(r() is None for r in refs)
    finally:
        gc.enable()
