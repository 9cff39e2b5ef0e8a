"""FAB-T: the targeted Fast Adaptive Boundary attack, minimum-norm in L-inf.

Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive boundary
attack" (ICML 2020), following the reference implementation (fra31/auto-attack,
`fab_base.py`, `fab_pt.py`, `fab_projections.py`) as AutoAttack's standard suite runs it
(`fab-t`: 100 iterations, 9 target classes, alpha_max 0.1, eta 1.05, beta 0.9).

For each target class t (the clean logits' runners-up, as APGD-T picks them) the attack
linearises f = z_t - z_y at the current iterate x1 (one gradient per step), projects both
x1 and the clean image x0 onto the hyperplane {f = 0} within the clip box (the minimal
L-inf step, `projection_linf`), and moves to a convex combination of the two projections,
overshot by eta and biased towards x0 by alpha <= alpha_max. Whenever the new iterate is
misclassified (any class other than y, as in the reference) it is kept if its distance to
x0 is the smallest so far, and the iterate is pulled back towards x0 by beta. Per example
the result is the smallest-norm adversarial of the first target whose search ends within
`eps`; examples for which none does, and examples misclassified already, are returned
unchanged (AutoAttack's use of FAB inside an eps ball).

Every step and every decision is per example, in one `tf.while_loop` over the steps nested
in one over the targets, so any step count compiles to one graph.

Differences from the reference: every run starts from a random point (x0 plus a uniform
draw scaled to L-inf norm eps / 2, per example from its own seed, salted by the target's
rank), where the reference starts its first restart from x0 itself; here restarts are the
caller's (the runner reruns with new seeds), so no run knows that it is the first. The
projection finds the same minimal step by Newton's method instead of a sort and a binary
search (see `projection_linf`), and the clip range is [clip_min, clip_max] instead of a
fixed [0, 1].
"""

import collections

import tensorflow as tf

from s2s_tf.robustness.attacks import base
from s2s_tf.robustness.attacks import iterates
from s2s_tf.robustness.attacks import registry

_MIN_STEP = 1e-8  # the reference's floor on the projections' norms (alpha stays finite)
# A row of Newton's method in `projection_linf` stops once its lambda moves by at most this
# fraction (it usually stops moving at all within 3 to 6 steps); the cap is a safeguard.
_NEWTON_TOL = 1e-7
_NEWTON_STEPS = 30

# What does not change during one target's run.
_Setup = collections.namedtuple(
    "_Setup", "model_fn x y target alpha_max eta beta clip_min clip_max"
)
# The while_loop state of one run: the iterate, the best adversarial and its norm.
_State = collections.namedtuple("_State", "i x1 adv norm")
# What `_fab_t` returns: per example the output, its L-inf distance to x (0 when
# returned unchanged) and whether it is an adversarial example within eps.
FabResult = collections.namedtuple("FabResult", ["x", "norm", "success"])


def projection_linf(t, w, b, clip_min=0.0, clip_max=1.0):
    """The smallest L-inf step from each `t` onto the hyperplane {z : w.z = b}, in the box.

    Row by row, d minimises ||d||_inf subject to w.(t + d) reaching b and
    clip_min <= t + d <= clip_max: every coordinate moves by the same lambda in the
    direction that brings w.z towards b, unless it hits the box first. Where the
    hyperplane lies beyond the box, d goes to the box corner that comes closest to it.

    The reference sorts the coordinates by their room to the box and binary-searches
    the segment that holds lambda. Here lambda solves g(lambda) = |w.t - b| with
    g(lambda) = sum_i |w_i| min(lambda, room_i), concave, increasing and piecewise
    linear: Newton's method from 0 climbs it from below, never overshoots, and is exact
    once it reaches lambda's segment (the first step is the reference's box-free
    solution). It takes a few elementwise passes where a sort of every row is several
    times slower on a CPU.

    Args:
        t: float32 [M, D] points.
        w: float32 [M, D] hyperplane normals.
        b: float32 [M] offsets.
        clip_min: lower end of the box.
        clip_max: upper end of the box.

    Returns:
        float32 [M, D], the steps d (0 in coordinates where w is 0).
    """
    wt = tf.reduce_sum(w * t, axis=1)
    sign = tf.where(wt - b >= 0.0, 1.0, -1.0)
    w = w * sign[:, None]  # oriented so that the step lowers w.z by `need` >= 0
    need = (wt - b) * sign
    up = w < 0.0  # coordinates that lower w.z by moving up
    abs_w = tf.abs(w)
    room = tf.where(up, clip_max - t, t - clip_min)  # how far each coordinate can move
    feasible = need < tf.reduce_sum(abs_w * room, axis=1)

    def newton(i, lam, active):
        short = need - tf.reduce_sum(abs_w * tf.minimum(lam[:, None], room), axis=1)
        slope = tf.reduce_sum(tf.where(room > lam[:, None], abs_w, 0.0), axis=1)
        step = tf.where(active, tf.maximum(tf.math.divide_no_nan(short, slope), 0.0), 0.0)
        # A row stops once converged, so its result never depends on the other rows.
        return i + 1, lam + step, active & (step > _NEWTON_TOL * (lam + step))

    def cond(i, lam, active):
        del lam
        return (i < _NEWTON_STEPS) & tf.reduce_any(active)

    start = (tf.constant(0), tf.zeros_like(need), feasible)
    lam = tf.while_loop(cond, newton, start)[1]
    # Infeasible rows go to the corner: every coordinate as far as the box allows.
    d = tf.where(feasible[:, None], tf.minimum(lam[:, None], room), room)
    return tf.where(up, d, -d) * tf.cast(tf.not_equal(w, 0.0), t.dtype)


