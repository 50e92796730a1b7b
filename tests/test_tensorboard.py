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
