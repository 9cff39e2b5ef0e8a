"""CleverHans 4.0.0's Carlini-Wagner L2 and SPSA attacks, fixed for Keras 3.

CleverHans' other tf2 attacks (FGM, BIM, PGD, MIM) run unchanged on Keras 3
models. These two do not; this module provides drop-in replacements that keep
CleverHans' signatures and reuse its code (loss functions, the tanh box, the
SPSA gradient estimate and Adam rule, the projected optimisation loop). Nothing
in the `cleverhans` package is patched.

SPSA (`cleverhans.tf2.attacks.spsa`) fails because its `SPSAAdam` subclasses
`tf.optimizers.Adam`, which is Keras 3's Adam under TF >= 2.16:

1. `SPSAAdam.__init__` calls `Adam.__init__(lr=...)`; Keras 3 dropped the
   legacy `lr` alias and raises "Argument(s) not recognized: {'lr': ...}".
2. `_apply_gradients` reads `self.lr`, an attribute Keras 3 optimizers no
   longer have (AttributeError once 1. is patched).
3. A Keras 3 optimizer creates `tf.Variable`s (`iterations`, `learning_rate`)
   in `__init__`. `spsa` builds its optimizer inside the attack, so the attack
   cannot run inside a `tf.function`: tf.function traces twice when variables
   are created, and the second construction fails ("tf.function only supports
   singleton tf.Variables created on the first call").

SPSAAdam never used the Keras optimizer machinery: its Adam update is a pure
function of an explicit state dict. The fix is an `SPSAAdam` that is a plain
object carrying the hyper-parameters and borrowing CleverHans' methods.

Carlini-Wagner L2 (`cleverhans.tf2.attacks.carlini_wagner_l2`) has one Keras 3
crash and several bugs that crash or silently weaken it on any backend; each is
marked "Fix N" in `CarliniWagnerL2`:

1. Keras 3 crash: `self.optimizer.variables()` - `variables` is now a list
   property. The obvious repair, zeroing every entry of `optimizer.variables`,
   also zeroes Adam's `learning_rate` variable (Keras 3 lists `iterations` and
   `learning_rate` among them), so the attack silently never moves. Here the
   optimizer is reset to the values it had when it was built (iterations 0,
   slots 0, the configured learning rate).
2. The trade-off constant `const` had the image's shape [B, H, W, C] instead
   of [B] (cleverhans issue #1205): multiplied by the per-example loss [B] it
   broadcasts against the channel axis, which crashes for RGB batches of size
   other than 1 or 3 and silently mixes examples otherwise.
3. `targeted` was ignored (`targeted = y is not None`), so passing the true
   labels for an untargeted attack ran a targeted attack towards them.
4. The labels were not sliced per batch in `attack`, so `y` with more than
   `batch_size` examples crashed.
5. The confidence margin was added to every logit, which cannot change the
   argmax; Carlini and Wagner add it to the label's logit only.
6. The binary search decided from the best result over all previous steps,
   not the current step, and multiplied the constant of successful examples
   by 10; it now follows Carlini and Wagner's reference implementation.

The whole per-batch optimisation (binary search and inner Adam loop) runs in
one `tf.function` per attack object; the perturbation and optimizer variables
are created eagerly, once per input shape.
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf
from cleverhans.tf2.attacks import carlini_wagner_l2 as cw_lib
from cleverhans.tf2.attacks import spsa as spsa_lib

# Constants of Carlini and Wagner's reference implementation.
_NO_UPPER_BOUND = 1e10
_UPPER_BOUND_KNOWN = 1e9
_REPEAT_MIN_STEPS = 10


class SPSAAdam:
    """CleverHans' `SPSAAdam` as a plain object instead of a Keras 3 optimizer.

    The methods are CleverHans' own; only the base class and the attribute
    names they read (`lr`, `beta_1`, `beta_2`, `epsilon`) are provided here.
    The defaults of the Adam constants are those of the Keras 2 Adam that
    CleverHans inherited from.

    Args:
      lr: Adam learning rate (a float or a scalar tensor).
      delta: size of the +-delta perturbations of the SPSA estimate.
      num_samples: evaluations per estimate; must be even (samples are mirrored).
      num_iters: estimates averaged per update.
      compare_to_analytic_grad: kept for signature compatibility; unused, as in
        CleverHans.
      beta_1: Adam's first-moment decay.
      beta_2: Adam's second-moment decay.
      epsilon: Adam's denominator constant.

    Raises:
      ValueError: if `num_samples` is odd.
    """

    _get_delta = spsa_lib.SPSAAdam._get_delta
    _compute_gradients = spsa_lib.SPSAAdam._compute_gradients
    _apply_gradients = spsa_lib.SPSAAdam._apply_gradients
    init_state = spsa_lib.SPSAAdam.init_state
    minimize = spsa_lib.SPSAAdam.minimize

    def __init__(
        self,
        lr=0.01,
        delta=0.01,
        num_samples=128,
        num_iters=1,
        compare_to_analytic_grad=False,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-7,
    ):
        if num_samples % 2:
            raise ValueError(f"num_samples must be even, got {num_samples}.")
        self.lr = lr
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self._delta = delta
        self._num_samples = num_samples // 2  # mirrored +-delta samples
        self._num_iters = num_iters
        self._compare_to_analytic_grad = compare_to_analytic_grad


def spsa(
    model_fn,
    x,
    y,
    eps,
    nb_iter,
    clip_min=None,
    clip_max=None,
    targeted=False,
    early_stop_loss_threshold=None,
    learning_rate=0.01,
    delta=0.01,
    spsa_samples=128,
    spsa_iters=1,
    is_debug=False,
):
    """CleverHans' `spsa` (Uesato et al. 2018) with the Keras 3-free `SPSAAdam`.

    Same arguments and result as `cleverhans.tf2.attacks.spsa.spsa`: an L-inf
    attack on a batch of one image `x` [1, H, W, C] with label `y` [1] (the
    target label if `targeted`), using only forward passes of `model_fn`
    (which returns logits). Unlike the original it also runs inside a
    `tf.function`.

    Returns:
      The adversarial image, [1, H, W, C].

    Raises:
      ValueError: if `x`'s batch dimension is not 1.
    """
    if x.get_shape().as_list()[0] != 1:
        raise ValueError("For SPSA, input tensor x must have batch_size of 1.")
    optimizer = SPSAAdam(
        lr=learning_rate, delta=delta, num_samples=spsa_samples, num_iters=spsa_iters
    )

    def loss_fn(x, label):
        # Margin logit loss, negated for untargeted attacks (as in CleverHans).
        logits = model_fn(x)
        loss_multiplier = 1 if targeted else -1
        return loss_multiplier * spsa_lib.margin_logit_loss(
            logits, label, nb_classes=logits.get_shape()[-1]
        )

    del is_debug
    return _projected_optimization_best(
        loss_fn, x, y, eps, nb_iter, optimizer, clip_min, clip_max, early_stop_loss_threshold
    )


def _projected_optimization_best(
    loss_fn, x, label, eps, num_steps, optimizer, clip_min, clip_max, early_stop_threshold
):
    """CleverHans' `projected_optimization` that returns the best iterate, not the last.

    The same loop (uniform random start, SPSA-Adam step, projection onto the
    L-inf ball and the clip range, early stop once the loss is below
    `early_stop_threshold`), but the loss of every iterate is computed and the
    perturbation with the lowest loss is returned: an iterate that fooled the
    model (loss < 0) is never traded for a later one that does not.
    """

    def project(perturbation):
        perturbation = tf.clip_by_value(perturbation, -eps, eps)
        return tf.clip_by_value(x + perturbation, clip_min, clip_max) - x

    def loss_at(perturbation):
        return tf.reduce_mean(loss_fn(x + perturbation, label), axis=0)

    start = project(tf.random.uniform(tf.shape(x), -eps, eps, dtype=x.dtype))
    init_state = optimizer.init_state([start])

    def body(i, perturbation, flat_state, best, best_loss):
        state = tf.nest.pack_sequence_as(init_state, flat_state)
        new, state = optimizer.minimize(lambda p: loss_fn(x + p, label), [perturbation], state)
        perturbation = project(new[0])
        loss = loss_at(perturbation)
        better = loss < best_loss
        best = tf.where(better, perturbation, best)
        best_loss = tf.where(better, loss, best_loss)
        if early_stop_threshold is not None:
            i = tf.where(best_loss < early_stop_threshold, float(num_steps), i)
        return i + 1, perturbation, tf.nest.flatten(state), best, best_loss

    loop_vars = (tf.constant(0.0), start, tf.nest.flatten(init_state), start, loss_at(start))
    best = tf.while_loop(
        lambda i, *_: i < num_steps, body, loop_vars, maximum_iterations=num_steps
    )[3]
    return tf.stop_gradient(x + best)


@dataclasses.dataclass
class CWState:
    """Per-input-shape variables of `CarliniWagnerL2`.

    Attributes:
      modifier: the perturbation in tanh space, shaped like the input batch.
      optimizer: the Keras Adam optimizer built for `modifier`.
      initial_values: the optimizer's variable values right after `build`
        (iterations 0, zero slots, the configured learning rate).
    """

    modifier: tf.Variable
    optimizer: object
    initial_values: list


class CarliniWagnerL2(cw_lib.CarliniWagnerL2):
    """CleverHans' `CarliniWagnerL2` fixed for Keras 3 (see the module docstring).

    Arguments are CleverHans' (`model_fn` returns logits; `y` holds labels as
    ints or one-hot rows, the targets if `targeted`), except that `targeted` is
    honoured. Without `y`, an untargeted attack uses the model's predictions.

    `attack(x)` works on numpy batches like CleverHans'; `attack_batch(x, y)`
    is the compiled per-batch attack, reusable across calls with the same
    shape without retracing. Examples the attack does not succeed on come back
    unchanged.
    """

    def __init__(self, model_fn, y=None, targeted=False, **kwargs):
        super().__init__(model_fn, y=y, targeted=targeted, **kwargs)
        # Fix 3: CleverHans set `targeted = y is not None`.
        self.targeted = bool(targeted)
        if self.targeted and y is None:
            raise ValueError("A targeted attack needs the target labels y.")
        # Fix 1: one optimizer per input shape, built eagerly (see `state`); the
        # Keras optimizer CleverHans made in __init__ is not used.
        self.optimizer = None
        self._states = {}
        self._num_classes = None
        self._compiled = tf.function(self._attack_graph)

    def state(self, shape):
        """Returns the `CWState` for inputs of `shape`, creating it eagerly once."""
        shape = tuple(int(d) for d in shape)
        if shape not in self._states:
            modifier = tf.Variable(tf.zeros(shape), trainable=True, name="cw_modifier")
            optimizer = keras.optimizers.Adam(self.learning_rate)
            optimizer.build([modifier])
            initial = [tf.constant(v.numpy()) for v in optimizer.variables]
            self._states[shape] = CWState(modifier, optimizer, initial)
        return self._states[shape]

    @staticmethod
    def reset_optimizer(state):
        """Puts the optimizer back to its freshly built state (Fix 1).

        Only the slots and the iteration count change; the learning rate is
        restored to its configured value rather than zeroed.
        """
        for variable, value in zip(state.optimizer.variables, state.initial_values, strict=True):
            variable.assign(value)

    def attack(self, x):
        """Returns adversarial examples for the numpy batch `x`, as numpy."""
        x = np.asarray(x, np.float32)
        if self.clip_min is not None and np.any(x < self.clip_min):
            raise cw_lib.CarliniWagnerL2Exception(
                f"The input is smaller than the minimum value of {self.clip_min}"
            )
        if self.clip_max is not None and np.any(x > self.clip_max):
            raise cw_lib.CarliniWagnerL2Exception(
                f"The input is greater than the maximum value of {self.clip_max}"
            )
        y = self._labels(x)
        adv_ex = np.zeros_like(x)
        for i in range(0, len(x), self.batch_size):
            # Fix 4: slice the labels with the images.
            batch = slice(i, i + self.batch_size)
            adv_ex[batch] = self.attack_batch(x[batch], y[batch]).numpy()
        return adv_ex

    def _labels(self, x):
        """The given labels, or the model's predictions for an untargeted attack without y."""
        if self.y is None:
            return np.asarray(self.model_fn(tf.constant(x))).argmax(-1)
        return np.asarray(self.y)

    def attack_batch(self, x, y):
        """Attacks one batch; `y` holds int labels [B] or one-hot rows. Returns a tensor."""
        x = tf.convert_to_tensor(x, tf.float32)
        y = tf.convert_to_tensor(y)
        if y.shape.rank == 1:
            if self._num_classes is None:
                self._num_classes = int(self.model_fn(x[:1]).shape[-1])
            y = tf.one_hot(tf.cast(y, tf.int32), self._num_classes)
        y = tf.cast(y, tf.float32)
        if y.shape[0] != x.shape[0]:
            raise cw_lib.CarliniWagnerL2Exception("x and y do not have the same shape!")
        self.state(x.shape)
        return self._compiled(x, y)

    def _attack_graph(self, original_x, y):
        state = self.state(original_x.shape)
        batch = original_x.shape[0]
        # tanh space, as CleverHans.
        x = (original_x - self.clip_min) / (self.clip_max - self.clip_min)
        x = tf.atanh((tf.clip_by_value(x, 0.0, 1.0) * 2.0 - 1.0) * 0.999999)
        lab = tf.argmax(y, axis=1, output_type=tf.int32)

        lower_bound = tf.zeros([batch])
        upper_bound = tf.fill([batch], _NO_UPPER_BOUND)
        # Fix 2: one constant per example, [B] (was the image shape).
        const = tf.fill([batch], tf.cast(self.initial_const, tf.float32))
        best = (tf.fill([batch], _NO_UPPER_BOUND), original_x)

        for outer_step in range(self.binary_search_steps):
            state.modifier.assign(tf.zeros_like(state.modifier))
            self.reset_optimizer(state)
            if self.binary_search_steps >= _REPEAT_MIN_STEPS and (
                outer_step == self.binary_search_steps - 1
            ):
                const = upper_bound
            best, step_score = self._optimize(state, x, y, lab, const, best)
            const, lower_bound, upper_bound = self._update_const(
                const, lower_bound, upper_bound, step_score, lab
            )
        return best[1]

    def _succeeds(self, logits, y, lab):
        """Whether each example counts as adversarial, with the confidence margin."""
        # Fix 5: the margin moves the label's logit only.
        sign = -1.0 if self.targeted else 1.0
        shifted = tf.argmax(logits + sign * self.confidence * y, axis=1, output_type=tf.int32)
        return tf.equal(shifted, lab) if self.targeted else tf.not_equal(shifted, lab)

    def _optimize(self, state, x, y, lab, const, best):
        """One binary-search step: Adam on the modifier, keeping the smallest successes."""
        batch = x.shape[0]
        check_every = (self.max_iterations // 10) or 1
        bcast = [-1] + [1] * (len(x.shape) - 1)

        def body(i, prev, stop, best_l2, best_attack, step_l2, step_score):
            x_new, grads, loss, preds, l2_dist = self.gradient(x, y, state.modifier, const)
            state.optimizer.apply_gradients([(grads, state.modifier)])
            check = tf.logical_and(
                tf.constant(bool(self.abort_early)), tf.equal(i % check_every, 0)
            )
            stop = tf.logical_and(check, loss > prev * 0.9999)
            prev = tf.where(check, loss, prev)
            succeeded = tf.logical_and(self._succeeds(preds, y, lab), tf.logical_not(stop))
            pred = tf.argmax(preds, axis=1, output_type=tf.int32)
            step_mask = tf.logical_and(succeeded, l2_dist < step_l2)
            step_l2 = tf.where(step_mask, l2_dist, step_l2)
            step_score = tf.where(step_mask, pred, step_score)
            best_mask = tf.logical_and(succeeded, l2_dist < best_l2)
            best_l2 = tf.where(best_mask, l2_dist, best_l2)
            best_attack = tf.where(tf.reshape(best_mask, bcast), x_new, best_attack)
            return i + 1, prev, stop, best_l2, best_attack, step_l2, step_score

        def cond(i, prev, stop, *_):
            return tf.logical_and(i < self.max_iterations, tf.logical_not(stop))

        loop_vars = (
            tf.constant(0),
            tf.constant(np.inf, tf.float32),
            tf.constant(False),
            best[0],
            best[1],
            tf.fill([batch], _NO_UPPER_BOUND),
            tf.fill([batch], -1),
        )
        _, _, _, best_l2, best_attack, _, step_score = tf.while_loop(cond, body, loop_vars)
        return (best_l2, best_attack), step_score

    def _update_const(self, const, lower_bound, upper_bound, step_score, lab):
        """Carlini and Wagner's binary search on the per-example constant (Fix 6)."""
        hit = tf.equal(step_score, lab) if self.targeted else tf.not_equal(step_score, lab)
        success = tf.logical_and(hit, tf.not_equal(step_score, -1))
        upper_bound = tf.where(success, tf.minimum(upper_bound, const), upper_bound)
        lower_bound = tf.where(success, lower_bound, tf.maximum(lower_bound, const))
        bounded = upper_bound < _UPPER_BOUND_KNOWN
        const = tf.where(
            bounded, (lower_bound + upper_bound) / 2.0, tf.where(success, const, const * 10.0)
        )
        return const, lower_bound, upper_bound


def carlini_wagner_l2(model_fn, x, **kwargs):
    """Function interface of the fixed attack, like CleverHans'; returns numpy."""
    return CarliniWagnerL2(model_fn, **kwargs).attack(x)
