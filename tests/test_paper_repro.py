"""The paper reproduction study (examples/paper_repro, issue 7): data rules, and the whole
pipeline at a tiny scale (train, evaluate, analyse, figures) in a subprocess."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("sklearn", reason="the study needs scikit-learn (digits)")
pytest.importorskip("matplotlib", reason="the study needs matplotlib (figures)")
pytest.importorskip("scipy", reason="the study needs scipy (Spearman correlation)")

import anyexperts_ops  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "paper_repro")


def _load_data_module():
    spec = importlib.util.spec_from_file_location("paper_repro_data",
                                                  os.path.join(EXAMPLE, "data.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_canvas_digits_rules():
    d = _load_data_module()
    tr_x, tr_y, te_x, te_y = d.load_digits_split()
    assert len(tr_y) + len(te_y) == 1797
    data = d.CanvasDigits(te_x, te_y, canvas=24, patch=4)
    ev = data.fixed_eval(seed=3, limit=20)
    B = 20 * len(d.TEMPLATES)
    assert ev.patches.shape == (B, 36, 16) and ev.text.shape == (B, d.TEXT_LEN)
    # blank canvas: patches are the canvas cut row-major; ink is the clean patch sum
    assert torch.allclose(ev.patches.sum(-1), ev.ink)
    assert torch.allclose(ev.canvas.sum((1, 2)), te_x[:20].repeat_interleave(4, 0).sum((1, 2)))
    fg = (ev.ink > 0).sum(1)
    assert (fg >= 1).all() and (fg <= 9).all()           # an 8x8 digit covers at most 3x3 patches
    # answers follow the questions
    for i in range(B):
        words = [d.VOCAB[t] for t in ev.text[i].tolist()]
        dig, q, a = int(ev.digit[i]), int(ev.qtype[i]), int(ev.answer[i])
        if q == 0:
            assert a == dig
        elif q == 1:
            assert a == (d.YES if dig % 2 == 0 else d.NO)
        elif q == 2:
            assert a == (d.YES if dig > d.NUMBER_WORDS.index(words[4]) else d.NO)
        else:
            assert a == (d.YES if dig == d.NUMBER_WORDS.index(words[4]) else d.NO)
    # fixed seeds: the same evaluation set twice
    ev2 = data.fixed_eval(seed=3, limit=20)
    assert torch.equal(ev.patches, ev2.patches) and torch.equal(ev.text, ev2.text)


def test_tiny_study_runs(tmp_path):
    env = dict(os.environ)
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(anyexperts_ops.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLE, "run.py"), "--tiny",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    models = res["models"]
    assert set(models) == {"static_k2", "anyexperts_t2"}
    st = models["static_k2"]["metrics"]
    assert st["avg_k_real"] == pytest.approx(2.0)            # static top-K: exactly K real
    assert all(v == pytest.approx(2.0) for v in st["avg_k_real_by_modality"].values())
    assert st["real_per_fg_patch"] == pytest.approx(st["real_per_bg_patch"])
    ae = models["anyexperts_t2"]["metrics"]
    cfg = models["anyexperts_t2"]["config"]
    for v in ae["avg_k_real_by_modality"].values():
        assert 0 <= v <= cfg["k_max"]
    assert len(ae["corr_importance_ink_pearson_by_layer"]) == res["hyper"]["layers"]
    assert 0 <= ae["accuracy"] <= 1 and 0 <= ae["real_share_on_fg"] <= 1
    assert (tmp_path / "results.md").read_text().startswith("| model |")
    for f in res["figures"]:
        p = tmp_path / f
        assert p.exists() and 0 < p.stat().st_size < 300_000, f
    assert {"heatmap_anyexperts_t2.png", "accuracy_vs_avgk.png"} <= set(res["figures"])


def test_seeds_table_aggregates_runs(tmp_path):
    """seeds.py: mean (min-max) of each column over the runs, one row per model."""
    sys.path.insert(0, EXAMPLE)
    try:
        import seeds
    finally:
        sys.path.remove(EXAMPLE)

    def run(seed, acc, image):
        metrics = {"avg_k_real": 2.0, "avg_k_real_by_modality": {"image": image, "text": 3.0},
                   "accuracy": acc, "real_per_fg_patch": 1.5, "real_per_bg_patch": 2.5}
        return {"hyper": {"seed": seed}, "models": {"m": {"metrics": metrics}}}

    paths = []
    for seed, acc, image in ((0, 0.80, 1.0), (1, 0.90, 2.0), (2, 0.85, 3.0)):
        p = tmp_path / f"r{seed}.json"
        p.write_text(json.dumps(run(seed, acc, image)))
        paths.append(str(p))
    seeds.main([*paths, "--out", str(tmp_path / "seeds.md")])
    text = (tmp_path / "seeds.md").read_text()
    assert "over seeds 0, 1, 2" in text
    assert "| m | 2.00 (2.00-2.00) | 2.00 (1.00-3.00) | 3.00 (3.00-3.00) | 85.0 (80.0-90.0) |" in text
    with pytest.raises(SystemExit, match="same seed"):
        seeds.main([paths[0], paths[0], "--out", str(tmp_path / "x.md")])
