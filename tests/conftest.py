"""Shared fixtures: an isolated data cache per test session and the optional real data set."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import configuration as hypothesis_configuration

# Test modules import keras (and so TensorFlow) before fer_keras, whose import would otherwise turn TensorFlow's
# oneDNN kernels on; set it first so the tests run what users run.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

# Hypothesis keeps files under the working directory (the repository) unless told otherwise, some of them while
# the test modules are collected: a temporary folder instead, set before collection.
_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="fer_keras-hypothesis-")
hypothesis_configuration.set_hypothesis_home_dir(_HYPOTHESIS_HOME)
atexit.register(shutil.rmtree, _HYPOTHESIS_HOME, ignore_errors=True)

REPO = Path(__file__).resolve().parents[1]
FER2013 = Path(__file__).resolve().parents[2] / "shared" / "data" / "fer2013" / "fer2013.csv.gz"


def pytest_collection_modifyitems(items):
    """The slow tests first (a stable sort): pytest-xdist's two workers then end on short tests, instead of one
    waiting while the other runs a minute-long test picked up last."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Parsed-data caches go to a temporary folder, never the user's ~/.cache."""
    old = os.environ.get("FER_KERAS_CACHE")
    os.environ["FER_KERAS_CACHE"] = str(tmp_path_factory.mktemp("fer_cache"))
    yield
    if old is None:
        os.environ.pop("FER_KERAS_CACHE", None)
    else:
        os.environ["FER_KERAS_CACHE"] = old


@pytest.fixture
def fer2013_path() -> Path:
    """The full FER2013 file of the shared folder; tests using it skip when it is absent."""
    path = Path(os.environ.get("FER2013_CSV", FER2013))
    if not path.is_file():
        pytest.skip(f"FER2013 not available at {path}")
    return path


SMALL_RUN = dict(
    stem="imagenet", epochs=2, batch_size=32, max_train_examples=128, max_val_examples=64,
    learning_rate=0.01, warmup_epochs=0, verbose=0, export_tta="auto",
)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One small real training run on the bundled sample, shared by the tests that read its outputs."""
    from fer_keras import train

    root = tmp_path_factory.mktemp("trained")
    config = train.TrainConfig(model_dir=str(root / "run"), export_dir=str(root / "exports"), **SMALL_RUN)
    result = train.run(config)
    return config, result


def cli_env(tmp_path: Path) -> dict:
    """Environment for entrypoint subprocesses: isolated cache and TensorBoard info, quiet TF."""
    env = dict(os.environ)
    env["FER_KERAS_CACHE"] = os.environ.get("FER_KERAS_CACHE", str(tmp_path / "cache"))
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["TMPDIR"] = str(tmp_path)
    return env


def run_tool(tool: str, *args: str, cwd: Path = REPO, env: dict | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs ``python -m fer_keras.TOOL ARGS`` as a user would, from any working directory."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", f"fer_keras.{tool}", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tool_inputs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """An untrained ResNet-18 .keras and a tiny challenge CSV for the explain tools' CLI tests."""
    from fer_keras.model import resnet18

    root = tmp_path_factory.mktemp("tool_inputs")
    resnet18("imagenet").save(root / "m.keras")
    write_challenge_csv(root / "fer2013.csv")
    return root, root / "m.keras", root / "fer2013.csv"


def write_challenge_csv(path: Path, n_val_per_class: int = 1) -> None:
    """A tiny fer2013.csv: one or more PublicTest rows per class plus two Training rows."""
    import numpy as np

    from fer_keras import CLASS_NAMES

    rng = np.random.default_rng(3)
    rows = ["emotion,pixels,Usage"]
    for c in range(len(CLASS_NAMES)):
        for _ in range(n_val_per_class):
            rows.append(f"{c},{' '.join(map(str, rng.integers(0, 256, 2304)))},PublicTest")
    for c in (0, 3):
        rows.append(f"{c},{' '.join(map(str, rng.integers(0, 256, 2304)))},Training")
    path.write_text("\n".join(rows) + "\n")


def free_ports(n: int) -> list[int]:
    """``n`` ports free on 127.0.0.1 a moment ago (for a server a test starts there)."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def distinct_batchnorm(layer, seed: int = 1) -> int:
    """Gives every BatchNorm of ``layer`` (a model or a block) distinct statistics and affine weights instead of
    a fresh one's 0/1, so that a missing or swapped BatchNorm (gamma for moving_variance, beta for moving_mean)
    changes the output, and the output depends on the image more than a fresh network's; returns how many
    weights it set."""
    import numpy as np

    rng = np.random.default_rng(seed)
    assigned = 0
    for w in layer.weights:
        if w.path.endswith(("gamma", "moving_variance")):
            w.assign(rng.uniform(0.5, 1.5, w.shape).astype("float32"))
            assigned += 1
        elif w.path.endswith(("beta", "moving_mean")):
            w.assign(rng.normal(0.0, 0.2, w.shape).astype("float32"))
            assigned += 1
    return assigned


def cpuinfo(flags: str, mhz: str = "2000.000", model: str = "Test CPU") -> str:
    """A /proc/cpuinfo text of two logical CPUs on one core, for ``benchmark.cpu_info``."""
    return (f"processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: {model}\ncpu MHz\t\t: {mhz}\n"
            f"siblings\t: 2\ncpu cores\t: 1\nflags\t\t: fpu {flags}\n\nprocessor\t: 1\nflags\t\t: other\n")
