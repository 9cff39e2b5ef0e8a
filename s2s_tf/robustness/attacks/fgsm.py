"""FGSM: one signed-gradient step (Goodfellow et al. 2015)."""

import numpy as np
from cleverhans.tf2.attacks.fast_gradient_method import fast_gradient_method

from s2s_tf.robustness.attacks import base
from s2s_tf.robustness.attacks import registry


def fgsm(model_fn, x, y, eps, *, targeted=False, clip_min=0.0, clip_max=1.0, **unused):
    """Fast gradient sign method (Goodfellow et al. 2015), CleverHans' implementation."""
    del unused  # steps, step_size, seed: one deterministic step of size eps
    x, y, eps, _ = base.prepare(x, y, eps, None)
    return fast_gradient_method(
        model_fn, x, eps, np.inf, clip_min=clip_min, clip_max=clip_max, y=y, targeted=targeted
    )


registry.register(
    "fgsm",
    registry.AttackSpec(
        fgsm, base.LINF, True, False, "FGSM: one signed-gradient step of size eps."
    ),
)
