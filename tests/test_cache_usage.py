"""Everyday use: precompute over common loaders, torch.compile, storage dtype."""

import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import layerfreeze as lf
from layerfreeze.errors import CacheError, LayerFreezeError


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.enc(x)))


def cached_model():
    torch.manual_seed(0)
    model = Model()
    lf.freeze(model, "enc", mode="eval")
    model.enc = lf.cache(model.enc)
    return model


@pytest.mark.parametrize("kind", ["tuple", "list", "tensor", "dict"])
def test_precompute_reads_common_loaders(kind):
    model = cached_model()
    x, y = torch.randn(20, 6), torch.randint(0, 2, (20,))
    if kind == "tuple":
        loader: Any = DataLoader(TensorDataset(x, y), batch_size=6, shuffle=True)
    elif kind == "list":
        loader = [[x[i:i + 6], y[i:i + 6]] for i in range(0, 20, 6)]
    elif kind == "tensor":
        loader = DataLoader(x, batch_size=6)
    else:
        loader = [{"x": x[i:i + 6]} for i in range(0, 20, 6)]
    stats = lf.precompute(model, loader, progress=False)
    assert stats["enc"].misses == 20
    model(x)
    assert model.enc.stats().hits == 20


def test_a_failing_call_names_forward():
    model = cached_model()
    loader = [(torch.randn(4, 5), torch.zeros(4))]  # wrong feature size
    with pytest.raises(CacheError, match=r"batch 0 \(a tuple of 2: Tensor\(4, 5\).*pass forward=") as e:
        lf.precompute(model, loader, progress=False)
    assert isinstance(e.value, LayerFreezeError) and isinstance(e.value.__cause__, RuntimeError)
    stats = lf.precompute(model, [{"inputs": torch.randn(4, 6)}], forward=lambda m, b: m(b["inputs"]),
                          progress=False)
    assert stats["enc"].misses == 4


class CountingBackend:
    def __init__(self) -> None:
        self.compiles = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.compiles += 1
        return gm.forward


def test_compiled_model_breaks_once_at_the_cache_and_does_not_recompile():
    torch._dynamo.reset()
    model = cached_model()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    data = torch.randn(8, 4, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outs = [compiled(data[i]) for i in range(4)]  # new samples every batch: misses
        outs += [compiled(data[i]) for i in range(4)]  # hits
    with torch.no_grad():
        for i, out in enumerate(outs):
            torch.testing.assert_close(out, model.head(torch.relu(model.enc._lf_base.forward(model.enc, data[i % 4]))))
    assert model.enc.stats().hits == 16 and model.enc.stats().misses == 16
    # the graphs before and after the break compile once, whatever the batch's contents
    assert backend.compiles <= 2
    torch._dynamo.reset()


def test_storage_dtype_halves_memory_and_rounds_to_it():
    torch.manual_seed(0)
    enc = nn.Linear(6, 64)
    lf.freeze(enc, mode="eval")
    exact = lf.cache(enc)
    x = torch.randn(64, 6)
    exact(x)
    torch.manual_seed(0)
    enc2 = nn.Linear(6, 64)
    lf.freeze(enc2, mode="eval")
    half = lf.cache(enc2, dtype=torch.bfloat16)
    half(x)
    out = half(x)
    assert half.stats().hits == 64
    assert half.stats().bytes_held * 2 == exact.stats().bytes_held
    assert out.dtype == torch.float32
    with torch.no_grad():
        want = enc2._lf_base.forward(enc2, x)
    torch.testing.assert_close(out, want.bfloat16().float(), rtol=0, atol=0)  # exactly the rounded values
    torch.testing.assert_close(out, want, rtol=1e-2, atol=1e-2)


def test_bad_arguments_change_nothing():
    lin = nn.Linear(2, 2)
    for kw, match in [({"batch_dim": -1}, "batch_dim must be"), ({"dtype": torch.int8}, "dtype must be a floating"),
                      ({"padding": 3}, "padding must be the name"), ({"key": 5}, "key must be the name")]:
        with pytest.raises(CacheError, match=match):
            lf.cache(lin, **kw)
        assert type(lin) is nn.Linear and "_lf_cache" not in lin.__dict__
