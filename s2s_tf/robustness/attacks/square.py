"""Square Attack under an L-inf budget: a score-based random search, no gradients.

Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient black-box
adversarial attack via random search" (ECCV 2020), following the behaviour of the
reference implementation (fra31/auto-attack, `square.py`): start from vertical stripes of
+-eps, then at each iteration overwrite one square window per example with a random +-eps
value per channel (relative to the clean image), and keep the candidate only if it lowers
the example's margin. The window's side follows the reference's schedule for p, the
fraction of pixels changed, halved at fixed iterations rescaled to `steps`.

It is one `tf.while_loop` over the queries, and all random draws are per example, so with
per-example seeds an example's result does not depend on its batch.
"""

import collections

import tensorflow as tf

from s2s_tf.robustness.attacks import base
from s2s_tf.robustness.attacks import iterates
from s2s_tf.robustness.attacks import registry

# The reference halves p after these iterations, counted out of 10000 queries.
_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
# Per-example random numbers are drawn this many iterations at a time: stateless draws
# have no batched kernel, so each draw loops over the examples, and chunking amortises it.
_CHUNK = 100

_State = collections.namedtuple(
    "_State", "i draws x_cur margin_cur best_x best_loss best_success violation"
)
_Setup = collections.namedtuple(
    "_Setup", "model_fn x y eps steps p_init targeted seeds clip_min clip_max trace"
)


def margin_loss(logits, y, targeted):
    """The margin the attack minimises; at or below 0 the example is (about to be) fooled.

    Untargeted: z_y - max_{i != y} z_i. Targeted (y = target): max_{i != y} z_i - z_y.
    """
    z_y = tf.gather(logits, y, batch_dims=1)
    is_y = tf.one_hot(y, tf.shape(logits)[-1], on_value=True, off_value=False)
    best_other = tf.reduce_max(tf.where(is_y, -float("inf"), logits), axis=-1)
    return best_other - z_y if targeted else z_y - best_other


def square_side(i, steps, p_init, height, width, channels):
    """The side of iteration `i`'s square, as the reference computes it.

    The iteration is rescaled to a 10000-query budget, p is p_init halved once per
    schedule point passed, and the side is round(sqrt(p * height * width)), at least 1
    and at most the image's shorter side.
    """
    # float64 and floor match the reference's Python `int(i / n_queries * 10000)`.
    it = tf.floor(tf.cast(i, tf.float64) / tf.cast(steps, tf.float64) * 10000.0)
    halvings = tf.reduce_sum(tf.cast(it > tf.constant(_SCHEDULE, tf.float64), tf.float64))
    p = tf.cast(p_init, tf.float64) / tf.pow(tf.constant(2.0, tf.float64), halvings)
    # In the reference's order, p * n_features / c; tf.round, like Python's, rounds to even.
    side = tf.cast(tf.round(tf.sqrt(p * (height * width * channels) / channels)), tf.int32)
    return tf.clip_by_value(side, 1, min(height, width))


def _project(setup, adv):
    return base.project(setup.x, adv, setup.eps, base.LINF, setup.clip_min, setup.clip_max)


def _violation(setup, old, adv):
    if not setup.trace:
        return old
    new = iterates.budget_violation(setup.x, adv, setup.eps, setup.clip_min, setup.clip_max)
    return tf.maximum(old, new)


def _draws(setup, chunk):
    """Uniforms [N, _CHUNK, 2 + C]: per iteration a window corner and channel signs."""
    x = setup.x
    return iterates.per_example_uniform(
        [_CHUNK, 2 + x.shape[3]], setup.seeds, batch_size=tf.shape(x)[0], salt=chunk + 1
    )


def _candidate(setup, x_cur, r, side):
    """`x_cur` with one square window per example set to clean +- eps per channel.

    Args:
        setup: the run's `_Setup`.
        x_cur: [N, H, W, C] current points.
        r: [N, 2 + C] uniforms: window row and column, then one per channel sign.
        side: int32 scalar, the window's side.

    Returns:
        The projected candidates [N, H, W, C].
    """
    _, height, width, _ = setup.x.shape

    def corner(u, size):
        # A uniform integer in [0, size - side), 0 when the window spans the image, as the
        # reference's `random_int(0, size - side)`; the clip guards float rounding.
        top = size - side
        start = tf.cast(tf.floor(u * tf.cast(top, tf.float32)), tf.int32)
        return tf.clip_by_value(start, 0, tf.maximum(top - 1, 0))[:, None]

    rows, cols = tf.range(height)[None], tf.range(width)[None]
    vh, vw = corner(r[:, 0], height), corner(r[:, 1], width)
    in_rows = (rows >= vh) & (rows < vh + side)  # [N, H]
    in_cols = (cols >= vw) & (cols < vw + side)  # [N, W]
    window = tf.cast(in_rows[:, :, None, None] & in_cols[:, None, :, None], tf.float32)
    signs = tf.where(r[:, 2:] < 0.5, -1.0, 1.0)[:, None, None, :]  # [N, 1, 1, C]
    # +-2 eps from a point inside the ball lands, after projection, on clean +- eps.
    return _project(setup, x_cur + 2.0 * setup.eps * signs * window)


