"""The ablation table is measured: each row's accuracy equals a fresh evaluation of that run's best.keras."""

from __future__ import annotations

import gzip
import json
import os
import re
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
    # The shared run chose its epoch on 63 of PublicTest's 256 images (--max_val_examples), as its data.json says.
    assert [r.selected_on for r in rows] == [63, 63]
    assert ("on val (PublicTest), 256 images; by their data.json, `base` and `mixup` picked the best epoch on 63 of "
            "them (--max_val_examples); wall time") in table

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
    stray = run_tool("ablation", f"--runs={base},", cwd=tmp_path)  # the empty entry was named as "." (not a run)
    assert stray.returncode != 0 and "--runs has an empty entry (a stray comma?)" in stray.stderr
    (tmp_path / "empty").mkdir()
    bad = run_tool("ablation", f"--runs={base},{tmp_path / 'empty'}", cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'empty'}: not a training run with a " \
                                                  "finished epoch (no best.keras)"


def test_epochs_best_epoch_and_wall_time_are_read_from_each_runs_history(two_runs):
    base, other = two_runs
    header = "epoch,loss,accuracy,val_loss,val_accuracy,learning_rate,seconds\n"
    # A tie at the best accuracy: best.keras holds the earlier epoch, as training keeps only a strictly better one.
    (base / "history.csv").write_text(header + "1,2,0.3,2,0.5,0.1,100\n2,1,0.5,1,0.6,0.1,200\n"
                                      "3,1,0.6,1,0.6,0.1,300.5\n")
    (other / "history.csv").write_text(header + "1,2,0.3,2,0.4,0.1,3000\n2,1,0.5,1,0.7,0.1,3000\n")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "epochs": 5}))  # still training: 3 of 5
    rows = ablation.build_table([base, other], None, ("none",))
    assert [(r.epochs_done, r.epochs_planned, r.best_epoch, r.wall_seconds) for r in rows] == \
        [(3, 5, 2, 600.5), (2, 2, 2, 6000.0)]
    assert rows[1].changes == ["epochs=2", "mixup=0.2"]
    table = ablation.render_markdown(rows)
    assert "| `base` | (baseline) | 3 of 5 | 2 | 10 min |" in table
    assert "| `mixup` | `epochs=2`, `mixup=0.2` | 2 | 2 | 1.67 h |" in table


def test_a_cached_accuracy_is_reused_only_for_the_same_images_and_labels(two_runs):
    # A run without data.json may be measured on other data: the accuracy cached for one split is not another's.
    _, other = two_runs
    val = fer_data.load(None).split("val")
    relabelled = fer_data.Split(val.images, (val.labels + 1) % 7, val.ids)
    predictor = load_predictor(other / "best.keras")
    for split in (val, relabelled, val):
        fresh = evaluate(predictor, split, "none", split_name="val").accuracy
        assert ablation.measure_accuracy(other, split, "val", ("none",)) == {"none": fresh}
    assert len(json.loads((other / ablation.EVAL_CACHE).read_text())) == 2


