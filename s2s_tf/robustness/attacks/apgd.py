"""Auto-PGD under an L-inf budget: APGD-CE, APGD-DLR and targeted APGD-DLR (APGD-T).

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks" (ICML 2020), following the behaviour of the reference
implementation (fra31/auto-attack, `autopgd_base.py`): a step size starting at 2 * eps,
momentum 0.75, checkpoints after 22% of the steps and then at periods shrinking by 3% of
the steps down to 6%, where an example's step size is halved (and it restarts from its
highest-loss point) if at most a fraction `rho` of the steps since the last checkpoint
raised its loss, or if its step size was not halved last time and its best loss has not
improved since.

Each attack is a single `tf.while_loop` over the steps (APGD-T nests it in a loop over
target classes), so any step count compiles to one graph, and every decision is made per
example. Restarts are left to the caller (run again with another seed and combine the
results with `iterates.update_best`).
"""

import collections

import tensorflow as tf

from s2s_tf.robustness.attacks import base
from s2s_tf.robustness.attacks import iterates
from s2s_tf.robustness.attacks import registry

_TINY = 1e-12  # keeps denominators nonzero, as in the reference

# The while_loop state of one APGD run; `loss` is the loss of the current iterate.
_State = collections.namedtuple(
    "_State",
    "i x_adv x_old grad loss step period counter n_up halved max_at_check x_max grad_max "
    "loss_max best_x best_loss best_success violation",
)

# What does not change during a run.
_Setup = collections.namedtuple(
    "_Setup",
    "model_fn x eps loss_fn success_fn min_period period_decrement momentum rho clip_min "
    "clip_max trace",
)


dlr_loss = base.dlr_loss
targeted_dlr_loss = base.targeted_dlr_loss


def _num_classes(clean_logits, minimum, name):
    """Raises ValueError when the (static) class count is below `minimum`."""
    k = clean_logits.shape[-1]
    if k is not None and k < minimum:
        raise ValueError(f"{name} needs at least {minimum} classes; the model has {k}")


def _project(setup, adv):
    return base.project(setup.x, adv, setup.eps, base.LINF, setup.clip_min, setup.clip_max)


def _violation(setup, old, *advs):
    if not setup.trace:
        return old
    found = [
        iterates.budget_violation(setup.x, a, setup.eps, setup.clip_min, setup.clip_max)
        for a in advs
    ]
    return tf.reduce_max(tf.stack([old, *found]))


def _step(setup, s):
    """One APGD iteration: momentum step, bookkeeping, and the checkpoint test."""
    # The first step has no momentum (the reference's a = 1 at i = 0).
    a = tf.where(s.i > 0, tf.cast(setup.momentum, tf.float32), 1.0)
    z = _project(setup, s.x_adv + iterates.expand_to(s.step, s.x_adv) * tf.sign(s.grad))
    x_new = _project(setup, s.x_adv + a * (z - s.x_adv) + (1.0 - a) * (s.x_adv - s.x_old))
    logits, loss, grad = iterates.loss_and_gradient(setup.model_fn, setup.loss_fn, x_new)
    best = iterates.update_best(
        s.best_x, s.best_loss, s.best_success, x_new, loss, setup.success_fn(logits)
    )
    # The restart point: highest loss so far, whether or not it succeeds.
    up = loss > s.loss_max
    loss_max = tf.where(up, loss, s.loss_max)
    n_up = s.n_up + tf.cast(loss > s.loss, tf.int32)
    counter = s.counter + 1

    at_check = counter >= s.period
    # The reference's test is `count <= rho * period` (the paper writes `<`).
    period = tf.cast(s.period, tf.float32)
    too_few = tf.cast(n_up, tf.float32) <= tf.cast(setup.rho, tf.float32) * period
    stalled = tf.logical_not(s.halved) & (s.max_at_check >= loss_max)
    halve = at_check & (too_few | stalled)
    x_max = iterates.select(up, x_new, s.x_max)
    grad_max = iterates.select(up, grad, s.grad_max)
    return _State(
        i=s.i + 1,
        x_adv=iterates.select(halve, x_max, x_new),
        x_old=s.x_adv,
        grad=iterates.select(halve, grad_max, grad),
        loss=loss,
        step=tf.where(halve, s.step / 2.0, s.step),
        period=tf.where(
            at_check, tf.maximum(s.period - setup.period_decrement, setup.min_period), s.period
        ),
        counter=tf.where(at_check, 0, counter),
        n_up=tf.where(at_check, 0, n_up),
        halved=tf.where(at_check, too_few | stalled, s.halved),
        max_at_check=tf.where(at_check, loss_max, s.max_at_check),
        x_max=x_max,
        grad_max=grad_max,
        loss_max=loss_max,
        best_x=best[0],
        best_loss=best[1],
        best_success=best[2],
        violation=_violation(setup, s.violation, z, x_new),
    )


