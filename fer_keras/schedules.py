"""Schedules Keras does not ship.

``OneCycle`` is PyTorch's ``torch.optim.lr_scheduler.OneCycleLR`` (two phases, cosine annealing), the
schedule of the recipes fer_keras re-creates, so that a recipe measured in PyTorch can be rerun here as it
was. OneCycleLR also cycles momentum (by default 0.95 -> 0.85 -> 0.95, against the learning rate); Keras' SGD
takes momentum as a constant, so ``OneCycleMomentum`` is that cycle and ``ScheduledMomentumSGD`` the SGD that
follows it (``--cycle_momentum``; the recipes keep momentum constant, as they were measured).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import keras
from keras import ops


def _one_cycle(step: Any, start: float, peak: float, end: float, warmup_steps: int, total_steps: int) -> Any:
    """OneCycleLR's two cosine phases: ``start`` -> ``peak`` over the warm-up, ``peak`` -> ``end`` at step
    ``total_steps - 1`` (held after that)."""
    # PyTorch's phase boundaries: the peak is reached at step pct_start * total - 1.
    up_end = float(warmup_steps) - 1.0
    down_end = float(total_steps) - 1.0
    step = ops.minimum(ops.cast(step, "float32"), down_end)

    def cosine(first: float, last: float, fraction):
        return last + (first - last) / 2.0 * (ops.cos(math.pi * fraction) + 1.0)

    rising = cosine(start, peak, step / max(up_end, 1.0))
    falling = cosine(peak, end, (step - max(up_end, 0.0)) / max(down_end - max(up_end, 0.0), 1.0))
    return ops.where(step <= up_end, rising, falling)


def _check_steps(total_steps: int, warmup_steps: int, what: str) -> None:
    if total_steps < 1:
        raise ValueError(f"{what} needs total_steps >= 1, got {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"{what} needs 0 <= warmup_steps < total_steps, got {warmup_steps} of {total_steps}")


@keras.saving.register_keras_serializable(package="fer_keras")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """Cosine ramp from ``max_learning_rate / div_factor`` to the peak over ``warmup_steps``, then cosine
    decay to ``peak / div_factor / final_div_factor`` at ``total_steps - 1`` (held after that).

    With ``warmup_steps = pct_start * total_steps`` it equals ``OneCycleLR(max_lr, total_steps=total_steps,
    pct_start=pct_start, div_factor, final_div_factor)`` step for step.
    """

    def __init__(self, max_learning_rate: float, total_steps: int, warmup_steps: int, div_factor: float = 25.0,
                 final_div_factor: float = 1e4, name: str = "one_cycle") -> None:
        super().__init__()
        _check_steps(total_steps, warmup_steps, "OneCycle")
        self.max_learning_rate = float(max_learning_rate)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.div_factor = float(div_factor)
        self.final_div_factor = float(final_div_factor)
        self.name = name

    def __call__(self, step):
        start = self.max_learning_rate / self.div_factor
        return _one_cycle(step, start, self.max_learning_rate, start / self.final_div_factor, self.warmup_steps,
                          self.total_steps)

    def get_config(self) -> dict:
        return {
            "max_learning_rate": self.max_learning_rate,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "div_factor": self.div_factor,
            "final_div_factor": self.final_div_factor,
            "name": self.name,
        }


@keras.saving.register_keras_serializable(package="fer_keras")
class OneCycleMomentum(keras.optimizers.schedules.LearningRateSchedule):
    """OneCycleLR's momentum: cosine from ``max_momentum`` down to ``base_momentum`` while the learning rate of
    :class:`OneCycle` (same ``total_steps`` and ``warmup_steps``) rises, and back up while it falls - less
    momentum while the steps are large.

    Equals ``OneCycleLR(..., cycle_momentum=True, base_momentum, max_momentum)``'s momentum step for step.
    """

    def __init__(self, total_steps: int, warmup_steps: int, base_momentum: float = 0.85,
                 max_momentum: float = 0.95, name: str = "one_cycle_momentum") -> None:
        super().__init__()
        _check_steps(total_steps, warmup_steps, "OneCycleMomentum")
        if not 0 < base_momentum <= max_momentum < 1:
            raise ValueError(f"OneCycleMomentum needs 0 < base_momentum <= max_momentum < 1, got {base_momentum} "
                             f"and {max_momentum}")
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.base_momentum = float(base_momentum)
        self.max_momentum = float(max_momentum)
        self.name = name

    def __call__(self, step: Any) -> Any:
        return _one_cycle(step, self.max_momentum, self.base_momentum, self.max_momentum, self.warmup_steps,
                          self.total_steps)

    def get_config(self) -> dict:
        return {
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "base_momentum": self.base_momentum,
            "max_momentum": self.max_momentum,
            "name": self.name,
        }


@keras.saving.register_keras_serializable(package="fer_keras")
class ScheduledMomentumSGD(keras.optimizers.SGD):
    """Keras' SGD with its momentum read from ``momentum_schedule`` at each step (as PyTorch's OneCycleLR sets
    it) instead of a constant. Its variables are SGD's (momentum buffers, iterations), so checkpoints of either
    restore into the other. The update stays Keras' (``m = mu m - lr g``), which matches PyTorch's
    (``buf = mu buf + g``, step ``lr (g + mu buf)``) only while the learning rate is constant.

    ``self.momentum`` is the first step's value (SGD needs a float); the schedule gives every step's.
    """

    def __init__(self, learning_rate: float | keras.optimizers.schedules.LearningRateSchedule = 0.01,
                 momentum_schedule: Callable | dict | None = None, nesterov: bool = False, name: str | None = None,
                 **kwargs) -> None:
        if isinstance(momentum_schedule, dict):
            momentum_schedule = keras.saving.deserialize_keras_object(momentum_schedule)
        if not callable(momentum_schedule):
            raise ValueError(f"ScheduledMomentumSGD needs a momentum_schedule of the step, got {momentum_schedule!r}")
        first = float(ops.convert_to_numpy(momentum_schedule(0)))
        if not 0 < first < 1:
            raise ValueError(f"ScheduledMomentumSGD's momentum must start in (0, 1), got {first}")
        super().__init__(learning_rate=learning_rate, momentum=first, nesterov=nesterov, name=name, **kwargs)
        self.momentum_schedule = momentum_schedule

    def update_step(self, gradient, variable, learning_rate) -> None:
        """SGD's update with this step's momentum (``self.iterations`` counts the steps already applied, as
        for the learning rate)."""
        momentum = ops.cast(self.momentum_schedule(self.iterations), variable.dtype)
        learning_rate = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        m = self.momentums[self._get_variable_index(variable)]
        self.assign(m, ops.subtract(ops.multiply(m, momentum), ops.multiply(gradient, learning_rate)))
        if self.nesterov:
            self.assign_add(variable, ops.subtract(ops.multiply(m, momentum), ops.multiply(gradient, learning_rate)))
        else:
            self.assign_add(variable, m)

    def get_config(self) -> dict:
        config = super().get_config()
        config["momentum_schedule"] = keras.saving.serialize_keras_object(self.momentum_schedule)
        return config

    @classmethod
    def from_config(cls, config: dict, custom_objects: dict | None = None) -> ScheduledMomentumSGD:
        config = dict(config)
        config.pop("momentum", None)  # SGD's record of the first step's value; the schedule is the setting
        return super().from_config(config, custom_objects=custom_objects)


def current_momentum(optimizer: keras.Optimizer) -> float | None:
    """The momentum of ``optimizer``'s next step, read as Keras reads the learning rate it logs (the schedule at
    ``iterations``): the cycle's value for :class:`ScheduledMomentumSGD`, the constant for SGD, None for
    optimizers without momentum (AdamW's ``beta_1`` is a moment decay, not SGD's momentum). A loss-scale wrapper
    (``mixed_float16``) is looked through."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    if isinstance(optimizer, ScheduledMomentumSGD):
        return float(ops.convert_to_numpy(optimizer.momentum_schedule(optimizer.iterations)))
    if isinstance(optimizer, keras.optimizers.SGD):
        return float(optimizer.momentum)
    return None
