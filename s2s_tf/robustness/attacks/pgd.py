"""PGD in L-inf and L2 (Madry et al. 2018) and BIM (Kurakin et al. 2017)."""

import tensorflow as tf
from cleverhans.tf2.utils import optimize_linear

from s2s_tf.robustness.attacks import base
from s2s_tf.robustness.attacks import registry


def pgd(
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
    norm=base.LINF,
    rand_init=True,
):
    """Projected gradient descent (Madry et al. 2018) on the cross-entropy.

    CleverHans' PGD step (`optimize_linear`, `clip_eta`) in a `tf.while_loop`,
    so the loop compiles to one graph of any length. `rand_init` starts from a
    uniform point of the `norm` ball drawn with `seed` (int64 [2], or [N, 2]
    per example); without it this is BIM. `step_size` defaults to
    2.5 * eps / steps. Returns the best iterate per example (see
    `base.best_iterate_loop`), not the last one.
    """
    x, y, eps, seed = base.prepare(x, y, eps, seed)
    step_size = 2.5 * eps / steps if step_size is None else tf.cast(step_size, tf.float32)
    adv = x
    if rand_init:
        adv = base.project(
            x, x + base.random_start(x, eps, norm, seed), eps, norm, clip_min, clip_max
        )

    def update(adv, grad, state):
        adv = adv + optimize_linear(grad, step_size, base.ORD[norm])
        return base.project(x, adv, eps, norm, clip_min, clip_max), state

    return base.best_iterate_loop(model_fn, x, y, adv, update, steps, targeted=targeted)


def bim(model_fn, x, y, eps, **kwargs):
    """Basic iterative method (Kurakin et al. 2017): L-inf PGD without random start."""
    return pgd(model_fn, x, y, eps, norm=base.LINF, rand_init=False, **kwargs)


def pgd_l2(model_fn, x, y, eps, **kwargs):
    """L2 PGD with a random start in the L2 ball; `eps` is the L2 radius in pixel units."""
    return pgd(model_fn, x, y, eps, norm=base.L2, rand_init=True, **kwargs)


registry.register(
    "bim",
    registry.AttackSpec(
        bim,
        base.LINF,
        True,
        True,
        "BIM: iterative FGSM from the clean image.",
        {"steps": 10, "step_size_factor": 2.5},
    ),
)
registry.register(
    "pgd",
    registry.AttackSpec(
        pgd,
        base.LINF,
        True,
        True,
        "PGD (L-inf) from a random start; restarts keep the strongest.",
        {"steps": 10, "step_size_factor": 2.5},
        stochastic=True,
    ),
)
registry.register(
    "pgd_l2",
    registry.AttackSpec(
        pgd_l2,
        base.L2,
        True,
        True,
        "PGD (L2) from a random start in the L2 ball.",
        {"steps": 10, "step_size_factor": 2.5},
        stochastic=True,
    ),
)
