"""fer_keras.gradcheck: the report's formulas pass, deliberately wrong ones fail, the CLI writes JSON."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf
from conftest import run_tool

from fer_keras import gradcheck

BN_QUANTITIES = set(gradcheck.BATCHNORM_QUANTITIES)


def by_quantity(results: list[gradcheck.CheckResult]) -> dict[str, gradcheck.CheckResult]:
    return {r.name.rsplit("/", 1)[-1]: r for r in results}


# --- output size of convolution and pooling ------------------------------------------------------


@pytest.mark.parametrize("size, kernel, stride, padding, expected", [
    (48, 7, 2, "valid", 21), (48, 7, 2, "same", 24), (24, 3, 2, "same", 12), (5, 3, 2, "valid", 2),
    (13, 2, 2, "same", 7), (1, 7, 4, "same", 1), (8, 1, 3, "same", 3),
])
def test_formula_with_keras_padding(size, kernel, stride, padding, expected):
    pad = gradcheck.keras_total_padding(size, kernel, stride, padding)
    assert gradcheck.conv_output_size(size, kernel, stride, pad) == expected
    if padding == "same":
        assert expected == math.ceil(size / stride)


def test_shape_formula_matches_keras_conv_and_pool():
    results = gradcheck.check_conv_shapes()
    assert [r.name for r in results] == ["conv2d output size", "max_pool2d output size"]
    for r in results:
        assert r.passed, r.details
        assert r.max_abs_err == 0 and r.details["disagreements"] == 0
        assert r.details["axis_comparisons"] > 200
    cases = gradcheck.keras_shape_cases()
    assert {(c.op, c.padding) for c in cases} == {(op, p) for op in gradcheck.SHAPE_OPS for p in gradcheck.PADDINGS}
    assert {c.stride for c in cases} == set(gradcheck.SHAPE_STRIDES)
    conv = next(c for c in cases if c.weights is not None)
    for array in (conv.x, conv.y, conv.weights):  # shared by every caller of the cache
        with pytest.raises(ValueError, match="read-only"):
            array[(0,) * array.ndim] = 99


def test_same_padding_amount_is_measured_not_derived():
    """P = k - 1 (right for stride 1 only) gives every 'same' output size ceil(W / s) through the formula, so the
    size comparison alone passes; padding the input by hand shows it is not the padding TF applies."""
    def stride_one_padding(size, kernel, stride, padding):
        return kernel - 1 if padding == "same" else 0

    for r in gradcheck.check_conv_shapes(total_padding=stride_one_padding):
        assert r.details["disagreements"] == 0  # the output sizes still agree ...
        assert not r.passed and r.details["padding_disagreements"] > 0  # ... the padding does not
    errors = {(c.stride, c.padding): [] for c in gradcheck.keras_shape_cases()}
    for case in gradcheck.keras_shape_cases():
        errors[case.stride, case.padding].append(gradcheck.explicit_padding_error(case, stride_one_padding))
    assert all(max(e) == 0 for (stride, padding), e in errors.items() if stride == 1 or padding == "valid")
    assert all(max(e) >= 1 for (stride, padding), e in errors.items() if stride > 1 and padding == "same")
    for r in gradcheck.check_conv_shapes():
        assert r.passed and r.details["padding_disagreements"] == 0 and r.details["layer_runs"] > 100
        assert r.details["padding_max_abs_err"] == 0


def test_alternative_shape_formula_fails_and_is_recorded_as_disagreeing():
    results = gradcheck.check_conv_shapes(formula=gradcheck.alternative_output_size)
    assert not any(r.passed for r in results)
    assert all(r.details["examples"] for r in results)

    record = gradcheck.shape_formula_disagreements()
    assert record.passed and record.details["disagreements"] > 0
    assert record.details["disagreements_by_stride"]["1"] == 0  # it is right for stride 1 ...
    assert record.details["disagreements_if_ceiled"] == 0  # ... and when rounded up
    assert "Keras" in record.details["examples"][0]
    # The record is evidence that the formula is wrong: a correct formula does not produce it.
    assert not gradcheck.shape_formula_disagreements(formula=gradcheck.conv_output_size).passed


# --- BatchNorm backward --------------------------------------------------------------------------


def test_batchnorm_hand_formulas_match_gradient_tape():
    results = gradcheck.check_batchnorm()
    assert set(by_quantity(results)) == BN_QUANTITIES
    for r in results:
        assert r.passed, (r.name, r.max_abs_err, r.max_rel_err)
        assert {tuple(row["shape"]) for row in r.details["per_shape"]} == set(gradcheck.BATCHNORM_SHAPES)
    forward = results[0].details["forward"]
    assert all(f["keras_output_dtype"] == "float64" and f["forward_max_abs_diff"] < 1e-12 for f in forward)


def no_dmean_term(x, gamma, dy, epsilon):
    """Forgets the dL/dmean / m term of dL/dx."""
    g = gradcheck.hand_batchnorm_backward(x, gamma, dy, epsilon)
    m = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), x.dtype)
    return g._replace(dx=g.dx - g.dmean / m)


def dgamma_from_x(x, gamma, dy, epsilon):
    """Uses x instead of x_hat in dL/dgamma."""
    g = gradcheck.hand_batchnorm_backward(x, gamma, dy, epsilon)
    return g._replace(dgamma=tf.reduce_sum(dy * x, axis=list(range(len(x.shape) - 1))))


def unbiased_variance(x, gamma, dy, epsilon):
    """The derivation redone for the m - 1 (unbiased) variance, which Keras does not use in training."""
    axes = list(range(len(x.shape) - 1))
    m = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), x.dtype)
    centered = x - tf.reduce_mean(x, axes)
    inv_std = tf.math.rsqrt(tf.reduce_sum(tf.square(centered), axes) / (m - 1.0) + epsilon)
    dx_hat = dy * gamma
    dvar = tf.reduce_sum(dx_hat * centered, axes) * -0.5 * inv_std**3
    dmean = tf.reduce_sum(-dx_hat * inv_std, axes) + dvar * tf.reduce_sum(-2.0 * centered, axes) / (m - 1.0)
    dx = dx_hat * inv_std + dvar * 2.0 * centered / (m - 1.0) + dmean / m
    return gradcheck.BatchNormGrads(dx_hat, dvar, dmean, dx, tf.reduce_sum(dy * centered * inv_std, axes),
                                    tf.reduce_sum(dy, axes))


@pytest.mark.parametrize("backward, failing", [
    (no_dmean_term, {"dx"}),
    (dgamma_from_x, {"dgamma"}),
    (unbiased_variance, {"dvar", "dmean", "dx", "dgamma"}),
])
def test_wrong_batchnorm_formula_fails(backward, failing):
    results = by_quantity(gradcheck.check_batchnorm(shapes=((8, 3), (2, 3, 3, 2)), backward=backward))
    assert {q for q, r in results.items() if not r.passed} == failing
    assert all(results[q].max_rel_err > 1e-4 for q in failing)


def test_central_differences_agree_with_the_hand_formulas_and_fail_wrong_ones():
    """A reference independent of TensorFlow's gradients and forward pass: the losses in numpy, differentiated by
    central differences. The tests' wrong formulas fail it as they fail GradientTape's."""
    def names(results):
        return {r.name for r in results if not r.passed}

    assert not names(gradcheck.check_central_differences())
    assert names(gradcheck.check_central_differences(backward=no_dmean_term)) == {
        "batchnorm dL/dx, central differences"}
    assert names(gradcheck.check_central_differences(backward=unbiased_variance)) == {
        "batchnorm dL/dx, central differences", "batchnorm dL/dgamma, central differences"}

    def no_one_over_n(logits, y_true, label_smoothing=0.0):
        return gradcheck.hand_softmax_ce_grad(logits, y_true, label_smoothing) * tf.cast(tf.shape(logits)[0],
                                                                                          logits.dtype)

    # The (1, 7) shape agrees with any N: the (5, 3) one catches it.
    assert len(names(gradcheck.check_central_differences(grad=no_one_over_n))) == 3
    x = np.array([[0.5, -1.0], [2.0, 0.25]])
    np.testing.assert_allclose(gradcheck.central_differences(lambda v: float(np.sum(v**3)), x), 3 * x**2, atol=1e-8)
    assert x.tolist() == [[0.5, -1.0], [2.0, 0.25]]  # left as it was


@pytest.mark.parametrize("seed", [0, 920, 1506, 3547])
def test_fused_batchnorm_layer_matches_the_hand_formulas_in_float32(seed):
    # 920, 1506 and 3547 draw a dgamma or dbeta that cancels to near zero: relative to |dgamma| or |dbeta| alone
    # their float32 round-off was 2.1e-6-3.3e-6 and failed the correct formulas.
    results = by_quantity(gradcheck.check_fused_batchnorm(seed=seed))
    assert set(results) == {"dx", "dgamma", "dbeta"}
    for r in results.values():
        assert r.passed and r.tolerance == gradcheck.FLOAT32_TOLERANCE, (r.name, r.max_abs_err, r.max_rel_err)
        assert all(len(row["shape"]) == 4 for row in r.details["per_shape"])


@pytest.mark.parametrize("backward, failing", [
    (no_dmean_term, {"dx"}),
    (dgamma_from_x, {"dgamma"}),
    (unbiased_variance, {"dx", "dgamma"}),
])
def test_wrong_formula_fails_against_the_fused_layer(backward, failing):
    results = by_quantity(gradcheck.check_fused_batchnorm(backward=backward))
    assert {q for q, r in results.items() if not r.passed} == failing


def dx_off_by_2e_5(x, gamma, dy, epsilon):
    """dL/dx 0.002 % too large: within float32's absolute tolerance, ten times its relative one."""
    g = gradcheck.hand_batchnorm_backward(x, gamma, dy, epsilon)
    return g._replace(dx=g.dx * (1 + 2e-5))


