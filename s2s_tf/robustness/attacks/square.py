"""Square Attack under an L-inf budget: a score-based random search, no gradients.

Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient black-box
adversarial attack via random search" (ECCV 2020), following the behaviour of the
reference implementation (fra31/auto-attack, `square.py`): start from vertical stripes of
+-eps, then at each iteration overwrite one square window per example with a random +-eps
value per channel (relative to the clean image), and keep the candidate only if it lowers
the example's margin. The window's side follows the reference's schedule for p, the
fraction of pixels changed, halved at fixed iterations rescaled to `steps`.

It is one `tf.while_loop` over the queries, and all random draws are per example, so with
per-example seeds an example's result does not depend on its batch. The draws are
TensorFlow's stateless Philox numbers (the same as `iterates.per_example_uniform`'s),
computed for the whole batch at once by `philox`, 100 iterations at a time, and turned
into that chunk's windows in one go. A query then writes only its windows' rows, so it
costs little more than the model's forward pass, even for small models on CPU.
"""

import collections

import tensorflow as tf

from s2s_tf.robustness.attacks import base
from s2s_tf.robustness.attacks import iterates
from s2s_tf.robustness.attacks import philox
from s2s_tf.robustness.attacks import registry

# The reference halves p after these iterations, counted out of 10000 queries.
_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
# Random numbers are drawn, and windows planned, this many iterations at a time: it
# amortises the few hundred small ops of a draw over many queries.
_CHUNK = 100

