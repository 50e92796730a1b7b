"""Check the course report's derivations against Keras: ``python -m fer_keras.gradcheck``.

The report derives three things by hand; this module verifies each against what Keras/TensorFlow
actually compute, so that a wrong formula in the report shows up as a failed check:

* the output size of a convolution or pooling, ``floor((W + 2p - k) / s) + 1`` per spatial axis,
  against the shapes that ``keras.layers.Conv2D`` and ``MaxPool2D`` produce ('valid' and 'same'
  padding; 'same' pads asymmetrically, so the total padding ``P`` stands in for ``2p``), with ``P``
  itself checked by padding the input by hand. The alternative form ``(W + p - k + 1) / s`` is
  recorded with the cases where it disagrees;
* the BatchNorm backward pass of Ioffe & Szegedy (2015) in plain tensor ops, against GradientTape
  through ``keras.layers.BatchNormalization(training=True)`` (and, for the intermediate
  ``dL/dvar`` and ``dL/dmean``, through the same forward pass written out in tf ops);
* the same BatchNorm formulas against the layer the model trains with,
  ``model.FusedBatchNormalization`` (one fused op that has no float64 kernel: float32, float32 tolerance);
* ``dL/dz = (softmax(z) - y) / N`` for the mean softmax cross-entropy, against GradientTape through
  ``keras.losses.CategoricalCrossentropy(from_logits=True)``, with one-hot, label-smoothed and soft
  targets.

The formulas are parameters of the ``check_*`` functions, so a test can pass a deliberately wrong one
and see its check fail. Gradient checks run in float64 (except the fused layer's) so that the
tolerances can be tight.

Outputs in ``--output_dir``: ``gradcheck.json`` (every check with its errors and details) and
``gradcheck.md`` (the table). The exit status is 1 when any check fails.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
from absl import flags

from fer_keras import __version__, cli
from fer_keras.errors import ConfigError
from fer_keras.history import atomic_write_text, check_json_replaceable, check_replaceable

DTYPE = "float64"


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """A check passes when both its max absolute and max relative error are within these bounds."""

    abs: float
    rel: float


# float64 round-off in these small graphs is ~1e-15; a wrong term is off by >= ~1e-3.
GRADIENT_TOLERANCE = Tolerance(abs=1e-10, rel=1e-8)
# float32 GradientTape against float64 formulas, relative to the summed term magnitudes: worst over seeds
# 0-3999 2.0e-7 relative, 1.3e-5 absolute (session 41), so 10x and 7.7x margins; the wrong formulas of the
# tests are off by >= 1.3e-3 relative and 3.0e-2 absolute at seeds 0-299.
FLOAT32_TOLERANCE = Tolerance(abs=1e-4, rel=2e-6)
# Shapes are integers: any difference is a failure.
SHAPE_TOLERANCE = Tolerance(abs=0.0, rel=0.0)


@dataclasses.dataclass
class CheckResult:
    """One verified quantity: the worst errors over all its cases, and what was compared.

    ``max_rel_err`` is the max absolute error divided by the largest magnitude of the reference, so
    that entries which happen to be near zero do not inflate it.
    """

    name: str
    max_abs_err: float
    max_rel_err: float
    tolerance: Tolerance
    passed: bool
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Report:
    """All results of :func:`run_all` and the files it wrote."""

    results: list[CheckResult]
    json_path: Path | None = None
    markdown_path: Path | None = None

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failed(self) -> list[CheckResult]:
        return [r for r in self.results if not r.passed]


def _within(max_abs: float, max_rel: float, tol: Tolerance) -> bool:
    return bool(max_abs <= tol.abs and max_rel <= tol.rel)  # False for NaN


def _worst_of(name: str, rows: list[dict[str, Any]], tolerance: Tolerance, details: dict[str, Any]) -> CheckResult:
    """One check over several shapes: it passes only if its worst shape does (a NaN anywhere is the worst)."""
    max_abs = float(np.max([r["max_abs_err"] for r in rows]))
    max_rel = float(np.max([r["max_rel_err"] for r in rows]))
    return CheckResult(name=name, max_abs_err=max_abs, max_rel_err=max_rel, tolerance=tolerance,
                       passed=_within(max_abs, max_rel, tolerance), details={**details, "per_shape": rows})


def _errors(actual: Any, expected: Any, magnitude: Any = None) -> tuple[float, float]:
    """(max |a - e|, max |a - e| / max |e|); infinite when the shapes differ.

    ``magnitude`` replaces ``|e|`` in the denominator: for float32 sums it is the sum of the terms' magnitudes,
    since a sum that cancels to near zero keeps the round-off of its large terms."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        return math.inf, math.inf
    if a.size == 0:
        return 0.0, 0.0
    max_abs = float(np.max(np.abs(a - e)))
    scale = float(np.max(np.abs(e) if magnitude is None else np.asarray(magnitude, dtype=np.float64)))
    if scale == 0.0:
        return max_abs, 0.0 if max_abs == 0.0 else math.inf
    return max_abs, max_abs / scale


# --------------------------------------------------------------------------------------------------
# Output size of convolution and pooling

ShapeFormula = Callable[[int, int, int, int], float]


def conv_output_size(size: int, kernel: int, stride: int, pad: int) -> float:
    """The report's formula ``floor((W + 2p - k) / s) + 1``, with ``pad`` the total padding 2p."""
    return (size + pad - kernel) // stride + 1