def _linf(v):
    return tf.reduce_max(tf.abs(tf.reshape(v, [tf.shape(v)[0], -1])), axis=1)


def _step(setup, s):
    """One FAB iteration: linearise, project x1 and x0, combine, keep and pull back."""
    x0, y, target = setup.x, setup.y, setup.target
    n = tf.shape(x0)[0]

    def diff(z):  # f = z_t - z_y: the example reaches the target's side at f >= 0
        return tf.gather(z, target, batch_dims=1) - tf.gather(z, y, batch_dims=1)

    _, f, grad = iterates.loss_and_gradient(setup.model_fn, diff, s.x1)
    w = tf.reshape(grad, [n, -1])
    x1_flat = tf.reshape(s.x1, [n, -1])
    b = tf.reduce_sum(w * x1_flat, axis=1) - f  # the linearisation is zero on w.z = b
    d = projection_linf(
        tf.concat([x1_flat, tf.reshape(x0, [n, -1])], 0),
        tf.concat([w, w], 0),
        tf.concat([b, b], 0),
        setup.clip_min,
        setup.clip_max,
    )
    d1 = tf.reshape(d[:n], tf.shape(x0))
    d2 = tf.reshape(d[n:], tf.shape(x0))
    a1 = tf.maximum(_linf(d1), _MIN_STEP)
    a2 = tf.maximum(_linf(d2), _MIN_STEP)
    alpha = iterates.expand_to(tf.clip_by_value(a1 / (a1 + a2), 0.0, setup.alpha_max), x0)
    x1 = (s.x1 + setup.eta * d1) * (1.0 - alpha) + (x0 + setup.eta * d2) * alpha
    x1 = tf.clip_by_value(x1, setup.clip_min, setup.clip_max)
    is_adv = iterates.misclassified(base.logits(setup.model_fn, x1), y, False)
    norm = _linf(x1 - x0)
    better = is_adv & (norm < s.norm)
    return _State(
        i=s.i + 1,
        x1=iterates.select(is_adv, x0 + (x1 - x0) * setup.beta, x1),
        adv=iterates.select(better, x1, s.adv),
        norm=tf.where(better, norm, s.norm),
    )


def _run(setup, start, steps):
    """One FAB run towards `setup.target` from `start`: (best adversarial, its norm or inf)."""
    n = tf.shape(setup.x)[0]
    state = _State(tf.constant(0), start, setup.x, tf.fill([n], float("inf")))
    final = tf.while_loop(lambda s: s.i < steps, lambda s: (_step(setup, s),), (state,))[0]
    return final.adv, final.norm


def _random_start(x, eps, seeds, salt, clip_min, clip_max):
    """The reference's restart point: x0 + r * u / max|u|, u uniform in [-1, 1]^d.

    r is eps / 2, capped at half the clip range (so that eps = inf, no budget, stays finite).
    """
    shape = x.shape[1:] if x.shape[1:].is_fully_defined() else tf.shape(x)[1:]
    u = iterates.per_example_uniform(shape, seeds, -1.0, 1.0, batch_size=tf.shape(x)[0], salt=salt)
    u = tf.reshape(u, tf.shape(x))
    scale = tf.reduce_max(tf.abs(u), axis=list(range(1, len(x.shape))), keepdims=True)
    radius = 0.5 * tf.minimum(eps, clip_max - clip_min)
    return tf.clip_by_value(x + radius * u / (scale + 1e-12), clip_min, clip_max)


