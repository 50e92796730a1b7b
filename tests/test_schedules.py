"""Learning-rate schedule and weight decay: what the recipes mean, checked against PyTorch's definitions."""

from __future__ import annotations

import logging
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import REPO, cli_env

from fer_keras import train
from fer_keras.errors import ConfigError
from fer_keras.schedules import OneCycle, OneCycleMomentum, ScheduledMomentumSGD


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


def test_cosine_rises_linearly_from_a_tenth_of_the_peak_and_reaches_zero_at_the_runs_end():
    """The default schedule (flag help: linear warm-up from lr/10, cosine to 0): 10 epochs of 20 steps, 2 of warm-up."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    warm = train.build_optimizer(config(schedule="cosine", warmup_epochs=2), steps_per_epoch=20, model=model)
    rates = [float(warm._learning_rate(step)) for step in (0, 20, 40, 120, 200)]  # CosineDecay takes one step
    np.testing.assert_allclose(rates, [0.01, 0.055, 0.1, 0.05, 0.0], atol=1e-7)
    cold = train.build_optimizer(config(schedule="cosine", warmup_epochs=0), steps_per_epoch=20, model=model)
    np.testing.assert_allclose([float(cold._learning_rate(step)) for step in (0, 100, 200)], [0.1, 0.05, 0.0],
                               atol=1e-7)


def test_a_cosine_run_that_is_all_warm_up_says_so(caplog):
    """Cosine with warmup_epochs >= epochs rises for the whole run and never decays: allowed, so that the default
    warm-up works for a 1-epoch try, but said (onecycle, only ever chosen on purpose, refuses it)."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with caplog.at_level(logging.WARNING):
        train.build_optimizer(config(epochs=1, warmup_epochs=2), steps_per_epoch=20, model=model)
    assert ("--warmup_epochs=2 covers all 1 epoch(s): the learning rate rises for the whole run and does not decay; "
            "lower --warmup_epochs (e.g. to 0) for a short run") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train.build_optimizer(config(epochs=3, warmup_epochs=2), steps_per_epoch=20, model=model)
    assert "covers all" not in caplog.text


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


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("decay_all", [False, True])
def test_decay_norm_and_bias_extends_decay_to_batchnorm_and_biases(optimizer, decay_all):
    """PyTorch's SGD weight_decay covers every parameter; ours spares 1-D ones unless --decay_norm_and_bias."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="dense"),
                              keras.layers.BatchNormalization(name="bn")])
    variables = model.trainable_variables  # kernel, bias, gamma, beta
    for v in variables:
        v.assign(np.ones(v.shape, np.float32))
    opt = train.build_optimizer(config(optimizer=optimizer, schedule="constant", learning_rate=0.01,
                                       weight_decay=0.1, decay_norm_and_bias=decay_all), steps_per_epoch=1, model=model)
    for _ in range(10):
        opt.apply_gradients(zip([keras.ops.zeros_like(v) for v in variables], variables))
    decayed = (1 - 0.01 * 0.1) ** 10
    kernel, *one_d = [float(np.asarray(v).ravel()[0]) for v in variables]
    assert kernel == pytest.approx(decayed, rel=1e-5)
    np.testing.assert_allclose(one_d, decayed if decay_all else 1.0, rtol=1e-5)


# --- Momentum cycling (--cycle_momentum) ----------------------------------------------------------------------


def test_onecycle_momentum_mirrors_the_learning_rate():
    total, warm = 200, 60
    momentum = lrs(OneCycleMomentum(total, warm, base_momentum=0.85, max_momentum=0.95), range(total + 3))
    np.testing.assert_allclose(momentum[[0, warm - 1, total - 1]], [0.95, 0.85, 0.95], rtol=1e-6)
    assert np.all(np.diff(momentum[:warm]) < 0) and np.all(np.diff(momentum[warm - 1:total]) > 0)
    np.testing.assert_allclose(momentum[total:], 0.95, rtol=1e-6)
    with pytest.raises(ValueError, match="base_momentum <= max_momentum"):
        OneCycleMomentum(total, warm, base_momentum=0.96, max_momentum=0.95)


def test_onecycle_momentum_equals_torch_onecyclelr_step_for_step():
    torch = pytest.importorskip("torch")
    for total, pct, base, peak in [(13440, 0.3, 0.85, 0.95), (100, 0.3, 0.8, 0.9), (57, 0.25, 0.85, 0.95)]:
        warm = int(pct * total)
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([param], lr=0.1, momentum=0.9, nesterov=True)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total, pct_start=warm / total,
                                                    base_momentum=base, max_momentum=peak)
        ref = []
        for _ in range(total):
            ref.append(opt.param_groups[0]["momentum"])
            opt.step()
            sched.step()
        ours = lrs(OneCycleMomentum(total, warm, base_momentum=base, max_momentum=peak), range(total))
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7, err_msg=f"total={total}")


def sgd_trajectory(optimizer, gradients: np.ndarray) -> np.ndarray:
    w = keras.Variable(np.zeros(gradients.shape[1], np.float32))
    out = []
    for g in gradients:
        optimizer.apply_gradients([(keras.ops.convert_to_tensor(g), w)])
        out.append(np.asarray(w))
    return np.asarray(out)


def test_scheduled_momentum_sgd_uses_each_steps_momentum():
    """Keras' Nesterov update m = mu_t m - lr g, w += mu_t m - lr g, with mu_t the schedule at the step applied;
    a schedule that stays at 0.9 gives plain SGD(momentum=0.9) exactly."""
    gradients = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    schedule = OneCycleMomentum(30, 9, base_momentum=0.5, max_momentum=0.95)
    ours = sgd_trajectory(ScheduledMomentumSGD(0.1, schedule, nesterov=True), gradients)
    m = np.zeros(4)
    w = np.zeros(4)
    expected = []
    for step, g in enumerate(gradients):
        mu = float(schedule(step))
        m = mu * m - 0.1 * g
        w = w + mu * m - 0.1 * g
        expected.append(w.copy())
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
    flat = OneCycleMomentum(30, 9, base_momentum=0.9, max_momentum=0.9)
    np.testing.assert_array_equal(sgd_trajectory(ScheduledMomentumSGD(0.1, flat, nesterov=True), gradients),
                                  sgd_trajectory(keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True), gradients))


def test_scheduled_momentum_sgd_round_trips_with_a_saved_model(tmp_path):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    schedule = OneCycleMomentum(100, 30)
    model.compile(ScheduledMomentumSGD(OneCycle(0.1, 100, 30), schedule, nesterov=True), loss="mse")
    model.fit(np.ones((8, 3)), np.zeros((8, 2)), epochs=1, batch_size=4, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.optimizer, ScheduledMomentumSGD) and loaded.optimizer.nesterov
    assert loaded.optimizer.momentum_schedule.get_config() == schedule.get_config()
    assert int(loaded.optimizer.iterations) == 2


def test_build_optimizer_cycles_momentum_only_when_asked():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    opt = train.build_optimizer(config(schedule="onecycle", warmup_epochs=3, cycle_momentum=True, momentum=0.95),
                                steps_per_epoch=20, model=model)
    assert isinstance(opt, ScheduledMomentumSGD)
    cycle = opt.momentum_schedule.get_config()
    assert (cycle["total_steps"], cycle["warmup_steps"], cycle["base_momentum"], cycle["max_momentum"]) == \
        (200, 60, 0.85, 0.95)
    assert (opt._learning_rate.total_steps, opt._learning_rate.warmup_steps) == (200, 60)  # one cycle for both
    plain = train.build_optimizer(config(schedule="onecycle", warmup_epochs=3), steps_per_epoch=20, model=model)
    assert type(plain) is keras.optimizers.SGD and plain.momentum == 0.9
    for bad, message in [({"schedule": "cosine"}, "cycle_momentum needs schedule=onecycle and optimizer=sgd"),
                         ({"optimizer": "adamw"}, "cycle_momentum needs schedule=onecycle and optimizer=sgd"),
                         ({"base_momentum": 0.95}, "needs 0 < base_momentum <= momentum, got 0.95 and 0.9")]:
        with pytest.raises(ConfigError, match=message):
            config(**{"schedule": "onecycle", "warmup_epochs": 3, "cycle_momentum": True, **bad}).validate()


def test_build_optimizer_validates_a_hand_built_config():
    """A TrainConfig built in code skips the flag validators; build_optimizer must not guess what it meant."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    for bad, message in [({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'"),
                         ({"schedule": "linear"}, "unknown schedule 'linear'"),
                         ({"momentum": 1.0}, r"momentum must be in \[0, 1\)")]:
        with pytest.raises(ConfigError, match=message):
            train.build_optimizer(config(**bad), steps_per_epoch=20, model=model)
    with pytest.raises(ConfigError, match="steps_per_epoch must be >= 1, got 0"):
        train.build_optimizer(config(), steps_per_epoch=0, model=model)


