"""Real distribution: MirroredStrategy over 2 logical CPUs, MultiWorkerMirroredStrategy over 127.0.0.1."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_env

REPO = Path(__file__).resolve().parents[1]

MIRRORED_VS_SINGLE = textwrap.dedent("""
    import json, sys
    from fer_keras import distribute
    distribute.configure_cpu_devices(2)  # before TensorFlow initialises
    import h5py, keras, numpy as np
    from fer_keras import data, train
    out = {}
    for name in ("default", "mirrored"):
        # 65 validation images: the last batch holds one, which two replicas can only share by padding.
        config = train.TrainConfig(
            model_dir=f"{sys.argv[1]}/{name}", stem="imagenet", epochs=1, batch_size=32,
            max_train_examples=64, max_val_examples=65, dropout=0.0, flip=False, shift=0, rotation=0,
            zoom=0, erasing=0, learning_rate=0.01, warmup_epochs=0, sync_batchnorm=True, export=False,
            verbose=0)
        result = train.run(config, strategy=distribute.create_strategy(name))
        out[name] = {"replicas": result.num_replicas, "history": result.history}
        # The epoch's model on one device, unpadded: what the logged validation figures must be.
        _, val, _ = train.run_splits(data.load(None), config)
        model = keras.models.load_model(f"{sys.argv[1]}/{name}/best.keras", compile=False)
        logits = model.predict(val.images, batch_size=32, verbose=0)
        loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=config.label_smoothing)
        out[name]["one_device"] = {
            "images": len(val),
            "val_loss": float(loss(np.eye(7, dtype=np.float32)[val.labels], logits)),
            "val_accuracy": float(np.mean(logits.argmax(1) == val.labels)),
        }
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.parametrize("setting, expected", [(None, "1 True"), ("0", "0 False")])
def test_fer_keras_turns_onednn_on_unless_the_user_turned_it_off(tmp_path, setting, expected):
    # TF enables oneDNN by itself only on AVX512-VNNI/AMX CPUs; on AVX2 it is ~5x faster to have it. The variable
    # fer_keras sets is checked too: on a VNNI CPU (this one) TF's own default would pass the second check alone.
    env = cli_env(tmp_path)
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    if setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = setting
    code = ("import os, fer_keras\nfrom fer_keras.distribute import onednn_enabled\n"
            "print(os.environ['TF_ENABLE_ONEDNN_OPTS'], onednn_enabled())")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == expected


