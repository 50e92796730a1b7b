"""Tests of fer_keras.benchmark and its PyTorch twin: the twin is the same network, the FLOP count is
right, the machine's peak follows its flags, and the CLI runs end to end with tiny settings."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import cli_env, cpuinfo

from fer_keras import STEMS, benchmark
from fer_keras.errors import FerError
from fer_keras.model import count_params, resnet18

REPO = Path(__file__).resolve().parents[1]
TINY = ["--repeats=1", "--steps=2", "--warmup=1", "--batch_size=8", "--stems=imagenet", "--precisions=float32",
        "--skip_torch"]


# --------------------------------------------------------------------------------------------
# The PyTorch twin


@pytest.mark.parametrize("stem", STEMS)
def test_twin_has_the_parameter_count_of_the_keras_model(stem):
    pytest.importorskip("torch")
    from fer_keras import torch_twin

    assert torch_twin.count_params(torch_twin.resnet18(stem)) == count_params(resnet18(stem, 1))


@pytest.mark.parametrize("stem", STEMS)
def test_twin_with_copied_weights_computes_the_same_logits(stem):
    torch = pytest.importorskip("torch")
    from fer_keras import torch_twin

    model = resnet18(stem, 1)
    rng = np.random.default_rng(0)
    for w in model.weights:  # non-trivial BatchNorm parameters and statistics, so that BN mismatches show
        if w.path.rsplit("/", 1)[-1] in ("gamma", "beta", "moving_mean", "moving_variance"):
            w.assign(rng.uniform(0.5, 1.5, w.shape).astype("float32"))
    twin = torch_twin.copy_keras_weights(torch_twin.resnet18(stem), model).eval()
    x = rng.integers(0, 256, (2, 48, 48, 1)).astype("float32")
    expected = np.asarray(model(x, training=False))
    with torch.no_grad():
        got = twin(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_twin_batchnorm_momentum_is_the_keras_models_in_pytorchs_convention():
    pytest.importorskip("torch")
    from fer_keras import model, torch_twin

    assert torch_twin.BN_MOMENTUM == pytest.approx(1 - model.BN_MOMENTUM)


@pytest.mark.parametrize("module", ["benchmark", "torch_twin"])
def test_twin_and_benchmark_do_not_load_keras(tmp_path, module):
    """The twin's memory figure would include Keras and TensorFlow if importing it loaded them; the benchmark's
    own process (its flags' checks included) stays free of them too, so that its workers alone hold them."""
    if module == "torch_twin":
        pytest.importorskip("torch")
    code = (f"import sys, fer_keras.{module}, fer_keras.benchmark as b\n"
            "try:\n    b.resolve_export('nowhere')\nexcept b.ConfigError:\n    pass\n"
            "print(sorted(m for m in ('keras', 'tensorflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


# --------------------------------------------------------------------------------------------
# FLOPs


def test_flops_of_a_tiny_conv_model_computed_by_hand():
    L = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="valid", use_bias=True)(inputs)  # 6x6x4
    x = L.ReLU()(x)
    x = L.Conv2D(2, 3, strides=2, padding="same", use_bias=False)(x)  # 3x3x2
    x = L.BatchNormalization()(x)
    x = L.GlobalAveragePooling2D()(x)
    outputs = L.Dense(5)(x)
    flops = benchmark.count_flops(keras.Model(inputs, outputs))

    conv1 = 6 * 6 * 3 * 3 * 3 * 4  # H_out W_out k k C_in C_out = 3888
    conv2 = 3 * 3 * 3 * 3 * 4 * 2  # 648
    dense = 2 * 5
    assert flops["by_term"]["conv_macs"] == conv1 + conv2
    assert flops["by_term"]["dense_macs"] == dense
    assert flops["macs"] == 4546
    assert flops["flops"] == 2 * 4546
    assert flops["training_flops"] == 3 * 2 * 4546
    # Bias 6*6*4 + 5, ReLU 6*6*4, BatchNorm 2*3*3*2, global average pool 3*3*2 input elements.
    assert flops["by_term"]["bias_flops"] == 144 + 5
    assert flops["by_term"]["relu_flops"] == 144
    assert flops["by_term"]["batchnorm_flops"] == 36
    assert flops["by_term"]["pool_flops"] == 18
    assert flops["other_flops"] == 144 + 5 + 144 + 36 + 18
    assert flops["uncounted"] == []


def resnet18_macs(stem: str) -> int:
    """Conv + dense MACs of ResNet-18 on 48x48x1, from the architecture rather than the layers."""
    if stem == "imagenet":
        side, macs = 12, 24 * 24 * 7 * 7 * 1 * 64
    else:
        side, macs = (24 if stem == "cifar_pool" else 48), 48 * 48 * 3 * 3 * 1 * 64
    channels = 64
    for stage, width in enumerate((64, 128, 256, 512)):
        if stage:
            side = (side + 1) // 2
            macs += side * side * 9 * channels * width + side * side * channels * width  # conv1 s2 + 1x1 shortcut
            macs += 3 * side * side * 9 * width * width
        else:
            macs += 4 * side * side * 9 * width * width
        channels = width
    return macs + 512 * 7


@pytest.mark.parametrize("stem, approx_mmac", [("imagenet", 94), ("cifar_pool", 313), ("cifar", 1247)])
def test_flops_walk_into_the_basic_blocks(stem, approx_mmac):
    flops = benchmark.count_flops(resnet18(stem, 1, dropout=0.2))
    assert flops["macs"] == resnet18_macs(stem)
    assert flops["macs"] / 1e6 == pytest.approx(approx_mmac, rel=0.01)
    assert flops["uncounted"] == []
    assert 0 < flops["other_flops"] < 0.02 * flops["flops"]


def test_a_layer_with_weights_it_cannot_cost_is_listed_not_ignored():
    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.DepthwiseConv2D(3, name="dw")(inputs)
    assert benchmark.count_flops(keras.Model(inputs, outputs))["uncounted"] == ["dw (DepthwiseConv2D)"]


# --------------------------------------------------------------------------------------------
# Machine peak


def test_peak_follows_the_simd_and_bf16_flags(monkeypatch):
    monkeypatch.setattr(benchmark.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    amx = benchmark.cpu_info(cpuinfo("avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile"), max_khz=3_000_000)
    assert (amx["model"], amx["cores"], amx["ghz"]) == ("Test CPU", 2, 3.0)  # 4 logical CPUs, 2 threads/core
    assert amx["fp32_flop_per_cycle_per_core"] == 64
    assert amx["peak_fp32_gflops"] == pytest.approx(2 * 3.0 * 64)
    assert amx["peak_bf16_gflops"] == pytest.approx(2 * 3.0 * 2048)
    avx2 = benchmark.cpu_info(cpuinfo("avx avx2 fma hypervisor"), max_khz=0)
    assert avx2["ghz"] == 2.0 and "cpu MHz" in avx2["frequency_source"] and avx2["virtualized"]
    assert avx2["peak_fp32_gflops"] == pytest.approx(2 * 2.0 * 32)
    assert avx2["peak_bf16_gflops"] == avx2["peak_fp32_gflops"]
    assert "2 FMA units" in avx2["peak_assumptions"]


def test_foreign_cpu_share_subtracts_the_benchmarks_own_cpu_time():
    # 100 s on 2 cores; the machine was busy 150 CPU-s, 120 of them ours: others used 30 / 200.
    assert benchmark.foreign_cpu_share(1000.0, 1150.0, 120.0, 100.0, 2) == pytest.approx(0.15)
    assert benchmark.foreign_cpu_share(1000.0, 1100.0, 120.0, 100.0, 2) == 0.0  # clock-tick rounding
    assert benchmark.foreign_cpu_share(None, 1100.0, 1.0, 100.0, 2) is None
    busy = benchmark._busy_cpu_seconds()
    assert busy is None or busy > 0


# --------------------------------------------------------------------------------------------
# Measurements and the CLI


def test_each_ratio_divides_the_measurements_it_names(monkeypatch):
    """Ratios, achieved GFLOP/s and the bf16 speed-ups from known medians (images/s): each divides the figures its
    name says, of the same stem and precision."""
    medians = {("keras_train", "float32", "pipeline", True): 100.0, ("keras_train", "float32", "cached", True): 120.0,
               ("keras_train", "float32", "pipeline", False): 80.0, ("torch_train", "float32"): 200.0,
               ("keras_train", "mixed_bfloat16", "pipeline", True): 150.0,
               ("keras_train", "mixed_bfloat16", "cached", True): 180.0,
               ("keras_train", "mixed_bfloat16", "pipeline", False): 100.0, ("torch_train", "mixed_bfloat16"): 250.0,
               ("pipeline",): 4000.0}

    def measured(kind: str, spec: dict, log) -> dict:
        key = {"keras_train": (kind, spec.get("precision"), spec.get("source"), spec.get("fused_batchnorm", True)),
               "torch_train": (kind, spec.get("precision"))}.get(kind, (kind,))
        flops = {"macs": 8e7, "flops": 1.6e8, "other_flops": 0, "training_flops": 5e8}
        extra = {"flops": flops, "params": 1} if kind == "keras_train" else {}
        return {"median": medians[key], "seconds": 1.0, **extra}

    cpu = {**benchmark.cpu_info(), "peak_fp32_gflops": 100.0, "peak_bf16_gflops": 1000.0}
    monkeypatch.setattr(benchmark, "run_measurement", measured)
    monkeypatch.setattr(benchmark, "cpu_info", lambda: cpu)
    monkeypatch.setattr(benchmark.importlib.util, "find_spec", lambda name: object())  # as if torch were installed
    settings = benchmark.Settings(stems=("imagenet",), keras_cached=True, keras_batchnorm=True, skip_serving=True)
    report = benchmark.run_benchmark(settings, "python -m fer_keras.benchmark")
    fp32, bf16 = report["training"]
    assert fp32["ratios"] == {"keras_over_torch": 0.5, "keras_cached_over_torch": 0.6,
                              "fused_over_keras_batchnorm": 1.25, "pipeline_over_keras": 40.0}
    assert bf16["ratios"] == {"keras_over_torch": 0.6, "keras_cached_over_torch": 0.72,
                              "fused_over_keras_batchnorm": 1.5, "pipeline_over_keras": pytest.approx(4000 / 150)}
    # 5e8 training FLOPs per image: 100 img/s are 50 GFLOP/s, half the float32 peak; bf16 against the bf16 peak.
    assert (fp32["achieved_gflops"], fp32["fraction_of_peak"]) == (50.0, 0.5)
    assert (bf16["achieved_gflops"], bf16["fraction_of_peak"]) == (75.0, 0.075)
    assert report["bf16_speedup"] == [{"stem": "imagenet", "keras_bf16_over_fp32": 1.5, "torch_bf16_over_fp32": 1.25}]
    text = benchmark.render_markdown(report)
    assert "| imagenet | float32 | 100.0 | 200.0 | 0.50x | 40.0x | 50.0 (50.0%) |" in text
    assert "| imagenet | 1.50x | 1.25x |" in text


@pytest.mark.slow
def test_cli_runs_end_to_end_and_writes_json_and_markdown(tmp_path):
    output = tmp_path / "out" / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fer_keras.benchmark", *TINY, "--skip_serving", "--keras_batchnorm",
         f"--output={output}"],
        cwd=REPO, env=cli_env(tmp_path), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| imagenet | float32 |" in proc.stdout
    assert "## Input pipeline alone" in proc.stdout
    report = json.loads(output.read_text())
    assert output.with_suffix(".md").read_text() in proc.stdout
    row = report["training"][0]
    assert (row["stem"], row["precision"]) == ("imagenet", "float32")
    assert row["keras"]["median"] > 0 and len(row["keras"]["repeats"]) == 1
    assert row["keras"]["peak_rss_mb"] > 100
    assert row["ratios"]["pipeline_over_keras"] > 0
    assert row["achieved_gflops"] > 0 and 0 < row["fraction_of_peak"] < 1
    assert "torch" not in row
    assert (row["keras"]["batchnorm"], row["keras_batchnorm"]["batchnorm"]) == ("fused", "keras")
    assert row["keras_batchnorm"]["median"] > 0 and row["ratios"]["fused_over_keras_batchnorm"] > 0
    assert "fused / Keras'" in proc.stdout
    assert report["pipeline"]["median"] > 0
    assert report["flops"]["imagenet"]["macs"] == resnet18_macs("imagenet")
    assert report["flops"]["imagenet"]["params"] == count_params(resnet18("imagenet", 1))
    assert report["command"].startswith("python -m fer_keras.benchmark --repeats=1")
    assert report["versions"]["tensorflow"] and report["versions"]["keras"]
    assert report["machine"]["cpu"]["cores"] >= 1
    assert 0 <= report["machine"]["foreign_cpu_share"] <= 1
    assert report["versions"]["onednn_enabled"] is (os.environ.get("TF_ENABLE_ONEDNN_OPTS") != "0")
    benchmark.check_outputs(output)  # an earlier report may be replaced


@pytest.mark.parametrize("foreign", ["b.json", "b.md"])
def test_cli_refuses_to_replace_a_file_that_is_not_a_report(tmp_path, foreign):
    victim = tmp_path / foreign
    victim.write_text('{"epoch": 3}\n')  # e.g. a run's record named by mistake
    proc = subprocess.run([sys.executable, "-m", "fer_keras.benchmark", f"--output={tmp_path / 'b.json'}", *TINY],
                          cwd=REPO, env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (f"error: {victim}: exists and is not a benchmark report; "
                                                    "choose another --output or remove the file")
    assert victim.read_text() == '{"epoch": 3}\n'
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".json", ".md")) == [foreign]