def test_the_relative_tolerance_fails_an_error_the_absolute_one_lets_through():
    """A check passes only when both errors are within bounds. The fused check's absolute bound (1e-4) is loose
    enough to let a formula 2e-5 off pass on |dx| of a few units; its relative bound (2e-6) catches it."""
    dx = by_quantity(gradcheck.check_fused_batchnorm(backward=dx_off_by_2e_5))["dx"]
    assert dx.max_abs_err < gradcheck.FLOAT32_TOLERANCE.abs and dx.max_rel_err > gradcheck.FLOAT32_TOLERANCE.rel
    assert not dx.passed
    tol = gradcheck.GRADIENT_TOLERANCE
    assert gradcheck._within(tol.abs, tol.rel, tol)
    assert not gradcheck._within(tol.abs / 10, tol.rel * 10, tol)
    assert not gradcheck._within(tol.abs * 10, tol.rel / 10, tol)


# --- softmax + cross-entropy ---------------------------------------------------------------------


def test_softmax_ce_hand_gradient_matches_keras():
    results = gradcheck.check_softmax_cross_entropy()
    assert len(results) == 3
    for r in results:
        assert r.passed, (r.name, r.max_abs_err, r.max_rel_err)
        assert all(row["loss_dtype"] == "float64" for row in r.details["per_shape"])
        # Both references agree with the formula, the Keras loss and the loss written out of elementary ops.
        assert all(max(row["keras_max_abs_err"], row["composed_max_abs_err"]) <= gradcheck.GRADIENT_TOLERANCE.abs
                   for row in r.details["per_shape"])
    assert [r.details["label_smoothing"] for r in results] == [0.0, 0.1, 0.0]


