"""Tests for s2s_tf.robustness.attacks.apgd: APGD-CE, APGD-DLR and APGD-T."""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from s2s_tf.robustness.attacks import apgd
from s2s_tf.robustness.attacks import base

SHAPE = (6, 6, 3)
NUM_CLASSES = 4
EPS = 0.065  # where plain PGD leaves part of the tiny model's accuracy standing
STEPS = 20
ATTACKS = {"apgd_ce": apgd.apgd_ce, "apgd_dlr": apgd.apgd_dlr, "apgd_t": apgd.apgd_t}
LOSS = {"apgd_ce": "ce", "apgd_dlr": "dlr"}


def _options(**overrides):
    """The private entry points' keyword arguments, at the public defaults."""
    opts = {"steps": STEPS, "step_size": None, "targeted": False, "seed": (0, 1)}
    opts.update({"clip_min": 0.0, "clip_max": 1.0, "momentum": 0.75, "rho": 0.75})
    opts.update(overrides)
    return opts


def _traced(name, model_fn, x, y, eps, **overrides):
    """Runs an attack with tracing on; returns its `AttackResult`."""
    opts = _options(**overrides)
    if name == "apgd_t":
        del opts["targeted"]
        return apgd._apgd_t(model_fn, x, y, eps, trace=True, n_target_classes=9, **opts)
    return apgd._apgd(LOSS[name], model_fn, x, y, eps, trace=True, **opts)


def _pgd(model_fn, x, y, eps, steps):
    """Plain L-inf PGD from the clean input with the usual 2.5 * eps / steps step size."""
    adv = x
    for _ in range(steps):
        grad = base.loss_gradient(model_fn, adv, y, False)
        adv = base.project(x, adv + 2.5 * eps / steps * tf.sign(grad), eps, base.LINF, 0.0, 1.0)
    return adv


def _dense_model(num_classes):
    inputs = keras.Input(SHAPE)
    h = keras.layers.Dense(16, activation="tanh")(keras.layers.Flatten()(inputs))
    return keras.Model(inputs, keras.layers.Dense(num_classes)(h))


def _reference_path(model_fn, loss_fn, x, x0, eps, steps, rho=0.75):
    """The reference's `attack_single_run` loop (L-inf), transcribed in NumPy, from `x0`.

    Returns the iterates. Two things are shared with the attack so that paths match
    bit for bit: the projection (`base.project`) and the count of loss increases in the
    first period, which compares with the start's loss (the reference compares with 0).
    """

    def evaluate(adv):
        adv = tf.constant(adv)
        with tf.GradientTape() as tape:
            tape.watch(adv)
            loss = loss_fn(base.logits(model_fn, adv))
            total = tf.reduce_sum(loss)
        return loss.numpy(), tape.gradient(total, adv).numpy()

    def project(adv):
        eps32 = tf.constant(eps, tf.float32)
        return base.project(tf.constant(x), tf.constant(adv), eps32, base.LINF, 0.0, 1.0).numpy()

    loss, grad = evaluate(x0)
    x_adv, x_old, losses, path = x0, x0, [loss], []
    x_max, grad_max, loss_max, max_last = x0.copy(), grad.copy(), loss.copy(), loss.copy()
    step, halved_last = np.full([len(x), 1, 1, 1], 2 * np.float32(eps)), np.ones(len(x), bool)
    period, counter = max(int(0.22 * steps), 1), 0
    for i in range(steps):
        grad2, x_old = x_adv - x_old, x_adv
        a = np.float32(0.75 if i > 0 else 1.0)
        z = project(x_adv + step * np.sign(grad))
        x_adv = project(x_adv + a * (z - x_adv) + (np.float32(1.0) - a) * grad2)
        path.append(x_adv)
        loss, grad = evaluate(x_adv)
        losses.append(loss)
        up = loss > loss_max
        x_max[up], grad_max[up], loss_max[up] = x_adv[up], grad[up], loss[up]
        counter += 1
        if counter == period:
            recent = np.stack(losses[-period - 1 :])
            n_up = np.sum(recent[1:] > recent[:-1], axis=0)
            halve = (n_up <= period * rho) | (~halved_last & (max_last >= loss_max))
            halved_last, max_last = halve, loss_max.copy()
            step[halve] /= 2
            x_adv, grad = x_adv.copy(), grad.copy()
            x_adv[halve], grad[halve] = x_max[halve], grad_max[halve]
            period, counter = max(period - max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)), 0
    return np.stack(path)


