"""Optimizers, learning-rate schedules and gradient clipping for the training loops."""

import dataclasses

import keras
import tensorflow as tf

from s2s_tf import config_io
from s2s_tf.config_io import setting

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine", "step")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer and learning-rate schedule.

    Attributes:
      name: "adam" or "sgd" (with `momentum`, Nesterov off).
      learning_rate: peak learning rate.
      schedule: "constant", "cosine" (to 0 at the last step, after an optional
        linear warm-up) or "step" (multiplied by `step_factor` at each fraction
        of training in `step_boundaries`).
      warmup_steps: linear warm-up steps for "cosine".
      step_boundaries: fractions of the total steps where "step" decays.
      step_factor: the decay factor of "step".
      momentum: SGD momentum.
      weight_decay: decoupled weight decay (AdamW / SGDW style), 0 for none.
      clip_global_norm: clip gradients to this global norm after they are
        summed over replicas; None for no clipping.
    """

    name: str = setting("adam", "Optimizer.", flag="optimizer", choices=OPTIMIZERS)
    learning_rate: float = setting(1e-3, "Peak learning rate.", check=config_io.check_positive)
    schedule: str = setting("constant", "LR schedule.", flag="lr_schedule", choices=SCHEDULES)
    warmup_steps: int = setting(0, "Linear warm-up steps (cosine).", lower_bound=0)
    step_boundaries: tuple = (0.5, 0.75)
    step_factor: float = 0.1
    momentum: float = setting(0.9, "SGD momentum.", lower_bound=0, upper_bound=0.999)
    weight_decay: float = setting(0.0, "Decoupled weight decay.", lower_bound=0)
    clip_global_norm: float | None = setting(
        None, "Clip gradients to this global norm.", kind="float", check=config_io.check_positive
    )

    def validate(self):
        """Raises ValueError naming the first invalid field."""
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.name!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError("warmup_steps and weight_decay must be >= 0, momentum in [0, 1)")
        if any(not 0 < b < 1 for b in self.step_boundaries):
            raise ValueError(
                f"step_boundaries must be fractions in (0, 1), got {self.step_boundaries}"
            )
        if self.clip_global_norm is not None and not self.clip_global_norm > 0:
            raise ValueError(f"clip_global_norm must be > 0, got {self.clip_global_norm}")


def build_schedule(config, total_steps):
    """Returns the learning rate (a float or a Keras schedule) for `total_steps` of training."""
    lr = config.learning_rate
    if config.schedule == "constant":
        return lr
    if config.schedule == "cosine":
        warmup = min(config.warmup_steps, max(total_steps - 1, 0))
        return keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup else lr,
            decay_steps=max(total_steps - warmup, 1),
            warmup_target=lr if warmup else None,
            warmup_steps=warmup,
        )
    boundaries = sorted({max(1, int(b * total_steps)) for b in config.step_boundaries})
    values = [lr * config.step_factor**i for i in range(len(boundaries) + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def build_optimizer(config, total_steps, mixed_precision=False):
    """Builds the Keras optimizer; clipping is done by the trainer (see `clip_gradients`).

    Keras clips (`clipnorm`/`global_clipnorm`) each replica's partial gradient
    before the cross-replica sum, which changes results with the number of
    replicas, so clipping is not delegated to the optimizer.

    Args:
      config: an `OptimizerConfig`.
      total_steps: steps of training, for the schedules.
      mixed_precision: wrap in a `LossScaleOptimizer` (dynamic loss scaling).

    Returns:
      A `keras.optimizers.Optimizer`.
    """
    config.validate()
    schedule = build_schedule(config, total_steps)
    decay = config.weight_decay or None
    if config.name == "adam":
        optimizer = keras.optimizers.Adam(schedule, weight_decay=decay)
    else:
        optimizer = keras.optimizers.SGD(schedule, momentum=config.momentum, weight_decay=decay)
    if mixed_precision:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def current_learning_rate(optimizer):
    """The learning rate the next step will use, as a float."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return float(keras.ops.convert_to_numpy(inner.learning_rate))


def clip_gradients(grads, clip_norm, num_replicas):
    """Clips the *summed* gradient by global norm, inside a replica context.

    Each replica holds a partial gradient (losses are averaged over the global
    batch, so the replicas' gradients sum to the full one). To clip the full
    gradient it is all-reduced here; the optimizer sums replicas again, so each
    replica passes on 1/num_replicas of the clipped sum.

    Args:
      grads: this replica's gradients.
      clip_norm: the global-norm bound, or None to return `grads` unchanged.
      num_replicas: replicas in sync.

    Returns:
      The gradients to hand to `optimizer.apply`.
    """
    if clip_norm is None:
        return grads
    if num_replicas > 1:
        context = tf.distribute.get_replica_context()
        grads = context.all_reduce(tf.distribute.ReduceOp.SUM, grads)
    grads, _ = tf.clip_by_global_norm(grads, clip_norm)
    if num_replicas > 1:
        grads = [g / num_replicas for g in grads]
    return grads