def _checkpoint_periods(steps):
    """(first period, minimum period, decrement) in steps, as the reference rounds them."""
    n = tf.cast(steps, tf.float64)

    def part(fraction):
        return tf.maximum(tf.cast(tf.floor(fraction * n), tf.int32), 1)

    return part(0.22), part(0.06), part(0.03)


def _random_start(setup, seeds, salt):
    """The reference's start: x + eps * u / max|u|, u uniform in [-1, 1]^d per example."""
    x = setup.x
    # A static per-example shape keeps the draw's static shape for the while_loop.
    shape = x.shape[1:] if x.shape[1:].is_fully_defined() else tf.shape(x)[1:]
    u = iterates.per_example_uniform(shape, seeds, -1.0, 1.0, batch_size=tf.shape(x)[0], salt=salt)
    u = tf.reshape(u, tf.shape(x))
    scale = tf.reduce_max(tf.abs(u), axis=list(range(1, len(x.shape))), keepdims=True)
    return _project(setup, x + setup.eps * u / (scale + _TINY))


def _apgd_loop(setup, steps, step_size, seeds, salt, best):
    """One APGD run from a random start; `best` is the (x, loss, success) state to extend.

    Returns:
        An `iterates.AttackResult`.
    """
    steps = tf.cast(steps, tf.int32)
    first_period, setup_min, setup_dec = _checkpoint_periods(steps)
    setup = setup._replace(min_period=setup_min, period_decrement=setup_dec)
    x0 = _random_start(setup, seeds, salt)
    logits, loss, grad = iterates.loss_and_gradient(setup.model_fn, setup.loss_fn, x0)
    best = iterates.update_best(*best, x0, loss, setup.success_fn(logits))
    n = tf.shape(setup.x)[0]
    state = _State(
        i=tf.constant(0),
        x_adv=x0,
        x_old=x0,
        grad=grad,
        loss=loss,
        step=tf.fill([n], step_size),
        period=first_period,
        counter=tf.constant(0),
        n_up=tf.zeros([n], tf.int32),
        halved=tf.ones([n], tf.bool),
        max_at_check=loss,
        x_max=x0,
        grad_max=grad,
        loss_max=loss,
        best_x=best[0],
        best_loss=best[1],
        best_success=best[2],
        violation=_violation(setup, tf.constant(0.0), x0),
    )

    def cond(s):
        # Once every example has succeeded its result is fixed, so stopping changes nothing.
        return (s.i < steps) & tf.logical_not(tf.reduce_all(s.best_success))

    final = tf.while_loop(cond, lambda s: (_step(setup, s),), (state,))[0]
    return iterates.AttackResult(final.best_x, final.best_loss, final.best_success, final.violation)


def _prepare(model_fn, x, y, eps, opts):
    """Tensors, the clean logits and the initial step size shared by the APGD variants."""
    x, y, eps, _ = base.prepare(x, y, eps, None)
    seed = iterates.check_seed(opts["seed"], x.shape[0])
    step_size = opts["step_size"]
    step_size = 2.0 * eps if step_size is None else tf.cast(step_size, tf.float32)
    return x, y, eps, seed, step_size, base.logits(model_fn, x)