def test_a_damaged_cache_is_measured_again(two_runs):
    """A cache that is not a JSON object, or whose entry is no accuracy, was a TypeError or a wrong figure."""
    _, other = two_runs
    val = fer_data.load(None).split("val")
    fresh = evaluate(load_predictor(other / "best.keras"), val, "none", split_name="val").accuracy
    cache = other / ablation.EVAL_CACHE
    assert ablation.measure_accuracy(other, val, "val", ("none",)) == {"none": fresh}
    (key,) = json.loads(cache.read_text())
    for damaged in ("[]", json.dumps({key: "0.9"}), json.dumps({key: 7.0}), json.dumps({key: None})):
        cache.write_text(damaged)
        assert ablation.measure_accuracy(other, val, "val", ("none",)) == {"none": fresh}
        assert json.loads(cache.read_text()) == {key: fresh}


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
    for run in (base, other):  # as if trained on that data
        write_data_record(run, fer_data.load(csv))
    rows = ablation.build_table([base, other], None, ("none",))
    _, hold_out = fer_data.train_val(fer_data.load(csv), 0.1, 0)  # no PublicTest: the runs' 10 % hold-out
    assert [r.num_images for r in rows] == [r.selected_on for r in rows] == [len(hold_out), len(hold_out)] == [7, 7]
    assert rows[0].split_label == "val (10% stratified hold-out)"
    assert ("on val (10% stratified hold-out), 7 images, the split that also picked each run's best epoch (as its "
            "data.json records); wall time") in ablation.render_markdown(rows)
    assert rows[1].accuracy["none"] == evaluate(load_predictor(other / "best.keras"), hold_out, "none",
                                                split_name="val").accuracy

    record(other, seed=1)  # another seed holds out other images: not comparable
    with pytest.raises(ConfigError, match=r"mixup: selected on 10% stratified hold-out \(7 images of .*\), "
                                          r"not on base's 10% stratified hold-out"):
        ablation.build_table([base, other], None, ("none",))
    # Named data is measured only when it is the data the runs recorded: the sample's PublicTest never chose
    # these runs' epochs (the table used to measure them on it all the same).
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(base))}: .*fer2013_sample.csv.gz does not give it the "
                                          r"training and selection images its data.json records \(63 training and 7 "
                                          r"10% stratified hold-out images of .*training_only.csv; .* gives 128 and 63 "
                                          r"PublicTest\); give --data the data the runs were trained on$"):
        ablation.build_table([base, other], str(fer_data.SAMPLE_PATH), ("none",))


def write_data_record(run, dataset) -> None:
    """The data.json a run of this config.json would have written had it trained on ``dataset``."""
    from fer_keras.train import run_splits_of

    train, val, name = run_splits_of(dataset, json.loads((run / "config.json").read_text()))
    (run / "data.json").write_text(json.dumps({
        "source": dataset.source, "train": {"images": len(train), "sha256": train.fingerprint()},
        "val": {"images": len(val), "name": name, "sha256": val.fingerprint()}}))


def test_runs_trained_on_other_data_than_measured_are_refused(two_runs, tmp_path):
    base, other = two_runs
    # The sample with every Training image inverted: the same PublicTest, so the runs' selection split is the same
    # and only their data.json tells that they never trained on these images.
    lines = gzip.open(fer_data.SAMPLE_PATH, "rt").read().splitlines()
    inverted = tmp_path / "inverted_training.csv"
    inverted.write_text("\n".join(lines[:1] + [
        f"{label},{' '.join(str(255 - int(v)) for v in pixels.split())},{usage}" if usage == "Training" else line
        for line in lines[1:] for label, pixels, usage in [line.split(",")]]) + "\n")
    message = (rf"^{re.escape(str(base))}: .*inverted_training.csv does not give it the training images its "
               r"data.json records \(128 training and 63 PublicTest images of .*fer2013_sample.csv.gz; .* gives 128 "
               r"and 63 PublicTest\); give --data the data the runs were trained on$")
    with pytest.raises(ConfigError, match=message):
        ablation.build_table([base, other], str(inverted), ("none",))
    proc = run_tool("ablation", f"--runs={base},{other}", f"--data={inverted}", "--tta=none", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and not proc.stdout
    assert re.match(message.replace("^", "^error: ", 1), proc.stderr.strip().splitlines()[-1])

    # Data left to the runs: a run whose data.json records other training images than the first run's data
    # gives it (another file with the same PublicTest) is refused, not measured beside it.
    record = json.loads((other / "data.json").read_text())
    (other / "data.json").write_text(json.dumps({**record, "train": {**record["train"], "sha256": "0" * 64}}))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(other))}: .* does not give it the training images its "
                                          r"data.json records .*; one table's runs must be trained on one data set, "
                                          r"here base's \(give --data the data they were trained on\)$"):
        ablation.build_table([base, other], None, ("none",))

    # A run without data.json cannot be checked: measured, and the footer says so instead of naming its split.
    (other / "data.json").write_text(json.dumps(record))
    (base / "data.json").unlink()
    rows = ablation.build_table([base, other], None, ("none",))
    assert [r.selected_on for r in rows] == [None, 63]
    assert ("on val (PublicTest), 256 images; by their data.json, `mixup` picked the best epoch on 63 of them "
            "(--max_val_examples); `base` has no usable data.json, so neither the data nor the split that picked the "
            "best epoch is known; wall time") in ablation.render_markdown(rows)
