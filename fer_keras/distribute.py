"""One factory from a strategy name to a ``tf.distribute`` strategy.

On a machine without GPUs, ``mirrored`` splits the CPU into logical devices so that several
replicas really run (this exercises the multi-GPU code path; it is not a speed-up). Logical
devices must be configured before TensorFlow initialises its devices, hence
:func:`configure_cpu_devices` runs first thing in an entrypoint.
"""

from __future__ import annotations

import json
import os

import tensorflow as tf
from absl import logging

from fer_keras import STRATEGIES
from fer_keras.errors import ConfigError


def configure_cpu_devices(count: int) -> int:
    """Splits the first CPU into ``count`` logical devices (no-op for ``count <= 1``); returns
    the number of logical CPUs. Must run before any TensorFlow op."""
    if count <= 1:
        # Listing logical devices would initialise TensorFlow, which MultiWorkerMirroredStrategy
        # must do itself ("collective ops must be configured at program startup").
        return 1
    cpus = tf.config.list_physical_devices("CPU")
    if cpus:
        try:
            tf.config.set_logical_device_configuration(
                cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
            )
        except RuntimeError as e:
            existing = len(tf.config.list_logical_devices("CPU"))
            if existing != count:
                raise ConfigError(
                    f"cannot split the CPU into {count} logical devices: TensorFlow is already "
                    f"initialised with {existing} ({e})"
                ) from None
    return len(tf.config.list_logical_devices("CPU"))


_NO_COLLECTIVE_DTYPES = {tf.uint8, tf.int8, tf.uint16, tf.int16, tf.bool}


def _patch_collective_reduce(strategy: tf.distribute.Strategy) -> tf.distribute.Strategy:
    """Works around keras-team/keras#20585: Keras 3 ``fit`` calls ``strategy.reduce`` on nested
    values and passes ``axis`` for scalars, which CollectiveAllReduceStrategy rejects. Remove
    when Keras handles MultiWorkerMirroredStrategy itself (tests/test_distribute.py covers it)."""
    original = strategy.reduce

    def reduce(reduce_op, value, axis=None):
        def one(v):
            local = strategy.experimental_local_results(v)
            dtype = getattr(local[0], "dtype", None) if local else None
            if dtype is not None and tf.as_dtype(dtype) in _NO_COLLECTIVE_DTYPES:
                # Keras reduces the first (uint8) data batch only to learn its shapes; collectives
                # reject uint8, and every worker takes this same local path.
                return local[0]
            rank = getattr(v, "shape", None)
            if axis is not None and rank is not None and rank.rank == 0:
                return original(reduce_op, v, axis=None)
            return original(reduce_op, v, axis=axis)

        return tf.nest.map_structure(one, value)

    strategy.reduce = reduce
    return strategy


def check_tf_config(text: str) -> None:
    """Refuses a TF_CONFIG that does not place this process in a cluster of workers. TensorFlow turns one without
    a cluster (``{}``, a misspelt key) into a strategy of this process alone, the chief, so every worker would
    train its own run into the same --model_dir; and it rejects a task outside the cluster with a traceback."""
    if not text:
        raise ConfigError("--strategy=multi_worker needs TF_CONFIG (cluster and task) in the environment")
    try:
        config = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"TF_CONFIG is not valid JSON: {e}") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    roles = {role: cluster.get(role) for role in ("chief", "worker")} if isinstance(cluster, dict) else {}
    roles = {role: len(tasks) for role, tasks in roles.items() if isinstance(tasks, list) and tasks}
    if not roles:
        raise ConfigError(f"TF_CONFIG names no cluster of workers ({text[:200]}); without one every worker would "
                          'train alone as chief: give {"cluster": {"worker": ["host:port", ...]}, "task": {"type": '
                          '"worker", "index": N}}')
    task = config.get("task")
    kind, index = (task.get("type"), task.get("index")) if isinstance(task, dict) else (None, None)
    if type(index) is not int or not 0 <= index < roles.get(kind, 0):
        raise ConfigError(f"TF_CONFIG's task {task!r} is not one of its cluster's "
                          f"({', '.join(f'{n} {role}' for role, n in roles.items())})")


