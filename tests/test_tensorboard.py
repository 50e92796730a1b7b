"""A real TensorBoard server on 127.0.0.1 serves the run's scalars, equal to history.csv."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import cli_env, free_ports

from fer_keras import history as history_lib


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_tensorboard_server_serves_the_history(trained_run, tmp_path):
    config, _ = trained_run
    rows = history_lib.read_history_csv(Path(config.model_dir) / "history.csv")
    port = free_ports(1)[0]
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(Path(config.model_dir) / "logs"),
         "--host", "127.0.0.1", "--port", str(port)],
        env=cli_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        runs = None
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stderr.read()[-2000:]
            try:
                runs = get_json(f"{base}/data/runs")
                if {"train", "validation"} <= set(runs):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        assert runs is not None and {"train", "validation"} <= set(runs), runs
        tags = get_json(f"{base}/data/plugin/scalars/tags")
        assert {"epoch_loss", "epoch_accuracy", "epoch_learning_rate"} <= set(tags["train"])
        assert {"epoch_loss", "epoch_accuracy"} <= set(tags["validation"])
        for run, tag, column in [("train", "epoch_loss", "loss"), ("validation", "epoch_accuracy", "val_accuracy"),
                                 ("train", "epoch_learning_rate", "learning_rate")]:
            points = get_json(f"{base}/data/plugin/scalars/scalars?run={run}&tag={tag}")
            assert [step for _, step, _ in points] == [r["epoch"] - 1 for r in rows]
            assert [value for _, _, value in points] == pytest.approx([r[column] for r in rows], rel=1e-5)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_tensorboard_logs_each_epochs_figures_once(tmp_path):
    """Keras' callback also wrote evaluation_*_vs_iterations at the end of validation, before later callbacks had
    set the epoch's figures (weight averaging's accuracy, the padded loss), and logged the average's epoch count
    as a curve; fer_keras' writes the epoch_* curves alone."""
    import keras
    import numpy as np
    import tensorflow as tf

    from fer_keras.checkpoint import EpochTensorBoard

    class Bookkeeping(keras.callbacks.Callback):  # as WeightAverage, which comes before the TensorBoard callback
        def on_epoch_end(self, epoch, logs=None):
            logs["averaged_epochs"] = epoch + 1

    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    x, y = np.random.default_rng(0).normal(size=(8, 3)).astype("float32"), np.arange(8) % 2
    model.fit(x, y, validation_data=(x, y), epochs=2, verbose=0, callbacks=[
        Bookkeeping(), EpochTensorBoard(str(tmp_path), update_freq="epoch", write_graph=False, profile_batch=0)])
    steps: dict[str, dict[str, list[int]]] = {}
    for run in ("train", "validation"):
        for events in sorted((tmp_path / run).glob("events.out.tfevents.*")):
            for event in tf.compat.v1.train.summary_iterator(str(events)):
                for value in event.summary.value:
                    steps.setdefault(run, {}).setdefault(value.tag, []).append(event.step)
    assert steps["validation"] == {"epoch_loss": [0, 1], "epoch_accuracy": [0, 1]}
    assert steps["train"] == {"epoch_loss": [0, 1], "epoch_accuracy": [0, 1], "epoch_learning_rate": [0, 1]}
