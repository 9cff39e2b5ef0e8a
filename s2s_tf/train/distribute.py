"""tf.distribute strategies by name, and the checks that go with them.

- "mirrored": all local GPUs; without GPUs, all logical CPU devices (one
  unless `split_cpu` made more), so the same code runs on a laptop.
- "multi_worker": `MultiWorkerMirroredStrategy` configured from `TF_CONFIG`,
  for jobs that outgrow one machine.
- "one_device": the first GPU, else the CPU.
"""

import json
import os

import tensorflow as tf

from s2s_tf import constants


def split_cpu(num_devices):
    """Splits the physical CPU into `num_devices` logical devices (for testing replicas).

    Must run before TensorFlow initialises its devices (before any op runs).

    Args:
      num_devices: number of logical CPU devices; 0 or 1 leaves the CPU as is.

    Raises:
      RuntimeError: when TensorFlow has already initialised its devices with a
        different layout.
    """
    if num_devices <= 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    wanted = [tf.config.LogicalDeviceConfiguration()] * num_devices
    try:
        tf.config.set_logical_device_configuration(cpu, wanted)
    except RuntimeError as e:
        if len(tf.config.list_logical_devices("CPU")) != num_devices:
            raise RuntimeError(
                f"cannot split the CPU into {num_devices} devices: TensorFlow is already "
                "initialised; call split_cpu before any TensorFlow op runs"
            ) from e


def create_strategy(name="mirrored"):
    """Creates a `tf.distribute.Strategy` by name (see the module docstring).

    Args:
      name: one of `constants.STRATEGIES`.

    Returns:
      The strategy.

    Raises:
      ValueError: for an unknown name, or "multi_worker" without a valid TF_CONFIG.
    """
    if name not in constants.STRATEGIES:
        raise ValueError(f"strategy must be one of {constants.STRATEGIES}, got {name!r}")
    if name == "multi_worker":
        # Before anything lists devices: that initialises the runtime, and collective
        # ops can only be configured before it is.
        check_tf_config()
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if gpus:
        return tf.distribute.MirroredStrategy()
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    # Without GPUs MirroredStrategy would use one CPU device; name them all so a
    # split CPU gives several replicas.
    return tf.distribute.MirroredStrategy(
        cpus, cross_device_ops=tf.distribute.ReductionToOneDevice()
    )


def check_tf_config():
    """Checks that TF_CONFIG describes a multi-worker cluster and names this task.

    Raises:
      ValueError: naming what is missing.
    """
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ValueError(
            "--strategy=multi_worker needs the TF_CONFIG environment variable, e.g. "
            '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
            '"task": {"type": "worker", "index": 0}}'
        )
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON: {e}") from None
    cluster, task = config.get("cluster"), config.get("task")
    if not cluster or not task or "type" not in task or "index" not in task:
        raise ValueError(f"TF_CONFIG needs 'cluster' and 'task' with type and index, got {raw}")


def check_global_batch(global_batch_size, strategy):
    """Raises ValueError unless the global batch splits evenly over the replicas."""
    replicas = strategy.num_replicas_in_sync
    if global_batch_size % replicas:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the "
            f"{replicas} replicas; use a multiple of {replicas}"
        )


def is_chief(strategy):
    """Whether this process writes summaries, configs and final models.

    With `MultiWorkerMirroredStrategy` every worker must save checkpoints (the
    save is collective), but only the chief's copy is the real one.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker"
        and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict()
    )
