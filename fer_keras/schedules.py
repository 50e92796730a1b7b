"""Learning-rate schedules Keras does not ship.

``OneCycle`` is PyTorch's ``torch.optim.lr_scheduler.OneCycleLR`` (two phases, cosine annealing), the
schedule of the recipes fer_keras re-creates, so that a recipe measured in PyTorch can be rerun here as it
was. Only the learning rate cycles: Keras' SGD takes momentum as a constant, so PyTorch's default momentum
cycle (0.95 -> 0.85 -> 0.95) is not reproduced.
"""

from __future__ import annotations

import math

import keras
from keras import ops


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
        if total_steps < 1:
            raise ValueError(f"OneCycle needs total_steps >= 1, got {total_steps}")
        if not 0 <= warmup_steps < total_steps:
            raise ValueError(f"OneCycle needs 0 <= warmup_steps < total_steps, got {warmup_steps} of {total_steps}")
        self.max_learning_rate = float(max_learning_rate)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.div_factor = float(div_factor)
        self.final_div_factor = float(final_div_factor)
        self.name = name

    def __call__(self, step):
        peak = self.max_learning_rate
        start = peak / self.div_factor
        end = start / self.final_div_factor
        # PyTorch's phase boundaries: the peak is reached at step pct_start * total - 1.
        up_end = float(self.warmup_steps) - 1.0
        down_end = float(self.total_steps) - 1.0
        step = ops.minimum(ops.cast(step, "float32"), down_end)

        def cosine(first: float, last: float, fraction):
            return last + (first - last) / 2.0 * (ops.cos(math.pi * fraction) + 1.0)

        rising = cosine(start, peak, step / max(up_end, 1.0))
        falling = cosine(peak, end, (step - max(up_end, 0.0)) / max(down_end - max(up_end, 0.0), 1.0))
        return ops.where(step <= up_end, rising, falling)

    def get_config(self) -> dict:
        return {
            "max_learning_rate": self.max_learning_rate,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "div_factor": self.div_factor,
            "final_div_factor": self.final_div_factor,
            "name": self.name,
        }