@pytest.mark.parametrize("args, needle", [
    (["--stems=vgg"], "--stems must be"),
    (["--precisions=mixed_float16"], "--precisions must be"),
    (["--steps=3", "--steps_per_execution=2"], "multiples of --steps_per_execution"),
    (["--output={tmp}/report.txt"], "--output must end with .json"),
    (["--serving_tta=none,fivecrop"], "--serving_tta must be"),
    (["--serving_export={tmp}/missing"], "error: --serving_export: {tmp}/missing: no such model"),
    (["--serving_export={tmp}"], "neither a run directory"),
    (["--serving_export={tmp}/m.keras"], "error: --serving_export: {tmp}/m.keras is a .keras model, not a SavedModel"),
    (["--skip_training", "--skip_pipeline", "--skip_serving"], "error: nothing to measure"),
    (["--data={tmp}/missing.csv", "--skip_training", "--skip_serving"], "error: {tmp}/missing.csv: no such file"),
])
def test_cli_refuses_bad_flags(tmp_path, args, needle):
    (tmp_path / "m.keras").write_bytes(b"")
    args = [a.format(tmp=tmp_path) for a in args]
    output = [] if any(a.startswith("--output=") for a in args) else [f"--output={tmp_path / 'b.json'}"]
    proc = subprocess.run([sys.executable, "-m", "fer_keras.benchmark", *output, *args], cwd=REPO,
                          env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert needle.format(tmp=tmp_path) in proc.stderr
    assert "Traceback" not in proc.stderr
    written = [p.name for p in tmp_path.rglob("*") if p.suffix in (".json", ".md", ".txt")]
    assert not written, f"a refused benchmark wrote {written}"


def spec(**extra) -> dict:
    settings = benchmark.Settings(batch_size=8, repeats=2, steps=1, warmup=1, serving_batch_size=8,
                                  serving_batches=1, latency_samples=3)
    return benchmark._spec(settings, **extra)


def test_torch_measurement_in_both_precisions():
    pytest.importorskip("torch")
    for precision in benchmark.PRECISIONS:
        result = benchmark.measure_torch_training(spec(stem="imagenet", precision=precision))
        assert len(result["repeats"]) == 2 and result["median"] > 0
        assert result["params"] == 11_173_831
        assert result["versions"]["torch_threads"] >= 1


def test_serving_measures_an_export_per_tta_mode_and_the_keras_model():
    result = benchmark.measure_serving(spec(stem="imagenet", precisions=["float32"]))
    assert {tta: e["forward_passes"] for tta, e in result["exports"].items()} == {"none": 1, "flip": 2, "tencrop": 10}
    for figures in (*result["exports"].values(), result["keras"]["float32"]):
        assert 0 < figures["batch1_p50_ms"] <= figures["batch1_p99_ms"]
        assert figures["batch_size"] == 8 and figures["throughput"]["median"] > 0


def test_cli_times_every_float32_signature_of_a_trained_export(tmp_path):
    """The serving cost of a deployment (its built-in TTA, and serving_no_tta) from the benchmark alone."""
    from fer_keras import export

    export.export_model(resnet18("cifar_pool"), tmp_path / "exports", name="faces", version=3, tta="flip")
    output = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fer_keras.benchmark", "--skip_training", "--skip_pipeline", "--skip_serving",
         "--serving_batch_size=8", "--serving_batches=1", "--latency_samples=3", "--repeats=1",
         f"--serving_export={tmp_path / 'exports' / 'faces'}", f"--output={output}"],
        cwd=REPO, env=cli_env(tmp_path), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["training"] == [] and report["serving"] == {} and report["pipeline"] is None
    exported = report["serving_export"]
    assert exported["path"] == str(tmp_path / "exports" / "faces" / "3") and exported["tta"] == "flip"
    signatures = exported["signatures"]
    assert {name: s["forward_passes"] for name, s in signatures.items()} == {"serving_default": 2,
                                                                               "serving_no_tta": 1}
    assert all(s["throughput"]["median"] > 0 and s["batch_size"] == 8 for s in signatures.values())
    assert "## Training" not in proc.stdout and "## Model cost" not in proc.stdout
    assert f"| - | {exported['path']} (tta flip): serving_no_tta | 1 |" in proc.stdout
    assert "Batch-1 latency over 3 single-image calls; throughput: median of 1 window(s) of 1 batch(es) of 8" \
        in proc.stdout


