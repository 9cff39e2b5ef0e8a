"""Tests for s2s_tf.robustness.attacks.fab: FAB-T, the targeted minimum-norm L-inf attack."""

import math

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from s2s_tf.robustness import attacks
from s2s_tf.robustness import runner
from s2s_tf.robustness.attacks import fab

SHAPE = (4, 4, 3)
DIM = 48
NUM_CLASSES = 10
OPTS = {"alpha_max": 0.1, "eta": 1.05, "beta": 0.9, "clip_min": 0.0, "clip_max": 1.0}


def _reference_projection(t, w, b):
    """The reference's `projection_linf` (fab_projections.py), transcribed in NumPy.

    Kept close to the original line by line, binary search included, so that the
    vectorised version in `fab` is checked against the reference's own algorithm.
    """
    t, w, b = t.astype(np.float64), w.astype(np.float64).copy(), b.astype(np.float64).copy()
    sign = 2.0 * ((w * t).sum(1) - b >= 0) - 1.0
    w *= sign[:, None]
    b *= sign
    a = (w < 0).astype(np.float64)
    d = (a - t) * (w != 0)
    p = a - t * (2 * a - 1)
    indp = np.argsort(p, axis=1, kind="stable")
    b = b - (w * t).sum(1)
    b0 = (w * d).sum(1)
    indp2 = indp[:, ::-1]
    ws = np.take_along_axis(w, indp2, 1)
    bs2 = -ws * np.take_along_axis(d, indp2, 1)
    s = np.cumsum(np.abs(ws), 1)
    sb = np.cumsum(bs2, 1) + b0[:, None]
    rows = np.arange(len(t))
    b2 = sb[:, -1] - s[:, -1] * p[rows, indp[:, 0]]
    c_l = b - b2 > 0
    c2 = (b - b0 > 0) & ~c_l
    lb, ub = np.zeros(len(t)), np.full(len(t), w.shape[1] - 1.0)
    for _ in range(math.ceil(math.log2(w.shape[1]))):
        mid = np.floor((lb + ub) / 2).astype(int)
        cur = indp[rows, w.shape[1] - 1 - mid]
        c = b - (sb[rows, mid] - s[rows, mid] * p[rows, cur]) > 0
        lb, ub = np.where(c, mid, lb), np.where(c, ub, mid)
    lb = lb.astype(int)
    lam_l = np.maximum((b - sb[:, -1]) / -s[:, -1], 0)[:, None]
    d = np.where(c_l[:, None], (2 * a - 1) * lam_l, d)
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = np.maximum((b - sb[rows, lb]) / -s[rows, lb], 0)[:, None]
    d2 = np.minimum(lam, d) * a + np.maximum(-lam, d) * (1 - a)
    return np.where(c2[:, None], d2, d) * (w != 0)


def _reference_fab_t(weights, bias, x, start, y, target, steps):
    """The reference's `attack_single_run` (L-inf, targeted) from `start` on the linear
    model x @ weights + bias, in float64 NumPy. Returns (adversarial or x, its norm)."""
    n = len(x)
    x0 = x.reshape(n, -1).astype(np.float64)
    x1, adv, res = start.reshape(n, -1).astype(np.float64), x0.copy(), np.full(n, 1e10)
    grad = (weights[:, target] - weights[:, y]).T  # d(z_t - z_y)/dx, constant for a linear model
    for _ in range(steps):
        z = x1 @ weights + bias
        df = z[np.arange(n), target] - z[np.arange(n), y]
        b = -df + (grad * x1).sum(1)
        d3 = _reference_projection(np.concatenate([x1, x0]), np.tile(grad, (2, 1)), np.tile(b, 2))
        d1, d2 = d3[:n], d3[n:]
        a0 = np.maximum(np.abs(d3).max(1), 1e-8)
        alpha = np.clip(a0[:n] / (a0[:n] + a0[n:]), 0.0, 0.1)[:, None]
        x1 = np.clip((x1 + 1.05 * d1) * (1 - alpha) + (x0 + 1.05 * d2) * alpha, 0.0, 1.0)
        is_adv = (x1 @ weights + bias).argmax(1) != y
        t = np.abs(x1 - x0).max(1)
        better = is_adv & (t < res)
        adv[better], res[better] = x1[better], t[better]
        x1[is_adv] = x0[is_adv] + (x1[is_adv] - x0[is_adv]) * 0.9
    return adv.reshape(x.shape), res