def _setup(model_fn, x, eps, loss_fn, success_fn, opts, trace):
    # The checkpoint periods are filled in by `_apgd_loop`, which knows the step count.
    fixed = {k: opts[k] for k in ("momentum", "rho", "clip_min", "clip_max")}
    return _Setup(model_fn, x, eps, loss_fn, success_fn, None, None, trace=trace, **fixed)


def _apgd(loss, model_fn, x, y, eps, *, trace=False, **opts):
    """APGD-CE (`loss="ce"`) or APGD-DLR (`loss="dlr"`); returns an `AttackResult`.

    `opts` are the public functions' keyword arguments; `trace` records the largest budget
    violation over all iterates in the result's `max_violation`.
    """
    targeted = opts["targeted"]
    if loss == "dlr" and targeted:
        raise ValueError("apgd_dlr is untargeted; use apgd_ce(targeted=True) or apgd_t")
    x, y, eps, seed, step_size, clean = _prepare(model_fn, x, y, eps, opts)
    if loss == "dlr":
        _num_classes(clean, 3, "apgd_dlr")

    def loss_fn(z):
        if loss == "dlr":
            return dlr_loss(z, y)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=z)
        return -ce if targeted else ce

    def success_fn(z):
        return iterates.misclassified(z, y, targeted)

    setup = _setup(model_fn, x, eps, loss_fn, success_fn, opts, trace)
    # The clean input only counts when it already succeeds (its loss is -inf), like the
    # reference, which returns the clean input for points it already misclassifies.
    best = iterates.init_best(x, success_fn(clean))
    return _apgd_loop(setup, opts["steps"], step_size, seed, 0, best)


def _apgd_t(model_fn, x, y, eps, *, trace=False, **opts):
    """APGD-T over the top `n_target_classes` runner-up classes; returns an `AttackResult`."""
    x, y, eps, seed, step_size, clean = _prepare(model_fn, x, y, eps, opts)
    _num_classes(clean, 4, "apgd_t")
    n_targets = tf.minimum(tf.cast(opts["n_target_classes"], tf.int32), tf.shape(clean)[-1] - 1)
    # Targets are the clean logits' runners-up, ranks 1, 2, ... (rank 0 is the prediction).
    ranked = tf.argsort(clean, axis=-1, direction="DESCENDING", stable=True)

    def success_fn(z):  # success is always a misclassification of the true label
        return iterates.misclassified(z, y, False)

    def body(rank, best_x, best_loss, best_success, violation):
        target = tf.gather(ranked, rank, axis=1)

        def loss_fn(z):
            return targeted_dlr_loss(z, y, target)

        setup = _setup(model_fn, x, eps, loss_fn, success_fn, opts, trace)
        # Each target gets its own random start, salted by its rank.
        best = (best_x, best_loss, best_success)
        run = _apgd_loop(setup, opts["steps"], step_size, seed, rank, best)
        return rank + 1, run.x, run.loss, run.success, tf.maximum(violation, run.max_violation)

    def cond(rank, best_x, best_loss, best_success, violation):
        del best_x, best_loss, violation
        return (rank <= n_targets) & tf.logical_not(tf.reduce_all(best_success))

    best = iterates.init_best(x, success_fn(clean))
    out = tf.while_loop(cond, body, (tf.constant(1), *best, tf.constant(0.0)))
    return iterates.AttackResult(*out[1:])


