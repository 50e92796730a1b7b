"""Stochastic weight averaging (train --average_from_epoch): what is averaged, validated, kept and resumed."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SMALL_RUN, cli_env

from fer_keras import averaging, train
from fer_keras import data as data_lib
from fer_keras.errors import ConfigError
from fer_keras.history import read_history_csv

AVERAGED_RUN = {**SMALL_RUN, "average_from_epoch": 1, "export": False}


@pytest.fixture(scope="module")
def averaged_run(tmp_path_factory):
    """Two epochs, both averaged: epoch 1's average is its own weights, epoch 2's the mean of both epochs'."""
    run = tmp_path_factory.mktemp("averaged") / "run"
    config = train.TrainConfig(model_dir=str(run), **AVERAGED_RUN)
    return config, train.run(config)


def network(config: train.TrainConfig):
    from fer_keras.model import resnet18

    return resnet18(config.stem, config.input_channels, dropout=config.dropout)


def epoch_weights(model, run: Path, epoch: int) -> list[np.ndarray]:
    """The weights training reached at the end of ``epoch`` (its checkpoint keeps them, not the average)."""
    model.load_weights(str(run / "checkpoints" / f"epoch_{epoch:04d}" / "model.weights.h5"))
    return model.get_weights()


def test_the_average_is_the_mean_of_the_weights_at_each_epochs_end(averaged_run):
    config, result = averaged_run
    run, model = Path(config.model_dir), network(config)
    first, second = epoch_weights(model, run, 1), epoch_weights(model, run, 2)
    assert max(float(np.abs(a - b).max()) for a, b in zip(first, second)) > 1e-3  # training moved the weights
    for epoch, expected in ((1, first), (2, [(a + b) / 2 for a, b in zip(first, second)])):
        average, count = averaging.load(run / "checkpoints" / f"epoch_{epoch:04d}", model)
        assert count == epoch
        for a, e in zip(average, expected):
            np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)