def _linear(weights, bias):
    w_t, b_t = tf.constant(weights, tf.float32), tf.constant(bias, tf.float32)
    return lambda v: tf.reshape(v, [tf.shape(v)[0], -1]) @ w_t + b_t


def _two_class_linear(rng, n):
    """A 10-class linear model where classes 2-9 never win near the data, and examples
    whose boundary lies 0.01-0.2 away (L-inf) while every pixel is 0.3 from the box.

    Returns (model_fn, x, y, closed-form L-inf distance to the runner-up's boundary).
    """
    weights = rng.normal(size=(DIM, NUM_CLASSES)).astype(np.float32)
    bias = np.full(NUM_CLASSES, -100.0, np.float32)
    bias[:2] = 0.0
    x = rng.uniform(0.3, 0.7, (40 * n, *SHAPE)).astype(np.float32)
    z = x.reshape(len(x), -1) @ weights + bias
    # The minimal L-inf distance to {z_t >= z_y}: (z_y - z_t) / ||w_y - w_t||_1.
    dist = np.abs(z[:, 0] - z[:, 1]) / np.abs(weights[:, 0] - weights[:, 1]).sum()
    keep = np.flatnonzero((dist > 0.01) & (dist < 0.2))[:n]
    return _linear(weights, bias), x[keep], z[keep].argmax(1).astype(np.int32), dist[keep]


def _fab(model_fn, x, y, eps, **kwargs):
    """`fab._fab_t` compiled (its nested loops are slow eagerly), at OPTS and these kwargs."""
    kwargs = {"steps": 100, "seed": None, "n_target_classes": 9, "rand_init": True, **kwargs}
    return tf.function(lambda: fab._fab_t(model_fn, x, y, eps, **kwargs, **OPTS))()


def _seeds(n, offset=0):
    return tf.constant(np.stack([np.arange(n) + offset, 7 * np.arange(n)], 1), tf.int64)