def apgd_ce(
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
    momentum=0.75,
    rho=0.75,
    _loss="ce",
):
    """APGD on the cross-entropy loss (negated cross-entropy to `y` when targeted).

    Args:
        model_fn: maps float32 images [N, ...] in [clip_min, clip_max] to logits [N, K].
        x: clean images [N, ...].
        y: int32 [N]: true labels, or target labels when `targeted`.
        eps: L-inf budget in pixel units (float or scalar tensor).
        steps: iterations (gradient evaluations after the one at the random start).
        step_size: initial step size; defaults to 2 * eps as in the reference.
        targeted: attack towards `y` instead of away from it.
        seed: stateless seed, int64 [2] for the batch or [N, 2] per example (then each
            example's result depends only on its own seed). None means (0, 0).
        clip_min: lower end of the valid pixel range.
        clip_max: upper end of the valid pixel range.
        momentum: weight of the new gradient step against the last update (reference 0.75).
        rho: halve the step when at most this fraction of the last period's steps
            raised the loss.

    Returns:
        float32 tensor shaped like `x`: per example the first misclassified (or, when
        targeted, classified-as-`y`) iterate, else the iterate with the highest loss.
    """
    return _apgd(
        _loss,
        model_fn,
        x,
        y,
        eps,
        steps=steps,
        step_size=step_size,
        targeted=targeted,
        seed=seed,
        clip_min=clip_min,
        clip_max=clip_max,
        momentum=momentum,
        rho=rho,
    ).x


def apgd_dlr(model_fn, x, y, eps, **kwargs):
    """APGD on the (untargeted) DLR loss; arguments and defaults as for `apgd_ce`.

    Raises:
        ValueError: if `targeted` (use `apgd_t`) or the model has fewer than 3 classes.
    """
    return apgd_ce(model_fn, x, y, eps, _loss="dlr", **kwargs)


def apgd_t(
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
    momentum=0.75,
    rho=0.75,
):
    """APGD on the targeted DLR loss, run once per runner-up class of the clean logits.

    `y` holds the TRUE labels: the attack picks its targets itself, the classes ranked
    2nd to (n_target_classes + 1)-th by the clean logits, one full APGD run each (with
    its own random start), and keeps per example the first iterate over all runs that is
    misclassified, else the one with the highest targeted DLR loss. Other arguments as
    for `apgd_ce`; `steps` counts per target class.

    Raises:
        ValueError: if `targeted` is set or the model has fewer than 4 classes.
    """
    if targeted:
        raise ValueError("apgd_t picks its own targets: pass true labels, targeted=False")
    return _apgd_t(
        model_fn,
        x,
        y,
        eps,
        steps=steps,
        step_size=step_size,
        n_target_classes=n_target_classes,
        seed=seed,
        clip_min=clip_min,
        clip_max=clip_max,
        momentum=momentum,
        rho=rho,
    ).x


# Defaults per attack (AutoAttack's "standard" version uses these with 100 steps).
DEFAULTS = {
    "apgd_ce": {"steps": 100, "momentum": 0.75, "rho": 0.75},
    "apgd_dlr": {"steps": 100, "momentum": 0.75, "rho": 0.75},
    "apgd_t": {"steps": 100, "n_target_classes": 9, "momentum": 0.75, "rho": 0.75},
}


registry.register(
    "apgd_ce",
    registry.AttackSpec(
        apgd_ce,
        base.LINF,
        True,
        True,
        "APGD-CE (Croce & Hein 2020): step-size schedule, momentum, checkpoints.",
        DEFAULTS["apgd_ce"],
        stochastic=True,
    ),
)
registry.register(
    "apgd_dlr",
    registry.AttackSpec(
        apgd_dlr,
        base.LINF,
        True,
        True,
        "APGD on the DLR loss (shift- and scale-invariant in the logits).",
        DEFAULTS["apgd_dlr"],
        stochastic=True,
    ),
)
registry.register(
    "apgd_t",
    registry.AttackSpec(
        apgd_t,
        base.LINF,
        True,
        True,
        "APGD-T: targeted DLR towards each of the top-k other classes.",
        DEFAULTS["apgd_t"],
        stochastic=True,
        config_params={"n_target_classes": "target_classes"},
    ),
)