def test_a_nan_in_any_shape_fails_the_check():
    """max() skips a NaN that follows a finite value; the worst case must not."""
    rows = [{"max_abs_err": 1e-16, "max_rel_err": 1e-16}, {"max_abs_err": float("nan"), "max_rel_err": 1e-16}]
    for order in (rows, rows[::-1]):
        result = gradcheck._worst_of("x", order, gradcheck.GRADIENT_TOLERANCE, {})
        assert not result.passed and math.isnan(result.max_abs_err)


def test_softmax_ce_without_one_over_n_fails():
    results = gradcheck.check_softmax_cross_entropy(grad=lambda z, y, a: gradcheck.hand_softmax_ce_grad(z, y, a)
                                                    * tf.cast(tf.shape(z)[0], z.dtype))
    assert not any(r.passed for r in results)
    # With a batch of one the missing 1/N makes no difference; the larger batches expose it.
    for r in results:
        assert {tuple(row["shape"]) for row in r.details["per_shape"] if row["max_abs_err"] == 0} <= {(1, 7)}


def test_softmax_ce_ignoring_label_smoothing_fails_only_the_smoothed_case():
    results = gradcheck.check_softmax_cross_entropy(grad=lambda z, y, a: gradcheck.hand_softmax_ce_grad(z, y, 0.0))
    assert [r.passed for r in results] == [True, False, True]