def test_step_schedule_drops_at_the_first_step_of_the_epoch_as_multisteplr():
    """torch's MultiStepLR(milestones=[2]) stepped per epoch trains epoch 3 (steps 10-14 at 5 a epoch) at the new
    rate; Keras' PiecewiseConstantDecay keeps the old one while step <= boundary."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    opt = train.build_optimizer(config(schedule="step", step_epochs=(2,), step_gamma=0.1, epochs=4),
                                steps_per_epoch=5, model=model)
    rates = [float(opt._learning_rate(step)) for step in range(20)]
    assert rates == pytest.approx([0.1] * 10 + [0.01] * 10)


def test_current_momentum_reads_through_the_loss_scale_wrapper():
    """mixed_float16 wraps the optimizer in a LossScaleOptimizer, which is neither SGD nor its subclass."""
    from fer_keras.schedules import current_momentum

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    cycled = train.build_optimizer(config(schedule="onecycle", warmup_epochs=3, cycle_momentum=True, momentum=0.95),
                                   steps_per_epoch=20, model=model)
    for optimizer, expected in [(cycled, 0.95), (keras.optimizers.SGD(0.1, momentum=0.9), 0.9)]:
        assert current_momentum(optimizer) == pytest.approx(expected)
        assert current_momentum(keras.optimizers.LossScaleOptimizer(optimizer)) == pytest.approx(expected)
    assert current_momentum(keras.optimizers.AdamW(0.1)) is None