class _Recording:
    """Wraps a model and records every input it sees (eagerly)."""

    def __init__(self, model):
        self.model = model
        self.seen = []

    def __call__(self, x):
        self.seen.append(x.numpy())
        return self.model(x)


class _Scheduled:
    """Logits [g[k] + cos(sum(x) - 6) / 100, 10] at its k-th call counting from `first`:
    class 1 always wins, and the CE loss follows the schedule `g` from call to call while
    the gradient keeps pulling the path back to the middle of the ball (sum(x) = 6 for
    x = 0.5), so that a restart changes the path."""

    def __init__(self, g, first):
        self.g, self.calls, self.seen = g, -first, []

    def __call__(self, x):
        g = self.g[min(max(self.calls, 0), len(self.g) - 1)]
        self.calls += 1
        self.seen.append(x.numpy())
        s = tf.reduce_sum(x, axis=[1, 2, 3])
        return tf.stack([g + tf.cos(s - 6.0) / 100.0, tf.fill(tf.shape(s), 10.0)], axis=-1)


class _Oscillating:
    """Logits [10 + sin(3 * sum(x)) - bump, 0]: class 0 always wins while the CE loss
    oscillates along the path. `bump` is 3 at call number `peak` only, which gives that
    input by far the highest loss whatever follows. Records every input it sees (eagerly)."""

    def __init__(self, peak):
        self.peak = peak
        self.seen = []

    def __call__(self, x):
        s = tf.reduce_sum(x, axis=[1, 2, 3])
        bump = 3.0 if len(self.seen) == self.peak else 0.0
        logits = tf.stack([10.0 + tf.sin(3.0 * s) - bump, tf.zeros_like(s)], axis=-1)
        self.seen.append((x.numpy(), logits.numpy()))
        return logits