def _multi_worker(all_reduce: str, collective_timeout: float) -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy from TF_CONFIG; it must be created before TensorFlow
    initialises (hence physical, not logical, device listing here)."""
    check_tf_config(os.environ.get("TF_CONFIG", ""))
    gpus = tf.config.list_physical_devices("GPU")
    implementation = tf.distribute.experimental.CommunicationImplementation
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=implementation.NCCL if gpus and all_reduce in ("auto", "nccl") else implementation.RING,
        timeout_seconds=collective_timeout or None,
    )
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    return _patch_collective_reduce(strategy)


def create_strategy(
    name: str = "default",
    num_gpus: int | None = None,
    tpu_address: str = "",
    all_reduce: str = "auto",
    collective_timeout: float = 0.0,
) -> tf.distribute.Strategy:
    """Returns the strategy called ``name``; everything creating variables must run in its scope.

    * ``default``: no distribution (one device).
    * ``one_device``: OneDeviceStrategy on the first GPU, else the CPU.
    * ``mirrored``: MirroredStrategy over all GPUs, else over all logical CPUs.
    * ``multi_worker``: MultiWorkerMirroredStrategy configured from ``TF_CONFIG``; with
      ``collective_timeout`` > 0 a collective that waits longer (a worker died) fails instead of hanging.
    * ``tpu``: TPUStrategy on ``tpu_address`` (written to the TF docs; untested here).
    """
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "multi_worker":
        return _multi_worker(all_reduce, collective_timeout)
    gpus = tf.config.list_logical_devices("GPU")
    if num_gpus is not None:
        gpus = gpus[:num_gpus]
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        cross = None
        if gpus and all_reduce == "hierarchical_copy":
            cross = tf.distribute.HierarchicalCopyAllReduce()
        elif gpus and all_reduce == "nccl":
            cross = tf.distribute.NcclAllReduce()
        elif not gpus:
            # NCCL is GPU-only; reduce through the host instead.
            cross = tf.distribute.ReductionToOneDevice()
        return tf.distribute.MirroredStrategy(devices=devices, cross_device_ops=cross)
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_address)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as e:  # no TPU named, found or reachable
        where = f"--tpu_address={tpu_address}" if tpu_address else "no --tpu_address (nor TPU_NAME)"
        raise ConfigError(f"--strategy=tpu: {where}: {' '.join(str(e).split())[:200]}") from None
    return tf.distribute.TPUStrategy(resolver)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the worker that writes shared outputs (always true outside multi-worker)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    return chief_task(resolver.cluster_spec().as_dict(), resolver.task_type, resolver.task_id)


def chief_task(cluster: dict, task_type: str | None, task_id: int | None) -> bool:
    """TensorFlow's rule: the ``chief`` task when the cluster has one, else worker 0."""
    if task_type is None:
        return True
    if cluster.get("chief"):
        return task_type == "chief"
    return task_type == "worker" and task_id == 0


def replica_values(strategy: tf.distribute.Strategy, value: float) -> list[float]:
    """``value`` as every replica of a multi-worker strategy has it, in replica order (``[value]`` otherwise).
    A collective: every worker must call it at the same point of the program."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return [value]

    @tf.function
    def gather():
        return strategy.run(
            lambda: tf.distribute.get_replica_context().all_gather(tf.constant([value], tf.float32), axis=0))

    return [float(v) for v in strategy.experimental_local_results(gather())[0].numpy()]


def worker_id(strategy: tf.distribute.Strategy) -> str:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type is None:
        return "chief"
    return f"{resolver.task_type}_{resolver.task_id}"


def onednn_enabled() -> bool:
    """Whether TensorFlow runs its oneDNN CPU kernels (``fer_keras`` turns them on; see ``__init__``)."""
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


def describe(strategy: tf.distribute.Strategy) -> str:
    kind = type(strategy).__name__
    logging.debug("strategy %s", kind)
    return f"{kind} with {strategy.num_replicas_in_sync} replica(s)"