def test_an_export_without_metadata_or_pixels_signature(tmp_path):
    """With fer_keras' metadata the row names the export's own ten-crop size (44, not the default 40); without it
    the TTA is unknown, not guessed; a SavedModel that takes no float32 pixels is an error (the CLI makes it an
    error row and exit 1), not an empty table."""
    import tensorflow as tf

    from fer_keras import export

    path = export.export_model(resnet18("imagenet"), tmp_path, name="bare", version=1, tta="tencrop", crop_size=44)
    result = benchmark.measure_serving_export(spec(serving_export=str(path)))
    assert result["tta"] == "tencrop" and result["crop_size"] == 44
    assert result["signatures"]["serving_default"]["forward_passes"] == 10
    assert f"| - | {path} (tta tencrop 44): serving_default | 10 |" in \
        benchmark.render_markdown(fake_report(serving_export=result))
    (path / export.METADATA_FILE).unlink()
    result = benchmark.measure_serving_export(spec(serving_export=str(path)))
    assert result["tta"] is None and "crop_size" not in result and result["stem"] is None
    assert {n: s["forward_passes"] for n, s in result["signatures"].items()} == {"serving_default": None,
                                                                              "serving_no_tta": 1}
    report = fake_report(serving_export=result)
    assert f"| - | {path} (tta unknown: no fer_keras metadata): serving_default | - |" in \
        benchmark.render_markdown(report)

    module = tf.Module()
    module.double = tf.function(lambda x: {"y": 2 * x}, input_signature=[tf.TensorSpec([None], tf.float32, "x")])
    tf.saved_model.save(module, str(tmp_path / "other"), signatures={"serving_default": module.double})
    with pytest.raises(FerError, match="no signature takes float32 'pixels'"):
        benchmark.measure_serving_export(spec(serving_export=str(tmp_path / "other")))


