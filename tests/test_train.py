"""Training runs end to end: outputs, TensorBoard, resume after SIGKILL, refusals, NaN."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SMALL_RUN, cli_env, cpuinfo

from fer_keras import history as history_lib
from fer_keras import train
from fer_keras.errors import ConfigError, FerError

PNG = b"\x89PNG\r\n\x1a\n"


def read_tensorboard(log_dir: Path) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(run, tag) -> [(step, value)] from the event files, as TensorBoard itself reads them."""
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for run in ("train", "validation"):
        acc = EventAccumulator(str(log_dir / run), size_guidance={"tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["tensors"]:
            out[(run, tag)] = [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
    return out


def test_run_writes_outputs_and_tensorboard_equals_history(trained_run):
    config, result = trained_run
    model_dir = Path(config.model_dir)
    rows = history_lib.read_history_csv(model_dir / "history.csv")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert [r["momentum"] for r in rows] == [pytest.approx(0.9)] * 2  # constant without --cycle_momentum
    assert rows == [{k: pytest.approx(v, rel=1e-5) for k, v in r.items() if k != "seconds"} | {"seconds": r["seconds"]}
                    for r in result.history]
    scalars = read_tensorboard(model_dir / "logs")
    for (run, tag), column in {
        ("train", "epoch_loss"): "loss", ("train", "epoch_accuracy"): "accuracy",
        ("validation", "epoch_loss"): "val_loss", ("validation", "epoch_accuracy"): "val_accuracy",
        ("train", "epoch_learning_rate"): "learning_rate", ("train", "epoch_momentum"): "momentum",
    }.items():
        values = scalars[(run, tag)]
        assert [s for s, _ in values] == [0, 1], (run, tag)
        np.testing.assert_allclose([v for _, v in values], [r[column] for r in rows], rtol=1e-5)
    assert (model_dir / "history.png").read_bytes()[:8] == PNG
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "flags.txt", "history.csv", "history.png"):  # not mkstemp's owner-only 0600
        assert stat.S_IMODE((model_dir / name).stat().st_mode) == 0o666 & ~umask, name
    assert json.loads((model_dir / "config.json").read_text())["stem"] == "imagenet"
    assert "--stem=imagenet\n" in (model_dir / "flags.txt").read_text()
    assert (model_dir / "best.keras").is_file()
    assert result.best_val_accuracy == max(r["val_accuracy"] for r in result.history)
    assert result.export_path == Path(config.export_dir) / "run" / "1"
    assert (result.export_path / "saved_model.pb").is_file()
    # best.keras and the export hold the best epoch's model: it scores the recorded best accuracy.
    from fer_keras import data as fer_data
    from fer_keras.evaluate import evaluate
    from fer_keras.inference import load_predictor

    _, val, _ = train.run_splits(fer_data.load(None), config)
    rescored = evaluate(load_predictor(model_dir / "best.keras"), val, "none", split_name="val").accuracy
    assert rescored == pytest.approx(result.best_val_accuracy, abs=1e-6)
    info = json.loads((result.export_path / "assets.extra" / "fer_keras.json").read_text())
    assert info["best_epoch"] == result.best_epoch and info["val_accuracy"] == result.best_val_accuracy


def test_auto_tta_builds_in_what_the_selection_split_measured(trained_run):
    from fer_keras import data as fer_data
    from fer_keras.evaluate import evaluate
    from fer_keras.inference import load_predictor
    from fer_keras.tta import TTA_MODES

    config, result = trained_run
    info = json.loads((result.export_path / "assets.extra" / "fer_keras.json").read_text())
    chosen = info["tta_selection"]
    _, val, _ = train.run_splits(fer_data.load(None), config)
    assert chosen["split"] == "PublicTest" and chosen["num_images"] == len(val) <= config.max_val_examples
    best_keras = load_predictor(Path(config.model_dir) / "best.keras")
    for mode in TTA_MODES:
        measured = evaluate(best_keras, val, mode, split_name="val").accuracy
        assert chosen["accuracy"][mode] == pytest.approx(measured, abs=1e-9), mode
    best = max(chosen["accuracy"].values())
    costs = {mode: i for i, mode in enumerate(TTA_MODES)}
    assert info["tta"] == chosen["chosen"] and 100 * (best - chosen["accuracy"][info["tta"]]) <= 0.25 + 1e-9
    assert all(100 * (best - chosen["accuracy"][m]) > 0.25 for m in TTA_MODES if costs[m] < costs[info["tta"]])


def test_rerunning_a_finished_run_neither_trains_nor_exports_again(trained_run):
    config, first = trained_run
    again = train.run(config)
    assert again.resumed_from == config.epochs
    assert again.export_path == first.export_path
    assert sorted(p.name for p in (Path(config.export_dir) / "run").iterdir()) == ["1"]
    assert [r["epoch"] for r in again.history] == [1, 2]


def _unexported_copy(config: train.TrainConfig, tmp_path: Path) -> tuple[Path, dict]:
    """A copy of the shared finished run that has not exported, and its settings exporting under ``tmp_path``."""
    run = tmp_path / "run"
    shutil.copytree(config.model_dir, run)
    (run / "export.json").unlink()
    return run, {**config.to_json(), "step_epochs": (), "export_dir": str(tmp_path / "exports")}


def test_a_finished_run_is_the_same_run_under_another_spelling_and_exports_again_for_other_export_settings(
        trained_run, tmp_path):
    config, first = trained_run
    run, base = _unexported_copy(config, tmp_path)
    result = train.run(train.TrainConfig(**{**base, "model_dir": str(run)}))
    assert result.resumed_from == config.epochs and result.export_path == tmp_path / "exports" / "run" / "1"
    for spelling in (str(run) + os.sep, os.path.relpath(run)):  # model_dir as the shell may spell it
        assert train.run(train.TrainConfig(**{**base, "model_dir": spelling})).export_path == result.export_path
    renamed = train.TrainConfig(**{**base, "model_dir": str(run), "export_name": "renamed", "export_tta": "none"})
    again = train.run(renamed)
    assert again.resumed_from == config.epochs and again.export_path == tmp_path / "exports" / "renamed" / "1"
    assert json.loads((again.export_path / "assets.extra" / "fer_keras.json").read_text())["tta"] == "none"
    assert train.run(renamed).export_path == again.export_path  # once per export settings
    assert sorted(p.name for p in (tmp_path / "exports" / "renamed").iterdir()) == ["1"]


def test_the_end_of_training_export_measures_each_crop_side_given_and_exports_again_for_other_sides(
        trained_run, tmp_path):
    config, _ = trained_run
    run, base = _unexported_copy(config, tmp_path)
    base["model_dir"] = str(run)
    sides = train.run(train.TrainConfig(**{**base, "export_crop_size": (36, 44)}))
    chosen = json.loads((sides.export_path / "assets.extra" / "fer_keras.json").read_text())["tta_selection"]
    assert set(chosen["tencrop_by_crop_size"]) == {"36", "44"}
    assert chosen["accuracy"]["tencrop"] == chosen["tencrop_by_crop_size"][str(chosen["crop_size"])]
    assert "--export_crop_size=36,44" in (run / "flags.txt").read_text()
    # Once per export settings: the same sides export nothing more, other sides a new version.
    assert train.run(train.TrainConfig(**{**base, "export_crop_size": (36, 44)})).export_path == sides.export_path
    other = train.run(train.TrainConfig(**{**base, "export_crop_size": (40,)}))
    assert other.export_path.name == "2" and "tencrop_by_crop_size" not in json.loads(
        (other.export_path / "assets.extra" / "fer_keras.json").read_text())["tta_selection"]


@pytest.mark.parametrize("change, message", [
    ({"export_crop_size": (0,)}, r"export_crop_size must be one or more sides in 1-48, got \[0\]"),
    ({"export_tta": "tencrop", "export_crop_size": (40, 42)},
     r"export_crop_size \[40, 42\]: several sides are measured only with export_tta=auto"),
])
def test_bad_export_crop_sizes_are_refused(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        train.run(train.TrainConfig(model_dir=str(tmp_path / "run"), **{**SMALL_RUN, **change}))
    assert not (tmp_path / "run").exists()


def test_a_rerun_names_the_export_as_the_first_run_did(trained_run, tmp_path, monkeypatch, capsys):
    """With a relative --export_dir, a rerun of a finished run printed (and returned) the export's absolute path
    from export.json, the first run the one under --export_dir as given."""
    config, _ = trained_run
    shutil.copytree(config.model_dir, tmp_path / "run")
    (tmp_path / "run" / "export.json").unlink()
    monkeypatch.chdir(tmp_path)
    rerun = train.TrainConfig(**{**config.to_json(), "step_epochs": (), "model_dir": "run", "export_dir": "exports",
                                 "export_tta": "none"})
    for attempt in ("first", "rerun"):
        assert train.run(rerun).export_path == Path("exports", "run", "1"), attempt
        assert capsys.readouterr().out.rstrip().endswith("; export: exports/run/1"), attempt


def test_a_first_attempt_that_finished_no_epoch_may_be_rerun_with_other_settings_and_data(tmp_path, monkeypatch):
    """A NaN loss in epoch 1 (or Ctrl-C, or the wrong --data) before any checkpoint: the error's advice - a lower
    learning rate - works in the same folder, and so does other data; the records describe the rerun."""
    import keras

    monkeypatch.setattr(train, "build_optimizer", lambda config, steps, model: keras.optimizers.SGD(1e12))
    run = tmp_path / "run"
    config = train.TrainConfig(model_dir=str(run), export=False, **{**SMALL_RUN, "epochs": 1})
    with pytest.raises(FerError, match=r"loss became (nan|inf) at epoch 1, batch \d+; no checkpoint was written, "
                                       r"so the same --model_dir may be rerun with other settings"):
        train.run(config)
    assert (run / "config.json").is_file() and not (run / "checkpoints").exists()
    (run / "init.json").write_text("{}")  # as if that attempt had started from --init_from
    monkeypatch.undo()
    other = train.TrainConfig(**{**config.to_json(), "step_epochs": (), "learning_rate": 0.001,
                                 "max_train_examples": 96})
    assert [r["epoch"] for r in train.run(other).history] == [1]
    assert json.loads((run / "config.json").read_text())["learning_rate"] == 0.001
    assert json.loads((run / "data.json").read_text())["train"]["images"] == 96
    assert not (run / "init.json").exists()  # this run started from random weights
    with pytest.raises(ConfigError, match="other settings"):  # now an epoch has finished: fixed
        train.run(config)


def test_an_existing_export_version_is_refused_before_training(tmp_path):
    (tmp_path / "exports" / "run" / "3").mkdir(parents=True)
    config = train.TrainConfig(model_dir=str(tmp_path / "run"), export_dir=str(tmp_path / "exports"),
                               export_version=3, **SMALL_RUN)
    with pytest.raises(ConfigError, match=r"run/3: export version 3 exists; it is never overwritten"):
        train.run(config)
    assert not (tmp_path / "run").exists()


def test_steps_per_execution_that_does_not_divide_an_epoch_is_refused(tmp_path):
    """Keras would run whole calls: 4 steps an epoch at 3 per call reads 6 batches, into the next epoch's."""
    config = train.TrainConfig(model_dir=str(tmp_path / "run"), export_dir=str(tmp_path / "exports"),
                               **{**SMALL_RUN, "steps_per_execution": 3})
    with pytest.raises(ConfigError, match=r"steps_per_execution 3 does not divide the 4 steps of an epoch \(128 "
                                          r"images / batch 32\); use a divisor of 4"):
        train.run(config)
    assert not (tmp_path / "run").exists()


def test_a_resume_that_cannot_restore_dropouts_random_state_is_refused_when_deterministic(tmp_path):
    settings = {**SMALL_RUN, "dropout": 0.2, "deterministic": True, "export": False}
    config = train.TrainConfig(model_dir=str(tmp_path / "run"), **settings)
    train.run(config)
    ckpts = tmp_path / "run" / "checkpoints"
    shutil.rmtree(ckpts / "epoch_0002")  # as if killed during epoch 2
    state_file = ckpts / "epoch_0001" / "state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "rng_state": {}}))
    with pytest.raises(ConfigError, match=r"epoch_0001/state.json: restored 0 of the 1 dropout random states, so "
                                          r"this resumed run will not repeat an uninterrupted one exactly "
                                          r"\(--deterministic\)"):
        train.run(config)


def test_fewer_images_than_one_batch_is_refused_before_any_folder_is_made(tmp_path):
    config = train.TrainConfig(model_dir=str(tmp_path / "run"), export_dir=str(tmp_path / "exports"),
                               **{**SMALL_RUN, "max_train_examples": 16})
    with pytest.raises(ConfigError, match="16 training images is fewer than one batch of 32"):
        train.run(config)
    assert not (tmp_path / "run").exists() and not (tmp_path / "exports").exists()


def test_a_non_finite_validation_loss_is_named_as_such(tmp_path):
    import keras

    from fer_keras import checkpoint

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    guard = checkpoint.NonFiniteLoss()
    recorder = checkpoint.RunRecorder(tmp_path, tmp_path / "checkpoints", True, guard, [], (0, -1.0), {})
    recorder.set_model(model)
    recorder.on_epoch_end(4, {"loss": 1.83, "accuracy": 0.3, "val_loss": float("nan"), "val_accuracy": 0.2})
    assert guard.failed_at[0] == 5 and guard.failed_at[3] == "validation loss" and np.isnan(guard.failed_at[2])
    assert not (tmp_path / "checkpoints").exists() and model.stop_training


def test_best_keras_is_replaced_only_by_a_better_epoch_also_after_a_resume(tmp_path):
    """A tie or a worse epoch keeps the earlier best, in best.keras and in the state a resumed recorder starts from;
    a worker that is not the chief writes its checkpoints only."""
    import keras

    from fer_keras import checkpoint

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")

    def epoch_end(recorder, epoch: int, val_accuracy: float) -> None:
        model.layers[0].kernel.assign(np.full((2, 1), epoch, np.float32))  # each epoch's weights tell it apart
        recorder.on_epoch_end(epoch - 1, {"loss": 1.0, "accuracy": 0.5, "val_loss": 1.0, "val_accuracy": val_accuracy})

    def best_kernel() -> float:
        return float(keras.models.load_model(tmp_path / "best.keras").layers[0].kernel[0, 0])

    recorder = checkpoint.RunRecorder(tmp_path, tmp_path / "checkpoints", True, checkpoint.NonFiniteLoss(), [],
                                      (0, -1.0), {})
    recorder.set_model(model)
    for epoch, val_accuracy in [(1, 0.5), (2, 0.5), (3, 0.4)]:
        epoch_end(recorder, epoch, val_accuracy)
    assert (recorder.best_epoch, recorder.best_val) == (1, 0.5) and best_kernel() == 1
    latest, state = checkpoint.latest_checkpoint(tmp_path / "checkpoints")
    assert latest.name == "epoch_0003" and (state["best_epoch"], state["best_val_accuracy"]) == (1, 0.5)
    assert [r["epoch"] for r in history_lib.read_history_csv(tmp_path / "history.csv")] == [1, 2, 3]

    resumed = checkpoint.RunRecorder(tmp_path, tmp_path / "checkpoints", True, checkpoint.NonFiniteLoss(),
                                     list(state["history"]), (state["best_epoch"], state["best_val_accuracy"]), {})
    resumed.set_model(model)
    epoch_end(resumed, 4, 0.45)
    assert (resumed.best_epoch, best_kernel()) == (1, 1)
    epoch_end(resumed, 5, 0.6)
    assert (resumed.best_epoch, best_kernel()) == (5, 5)
    assert [r["epoch"] for r in history_lib.read_history_csv(tmp_path / "history.csv")] == [1, 2, 3, 4, 5]

    worker = tmp_path / "workers" / "worker_1"
    other = checkpoint.RunRecorder(worker, worker / "checkpoints", False, checkpoint.NonFiniteLoss(), [], (0, -1.0),
                                   {})
    other.set_model(model)
    epoch_end(other, 1, 0.5)
    assert sorted(p.name for p in worker.iterdir()) == ["checkpoints"]
    assert checkpoint.latest_checkpoint(worker / "checkpoints")[1]["best_epoch"] == 1


def test_changed_settings_are_refused_before_anything_is_touched(trained_run, tmp_path):
    config, _ = trained_run
    before = {p: p.read_bytes() for p in Path(config.model_dir).rglob("*") if p.is_file()}
    changed = train.TrainConfig(**{**config.to_json(), "step_epochs": (), "learning_rate": 0.5})
    with pytest.raises(ConfigError, match="learning_rate: 0.01 -> 0.5"):
        train.run(changed)
    assert {p: p.read_bytes() for p in Path(config.model_dir).rglob("*") if p.is_file()} == before
    # A run made before a setting existed ran with its default: turning it on is a change too.
    recorded = Path(config.model_dir) / "config.json"
    older = {k: v for k, v in json.loads(before[recorded]).items() if k != "cycle_momentum"}
    recorded.write_text(json.dumps(older))
    try:
        cycling = train.TrainConfig(**{**config.to_json(), "step_epochs": (), "schedule": "onecycle",
                                       "cycle_momentum": True})
        with pytest.raises(ConfigError, match="cycle_momentum: False -> True, schedule: 'cosine' -> 'onecycle'"):
            train.run(cycling)
    finally:
        recorded.write_bytes(before[recorded])
    # --base_momentum does nothing without the cycle: the finished run is the same run (a copy: a rerun rewrites
    # config.json, and other tests read the shared run).
    copy = tmp_path / "copy" / "run"
    shutil.copytree(config.model_dir, copy)
    same = train.run(train.TrainConfig(**{**config.to_json(), "step_epochs": (), "base_momentum": 0.5,
                                          "model_dir": str(copy), "export": False}))
    assert same.resumed_from == config.epochs


def test_resuming_or_rerunning_on_other_data_is_refused(trained_run, tmp_path):
    from conftest import write_challenge_csv

    config, _ = trained_run
    record = json.loads((Path(config.model_dir) / "data.json").read_text())
    assert record["train"]["images"] == config.max_train_examples and record["val"]["name"] == "PublicTest"
    before = {p.name: p.read_bytes() for p in Path(config.model_dir).iterdir() if p.is_file()}
    write_challenge_csv(tmp_path / "other.csv", n_val_per_class=10)
    other = train.TrainConfig(**{**config.to_json(), "step_epochs": (), "data": str(tmp_path / "other.csv")})
    with pytest.raises(ConfigError, match=rf"holds a run trained on other data \(.*: 128 training and "
                                          rf"{record['val']['images']} validation images\); .*other.csv gives 2 and "
                                          r"\d+, and different train and val images"):
        train.run(other)
    assert {p.name: p.read_bytes() for p in Path(config.model_dir).iterdir() if p.is_file()} == before
    # The same data under another path (a copy of the bundled sample) is the same run: finished, kept.
    from fer_keras.data import SAMPLE_PATH

    shutil.copy(SAMPLE_PATH, tmp_path / "moved.csv.gz")
    copy = tmp_path / "copy" / "run"  # a rerun records the new path: not in the run other tests read
    shutil.copytree(config.model_dir, copy)
    moved = train.TrainConfig(**{**config.to_json(), "step_epochs": (), "data": str(tmp_path / "moved.csv.gz"),
                                 "model_dir": str(copy), "export": False})
    assert train.run(moved).resumed_from == config.epochs


@pytest.mark.slow
def test_a_kill_between_checkpoint_and_best_keras_is_mended_on_rerun(tmp_path):
    import keras

    config = train.TrainConfig(model_dir=str(tmp_path / "run"), export=False, **{**SMALL_RUN, "epochs": 1})
    train.run(config)
    best_file = tmp_path / "run" / "best.keras"
    ckpt = tmp_path / "run" / "checkpoints" / "epoch_0001"
    expected = keras.models.load_model(best_file).get_weights()
    stamp = best_file.stat().st_mtime_ns
    train.run(config)  # best.keras is newer than the checkpoint: left alone
    assert best_file.stat().st_mtime_ns == stamp
    for damage in ("missing", "older than the checkpoint"):
        if damage == "missing":
            best_file.unlink()
        else:
            os.utime(best_file, ns=(stamp, (ckpt / "state.json").stat().st_mtime_ns - 10**9))
        train.run(config)
        assert best_file.stat().st_mtime_ns > (ckpt / "state.json").stat().st_mtime_ns, damage
        for a, b in zip(keras.models.load_model(best_file).get_weights(), expected):
            np.testing.assert_array_equal(a, b)


def test_best_keras_of_an_epoch_after_the_resumed_checkpoint_is_set_aside_only_when_it_beat_it(tmp_path, caplog):
    """best.keras is written before history.csv: a row after the checkpoint resumed from that beat the checkpoint's
    best says best.keras holds that epoch; a worse or tied one was never written to it."""
    from fer_keras import checkpoint

    def row(epoch: int, val_accuracy: float) -> dict:
        return {"epoch": epoch, "loss": 1.0, "accuracy": 0.5, "val_loss": 1.0, "val_accuracy": val_accuracy,
                "learning_rate": 0.1, "seconds": 1.0}

    state = {"epoch": 4, "history": [row(1, 0.3), row(2, 0.5), row(3, 0.4), row(4, 0.45)], "best_epoch": 2,
             "best_val_accuracy": 0.5}
    best = tmp_path / "best.keras"
    best.write_bytes(b"epoch 2")
    history_lib.write_history_csv(tmp_path / "history.csv", [*state["history"], row(5, 0.5)])
    assert checkpoint.set_aside_lost_best(tmp_path, state) is None and best.read_bytes() == b"epoch 2"

    best.write_bytes(b"epoch 5")
    history_lib.write_history_csv(tmp_path / "history.csv", [*state["history"], row(5, 0.6), row(6, 0.55)])
    with caplog.at_level(logging.WARNING):
        aside = checkpoint.set_aside_lost_best(tmp_path, state)
    assert aside.name == "best_epoch_0005_before_resume.keras" and aside.read_bytes() == b"epoch 5"
    assert not best.exists()
    assert ("best.keras held epoch 5 (validation accuracy 60.00%), whose checkpoint is damaged: kept as "
            "best_epoch_0005_before_resume.keras. Resuming after epoch 4, whose best is epoch 2 (50.00%): that "
            "epoch's model is gone") in caplog.text
    best.write_bytes(b"epoch 5 again")  # lost a second time: the first copy is kept
    assert checkpoint.set_aside_lost_best(tmp_path, state).name == "best_epoch_0005_before_resume_2.keras"
    assert aside.read_bytes() == b"epoch 5"

    best.write_bytes(b"epoch 5 once more")
    (tmp_path / "history.csv").write_text("epoch,val_accuracy\n5,x\n")  # unreadable: nothing to go by
    assert checkpoint.set_aside_lost_best(tmp_path, state) is None and best.is_file()


@pytest.mark.slow
def test_a_better_best_keras_whose_checkpoint_is_damaged_is_kept_and_the_rerun_agrees_with_its_history(
        tmp_path, capsys):
    """The newest checkpoint damaged, the run resumes from the one before, whose history lacks the epoch that wrote
    best.keras: that model is kept under another name instead of being replaced by the first epoch to beat the
    older checkpoint's best, and best.keras, history.csv and the export all describe the rerun's best epoch (or,
    when that epoch's model was the one replaced and no rerun epoch beats it, there is no best.keras, and the
    run says so)."""
    import keras

    from fer_keras import data as fer_data
    from fer_keras.evaluate import evaluate
    from fer_keras.inference import load_predictor

    config = train.TrainConfig(model_dir=str(tmp_path / "run"), export_dir=str(tmp_path / "exports"),
                               **{**SMALL_RUN, "epochs": 3, "export_tta": "none"})
    train.run(config)
    run = tmp_path / "run"
    # As if epoch 3 had scored 99 % and been exported, its model told apart by one weight.
    lost = keras.models.load_model(run / "best.keras")
    lost.weights[0].assign(np.full(lost.weights[0].shape, 7.0, "float32"))
    lost.save(run / "best.keras")
    rows = history_lib.read_history_csv(run / "history.csv")
    history_lib.write_history_csv(run / "history.csv", [*rows[:2], {**rows[2], "val_accuracy": 0.99}])
    (run / "export.json").write_text(json.dumps({**json.loads((run / "export.json").read_text()), "best_epoch": 3}))
    weights = run / "checkpoints" / "epoch_0003" / "model.weights.h5"
    weights.write_bytes(weights.read_bytes()[:1000])
    unbeaten = tmp_path / "unbeaten" / "run"
    shutil.copytree(run, unbeaten)

    def resume_from(run_dir: Path, val_accuracies: list[float]) -> train.TrainResult:
        """Resumes after epoch 2 once its checkpoint records these accuracies for epochs 1 and 2."""
        state_file = run_dir / "checkpoints" / "epoch_0002" / "state.json"
        state = json.loads(state_file.read_text())
        history = [{**r, "val_accuracy": v} for r, v in zip(state["history"], val_accuracies)]
        best = history_lib.best_row(history)
        state_file.write_text(json.dumps({**state, "history": history, "best_epoch": best["epoch"],
                                          "best_val_accuracy": best["val_accuracy"]}))
        capsys.readouterr()
        result = train.run(dataclasses.replace(config, model_dir=str(run_dir)))
        assert result.resumed_from == 2
        kept = keras.models.load_model(run_dir / "best_epoch_0003_before_resume.keras")
        np.testing.assert_array_equal(kept.weights[0], lost.weights[0])
        rows = history_lib.read_history_csv(run_dir / "history.csv")
        assert [r["epoch"] for r in rows] == [1, 2, 3] and history_lib.best_row(rows)["epoch"] == result.best_epoch
        assert rows[result.best_epoch - 1]["val_accuracy"] == pytest.approx(result.best_val_accuracy, abs=1e-6)
        return result

    result = resume_from(run, [0.0, 0.0])  # any rerun epoch 3 beats it: it gets at least one image right
    assert result.best_epoch == 3
    _, val, _ = train.run_splits(fer_data.load(None), config)
    rescored = evaluate(load_predictor(run / "best.keras"), val, "none", split_name="val").accuracy
    assert rescored == pytest.approx(result.best_val_accuracy, abs=1e-6)
    assert result.export_path.name == "2" and (result.export_path.parent / "1").is_dir()
    info = json.loads((result.export_path / "assets.extra" / "fer_keras.json").read_text())
    assert (info["best_epoch"], info["val_accuracy"]) == (3, result.best_val_accuracy)

    result = resume_from(unbeaten, [0.9, 0.5])
    assert (result.best_epoch, result.export_path) == (1, None) and not (unbeaten / "best.keras").exists()
    assert "at epoch 1; no best.keras: that epoch's model was replaced" in capsys.readouterr().out


@pytest.mark.parametrize("marker", [b"\xff\xfe", b"{", b"[3]", b'{"best_epoch": "3"}', b'{"best_epoch": 2}'])
def test_a_resume_keeps_an_export_marker_it_cannot_read_or_that_names_a_kept_epoch(tmp_path, marker):
    """Only a marker naming an epoch after the checkpoint resumed from is removed; one that is damaged (or names
    a kept epoch) stays, and the run's own export check then decides whether to export again."""
    (tmp_path / "export.json").write_bytes(marker)
    train._forget_lost_epochs(tmp_path, {"epoch": 2, "best_epoch": 2, "best_val_accuracy": 0.5})
    assert (tmp_path / "export.json").read_bytes() == marker
    (tmp_path / "export.json").write_text('{"best_epoch": 3}')
    train._forget_lost_epochs(tmp_path, {"epoch": 2, "best_epoch": 2, "best_val_accuracy": 0.5})
    assert not (tmp_path / "export.json").exists()


def test_a_rerun_leaves_the_best_keras_of_an_earlier_epoch_alone(trained_run, tmp_path):
    """best.keras is older than the latest checkpoint whenever the best epoch came before it: only a best epoch
    equal to the checkpoint's says that the kill fell between the two writes, else its weights would replace the
    best epoch's."""
    config, _ = trained_run
    run = tmp_path / "run"
    shutil.copytree(config.model_dir, run)
    state_file = run / "checkpoints" / "epoch_0002" / "state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "best_epoch": 1}))
    best_file = run / "best.keras"
    os.utime(best_file, ns=(state_file.stat().st_mtime_ns - 10**9,) * 2)
    before = best_file.read_bytes(), best_file.stat().st_mtime_ns
    result = train.run(dataclasses.replace(config, model_dir=str(run), export=False))
    assert (result.resumed_from, result.best_epoch) == (2, 1)
    assert (best_file.read_bytes(), best_file.stat().st_mtime_ns) == before


def test_a_diverging_loss_stops_with_a_clear_error(tmp_path, monkeypatch):
    import h5py
    import keras

    steps = SMALL_RUN["max_train_examples"] // SMALL_RUN["batch_size"]

    def explodes_in_epoch_2(config, steps_per_epoch, model):
        assert steps_per_epoch == steps
        return keras.optimizers.SGD(keras.optimizers.schedules.PiecewiseConstantDecay([steps], [1e-3, 1e12]))

    monkeypatch.setattr(train, "build_optimizer", explodes_in_epoch_2)
    run = tmp_path / "run"
    config = train.TrainConfig(model_dir=str(run), export=False, **{**SMALL_RUN, "epochs": 3})
    with pytest.raises(FerError, match=r"loss became (nan|inf) at epoch 2, batch \d+; the last good checkpoint "
                                       r"is .*epoch_0001 \(other settings need a new --model_dir\)\. "
                                       r"Lower --learning_rate"):
        train.run(config)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["epoch_0001"]
    assert [r["epoch"] for r in history_lib.read_history_csv(run / "history.csv")] == [1]
    with h5py.File(run / "checkpoints" / "epoch_0001" / "model.weights.h5", "r") as f:
        arrays = []
        f.visititems(lambda name, item: arrays.append(item[()]) if isinstance(item, h5py.Dataset) else None)
    floats = [np.asarray(a, np.float64) for a in arrays if np.asarray(a).dtype.kind == "f"]
    assert floats and all(np.isfinite(a).all() for a in floats)


def test_unwritable_model_dir_is_reported_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    config = train.TrainConfig(model_dir=str(blocker / "run"), export=False, **SMALL_RUN)
    with pytest.raises(ConfigError, match="not writable"):
        train.run(config)


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": 0}, "epochs must be >= 1"),
    ({"stem": "vgg"}, "unknown stem"),
    ({"strategy": "horovod"}, "unknown strategy"),
    ({"schedule": "step"}, "needs --step_epochs"),
    ({"mixup": -0.5}, "mixup alpha must be >= 0"),
    ({"seed": -1}, r"seed must be in \[0, 2147483647\], got -1"),
    ({"seed": 2**31}, r"seed must be in \[0, 2147483647\], got 2147483648"),
    ({"schedule": "step", "step_epochs": (1,), "step_gamma": 0.0}, "step_gamma must be in"),
    ({"num_gpus": -2}, "num_gpus must be >= -1"),
    ({"export_tta": "fivecrop"}, "unknown export_tta"),
    ({"export_tta_tolerance": -1.0}, "export_tta_tolerance must be >= 0"),
    ({"schedule": "step", "step_epochs": (2,)}, r"step_epochs must be between 1 and epochs - 1 \(1\), got \[2\]"),
    ({"cpu_devices": 2, "strategy": "multi_worker"}, "splits the CPU for strategy=mirrored only"),
    ({"collective_timeout": -1.0}, "collective_timeout must be >= 0"),
    ({"verbose": 3}, "verbose must be 0, 1 or 2"),
    ({"average_from_epoch": 5}, r"average_from_epoch must be between 0 \(off\) and epochs \(2\), got 5"),
    ({"input_crop": 41}, "input_crop must be 0 .none. or smaller than 48 by an even number of pixels, got 41"),
    # inf passed every range check: --warmup_epochs=inf crashed, --learning_rate=inf trained an epoch of NaN.
    ({"warmup_epochs": float("inf")}, "warmup_epochs must be a finite number, got inf"),
    ({"learning_rate": float("inf")}, "learning_rate must be a finite number, got inf"),
    ({"distill_temperature": float("nan")}, "distill_temperature must be a finite number, got nan"),
    ({"model_dir": " "}, "model_dir must name a folder"),
    # An unset shell variable (--export_dir=$EXPORTS) exported into the current directory.
    ({"export_dir": ""}, r"export_dir must name a folder \(empty would export into the current directory; --noexport"),
    # Read by the step schedule alone: the run trained another schedule without a word.
    ({"step_epochs": (1,)}, r"step_epochs \[1\] apply to schedule=step only, got schedule=cosine"),
    ({"export_name": " "}, "export name ' ' must be a plain folder name"),
    # A TrainConfig built in code meets no flag validator: these are its only check.
    ({"learning_rate": 0.0}, "learning_rate must be > 0, got 0"),
    ({"weight_decay": -1e-4}, "weight_decay must be >= 0, got -0.0001"),
    ({"label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\), got 1.0"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
    ({"warmup_epochs": -1.0}, "warmup_epochs must be >= 0, got -1.0"),
    ({"val_fraction": 1.0}, r"val_fraction must be in \(0, 1\), got 1.0"),
    ({"steps_per_execution": 0}, "steps_per_execution must be >= 1, got 0"),
    ({"input_channels": 2}, "input_channels must be 1 or 3, got 2"),
    ({"precision": "float16"}, "unknown precision 'float16'"),
    ({"cpu_devices": -1}, "cpu_devices must be >= 0, got -1"),
    ({"max_val_examples": -1}, "max_.*_examples must be >= 0"),
    ({"export_version": -1}, "export_version must be >= 0, got -1"),
    ({"teachers": ("",)}, "teachers: an empty path"),
    ({"teachers": ("a.keras",), "teacher_tta": "fivecrop"}, "unknown teacher_tta 'fivecrop'"),
])
def test_bad_settings_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        train.run(train.TrainConfig(**{"model_dir": str(tmp_path), **SMALL_RUN, **kwargs}))


def test_every_recipe_in_flags_is_a_valid_configuration(tmp_path):
    """A recipe that the validators refuse (e.g. onecycle with warm-up as long as the run), or whose chain of
    recipe stages is broken (a missing recipe, a cycle), fails here, not hours into a user's session."""
    recipes = sorted(str(p.relative_to(REPO)) for p in (REPO / "flags").rglob("*.cfg"))
    assert "flags/fer2013.cfg" in recipes and len(recipes) >= 5
    script = (
        "import dataclasses, sys\n"
        "from fer_keras import recipe, train\n"
        "for flagfile in sys.argv[2:]:\n"
        "    config = train.config_from_args(['--flagfile=' + flagfile])\n"
        "    stages = recipe.plan(dataclasses.replace(config, model_dir=sys.argv[1] + '/run'))\n"
        "    print(flagfile, config.schedule, config.epochs, len(stages))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "runs"), *recipes], cwd=REPO,
                          env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout.splitlines()) == len(recipes)
    assert "flags/fer2013_onecycle.cfg onecycle 200 0" in proc.stdout
    # The shipped model's last run, after the six runs it starts and distils from (tests/test_recipe.py).
    assert "flags/fer2013.cfg constant 6 6" in proc.stdout
    assert "flags/fer2013_restart_bf16.cfg onecycle 16 2" in proc.stdout


def test_checking_a_configuration_loads_neither_keras_nor_tensorflow(tmp_path):
    """Flags and TrainConfig.validate catch a bad setting in a second, before TensorFlow's start-up."""
    code = ("import sys\n"
            "from absl import flags\n"
            "from fer_keras import train\n"
            "train.define_flags()\n"
            "flags.FLAGS(['train', '--flagfile=flags/fer2013_distill_bf16.cfg'])\n"
            "train.config_from_flags(flags.FLAGS).validate()\n"
            "try:\n"
            "    train.TrainConfig(input_crop=41, strategy='mirrored').validate()\n"
            "except Exception as e:\n"
            "    print(e)\n"
            "print(sorted(m for m in ('keras', 'tensorflow') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(tmp_path), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [
        "input_crop must be 0 (none) or smaller than 48 by an even number of pixels, got 41", "[]"]


def kernels(model_or_path) -> list[np.ndarray]:
    import keras

    model = keras.models.load_model(model_or_path) if isinstance(model_or_path, (str, Path)) else model_or_path
    return [np.asarray(v) for v in model.trainable_weights if len(v.shape) > 1]


def test_init_from_starts_from_the_given_runs_weights(trained_run, tmp_path):
    config, source = trained_run
    source_dir = Path(config.model_dir)
    # A rate of 1e-9 and no weight decay leave the kernels where they started, so best.keras shows the start.
    still = dict(SMALL_RUN, epochs=1, learning_rate=1e-9, weight_decay=0.0, export=False)
    started = train.run(train.TrainConfig(model_dir=str(tmp_path / "cont"), init_from=str(source_dir), **still))
    train.run(train.TrainConfig(model_dir=str(tmp_path / "fresh"), **still))
    assert started.resumed_from == 0
    want = kernels(source_dir / "best.keras")
    for got, expected in zip(kernels(tmp_path / "cont" / "best.keras"), want, strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-6)
    assert max(np.abs(a - b).max() for a, b in zip(kernels(tmp_path / "fresh" / "best.keras"), want)) > 0.01
    record = json.loads((tmp_path / "cont" / "init.json").read_text())
    import hashlib

    assert record["path"] == str((source_dir / "best.keras").resolve())
    assert record["sha256"] == hashlib.sha256((source_dir / "best.keras").read_bytes()).hexdigest()
    assert record["run"]["epochs"] == config.epochs and record["run"]["best_epoch"] == source.best_epoch
    assert record["run"]["config"]["stem"] == "imagenet"
    assert not (tmp_path / "fresh" / "init.json").exists()


def test_init_from_an_export_takes_its_weights_and_what_it_knows_of_its_run(trained_run, tmp_path):
    # The shipped model is an export; its run directory stays on the machine that trained it.
    import hashlib

    from fer_keras import model_card
    from fer_keras.model import load_keras_model

    config, source = trained_run
    base = tmp_path / "exports" / "shipped"
    shutil.copytree(source.export_path.parent, base)
    model, record = train.load_initial_model(str(base))  # NAME: its highest version
    best = load_keras_model(str(Path(config.model_dir) / "best.keras"))
    for layer in best.layers:  # every weight, BatchNorm statistics included
        for got, expected in zip(model.get_layer(layer.name).get_weights(), layer.get_weights(), strict=True):
            np.testing.assert_array_equal(got, expected)
    data_file, = (base / "1" / "variables").glob("variables.data-*")
    assert record["path"] == str((base / "1").resolve())
    assert record["sha256"] == hashlib.sha256(data_file.read_bytes()).hexdigest()
    assert record["export"]["val_split"] == "PublicTest"
    seconds = [row["seconds"] for row in history_lib.read_history_csv(Path(config.model_dir) / "history.csv")]
    flags_text = (Path(config.model_dir) / "flags.txt").read_text()
    described = (config.epochs, source.best_epoch, pytest.approx(sum(seconds)), flags_text)

    def run_facts(record):
        return tuple(record["run"][k] for k in ("epochs", "best_epoch", "wall_seconds", "flags"))

    assert run_facts(record) == described  # the run directory is still here
    # On another machine: only the export's metadata, and the model card beside it once there is one.
    metadata_file = base / "1" / "assets.extra" / "fer_keras.json"
    metadata_file.write_text(json.dumps({**json.loads(metadata_file.read_text()), "model_dir": "/elsewhere/run"}))
    _, record = train.load_initial_model(str(base / "1"))
    assert run_facts(record) == (None, source.best_epoch, None, None)
    assert record["run"]["config"]["stem"] == "imagenet"
    model_card.write_card(Path(config.model_dir), base, None, None, ("none",))
    assert run_facts(train.load_initial_model(str(base / "1"))[1]) == described
    card = json.loads((base / model_card.CARD_JSON).read_text())
    (base / model_card.CARD_JSON).write_text(json.dumps({**card, "version": 2}))  # another version's card
    assert run_facts(train.load_initial_model(str(base / "1"))[1]) == (None, source.best_epoch, None, None)


@pytest.mark.parametrize("damage", ["variables", "description"])
def test_an_export_that_cannot_be_loaded_is_refused_with_one_line(trained_run, tmp_path, damage):
    _, source = trained_run
    export = tmp_path / "shipped" / "1"
    shutil.copytree(source.export_path, export)
    if damage == "variables":
        data_file, = (export / "variables").glob("variables.data-*")
        data_file.write_bytes(data_file.read_bytes()[:1000])
        message = r"cannot rebuild the Keras model \("
    else:
        (export / "assets.extra" / "keras_model.json").unlink()
        (export / "assets.extra" / "fer_keras.json").unlink()
        message = "this export holds no fer_keras model description"
    with pytest.raises(ConfigError, match=rf"^--init_from=.*shipped/1: .*shipped/1: {message}"):
        train.load_initial_model(str(export))


def test_a_run_started_from_a_model_resumes_from_its_own_checkpoint(trained_run, tmp_path):
    config, _ = trained_run
    copy = tmp_path / "start.keras"
    shutil.copy(Path(config.model_dir) / "best.keras", copy)
    cont = train.TrainConfig(model_dir=str(tmp_path / "cont"), init_from=str(copy),
                             **dict(SMALL_RUN, epochs=1, export=False))
    train.run(cont)
    assert "run" not in json.loads((tmp_path / "cont" / "init.json").read_text())  # a bare .keras file
    copy.unlink()  # once the run has a checkpoint, the model it started from is no longer needed
    assert train.run(cont).resumed_from == 1
    moved = train.TrainConfig(**{**cont.to_json(), "step_epochs": (), "init_from": str(tmp_path / "other.keras")})
    with pytest.raises(ConfigError, match="init_from: .*start.keras' -> .*other.keras'"):
        train.run(moved)


def test_resuming_on_another_number_of_replicas_says_what_changes(trained_run, tmp_path, caplog):
    """A run may move to other hardware; its checkpoints record the replicas it trained on, and a resume on another
    number says that BatchNorm now normalises over other batches."""
    config, result = trained_run
    run = tmp_path / "run"
    shutil.copytree(result.model_dir, run)
    shutil.rmtree(run / "checkpoints" / "epoch_0002")
    state_file = run / "checkpoints" / "epoch_0001" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["replicas"] == 1
    state_file.write_text(json.dumps({**state, "replicas": 2}))
    with caplog.at_level(logging.WARNING):
        resumed = train.run(dataclasses.replace(config, model_dir=str(run), export=False))
    assert resumed.resumed_from == 1
    assert ("resuming a run trained on 2 replica(s) with 1: BatchNorm now normalises over 32 images per replica "
            "instead of 16 (--sync_batchnorm would use the global batch of 32)") in caplog.text
    assert json.loads((run / "checkpoints" / "epoch_0002" / "state.json").read_text())["replicas"] == 1


def test_dropout_rng_state_is_restored_whatever_keras_numbered_its_generator():
    # Keras numbers seed generators per process; a run started with --init_from builds two models before its
    # own, so its checkpoints name the state seed_generator_2/..., and the resumed process names it otherwise.
    from fer_keras import checkpoint
    from fer_keras.model import resnet18

    first = resnet18("imagenet", dropout=0.2)
    for variable in checkpoint.rng_variables(first):
        variable.assign(np.asarray(variable) + 12345)
    saved = {v.path: np.asarray(v).tolist() for v in checkpoint.rng_variables(first)}
    resnet18("imagenet", dropout=0.2)
    second = resnet18("imagenet", dropout=0.2)
    assert [v.path for v in checkpoint.rng_variables(second)] != list(saved)
    assert checkpoint.restore_rng(second, saved) == len(saved) >= 1
    for variable, value in zip(checkpoint.rng_variables(second), saved.values(), strict=True):
        np.testing.assert_array_equal(np.asarray(variable), value)


@pytest.mark.parametrize("change, message", [
    ({"stem": "cifar_pool"}, r"layer stem_conv has weights of shapes \[\(7, 7, 1, 64\)\], this run's model needs "
                             r"\[\(3, 3, 1, 64\)\]; use the --stem and --input_channels it was trained with"),
    ({"input_channels": 3}, r"layer stem_conv has weights of shapes \[\(7, 7, 1, 64\)\], this run's model needs "
                            r"\[\(7, 7, 3, 64\)\]"),
    ({"init_from": "nowhere"}, r"--init_from=nowhere: no such .keras file, run directory with a best.keras, or "
                               r"SavedModel export$"),
    ({"init_from": "export", "stem": "cifar_pool"}, r"layer stem_conv has weights of shapes \[\(7, 7, 1, 64\)\]"),
])
def test_init_from_another_model_is_refused_before_anything_is_written(trained_run, tmp_path, change, message):
    config, source = trained_run
    init_from = {"export": str(source.export_path), "nowhere": "nowhere"}.get(change.get("init_from"),
                                                                             config.model_dir)
    bad = train.TrainConfig(model_dir=str(tmp_path / "run"), export_dir=str(tmp_path / "exports"),
                            **{**SMALL_RUN, "epochs": 1, **change, "init_from": init_from})
    with pytest.raises(ConfigError, match=message):
        train.run(bad)
    assert not (tmp_path / "run").exists() and not (tmp_path / "exports").exists()


@pytest.mark.parametrize("source_crop, target_crop", [(0, 40), (40, 0)])
def test_init_from_carries_every_weight_across_an_input_crop(source_crop, target_crop):
    # The crop has no weights and the network is fully convolutional up to its global pooling, so a model
    # trained on 48x48 may be fine-tuned on 40x40 crops and back (FixRes-style); nothing may be left behind.
    from fer_keras.model import input_crop_of, resnet18

    source = resnet18(input_crop=source_crop)
    target = resnet18(input_crop=target_crop)
    for i, variable in enumerate(source.weights):  # distinct values per variable, so a swap would show too
        variable.assign(np.random.default_rng(i).normal(size=variable.shape).astype("float32"))
    train.copy_weights(source, target, "source")
    assert input_crop_of(target) == target_crop
    assert [v.path for v in source.weights] == [v.path for v in target.weights]
    for theirs, ours in zip(source.weights, target.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs), err_msg=ours.path)


def test_an_input_crop_run_trains_on_crops_and_its_export_measures_ten_crop_at_its_size(tmp_path):
    from fer_keras.inference import export_metadata, load_keras
    from fer_keras.model import input_crop_of

    config = train.TrainConfig(model_dir=str(tmp_path / "run"), export_dir=str(tmp_path / "exports"),
                               **dict(SMALL_RUN, epochs=1, input_crop=40))
    result = train.run(config)
    assert input_crop_of(load_keras(result.model_dir / "best.keras")) == 40
    assert "--input_crop=40\n" in (result.model_dir / "flags.txt").read_text()
    metadata = export_metadata(result.export_path)
    assert metadata["input_crop"] == 40 and metadata["tta_selection"]["crop_size"] == 40
    assert metadata["train_config"]["input_crop"] == 40


def test_exports_are_named_after_the_run_unless_named(tmp_path):
    # A user's runs must never add versions to the shipped saved_models/fer_resnet18.
    assert train.TrainConfig(model_dir=str(tmp_path / "runs" / "mine")).resolved_export_name == "mine"
    assert train.TrainConfig().resolved_export_name == "my_resnet18"
    assert train.TrainConfig(model_dir=str(tmp_path), export_name="x").resolved_export_name == "x"
    with pytest.raises(ConfigError, match="must be a plain folder name"):
        train.TrainConfig(model_dir=str(tmp_path), export_name=".hidden").validate()
    with pytest.raises(ConfigError, match="export name '.run' must be a plain folder name"):
        train.TrainConfig(model_dir=str(tmp_path / ".run")).validate()
    train.TrainConfig(model_dir=str(tmp_path / ".run"), export=False).validate()  # no export, no name to check


def cli(args, tmp_path, **kw):
    return subprocess.run([sys.executable, "-m", "fer_keras.train", *args], env=cli_env(tmp_path),
                          capture_output=True, text=True, timeout=600, **kw)


@pytest.mark.parametrize("args, needle", [
    (["--epochs=-1"], "--epochs must be >= 1"),
    (["--strategy=horovod"], "strategy"),
    (["--stem=vgg"], "stem"),
    (["--mixup=-1"], "--mixup must be >= 0"),
    # Keras refused it only after the run folder was written; and the pipeline kept 31 bits, aliasing smaller seeds.
    (["--seed=4294967296"], "--seed must be in [0, 2147483647]"),
    (["--erasing_max_area=0"], "--erasing_max_area must be in (0.02, 1]"),
    (["--teachers=a.keras", "--distill_weight=1.5"], "--distill_weight must be in [0, 1]"),
    # No --cpu_devices: README's main command relies on mirrored splitting a CPU-only machine into 2 replicas.
    (["--strategy=mirrored", "--batch_size=33"], "not divisible by the 2 replicas"),
    (["--warmup_epochs=inf"], "--warmup_epochs must be a finite number"),
    (["--mixup=nan"], "--mixup must be"),
    # An unset shell variable (--model_dir=$RUN) trained into the current directory.
    (["--model_dir="], "--model_dir must name a folder"),
    (["--flagfile=latin1.cfg"], "latin1.cfg: not UTF-8 text (invalid continuation byte at byte 2)"),
    (["--flagfile=missing.cfg"], "error: Unable to open flagfile"),
    # A digit to str.isdigit but not to int(): the validator itself raised.
    (["--schedule=step", "--step_epochs=1\u00b2"], "--step_epochs must be positive integers"),
    (["--export_crop_size=4\u00b2"], "--export_crop_size must be one or more whole numbers in 1-48"),
    (["--export_tta=flip", "--export_crop_size=40,42"], "several --export_crop_size sides are measured only with"),
])
def test_cli_bad_flags_exit_non_zero_with_one_line(tmp_path, args, needle):
    (tmp_path / "latin1.cfg").write_bytes("# \u00e9t\u00e9\n--epochs=1\n".encode("latin-1"))
    args = [a.replace("=latin1.cfg", f"={tmp_path / 'latin1.cfg'}").replace("=missing.cfg", f"={tmp_path / 'no.cfg'}")
            for a in args]
    proc = cli(["--flagfile=flags/smoke.cfg", f"--model_dir={tmp_path / 'run'}", *args], tmp_path,
               cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0] and proc.stderr.strip().splitlines()[-1] == errors[0]
    assert "--helpshort" not in proc.stderr


def test_history_csv_keeps_rows_without_momentum(tmp_path):
    """Rows of a run resumed from before momentum was recorded (or of AdamW) have none: a blank cell, read back as
    no key, next to rows that have it."""
    old = {"epoch": 1, "loss": 1.9, "accuracy": 0.2, "val_loss": 1.8, "val_accuracy": 0.25, "learning_rate": 0.1,
           "seconds": 1.5}
    new = {**old, "epoch": 2, "momentum": 0.875}
    path = tmp_path / "history.csv"
    history_lib.write_history_csv(path, [old, new])
    assert path.read_text().splitlines()[:2] == [",".join(history_lib.HISTORY_FIELDS), "1,1.9,0.2,1.8,0.25,0.1,,1.5,,,"]
    assert history_lib.read_history_csv(path) == [old, new]


def test_a_damaged_history_csv_is_named_with_its_line(tmp_path):
    from fer_keras.errors import DataError

    path = tmp_path / "history.csv"
    rows = ["1,1.9,0.2,1.8,0.25,0.1,0.9,1.5", "2,1.8,x,1.7,0.3,0.1,0.9,1.5"]
    path.write_text("\n".join([",".join(history_lib.HISTORY_FIELDS), *rows]) + "\n")
    with pytest.raises(DataError, match=r"history.csv: line 3: accuracy 'x' is not a number"):
        history_lib.read_history_csv(path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "best.keras").write_bytes(b"")
    with pytest.raises(DataError, match=r"history.csv: line 3: accuracy 'x' is not a number"):
        history_lib.read_run(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ConfigError, match=r"config.json: unreadable: "):
        history_lib.read_run(tmp_path)
    path.write_text("loss,accuracy\n1.2,0.5\n")  # no epoch column: the report and ablation would fail on it
    with pytest.raises(DataError, match=r"history.csv: line 2: no epoch number"):
        history_lib.read_history_csv(path)
    path.write_bytes(b"epoch,loss\n1,0.5\n2,\xff\xfe\n")  # not UTF-8, on the last line (reported as line 0 once)
    with pytest.raises(DataError, match=r"history.csv: line 3: not UTF-8 text \(invalid start byte\)"):
        history_lib.read_history_csv(path)


def test_a_run_with_finished_epochs_but_no_usable_checkpoint_is_not_trained_over(trained_run, tmp_path):
    config, _ = trained_run
    run = tmp_path / "run"
    shutil.copytree(config.model_dir, run)
    shutil.rmtree(run / "checkpoints")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match=r"run holds finished epochs \(history.csv or best.keras\) but no usable "
                                          r"checkpoint in .*run/checkpoints: a rerun would train from scratch"):
        train.run(train.TrainConfig(**{**config.to_json(), "step_epochs": (), "model_dir": str(run), "export": False}))
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def small_cli_args(model_dir: Path) -> list[str]:
    return [
        "--flagfile=flags/smoke.cfg", f"--model_dir={model_dir}", "--epochs=3", "--max_train_examples=64",
        "--deterministic", "--export=false", "--verbose=0", "--dropout=0.2", "--erasing=0.5", "--mixup=0.4",
        # The optimizer's whole state: a one-cycle learning rate (and momentum), functions of its step count.
        "--schedule=onecycle", "--warmup_epochs=1", "--cycle_momentum",
    ]


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    """With the optimizer's whole state in play: a one-cycle learning rate and cycled momentum, functions of the step
    count (constant momentum, the default, has less state to restore: it was a second run of this test)."""
    repo = Path(__file__).resolve().parents[1]
    reference = cli(small_cli_args(tmp_path / "reference"), tmp_path, cwd=repo)
    assert reference.returncode == 0, reference.stderr[-2000:]
    assert "sgd lr 0.05 onecycle, momentum 0.9 -> 0.85 -> 0.9, weight decay" in reference.stdout

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fer_keras.train", *small_cli_args(killed_dir)],
                            env=cli_env(tmp_path), cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (killed_dir / "checkpoints" / "epoch_0001").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (killed_dir / "checkpoints" / "epoch_0003").exists()

    resumed = cli(small_cli_args(killed_dir), tmp_path, cwd=repo)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after epoch" in resumed.stdout
    ref_rows = list(csv.DictReader(open(tmp_path / "reference" / "history.csv")))
    got_rows = list(csv.DictReader(open(killed_dir / "history.csv")))
    assert [r["epoch"] for r in got_rows] == ["1", "2", "3"]
    # The next step's momentum (as for the learning rate): the cycle over 6 steps (2 per epoch, the lowest 0.85 at
    # step 1) at steps 2, 4 and 6, rising back to 0.9.
    assert [float(r["momentum"]) for r in ref_rows] == pytest.approx([0.857322, 0.892678, 0.9], abs=1e-6)
    for ref, got in zip(ref_rows, got_rows):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "momentum"):
            assert float(got[key]) == pytest.approx(float(ref[key]), rel=1e-5, abs=1e-6), (ref["epoch"], key)
    assert not list((killed_dir / "checkpoints").glob(".tmp-*"))