def test_gradient_of_the_wrong_shape_fails_instead_of_broadcasting():
    results = gradcheck.check_softmax_cross_entropy(shapes=((4, 3),), grad=lambda z, y, a: tf.reduce_mean(z, 0))
    assert all(not r.passed and r.max_abs_err == math.inf for r in results)


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_writes_json_and_markdown(tmp_path):
    out = tmp_path / "reports"
    proc = run_tool("gradcheck", f"--output_dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads((out / "gradcheck.json").read_text())
    assert payload["passed"] is True
    names = [c["name"] for c in payload["checks"]]
    assert len(names) == 21 and all(c["passed"] for c in payload["checks"])
    assert any("disagrees" in n for n in names)
    assert payload["tolerances"]["gradient"] == {"abs": 1e-10, "rel": 1e-8}
    assert payload["tolerances"]["float32_gradient"] == {"abs": 1e-4, "rel": 2e-6}
    assert payload["tolerances"]["central_differences"] == {"abs": 1e-7, "rel": 1e-6}
    assert sum(n.endswith(", central differences") for n in names) == 6
    assert sum(n.startswith("fused batchnorm") for n in names) == 3
    table = (out / "gradcheck.md").read_text()
    assert "| batchnorm dL/dx " in table and "FAIL" not in table
    assert "| check" in proc.stdout and "softmax-CE" in proc.stdout


@pytest.mark.parametrize("foreign", ["gradcheck.json", "gradcheck.md"])
def test_cli_refuses_to_overwrite_report_files_it_did_not_write(tmp_path, foreign):
    """saliency and filters refuse an --output_dir holding a report they did not write; gradcheck replaced a user's
    gradcheck.json or gradcheck.md silently. Refused before the checks run; both files are left as they were."""
    out = tmp_path / "notes"
    out.mkdir()
    (out / foreign).write_text({"gradcheck.json": '{"mine": 1}\n', "gradcheck.md": "# My notes\n"}[foreign])
    if foreign == "gradcheck.md":  # an earlier report beside it, so that only the notes are foreign
        (out / "gradcheck.json").write_text('{"passed": true, "checks": []}\n')
    before = {p.name: p.read_text() for p in out.iterdir()}
    proc = run_tool("gradcheck", f"--output_dir={out}", cwd=tmp_path)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last == (f"error: {out / foreign}: exists and is not a gradcheck report; choose "
                                             "another --output_dir or remove the file"), proc.stderr[-1000:]
    assert {p.name: p.read_text() for p in out.iterdir()} == before


def test_main_exits_1_after_the_table_when_a_check_fails(tmp_path, monkeypatch, capsys):
    real = gradcheck.check_softmax_cross_entropy
    monkeypatch.setattr(gradcheck, "check_softmax_cross_entropy",
                        lambda seed=0: real(seed=seed,
                                            grad=lambda z, y, a: gradcheck.hand_softmax_ce_grad(z, y, a) * 2))
    monkeypatch.setattr(gradcheck, "check_conv_shapes", lambda: [])  # keep it fast; covered above
    # main reads absl's parsed flags; stand in for them instead of defining flags in the test process.
    monkeypatch.setattr(gradcheck, "flags", SimpleNamespace(FLAGS=SimpleNamespace(output_dir=str(tmp_path), seed=0)))
    with pytest.raises(SystemExit) as exit_info:
        gradcheck.main(["gradcheck"])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert "| softmax-CE dL/dz (one-hot) " in captured.out and "FAIL" in captured.out
    assert "3 check(s) failed: softmax-CE" in captured.err
    assert json.loads((tmp_path / "gradcheck.json").read_text())["passed"] is False