def alternative_output_size(size: int, kernel: int, stride: int, pad: int) -> float:
    """The form ``(W + p - k + 1) / s`` (``p`` = total padding), as written: exact division."""
    return (size + pad - kernel + 1) / stride


def keras_total_padding(size: int, kernel: int, stride: int, padding: str) -> int:
    """Total padding on one axis as TF/Keras apply it: 0 for 'valid'; for 'same' the amount that
    makes the output ``ceil(W / s)``, i.e. ``max((ceil(W/s) - 1) * s + k - W, 0)`` (the extra pixel
    of an odd total goes to the bottom/right)."""
    if padding == "valid":
        return 0
    if padding == "same":
        return max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    raise ConfigError(f"unknown padding {padding!r}; choose 'valid' or 'same'")


class ShapeCase(NamedTuple):
    """One Keras layer run: input (H, W), kernel, stride, padding and the output (H, W) it gave, with the values
    (small integers, so that a convolution is exact in float32) to check the padding by."""

    op: str
    padding: str
    input_hw: tuple[int, int]
    kernel: int
    stride: int
    output_hw: tuple[int, int]
    x: np.ndarray  # the input, [1, H, W, 1]
    y: np.ndarray  # the layer's output
    weights: np.ndarray | None  # the convolution's kernel [k, k, 1, 1] (no bias); None for pooling


SHAPE_SIZES = (1, 2, 3, 4, 5, 7, 8, 13, 48)
SHAPE_KERNELS = (1, 2, 3, 5, 7)
SHAPE_STRIDES = (1, 2, 3, 4)
SHAPE_OPS = ("conv2d", "max_pool2d")
PADDINGS = ("valid", "same")


@functools.lru_cache(maxsize=8)
def keras_shape_cases(
    sizes: tuple[int, ...] = SHAPE_SIZES,
    kernels: tuple[int, ...] = SHAPE_KERNELS,
    strides: tuple[int, ...] = SHAPE_STRIDES,
) -> tuple[ShapeCase, ...]:
    """Runs Conv2D and MaxPool2D on ``[1, W, W + 1, 1]`` inputs (two sizes per case, so both spatial
    axes are covered) for every combination; cached because the layers are the slow part.

    'valid' cases whose kernel exceeds the input have no output and are left out. The arrays are read-only:
    every caller shares the cached ones.
    """
    import keras

    rng = np.random.default_rng(0)
    inputs = {size: rng.integers(-3, 4, (1, size, size + 1, 1)).astype(np.float32) for size in sizes}
    cases = []
    for op in SHAPE_OPS:
        for padding in PADDINGS:
            for kernel in kernels:
                for stride in strides:
                    # One layer per configuration: its weights do not depend on the spatial size.
                    # float32 whatever the global dtype policy: the padding check needs exact sums.
                    weights = None
                    if op == "conv2d":
                        layer = keras.layers.Conv2D(1, kernel, strides=stride, padding=padding, use_bias=False,
                                                    dtype="float32")
                        layer.build((None, None, None, 1))
                        # Non-zero taps (1..3, either sign), so every input pixel under the kernel counts.
                        weights = (rng.integers(1, 4, (kernel, kernel, 1, 1))
                                   * rng.choice([-1, 1], (kernel, kernel, 1, 1))).astype(np.float32)
                        layer.kernel.assign(weights)
                    else:
                        layer = keras.layers.MaxPool2D(kernel, strides=stride, padding=padding, dtype="float32")
                    for size, x in inputs.items():
                        hw = (size, size + 1)
                        if padding == "valid" and kernel > min(hw):
                            continue
                        y = keras.ops.convert_to_numpy(layer(x))
                        for array in (x, y, weights):
                            if array is not None:
                                array.setflags(write=False)
                        cases.append(ShapeCase(op, padding, hw, kernel, stride, tuple(y.shape[1:3]), x, y, weights))
    return tuple(cases)


TotalPadding = Callable[[int, int, int, str], int]
PADDING_CHECK = "the layer's output against the 'valid' op on the input padded by P by hand"
# Inputs and taps are small integers, so every output is an integer: a wrong padding moves some output by >= 1
# (or changes the shape), while a convolution algorithm that is not exact (Winograd, FFT) stays far below 0.5.
PADDING_TOLERANCE = 0.5


def explicit_padding_error(case: ShapeCase, total_padding: TotalPadding = keras_total_padding) -> float:
    """Max |layer output - the same op with 'valid' padding on the input padded by hand|, padding each axis by
    ``total_padding`` (the extra pixel of an odd total at the bottom/right; zeros for a convolution, -inf for
    pooling). Zero when ``total_padding`` is the padding TF applies; infinite when the shapes cannot agree.

    This measures ``P`` itself: the output-size check alone cannot, because 'same' defines ``P`` from the
    output size ``ceil(W / s)``.
    """
    import tensorflow as tf

    pads = [(p // 2, p - p // 2) for p in (total_padding(size, case.kernel, case.stride, case.padding)
                                           for size in case.input_hw)]
    if any(lo < 0 or hi < 0 for lo, hi in pads):
        return math.inf
    fill = 0.0 if case.op == "conv2d" else -np.inf
    padded = np.pad(case.x, [(0, 0), *pads, (0, 0)], constant_values=fill)
    if min(padded.shape[1:3]) < case.kernel:
        return math.inf
    if case.op == "conv2d":
        y = tf.nn.conv2d(padded, case.weights, strides=case.stride, padding="VALID")
    else:
        y = tf.nn.max_pool2d(padded, ksize=case.kernel, strides=case.stride, padding="VALID")
    return _errors(y.numpy(), case.y)[0]