# The images are held as rows [N * H, W * C], so that a window is a set of rows to gather
# and write back. x_cur: the current points; best_is_cur: per example, whether the best
# point is `x_cur` (1) or the clean input (0): Square only moves `x_cur` when its margin
# drops, so the best point is always one of the two, and a flag saves an image-sized
# select per query.
_State = collections.namedtuple(
    "_State", "i plan x_cur margin_cur best_is_cur best_loss best_success violation"
)
# One chunk's windows: side [_CHUNK] int32; first_row [N, _CHUNK] int32, the window's top
# row as an index into the rows; step [N, _CHUNK, W * C], the signed jump in the window's
# columns and 0 elsewhere (see `_query`).
_Plan = collections.namedtuple("_Plan", "side first_row step")
# uniform(shape, salt): per-example uniforms [N, *shape]; bounds: the rows of lo and hi
# (clean -+ eps, clipped) side by side, [N * H, 2 * W * C]; jump: a scalar step that
# leaves [lo, hi] from anywhere in it.
_Setup = collections.namedtuple(
    "_Setup", "model_fn x y eps steps p_init targeted uniform bounds jump clip_min clip_max trace"
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
    """The side of iteration `i`'s square, as the reference computes it (elementwise in `i`).

    The iteration is rescaled to a 10000-query budget, p is p_init halved once per
    schedule point passed, and the side is round(sqrt(p * height * width)), at least 1
    and at most the image's shorter side.
    """
    # float64 and floor match the reference's Python `int(i / n_queries * 10000)`.
    it = tf.floor(tf.cast(i, tf.float64) / tf.cast(steps, tf.float64) * 10000.0)
    passed = tf.cast(it[..., None] > tf.constant(_SCHEDULE, tf.float64), tf.float64)
    halvings = tf.reduce_sum(passed, axis=-1)
    p = tf.cast(p_init, tf.float64) / tf.pow(tf.constant(2.0, tf.float64), halvings)
    # In the reference's order, p * n_features / c; tf.round, like Python's, rounds to even.
    side = tf.cast(tf.round(tf.sqrt(p * (height * width * channels) / channels)), tf.int32)
    return tf.clip_by_value(side, 1, min(height, width))


def _uniform_fn(seed, x):
    """uniform(shape, salt) -> [N, *shape], equal to `iterates.per_example_uniform`'s draws.

    With per-example seeds it draws for the whole batch in one go (`philox`); with one
    seed for the batch TensorFlow's kernel already does.
    """
    if seed.shape.rank == 1:
        n = tf.shape(x)[0]
        draw = lambda shape, salt: iterates.per_example_uniform(  # noqa: E731
            shape, seed, batch_size=n, salt=salt
        )
    else:
        # The first half of every folded seed depends on the seed only: compute it once.
        head = philox.folded_seed_head(seed)
        draw = lambda shape, salt: philox.uniform_from_head(shape, head, salt)  # noqa: E731

    def uniform(shape, salt):
        u = draw(shape, salt)
        u.set_shape([x.shape[0], *shape])  # the loop state needs a fixed static shape
        return u

    return uniform


def _window_start(u, size, side):
    """The window's first index (int32) from uniforms `u`, as the reference draws it.

    A uniform integer in [0, size - side), 0 when the window spans the image, as the
    reference's `random_int(0, size - side)`.
    """
    top = size - side
    start = tf.cast(tf.floor(u * tf.cast(top, tf.float32)), tf.int32)
    return tf.clip_by_value(start, 0, tf.maximum(top - 1, 0))  # guards float rounding


def _plan(setup, chunk):
    """The windows of iterations [chunk * _CHUNK, (chunk + 1) * _CHUNK), as a `_Plan`.

    Per iteration and example the draw is [row, column, one sign per channel], uniforms
    from salt chunk + 1 (salt 0 draws the stripes).
    """
    _, height, width, channels = setup.x.shape
    r = setup.uniform((_CHUNK, 2 + channels), chunk + 1)  # [N, _CHUNK, 2 + C]
    side = square_side(
        chunk * _CHUNK + tf.range(_CHUNK), setup.steps, setup.p_init, height, width, channels
    )
    top = _window_start(r[..., 0], height, side)  # [N, _CHUNK]
    left = _window_start(r[..., 1], width, side)[..., None]
    columns = tf.range(width)
    in_columns = (columns >= left) & (columns < left + side[:, None])  # [N, _CHUNK, W]
    jump = tf.where(r[..., 2:] < 0.5, -setup.jump, setup.jump)  # [N, _CHUNK, C]
    step = tf.cast(in_columns, tf.float32)[..., None] * jump[:, :, None, :]
    first_row = tf.range(tf.shape(r)[0])[:, None] * height + top
    return _Plan(side, first_row, tf.reshape(step, [-1, _CHUNK, width * channels]))


def _query(setup, s):
    """The candidates of iteration `s.i`: `s.x_cur` with each example's window set.

    Returns:
        (candidates as rows [N * H, W * C], the window's row indices [N * side, 1], and
        those rows' values before and after, each [N, side, W * C]).
    """
    j = s.i % _CHUNK
    side = s.plan.side[j]
    index = tf.reshape(s.plan.first_row[:, j, None] + tf.range(side)[None], [-1])
    row_len = s.x_cur.shape[1]
    per_example = [tf.shape(s.plan.first_row)[0], side, row_len]
    old = tf.reshape(tf.gather(s.x_cur, index), per_example)
    bounds = tf.reshape(tf.gather(setup.bounds, index), per_example[:2] + [2 * row_len])
    # Every point of the search lies in [lo, hi] (clean -+ eps, clipped). A jump beyond
    # that interval, clipped back, lands exactly on lo or hi in the window's columns (as
    # the reference sets it); elsewhere, adding 0 and clipping leaves the point as it is.
    new = old + s.plan.step[:, j, None]
    new = tf.minimum(tf.maximum(new, bounds[..., :row_len]), bounds[..., row_len:])
    index = index[:, None]
    x_new = tf.tensor_scatter_nd_update(s.x_cur, index, tf.reshape(new, [-1, row_len]))
    return x_new, index, old, new


def _violation(setup, old, rows):
    """The largest budget or range violation so far, with `rows` (a query's points) in it."""
    if not setup.trace:
        return old
    adv = tf.reshape(rows, tf.shape(setup.x))
    new = iterates.budget_violation(setup.x, adv, setup.eps, setup.clip_min, setup.clip_max)
    return tf.maximum(old, new)


def _step(setup, s):
    """One query: propose a window per example, keep it where the margin drops."""
    # Iteration 0's plan comes with the initial state.
    new_chunk = tf.equal(s.i % _CHUNK, 0) & (s.i > 0)
    plan = tf.cond(new_chunk, lambda: _plan(setup, s.i // _CHUNK), lambda: s.plan)
    s = s._replace(plan=plan)
    x_new, index, old, new = _query(setup, s)
    logits = base.logits(setup.model_fn, tf.reshape(x_new, tf.shape(setup.x)))
    margin = margin_loss(logits, setup.y, setup.targeted)
    # Fooled examples stop changing; others move only when the margin improves.
    accept = tf.logical_not(s.best_success) & (margin < s.margin_cur)
    violation = _violation(setup, s.violation, x_new)
    # The next point: the candidate with the old window rows put back where rejected.
    # (Select v1 with a vector condition picks whole examples, cheaper than tf.where.)
    n = tf.shape(accept)[0]
    kept = tf.raw_ops.Select(
        condition=accept, x=tf.reshape(new, [n, -1]), y=tf.reshape(old, [n, -1])
    )
    x_cur = tf.tensor_scatter_nd_update(x_new, index, tf.reshape(kept, [-1, x_new.shape[1]]))
    margin_cur = tf.where(accept, margin, s.margin_cur)
    success = accept & iterates.misclassified(logits, setup.y, setup.targeted)
    ones = tf.ones_like(s.best_is_cur)
    best = iterates.update_best(
        s.best_is_cur, s.best_loss, s.best_success, ones, -margin_cur, success
    )
    return _State(s.i + 1, plan, x_cur, margin_cur, *best, violation)


def _square(model_fn, x, y, eps, *, steps, p_init, targeted, seed, clip_min, clip_max, trace=False):
    """Square Attack; returns an `iterates.AttackResult` (loss = -margin)."""
    x, y, eps, _ = base.prepare(x, y, eps, None)
    if x.shape.rank != 4 or None in x.shape[1:]:
        raise ValueError(f"square_linf needs images [N, H, W, C] of static size, got {x.shape}")
    _, _, width, channels = x.shape
    n = tf.shape(x)[0]
    uniform = _uniform_fn(iterates.check_seed(seed, x.shape[0]), x)
    lo = tf.clip_by_value(x - eps, clip_min, clip_max)
    hi = tf.clip_by_value(x + eps, clip_min, clip_max)
    # From any p >= lo, p + 2 (max hi - min lo) >= hi, and it stays so after rounding.
    jump = 2.0 * (tf.reduce_max(hi) - tf.reduce_min(lo))
    as_rows = lambda t: tf.reshape(t, [-1, width * channels])  # noqa: E731
    bounds = tf.concat([as_rows(lo), as_rows(hi)], axis=1)
    setup = _Setup(
        model_fn, x, y, eps, steps, p_init, targeted, uniform, bounds, jump,
        clip_min, clip_max, trace,
    )  # fmt: skip
    clean = base.logits(model_fn, x)
    _, loss, success = iterates.init_best(x, iterates.misclassified(clean, y, targeted))
    # Vertical stripes: one sign per column and channel, constant down the image.
    x0 = tf.where(uniform((1, width, channels), 0) < 0.5, lo, hi)
    logits = base.logits(model_fn, x0)
    margin = margin_loss(logits, y, targeted)
    fooled = iterates.misclassified(logits, y, targeted)
    best = iterates.update_best(tf.zeros([n]), loss, success, tf.ones([n]), -margin, fooled)
    violation = _violation(setup, tf.constant(0.0), x0)
    state = _State(tf.constant(0), _plan(setup, 0), as_rows(x0), margin, *best, violation)

    def cond(s):
        # Once every example is fooled nothing changes any more.
        return (s.i < steps) & tf.logical_not(tf.reduce_all(s.best_success))

    final = tf.while_loop(cond, lambda s: (_step(setup, s),), (state,))[0]
    x_cur = tf.reshape(final.x_cur, tf.shape(x))
    best_x = iterates.select(final.best_is_cur > 0.5, x_cur, x)
    return iterates.AttackResult(best_x, final.best_loss, final.best_success, final.violation)


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
