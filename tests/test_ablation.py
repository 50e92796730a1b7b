"""The ablation table is measured: each row's accuracy equals a fresh evaluation of that run's best.keras."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from conftest import run_tool

from fer_keras import ablation
from fer_keras import data as fer_data
from fer_keras.errors import ConfigError
from fer_keras.evaluate import evaluate
from fer_keras.inference import load_predictor
from fer_keras.model import resnet18


@pytest.fixture
def two_runs(trained_run, tmp_path):
    """The shared trained run and a copy whose recipe says mixup and whose best.keras is untrained."""
    _, result = trained_run
    base = tmp_path / "base"
    shutil.copytree(result.model_dir, base, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    other = tmp_path / "mixup"
    shutil.copytree(base, other)
    config = json.loads((other / "config.json").read_text())
    config.update(mixup=0.2, model_dir=str(other), verbose=2)  # verbose and paths are not recipe changes
    (other / "config.json").write_text(json.dumps(config))
    resnet18("imagenet").save(other / "best.keras")
    config = json.loads((base / "config.json").read_text())
    del config["mixup"]  # as written before --mixup existed: the default, 0
    (base / "config.json").write_text(json.dumps(config))
    return base, other


def test_rows_are_measured_and_name_what_changed(two_runs, monkeypatch):
    base, other = two_runs
    rows = ablation.build_table([base, other], None, ("none", "flip"))
    val = fer_data.load(None).split("val")
    for row, run in zip(rows, (base, other)):
        fresh = evaluate(load_predictor(run / "best.keras"), val, "flip", split_name="val")
        assert row.accuracy["flip"] == fresh.accuracy
        assert row.num_images == len(val) == 256 and row.split_label == fer_data.split_label("val")
        assert row.epochs_done == row.epochs_planned == 2 and row.wall_seconds > 0
    assert rows[0].changes == [] and rows[1].changes == ["mixup=0.2"]
    assert rows[0].accuracy != rows[1].accuracy
    table = ablation.render_markdown(rows)
    assert "| `mixup` | `mixup=0.2` | 2 |" in table and "(baseline)" in table
    assert f"{100 * rows[1].accuracy['none']:.1f} %" in table

    # A second table reads the cache; a new best.keras is measured again.
    monkeypatch.setattr("fer_keras.evaluate.evaluate", lambda *a, **k: pytest.fail("cache not used"))
    assert [r.accuracy for r in ablation.build_table([base, other], None, ("none", "flip"))] == \
        [r.accuracy for r in rows]
    stat = (other / "best.keras").stat()
    os.utime(other / "best.keras", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(pytest.fail.Exception, match="cache not used"):
        ablation.build_table([base, other], None, ("none",))


def test_cli_writes_the_table_and_refuses_a_run_without_epochs(two_runs, tmp_path):
    base, other = two_runs
    out = tmp_path / "ablation.md"
    proc = run_tool("ablation", f"--runs={base},{other}", "--tta=none", f"--output={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.read_text() == proc.stdout and "| `base` | (baseline) |" in proc.stdout
    assert [r["run"] for r in json.loads(out.with_suffix(".json").read_text())] == ["base", "mixup"]
    ablation.check_outputs(out)  # an earlier table and its figures may be replaced
    notes = tmp_path / "notes.md"
    notes.write_text("# my notes\n")
    refused = run_tool("ablation", f"--runs={base},{other}", f"--output={notes}", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == \
        f"error: {notes}: exists and is not an ablation table; choose another --output or remove the file"
    assert notes.read_text() == "# my notes\n" and not notes.with_suffix(".json").exists()
    (tmp_path / "base.json").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"base.json: exists and is not an ablation's figures"):
        ablation.check_outputs(tmp_path / "base.md")
    bad_name = run_tool("ablation", f"--runs={base}", f"--output={base / 'history.csv'}", cwd=tmp_path)
    assert bad_name.returncode != 0 and "--output must end with .md" in bad_name.stderr
    (tmp_path / "empty").mkdir()
    bad = run_tool("ablation", f"--runs={base},{tmp_path / 'empty'}", cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'empty'}: not a training run with a " \
                                                  "finished epoch (no best.keras)"


def test_an_empty_history_is_a_clear_error(two_runs):
    base, _ = two_runs
    (base / "history.csv").write_text("epoch,loss,accuracy,val_loss,val_accuracy,learning_rate,seconds\n")
    with pytest.raises(ConfigError, match="history.csv: no finished epoch"):
        ablation.build_table([base], None)


def test_runs_are_measured_on_their_recorded_data_and_on_one_shared_split(two_runs, tmp_path):
    base, other = two_runs
    csv = tmp_path / "training_only.csv"
    rng = np.random.default_rng(5)
    lines = ["emotion,pixels,Usage"] + [f"{c},{' '.join(map(str, rng.integers(0, 256, 2304)))},Training"
                                       for c in range(7) for _ in range(10)]
    csv.write_text("\n".join(lines) + "\n")

    def record(run, **changes):
        config = json.loads((run / "config.json").read_text())
        config.update(changes)
        (run / "config.json").write_text(json.dumps(config))

    record(base, data=str(csv), seed=0)
    record(other, data=str(csv), seed=0)
    rows = ablation.build_table([base, other], None, ("none",))
    _, hold_out = fer_data.train_val(fer_data.load(csv), 0.1, 0)  # no PublicTest: the runs' 10 % hold-out
    assert [r.num_images for r in rows] == [len(hold_out), len(hold_out)] == [7, 7]
    assert rows[0].split_label == "val (10% stratified hold-out)"
    assert rows[1].accuracy["none"] == evaluate(load_predictor(other / "best.keras"), hold_out, "none",
                                                split_name="val").accuracy

    record(other, seed=1)  # another seed holds out other images: not comparable
    with pytest.raises(ConfigError, match=r"mixup: selected on 10% stratified hold-out \(7 images of .*\), "
                                          r"not on base's 10% stratified hold-out"):
        ablation.build_table([base, other], None, ("none",))
    # Named data with PublicTest decides for both runs, whatever they recorded.
    rows = ablation.build_table([base, other], str(fer_data.SAMPLE_PATH), ("none",))
    assert [r.num_images for r in rows] == [256, 256] and rows[0].split_label == "val (PublicTest)"
