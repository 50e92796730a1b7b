"""Training and serving speed of fer_keras against its PyTorch twin: ``python -m fer_keras.benchmark``.

One run measures, on one machine, with the same model and batch size, after warm-up steps, the
median of ``--repeats`` timed windows of ``--steps`` steps each:

1. fer_keras' real training path per stem and precision: ``pipeline.train_dataset`` with train's
   default augmentation, the ResNet-18, ``model.fit`` compiled as ``train.run`` compiles it
   (SGD Nesterov + weight decay from ``train.build_optimizer``, label-smoothed cross-entropy,
   accuracy), fed from the data (the bundled sample by default, repeated over epochs);
2. the PyTorch twin (:mod:`fer_keras.torch_twin`) training step: channels_last, SGD Nesterov
   momentum 0.9 + weight decay 5e-4, label-smoothed cross-entropy, bf16 autocast for the bf16 row,
   fed from prepared batches (no augmentation: the ratio is conservative for fer_keras);
3. the input pipeline alone (cached images -> augmentation -> batches, no model);
4. model cost from the Keras layers (:func:`count_flops`) and the achieved GFLOP/s against the
   CPU's nominal peak (:func:`cpu_info`, assumptions stated in the output);
5. serving: SavedModels exported with each ``--serving_tta`` mode built into ``serving_default`` (1, 2
   and 10 forward passes per image) and the ``.keras`` model, batch-1 latency (p50/p99) and large-batch
   throughput; with ``--serving_export``, every float32 signature of a trained export (the shipped one:
   ``saved_models/fer_resnet18``), so a deployment's cost is measured, not estimated;
6. peak resident memory of each training measurement.

Every measurement runs in its own subprocess, so each has its own peak memory, TensorFlow and
PyTorch thread pools never compete inside one process, and dtype policies cannot leak between rows.
Results go to stdout as Markdown and to ``--output`` (JSON) plus the same path with ``.md``.
The machine must be quiet for figures worth quoting: the report records the load average.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np
from absl import flags

from fer_keras import STEMS, __version__, cli
from fer_keras.errors import ConfigError, FerError, ModelError
from fer_keras.history import atomic_write_text, check_replaceable
from fer_keras.tta import TTA_MODES

if TYPE_CHECKING:
    import keras

PRECISIONS = ("float32", "mixed_bfloat16")
DEFAULT_OUTPUT = "reports/benchmark.json"
MARKDOWN_TITLE = "# fer_keras training and serving benchmark"
TRAIN_TO_FORWARD = 3.0  # backward ~ 2x forward (gradients of activations and of weights)
PIPELINE_TARGET = 20.0
PACKAGE_PARENT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class Settings:
    """What one benchmark run measures; also the spec handed to each worker subprocess."""

    stems: tuple[str, ...] = STEMS
    precisions: tuple[str, ...] = PRECISIONS
    batch_size: int = 128
    repeats: int = 5
    steps: int = 20
    warmup: int = 5
    steps_per_execution: int = 1
    tf_intra_op_threads: int = 0
    tf_inter_op_threads: int = 0
    torch_threads: int = 0
    data: str = ""
    seed: int = 0
    serving_batch_size: int = 256
    serving_batches: int = 3
    latency_samples: int = 200
    serving_tta: tuple[str, ...] = TTA_MODES
    serving_export: str = ""
    skip_training: bool = False
    skip_torch: bool = False
    skip_pipeline: bool = False
    skip_serving: bool = False
    keras_cached: bool = False
    keras_batchnorm: bool = False

    def validate(self) -> None:
        checks = [
            (self.stems and set(self.stems) <= set(STEMS), f"stems must be among {', '.join(STEMS)}"),
            (self.precisions and set(self.precisions) <= set(PRECISIONS),
             f"precisions must be among {', '.join(PRECISIONS)}"),
            (min(self.batch_size, self.repeats, self.steps, self.warmup, self.steps_per_execution) >= 1,
             "batch_size, repeats, steps, warmup and steps_per_execution must be >= 1"),
            (self.steps % self.steps_per_execution == 0 and self.warmup % self.steps_per_execution == 0,
             f"steps ({self.steps}) and warmup ({self.warmup}) must be multiples of steps_per_execution "
             f"({self.steps_per_execution}) so that windows start and end on timed calls"),
            (min(self.tf_intra_op_threads, self.tf_inter_op_threads, self.torch_threads) >= 0,
             "thread counts must be >= 0 (0: the library's default)"),
            (min(self.serving_batch_size, self.serving_batches, self.latency_samples) >= 1,
             "serving_batch_size, serving_batches and latency_samples must be >= 1"),
            (self.serving_tta and set(self.serving_tta) <= set(TTA_MODES),
             f"serving_tta must be among {', '.join(TTA_MODES)}"),
            (not (self.skip_training and self.skip_pipeline and self.skip_serving and not self.serving_export),
             "nothing to measure: training, pipeline and serving all skipped and no serving_export"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def resolve_export(path: str) -> Path:
    """The SavedModel that ``--serving_export`` names (an export or a folder of versions: the highest)."""
    from fer_keras.inference import resolve

    try:
        kind, resolved = resolve(path)
    except ModelError as e:
        raise ConfigError(f"--serving_export: {e}") from None
    if kind != "saved_model":
        raise ConfigError(f"--serving_export: {resolved} is a .keras model, not a SavedModel export")
    return resolved


# --------------------------------------------------------------------------------------------
# Model cost


def _prod(values: Iterable[Any]) -> int:
    return int(math.prod(int(v) for v in values))


def _layer_cost(layer, in_shape: tuple, counts: dict[str, float], uncounted: list[str]) -> tuple:
    """Adds one layer's forward cost per image to ``counts``; returns its output shape.

    ``in_shape`` includes the batch axis, which is ignored (costs are per image).
    """
    import keras

    from fer_keras.model import BasicBlock

    L = keras.layers
    if isinstance(layer, BasicBlock):
        x = layer.pad.compute_output_shape(in_shape) if layer.pad is not None else in_shape
        x = _layer_cost(layer.conv1, x, counts, uncounted)
        x = _layer_cost(layer.bn1, x, counts, uncounted)
        counts["relu_flops"] += _prod(x[1:])
        x = _layer_cost(layer.conv2, x, counts, uncounted)
        x = _layer_cost(layer.bn2, x, counts, uncounted)
        if layer.shortcut_conv is not None:
            s = _layer_cost(layer.shortcut_conv, in_shape, counts, uncounted)
            _layer_cost(layer.shortcut_bn, s, counts, uncounted)
        counts["add_flops"] += _prod(x[1:])
        counts["relu_flops"] += _prod(x[1:])
        return x
    if isinstance(layer, keras.Model):
        out = None
        for sub in layer.layers:
            if not isinstance(sub, L.InputLayer):
                out = _layer_cost(sub, tuple(sub.input.shape), counts, uncounted)
        return out if out is not None else in_shape
    out = tuple(layer.compute_output_shape(in_shape))
    elements = _prod(out[1:])
    if isinstance(layer, L.Conv2D):
        kh, kw = layer.kernel_size
        groups = getattr(layer, "groups", 1)
        counts["conv_macs"] += elements * kh * kw * (int(in_shape[-1]) // groups)
        if layer.use_bias:
            counts["bias_flops"] += elements
    elif isinstance(layer, L.Dense):
        counts["dense_macs"] += elements * int(in_shape[-1])
        if layer.use_bias:
            counts["bias_flops"] += elements
    elif isinstance(layer, L.BatchNormalization):
        counts["batchnorm_flops"] += 2 * elements
    elif isinstance(layer, L.ReLU) or (
        isinstance(layer, L.Activation) and getattr(layer.activation, "__name__", "") == "relu"
    ):
        counts["relu_flops"] += elements
    elif isinstance(layer, (L.Add, L.Subtract, L.Multiply)):
        counts["add_flops"] += elements
    elif isinstance(layer, (L.MaxPooling2D, L.AveragePooling2D)):
        counts["pool_flops"] += elements * (_prod(layer.pool_size) - 1)
    elif isinstance(layer, (L.GlobalAveragePooling2D, L.GlobalMaxPooling2D)):
        counts["pool_flops"] += _prod(in_shape[1:])
    elif isinstance(layer, L.Rescaling):
        counts["rescale_flops"] += 2 * elements
    elif layer.weights:
        uncounted.append(f"{layer.name} ({type(layer).__name__})")
    return out


OTHER_TERMS = ("bias_flops", "batchnorm_flops", "relu_flops", "add_flops", "pool_flops", "rescale_flops")
FLOPS_COUNTED = (
    "MACs: Conv2D H_out*W_out*k*k*C_in*C_out (per group) and Dense in*out, per image, forward; "
    "FLOPs = 2*MACs. Small terms, counted separately as other_flops: bias adds 1, BatchNorm 2 "
    "(inference form: scale and shift), ReLU 1, residual add 1 per output element; max-pool k*k-1 "
    "comparisons per output; global average pool 1 add per input element; Rescaling 2 per element. "
    "Padding, dropout and the loss are not counted. Training ~= 3x the forward conv+dense FLOPs."
)


def count_flops(model: keras.Model) -> dict[str, Any]:
    """Forward cost per image of a Keras model, walking into BasicBlock sublayers.

    Layers with weights that are not understood are listed in ``uncounted`` rather than silently
    costed at zero, so a new layer type cannot make the figure quietly wrong.
    """
    import keras

    counts = {k: 0.0 for k in ("conv_macs", "dense_macs", *OTHER_TERMS)}
    uncounted: list[str] = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        inputs = layer.input
        shape = tuple((inputs[0] if isinstance(inputs, (list, tuple)) else inputs).shape)
        _layer_cost(layer, shape, counts, uncounted)
    macs = counts["conv_macs"] + counts["dense_macs"]
    other = sum(counts[k] for k in OTHER_TERMS)
    return {
        "macs": int(macs),
        "flops": int(2 * macs),
        "other_flops": int(other),
        "total_flops": int(2 * macs + other),
        "training_flops": int(TRAIN_TO_FORWARD * 2 * macs),
        "by_term": {k: int(v) for k, v in counts.items()},
        "uncounted": uncounted,
        "counted": FLOPS_COUNTED,
    }


# --------------------------------------------------------------------------------------------
# Machine


def _cpuinfo_fields(text: str) -> dict[str, str]:
    """The first processor's ``key: value`` lines of /proc/cpuinfo."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_info(cpuinfo_text: str | None = None, max_khz: float | None = None) -> dict[str, Any]:
    """CPU model, usable cores, SIMD features and the nominal peak FP32/BF16 FLOP/s.

    Peak = physical cores available to this process x clock x FLOP/cycle/core, where FLOP/cycle
    assumes two FMA units per core: AVX-512 2x16 lanes x2 = 64, AVX2+FMA 2x8x2 = 32; BF16 with
    AMX (Intel TMUL, 1024 bf16 multiply-adds per cycle) 2048; AVX512_BF16 (VDPBF16PS, two bf16
    products per fp32 lane) 128; without either, BF16 has no faster arithmetic than FP32.
    """
    if cpuinfo_text is None:
        try:
            cpuinfo_text = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo_text = ""
    fields = _cpuinfo_fields(cpuinfo_text)
    cpu_flags = set(fields.get("flags", "").split())
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        threads_per_core = max(1, int(fields["siblings"]) // int(fields["cpu cores"]))
    except (KeyError, ValueError, ZeroDivisionError):
        threads_per_core = 1
    cores = max(1, logical // threads_per_core)
    if max_khz is None:
        try:
            max_khz = float(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text())
        except (OSError, ValueError):
            max_khz = None
    if max_khz:
        ghz, freq_source = max_khz / 1e6, "cpufreq cpuinfo_max_freq (maximum boost clock)"
    else:
        try:
            ghz = float(fields["cpu MHz"]) / 1e3
            freq_source = "/proc/cpuinfo 'cpu MHz' (current or nominal clock; boost may be higher)"
        except (KeyError, ValueError):
            ghz, freq_source = float("nan"), "unknown"
    if "avx512f" in cpu_flags:
        simd, fp32_per_cycle = "AVX-512 FMA", 64
    elif {"avx2", "fma"} <= cpu_flags:
        simd, fp32_per_cycle = "AVX2 FMA", 32
    elif "avx" in cpu_flags:
        simd, fp32_per_cycle = "AVX (no FMA)", 16
    else:
        simd, fp32_per_cycle = "SSE", 8
    if {"amx_bf16", "amx_tile"} <= cpu_flags:
        bf16_unit, bf16_per_cycle = "AMX-BF16", 2048
    elif "avx512_bf16" in cpu_flags:
        bf16_unit, bf16_per_cycle = "AVX512_BF16", 128
    else:
        bf16_unit, bf16_per_cycle = "none (bf16 is converted to fp32 for arithmetic)", fp32_per_cycle
    peak = lambda per_cycle: cores * ghz * per_cycle  # noqa: E731
    return {
        "model": fields.get("model name", platform.processor() or "unknown"),
        "vendor": fields.get("vendor_id", ""),
        "logical_cpus": logical,
        "threads_per_core": threads_per_core,
        "cores": cores,
        "virtualized": "hypervisor" in cpu_flags,
        "ghz": ghz,
        "frequency_source": freq_source,
        "simd": simd,
        "bf16_unit": bf16_unit,
        "relevant_flags": sorted(cpu_flags & {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni",
                                              "amx_bf16", "amx_tile", "amx_int8", "avx_vnni"}),
        "fp32_flop_per_cycle_per_core": fp32_per_cycle,
        "bf16_flop_per_cycle_per_core": bf16_per_cycle,
        "peak_fp32_gflops": peak(fp32_per_cycle),
        "peak_bf16_gflops": peak(bf16_per_cycle),
        "peak_assumptions": (
            f"peak = {cores} core(s) x {ghz:.2f} GHz ({freq_source}) x FLOP/cycle/core; {simd}: "
            f"{fp32_per_cycle} FP32 FLOP/cycle assuming 2 FMA units; BF16: {bf16_unit}, "
            f"{bf16_per_cycle} FLOP/cycle. Nominal figures: sustained clocks under all-core SIMD load "
            "differ, and a VM's cores may be shared."
        ),
    }


# --------------------------------------------------------------------------------------------
# Measurements (each runs inside a worker subprocess)


def _peak_rss_mb() -> float:
    """This process image's peak resident memory (VmHWM; ru_maxrss may include the parent's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rates(timestamps: Sequence[float], starts: Sequence[int], images_per_window: int) -> list[float]:
    """Images/s of each window ``[timestamps[s], timestamps[s + 1]]``."""
    return [images_per_window / (timestamps[i + 1] - timestamps[i]) for i in starts]


def _summary(rates: Sequence[float]) -> dict[str, Any]:
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "repeats": list(rates)}


def _train_split(data: str, seed: int):
    from fer_keras import data as data_lib
    from fer_keras.train import TrainConfig

    loaded = data_lib.load(data or None)
    train_split, _ = data_lib.train_val(loaded, TrainConfig.val_fraction, seed)
    return train_split


def _tiled_images(split, count: int) -> np.ndarray:
    index = np.arange(count) % len(split)
    return split.images[index]


def _configure_tf(spec: dict) -> dict:
    import keras
    import tensorflow as tf

    from fer_keras.distribute import onednn_enabled

    if spec["tf_intra_op_threads"]:
        tf.config.threading.set_intra_op_parallelism_threads(spec["tf_intra_op_threads"])
    if spec["tf_inter_op_threads"]:
        tf.config.threading.set_inter_op_parallelism_threads(spec["tf_inter_op_threads"])
    return {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "tf_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "onednn_opts_env": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "(unset)"),
        "onednn_enabled": onednn_enabled(),
    }


def _train_config(spec: dict, precision: str):
    from fer_keras.train import TrainConfig

    return TrainConfig(stem=spec["stem"], batch_size=spec["batch_size"], precision=precision,
                       steps_per_execution=spec["steps_per_execution"], seed=spec["seed"])


def _batchnorm_kind(model) -> str:
    """``fused``, ``keras`` or ``mixed``: which BatchNormalization class the measured model holds."""
    import keras

    from fer_keras.model import FusedBatchNormalization

    kinds = {isinstance(layer, FusedBatchNormalization) for layer in model._flatten_layers()
             if isinstance(layer, keras.layers.BatchNormalization)}
    return {frozenset({True}): "fused", frozenset({False}): "keras"}.get(frozenset(kinds), "mixed")


def measure_keras_training(spec: dict) -> dict:
    """fer_keras ``model.fit`` throughput; ``spec["source"]`` is ``pipeline`` (train's input path)
    or ``cached`` (one batch repeated: the model and fit loop alone)."""
    info = _configure_tf(spec)
    import keras
    import tensorflow as tf

    from fer_keras import pipeline, train
    from fer_keras.model import count_params, resnet18

    config = _train_config(spec, spec["precision"])
    split = _train_split(spec["data"], config.seed)
    per_epoch = pipeline.steps_per_epoch(len(split), config.batch_size)
    if per_epoch == 0:
        raise ConfigError(f"{len(split)} training images are fewer than one batch of {config.batch_size}")
    total = spec["warmup"] + spec["repeats"] * spec["steps"]
    if spec["source"] == "pipeline":
        dataset = pipeline.train_dataset(split, config.batch_size, config.seed, math.ceil(total / per_epoch),
                                         augment=config.augment_config(), deterministic=True)
    else:
        augment = config.augment_config()
        first = next(iter(pipeline.train_dataset(split, config.batch_size, config.seed, 1, augment=augment)))
        dataset = tf.data.Dataset.from_tensors(first).repeat()

    previous = keras.config.dtype_policy()
    keras.utils.set_random_seed(config.seed)
    keras.config.set_dtype_policy(config.precision)
    try:
        model = resnet18(config.stem, config.input_channels, dropout=config.dropout,
                         fused_batchnorm=spec.get("fused_batchnorm", True))
        # The same compile call as train.run, so the measured step is the step users train with.
        model.compile(
            optimizer=train.build_optimizer(config, per_epoch, model),
            loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=config.label_smoothing),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
            steps_per_execution=config.steps_per_execution,
            jit_compile=False,
        )
        flops = count_flops(model)
        rss_before = _peak_rss_mb()
        clock: dict[int, float] = {}

        class BatchClock(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                clock[-1] = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                clock[batch] = time.perf_counter()

        history = model.fit(dataset, epochs=1, steps_per_epoch=total, callbacks=[BatchClock()], verbose=0,
                            shuffle=False)
    finally:
        keras.config.set_dtype_policy(previous)
    ends = [clock[spec["warmup"] - 1 + r * spec["steps"]] for r in range(spec["repeats"] + 1)]
    rates = _rates(ends, range(spec["repeats"]), spec["steps"] * config.batch_size)
    loss = float(history.history["loss"][-1])
    return {
        **_summary(rates),
        "first_steps_seconds": clock[spec["warmup"] - 1] - clock[-1],
        "final_loss": loss if math.isfinite(loss) else str(loss),
        "flops": flops,
        "params": count_params(model),
        "batchnorm": _batchnorm_kind(model),
        "peak_rss_mb": _peak_rss_mb(),
        "rss_before_fit_mb": rss_before,
        "train_images": len(split),
        "augment": dataclasses.asdict(config.augment_config()),
        "compile": {"optimizer": "SGD nesterov (train.build_optimizer)", "momentum": config.momentum,
                    "weight_decay": config.weight_decay, "label_smoothing": config.label_smoothing,
                    "dropout": config.dropout, "steps_per_execution": config.steps_per_execution},
        "versions": info,
    }


def measure_torch_training(spec: dict) -> dict:
    """The PyTorch twin's training step on prepared uint8 batches (cast to float in the step)."""
    import torch

    from fer_keras import torch_twin

    if spec["torch_threads"]:
        torch.set_num_threads(spec["torch_threads"])
    config = _train_config(spec, spec["precision"])
    torch.manual_seed(config.seed)
    split = _train_split(spec["data"], config.seed)
    batch = config.batch_size
    count = max(1, min(8, len(split) // batch)) * batch
    images = torch.from_numpy(np.ascontiguousarray(_tiled_images(split, count).transpose(0, 3, 1, 2)))
    labels = torch.from_numpy(split.labels[np.arange(count) % len(split)].astype(np.int64))
    batches = [(images[i:i + batch].contiguous(memory_format=torch.channels_last), labels[i:i + batch])
               for i in range(0, count, batch)]

    model = torch_twin.resnet18(config.stem, dropout=config.dropout).to(memory_format=torch.channels_last)
    model.train()
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    # PyTorch's coupled decay passes through momentum (x 1/(1-m)); Keras' decoupled one does not.
    coupled = config.weight_decay * (1 - config.momentum)
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": coupled}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate / 10, momentum=config.momentum, nesterov=True,
    )
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    bf16 = spec["precision"] == "mixed_bfloat16"

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x.float())
            loss = loss_fn(logits, y)
        loss.backward()
        optimizer.step()
        (logits.argmax(1) == y).float().mean()
        return loss.detach()

    started = time.perf_counter()
    for i in range(spec["warmup"]):
        step(*batches[i % len(batches)])
    ends = [time.perf_counter()]
    first = ends[0] - started
    n = spec["warmup"]
    loss = torch.tensor(float("nan"))
    for _ in range(spec["repeats"]):
        for _ in range(spec["steps"]):
            loss = step(*batches[n % len(batches)])
            n += 1
        ends.append(time.perf_counter())
    rates = _rates(ends, range(spec["repeats"]), spec["steps"] * batch)
    final = float(loss)
    return {
        **_summary(rates),
        "first_steps_seconds": first,
        "final_loss": final if math.isfinite(final) else str(final),
        "params": torch_twin.count_params(model),
        "peak_rss_mb": _peak_rss_mb(),
        "versions": {
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
    }


def measure_pipeline(spec: dict) -> dict:
    """Images/s of ``pipeline.train_dataset`` alone: gather, augmentation and batching."""
    info = _configure_tf(spec)
    from fer_keras import pipeline

    config = _train_config(spec, "float32")
    split = _train_split(spec["data"], config.seed)
    per_epoch = pipeline.steps_per_epoch(len(split), config.batch_size)
    if per_epoch == 0:
        raise ConfigError(f"{len(split)} training images are fewer than one batch of {config.batch_size}")
    total = spec["warmup"] + spec["repeats"] * spec["steps"]
    dataset = pipeline.train_dataset(split, config.batch_size, config.seed, math.ceil(total / per_epoch),
                                     augment=config.augment_config(), deterministic=True)
    iterator = iter(dataset)
    for _ in range(spec["warmup"]):
        next(iterator)
    ends = [time.perf_counter()]
    for _ in range(spec["repeats"]):
        for _ in range(spec["steps"]):
            next(iterator)
        ends.append(time.perf_counter())
    rates = _rates(ends, range(spec["repeats"]), spec["steps"] * config.batch_size)
    return {**_summary(rates), "augment": dataclasses.asdict(config.augment_config()), "peak_rss_mb": _peak_rss_mb(),
            "versions": info}


def _inference_figures(fn: Callable, one, batch, latency_samples: int, batches: int, repeats: int) -> dict:
    """Batch-1 latency percentiles and large-batch throughput of ``fn`` (after warm-up calls)."""
    for _ in range(3):
        fn(one)
    fn(batch)
    times = []
    for _ in range(latency_samples):
        start = time.perf_counter()
        fn(one)
        times.append(time.perf_counter() - start)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches):
            fn(batch)
        rates.append(batches * int(batch.shape[0]) / (time.perf_counter() - start))
    ms = np.asarray(times) * 1e3
    return {
        "batch1_p50_ms": float(np.percentile(ms, 50)),
        "batch1_p99_ms": float(np.percentile(ms, 99)),
        "batch1_samples": latency_samples,
        "batch_size": int(batch.shape[0]),
        "throughput": _summary(rates),
    }


def _float32_signatures(loaded) -> dict[str, Callable]:
    """The signatures of a loaded export that take float32 ``pixels`` (not ``serving_uint8``: the same graph
    after a cast), ``serving_default`` first, then by name."""
    import tensorflow as tf

    found = {name: fn for name, fn in loaded.signatures.items()
             if getattr(fn.structured_input_signature[1].get("pixels"), "dtype", None) == tf.float32}
    return dict(sorted(found.items(), key=lambda item: (item[0] != "serving_default", item[0])))


def _signature_figures(signature: Callable, one, batch, args: tuple) -> dict:
    """:func:`_inference_figures` of a SavedModel signature called as TF Serving calls it (``pixels``)."""
    return _inference_figures(lambda x: signature(pixels=x)["logits"], one, batch, *args)


def measure_serving(spec: dict) -> dict:
    """SavedModels of a random-weight ResNet-18 with each ``serving_tta`` mode built in (float32
    ``serving_default``) and the ``.keras`` model in each precision."""
    info = _configure_tf(spec)
    import keras
    import tensorflow as tf

    from fer_keras import export
    from fer_keras.model import load_keras_model, resnet18
    from fer_keras.tta import num_views

    config = _train_config(spec, "float32")
    split = _train_split(spec["data"], config.seed)
    images = _tiled_images(split, spec["serving_batch_size"]).astype(np.float32)
    one, batch = tf.constant(images[:1]), tf.constant(images)
    args = (spec["latency_samples"], spec["serving_batches"], spec["repeats"])
    result: dict[str, Any] = {"versions": info, "exports": {}, "keras": {}}
    previous = keras.config.dtype_policy()
    with tempfile.TemporaryDirectory(prefix="fer_keras_benchmark_") as tmp:
        try:
            for precision in spec["precisions"]:
                keras.utils.set_random_seed(config.seed)
                keras.config.set_dtype_policy(precision)
                model = resnet18(config.stem, config.input_channels, dropout=config.dropout)
                path = Path(tmp) / f"{precision}.keras"
                model.save(path)
                for tta in () if result["exports"] else spec["serving_tta"]:  # from the first precision's model
                    exported = export.export_model(model, Path(tmp) / "exports", name=tta, tta=tta)
                    loaded = tf.saved_model.load(str(exported))  # kept: its signatures read its variables
                    result["exports"][tta] = {
                        "note": f"export.export_model casts to float32 (tta {tta}); serving_default signature",
                        "forward_passes": num_views(tta),
                        **_signature_figures(loaded.signatures["serving_default"], one, batch, args),
                    }
                reloaded = load_keras_model(str(path))
                predict = tf.function(lambda x, m=reloaded: m(x, training=False), reduce_retracing=True)
                result["keras"][precision] = _inference_figures(predict, one, batch, *args)
        finally:
            keras.config.set_dtype_policy(previous)
    result["peak_rss_mb"] = _peak_rss_mb()
    return result


def measure_serving_export(spec: dict) -> dict:
    """Every float32 signature of a trained export (``spec["serving_export"]``, a SavedModel directory), as TF
    Serving runs it (``tf.saved_model.load``). Without fer_keras' metadata the built-in TTA, and so the
    forward passes per image, are unknown (None)."""
    info = _configure_tf(spec)
    import tensorflow as tf

    from fer_keras.inference import export_metadata, metadata_views
    from fer_keras.tta import NO_TTA_SIGNATURE, num_views

    path = Path(spec["serving_export"])
    loaded = tf.saved_model.load(str(path))  # kept: its signatures read its variables
    functions = _float32_signatures(loaded)
    if not functions:
        raise FerError(f"{path}: no signature takes float32 'pixels' (not a fer_keras export?)")
    meta = export_metadata(path)
    tta, crop_size = metadata_views(meta) if meta else (None, None)
    split = _train_split(spec["data"], spec["seed"])
    images = _tiled_images(split, spec["serving_batch_size"]).astype(np.float32)
    one, batch = tf.constant(images[:1]), tf.constant(images)
    args = (spec["latency_samples"], spec["serving_batches"], spec["repeats"])
    signatures = {}
    for name, fn in functions.items():
        passes = 1 if name == NO_TTA_SIGNATURE else (num_views(tta) if tta else None)
        signatures[name] = {"forward_passes": passes, **_signature_figures(fn, one, batch, args)}
    return {"path": str(path), "tta": tta, **({"crop_size": crop_size} if tta == "tencrop" else {}),
            "stem": (meta.get("train_config") or {}).get("stem"), "signatures": signatures, "versions": info,
            "peak_rss_mb": _peak_rss_mb()}


MEASUREMENTS: dict[str, Callable[[dict], dict]] = {
    "keras_train": measure_keras_training,
    "torch_train": measure_torch_training,
    "pipeline": measure_pipeline,
    "serving": measure_serving,
    "serving_export": measure_serving_export,
}


def worker(kind: str, spec_json: str, output: str) -> None:
    """Entry of a measurement subprocess: runs ``MEASUREMENTS[kind]`` and writes its JSON."""
    result = MEASUREMENTS[kind](json.loads(spec_json))
    Path(output).write_text(json.dumps(result))


def run_measurement(kind: str, spec: dict, log: Callable[[str], None] = lambda s: None) -> dict:
    """Runs one measurement in a fresh Python process; failures become ``{"error": ...}``."""
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="fer_keras_benchmark_") as tmp:
        out = Path(tmp) / "result.json"
        code = "import sys; from fer_keras.benchmark import worker; worker(sys.argv[1], sys.argv[2], sys.argv[3])"
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", code, kind, json.dumps(spec), str(out)],
                              env=env, capture_output=True, text=True)
        seconds = time.monotonic() - started
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            log(f"  {kind} failed (exit {proc.returncode}):\n{tail}")
            return {"error": tail.splitlines()[-1] if tail else f"exit {proc.returncode}", "stderr": tail,
                    "seconds": seconds}
        result = json.loads(out.read_text())
    result["seconds"] = seconds
    return result


# --------------------------------------------------------------------------------------------
# The run and its report


def _spec(settings: Settings, **extra: Any) -> dict:
    keys = ("batch_size", "repeats", "steps", "warmup", "steps_per_execution", "tf_intra_op_threads",
            "tf_inter_op_threads", "torch_threads", "data", "seed", "serving_batch_size", "serving_batches",
            "latency_samples", "serving_tta", "serving_export")
    return {**{k: getattr(settings, k) for k in keys}, **extra}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _median(result: dict | None) -> float | None:
    return result.get("median") if result and "error" not in result else None


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes of the machine have used since boot (Linux /proc/stat), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def foreign_cpu_share(busy_before: float | None, busy_after: float | None, own_cpu: float,
                      wall: float, cores: int) -> float | None:
    """Fraction of the machine's cores that other processes used while the benchmark ran.

    The load average cannot tell: the benchmark's own workers load every core. Machine-wide busy time
    minus this process tree's CPU time can.
    """
    if busy_before is None or busy_after is None or wall <= 0:
        return None
    return max(0.0, (busy_after - busy_before - own_cpu) / (wall * cores))


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_benchmark(settings: Settings, command: str, log: Callable[[str], None] = lambda s: None) -> dict:
    """Runs every measurement that ``settings`` asks for and returns the report (a JSON-able dict)."""
    settings.validate()
    # Resolved before any measurement: a bad path fails at once, and the version timed is the one named now.
    export_path = str(resolve_export(settings.serving_export)) if settings.serving_export else ""
    # Every measurement reads the data in its own process: a bad --data is one line here, not a traceback from
    # each worker and a report of errors in place of an earlier one. Parsed once; the workers read the cache.
    _train_split(settings.data, settings.seed)
    torch_missing = importlib.util.find_spec("torch") is None
    run_torch = not settings.skip_torch and not torch_missing
    cpu = cpu_info()
    load_before = os.getloadavg()
    busy_before, own_before = _busy_cpu_seconds(), _own_cpu_seconds()
    started = time.monotonic()
    jobs = 0 if settings.skip_training else len(settings.stems) * len(settings.precisions) * (
        1 + run_torch + settings.keras_cached + settings.keras_batchnorm)
    jobs += (not settings.skip_pipeline) + (0 if settings.skip_serving else len(settings.stems))
    jobs += bool(settings.serving_export)
    done = 0

    def measure(kind: str, label: str, **extra: Any) -> dict:
        nonlocal done
        done += 1
        log(f"[{done}/{jobs}] {label} ...")
        result = run_measurement(kind, _spec(settings, **extra), log)
        figure = f"{result['median']:.1f} img/s, " if "median" in result else ""
        log(f"[{done}/{jobs}] {label}: {figure}{result['seconds']:.0f} s")
        return result

    rows = []
    serving: dict[str, dict] = {}
    for stem in settings.stems:
        for precision in () if settings.skip_training else settings.precisions:
            row: dict[str, Any] = {"stem": stem, "precision": precision}
            row["keras"] = measure("keras_train", f"fer_keras fit {stem} {precision}",
                                   stem=stem, precision=precision, source="pipeline")
            if settings.keras_cached:
                row["keras_cached"] = measure("keras_train", f"fer_keras fit, cached batch, {stem} {precision}",
                                              stem=stem, precision=precision, source="cached")
            if settings.keras_batchnorm:
                row["keras_batchnorm"] = measure(
                    "keras_train", f"fer_keras fit, Keras' BatchNormalization, {stem} {precision}",
                    stem=stem, precision=precision, source="pipeline", fused_batchnorm=False)
            if run_torch:
                row["torch"] = measure("torch_train", f"PyTorch twin {stem} {precision}",
                                       stem=stem, precision=precision)
            rows.append(row)
        if not settings.skip_serving:
            serving[stem] = measure("serving", f"serving {stem}", stem=stem, precisions=list(settings.precisions))
    pipeline = None if settings.skip_pipeline else measure("pipeline", "input pipeline alone", stem=STEMS[0])
    serving_export = (measure("serving_export", f"serving {export_path}", serving_export=export_path)
                      if export_path else None)

    flops: dict[str, dict] = {}
    for row in rows:
        keras_result = row["keras"]
        if "flops" in keras_result:
            flops.setdefault(row["stem"], {**keras_result["flops"], "params": keras_result["params"]})
        k, t = _median(keras_result), _median(row.get("torch"))
        cost = flops.get(row["stem"])
        peak = cpu["peak_bf16_gflops"] if row["precision"] == "mixed_bfloat16" else cpu["peak_fp32_gflops"]
        gflops = k * cost["training_flops"] / 1e9 if k and cost else None
        row["ratios"] = {
            "keras_over_torch": _ratio(k, t),
            "keras_cached_over_torch": _ratio(_median(row.get("keras_cached")), t),
            "fused_over_keras_batchnorm": _ratio(k, _median(row.get("keras_batchnorm"))),
            "pipeline_over_keras": _ratio(_median(pipeline), k),
        }
        row["achieved_gflops"] = gflops
        row["fraction_of_peak"] = gflops / peak if gflops and peak and math.isfinite(peak) else None

    speedups = []
    if rows and "float32" in settings.precisions and "mixed_bfloat16" in settings.precisions:
        by_key = {(r["stem"], r["precision"]): r for r in rows}
        for stem in settings.stems:
            fp32, bf16 = by_key[(stem, "float32")], by_key[(stem, "mixed_bfloat16")]
            speedups.append({
                "stem": stem,
                "keras_bf16_over_fp32": _ratio(_median(bf16["keras"]), _median(fp32["keras"])),
                "torch_bf16_over_fp32": _ratio(_median(bf16.get("torch")), _median(fp32.get("torch"))),
            })

    versions: dict[str, Any] = {"python": platform.python_version(), "fer_keras": __version__}
    for result in [r.get(k) for r in rows for k in ("keras", "torch")] + [pipeline, *serving.values(),
                                                                            serving_export]:
        if result and "versions" in result:
            versions.update(result["versions"])
    notes = []
    if torch_missing and not settings.skip_torch:
        notes.append("PyTorch is not installed (pip install fer_keras[benchmark]): PyTorch rows skipped.")
    if versions.get("onednn_enabled") is False:
        notes.append("TensorFlow ran without oneDNN (TF_ENABLE_ONEDNN_OPTS=0?): several times slower.")
    load_after = os.getloadavg()
    foreign = foreign_cpu_share(busy_before, _busy_cpu_seconds(), _own_cpu_seconds() - own_before,
                                time.monotonic() - started, os.cpu_count() or 1)
    if foreign is not None and foreign > 0.05:
        notes.append(f"Other processes used {foreign:.0%} of the CPU while this ran: figures are not for quoting.")
    return {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu, "hostname": platform.node(), "platform": platform.platform(),
                    "load_average_before": load_before, "load_average_after": load_after,
                    "foreign_cpu_share": foreign},
        "versions": versions,
        "settings": dataclasses.asdict(settings),
        "flops": flops,
        "training": rows,
        "bf16_speedup": speedups,
        "pipeline": pipeline,
        "serving": serving,
        "serving_export": serving_export,
        "targets": {"pipeline_over_keras": PIPELINE_TARGET, "keras_over_torch": 1.0, "keras_bf16_over_fp32": 1.3},
        "notes": notes,
        "seconds": time.monotonic() - started,
    }