def _shape_comparisons(formula: ShapeFormula, cases: Sequence[ShapeCase],
                       total_padding: TotalPadding = keras_total_padding) -> list[dict[str, Any]]:
    """One row per case and spatial axis: the formula's value next to Keras's."""
    rows = []
    for case in cases:
        for axis, (size, out) in enumerate(zip(case.input_hw, case.output_hw)):
            pad = total_padding(size, case.kernel, case.stride, case.padding)
            rows.append({
                "op": case.op, "padding": case.padding, "axis": axis, "W": size, "k": case.kernel,
                "s": case.stride, "P": pad, "keras": out,
                "formula": float(formula(size, case.kernel, case.stride, pad)),
            })
    return rows


def _examples(wrong: list[dict[str, Any]], count: int = 3) -> list[str]:
    """Disagreeing cases, the most typical first (small stride, size near 7, 3x3 kernel)."""
    ranked = sorted(wrong, key=lambda r: (r["s"], abs(r["W"] - 7), r["k"] != 3, r["padding"], r["op"]))
    return [_describe(r) for r in ranked[:count]]


def _describe(row: dict[str, Any]) -> str:
    return (f"{row['op']} padding={row['padding']} W={row['W']} k={row['k']} s={row['s']} P={row['P']}: "
            f"formula {row['formula']:g}, Keras {row['keras']}")


def check_conv_shapes(
    sizes: Sequence[int] = SHAPE_SIZES,
    kernels: Sequence[int] = SHAPE_KERNELS,
    strides: Sequence[int] = SHAPE_STRIDES,
    formula: ShapeFormula = conv_output_size,
    total_padding: TotalPadding = keras_total_padding,
) -> list[CheckResult]:
    """One result per op (Conv2D, MaxPool2D): does ``formula(W, k, s, P)`` give Keras's output size
    on every case of the grid, both paddings and both axes, and is ``P = total_padding(W, k, s, padding)``
    the padding TF applies (:func:`explicit_padding_error`)?"""
    cases = keras_shape_cases(tuple(sizes), tuple(kernels), tuple(strides))
    results = []
    for op in SHAPE_OPS:
        op_cases = [c for c in cases if c.op == op]
        rows = _shape_comparisons(formula, op_cases, total_padding)
        wrong = [r for r in rows if r["formula"] != r["keras"]]
        padding_errors = [(explicit_padding_error(c, total_padding), c) for c in op_cases]
        padding_wrong = [c for err, c in padding_errors if not err < PADDING_TOLERANCE]
        max_abs = max((abs(r["formula"] - r["keras"]) for r in rows), default=0.0)
        max_rel = max((abs(r["formula"] - r["keras"]) / r["keras"] for r in rows), default=0.0)
        results.append(CheckResult(
            name=f"{op} output size",
            max_abs_err=max_abs,
            max_rel_err=max_rel,
            tolerance=SHAPE_TOLERANCE,
            passed=not wrong and not padding_wrong and _within(max_abs, max_rel, SHAPE_TOLERANCE),
            details={
                "formula": getattr(formula, "__name__", repr(formula)),
                "padding": "valid: P = 0; same: P = max((ceil(W/s) - 1) * s + k - W, 0), output ceil(W/s)",
                "total_padding": getattr(total_padding, "__name__", repr(total_padding)),
                "layer_runs": len(rows) // 2,
                "axis_comparisons": len(rows),
                "disagreements": len(wrong),
                "examples": _examples(wrong),
                "padding_checked_by": f"{PADDING_CHECK} (integer outputs; disagreement: off by >= "
                                      f"{PADDING_TOLERANCE})",
                "padding_max_abs_err": max((err for err, _ in padding_errors), default=0.0),
                "padding_disagreements": len(padding_wrong),
                "padding_examples": [f"{c.op} padding={c.padding} HxW={c.input_hw[0]}x{c.input_hw[1]} "
                                     f"k={c.kernel} s={c.stride}" for c in padding_wrong[:3]],
            },
        ))
    return results


def shape_formula_disagreements(
    formula: ShapeFormula = alternative_output_size,
    label: str = "(W + p - k + 1) / s",
    sizes: Sequence[int] = SHAPE_SIZES,
    kernels: Sequence[int] = SHAPE_KERNELS,
    strides: Sequence[int] = SHAPE_STRIDES,
) -> CheckResult:
    """Records where ``formula`` disagrees with Keras; passes when it disagrees somewhere, so the
    report keeps the evidence that this form is wrong (and a run fails if it ever stopped being so).

    Also tallies the disagreements by stride and for the formula rounded down and up:
    ``ceil((W + P - k + 1) / s)`` equals ``floor((W + P - k) / s) + 1`` for integers, so only the
    unrounded and floored forms are wrong, and only for s > 1.
    """
    cases = keras_shape_cases(tuple(sizes), tuple(kernels), tuple(strides))
    rows = _shape_comparisons(formula, cases)
    wrong = [r for r in rows if r["formula"] != r["keras"]]
    by_stride = {str(s): sum(1 for r in wrong if r["s"] == s) for s in strides}
    floored = [r for r in _shape_comparisons(lambda *a: math.floor(formula(*a)), cases) if r["formula"] != r["keras"]]
    ceiled = [r for r in _shape_comparisons(lambda *a: math.ceil(formula(*a)), cases) if r["formula"] != r["keras"]]
    max_abs = max((abs(r["formula"] - r["keras"]) for r in rows), default=0.0)
    max_rel = max((abs(r["formula"] - r["keras"]) / r["keras"] for r in rows), default=0.0)
    name = getattr(formula, "__name__", repr(formula))
    return CheckResult(
        name=f"output size {label} disagrees (expected)",
        max_abs_err=max_abs,
        max_rel_err=max_rel,
        tolerance=SHAPE_TOLERANCE,
        passed=bool(wrong),
        details={
            "formula": name,
            "expectation": "the formula is wrong: passes when it disagrees with Keras in at least one case",
            "axis_comparisons": len(rows),
            "disagreements": len(wrong),
            "disagreements_by_stride": by_stride,
            "disagreements_if_floored": len(floored),
            "disagreements_if_ceiled": len(ceiled),
            "examples": _examples(wrong),
        },
    )