def _step(setup, s):
    """One query: propose a window per example, keep it where the margin drops."""
    draws = tf.cond(
        tf.equal(s.i % _CHUNK, 0), lambda: _draws(setup, s.i // _CHUNK), lambda: s.draws
    )
    side = square_side(s.i, setup.steps, setup.p_init, *setup.x.shape[1:])
    x_new = _candidate(setup, s.x_cur, draws[:, s.i % _CHUNK], side)
    logits = base.logits(setup.model_fn, x_new)
    margin = margin_loss(logits, setup.y, setup.targeted)
    # Fooled examples stop changing; others move only when the margin improves.
    accept = tf.logical_not(s.best_success) & (margin < s.margin_cur)
    x_cur = iterates.select(accept, x_new, s.x_cur)
    margin_cur = tf.where(accept, margin, s.margin_cur)
    success = accept & iterates.misclassified(logits, setup.y, setup.targeted)
    best = iterates.update_best(s.best_x, s.best_loss, s.best_success, x_cur, -margin_cur, success)
    return _State(s.i + 1, draws, x_cur, margin_cur, *best, _violation(setup, s.violation, x_new))


def _square(model_fn, x, y, eps, *, steps, p_init, targeted, seed, clip_min, clip_max, trace=False):
    """Square Attack; returns an `iterates.AttackResult` (loss = -margin)."""
    x, y, eps, _ = base.prepare(x, y, eps, None)
    if x.shape.rank != 4 or None in x.shape[1:]:
        raise ValueError(f"square_linf needs images [N, H, W, C] of static size, got {x.shape}")
    _, _, width, channels = x.shape
    n = tf.shape(x)[0]
    seed = iterates.check_seed(seed, x.shape[0])
    setup = _Setup(model_fn, x, y, eps, steps, p_init, targeted, seed, clip_min, clip_max, trace)
    clean = base.logits(model_fn, x)
    best = iterates.init_best(x, iterates.misclassified(clean, y, targeted))
    # Vertical stripes: one sign per column and channel, constant down the image.
    stripes = iterates.per_example_uniform([1, width, channels], seed, batch_size=n, salt=0)
    x0 = _project(setup, x + eps * tf.where(stripes < 0.5, -1.0, 1.0))
    logits = base.logits(model_fn, x0)
    margin = margin_loss(logits, y, targeted)
    best = iterates.update_best(*best, x0, -margin, iterates.misclassified(logits, y, targeted))
    draws = tf.zeros([n, _CHUNK, 2 + channels])
    violation = _violation(setup, tf.constant(0.0), x0)
    state = _State(tf.constant(0), draws, x0, margin, *best, violation)

    def cond(s):
        # Once every example is fooled nothing changes any more.
        return (s.i < steps) & tf.logical_not(tf.reduce_all(s.best_success))

    final = tf.while_loop(cond, lambda s: (_step(setup, s),), (state,))[0]
    return iterates.AttackResult(final.best_x, final.best_loss, final.best_success, final.violation)


def square_linf(
    model_fn,
    x,
    y,
    eps,
    *,
    steps=1000,
    step_size=None,
    targeted=False,
    seed=None,
    clip_min=0.0,
    clip_max=1.0,
    p_init=0.8,
):
    """Square Attack in L-inf: gradient-free, one model query per step.

    Args:
        model_fn: maps float32 images [N, H, W, C] in [clip_min, clip_max] to logits.
        x: clean images [N, H, W, C] (static H, W, C).
        y: int32 [N]: true labels, or target labels when `targeted`.
        eps: L-inf budget in pixel units (float or scalar tensor).
        steps: queries after the initial one (the reference's n_queries); the p
            schedule is rescaled to it.
        step_size: must be None: Square has no step size (kept for the shared signature).
        targeted: push the prediction to `y` instead of away from it.
        seed: stateless seed, int64 [2] for the batch or [N, 2] per example. None
            means (0, 0).
        clip_min: lower end of the valid pixel range.
        clip_max: upper end of the valid pixel range.
        p_init: initial fraction of pixels in a square (reference 0.8).

    Returns:
        float32 tensor shaped like `x`: per example the first fooling point found, else
        the point with the lowest margin (the clean input only if it is already fooled).

    Raises:
        ValueError: if `step_size` is set or `x` is not a batch of static-size images.
    """
    if step_size is not None:
        raise ValueError("square_linf has no step size; leave step_size=None")
    return _square(
        model_fn,
        x,
        y,
        eps,
        steps=steps,
        p_init=p_init,
        targeted=targeted,
        seed=seed,
        clip_min=clip_min,
        clip_max=clip_max,
    ).x


# AutoAttack's standard version runs 5000 queries; 1000 is a cheaper default.
DEFAULTS = {"square_linf": {"steps": 1000, "p_init": 0.8}}


registry.register(
    "square",
    registry.AttackSpec(
        square_linf,
        base.LINF,
        False,
        True,
        "Square attack (L-inf, score-based: forward passes only).",
        DEFAULTS["square_linf"],
        stochastic=True,
    ),
)
