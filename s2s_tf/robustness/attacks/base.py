"""Shared pieces of the attacks: norms, projection, random starts, losses.

Every model here is a `model_fn` mapping float32 images in [0, 1] to logits, and
every budget `eps` is in pixel units of that space (e.g. 8/255 for L-inf).
"""

import numpy as np
import tensorflow as tf
from cleverhans.tf2.utils import clip_eta

from s2s_tf.robustness.attacks import iterates

LINF = "linf"
L2 = "l2"
ORD = {LINF: np.inf, L2: 2}
_DLR_TINY = 1e-12  # keeps the DLR denominators nonzero, as in AutoAttack


def logits(model_fn, x):
    """The model's logits as float32 (mixed-precision models return float16)."""
    return tf.cast(model_fn(x), tf.float32)


def loss_gradient(model_fn, x, y, targeted):
    """Gradient of the cross-entropy (negated when targeted) with respect to `x`."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits(model_fn, x))
        if targeted:
            loss = -loss
    return tape.gradient(loss, x)


def project(x, adv, eps, norm, clip_min, clip_max):
    """Projects `adv` onto the `norm` ball of radius `eps` around `x` and the clip range."""
    return tf.clip_by_value(x + clip_eta(adv - x, ORD[norm], eps), clip_min, clip_max)


def random_start(x, eps, norm, seed):
    """A uniform sample of the L-inf or L2 ball of radius `eps` (stateless).

    `seed` is int64 [2] for the whole batch, or [N, 2]: one seed per example,
    so that an example's start does not depend on the batch it is in.
    """
    if seed.shape.rank == 2:
        return tf.map_fn(
            lambda args: random_start(args[0][None], eps, norm, args[1])[0],
            (x, seed),
            fn_output_signature=x.dtype,
        )
    if norm == LINF:
        return eps * tf.random.stateless_uniform(tf.shape(x), seed, -1.0, 1.0)
    direction_seed, radius_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    axes = list(range(1, len(x.shape)))
    direction = tf.random.stateless_normal(tf.shape(x), direction_seed)
    direction /= tf.sqrt(tf.reduce_sum(tf.square(direction), axes, keepdims=True))
    dim = tf.cast(tf.reduce_prod(tf.shape(x)[1:]), x.dtype)
    radius_shape = tf.concat([tf.shape(x)[:1], tf.ones([len(axes)], tf.int32)], 0)
    radius = tf.random.stateless_uniform(radius_shape, radius_seed) ** (1.0 / dim)
    return eps * radius * direction


def cross_entropy(logits, y, targeted):
    """The loss the CE attacks maximise: cross-entropy to `y`, negated when targeted."""
    loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
    return -loss if targeted else loss


def dlr_loss(logits, y):
    """The difference-of-logits-ratio loss, per example (higher is better for the attacker).

    -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3), with z sorted as z_pi1 >= z_pi2 >= ...;
    the ratio makes it invariant to shifting and rescaling the logits.
    """
    top = tf.math.top_k(logits, 3).values
    z_y = tf.gather(logits, y, batch_dims=1)
    is_y = tf.one_hot(y, tf.shape(logits)[-1], on_value=True, off_value=False)
    best_other = tf.reduce_max(tf.where(is_y, -float("inf"), logits), axis=-1)
    return -(z_y - best_other) / (top[:, 0] - top[:, 2] + _DLR_TINY)


def targeted_dlr_loss(logits, y, target):
    """The targeted DLR loss: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2), per example."""
    top = tf.math.top_k(logits, 4).values
    z_y = tf.gather(logits, y, batch_dims=1)
    z_t = tf.gather(logits, target, batch_dims=1)
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + _DLR_TINY)


def best_iterate_loop(model_fn, x, y, adv, update, steps, *, targeted=False, state=()):
    """Runs `steps` updates in one `tf.while_loop`; returns the best iterate per example.

    Every iterate (the start, each update and the last one) is scored by the
    cross-entropy the attack maximises; per example the result is the first
    iterate that succeeds (misclassified, or classified as the target when
    `targeted`), else the one with the highest loss. The last iterate is not
    preferred: an example fooled at step 3 and recovered at step 10 counts as
    fooled.

    Args:
      model_fn: images -> logits.
      x: the clean images (returned for examples that no iterate beats).
      y: int32 labels (targets when `targeted`).
      adv: the first iterate (already projected).
      update: (adv, grad, state) -> (next projected iterate, next state).
      steps: gradient steps.
      targeted: whether success means reaching `y`.
      state: extra loop state of `update` (e.g. momentum), a tuple of tensors.

    Returns:
      The best iterates, shaped like `x`.
    """

    def loss_fn(logits):
        return cross_entropy(logits, y, targeted)

    def body(i, adv, state, best):
        logits, loss, grad = iterates.loss_and_gradient(model_fn, loss_fn, adv)
        best = iterates.update_best(*best, adv, loss, iterates.misclassified(logits, y, targeted))
        adv, state = update(adv, grad, state)
        return i + 1, adv, state, best

    loop_vars = (tf.constant(0), adv, tuple(state), iterates.init_best(x))
    _, adv, _, best = tf.while_loop(lambda i, *_: i < steps, body, loop_vars)
    with tf.name_scope("last_iterate"):  # nests the model's scope, as in the loop body
        logits = tf.cast(model_fn(adv), tf.float32)
    best = iterates.update_best(
        *best, adv, loss_fn(logits), iterates.misclassified(logits, y, targeted)
    )
    return best[0]


def prepare(x, y, eps, seed):
    """Converts an attack's arguments to tensors: (x, y, eps, seed)."""
    x = tf.convert_to_tensor(x, tf.float32)
    seed = tf.convert_to_tensor((0, 0) if seed is None else seed, tf.int64)
    return x, tf.convert_to_tensor(y, tf.int32), tf.cast(eps, tf.float32), seed
