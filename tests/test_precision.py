"""fer_keras.precision: the loss-scale wrapper training uses for mixed_float16 (its behaviour across replicas and
workers is in tests/test_distribute.py)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import cli_env, run_tool

from fer_keras import train
from fer_keras.precision import ReplicaSafeLossScaleOptimizer, for_precision


def _model() -> keras.Model:
    inputs = keras.Input((3,))
    return keras.Model(inputs, keras.layers.Dense(2, dtype="float32")(keras.layers.Dense(4)(inputs)))


@pytest.mark.parametrize("precision, wrapped", [("mixed_float16", True), ("mixed_bfloat16", False),
                                                ("float32", False)])
def test_build_optimizer_wraps_only_for_mixed_float16(precision, wrapped):
    """bfloat16 has float32's exponent range and needs no loss scaling; float16 does, and gets fer_keras's wrapper
    (Keras would otherwise put in its own, which fails across replicas)."""
    config = train.TrainConfig(precision=precision, epochs=2, warmup_epochs=0)
    optimizer = train.build_optimizer(config, steps_per_epoch=3, model=_model())
    assert isinstance(optimizer, ReplicaSafeLossScaleOptimizer) is wrapped
    inner = optimizer.inner_optimizer if wrapped else optimizer
    assert isinstance(inner, keras.optimizers.SGD) and inner.nesterov
    assert for_precision(optimizer, precision) is optimizer  # never wrapped twice


def test_a_mixed_float16_model_keeps_the_wrapper_through_saving_and_skips_an_overflow(tmp_path):
    """The wrapper is serialisable (a compiled best.keras records its optimizer), and on one device it is Keras'
    own: an overflowing step is skipped and halves the scale, a finite one is taken."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = _model()
        model.compile(ReplicaSafeLossScaleOptimizer(keras.optimizers.SGD(0.01)), loss="mse")
        y = np.tile(np.array([[1, 0]], "float32"), (4, 1))
        before = model.get_weights()
        model.fit(np.full((4, 3), 3e3, "float32"), y, epochs=1, verbose=0)
        assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), before))
        assert float(model.optimizer.dynamic_scale) == 2.0 ** 14
        model.fit(np.full((4, 3), 1e-3, "float32"), y, epochs=1, verbose=0)
        assert not all(np.array_equal(a, b) for a, b in zip(model.get_weights(), before))
        model.save(tmp_path / "m.keras")
        loaded = keras.models.load_model(tmp_path / "m.keras")
        assert isinstance(loaded.optimizer, ReplicaSafeLossScaleOptimizer)
        assert float(loaded.optimizer.dynamic_scale) == 2.0 ** 14
    finally:
        keras.config.set_dtype_policy(previous)


@pytest.mark.slow
def test_training_in_mixed_float16_on_two_replicas_runs_and_records_the_loss_scale(tmp_path):
    """The GPU setting's whole path, on logical CPUs: two MirroredStrategy replicas train in float16 with the
    wrapper, and the checkpoint holds its loss scale (so a resumed run goes on with it)."""
    import h5py

    # One step of 8 images a replica: float16 arithmetic is emulated on CPUs, at ~15-30 s a step here.
    proc = run_tool("train", "--flagfile=flags/smoke.cfg", "--strategy=mirrored", "--precision=mixed_float16",
                    "--epochs=1", "--batch_size=16", "--max_train_examples=16", "--max_val_examples=16",
                    "--export=false", f"--model_dir={tmp_path / 'run'}", env=cli_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MirroredStrategy with 2 replica(s)" in proc.stdout and "precision=mixed_float16" in proc.stdout
    rows = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert len(rows) == 2
    header = rows[0].split(",")
    assert all(np.isfinite(float(r.split(",")[header.index("loss")])) for r in rows[1:])
    with h5py.File(tmp_path / "run" / "checkpoints" / "epoch_0001" / "model.weights.h5") as f:
        # The wrapper's own state, in Keras' order (iterations, learning rate, step counter, scale), then SGD's.
        assert "inner_optimizer" in f["optimizer"]
        scale = float(f["optimizer/vars/3"][()])
    assert scale in [2.0 ** k for k in range(16)], scale