# --------------------------------------------------------------------------------------------------
# BatchNorm backward


class BatchNormGrads(NamedTuple):
    """Gradients of a scalar loss through y = gamma * x_hat + beta, x_hat = (x - mean) / sqrt(var + eps)."""

    dx_hat: Any
    dvar: Any
    dmean: Any
    dx: Any
    dgamma: Any
    dbeta: Any


BatchNormBackward = Callable[[Any, Any, Any, float], BatchNormGrads]
BATCHNORM_QUANTITIES = ("dx_hat", "dvar", "dmean", "dx", "dgamma", "dbeta")
# Checked against the forward pass in tf ops (intermediates) or against the Keras layer.
BATCHNORM_REFERENCE = {"dx_hat": "manual forward", "dvar": "manual forward", "dmean": "manual forward",
                       "dx": "keras layer", "dgamma": "keras layer", "dbeta": "keras layer"}
# What a check can and cannot catch, stated beside its figure.
BATCHNORM_CAVEATS = {
    "dx_hat": "dL/dx_hat = dL/dy * gamma is the gradient of one multiply, so this check is exact by construction; "
              "dx, dvar and dmean are where a derivation can go wrong.",
    "dmean": "the formula's second term, dvar * sum(-2 (x - mean)) / m, is exactly zero (deviations from the mean "
             "sum to zero), so a mistake confined to that term cannot show here; dx checks the whole chain.",
}


def hand_batchnorm_backward(x: Any, gamma: Any, dy: Any, epsilon: float) -> BatchNormGrads:
    """Ioffe & Szegedy's backward pass over all axes but the last (channels), biased variance."""
    import tensorflow as tf

    axes = list(range(len(x.shape) - 1))
    m = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), x.dtype)
    mean = tf.reduce_mean(x, axes)
    centered = x - mean
    var = tf.reduce_mean(tf.square(centered), axes)
    inv_std = tf.math.rsqrt(var + epsilon)
    x_hat = centered * inv_std
    dx_hat = dy * gamma
    dvar = tf.reduce_sum(dx_hat * centered, axes) * -0.5 * inv_std**3
    dmean = tf.reduce_sum(-dx_hat * inv_std, axes) + dvar * tf.reduce_sum(-2.0 * centered, axes) / m
    dx = dx_hat * inv_std + dvar * 2.0 * centered / m + dmean / m
    dgamma = tf.reduce_sum(dy * x_hat, axes)
    dbeta = tf.reduce_sum(dy, axes)
    return BatchNormGrads(dx_hat, dvar, dmean, dx, dgamma, dbeta)


BATCHNORM_SHAPES = ((16, 5), (4, 6, 6, 3), (2, 3, 5, 4))


def _batchnorm_inputs(shape: Sequence[int], seed: int) -> tuple[np.ndarray, ...]:
    """x, the upstream gradient G, gamma and beta of one BatchNorm check (float64 draws)."""
    rng = np.random.default_rng(seed)
    return (rng.normal(1.5, 2.0, shape), rng.normal(size=shape), rng.normal(1.0, 0.5, shape[-1]),
            rng.normal(size=shape[-1]))


def batchnorm_reference(shape: Sequence[int], epsilon: float, seed: int) -> dict[str, Any]:
    """Random x, gamma, beta and upstream G for ``loss = sum(G * y)``, and GradientTape's answers.

    dx, dgamma, dbeta come from the Keras layer in training mode. dx_hat, dvar and dmean are
    intermediates the layer does not expose, so they come from the same forward pass written in tf
    ops, with mean and var computed from x on the tape (so dmean includes the path through var).
    """
    import keras
    import tensorflow as tf

    x, upstream, gamma, beta = (tf.constant(v, tf.float64) for v in _batchnorm_inputs(shape, seed))

    layer = keras.layers.BatchNormalization(epsilon=epsilon, dtype=DTYPE)
    layer.build(tuple(shape))
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y_keras = layer(x, training=True)
        loss = tf.reduce_sum(upstream * y_keras)
    dx, dgamma, dbeta = tape.gradient(loss, [x, layer.gamma, layer.beta])

    axes = list(range(len(shape) - 1))
    with tf.GradientTape() as tape:
        tape.watch(x)
        mean = tf.reduce_mean(x, axes)
        tape.watch(mean)
        var = tf.reduce_mean(tf.square(x - mean), axes)
        tape.watch(var)
        x_hat = (x - mean) / tf.sqrt(var + epsilon)
        y_manual = gamma * x_hat + beta
        loss_manual = tf.reduce_sum(upstream * y_manual)
    dx_hat, dvar, dmean = tape.gradient(loss_manual, [x_hat, var, mean])

    return {
        "x": x, "gamma": gamma, "upstream": upstream,
        "grads": BatchNormGrads(dx_hat, dvar, dmean, tf.convert_to_tensor(dx), tf.convert_to_tensor(dgamma),
                                tf.convert_to_tensor(dbeta)),
        "output_dtype": y_keras.dtype.name,
        "forward_max_abs_diff": float(tf.reduce_max(tf.abs(y_keras - y_manual))),
    }


