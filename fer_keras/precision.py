"""Dynamic loss scaling for ``--precision=mixed_float16`` that stays correct with several replicas.

Keras 3.15 wraps an optimizer in :class:`keras.optimizers.LossScaleOptimizer` when the dtype policy is
``mixed_float16``. Under a ``tf.distribute`` strategy its ``_tf_apply`` decides whether a step's gradients are
finite from the first local replica alone, assuming the gradients are already all-reduced; in Keras 3 they are
not (the wrapped optimizer sums them later). Dynamic loss scaling overflows on purpose (the scale doubles every
2,000 finite steps until it does), so the first overflow on any other replica is applied: with MirroredStrategy
the inf or NaN reaches every weight, and with MultiWorkerMirroredStrategy the worker that overflowed skips the
step while the others wait in the gradient all-reduce until the collective timeout. float32 and mixed_bfloat16
have no loss scaling and are unaffected.

:class:`ReplicaSafeLossScaleOptimizer` sums every replica's overflow flag (across workers, too) before the
decision, so all replicas skip a step or all apply it. Keras does not wrap an optimizer that is already a
LossScaleOptimizer, so :func:`for_precision` wrapping it first is all training needs. Remove once Keras itself
reduces the flag (tests/test_distribute.py: one replica or worker overflowing).
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops


@keras.saving.register_keras_serializable(package="fer_keras")
class ReplicaSafeLossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """:class:`keras.optimizers.LossScaleOptimizer` that skips a step when any replica's gradients overflowed."""

    def _tf_apply(self, grads, trainable_variables=None):
        if tf.distribute.in_cross_replica_context():
            raise ValueError("apply() must be called in a replica context.")
        if not tf.distribute.has_strategy():
            self._common_apply(grads, trainable_variables=trainable_variables)
            return

        def overflowed(local_grads):
            return tf.cast(tf.logical_not(self.check_finite(local_grads)), tf.float32)

        def handle_cross_replica(distribution, grads, trainable_variables):
            per_replica = distribution.extended.call_for_each_replica(overflowed, args=(grads,))
            finite = tf.equal(distribution.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None), 0.0)

            def apply_fn():
                distribution.extended.call_for_each_replica(
                    self._stateful_handle_finite_grads, args=(grads, trainable_variables))

            # The cond runs in the cross-replica context: the wrapped optimizer's apply calls merge_call, which a
            # cond branch in a replica context may not.
            ops.cond(finite, apply_fn, self._stateful_handle_non_finite_grads)

        tf.distribute.get_replica_context().merge_call(handle_cross_replica, args=(grads, trainable_variables))


def for_precision(optimizer: keras.Optimizer, precision: str) -> keras.Optimizer:
    """``optimizer`` wrapped for dynamic loss scaling when ``precision`` is ``mixed_float16``, else itself."""
    if precision != "mixed_float16" or isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return optimizer
    return ReplicaSafeLossScaleOptimizer(optimizer)