def _pct(share: float | None) -> float | None:
    return None if share is None else 100 * share


def _fmt(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:{spec}}{suffix}"


def _describe_augment(augment: dict | None) -> str:
    if not augment:
        return "-"
    return (f"flip {'on' if augment['flip'] else 'off'}, shift {augment['shift']}, rotation {augment['rotation']} deg, "
            f"zoom {augment['zoom']}, erasing p={augment['erasing']}, mixup alpha {augment.get('mixup', 0.0)}")


def _cell(result: dict | None) -> str:
    if result is None:
        return "-"
    if "error" in result:
        return "error"
    return _fmt(result["median"])


def render_markdown(report: dict) -> str:
    """The report as Markdown: machine, then the sections measured (training table, bf16 speed-up, pipeline,
    cost, serving)."""
    cpu = report["machine"]["cpu"]
    v = report["versions"]
    s = report["settings"]
    lines = [
        MARKDOWN_TITLE,
        "",
        f"- date: {report['date']}; command: `{report['command']}`",
        f"- CPU: {cpu['model']} ({cpu['vendor']}), {cpu['cores']} core(s) / {cpu['logical_cpus']} logical CPU(s)"
        f"{', virtualized' if cpu['virtualized'] else ''}; {cpu['simd']}; BF16 unit: {cpu['bf16_unit']}; "
        f"flags: {' '.join(cpu['relevant_flags']) or '-'}",
        f"- versions: Python {v.get('python')}, TensorFlow {v.get('tensorflow', '-')}, Keras {v.get('keras', '-')}, "
        f"PyTorch {v.get('torch', '-')}, fer_keras {v.get('fer_keras')}",
        f"- threads: TF intra-op {v.get('tf_intra_op_threads', '-')}, inter-op {v.get('tf_inter_op_threads', '-')} "
        f"(0 = TF default, all cores); PyTorch {v.get('torch_threads', '-')} (inter-op "
        f"{v.get('torch_interop_threads', '-')}, kernels {v.get('torch_cpu_capability', '-')}); "
        f"TensorFlow oneDNN kernels {'on' if v.get('onednn_enabled') else 'off'} "
        f"(TF_ENABLE_ONEDNN_OPTS={v.get('onednn_opts_env', '-')})",
        f"- data: {s['data'] or 'bundled sample'}; load average {report['machine']['load_average_before'][0]:.2f} "
        f"at start, {report['machine']['load_average_after'][0]:.2f} at end (with this benchmark's own "
        f"load); other processes used {_fmt(_pct(report['machine'].get('foreign_cpu_share')), '.0f', '%')} "
        "of the CPU meanwhile",
    ]
    if report["training"]:
        lines += [
            f"- training: batch {s['batch_size']}, {s['warmup']} warm-up step(s), median of {s['repeats']} "
            f"window(s) of {s['steps']} step(s); steps_per_execution {s['steps_per_execution']}",
            "",
            "## Training throughput (images/s, median)",
            "",
            "| stem | precision | fer_keras fit | PyTorch | fer_keras / PyTorch | input pipeline / fer_keras "
            "| GFLOP/s (% of peak) | peak RSS MB fer_keras / PyTorch |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
    cached = any("keras_cached" in r for r in report["training"])
    for r in report["training"]:
        k, t = r["keras"], r.get("torch")
        rss = f"{_fmt(k.get('peak_rss_mb'), '.0f')} / {_fmt((t or {}).get('peak_rss_mb'), '.0f')}"
        pct = _fmt(r["fraction_of_peak"] * 100 if r["fraction_of_peak"] else None, ".1f", "%")
        ratios = r["ratios"]
        lines.append(
            f"| {r['stem']} | {r['precision']} | {_cell(k)} | {_cell(t)} "
            f"| {_fmt(ratios['keras_over_torch'], '.2f', 'x')} | {_fmt(ratios['pipeline_over_keras'], '.1f', 'x')} "
            f"| {_fmt(r['achieved_gflops'])} ({pct}) | {rss} |"
        )
    if cached:
        lines += ["", "fer_keras fit on one cached batch (model and fit loop without the input pipeline):", "",
                  "| stem | precision | images/s | / PyTorch |", "|---|---|---:|---:|"]
        for r in report["training"]:
            lines.append(f"| {r['stem']} | {r['precision']} | {_cell(r.get('keras_cached'))} | "
                         f"{_fmt(r['ratios']['keras_cached_over_torch'], '.2f', 'x')} |")
    if any("keras_batchnorm" in r for r in report["training"]):
        lines += ["", "fer_keras fit with Keras' own BatchNormalization (moments, casts) instead of the fused layer:",
                  "", "| stem | precision | images/s | fused / Keras' |", "|---|---|---:|---:|"]
        for r in report["training"]:
            lines.append(f"| {r['stem']} | {r['precision']} | {_cell(r.get('keras_batchnorm'))} | "
                         f"{_fmt(r['ratios']['fused_over_keras_batchnorm'], '.2f', 'x')} |")
    errors = [(r["stem"], r["precision"], name, r[name]["error"]) for r in report["training"]
              for name in ("keras", "keras_cached", "keras_batchnorm", "torch") if name in r and "error" in r[name]]
    for stem, precision, name, error in errors:
        lines.append(f"\n- {name} {stem} {precision} failed: {error}")
    if report["bf16_speedup"]:
        lines += ["", "## mixed_bfloat16 over float32", "", "| stem | fer_keras | PyTorch |", "|---|---:|---:|"]
        for b in report["bf16_speedup"]:
            lines.append(f"| {b['stem']} | {_fmt(b['keras_bf16_over_fp32'], '.2f', 'x')} | "
                         f"{_fmt(b['torch_bf16_over_fp32'], '.2f', 'x')} |")
    p = report["pipeline"]
    if p and "error" in p:
        lines += ["", "## Input pipeline alone", "", f"failed: {p['error']}"]
    elif p:
        lines += ["", "## Input pipeline alone", "",
                  f"{_cell(p)} images/s (median; range {_fmt(p.get('min'))}-{_fmt(p.get('max'))}) from the cached "
                  f"images through augmentation ({_describe_augment(p.get('augment'))}) and batching; target >= "
                  f"{report['targets']['pipeline_over_keras']:.0f}x the training throughput."]
    if report["flops"]:
        lines += ["", "## Model cost per image (forward)", "",
                  "| stem | parameters | MMAC | GFLOP (2 x MAC) | other MFLOP | training GFLOP (3 x) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for stem, f in report["flops"].items():
            lines.append(f"| {stem} | {f['params']:,} | {f['macs'] / 1e6:,.1f} | {f['flops'] / 1e9:.3f} | "
                         f"{f['other_flops'] / 1e6:.1f} | {f['training_flops'] / 1e9:.3f} |")
        lines += ["", f"Counted: {FLOPS_COUNTED}", "",
                  f"Peak: FP32 {_fmt(cpu['peak_fp32_gflops'])} GFLOP/s, BF16 {_fmt(cpu['peak_bf16_gflops'])} "
                  f"GFLOP/s. {cpu['peak_assumptions']}"]
    serving_rows = []
    for stem, result in report["serving"].items():
        if "error" in result:
            serving_rows.append(f"| {stem} | error: {result['error']} | | | | | |")
            continue
        entries = [(f"SavedModel, tta {tta}: serving_default (float32)", figures)
                   for tta, figures in result.get("exports", {}).items()]
        entries += [(f".keras {precision}", figures) for precision, figures in result["keras"].items()]
        serving_rows += [_serving_row(stem, name, fig) for name, fig in entries]
    exported = report.get("serving_export")
    if exported and "error" in exported:
        serving_rows.append(f"| - | {report['settings']['serving_export']}: error: {exported['error']} | | | | | |")
    elif exported:
        built_in = f"tta {exported['tta'] or 'unknown: no fer_keras metadata'}" + (
            f" {exported['crop_size']}" if "crop_size" in exported else "")
        serving_rows += [_serving_row(exported.get("stem") or "-", f"{exported['path']} ({built_in}): {name}", fig)
                         for name, fig in exported["signatures"].items()]
    if serving_rows:
        lines += ["", "## Serving", "",
                  f"Batch-1 latency over {s['latency_samples']} single-image calls; throughput: median of "
                  f"{s['repeats']} window(s) of {s['serving_batches']} batch(es) of {s['serving_batch_size']} "
                  "images (float32 pixels, after warm-up calls).", "",
                  "| stem | model | forward passes per image | batch-1 p50 ms | batch-1 p99 ms | large batch "
                  "| images/s |",
                  "|---|---|---:|---:|---:|---:|---:|", *serving_rows]
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    lines.append("")
    return "\n".join(lines)


def _serving_row(stem: str, name: str, fig: dict) -> str:
    return (f"| {stem} | {name} | {_fmt(fig.get('forward_passes', 1), 'd')} | {fig['batch1_p50_ms']:.1f} | "
            f"{fig['batch1_p99_ms']:.1f} | {fig['batch_size']} | {fig['throughput']['median']:.1f} |")


def check_outputs(output: str | os.PathLike) -> None:
    """Refuses the report path, or the .md beside it, if either exists and is not an earlier benchmark report."""
    json_path = Path(output)
    check_replaceable(json_path, (b'{\n  "command": "python -m fer_keras.benchmark',), "a benchmark report")
    check_replaceable(json_path.with_suffix(".md"), (MARKDOWN_TITLE.encode(),), "a benchmark report")


def write_report(report: dict, output: str | os.PathLike) -> tuple[Path, Path]:
    json_path = Path(output)
    md_path = json_path.with_suffix(".md")
    try:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
        atomic_write_text(md_path, render_markdown(report))
    except OSError as e:
        raise FerError(f"{json_path}: cannot write the report ({e.strerror or e})") from None
    return json_path, md_path


# --------------------------------------------------------------------------------------------
# Entrypoint


def define_flags() -> None:
    d = Settings()
    f = flags
    f.DEFINE_list("stems", list(d.stems), "Stems to measure: imagenet, cifar_pool, cifar.")
    f.DEFINE_list("precisions", list(d.precisions), "Keras dtype policies to measure: float32, mixed_bfloat16 "
                  "(PyTorch: bf16 autocast).")
    f.DEFINE_integer("batch_size", d.batch_size, "Training batch size (both frameworks).")
    f.DEFINE_integer("repeats", d.repeats, "Timed windows per measurement; figures are their median.")
    f.DEFINE_integer("steps", d.steps, "Training steps (or pipeline batches) per timed window.")
    f.DEFINE_integer("warmup", d.warmup, "Untimed steps first (tracing, oneDNN primitive creation, caches).")
    f.DEFINE_integer("steps_per_execution", d.steps_per_execution, "Keras compile steps_per_execution.")
    f.DEFINE_integer("tf_intra_op_threads", d.tf_intra_op_threads, "TF intra-op threads (0: TF default).")
    f.DEFINE_integer("tf_inter_op_threads", d.tf_inter_op_threads, "TF inter-op threads (0: TF default).")
    f.DEFINE_integer("torch_threads", d.torch_threads, "torch.set_num_threads (0: PyTorch default).")
    f.DEFINE_string("data", d.data, "Training data as train --data takes it; empty: the bundled sample.")
    cli.define_seed(d.seed, "Seed of weights, data order and augmentation.")
    f.DEFINE_integer("serving_batch_size", d.serving_batch_size, "Batch size of the serving throughput.")
    f.DEFINE_integer("serving_batches", d.serving_batches, "Large batches per timed serving window.")
    f.DEFINE_integer("latency_samples", d.latency_samples, "Timed batch-1 calls for the latency percentiles.")
    f.DEFINE_list("serving_tta", list(d.serving_tta), "Test-time augmentations built into the timed exports of "
                  "each stem (none, flip, tencrop: 1, 2 and 10 forward passes per image).")
    f.DEFINE_string("serving_export", d.serving_export, "A trained export (saved_models/NAME/VERSION, or "
                    "saved_models/NAME for its highest version) whose float32 signatures are timed too, "
                    "e.g. saved_models/fer_resnet18, the shipped model; empty: none.")
    f.DEFINE_boolean("skip_training", d.skip_training, "Skip the training measurements (fer_keras and PyTorch).")
    f.DEFINE_boolean("skip_torch", d.skip_torch, "Skip PyTorch (also skipped when torch is not installed).")
    f.DEFINE_boolean("skip_pipeline", d.skip_pipeline, "Skip the input-pipeline-alone measurement.")
    f.DEFINE_boolean("skip_serving", d.skip_serving, "Skip the per-stem inference measurements of random-weight "
                     "exports and .keras models (--serving_export is timed regardless).")
    f.DEFINE_boolean("keras_cached", d.keras_cached, "Also time fer_keras fit on one cached batch (the model "
                     "and fit loop without the input pipeline).")
    f.DEFINE_boolean("keras_batchnorm", d.keras_batchnorm, "Also time fer_keras fit with Keras' own "
                     "BatchNormalization in place of the fused layer (the A/B behind model.FusedBatchNormalization).")
    f.DEFINE_string("output", DEFAULT_OUTPUT, "JSON report path; the Markdown goes beside it with .md. Existing "
                    "files are replaced only if they are an earlier report.")

    for name in ("batch_size", "repeats", "steps", "warmup", "steps_per_execution", "serving_batch_size",
                 "serving_batches", "latency_samples"):
        f.register_validator(name, lambda v: v >= 1, f"--{name} must be >= 1")
    for name in ("tf_intra_op_threads", "tf_inter_op_threads", "torch_threads"):
        f.register_validator(name, lambda v: v >= 0, f"--{name} must be >= 0 (0: the library default)")
    f.register_validator("stems", lambda v: bool(v) and set(v) <= set(STEMS),
                         f"--stems must be a comma-separated subset of {','.join(STEMS)}")
    f.register_validator("precisions", lambda v: bool(v) and set(v) <= set(PRECISIONS),
                         f"--precisions must be a comma-separated subset of {','.join(PRECISIONS)}")
    f.register_validator("serving_tta", lambda v: bool(v) and set(v) <= set(TTA_MODES),
                         f"--serving_tta must be a comma-separated subset of {','.join(TTA_MODES)}")
    f.register_validator("output", lambda v: v.endswith(".json"), "--output must end with .json")
    f.register_multi_flags_validator(
        ["steps", "warmup", "steps_per_execution"],
        lambda v: v["steps"] % v["steps_per_execution"] == 0 and v["warmup"] % v["steps_per_execution"] == 0,
        "--steps and --warmup must be multiples of --steps_per_execution",
    )


def settings_from_flags(values: Any) -> Settings:
    kwargs = {field.name: getattr(values, field.name) for field in dataclasses.fields(Settings)}
    kwargs["stems"] = tuple(dict.fromkeys(kwargs["stems"]))
    kwargs["precisions"] = tuple(dict.fromkeys(kwargs["precisions"]))
    kwargs["serving_tta"] = tuple(dict.fromkeys(kwargs["serving_tta"]))
    return Settings(**kwargs)


def main(argv: Sequence[str]) -> None:
    settings = settings_from_flags(flags.FLAGS)
    check_outputs(flags.FLAGS.output)  # before minutes of measurement, not after
    command = shlex.join(["python", "-m", "fer_keras.benchmark", *sys.argv[1:]])
    report = run_benchmark(settings, command, log=lambda s: print(s, file=sys.stderr, flush=True))
    json_path, md_path = write_report(report, flags.FLAGS.output)
    print(render_markdown(report))
    print(f"wrote {json_path} and {md_path}")
    if failures(report):
        raise SystemExit(1)


def failures(report: dict) -> list[dict]:
    """The measurements of ``report`` that failed (exit status 1): fer_keras' training, the pipeline, serving."""
    failed = [r["keras"] for r in report["training"] if "error" in r["keras"]]
    return failed + [r for r in [report["pipeline"], *report["serving"].values(), report["serving_export"]]
                     if r and "error" in r]


if __name__ == "__main__":
    define_flags()
    cli.run(main)
    sys.exit(0)