def check_batchnorm(
    shapes: Sequence[Sequence[int]] = BATCHNORM_SHAPES,
    epsilon: float = 1e-3,
    seed: int = 0,
    backward: BatchNormBackward = hand_batchnorm_backward,
    tolerance: Tolerance = GRADIENT_TOLERANCE,
) -> list[CheckResult]:
    """One result per quantity (dx_hat, dvar, dmean, dx, dgamma, dbeta), worst case over ``shapes``
    (2-D (N, C) and 4-D NHWC), comparing ``backward(x, gamma, dy, epsilon)`` with GradientTape."""
    per_quantity: dict[str, list[dict[str, Any]]] = {q: [] for q in BATCHNORM_QUANTITIES}
    forward = []
    for i, shape in enumerate(shapes):
        ref = batchnorm_reference(shape, epsilon, seed + i)
        hand = backward(ref["x"], ref["gamma"], ref["upstream"], epsilon)
        forward.append({"shape": list(shape), "forward_max_abs_diff": ref["forward_max_abs_diff"],
                        "keras_output_dtype": ref["output_dtype"]})
        for q in BATCHNORM_QUANTITIES:
            max_abs, max_rel = _errors(getattr(hand, q), getattr(ref["grads"], q))
            per_quantity[q].append({"shape": list(shape), "max_abs_err": max_abs, "max_rel_err": max_rel})
    results = []
    for q, rows in per_quantity.items():
        results.append(_worst_of(f"batchnorm dL/{q}", rows, tolerance, {
            "formula": getattr(backward, "__name__", repr(backward)),
            "reference": f"GradientTape through the {BATCHNORM_REFERENCE[q]} (training=True, float64)",
            "loss": "sum(G * y), G ~ N(0, 1)",
            "epsilon": epsilon,
            "forward": forward,
            **({"caveat": BATCHNORM_CAVEATS[q]} if q in BATCHNORM_CAVEATS else {}),
        }))
    return results


FUSED_BATCHNORM_QUANTITIES = ("dx", "dgamma", "dbeta")


def batchnorm_term_magnitudes(x: np.ndarray, gamma: np.ndarray, upstream: np.ndarray,
                              epsilon: float) -> dict[str, np.ndarray]:
    """Per quantity, the sum of the magnitudes of the terms float32 adds up: what its round-off scales with.

    dbeta = sum G cancels to near zero for some draws while each term keeps its float32 error, so an error
    relative to |dbeta| alone failed correct formulas (seeds 920, 1506, 3547 of 4,000)."""
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axis=axes)
    inv_std = 1.0 / np.sqrt(x.var(axis=axes) + epsilon)
    x_hat = (x - mean) * inv_std
    dbeta = np.abs(upstream).sum(axis=axes)
    dgamma = np.abs(upstream * x_hat).sum(axis=axes)
    n = x.size // x.shape[-1]
    dx = np.abs(gamma) * inv_std * (np.abs(upstream) + dbeta / n + np.abs(x_hat) * dgamma / n)
    return {"dx": dx, "dgamma": dgamma, "dbeta": dbeta}


def check_fused_batchnorm(
    shapes: Sequence[Sequence[int]] = tuple(s for s in BATCHNORM_SHAPES if len(s) == 4),
    epsilon: float = 1e-3,
    seed: int = 0,
    backward: BatchNormBackward = hand_batchnorm_backward,
    tolerance: Tolerance = FLOAT32_TOLERANCE,
) -> list[CheckResult]:
    """The same derivation against the layer ResNet-18 trains with, ``model.FusedBatchNormalization``
    (one ``FusedBatchNormV3`` op). The op has no float64 kernel, so GradientTape runs in float32 and
    the formula in float64 on the same float32-representable inputs; the tolerance is float32's."""
    import tensorflow as tf

    from fer_keras.model import FusedBatchNormalization

    per_quantity: dict[str, list[dict[str, Any]]] = {q: [] for q in FUSED_BATCHNORM_QUANTITIES}
    for i, shape in enumerate(shapes):
        x, upstream, gamma, beta = (v.astype(np.float32) for v in _batchnorm_inputs(shape, seed + i))
        layer = FusedBatchNormalization(epsilon=epsilon, dtype="float32")
        layer.build(tuple(shape))
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
        x32 = tf.constant(x)
        if not layer._fusable(x32, True, None):  # else the layer would run Keras' own code: a check of nothing new
            raise RuntimeError(f"FusedBatchNormalization would not use FusedBatchNormV3 for shape {list(shape)}")
        with tf.GradientTape() as tape:
            tape.watch(x32)
            loss = tf.reduce_sum(tf.constant(upstream) * layer(x32, training=True))
        taped = dict(zip(FUSED_BATCHNORM_QUANTITIES, tape.gradient(loss, [x32, layer.gamma, layer.beta])))
        hand = backward(tf.constant(x, tf.float64), tf.constant(gamma, tf.float64),
                        tf.constant(upstream, tf.float64), epsilon)
        magnitudes = batchnorm_term_magnitudes(x.astype(np.float64), gamma.astype(np.float64),
                                               upstream.astype(np.float64), epsilon)
        for q in FUSED_BATCHNORM_QUANTITIES:
            max_abs, max_rel = _errors(getattr(hand, q), tf.convert_to_tensor(taped[q]), magnitudes[q])
            per_quantity[q].append({"shape": list(shape), "max_abs_err": max_abs, "max_rel_err": max_rel})
    return [
        _worst_of(f"fused batchnorm dL/{q}", rows, tolerance, {
            "formula": getattr(backward, "__name__", repr(backward)) + " (float64)",
            "reference": "GradientTape through fer_keras.model.FusedBatchNormalization (training=True, float32)",
            "loss": "sum(G * y), G ~ N(0, 1)",
            "epsilon": epsilon,
            "relative_to": "the largest sum of term magnitudes (batchnorm_term_magnitudes)",
        })
        for q, rows in per_quantity.items()
    ]


