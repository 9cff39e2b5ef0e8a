"""MIM: the momentum iterative method (Dong et al. 2018), L-inf."""

import numpy as np
import tensorflow as tf
from cleverhans.tf2.utils import optimize_linear

from s2s_tf.robustness.attacks import base
from s2s_tf.robustness.attacks import registry


def mim(
    model_fn,
    x,
    y,
    eps,
    *,
    steps=10,
    step_size=None,
    targeted=False,
    seed=None,
    clip_min=0.0,
    clip_max=1.0,
    decay_factor=1.0,
):
    """Momentum iterative method (Dong et al. 2018), L-inf.

    CleverHans' update (gradient normalised by its mean absolute value,
    accumulated with `decay_factor`, sign step) in a `tf.while_loop`; CleverHans'
    own function asserts on tensors and cannot be compiled. `step_size`
    defaults to eps / steps, as in the paper. Returns the best iterate per
    example (see `base.best_iterate_loop`).
    """
    del seed
    x, y, eps, _ = base.prepare(x, y, eps, None)
    step_size = eps / steps if step_size is None else tf.cast(step_size, tf.float32)
    axes = list(range(1, len(x.shape)))

    def update(adv, grad, state):
        grad /= tf.maximum(1e-12, tf.reduce_mean(tf.abs(grad), axes, keepdims=True))
        momentum = decay_factor * state[0] + grad
        adv = adv + optimize_linear(momentum, step_size, np.inf)
        return base.project(x, adv, eps, base.LINF, clip_min, clip_max), (momentum,)

    return base.best_iterate_loop(
        model_fn, x, y, x, update, steps, targeted=targeted, state=(tf.zeros_like(x),)
    )


registry.register(
    "mim",
    registry.AttackSpec(
        mim,
        base.LINF,
        True,
        True,
        "Momentum iterative method (L-inf).",
        {"steps": 10, "step_size_factor": 1.0, "decay_factor": 1.0},
    ),
)