def fake_report(**overrides) -> dict:
    """A report as run_benchmark returns it, with nothing measured: for render_markdown's branches."""
    cpu = benchmark.cpu_info("model name : Test CPU\nvendor_id : Test\ncpu cores : 1\nflags : fma avx2\n", 1e6)
    report = {
        "command": "python -m fer_keras.benchmark", "date": "2026-12-02T00:00:00+00:00",
        "machine": {"cpu": cpu, "load_average_before": [0.0] * 3, "load_average_after": [0.0] * 3,
                    "foreign_cpu_share": 0.0},
        "versions": {"python": "3", "fer_keras": "0"}, "settings": dataclasses.asdict(benchmark.Settings()),
        "flops": {}, "training": [], "bf16_speedup": [], "pipeline": None, "serving": {}, "serving_export": None,
        "notes": [],
    }
    return {**report, **overrides}


def test_markdown_shows_failed_serving_measurements_as_rows():
    report = fake_report(serving={"cifar": {"error": "OOM"}}, serving_export={"error": "no signature"})
    report["settings"]["serving_export"] = "saved_models/x"
    text = benchmark.render_markdown(report)
    assert "| cifar | error: OOM | | | | | |" in text
    assert benchmark.failures(report) == [{"error": "OOM"}, {"error": "no signature"}]
    broken = fake_report(pipeline={"error": "MemoryError"})
    assert "\n## Input pipeline alone\n\nfailed: MemoryError\n" in benchmark.render_markdown(broken)
    assert benchmark.failures(broken) == [{"error": "MemoryError"}]  # it exited 0
    assert benchmark.failures(fake_report(pipeline={"median": 1.0})) == []
    assert "| - | saved_models/x: error: no signature | | | | | |" in text
    assert "## Training" not in text and "## Model cost" not in text