class ApgdTest(tf.test.TestCase, parameterized.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        # Close templates plus noise: separable, but within reach of a small budget.
        templates = 0.5 + 0.08 * rng.normal(size=(NUM_CLASSES, *SHAPE))

        def data(n):
            y = rng.integers(0, NUM_CLASSES, n)
            x = np.clip(templates[y] + rng.normal(0.0, 0.05, (n, *SHAPE)), 0.0, 1.0)
            return x.astype(np.float32), y.astype(np.int32)

        cls.model = _dense_model(NUM_CLASSES)
        cls.model.compile(
            keras.optimizers.Adam(0.01),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        x_train, y_train = data(512)
        cls.model.fit(x_train, y_train, batch_size=32, epochs=12, verbose=0)  # 192 steps
        cls.x, cls.y = data(64)
        # Pixels at and near both ends of the range, so that clipping matters.
        cls.x_edges = rng.choice([0.0, 0.01, 0.5, 0.99, 1.0], (8, *SHAPE)).astype(np.float32)
        cls.compiled = {name: cls._compile(fn) for name, fn in ATTACKS.items()}

    @classmethod
    def _compile(cls, fn):
        @tf.function
        def attack(x, y, eps, seed):
            return fn(cls.model, x, y, eps, steps=STEPS, seed=seed)

        return attack

    def _accuracy(self, x):
        return float(np.mean(np.argmax(self.model(x), -1) == self.y))

    @parameterized.parameters(*ATTACKS)
    def test_zero_eps_returns_input(self, name):
        adv = ATTACKS[name](self.model, self.x[:8], self.y[:8], 0.0, steps=5, seed=(1, 2))
        self.assertAllEqual(adv, self.x[:8])

    @parameterized.parameters(*ATTACKS)
    def test_every_iterate_within_budget_and_range(self, name):
        y = np.argmax(self.model(self.x_edges), -1).astype(np.int32)
        run = _traced(name, self.model, self.x_edges, y, 0.1, steps=10)
        self.assertLessEqual(float(run.max_violation), 1e-6)
        self.assertAllInRange(run.x, 0.0, 1.0)
        self.assertLessEqual(float(np.abs(run.x - self.x_edges).max()), 0.1 + 1e-6)

    def test_trace_sees_a_budget_violation(self):
        # The hook itself: inputs outside the clip range leave the ball once clipped.
        x = self.x[:4] + 2.0
        run = _traced("apgd_ce", self.model, x, self.y[:4], 0.1, clip_max=1.0, steps=2)
        self.assertGreater(float(run.max_violation), 0.1)

    def test_ce_at_least_as_strong_as_pgd(self):
        clean = self._accuracy(self.x)
        pgd = self._accuracy(_pgd(self.model, tf.constant(self.x), self.y, EPS, STEPS))
        adv = self.compiled["apgd_ce"](self.x, self.y, tf.constant(EPS), tf.constant([0, 1]))
        self.assertEqual(clean, 1.0)
        self.assertLess(pgd, clean)  # the comparison means something
        self.assertLessEqual(self._accuracy(adv), pgd)

    @parameterized.parameters("apgd_dlr", "apgd_t")
    def test_dlr_variants_lower_accuracy(self, name):
        adv = self.compiled[name](self.x, self.y, tf.constant(EPS), tf.constant([0, 1]))
        self.assertLess(self._accuracy(adv), 0.9)

    def test_targeted_ce_reaches_targets(self):
        target = ((self.y + 1) % NUM_CLASSES).astype(np.int32)
        adv = apgd.apgd_ce(self.model, self.x, target, 0.1, steps=STEPS, targeted=True)
        hits = np.mean(np.argmax(self.model(adv), -1) == target)
        self.assertGreater(hits, 0.5)

    def test_returns_best_not_last_iterate(self):
        model = _Oscillating(peak=40)
        x = np.stack([np.full((2, 2, 3), v, np.float32) for v in (0.4, 0.55)])
        y = np.zeros(2, np.int32)
        # 100 steps end between checkpoints (at 99 and 105), so the last iterate is no restart.
        run = apgd._apgd("ce", model, x, y, 0.1, **_options(steps=100))  # eager: records all
        # seen[0] is the clean input; then the random start and one input per step.
        inputs = np.stack([seen[0] for seen in model.seen[1:]])
        logits = np.stack([seen[1] for seen in model.seen[1:]])
        # The attack's own float32 op, so that near-ties resolve as in the attack.
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=np.zeros(logits.shape[:2], np.int32), logits=logits
        ).numpy()
        self.assertLen(inputs, 101)
        self.assertTrue(np.all(np.any(np.diff(losses[:39], axis=0) < 0, axis=0)))  # not monotone
        self.assertAllEqual(np.argmax(losses, axis=0), [39, 39])
        self.assertAllEqual(run.x, inputs[39])
        self.assertAllEqual(run.loss, losses[39])
        self.assertTrue(np.all(losses[-1] < losses[39]))
        # Pinned at the ball's corners the path can revisit the peak's position; not everywhere.
        self.assertGreater(np.abs(run.x - inputs[-1]).max(), 1e-3)
        self.assertAllEqual(run.success, [False, False])

    def _check_reference_path(self, loss, model, reference_model, x, y, eps, steps):
        run = apgd._apgd(loss, model, x, y, eps, **_options(steps=steps))
        self.assertFalse(np.any(run.success))  # so that no example stops early

        def loss_fn(z):
            if loss == "dlr":
                return apgd.dlr_loss(z, y)
            return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=z)

        # seen: the clean input, the random start, then one input per step.
        path = _reference_path(reference_model, loss_fn, x, model.seen[1], eps, steps)
        self.assertAllEqual(np.stack(model.seen[2:]), path)

    @parameterized.parameters("ce", "dlr")
    def test_path_matches_reference_loop(self, loss):
        # A budget too small to fool anything; 40 steps have checkpoints at 8, 15, 21, ...
        model = _Recording(self.model)
        self._check_reference_path(loss, model, self.model, self.x[:4], self.y[:4], 0.02, 40)

    def test_step_halves_when_best_loss_stalls(self):
        # Checkpoints after steps 8, 15 and 21. Losses rise at every step to the first; by
        # the second they fall and rise 6 times out of 7 (enough for the rho test) without
        # passing the old best, so only the stalled best loss halves the step and restarts;
        # by the third they rise 5 out of 6 times, again below the best, but as the step
        # was just halved they must not halve it again.
        g = np.array([0, *range(1, 9), *range(0, 7), *range(1, 7), *[0] * 19], np.float32)
        x, y = np.full((2, 2, 2, 3), 0.5, np.float32), np.ones(2, np.int32)
        model, reference = _Scheduled(g, first=1), _Scheduled(g, first=0)
        self._check_reference_path("ce", model, reference, x, y, 0.1, 40)

    @parameterized.parameters("apgd_ce", "apgd_t")
    def test_per_example_seeds_independent_of_batch(self, name):
        seeds = tf.constant([[11, 1], [22, 2], [33, 3]], tf.int64)
        # Examples near the budget's edge, where the attack takes several steps.
        x, y, eps = self.x[:3], self.y[:3], tf.constant(0.06)
        together = self.compiled[name](x, y, eps, seeds)
        for i in range(3):
            alone = self.compiled[name](x[i : i + 1], y[i : i + 1], eps, seeds[i : i + 1])
            self.assertAllEqual(alone[0], together[i])
        swapped = self.compiled[name](x[::-1], y[::-1], eps, seeds[::-1])
        self.assertAllEqual(swapped[::-1], together)

    def test_single_seed_is_deterministic(self):
        run = self.compiled["apgd_ce"]
        a = run(self.x[:8], self.y[:8], tf.constant(0.06), tf.constant([5, 6]))
        b = run(self.x[:8], self.y[:8], tf.constant(0.06), tf.constant([5, 6]))
        self.assertAllEqual(a, b)
        c = run(self.x[:8], self.y[:8], tf.constant(0.06), tf.constant([7, 6]))
        self.assertNotAllClose(a, c)

    def test_eager_matches_compiled(self):
        eager = apgd.apgd_ce(self.model, self.x[:8], self.y[:8], 0.06, steps=STEPS, seed=[3, 4])
        compiled = self.compiled["apgd_ce"](
            self.x[:8], self.y[:8], tf.constant(0.06), tf.constant([3, 4])
        )
        self.assertAllClose(eager, compiled, atol=1e-6)

    def test_new_eps_and_step_size_do_not_retrace(self):
        @tf.function
        def attack(x, y, eps, step_size):
            return apgd.apgd_ce(self.model, x, y, eps, steps=3, step_size=step_size, seed=(1, 1))

        attack(self.x[:4], self.y[:4], tf.constant(0.03), tf.constant(0.06))
        attack(self.x[:4], self.y[:4], tf.constant(0.05), tf.constant(0.01))
        self.assertEqual(attack.experimental_get_tracing_count(), 1)

    def test_class_count_errors(self):
        two, three = _dense_model(2), _dense_model(3)
        y = np.zeros(2, np.int32)
        with self.assertRaisesRegex(ValueError, "apgd_dlr needs at least 3 classes"):
            apgd.apgd_dlr(two, self.x[:2], y, 0.1, steps=2)
        with self.assertRaisesRegex(ValueError, "apgd_t needs at least 4 classes"):
            apgd.apgd_t(three, self.x[:2], y, 0.1, steps=2)
        with self.assertRaisesRegex(ValueError, "untargeted"):
            apgd.apgd_dlr(three, self.x[:2], y, 0.1, steps=2, targeted=True)
        with self.assertRaisesRegex(ValueError, "own targets"):
            apgd.apgd_t(self.model, self.x[:2], y, 0.1, steps=2, targeted=True)
        # Three classes are enough for untargeted DLR.
        apgd.apgd_dlr(three, self.x[:2], y, 0.1, steps=2)

    def test_dlr_losses_match_formulas(self):
        z = np.array([[3.0, 1.0, 0.5, -1.0], [0.0, 2.0, 4.0, 1.0]], np.float32)
        y, t = np.array([0, 1], np.int32), np.array([1, 3], np.int32)
        self.assertAllClose(apgd.dlr_loss(z, y), [-(3 - 1) / (3 - 0.5), -(2 - 4) / (4 - 1)])
        targeted = [-(3 - 1) / (3 - (0.5 - 1) / 2), -(2 - 1) / (4 - (1 + 0) / 2)]
        self.assertAllClose(apgd.targeted_dlr_loss(z, y, t), targeted)

    @parameterized.parameters(1, 5, 10, 100, 1000)
    def test_checkpoint_periods_match_reference(self, steps):
        expected = [max(int(f * steps), 1) for f in (0.22, 0.06, 0.03)]
        self.assertAllEqual([int(p) for p in apgd._checkpoint_periods(steps)], expected)

    def test_defaults_are_accepted(self):
        for name, params in apgd.DEFAULTS.items():
            params = {**params, "steps": 1}
            adv = ATTACKS[name](self.model, self.x[:2], self.y[:2], 0.05, **params)
            self.assertEqual(adv.shape, self.x[:2].shape)


if __name__ == "__main__":
    tf.test.main()