def test_the_library_leaves_tensorflow_unimported_and_entrypoints_print_only_their_error(tmp_path):
    """``import fer_keras`` and defining the training flags stay cheap; a tool answers a bad flag before it imports
    TensorFlow (5–8 s here); once a tool has imported TensorFlow (here to load a model) it has held back TF's
    start-up lines (written before TF reads TF_CPP_MIN_LOG_LEVEL), so its errors are one line too."""
    env = cli_env(tmp_path)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    code = ("import sys, fer_keras.history, fer_keras.errors, fer_keras.train\nfer_keras.train.define_flags()\n"
            "print('tensorflow' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr[-2000:]
    as_python_m = ("import atexit, runpy, sys\natexit.register(lambda: print('tensorflow' in sys.modules))\n"
                   "sys.argv = ['-m', *sys.argv[1:]]\nrunpy.run_module(sys.argv.pop(1), run_name='__main__')")
    junk = tmp_path / "junk.keras"
    junk.write_text("not a model\n")
    for tool, args, error, imported in [
        ("fer_keras.evaluate", ["--output_dir="], "error: flag --output_dir=: --output_dir must not be empty", False),
        ("fer_keras.export", ["--model=x.keras", "--tta_tolerance=-1"], "error: flag --tta_tolerance=-1.0: "
                                                                         "--tta_tolerance must be >= 0", False),
        ("fer_keras.filters", ["--steps=0"], "error: flag --steps=0: --steps must be >= 1", False),
        ("fer_keras.export", [f"--model={junk}", f"--export_dir={tmp_path / 'exports'}"],
         f"error: {junk}: cannot load model: not a .keras file (a zip archive)", True),
    ]:
        proc = subprocess.run([sys.executable, "-c", as_python_m, tool, *args], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
        assert proc.stderr.startswith(error), proc.stderr
        assert proc.stdout.strip() == str(imported)


@pytest.mark.parametrize("tensorflow_default", ["0", None], ids=["onednn_off", "cpu_default"])
def test_importing_tensorflow_first_warns_when_it_leaves_onednn_off(tmp_path, tensorflow_default):
    """TensorFlow imported first keeps oneDNN as it found it: off is forced here (as on an AVX2-only CPU, where it
    is TF's default) so the warning is exercised on any CPU; with TF's own default it warns exactly when off."""
    env = cli_env(tmp_path)
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    force = ("import os\nos.environ['TF_ENABLE_ONEDNN_OPTS'] = '0'\n" if tensorflow_default else "")
    code = (force + "import tensorflow\nimport os\nos.environ.pop('TF_ENABLE_ONEDNN_OPTS', None)\n"
            "import fer_keras\nfrom fer_keras.distribute import onednn_enabled\nprint(onednn_enabled())")
    proc = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    warned = "TensorFlow was imported before fer_keras" in proc.stderr
    if tensorflow_default:
        assert warned and proc.stdout.strip() == "False", proc.stderr[-2000:]
    else:
        assert warned is (proc.stdout.strip() == "False")


def weights(path: Path) -> dict[str, np.ndarray]:
    import h5py

    found = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and name.startswith("layers/"):
                found[name] = obj[()]
        f.visititems(visit)
    return found


@pytest.mark.slow
def test_mirrored_two_replicas_match_a_single_device(tmp_path):
    proc = subprocess.run([sys.executable, "-c", MIRRORED_VS_SINGLE, str(tmp_path)], env=cli_env(tmp_path),
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["default"]["replicas"] == 1 and result["mirrored"]["replicas"] == 2
    single, mirrored = result["default"]["history"][0], result["mirrored"]["history"][0]
    for key in ("loss", "accuracy"):
        assert mirrored[key] == pytest.approx(single[key], rel=1e-3, abs=1e-4), key
    # Validation runs on moving statistics after two steps, which amplify float rounding.
    for key in ("val_loss", "val_accuracy"):
        assert mirrored[key] == pytest.approx(single[key], rel=1e-2, abs=1e-2), key
    # Each run's figures are its model's over the 65 real images: the padding neither counts nor dilutes the loss.
    for name in ("default", "mirrored"):
        logged, truth = result[name]["history"][0], result[name]["one_device"]
        assert truth["images"] == 65
        for key in ("val_loss", "val_accuracy"):
            assert logged[key] == pytest.approx(truth[key], rel=1e-4, abs=1e-6), (name, key)
    a = weights(tmp_path / "default" / "checkpoints" / "epoch_0001" / "model.weights.h5")
    b = weights(tmp_path / "mirrored" / "checkpoints" / "epoch_0001" / "model.weights.h5")
    assert a.keys() == b.keys() and len(a) > 100
    # Largest relative difference of any weight after two steps: measured ~2e-2 with TensorFlow's own
    # kernels and 6e-2 with oneDNN's (BatchNorm offsets, which are still ~1e-3 in size); with per-replica
    # BatchNorm statistics it is >1, and without gradient all-reduce the replicas would differ from the
    # single device by as much.
    worst = max(float(np.abs(a[k] - b[k]).max() / (np.abs(a[k]).max() + 1e-6)) for k in a)
    assert worst < 0.15, worst


BATCHNORM_REPLICAS = textwrap.dedent("""
    import json, sys
    from fer_keras import distribute
    distribute.configure_cpu_devices(2)  # before TensorFlow initialises
    import keras, numpy as np, tensorflow as tf
    from fer_keras.model import FusedBatchNormalization
    strategy = distribute.create_strategy("mirrored")
    with strategy.scope():
        model = keras.Sequential([keras.Input((4, 4, 3)), FusedBatchNormalization(momentum=0.5, name="bn"),
                                  keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])
        model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    # The first replica gets the first half of the batch (all 0), the second the rest (all 10).
    x = np.concatenate([np.zeros((4, 4, 4, 3)), np.full((4, 4, 4, 3), 10.0)]).astype("float32")
    model.fit(tf.data.Dataset.from_tensor_slices((x, np.zeros(8, "int64"))).batch(8), epochs=1, verbose=0)
    bn = model.get_layer("bn")
    model.save_weights(sys.argv[1])
    print("RESULT " + json.dumps({
        "replicas": strategy.num_replicas_in_sync,
        **{name: [np.asarray(v).tolist() for v in strategy.experimental_local_results(getattr(bn, name).value)]
           for name in ("moving_mean", "moving_variance")}}))
""")


def test_batchnorm_statistics_are_the_replicas_mean_on_every_replica_and_in_the_saved_weights(tmp_path):
    """Without --sync_batchnorm each replica normalises its own share of the batch, but the moving statistics
    (what validation and the export use) are averaged over the replicas at every step: Keras 3's own layer keeps
    one copy per replica and saves only the first's (here it would save mean 0, and the second replica 5)."""
    saved = tmp_path / "bn.weights.h5"
    proc = subprocess.run([sys.executable, "-c", BATCHNORM_REPLICAS, str(saved)], env=cli_env(tmp_path), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["replicas"] == 2
    # momentum 0.5: 0.5 * 0 + 0.5 * mean(0, 10) and 0.5 * 1 + 0.5 * mean(0, 0) (each replica's batch is constant).
    assert result["moving_mean"] == [[2.5] * 3] * 2 and result["moving_variance"] == [[0.5] * 3] * 2
    stored = weights(saved)
    means = [v for k, v in stored.items() if k.endswith("/vars/2")]  # gamma, beta, moving mean, moving variance
    assert [m.tolist() for m in means] == [[2.5] * 3], stored.keys()


LOSS_SCALE_OVERFLOW = textwrap.dedent("""
    import json
    from fer_keras import distribute
    distribute.configure_cpu_devices(2)  # before TensorFlow initialises
    import keras, numpy as np, tensorflow as tf
    from fer_keras.precision import ReplicaSafeLossScaleOptimizer
    keras.config.set_dtype_policy("mixed_float16")
    strategy = distribute.create_strategy("mirrored")
    # The first replica gets the first two rows, the second the last two; inputs of 3e3 overflow float16 gradients
    # at the initial loss scale (2 ** 15).
    small, big = np.full((2, 4), 1e-3, "float32"), np.full((2, 4), 3e3, "float32")
    y = np.tile(np.array([[1, 0]], "float32"), (4, 1))
    out = {}
    for case, rows in {"none": [small, small], "replica 0": [big, small], "replica 1": [small, big]}.items():
        data = tf.data.Dataset.from_tensors((np.concatenate(rows), y))
        keras.utils.set_random_seed(0)
        with strategy.scope():
            inputs = keras.Input((4,))
            model = keras.Model(inputs, keras.layers.Dense(2, dtype="float32")(keras.layers.Dense(4)(inputs)))
            model.compile(ReplicaSafeLossScaleOptimizer(keras.optimizers.SGD(0.01)), loss="mse")

        def finite(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(x) - y)) * 2.0 ** 15
            grads = tape.gradient(loss, model.trainable_variables)
            return tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])

        batch = next(iter(strategy.experimental_distribute_dataset(data)))
        flags = strategy.experimental_local_results(strategy.run(finite, args=batch))
        before = model.get_weights()
        model.fit(data, epochs=1, verbose=0)
        after = model.get_weights()
        out[case] = {
            "replicas finite": [bool(f) for f in flags],
            "finite": all(bool(np.isfinite(w).all()) for w in after),
            "stepped": any(not np.array_equal(a, b) for a, b in zip(after, before)),
            "scale": float(np.asarray(model.optimizer.dynamic_scale)),
        }
    print("RESULT " + json.dumps(out))
""")


def test_mixed_float16_skips_a_step_that_overflowed_on_any_replica(tmp_path):
    """Dynamic loss scaling skips a step whose scaled gradients overflowed and halves the scale. Keras 3.15's
    LossScaleOptimizer asks only the first replica: an overflow on the second reached every weight (measured in
    session 43 with this script and Keras' wrapper: non-finite weights, the scale unchanged). fer_keras's wrapper,
    which training uses for --precision=mixed_float16, skips it on every replica and leaves finite steps alone.
    The replicas' own gradients (computed before the step) show where each case overflows."""
    proc = subprocess.run([sys.executable, "-c", LOSS_SCALE_OVERFLOW], env=cli_env(tmp_path), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result == {
        "none": {"replicas finite": [True, True], "finite": True, "stepped": True, "scale": 2.0 ** 15},
        "replica 0": {"replicas finite": [False, True], "finite": True, "stepped": False, "scale": 2.0 ** 14},
        "replica 1": {"replicas finite": [True, False], "finite": True, "stepped": False, "scale": 2.0 ** 14},
    }


DROPOUT_REPLICAS = textwrap.dedent("""
    import json
    from fer_keras import distribute
    distribute.configure_cpu_devices(2)  # before TensorFlow initialises
    import keras, numpy as np, tensorflow as tf
    from fer_keras.model import ReplicaDropout, resnet18
    strategy = distribute.create_strategy("mirrored")
    with strategy.scope():
        layer = ReplicaDropout(0.5, name="dropout")
        layer.build((4, 64))

    def step(layer):
        out = tf.function(lambda: strategy.run(lambda: layer(tf.ones((4, 64)), training=True)))()
        return [np.asarray(m) != 0 for m in strategy.experimental_local_results(out)]

    ours = [step(layer) for _ in range(2)]
    keras.utils.set_random_seed(7)
    one, plain, x = ReplicaDropout(0.5, seed=3), keras.layers.Dropout(0.5, seed=3), tf.ones((8, 64))
    print("RESULT " + json.dumps({
        "replicas_differ": [bool((a != b).any()) for a, b in ours],
        "steps_differ": bool((ours[0][0] != ours[1][0]).any()),
        "kept": float(np.mean(ours)),
        "one_device_as_keras": all(bool(np.array_equal(one(x, training=True), plain(x, training=True)))
                                   for _ in range(3)),
        "model_uses_it": type(resnet18("imagenet", dropout=0.2).get_layer("dropout")).__name__,
    }))
""")


def test_dropout_draws_other_masks_on_every_replica(tmp_path):
    """Keras 3.15's Dropout copies one random state to every replica, so all drew the same masks (measured in session
    43); fer_keras's draws its own on each, new ones each step, and is Keras' own on one device."""
    proc = subprocess.run([sys.executable, "-c", DROPOUT_REPLICAS], env=cli_env(tmp_path), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["replicas_differ"] == [True, True] and result["steps_differ"]
    assert 0.4 < result["kept"] < 0.6  # 512 draws at rate 0.5
    assert result["one_device_as_keras"] and result["model_uses_it"] == "ReplicaDropout"


class Cluster:
    """Two-worker clusters on 127.0.0.1 inside a private network namespace: TensorFlow's gRPC server binds
    0.0.0.0 whatever TF_CONFIG says, so only a namespace of their own keeps the workers unreachable from other
    hosts. Every process it starts is killed at the end of the test; outputs go to files (no pipe to fill)."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen] = []
        self.logs: dict[int, tuple[Path, Path]] = {}
        self.started = 0
        problems = []
        # As root a network namespace alone; otherwise inside a user namespace of one's own (unprivileged).
        ways = ((["unshare", "-n"], ["-n"]), (["unshare", "-rn"], ["-U", "-n", "--preserve-credentials"]))
        for unshare, enter in ways:
            try:
                holder = subprocess.Popen([*unshare, "sh", "-c", "ip link set lo up && echo ready && exec sleep 3600"],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            except FileNotFoundError:
                pytest.skip("needs unshare (util-linux) for a private network namespace")
            self.procs.append(holder)
            if holder.stdout.readline().strip() == "ready":  # sh exits at once when it cannot: EOF, no hang
                self.netns = ["nsenter", "-t", str(holder.pid), *enter]
                return
            holder.wait(timeout=10)
            problems.append(f"{' '.join(unshare)}: {holder.stderr.read().strip()[:200]}")
        pytest.skip(f"cannot make a private network namespace ({'; '.join(problems)})")

    def start(self, model_dir: Path, extra: list[str], other_model_dir: Path | None = None) -> list[subprocess.Popen]:
        """Two training workers; ``other_model_dir`` gives worker 1 another folder (no shared file system)."""
        return self.start_commands(lambda index: [
            "-m", "fer_keras.train", "--flagfile=flags/smoke.cfg", "--strategy=multi_worker",
            f"--model_dir={other_model_dir if index and other_model_dir else model_dir}",
            f"--export_dir={self.tmp_path / 'exports'}", "--max_train_examples=128", "--export_tta=none", *extra,
        ])

    def start_commands(self, python_args) -> list[subprocess.Popen]:
        """Two workers running ``python *python_args(index)``. Fresh ports each time: the namespace has no other
        listeners."""
        base = 20000 + 2 * self.started
        self.started += 1
        cluster = {"worker": [f"127.0.0.1:{base + i}" for i in range(2)]}
        procs = []
        for index in range(2):
            env = cli_env(self.tmp_path)
            env["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            args = [*self.netns, sys.executable, *python_args(index)]
            out, err = (self.tmp_path / f"worker{self.started}_{index}.{kind}" for kind in ("out", "err"))
            with open(out, "w") as stdout, open(err, "w") as stderr:
                proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=stdout, stderr=stderr)
            self.procs.append(proc)
            self.logs[proc.pid] = (out, err)
            procs.append(proc)
        return procs

    def finish(self, proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
        """Waits (bounded) for ``proc``; its stdout and stderr."""
        proc.wait(timeout=timeout)
        return self.output(proc)

    def output(self, proc: subprocess.Popen) -> tuple[str, str]:
        out, err = self.logs[proc.pid]
        return out.read_text(), err.read_text()

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=60)


@pytest.fixture
def workers(tmp_path):
    cluster = Cluster(tmp_path)
    try:
        yield cluster
    finally:
        cluster.stop()


def assert_listening_only_inside(workers: Cluster, procs: list[subprocess.Popen], port: int) -> None:
    """Worker 0's port opens inside the cluster's namespace (bounded wait) and is closed on this host's own network,
    where the tests run."""
    deadline = time.monotonic() + 120
    listening = False
    while time.monotonic() < deadline and not listening and all(p.poll() is None for p in procs):
        probe = subprocess.run([*workers.netns, sys.executable, "-c",
                                "import socket; s = socket.socket(); s.settimeout(1); "
                                f"print(s.connect_ex(('127.0.0.1', {port})))"],
                               capture_output=True, text=True, timeout=30)
        listening = probe.stdout.strip() == "0"
        time.sleep(0.2)
    assert listening, "worker 0 never listened inside its namespace"
    with socket.socket() as outside:
        outside.settimeout(1)
        assert outside.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.slow
def test_multi_worker_two_processes_on_localhost_match_a_single_process(tmp_path, workers):
    """Two workers with a global batch of 32 take the steps one process takes with batch 32: each worker gets its
    half of every global batch, the gradients are all-reduced to the global mean (not summed) and BatchNorm is
    synchronised (so moving statistics agree across workers too, not just the weights). Without all-reduce the
    workers' halves would pull their weights apart, and a summed gradient would double every update. While they
    train, their ports are open inside the cluster's namespace only."""
    model_dir = tmp_path / "run"
    plain = ["--flip=false", "--shift=0", "--rotation=0", "--zoom=0", "--erasing=0", "--dropout=0", "--sync_batchnorm",
             "--epochs=1"]
    procs = workers.start(model_dir, plain)
    single_err = tmp_path / "single.err"
    with open(single_err, "w") as stderr:
        single = subprocess.Popen(
            [sys.executable, "-m", "fer_keras.train", "--flagfile=flags/smoke.cfg", "--max_train_examples=128",
             f"--model_dir={tmp_path / 'single'}", "--export=false", *plain], env=cli_env(tmp_path), cwd=REPO,
            stdout=subprocess.DEVNULL, stderr=stderr)
    workers.procs.append(single)
    assert_listening_only_inside(workers, procs, port=20000)
    assert single.wait(timeout=900) == 0, single_err.read_text()[-3000:]
    outputs = [workers.finish(p, timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "CollectiveAllReduceStrategy with 2 replica(s), global batch 32 (16 per replica)" in outputs[0][0]
    rows = (model_dir / "history.csv").read_text().splitlines()
    assert len(rows) == 2
    # Chief writes the shared outputs; the other worker keeps its own checkpoints, identical weights.
    assert (tmp_path / "exports" / "run" / "1" / "saved_model.pb").is_file()
    chief = weights(model_dir / "checkpoints" / "epoch_0001" / "model.weights.h5")
    other = weights(model_dir / "workers" / "worker_1" / "checkpoints" / "epoch_0001" / "model.weights.h5")
    assert chief.keys() == other.keys() and len(chief) > 100
    # TensorBoard shows the chief's curves; the other worker's copies showed up as further runs beside them.
    assert (model_dir / "logs" / "train").is_dir() and not (model_dir / "workers" / "worker_1" / "logs").exists()
    for k in chief:
        np.testing.assert_array_equal(chief[k], other[k], err_msg=k)
    # Against the single process: measured 0.027 after these four steps (float rounding differs between one batch
    # of 32 and two of 16); the single process at twice the learning rate, as a summed gradient would act,
    # differs by 1.9.
    alone = weights(tmp_path / "single" / "checkpoints" / "epoch_0001" / "model.weights.h5")
    assert alone.keys() == chief.keys()
    worst = max(float(np.abs(alone[k] - chief[k]).max() / (np.abs(alone[k]).max() + 1e-6)) for k in alone)
    assert worst < 0.15, worst


@pytest.mark.slow
def test_multi_worker_losing_a_worker_fails_clearly_and_both_resume(tmp_path, workers):
    import signal

    model_dir = tmp_path / "run"
    extra = ["--epochs=2", "--collective_timeout=20", "--export=false"]
    procs = workers.start(model_dir, extra)
    deadline = time.monotonic() + 600
    while not (model_dir / "checkpoints" / "epoch_0001").is_dir():
        assert all(p.poll() is None for p in procs), [workers.output(p)[1][-2000:] for p in procs]
        assert time.monotonic() < deadline, "no checkpoint within 600 s"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait(timeout=60)
    # Measured 1.6 s here (the dead peer's connection fails at once); --collective_timeout=20 is the backstop,
    # and the wait is bounded far below the 600 s default.
    out, err = workers.finish(procs[0], timeout=300)
    assert procs[0].returncode == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: multi-worker training lost a worker") and "rerun every worker" in last
    assert "Traceback" not in err

    procs = workers.start(model_dir, extra)
    outputs = [workers.finish(p, timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "resuming after epoch" in outputs[0][0]
    rows = (model_dir / "history.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]


@pytest.mark.slow
def test_workers_that_would_resume_after_different_epochs_are_refused(tmp_path, workers):
    """Worker 1 cannot see the chief's folder (no shared file system) nor has checkpoints of its own: it would
    start afresh beside a chief resuming after epoch 1. Both refuse, in one line, before training."""
    epoch = tmp_path / "run" / "checkpoints" / "epoch_0001"
    epoch.mkdir(parents=True)
    (epoch / "model.weights.h5").write_bytes(b"never read")
    (epoch / "state.json").write_text(json.dumps({"epoch": 1, "history": [], "best_epoch": 1,
                                                  "best_val_accuracy": 0.5}))
    procs = workers.start(tmp_path / "run", ["--export=false"], other_model_dir=tmp_path / "elsewhere")
    for p in procs:
        out, err = workers.finish(p, timeout=300)
        assert p.returncode == 2, err[-3000:]
        assert err.strip().splitlines() == [
            "error: the workers would resume after different epochs (1, 0, by replica; this one: "
            f"{1 if p is procs[0] else 0}): give every worker a --model_dir on a file system they all see, holding "
            "the run's checkpoints (a worker one epoch ahead after a kill: move its newest checkpoints/epoch_NNNN "
            "folder away)"], err[-3000:]
    assert not (tmp_path / "elsewhere").exists()


MULTI_WORKER_OVERFLOW = textwrap.dedent("""
    import json, os, sys
    from fer_keras import distribute
    strategy = distribute.create_strategy("multi_worker", collective_timeout=60)
    import keras, numpy as np, tensorflow as tf
    from fer_keras.precision import ReplicaSafeLossScaleOptimizer
    worker = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    keras.config.set_dtype_policy("mixed_float16")
    keras.utils.set_random_seed(0)
    with strategy.scope():
        inputs = keras.Input((4,))
        model = keras.Model(inputs, keras.layers.Dense(2, dtype="float32")(keras.layers.Dense(4)(inputs)))
        model.compile(ReplicaSafeLossScaleOptimizer(keras.optimizers.SGD(0.01)), loss="mse")
    before = model.get_weights()
    # Worker 1's inputs overflow float16 gradients at the initial loss scale; worker 0's do not.
    x = np.full((4, 4), 3e3 if worker == 1 else 1e-3, "float32")
    model.fit(tf.data.Dataset.from_tensors((x, np.tile(np.array([[1, 0]], "float32"), (4, 1)))), epochs=1, verbose=0)
    after = model.get_weights()
    print("RESULT " + json.dumps({
        "stepped": any(not np.array_equal(a, b) for a, b in zip(after, before)),
        "finite": all(bool(np.isfinite(w).all()) for w in after),
        "scale": float(np.asarray(model.optimizer.dynamic_scale)),
    }))
""")


@pytest.mark.slow
def test_mixed_float16_workers_agree_to_skip_a_step_that_overflowed_on_one(tmp_path, workers):
    """With Keras 3.15's own LossScaleOptimizer the worker whose gradients overflowed skips the step while the other
    waits for it in the gradient all-reduce until the collective timeout (measured: both failed after 31 s at a
    30-second timeout). fer_keras's wrapper sums the workers' overflow flags first, so both skip it."""
    procs = workers.start_commands(lambda index: ["-c", MULTI_WORKER_OVERFLOW])
    outputs = [workers.finish(p, timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
        assert json.loads(out.split("RESULT ", 1)[1]) == {"stepped": False, "finite": True, "scale": 2.0 ** 14}


@pytest.mark.parametrize("cluster, task, expected", [
    ({"worker": ["a:1", "b:1"]}, ("worker", 0), True),
    ({"worker": ["a:1", "b:1"]}, ("worker", 1), False),
    ({"chief": ["c:1"], "worker": ["a:1"]}, ("chief", 0), True),
    ({"chief": ["c:1"], "worker": ["a:1"]}, ("worker", 0), False),  # worker 0 is not chief beside a chief
    ({}, (None, None), True),
])
def test_the_chief_follows_tensorflows_rule(cluster, task, expected):
    from fer_keras.distribute import chief_task

    assert chief_task(cluster, *task) is expected


WORKERS = {"worker": ["127.0.0.1:12345", "127.0.0.1:12346"]}


@pytest.mark.parametrize("tf_config, message", [
    ("", "needs TF_CONFIG"),
    ("{", "not valid JSON"),
    # TensorFlow made these a strategy of the process alone, the chief: every worker trained its own run.
    ("{}", "names no cluster of workers"),
    ("[]", "names no cluster of workers"),
    (json.dumps({"clusters": WORKERS, "task": {"type": "worker", "index": 0}}), "names no cluster of workers"),
    (json.dumps({"cluster": {"worker": []}, "task": {"type": "worker", "index": 0}}), "names no cluster of workers"),
    # TensorFlow raised these as ValueError tracebacks.
    (json.dumps({"cluster": WORKERS}), r"task None is not one of its cluster's \(2 worker\)"),
    *[(json.dumps({"cluster": WORKERS, "task": task}), "task .* is not one of its cluster's") for task in (
        {"type": "worker", "index": 2}, {"type": "worker", "index": -1}, {"type": "worker", "index": "0"},
        {"type": "evaluator", "index": 0})],
    (json.dumps({"cluster": {"chief": ["c:1"], **WORKERS}, "task": {"type": "chief", "index": 1}}),
     r"is not one of its cluster's \(1 chief, 2 worker\)"),
])
def test_a_tf_config_that_places_no_worker_in_a_cluster_is_refused_in_one_line(monkeypatch, tf_config, message):
    from fer_keras import distribute
    from fer_keras.errors import ConfigError

    monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(ConfigError, match=message):
        distribute.create_strategy("multi_worker")


def test_a_tpu_strategy_without_a_tpu_is_refused_in_one_line(monkeypatch):
    """--strategy=tpu where no TPU is named (no --tpu_address, no TPU_NAME) ended in TensorFlow's ValueError
    traceback. (The rest of the TPU path is written to the TF documentation and untested: there is no TPU here.)"""
    from fer_keras import distribute
    from fer_keras.errors import ConfigError

    monkeypatch.delenv("TPU_NAME", raising=False)
    with pytest.raises(ConfigError, match=r"^--strategy=tpu: no --tpu_address \(nor TPU_NAME\): [^\n]+$"):
        distribute.create_strategy("tpu", tpu_address="")


@pytest.mark.parametrize("cluster, task", [
    (WORKERS, {"type": "worker", "index": 1}),
    ({"chief": ["c:1"], **WORKERS}, {"type": "chief", "index": 0}),
    ({"chief": ["c:1"], **WORKERS}, {"type": "worker", "index": 1}),
    ({"worker": ["127.0.0.1:12345"]}, {"type": "worker", "index": 0}),
])
def test_a_tf_config_that_places_this_worker_in_its_cluster_is_accepted(cluster, task):
    from fer_keras.distribute import check_tf_config

    check_tf_config(json.dumps({"cluster": cluster, "task": task}))
