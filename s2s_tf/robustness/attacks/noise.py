"""Uniform random noise in the L-inf ball: a baseline and a fast test attack."""

import tensorflow as tf

from s2s_tf.robustness.attacks import base
from s2s_tf.robustness.attacks import registry


def testing(model_fn, x, y, eps, *, seed=None, clip_min=0.0, clip_max=1.0, **unused):
    """Uniform random noise in the L-inf ball: a baseline and a fast test attack."""
    del model_fn, unused
    x, _, eps, seed = base.prepare(x, y, eps, seed)
    noise = eps * base.random_start(x, 1.0, base.LINF, seed)  # [2] or per-example seeds
    return tf.clip_by_value(x + noise, clip_min, clip_max)


registry.register(
    "testing",
    registry.AttackSpec(
        testing, base.LINF, False, False, "Uniform noise in the L-inf ball.", stochastic=True
    ),
)
