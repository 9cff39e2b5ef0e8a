"""Per-example bookkeeping shared by the iterative attacks: best iterates, seeds, budgets.

The attacks here run on whole batches but decide everything per example, so that an
example's result does not depend on which other examples share its batch. These
helpers hold that bookkeeping so that APGD, Square (and PGD/BIM/MIM) share one tested
version of it.
"""

import collections

import tensorflow as tf

# A fixed algorithm rather than "auto_select", which leaves the choice to the device. (XLA,
# under jit_compile, still draws different numbers from the same seed.)
_ALG = "philox"


def select(mask, a, b):
    """Per example, `a` where `mask` is true, else `b`.

    Args:
        mask: bool [N].
        a: tensor [N, ...].
        b: tensor shaped like `a`.

    Returns:
        A tensor shaped like `a`.
    """
    # `tf.where` broadcasts from the right, so give the mask trailing unit axes.
    return tf.where(expand_to(mask, a), a, b)


def misclassified(logits, y, targeted):
    """Whether each example counts as a success: argmax != y, or == y when targeted."""
    pred = tf.argmax(logits, axis=-1, output_type=tf.int32)
    return tf.equal(pred, y) if targeted else tf.not_equal(pred, y)


def init_best(x, success=None):
    """The tracking state before any iterate: (best_x, best_loss, best_success).

    Args:
        x: the clean inputs [N, ...]; returned unchanged for examples no iterate beats.
        success: optional bool [N]: examples that already count as successes (e.g. the
            clean input is misclassified). Their `x` is then kept, since success is sticky.

    Returns:
        (x, loss of -inf, success or all false).
    """
    n = tf.shape(x)[0]
    if success is None:
        success = tf.zeros([n], tf.bool)
    return x, tf.fill([n], tf.constant(-float("inf"), tf.float32)), success


def update_best(best_x, best_loss, best_success, x, loss, success):
    """Folds one iterate into the best-so-far state, per example.

    An example keeps the first iterate that succeeds (success is sticky: later iterates,
    even with higher loss, never replace it); until then it keeps the iterate with the
    highest loss, the first one on ties. NaN losses never win.

    Args:
        best_x: [N, ...] best iterate so far.
        best_loss: float [N] its loss.
        best_success: bool [N] whether it succeeded.
        x: [N, ...] the new iterate.
        loss: float [N] its loss (the attack's own, higher is better for the attacker).
        success: bool [N] whether it succeeds.

    Returns:
        The new (best_x, best_loss, best_success).
    """
    take = tf.logical_not(best_success) & (success | (loss > best_loss))
    return (
        select(take, x, best_x),
        tf.where(take, loss, best_loss),
        best_success | success,
    )


def budget_violation(x, adv, eps, clip_min, clip_max):
    """How far `adv` leaves the L-inf ball of radius `eps` around `x` or the clip range.

    Returns:
        A float32 scalar: the largest excess over the batch, 0 when `adv` is feasible.
    """
    excess = tf.maximum(
        tf.abs(adv - x) - eps,
        tf.maximum(clip_min - adv, adv - clip_max),
    )
    return tf.maximum(tf.reduce_max(excess), 0.0)


def check_seed(seed, batch_size=None):
    """Validates a stateless seed: int64 [2] (whole batch) or [N, 2] (one per example).

    Args:
        seed: an integer tensor or array, or None for (0, 0).
        batch_size: N, to check a per-example seed's first axis when both are static.

    Returns:
        The seed as an int64 tensor.

    Raises:
        ValueError: on any other shape.
    """
    # Accepts int32 seeds too (tf.constant([1, 2]) is int32); None means (0, 0) as elsewhere.
    seed = tf.cast((0, 0) if seed is None else seed, tf.int64)
    shape = seed.shape
    if shape.rank == 1 and shape[0] in (None, 2):
        return seed
    if shape.rank == 2 and shape[1] in (None, 2):
        if isinstance(batch_size, int) and shape[0] not in (None, batch_size):
            raise ValueError(f"per-example seed has {shape[0]} rows for {batch_size} examples")
        return seed
    raise ValueError(f"seed must have shape [2] or [N, 2], got {shape}")


def per_example_uniform(
    shape_per_example, seeds, minval=0.0, maxval=1.0, *, batch_size=None, salt=0
):
    """Uniform float32 draws of shape [N, *shape_per_example], stateless.

    With per-example seeds ([N, 2]) row i depends only on `seeds[i]` and `salt`, so an
    example draws the same numbers whatever batch it is in. With one seed ([2]) the whole
    batch is one draw (cheaper, but tied to the batch layout).

    Args:
        shape_per_example: the shape of one example's draw (ints or a 1-D int tensor).
        seeds: int64 [2] or [N, 2].
        minval: lower bound (inclusive).
        maxval: upper bound (exclusive).
        batch_size: N; needed with a [2] seed.
        salt: int (or int scalar tensor) folded into every seed, to derive independent
            streams (e.g. one per iteration chunk) from the same seeds.

    Returns:
        float32 [N, *shape_per_example].
    """
    seeds = check_seed(seeds, batch_size)
    shape = tf.cast(shape_per_example, tf.int32)
    salt = tf.cast(salt, tf.int64)
    if seeds.shape.rank == 1:
        if batch_size is None:
            raise ValueError("batch_size is needed with a single [2] seed")
        seed = tf.random.experimental.stateless_fold_in(seeds, salt, alg=_ALG)
        full = tf.concat([[batch_size], shape], 0)
        return tf.random.stateless_uniform(full, seed, minval, maxval, alg=_ALG)

    def draw(seed):
        seed = tf.random.experimental.stateless_fold_in(seed, salt, alg=_ALG)
        return tf.random.stateless_uniform(shape, seed, minval, maxval, alg=_ALG)

    # Stateless random ops have no batched kernel (vectorized_map falls back to a loop
    # too), so loop over the examples; callers draw in chunks to amortise this.
    out = tf.map_fn(draw, seeds, fn_output_signature=tf.float32)
    if isinstance(shape_per_example, (list, tuple, tf.TensorShape)):
        out.set_shape([seeds.shape[0], *shape_per_example])
    return out


# What the attacks' private entry points return, for tests and for composing attacks:
# the best iterate, its loss and success, and the largest budget/clip violation seen
# over all iterates (0 unless the attack was run with tracing on).
AttackResult = collections.namedtuple("AttackResult", ["x", "loss", "success", "max_violation"])


def expand_to(v, like):
    """Reshapes a per-example vector [N] to broadcast against `like` [N, ...]."""
    return tf.reshape(v, [-1] + [1] * (len(like.shape) - 1))


def loss_and_gradient(model_fn, loss_fn, x):
    """Logits, per-example loss and the gradient of the summed loss with respect to `x`.

    Args:
        model_fn: maps `x` to logits (cast to float32).
        loss_fn: maps float32 logits [N, K] to per-example losses [N].
        x: float32 inputs [N, ...].

    Returns:
        (logits, loss, grad); `grad` is zero, not None, where the loss ignores `x`.
    """
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = tf.cast(model_fn(x), tf.float32)
        loss = loss_fn(logits)
        total = tf.reduce_sum(loss)
    grad = tape.gradient(total, x, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return logits, loss, grad