def test_the_average_is_what_is_validated_and_kept_as_best(averaged_run):
    import keras

    config, result = averaged_run
    run = Path(config.model_dir)
    history = read_history_csv(run / "history.csv")
    assert [r["averaged_epochs"] for r in history] == [1, 2]
    # Epoch 1's average is its own weights: the same figures twice.
    assert history[0]["val_accuracy"] == history[0]["val_raw_accuracy"]
    assert history[0]["val_loss"] == pytest.approx(history[0]["val_raw_loss"], rel=1e-6)
    # Epoch 2's validation figures are the average's, measured again here from average.npz.
    model = network(config)
    average, _ = averaging.load(run / "checkpoints" / "epoch_0002", model)
    model.set_weights(average)
    _, val, _ = train.run_splits(data_lib.load(None), config)
    accuracy = float(np.mean(model.predict(val.images, verbose=0).argmax(axis=1) == val.labels))
    assert history[1]["val_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    # best.keras holds the average of its epoch, not that epoch's own weights.
    best = keras.saving.load_model(run / "best.keras")
    kept, _ = averaging.load(run / "checkpoints" / f"epoch_{result.best_epoch:04d}", model)
    for b, k in zip(best.get_weights(), kept):
        np.testing.assert_allclose(b, k, rtol=1e-6, atol=1e-6)
    if result.best_epoch == 2:
        own = epoch_weights(network(config), run, 2)
        assert max(float(np.abs(b - o).max()) for b, o in zip(best.get_weights(), own)) > 1e-3


def test_tensorboard_shows_the_average_and_the_weights_before_averaging(averaged_run):
    from test_train import read_tensorboard

    config, _ = averaged_run
    history = read_history_csv(Path(config.model_dir) / "history.csv")
    scalars = read_tensorboard(Path(config.model_dir) / "logs")
    for tag, key in (("epoch_accuracy", "val_accuracy"), ("epoch_raw_accuracy", "val_raw_accuracy")):
        assert [v for _, v in scalars[("validation", tag)]] == pytest.approx([r[key] for r in history], rel=1e-5)


def test_a_resumed_run_averages_on_from_its_checkpoint(averaged_run, tmp_path):
    config, _ = averaged_run
    run = tmp_path / "run"
    shutil.copytree(config.model_dir, run)
    shutil.rmtree(run / "checkpoints" / "epoch_0002")  # as if killed during epoch 2
    model = network(config)
    before, _ = averaging.load(run / "checkpoints" / "epoch_0001", model)
    train.run(train.TrainConfig(model_dir=str(run), **AVERAGED_RUN))
    now = epoch_weights(model, run, 2)
    average, count = averaging.load(run / "checkpoints" / "epoch_0002", model)
    assert count == 2
    for a, b, n in zip(average, before, now):
        np.testing.assert_allclose(a, (b + n) / 2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("recorded", [True, False], ids=["file_list", "before_file_lists"])
def test_a_resume_whose_average_is_lost_is_refused_before_anything_is_touched(averaged_run, tmp_path, caplog,
                                                                             recorded):
    """A checkpoint that lists its files is incomplete without the average (skipped, and here no other is left);
    one written before checkpoints listed them is refused at the average."""
    config, _ = averaged_run
    run = tmp_path / "run"
    shutil.copytree(config.model_dir, run)
    shutil.rmtree(run / "checkpoints" / "epoch_0002")
    folder = run / "checkpoints" / "epoch_0001"
    (folder / averaging.AVERAGE_FILE).unlink()
    if not recorded:
        state = json.loads((folder / "state.json").read_text())
        del state["files"]
        (folder / "state.json").write_text(json.dumps(state))
    history = (run / "history.csv").read_bytes()
    best = (run / "best.keras").read_bytes()
    expected = (r"holds finished epochs \(history.csv or best.keras\) but no usable checkpoint" if recorded
                else r"epoch_0001/average\.npz: missing, so the run's weight average is lost")
    with caplog.at_level("WARNING"), pytest.raises(ConfigError, match=expected):
        train.run(train.TrainConfig(model_dir=str(run), **AVERAGED_RUN))
    assert ("epoch_0001: skipped, no average.npz" in caplog.text) is recorded
    assert (run / "history.csv").read_bytes() == history and (run / "best.keras").read_bytes() == best
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_0001"]


def test_an_average_of_another_model_is_named(averaged_run, tmp_path):
    config, _ = averaged_run
    folder = tmp_path / "epoch_0001"
    shutil.copytree(Path(config.model_dir) / "checkpoints" / "epoch_0001", folder)
    other = train.TrainConfig(**{**AVERAGED_RUN, "stem": "cifar_pool"})
    with pytest.raises(ConfigError, match=r"average\.npz: holds \d+ arrays averaged over 1 epoch\(s\), which do not "
                                          r"fit this model's \d+ weights"):
        averaging.load(folder, network(other))


def test_starting_to_average_after_the_first_epochs_keeps_them_unaveraged(tmp_path):
    config = train.TrainConfig(model_dir=str(tmp_path / "run"), **{**AVERAGED_RUN, "epochs": 3,
                                                                    "average_from_epoch": 3})
    result = train.run(config)
    run = Path(config.model_dir)
    assert [r.get("averaged_epochs") for r in result.history] == [None, None, 1]
    assert not (run / "checkpoints" / "epoch_0002" / averaging.AVERAGE_FILE).exists()
    assert averaging.load(run / "checkpoints" / "epoch_0003", network(config))[1] == 1
    assert "val_raw_accuracy" not in read_history_csv(run / "history.csv")[1]


def test_the_first_averaged_epoch_reuses_fits_validation_and_later_ones_validate_the_mean():
    """An average of one epoch is that epoch's weights: fit's validation figures are copied, not measured again;
    from the second epoch on, the mean is swapped in and validated."""
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    kernel = model.layers[0].kernel
    seen = []
    model.evaluate = lambda data, **kwargs: seen.append(np.asarray(kernel).copy()) or {"loss": 0.5, "accuracy": 0.25}
    averager = averaging.WeightAverage(1, val_data="val")
    averager.set_model(model)
    first = np.asarray(kernel).copy()
    logs = {"val_loss": 1.5, "val_accuracy": 0.75}
    averager.on_epoch_end(0, logs)
    assert seen == [] and logs == {"val_loss": 1.5, "val_accuracy": 0.75, "val_raw_loss": 1.5,
                                   "val_raw_accuracy": 0.75, "averaged_epochs": 1}
    kernel.assign(first + 2.0)
    logs = {"val_loss": 1.25, "val_accuracy": 0.5}
    averager.on_epoch_end(1, logs)
    assert logs == {"val_loss": 0.5, "val_accuracy": 0.25, "val_raw_loss": 1.25, "val_raw_accuracy": 0.5,
                    "averaged_epochs": 2}
    assert len(seen) == 1
    np.testing.assert_allclose(seen[0], first + 1.0, rtol=1e-6)  # the mean of both epochs was validated
    np.testing.assert_allclose(np.asarray(kernel), first + 2.0, rtol=1e-6)  # and the own weights came back


@pytest.mark.parametrize("value, message", [
    (3, r"average_from_epoch must be between 0 \(off\) and epochs \(2\), got 3"),
    (-1, r"average_from_epoch must be between 0 \(off\) and epochs \(2\), got -1"),
])
def test_an_averaging_start_outside_the_run_is_refused(tmp_path, value, message):
    with pytest.raises(ConfigError, match=message):
        train.run(train.TrainConfig(model_dir=str(tmp_path / "run"), **{**SMALL_RUN, "average_from_epoch": value}))
    assert not (tmp_path / "run").exists()


MIRRORED_AVERAGE = textwrap.dedent("""
    import json, sys
    from fer_keras import distribute
    distribute.configure_cpu_devices(2)  # before TensorFlow initialises
    import numpy as np, tensorflow as tf
    from fer_keras import averaging, train
    config = train.TrainConfig(
        model_dir=sys.argv[1], stem="imagenet", epochs=2, batch_size=32, max_train_examples=64,
        max_val_examples=65, learning_rate=0.01, warmup_epochs=0, export=False, verbose=0,
        strategy="mirrored", average_from_epoch=1)
    captured = {}
    original = averaging.WeightAverage.on_epoch_end
    def spy(self, epoch, logs=None):
        original(self, epoch, logs)
        if epoch == 1:  # after the average was swapped in and out: every replica holds the same, own weights
            captured["spread"] = [
                max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                    for a, b in zip(v.value.values, v.value.values[1:]))
                for v in self.model.weights if hasattr(v.value, "values")]
            captured["kernel"] = np.asarray(self.model.weights[0]).tolist()
    averaging.WeightAverage.on_epoch_end = spy
    result = train.run(config)
    print("RESULT " + json.dumps({"replicas": result.num_replicas, "history": result.history, **captured}))
""")


@pytest.mark.slow
def test_averaging_under_a_mirrored_strategy_keeps_the_replicas_in_step(tmp_path):
    """Under MirroredStrategy over 2 logical CPUs the average is swapped into and out of every replica's copy."""
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", MIRRORED_AVERAGE, str(run)], env=cli_env(tmp_path), cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["replicas"] == 2
    assert [r["averaged_epochs"] for r in result["history"]] == [1, 2]
    assert result["spread"] and max(result["spread"]) == 0.0
    config = train.TrainConfig(stem="imagenet")
    model = network(config)
    own = epoch_weights(model, run, 2)
    np.testing.assert_array_equal(np.asarray(result["kernel"], np.float32), own[0])
    first = epoch_weights(model, run, 1)
    average, count = averaging.load(run / "checkpoints" / "epoch_0002", model)
    assert count == 2
    for a, f, o in zip(average, first, own):
        np.testing.assert_allclose(a, (f + o) / 2, rtol=1e-6, atol=1e-6)
    # 65 images leave one in the last batch of 32, padded to share it between the replicas: epoch 2's figures (the
    # average's, and the epoch's own weights' as raw) are still those of the 65 real images on one device.
    import keras

    val = train.run_splits(data_lib.load(None), train.TrainConfig(max_val_examples=65))[1]
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=config.label_smoothing)
    second = result["history"][1]
    for weights, prefix in ((average, "val_"), (own, "val_raw_")):
        model.set_weights(weights)
        logits = model.predict(val.images, verbose=0)
        assert second[prefix + "accuracy"] == pytest.approx(float(np.mean(logits.argmax(1) == val.labels)), abs=1e-6)
        expected = float(loss(np.eye(7, dtype=np.float32)[val.labels], logits))
        assert second[prefix + "loss"] == pytest.approx(expected, rel=1e-4), prefix


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "empty", "npy"])
def test_a_damaged_average_is_a_one_line_error_naming_it(tmp_path, damage):
    """A resume from a checkpoint written before checkpoints recorded their files' hashes reads average.npz
    unchecked: a damaged one is named, not a BadZipFile or EOFError traceback."""
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    averager = averaging.WeightAverage(1, val_data=None)
    averager.set_model(model)
    averager.on_epoch_end(0)
    averager.save(tmp_path)
    path = tmp_path / averaging.AVERAGE_FILE
    assert averaging.load(tmp_path, model)[1] == 1
    raw = path.read_bytes()
    npy = io.BytesIO()
    np.save(npy, np.zeros(3))  # one array under the .npz name: np.load gives no archive
    damaged = {"truncated": raw[:len(raw) // 2], "empty": b"", "npy": npy.getvalue(),
               "flipped byte": raw[:100] + bytes([raw[100] ^ 0xFF]) + raw[101:]}[damage]
    path.write_bytes(damaged)
    with pytest.raises(ConfigError, match=rf"^{path}: unreadable \(.+\); use a new --model_dir$"):
        averaging.load(tmp_path, model)


def test_an_epoch_that_failed_or_left_non_finite_weights_is_not_averaged_in():
    """The average must stay what best.keras and the checkpoint can keep: an epoch whose loss the guard caught as
    non-finite, or whose weights are NaN, leaves it (and the logs) as they were."""
    import keras

    from fer_keras.checkpoint import NonFiniteLoss

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    kernel = model.layers[0].kernel
    model.evaluate = lambda data, **kwargs: {"loss": 0.5, "accuracy": 0.25}
    guard = NonFiniteLoss()
    averager = averaging.WeightAverage(1, val_data="val", guard=guard)
    averager.set_model(model)
    first = np.asarray(kernel).copy()
    averager.on_epoch_end(0, {"val_loss": 1.0, "val_accuracy": 0.5})
    kernel.assign(np.full(first.shape, np.nan, np.float32))
    logs = {"val_loss": 1.0, "val_accuracy": 0.5}
    averager.on_epoch_end(1, logs)
    kernel.assign(first + 2.0)
    guard.failed_at = (3, 7, float("nan"), "loss")
    averager.on_epoch_end(2, logs)
    assert averager.count == 1 and logs == {"val_loss": 1.0, "val_accuracy": 0.5}
    np.testing.assert_array_equal(averager.average[0], first)