# --------------------------------------------------------------------------------------------------
# Softmax + cross-entropy

SoftmaxCEGrad = Callable[[Any, Any, float], Any]


def hand_softmax_ce_grad(logits: Any, y_true: Any, label_smoothing: float = 0.0) -> Any:
    """dL/dz = (softmax(z) - y') / N for the batch-mean loss, y' = y (1 - a) + a / K."""
    import tensorflow as tf

    n = tf.cast(tf.shape(logits)[0], logits.dtype)
    k = tf.cast(tf.shape(logits)[-1], logits.dtype)
    target = y_true * (1.0 - label_smoothing) + label_smoothing / k
    return (tf.nn.softmax(logits) - target) / n


SOFTMAX_SHAPES = ((1, 7), (16, 7), (5, 3))


def _composed_softmax_ce(logits: Any, y_true: Any, label_smoothing: float) -> Any:
    """The batch-mean loss from elementary ops, so that autodiff derives its gradient op by op."""
    import tensorflow as tf

    k = tf.cast(tf.shape(logits)[-1], logits.dtype)
    target = y_true * (1.0 - label_smoothing) + label_smoothing / k
    shifted = logits - tf.stop_gradient(tf.reduce_max(logits, axis=-1, keepdims=True))
    log_probs = shifted - tf.math.log(tf.reduce_sum(tf.exp(shifted), axis=-1, keepdims=True))
    return -tf.reduce_mean(tf.reduce_sum(target * log_probs, axis=-1))


def _softmax_variants(label_smoothing: float) -> tuple[tuple[str, str, float], ...]:
    """(name, target kind, label smoothing) of each softmax-CE check: one-hot, smoothed one-hot, soft targets."""
    return (("one-hot", "one-hot", 0.0), (f"one-hot, label_smoothing={label_smoothing:g}", "one-hot", label_smoothing),
            ("soft targets", "soft", 0.0))


def _targets(kind: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "soft":
        return rng.dirichlet(np.ones(k), size=n)
    return np.eye(k)[rng.integers(0, k, size=n)]


def check_softmax_cross_entropy(
    shapes: Sequence[tuple[int, int]] = SOFTMAX_SHAPES,
    label_smoothing: float = 0.1,
    seed: int = 0,
    grad: SoftmaxCEGrad = hand_softmax_ce_grad,
    tolerance: Tolerance = GRADIENT_TOLERANCE,
) -> list[CheckResult]:
    """One result per target kind (one-hot, one-hot with label smoothing, soft), worst case over
    ``shapes`` (N, K): ``grad(z, y, label_smoothing)`` against GradientTape in float64 through Keras's mean
    CategoricalCrossentropy(from_logits=True) - the loss users train with - and through the same loss written
    out of elementary ops (exp, log, sums). Keras' TensorFlow backend computes that loss with
    ``softmax_cross_entropy_with_logits``, whose gradient is the closed form itself, so only the second
    reference is independent of the formula under test."""
    import keras
    import tensorflow as tf

    results = []
    for v, (label, kind, alpha) in enumerate(_softmax_variants(label_smoothing)):
        loss_fn = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=alpha, dtype=DTYPE)
        rows = []
        for i, (n, k) in enumerate(shapes):
            rng = np.random.default_rng([seed, v, i])
            logits = tf.constant(rng.normal(0.0, 3.0, (n, k)), tf.float64)
            y_true = tf.constant(_targets(kind, n, k, rng), tf.float64)
            with tf.GradientTape(persistent=True) as tape:
                tape.watch(logits)
                loss = loss_fn(y_true, logits)
                composed = _composed_softmax_ce(logits, y_true, alpha)
            hand = grad(logits, y_true, alpha)
            keras_abs, keras_rel = _errors(hand, tape.gradient(loss, logits))
            composed_abs, composed_rel = _errors(hand, tape.gradient(composed, logits))
            rows.append({"shape": [n, k], "loss_dtype": loss.dtype.name,
                         "max_abs_err": float(np.max([keras_abs, composed_abs])),
                         "max_rel_err": float(np.max([keras_rel, composed_rel])),
                         "keras_max_abs_err": keras_abs, "composed_max_abs_err": composed_abs})
        results.append(_worst_of(f"softmax-CE dL/dz ({label})", rows, tolerance, {
            "formula": getattr(grad, "__name__", repr(grad)),
            "reference": "GradientTape through keras.losses.CategoricalCrossentropy(from_logits=True), "
                         "reduction sum_over_batch_size (batch mean), and through "
                         "-mean(sum(y' * (z - max z - log(sum(exp(z - max z)))))), both float64",
            "label_smoothing": alpha,
        }))
    return results