def _fab_t(model_fn, x, y, eps, *, steps, seed, n_target_classes, rand_init, **opts):
    """FAB-T over the clean logits' runners-up; returns a `FabResult`."""
    x, y, eps, _ = base.prepare(x, y, eps, None)
    seed = iterates.check_seed(seed, x.shape[0])
    clean = base.logits(model_fn, x)
    k = clean.shape[-1]
    if k is not None and k < 2:
        raise ValueError(f"fab_t needs at least 2 classes; the model has {k}")
    n_targets = tf.minimum(tf.cast(n_target_classes, tf.int32), tf.shape(clean)[-1] - 1)
    ranked = tf.argsort(clean, axis=-1, direction="DESCENDING", stable=True)
    steps = tf.cast(steps, tf.int32)
    n = tf.shape(x)[0]
    # Examples already misclassified are done: returned unchanged, at distance 0.
    done = iterates.misclassified(clean, y, False)

    def body(rank, best_x, best_norm, done):
        setup = _Setup(model_fn, x, y, tf.gather(ranked, rank, axis=1), **opts)
        if rand_init:
            start = _random_start(x, eps, seed, rank, opts["clip_min"], opts["clip_max"])
        else:
            start = x
        adv, norm = _run(setup, start, steps)
        # An example keeps the first target whose best adversarial lies within eps.
        found = tf.logical_not(done) & tf.math.is_finite(norm) & (norm <= eps)
        best_x = iterates.select(found, adv, best_x)
        return rank + 1, best_x, tf.where(found, norm, best_norm), done | found

    def cond(rank, best_x, best_norm, done):
        del best_x, best_norm
        return (rank <= n_targets) & tf.logical_not(tf.reduce_all(done))

    loop_vars = (tf.constant(1), x, tf.zeros([n]), done)
    _, best_x, best_norm, success = tf.while_loop(cond, body, loop_vars)
    return FabResult(best_x, best_norm, success)


def fab_t(
    model_fn,
    x,
    y,
    eps,
    *,
    steps=100,
    step_size=None,
    targeted=False,
    seed=None,
    clip_min=0.0,
    clip_max=1.0,
    n_target_classes=9,
    alpha_max=0.1,
    eta=1.05,
    beta=0.9,
    rand_init=True,
):
    """FAB-T (Croce & Hein 2020), targeted minimum-norm L-inf, inside an eps ball.

    `y` holds the TRUE labels: the attack picks its targets itself, the classes ranked
    2nd to (n_target_classes + 1)-th by the clean logits, one FAB run of `steps`
    iterations each, in that order, until the example is fooled within `eps`.

    Args:
        model_fn: maps float32 images [N, ...] in [clip_min, clip_max] to logits [N, K].
        x: clean images [N, ...].
        y: int32 [N] true labels.
        eps: L-inf budget in pixel units (float or scalar tensor; inf for none).
        steps: iterations per target class, each one gradient of z_t - z_y and one
            forward pass.
        step_size: must be None: FAB chooses its steps by projection.
        targeted: must be False (the targets are chosen internally).
        seed: stateless seed of the random starts, int64 [2] for the batch or [N, 2]
            per example (then each example's result depends only on its own seed).
        clip_min: lower end of the valid pixel range.
        clip_max: upper end of the valid pixel range.
        n_target_classes: runner-up classes tried (capped at K - 1).
        alpha_max: the largest weight of the step from the clean image.
        eta: overshoot of the projections onto the linearised boundary.
        beta: pull-back factor towards the clean image after each success.
        rand_init: start each run from a random point of the eps / 2 ball (else from x).

    Returns:
        float32 tensor shaped like `x`: per example the smallest-norm adversarial found
        for the first target that succeeds within `eps`, else `x` unchanged.

    Raises:
        ValueError: if `targeted`, if `step_size` is given, or the model has < 2 classes.
    """
    if targeted:
        raise ValueError("fab_t picks its own targets: pass true labels, targeted=False")
    if step_size is not None:
        raise ValueError(f"fab_t has no step size (it projects); got step_size={step_size}")
    return _fab_t(
        model_fn,
        x,
        y,
        eps,
        steps=steps,
        seed=seed,
        n_target_classes=n_target_classes,
        rand_init=rand_init,
        alpha_max=alpha_max,
        eta=eta,
        beta=beta,
        clip_min=clip_min,
        clip_max=clip_max,
    ).x


# AutoAttack's standard suite runs FAB-T with these (and one restart); it starts that one
# restart from the clean image, where `rand_init` starts every run from a random point.
DEFAULTS = {
    "steps": 100,
    "n_target_classes": 9,
    "alpha_max": 0.1,
    "eta": 1.05,
    "beta": 0.9,
    "rand_init": True,
}

registry.register(
    "fab_t",
    registry.AttackSpec(
        fab_t,
        base.LINF,
        True,
        True,
        "FAB-T: targeted minimum-norm boundary attack; adversarial only within eps.",
        DEFAULTS,
        stochastic=True,
        eps_policy="reject",
        config_params={"n_target_classes": "target_classes"},
    ),
)