ONE_STEP = textwrap.dedent("""
    import sys
    import keras, numpy as np, tensorflow as tf
    from fer_keras.model import resnet18
    keras.utils.set_random_seed(0)
    model = resnet18("imagenet")
    if sys.argv[2] == "float64":  # the same weights in float64: the reference both float32 runs are held to
        weights = model.get_weights()
        keras.config.set_dtype_policy("float64")
        model = resnet18("imagenet")
        model.set_weights([w.astype("float64") for w in weights])
    x = np.random.default_rng(0).integers(0, 256, (16, 48, 48, 1)).astype(sys.argv[2])
    y = np.arange(16) % 7
    with tf.GradientTape() as tape:
        logits = model(x, training=True)
        loss = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
    grads = tape.gradient(loss, model.trainable_variables)
    as64 = lambda t: np.asarray(t, np.float64)
    from fer_keras.distribute import onednn_enabled
    np.savez(sys.argv[1], train_logits=as64(logits), eval_logits=as64(model(x, training=False)),
             onednn=onednn_enabled(), **{f"grad_{i}": as64(g) for i, g in enumerate(grads)})
""")


def test_onednn_kernels_compute_what_tensorflows_own_kernels_compute(tmp_path):
    # fer_keras turns oneDNN on for its ~5x speed-up on AVX2; it may only change float round-off. Both float32
    # runs are held to a float64 run of the same weights (TensorFlow's own kernels; oneDNN has no float64).
    out = {}
    for setting, dtype in (("0", "float32"), ("1", "float32"), ("0", "float64")):
        env = {**cli_env(tmp_path), "TF_ENABLE_ONEDNN_OPTS": setting}
        path = tmp_path / f"{setting}_{dtype}.npz"
        proc = subprocess.run([sys.executable, "-c", ONE_STEP, str(path), dtype], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[setting, dtype] = np.load(path)
    off, on, ref = out["0", "float32"], out["1", "float32"], out["0", "float64"]
    assert bool(on["onednn"]) and not bool(off["onednn"]) and not bool(ref["onednn"])  # each ran what it says
    for key in ("train_logits", "eval_logits"):
        np.testing.assert_allclose(off[key], ref[key], rtol=1e-4, atol=1e-4, err_msg=key)
        np.testing.assert_allclose(on[key], ref[key], rtol=1e-4, atol=1e-4, err_msg=key)
    grads = [k for k in ref.files if k.startswith("grad_")]
    assert len(grads) > 60

    def worst(run) -> float:
        return max(np.linalg.norm(run[k] - ref[k]) / max(np.linalg.norm(ref[k]), 1e-12) for k in grads)

    # Measured (2026-11-29, seed 0): TensorFlow's kernels 3.9e-6, oneDNN's 4.1e-4 relative (its error enters
    # below stage 3); SGD's minibatch noise is orders of magnitude larger.
    assert worst(off) < 2e-5
    assert worst(on) < 2e-3




@pytest.mark.parametrize("val_rows, expected", [(0, "10% stratified hold-out"), (7, "PublicTest")])
def test_the_selection_split_is_named_for_what_it_is(val_rows, expected):
    """An image folder with an empty val/ class folder selects on a hold-out of Training, and says so."""
    from fer_keras.data import FerData, Split

    rng = np.random.default_rng(0)

    def split(n: int) -> Split:
        return Split(rng.integers(0, 256, (n, 48, 48, 1), dtype=np.uint8), np.arange(n, dtype=np.int64) % 7,
                     np.arange(n).astype(str))

    data = FerData("faces/", "folders", {"train": split(70), "val": split(val_rows)})
    train_split, val_split, name = train.run_splits(data, train.TrainConfig())
    assert name == expected
    assert (len(train_split), len(val_split)) == ((63, 7) if val_rows == 0 else (70, 7))


def test_settings_are_checked_against_the_checkpoints_copy_when_config_json_is_damaged(tmp_path):
    """Else a damaged config.json would let other settings resume the run, and be overwritten with them."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    recorded = train.TrainConfig(**SMALL_RUN).to_json()
    latest = (run_dir / "checkpoints" / "epoch_0001", {"epoch": 1, "config": recorded})
    (run_dir / "config.json").write_text('{"stem": "imag')
    train.check_resumable(run_dir, train.TrainConfig(**SMALL_RUN), latest)
    with pytest.raises(ConfigError, match=r"holds a run made with other settings \(learning_rate: 0.01 -> 0.5\)"):
        train.check_resumable(run_dir, train.TrainConfig(**{**SMALL_RUN, "learning_rate": 0.5}), latest)


def test_a_damaged_data_json_is_reported_for_rewriting(tmp_path):
    from fer_keras import data as fer_data

    dataset = fer_data.load(None)
    train_split, val_split, val_name = train.run_splits(dataset, train.TrainConfig(**SMALL_RUN))
    record, recorded = train._check_same_data(tmp_path, dataset.source, train_split, val_split, val_name)
    assert not recorded  # no data.json
    (tmp_path / "data.json").write_text(json.dumps({**record, "train": "?"}))
    assert train._check_same_data(tmp_path, dataset.source, train_split, val_split, val_name) == (record, False)
    (tmp_path / "data.json").write_text(json.dumps(record))
    assert train._check_same_data(tmp_path, dataset.source, train_split, val_split, val_name) == (record, True)
    other = {**record, "train": {"sha256": "0" * 64}}  # a partial record still names what differs
    (tmp_path / "data.json").write_text(json.dumps(other))
    with pytest.raises(ConfigError, match=r"trained on other data \(.*: \? training and 63 validation images\)"):
        train._check_same_data(tmp_path, dataset.source, train_split, val_split, val_name)


def _cpu(flags: str) -> dict:
    from fer_keras import benchmark

    return benchmark.cpu_info(cpuinfo(flags, model="Test EPYC"), max_khz=0)


def test_precision_advice_warns_of_emulated_bf16_and_float16_only():
    avx2, amx = _cpu("avx avx2 fma"), _cpu("avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile")
    advice = train.precision_advice("mixed_bfloat16", avx2)
    assert advice.startswith("--precision=mixed_bfloat16 on a CPU without bf16 arithmetic (Test EPYC, AVX2 FMA)")
    assert advice.endswith("use --precision=float32 on this machine")
    assert train.precision_advice("mixed_bfloat16", amx) is None
    assert train.precision_advice("mixed_bfloat16", _cpu("avx2 fma avx512f avx512_bf16")) is None
    assert train.precision_advice("float32", avx2) is None
    assert train.precision_advice("mixed_bfloat16", _cpu("")) is None  # flags unknown: no claim about the CPU
    for cpu in (avx2, amx, _cpu("")):  # the caller asks only when there is no GPU or TPU
        assert train.precision_advice("mixed_float16", cpu).startswith("--precision=mixed_float16 without a GPU: ")


def test_training_in_emulated_bf16_says_so_before_it_starts(tmp_path, monkeypatch, caplog):
    """The *_bf16 recipes crawl on CPUs without bf16 units; the run says so at its start instead of leaving the
    user to find out from the epoch times."""
    from fer_keras import benchmark

    avx2 = _cpu("avx avx2 fma")
    monkeypatch.setattr(benchmark, "cpu_info", lambda: avx2)
    config = train.TrainConfig(**{**SMALL_RUN, "epochs": 1, "max_train_examples": 32, "max_val_examples": 32},
                               precision="mixed_bfloat16", model_dir=str(tmp_path / "run"), export=False)
    with caplog.at_level(logging.WARNING):
        train.run(config)
    assert "--precision=mixed_bfloat16 on a CPU without bf16 arithmetic (Test EPYC, AVX2 FMA)" in caplog.text


def test_a_checkpoint_weights_file_that_cannot_be_read_is_named_in_one_line(tmp_path):
    """A checkpoint written before state.json recorded hashes is not checked on resume; damaged, its weights file
    is named, with the way back to the epoch before, not h5py's message alone."""
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    folder = tmp_path / "checkpoints" / "epoch_0003"
    folder.mkdir(parents=True)
    model.save_weights(str(folder / "model.weights.h5"))
    train.load_checkpoint_weights(model, folder)
    data = (folder / "model.weights.h5").read_bytes()
    (folder / "model.weights.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError) as e:
        train.load_checkpoint_weights(model, folder)
    message = str(e.value)
    assert message.startswith(f"{folder / 'model.weights.h5'}: cannot be loaded (") and "\n" not in message
    assert message.endswith(f"move epoch_0003 out of {folder.parent} to resume from the epoch before")


@pytest.mark.parametrize("name, text", [
    ("config.json", '{"model_type": "bert", "hidden_size": 768}\n'),
    ("config.json", "model: resnet\n"),
    ("data.json", '{"images": "faces/"}\n'),
    ("flags.txt", "remember to buy milk\n"),
], ids=["foreign_config", "yaml_config", "foreign_data", "foreign_flags"])
def test_a_new_run_does_not_overwrite_files_it_did_not_write(tmp_path, name, text):
    run_dir = tmp_path / "project"
    run_dir.mkdir()
    (run_dir / name).write_text(text)
    with pytest.raises(ConfigError, match=rf"{re.escape(str(run_dir / name))}: exists and is not a fer_keras run's"):
        train.run(train.TrainConfig(model_dir=str(run_dir), **SMALL_RUN))
    assert [p.name for p in run_dir.iterdir()] == [name] and (run_dir / name).read_text() == text


def test_a_first_attempts_own_files_are_not_foreign(tmp_path):
    """A first attempt that stopped before its first epoch left its files; a rerun may replace them."""
    config = train.TrainConfig(model_dir=str(tmp_path), **SMALL_RUN)
    (tmp_path / "config.json").write_text(json.dumps(config.to_json()))
    (tmp_path / "data.json").write_text(json.dumps({"source": "x", "train": {}, "val": {}}))
    (tmp_path / "flags.txt").write_text("--epochs=2\n\n--stem=imagenet\n")
    train._refuse_foreign_files(tmp_path)
