"""Learning-rate schedule and weight decay: what the recipes mean, checked against PyTorch's definitions."""

from __future__ import annotations

import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import REPO, cli_env

from fer_keras import train
from fer_keras.errors import ConfigError
from fer_keras.schedules import OneCycle


def lrs(schedule, steps) -> np.ndarray:
    return np.asarray(schedule(np.asarray(list(steps), np.float32)))


def test_onecycle_has_pytorchs_shape():
    peak, total, warm = 0.1, 200, 60
    lr = lrs(OneCycle(peak, total, warm), range(total + 5))
    start, end = peak / 25, peak / 25 / 1e4
    np.testing.assert_allclose(lr[[0, warm - 1, total - 1]], [start, peak, end], rtol=1e-5)
    # Cosine halves: the midpoint of each phase is the mean of its ends.
    np.testing.assert_allclose(float(OneCycle(peak, total, warm)((warm - 1) / 2)), (start + peak) / 2, rtol=1e-5)
    mid = (warm - 1 + total - 1) / 2
    np.testing.assert_allclose(float(OneCycle(peak, total, warm)(mid)), (peak + end) / 2, rtol=1e-5)
    assert np.all(np.diff(lr[:warm]) > 0) and np.all(np.diff(lr[warm - 1:total]) < 0)
    np.testing.assert_allclose(lr[total:], end, rtol=1e-5)  # held after the last step
    np.testing.assert_allclose(lrs(OneCycle(peak, 10, 0), [0]), [peak], rtol=1e-6)  # no ramp: starts at the peak


def test_onecycle_equals_torch_onecyclelr_step_for_step():
    torch = pytest.importorskip("torch")
    for total, pct in [(13440, 0.3), (100, 0.3), (57, 0.25)]:
        warm = int(pct * total)
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([param], lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total, pct_start=warm / total)
        ref = []
        for _ in range(total):
            ref.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        ours = lrs(OneCycle(0.1, total, warm), range(total))
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7, err_msg=f"total={total}")  # float32 steps


def test_onecycle_round_trips_through_keras_serialisation(tmp_path):
    schedule = OneCycle(0.1, 1000, 300, div_factor=10.0, final_div_factor=100.0)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert isinstance(again, OneCycle) and again.get_config() == schedule.get_config()
    # A compiled model saved with it (as best.keras is) loads with its optimizer.
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.compile(keras.optimizers.SGD(schedule), loss="mse")
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.optimizer._learning_rate, OneCycle)
    # A fresh process that imports only fer_keras.model (as for BasicBlock) can load it compiled too.
    script = ("import sys, keras, fer_keras.model\n"
              "m = keras.models.load_model(sys.argv[1])\n"
              "print(type(m.optimizer._learning_rate).__name__)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "m.keras")], cwd=REPO,
                          env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "OneCycle", proc.stderr[-2000:]


def config(**kw) -> train.TrainConfig:
    return train.TrainConfig(**{"epochs": 10, "learning_rate": 0.1, "momentum": 0.9, **kw})


def test_build_optimizer_runs_onecycle_over_the_whole_run():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    opt = train.build_optimizer(config(schedule="onecycle", warmup_epochs=3), steps_per_epoch=20, model=model)
    schedule = opt._learning_rate
    assert isinstance(schedule, OneCycle)
    assert (schedule.total_steps, schedule.warmup_steps, schedule.max_learning_rate) == (200, 60, 0.1)
    with pytest.raises(ConfigError, match="onecycle needs warmup_epochs < epochs"):
        config(schedule="onecycle", warmup_epochs=10).validate()


def torch_sgd_coupled_decay(w: np.ndarray, lr: float, wd: float, momentum: float, steps: int) -> np.ndarray:
    """PyTorch's SGD(nesterov=True, weight_decay=wd) with a zero loss gradient: the decay term is the gradient."""
    buf = None
    for _ in range(steps):
        g = wd * w
        buf = g.copy() if buf is None else momentum * buf + g
        w = w - lr * (g + momentum * buf)
    return w


def test_weight_decay_5e_3_here_is_pytorchs_5e_4_at_momentum_0_9():
    """The flag help's claim: Keras' decoupled decay is not amplified by momentum, PyTorch's coupled one is."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="dense")])
    kernel, bias = model.get_layer("dense").kernel, model.get_layer("dense").bias
    kernel.assign(np.ones((4, 3), np.float32))
    bias.assign(np.ones(3, np.float32))
    opt = train.build_optimizer(config(schedule="constant", weight_decay=5e-3), steps_per_epoch=1, model=model)
    zeros = [keras.ops.zeros_like(v) for v in (kernel, bias)]
    steps = 500
    for _ in range(steps):
        opt.apply_gradients(zip(zeros, [kernel, bias]))
    ours = float(np.asarray(kernel)[0, 0])
    torch_like = torch_sgd_coupled_decay(np.ones(1), lr=0.1, wd=5e-4, momentum=0.9, steps=steps)[0]
    assert ours == pytest.approx((1 - 0.1 * 5e-3) ** steps, rel=1e-4)  # decoupled: w *= 1 - lr*wd per step
    assert ours == pytest.approx(torch_like, rel=0.01), (ours, torch_like)  # ~0.78 both: 10x stronger than 5e-4
    assert (1 - 0.1 * 5e-4) ** steps > 0.97 > torch_like + 0.15  # the same number here would decay far less
    np.testing.assert_array_equal(np.asarray(bias), 1.0)  # 1-D variables are not decayed