# --------------------------------------------------------------------------------------------------
# Central differences: a reference that shares nothing with autodiff or with the formulas

# Central differences err by ~h^2 |f'''| / 6 (truncation) plus ~eps |L| / h (round-off): worst over seeds 0-199
# 1.1e-9 absolute and 1.9e-9 relative (session 48), so 91x and 520x margins; a wrong term is off by >= ~1e-3.
FD_STEP = 1e-5
FD_TOLERANCE = Tolerance(abs=1e-7, rel=1e-6)
FD_BATCHNORM_SHAPES = ((6, 3), (2, 3, 3, 2))
FD_SOFTMAX_SHAPES = ((1, 7), (5, 3))


def central_differences(loss: Callable[[np.ndarray], float], x: np.ndarray, step: float = FD_STEP) -> np.ndarray:
    """dL/dx by (L(x + h e_i) - L(x - h e_i)) / 2h for every element i of ``x`` (float64, left unchanged)."""
    x = np.array(x, np.float64)
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        original = x[i]
        x[i] = original + step
        up = loss(x)
        x[i] = original - step
        down = loss(x)
        x[i] = original
        grad[i] = (up - down) / (2.0 * step)
    return grad


def numpy_batchnorm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, epsilon: float) -> np.ndarray:
    """BatchNorm's training-mode forward pass in numpy: biased variance over all axes but the channels."""
    axes = tuple(range(x.ndim - 1))
    return gamma * (x - x.mean(axis=axes)) / np.sqrt(x.var(axis=axes) + epsilon) + beta


def numpy_softmax_ce(logits: np.ndarray, target: np.ndarray) -> float:
    """The batch-mean cross-entropy of softmax(logits) against ``target`` rows, in numpy."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return float(-(target * log_probs).sum(axis=-1).mean())


def check_central_differences(
    seed: int = 0,
    epsilon: float = 1e-3,
    label_smoothing: float = 0.1,
    backward: BatchNormBackward = hand_batchnorm_backward,
    grad: SoftmaxCEGrad = hand_softmax_ce_grad,
    tolerance: Tolerance = FD_TOLERANCE,
) -> list[CheckResult]:
    """The hand formulas against central differences of the losses computed in numpy: BatchNorm's dx, dgamma and
    dbeta for ``sum(G * y)``, and dL/dz of the batch-mean softmax cross-entropy for the three target kinds. The
    GradientTape checks are tighter; this one needs neither TensorFlow's gradients nor its forward pass."""
    import tensorflow as tf

    results = []
    rows: dict[str, list[dict[str, Any]]] = {"dx": [], "dgamma": [], "dbeta": []}
    for i, shape in enumerate(FD_BATCHNORM_SHAPES):
        x, upstream, gamma, beta = _batchnorm_inputs(shape, seed + i)
        hand = backward(*(tf.constant(v, tf.float64) for v in (x, gamma, upstream)), epsilon)
        numeric = {
            "dx": central_differences(lambda v: float(np.sum(upstream * numpy_batchnorm(v, gamma, beta, epsilon))), x),
            "dgamma": central_differences(
                lambda v: float(np.sum(upstream * numpy_batchnorm(x, v, beta, epsilon))), gamma),
            "dbeta": central_differences(
                lambda v: float(np.sum(upstream * numpy_batchnorm(x, gamma, v, epsilon))), beta),
        }
        for q, reference in numeric.items():
            max_abs, max_rel = _errors(getattr(hand, q), reference)
            rows[q].append({"shape": list(shape), "max_abs_err": max_abs, "max_rel_err": max_rel})
    for q, per_shape in rows.items():
        results.append(_worst_of(f"batchnorm dL/{q}, central differences", per_shape, tolerance, {
            "formula": getattr(backward, "__name__", repr(backward)),
            "reference": f"central differences, step {FD_STEP:g}, of sum(G * y) with BatchNorm in numpy (float64)",
            "epsilon": epsilon,
        }))
    for v, (label, kind, alpha) in enumerate(_softmax_variants(label_smoothing)):
        per_shape = []
        for i, (n, k) in enumerate(FD_SOFTMAX_SHAPES):
            rng = np.random.default_rng([seed, v, i, 1])
            logits, y_true = rng.normal(0.0, 3.0, (n, k)), _targets(kind, n, k, rng)
            target = y_true * (1.0 - alpha) + alpha / k
            hand = grad(tf.constant(logits, tf.float64), tf.constant(y_true, tf.float64), alpha)
            max_abs, max_rel = _errors(hand, central_differences(lambda z: numpy_softmax_ce(z, target), logits))
            per_shape.append({"shape": [n, k], "max_abs_err": max_abs, "max_rel_err": max_rel})
        results.append(_worst_of(f"softmax-CE dL/dz ({label}), central differences", per_shape, tolerance, {
            "formula": getattr(grad, "__name__", repr(grad)),
            "reference": f"central differences, step {FD_STEP:g}, of the batch-mean loss in numpy (float64)",
            "label_smoothing": alpha,
        }))
    return results