class FabTest(tf.test.TestCase, parameterized.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        inputs = keras.Input(SHAPE)
        h = keras.layers.Dense(16, activation="tanh")(keras.layers.Flatten()(inputs))
        cls.model = keras.Model(inputs, keras.layers.Dense(4)(h))
        templates = 0.5 + 0.08 * rng.normal(size=(4, *SHAPE))

        def data(n):
            y = rng.integers(0, 4, n)
            x = np.clip(templates[y] + rng.normal(0.0, 0.05, (n, *SHAPE)), 0.0, 1.0)
            return x.astype(np.float32), y.astype(np.int32)

        cls.model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        x_train, y_train = data(512)
        cls.model.fit(x_train, y_train, batch_size=32, epochs=8, verbose=0)
        cls.x, cls.y = data(12)

    def test_projection_matches_reference(self):
        rng = np.random.default_rng(1)
        t = rng.uniform(0, 1, (200, 30)).astype(np.float32)
        t[:, :3] = rng.integers(0, 2, (200, 3))  # pixels at the box's ends
        w = rng.normal(size=t.shape).astype(np.float32) * (rng.uniform(size=t.shape) > 0.2)
        # Offsets from just past t to beyond the box (infeasible rows), on both sides.
        b = (w * t).sum(1) + rng.normal(0, 1, 200) * np.abs(w).sum(1) * rng.uniform(0, 0.6, 200)
        d = fab.projection_linf(t, w, b.astype(np.float32)).numpy()
        self.assertAllClose(d, _reference_projection(t, w, b.astype(np.float32)), atol=2e-5)
        self.assertAllInRange(t + d, -1e-6, 1.0 + 1e-6)
        # Feasible rows land on the hyperplane with the smallest L-inf step: moving every
        # coordinate by lambda (capped by the box) lowers |w.t - b| by sum |w| min(lambda, room).
        c = np.abs((w * t).sum(1) - b)
        room = np.where(w * np.sign((w * t).sum(1) - b)[:, None] < 0, 1 - t, t)
        reach = (np.abs(w) * room).sum(1)
        feasible = reach > c + 1e-3
        self.assertGreater(feasible.sum(), 50)
        self.assertLess(feasible.sum(), 200)  # infeasible rows are exercised too
        norm = np.abs(d).max(1)
        shrunk = (np.abs(w) * np.minimum(0.999 * norm[:, None], room)).sum(1)
        self.assertTrue(np.all(shrunk[feasible] < c[feasible]))  # a smaller step falls short
        self.assertAllClose(
            ((w * (t + d)).sum(1) - b)[feasible], np.zeros(feasible.sum()), atol=1e-4
        )

    @parameterized.parameters(True, False)
    def test_linear_model_reaches_closed_form_distance(self, rand_init):
        model_fn, x, y, dist = _two_class_linear(np.random.default_rng(2), 16)
        self.assertLen(x, 16)
        result = _fab(model_fn, x, y, 0.3, seed=_seeds(16), rand_init=rand_init)
        norm = np.abs(np.asarray(result.x) - x).reshape(16, -1).max(1)
        self.assertAllClose(norm, result.norm, atol=1e-6)
        self.assertTrue(np.all(result.success))
        self.assertTrue(np.all(np.argmax(model_fn(result.x), -1) != y))
        ratio = norm / dist
        self.assertTrue(np.all(ratio >= 1.0 - 1e-4), ratio)  # nothing beats the closed form
        self.assertTrue(np.all(ratio <= 1.05), ratio)

    @parameterized.parameters(True, False)
    def test_path_matches_reference_loop(self, rand_init):
        # A general 10-class linear model, data near the box's ends: every class can win,
        # and the projections hit the box. From a random start alpha_max binds.
        rng = np.random.default_rng(3)
        weights = rng.normal(size=(DIM, NUM_CLASSES))
        bias = rng.normal(size=NUM_CLASSES)
        x = rng.choice([0.0, 0.02, 0.5, 0.98, 1.0], (8, *SHAPE)).astype(np.float32)
        z = x.reshape(8, -1) @ weights + bias
        y = z.argmax(1).astype(np.int32)
        target = np.argsort(-z, 1, kind="stable")[:, 1]
        eps, seeds = 0.5, _seeds(8)
        # The first target's start (salted by its rank, 1), as the attack draws it.
        start = fab._random_start(tf.constant(x), eps, seeds, 1, 0.0, 1.0).numpy()
        start = start if rand_init else x
        self.assertEqual(np.abs(start - x).max() > 0, rand_init)
        expected, res = _reference_fab_t(weights, bias, x, start, y, target, steps=25)
        result = _fab(
            _linear(weights, bias), x, y, eps, steps=25, seed=seeds, n_target_classes=1,
            rand_init=rand_init,
        )  # fmt: skip
        self.assertTrue(np.all(res <= eps))
        self.assertAllClose(result.x, expected, atol=1e-4)
        self.assertAllClose(result.norm, res, atol=1e-4)

    def test_within_eps_and_box_and_eps_zero_is_identity(self):
        x = self.x.copy()
        x[:, :1] = np.random.default_rng(4).integers(0, 2, x[:, :1].shape)
        eps = 0.06
        attack = tf.function(
            lambda e: fab.fab_t(self.model, x, self.y, e, steps=20, seed=_seeds(12))
        )
        adv = attack(tf.constant(eps)).numpy()
        self.assertAllInRange(adv, 0.0, 1.0)
        self.assertLessEqual(np.abs(adv - x).max(), eps + 1e-6)
        self.assertGreater(np.abs(adv - x).max(), 0.0)  # some example was fooled
        same = attack(tf.constant(0.0)).numpy()
        self.assertAllEqual(same, x)

    def test_unreachable_and_misclassified_examples_are_unchanged(self):
        model_fn, x, y, dist = _two_class_linear(np.random.default_rng(5), 8)
        eps = float(np.median(dist))
        y = y.copy()
        y[0] = 1 - y[0]  # misclassified already
        result = _fab(model_fn, x, y, eps, steps=50, seed=_seeds(8), n_target_classes=3)
        out, far = np.asarray(result.x), dist > eps
        far[0] = False
        self.assertTrue(np.any(far) and np.any(~far[1:]))
        self.assertAllEqual(out[far], x[far])
        self.assertAllEqual(out[0], x[0])
        self.assertAllEqual(result.success, ~far)
        near = ~far
        near[0] = False
        self.assertTrue(np.all(np.abs(out[near] - x[near]).reshape(near.sum(), -1).max(1) <= eps))

    def test_per_example_result_independent_of_batch(self):
        attack = tf.function(
            lambda x, y, seed: fab.fab_t(self.model, x, y, 0.06, steps=20, seed=seed)
        )
        x, y, seeds = self.x[:5], self.y[:5], _seeds(5, offset=3)
        together = attack(x, y, seeds).numpy()
        self.assertGreater(np.abs(together - x).max(), 0.0)
        for i in range(5):
            alone = attack(x[i : i + 1], y[i : i + 1], seeds[i : i + 1]).numpy()
            self.assertAllClose(alone[0], together[i], atol=1e-6)
        swapped = attack(x[::-1], y[::-1], seeds[::-1]).numpy()
        self.assertAllClose(swapped[::-1], together, atol=1e-6)

    def test_registered_and_runs_through_runner(self):
        spec = attacks.get_spec("fab_t")
        self.assertEqual(spec.norm, attacks.LINF)
        self.assertEqual(spec.eps_policy, "reject")
        self.assertTrue(spec.stochastic)
        self.assertEqual(dict(spec.config_params), {"n_target_classes": "target_classes"})
        eps = 0.06
        adv = runner.run_attack("fab_t", self.model, self.x, self.y, eps, steps=20, restarts=2)
        self.assertEqual(adv.shape, self.x.shape)
        self.assertLessEqual(np.abs(adv - self.x).max(), eps + 1e-6)
        clean = runner.accuracy(self.model, self.x, self.y)
        self.assertGreaterEqual(clean, 0.75)
        self.assertLessEqual(runner.accuracy(self.model, adv, self.y), clean - 0.5)
        again = runner.run_attack("fab_t", self.model, self.x, self.y, eps, steps=20, restarts=2)
        self.assertAllEqual(adv, again)
        # Without a budget it is the minimum-norm attack: every example is fooled.
        free = runner.run_attack("fab_t", self.model, self.x, self.y, None, steps=20)
        self.assertTrue(np.all(runner.predict(self.model, free) != self.y))
        self.assertGreater(np.abs(free - self.x).max(), eps)

    def test_argument_errors(self):
        with self.assertRaisesRegex(ValueError, "picks its own targets"):
            fab.fab_t(self.model, self.x, self.y, 0.1, targeted=True)
        with self.assertRaisesRegex(ValueError, "no step size"):
            fab.fab_t(self.model, self.x, self.y, 0.1, step_size=0.01)
        with self.assertRaisesRegex(ValueError, "at least 2 classes"):
            fab.fab_t(lambda v: tf.reduce_sum(v, [1, 2, 3])[:, None], self.x, self.y, 0.1)


if __name__ == "__main__":
    tf.test.main()
