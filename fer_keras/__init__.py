"""fer_keras: a ResNet-18 facial-expression classifier for FER2013 in TensorFlow 2 / Keras 3."""

import contextlib as _contextlib
import os as _os
import sys as _sys

# TensorFlow's C++ start-up chatter hides our own messages; users can still set the variable.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow turns its oneDNN kernels on by default only on CPUs with AVX512-VNNI/BF16 or AMX. On an
# AVX2-only CPU (the AMD EPYC this project was tuned on) they train ResNet-18 ~5x faster than TF's own
# kernels (29 -> 144 img/s, float32, batch 128). Must be set before TensorFlow is imported; an explicit
# user setting (e.g. TF_ENABLE_ONEDNN_OPTS=0 for bit-exact reproductions) wins.
if "TF_ENABLE_ONEDNN_OPTS" not in _os.environ and "tensorflow" in _sys.modules:
    from tensorflow.python.util import _pywrap_util_port

    if not _pywrap_util_port.IsMklEnabled():
        import warnings as _warnings

        _warnings.warn(
            "TensorFlow was imported before fer_keras, so its oneDNN kernels stay off on this CPU and training "
            "is several times slower; import fer_keras first or set TF_ENABLE_ONEDNN_OPTS=1",
            RuntimeWarning,
            stacklevel=2,
        )
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


class _QuietTensorFlowLoader:
    """TensorFlow's own loader, its module body run with stderr (fd 2) passed through a filter that drops the C++ log
    lines below ``TF_CPP_MIN_LOG_LEVEL``: TF 2.21 writes its start-up lines (the oneDNN notice, absl's "before
    InitializeLog" warning) before it reads that variable, so they would precede our one-line errors. Lines are
    forwarded as they come, so a crash inside the import still shows its message."""

    def __init__(self, loader, level: int) -> None:
        self.loader = loader
        self.level = level

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        try:
            with _stderr_filtered(self.level):
                self.loader.exec_module(module)
        finally:
            module.__loader__ = module.__spec__.loader = self.loader  # the wrapper's work is done


class _QuietTensorFlowFinder:
    """Wraps TensorFlow's loader the first time ``tensorflow`` is imported, then leaves ``sys.meta_path``.

    Installed only for ``python -m fer_keras.<tool>`` (``sys.argv[0]`` is ``-m`` while the package is imported): a
    library user's ``import fer_keras`` imports nothing and changes nothing. Tools import TensorFlow after their
    flags are parsed, so a bad flag is answered in a second, not after TensorFlow's 5–8 s start-up."""

    def __init__(self, level: int) -> None:
        self.level = level

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "tensorflow":
            return None
        _sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietTensorFlowLoader(spec.loader, self.level)
        return spec


@_contextlib.contextmanager
def _stderr_filtered(level: int):
    """fd 2 through a pipe whose reader thread drops C++ log lines below ``level`` (and absl's notice)."""
    import re
    import threading

    severity = {b"I": 0, b"W": 1, b"E": 2, b"F": 3}
    log_line = re.compile(rb"([IWEF])\d{4} \S+ +\d+ [^\]\s]+\] ")
    absl_notice = b"WARNING: All log messages before absl::InitializeLog() is called"
    try:
        _sys.stderr.flush()
        saved = _os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable stderr: nothing to tidy
        yield
        return
    try:
        read_end, write_end = _os.pipe()
    except OSError:
        _os.close(saved)
        yield
        return

    def forward() -> None:
        with open(read_end, "rb") as pipe:
            for line in pipe:
                match = log_line.match(line)
                if not (match and severity[match.group(1)] < level) and not line.startswith(absl_notice):
                    _os.write(saved, line)

    forwarder = threading.Thread(target=forward, name="fer_keras-stderr-filter", daemon=True)
    forwarder.start()
    _os.dup2(write_end, 2)
    _os.close(write_end)
    try:
        yield
    finally:
        _sys.stderr.flush()
        _os.dup2(saved, 2)  # closes the pipe's last write end: the forwarder reads to the end and stops
        forwarder.join(timeout=10)
        _os.close(saved)


def _quiet_tensorflow_start_up() -> None:
    try:
        level = int(_os.environ.get("TF_CPP_MIN_LOG_LEVEL") or 0)
    except ValueError:
        level = 0
    if level >= 1 and "tensorflow" not in _sys.modules and _sys.argv[:1] == ["-m"]:
        _sys.meta_path.insert(0, _QuietTensorFlowFinder(level))


_quiet_tensorflow_start_up()

__version__ = "0.1.0"

CLASS_NAMES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 48

# The ResNet-18's shape and input normalisation, shared by fer_keras.model and its PyTorch twin
# (fer_keras.torch_twin), which must not import Keras: it would inflate the twin's memory figure.
STEMS = ("imagenet", "cifar_pool", "cifar")
STAGE_WIDTHS = (64, 128, 256, 512)
BLOCKS_PER_STAGE = 2
# The first convolution and the last residual block (Grad-CAM++'s feature maps), by layer name.
FIRST_CONV_LAYER = "stem_conv"
LAST_CONV_LAYER = "stage4_block2"
# The first convolution's filters after its BatchNorm and ReLU: what the filters tool shows of the stem, as the
# convolution itself is linear (its mean over positions follows the image's mean brightness).
STEM_OUTPUT_LAYER = "stem_relu"
# Mean and standard deviation of FER2013 Training pixels scaled to [0, 1].
FER2013_MEAN = 0.5136
FER2013_STD = 0.3067
BN_EPSILON = 1e-5
# tf.distribute strategies of fer_keras.distribute, here so that checking a training configuration needs no
# TensorFlow.
STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")
# Largest --seed: the pipeline's stateless seeds take 31 bits, and Keras' set_random_seed refuses 2**32 and more
# (in train.run, after the run's folder is written).
MAX_SEED = 2**31 - 1