# --------------------------------------------------------------------------------------------------
# Report


def _jsonable(value: Any) -> Any:
    """Non-finite floats become strings so the JSON stays strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def format_table(results: Sequence[CheckResult]) -> str:
    """A Markdown table with padded columns, readable in a terminal too."""
    header = ("check", "max abs err", "max rel err", "tolerance abs / rel", "result")
    rows = [header] + [
        (r.name, f"{r.max_abs_err:.2e}", f"{r.max_rel_err:.2e}", f"{r.tolerance.abs:.0e} / {r.tolerance.rel:.0e}",
         "pass" if r.passed else "FAIL")
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


MARKDOWN_TITLE = "# Gradient and shape checks"
REPORT_KEYS = ("passed", "checks")


def _markdown(report: Report) -> str:
    notes = [
        MARKDOWN_TITLE,
        "",
        f"Overall: **{'pass' if report.passed else 'FAIL'}** ({len(report.failed)} of {len(report.results)} "
        "checks failed). A check passes when both its max absolute error and its max relative error "
        "(max absolute error / max magnitude of the reference; for the float32 fused checks, / the largest sum "
        "of the magnitudes of the terms added up, since a sum that cancels keeps its terms' round-off) are within "
        "the tolerance.",
        "",
        format_table(report.results),
        "",
    ]
    for r in report.results:
        examples = r.details.get("examples")
        if examples:
            notes.append(f"* {r.name}: {r.details['disagreements']} of {r.details['axis_comparisons']} "
                         f"axis comparisons disagree, e.g. {examples[0]}.")
            if "disagreements_by_stride" in r.details:
                notes.append(f"  By stride: {r.details['disagreements_by_stride']}; rounded down: "
                             f"{r.details['disagreements_if_floored']}, rounded up: "
                             f"{r.details['disagreements_if_ceiled']} disagreements.")
        if "padding_disagreements" in r.details:
            notes.append(f"* {r.name}: padding P checked on all {r.details['layer_runs']} layer runs "
                         f"({r.details['padding_checked_by']}): "
                         + (f"{r.details['padding_disagreements']} disagree, e.g. {r.details['padding_examples'][0]}."
                            if r.details["padding_disagreements"] else "all agree."))
        if r.details.get("caveat"):
            notes.append(f"* {r.name}: {r.details['caveat']}")
    return "\n".join(notes) + "\n"


def check_outputs(output_dir: Path) -> None:
    """Refuses a ``gradcheck.json`` or ``gradcheck.md`` in ``output_dir`` that an earlier run did not write."""
    check_json_replaceable(output_dir / "gradcheck.json", REPORT_KEYS, "a gradcheck report")
    check_replaceable(output_dir / "gradcheck.md", (MARKDOWN_TITLE.encode(),), "a gradcheck report", "--output_dir")


def run_all(output_dir: str | Path, seed: int = 0) -> Report:
    """Runs every check with the report's formulas and writes gradcheck.json and gradcheck.md; files of those names
    that an earlier run did not write (a user's notes) are refused before the checks run, not overwritten."""
    import keras
    import tensorflow as tf

    output_dir = Path(output_dir)
    check_outputs(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{output_dir}: cannot create the output folder ({e.strerror or e})") from e
    results = [
        *check_conv_shapes(),
        shape_formula_disagreements(),
        *check_batchnorm(seed=seed),
        *check_fused_batchnorm(seed=seed),
        *check_softmax_cross_entropy(seed=seed),
        *check_central_differences(seed=seed),
    ]
    report = Report(results, output_dir / "gradcheck.json", output_dir / "gradcheck.md")
    payload = {
        "passed": report.passed,
        "seed": seed,
        "versions": {"fer_keras": __version__, "tensorflow": tf.__version__, "keras": keras.__version__},
        "tolerances": {"gradient": dataclasses.asdict(GRADIENT_TOLERANCE),
                       "float32_gradient": dataclasses.asdict(FLOAT32_TOLERANCE),
                       "central_differences": dataclasses.asdict(FD_TOLERANCE),
                       "shape": dataclasses.asdict(SHAPE_TOLERANCE)},
        "checks": [_jsonable(dataclasses.asdict(r)) for r in results],
    }
    atomic_write_text(report.json_path, json.dumps(payload, indent=2, allow_nan=False) + "\n")
    atomic_write_text(report.markdown_path, _markdown(report))
    return report


def define_flags() -> None:
    flags.DEFINE_string("output_dir", "reports/gradcheck", "Folder for gradcheck.json and gradcheck.md.")
    cli.define_seed(0, "Seed of the random inputs, parameters and upstream gradients.")
    flags.register_validator("output_dir", lambda v: bool(v and v.strip()), "--output_dir must not be empty")


def main(argv: Sequence[str]) -> None:
    f = flags.FLAGS
    report = run_all(f.output_dir, seed=f.seed)
    print(format_table(report.results))
    print(f"wrote {report.json_path} and {report.markdown_path}")
    if not report.passed:
        names = ", ".join(r.name for r in report.failed)
        print(f"{len(report.failed)} check(s) failed: {names}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
    sys.exit(0)
