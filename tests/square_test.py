"""Tests for s2s_tf.robustness.attacks.square: the L-inf Square Attack."""

import inspect

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from s2s_tf.robustness.attacks import iterates
from s2s_tf.robustness.attacks import square

SHAPE = (8, 8, 3)
NUM_CLASSES = 4
QUERIES = 200


def _reference_side(i, n_queries, p_init, h, w, c):
    """The reference's p_selection and side computation, transcribed."""
    it = int(i / n_queries * 10000)
    halvings = sum(it > t for t in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))
    p = p_init / 2**halvings
    return min(max(int(round(np.sqrt(p * (c * h * w) / c))), 1), min(h, w))


def _traced(model_fn, x, y, eps, steps, targeted=False, seed=(0, 1)):
    return square._square(
        model_fn,
        x,
        y,
        eps,
        steps=steps,
        p_init=0.8,
        targeted=targeted,
        seed=seed,
        clip_min=0.0,
        clip_max=1.0,
        trace=True,
    )


class _Recording:
    """Wraps a model and records every input and its logits (eagerly)."""

    def __init__(self, model):
        self.model = model
        self.seen = []

    def __call__(self, x):
        logits = self.model(x)
        self.seen.append((x.numpy(), logits.numpy()))
        return logits


class SquareTest(tf.test.TestCase, parameterized.TestCase):
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

        inputs = keras.Input(SHAPE)
        h = keras.layers.Dense(16, activation="tanh")(keras.layers.Flatten()(inputs))
        cls.model = keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(h))
        cls.model.compile(
            keras.optimizers.Adam(0.01),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        x_train, y_train = data(512)
        cls.model.fit(x_train, y_train, batch_size=32, epochs=12, verbose=0)  # 192 steps
        cls.x, cls.y = data(64)
        # Pixels at and near both ends of the range, so that clipping matters.
        cls.x_edges = rng.choice([0.0, 0.01, 0.5, 0.99, 1.0], (8, *SHAPE)).astype(np.float32)

        @tf.function
        def attack(x, y, eps, seed, targeted=False):
            return square.square_linf(
                cls.model, x, y, eps, steps=QUERIES, seed=seed, targeted=targeted
            )

        cls.attack = staticmethod(attack)  # a tf.function would bind to the test otherwise

    def _predict(self, x):
        return np.argmax(self.model(x), -1)

    def test_zero_eps_returns_input(self):
        adv = square.square_linf(self.model, self.x[:8], self.y[:8], 0.0, steps=20, seed=(1, 2))
        self.assertAllEqual(adv, self.x[:8])

    def test_every_candidate_within_budget_and_range(self):
        y = self._predict(self.x_edges).astype(np.int32)
        run = _traced(self.model, self.x_edges, y, 0.1, steps=50)
        self.assertLessEqual(float(run.max_violation), 1e-6)
        self.assertAllInRange(run.x, 0.0, 1.0)
        self.assertLessEqual(float(np.abs(run.x - self.x_edges).max()), 0.1 + 1e-6)
        # The hook itself: inputs outside the clip range leave the ball once clipped.
        run = _traced(self.model, self.x_edges + 2.0, y, 0.1, steps=2)
        self.assertGreater(float(run.max_violation), 0.1)

    def test_lowers_accuracy_below_clean(self):
        clean = np.mean(self._predict(self.x) == self.y)
        adv = self.attack(self.x, self.y, tf.constant(0.1), tf.constant([0, 1]))
        self.assertEqual(clean, 1.0)
        self.assertLess(np.mean(self._predict(adv) == self.y), 0.8)

    def test_targeted_reaches_targets(self):
        target = ((self.y + 1) % NUM_CLASSES).astype(np.int32)
        adv = self.attack(self.x, target, tf.constant(0.15), tf.constant([0, 1]), targeted=True)
        self.assertGreater(np.mean(self._predict(adv) == target), 0.3)

    def test_result_is_best_and_fooled_examples_stop(self):
        x, y = self.x[:16], self.y[:16].copy()
        y[:4] = (y[:4] + 1) % NUM_CLASSES  # already misclassified: kept as they are
        run = _traced(self.model, x, y, 0.1, steps=QUERIES)
        self.assertAllEqual(run.x[:4], x[:4])
        logits = self.model(run.x).numpy()
        margins = square.margin_loss(logits, y, False).numpy()
        # Loss is minus the margin of the returned point; success means misclassified.
        self.assertAllClose(run.loss[4:], -margins[4:], atol=1e-5)
        self.assertAllEqual(run.success, self._predict(run.x) != y)
        self.assertTrue(np.any(run.success[4:]))

    def test_queries_follow_the_search(self):
        # A large budget, so that most examples are fooled (and must then stay put).
        x, y, eps, steps = self.x[:6], self.y[:6], 0.2, 40
        model = _Recording(self.model)
        run = _traced(model, x, y, eps, steps=steps)
        # seen: the clean input, the stripes, then one candidate per step.
        self.assertLen(model.seen, steps + 2)
        stripes = model.seen[1][0] - x
        self.assertAllClose(np.abs(stripes), np.full_like(x, eps), atol=1e-6)
        self.assertAllEqual(np.sign(stripes), np.repeat(np.sign(stripes[:, :1]), 8, axis=1))
        cur, logits = model.seen[1]
        margin = square.margin_loss(logits, y, False).numpy()
        done = np.argmax(logits, -1) != y
        for i, (cand, logits) in enumerate(model.seen[2:]):
            side = int(square.square_side(i, steps, 0.8, *SHAPE))
            changed = np.any(cand != cur, axis=-1)  # [N, H, W]
            for n in range(len(x)):
                rows, cols = np.nonzero(changed[n])
                if len(rows):  # inside one side x side window, at clean +- eps
                    self.assertLessEqual(rows.max() - rows.min(), side - 1)
                    self.assertLessEqual(cols.max() - cols.min(), side - 1)
                dist = np.abs(cand[n] - x[n])[changed[n]]
                self.assertAllClose(dist, np.full_like(dist, eps), atol=1e-6)
            new_margin = square.margin_loss(logits, y, False).numpy()
            accept = ~done & (new_margin < margin)
            cur = np.where(accept[:, None, None, None], cand, cur)
            margin = np.where(accept, new_margin, margin)
            done |= accept & (np.argmax(logits, -1) != y)
        self.assertAllEqual(run.x, cur)
        self.assertAllEqual(run.success, done)
        self.assertTrue(np.any(done) and not np.all(done))

    def test_candidates_follow_the_draws(self):
        # Replays the search from TensorFlow's own per-example draws (the map_fn path of
        # iterates): every query must be exactly the reference's window on those numbers.
        x, eps, steps = self.x_edges[:5], 0.03, 130
        y = self._predict(x).astype(np.int32)
        seeds = tf.constant([[4, 1], [4, 2], [-3, 2**40], [9, 9], [0, 0]], tf.int64)
        model = _Recording(self.model)
        _traced(model, x, y, eps, steps=steps, seed=seeds)
        self.assertLen(model.seen, steps + 2)  # not stopped early: draws past one chunk
        hi, lo = np.clip(x + eps, 0.0, 1.0), np.clip(x - eps, 0.0, 1.0)
        stripes = iterates.per_example_uniform([1, 8, 3], seeds, salt=0).numpy()
        cur, logits = model.seen[1]
        self.assertAllEqual(cur, np.where(stripes < 0.5, lo, hi))
        margin = square.margin_loss(logits, y, False).numpy()
        done = np.argmax(logits, -1) != y
        grid = np.arange(8)
        for i, (cand, logits) in enumerate(model.seen[2:]):
            if i % 100 == 0:
                draws = iterates.per_example_uniform([100, 5], seeds, salt=i // 100 + 1).numpy()
            r = draws[:, i % 100]
            side = int(square.square_side(i, steps, 0.8, *SHAPE))
            top = 8 - side
            corner = np.floor(r[:, :2] * np.float32(top)).astype(int)
            vh, vw = np.clip(corner, 0, max(top - 1, 0)).T[:, :, None]
            in_rows, in_cols = (grid >= vh) & (grid < vh + side), (grid >= vw) & (grid < vw + side)
            window = (in_rows[:, :, None] & in_cols[:, None, :])[..., None]
            values = np.where(r[:, None, None, 2:] >= 0.5, hi, lo)
            self.assertAllEqual(cand, np.where(window, values, cur))
            new_margin = square.margin_loss(logits, y, False).numpy()
            accept = ~done & (new_margin < margin)
            cur = np.where(accept[:, None, None, None], cand, cur)
            margin = np.where(accept, new_margin, margin)
            done |= accept & (np.argmax(logits, -1) != y)

    def test_nan_logits_keep_the_clean_input(self):
        x, y = self.x[:6], self.y[:6]

        def model_fn(images):
            logits = self.model(images)
            bad = tf.constant([True, False, True, False, False, False])[:, None]
            return tf.where(bad, float("nan"), logits)

        adv, loss, success, _ = (np.asarray(v) for v in _traced(model_fn, x, y, 0.2, steps=60))
        # A NaN margin never counts as an improvement: the clean input stays the best point.
        self.assertAllEqual(adv[[0, 2]], x[[0, 2]])
        # Success is the clean prediction's (argmax of NaN logits is some class), as before.
        clean_fooled = np.argmax(model_fn(x), -1) != y
        self.assertAllEqual(success[[0, 2]], clean_fooled[[0, 2]])
        self.assertAllEqual(loss[[0, 2]], [-np.inf, -np.inf])
        self.assertTrue(np.all(np.abs(adv[[1, 3, 4, 5]] - x[[1, 3, 4, 5]]).max((1, 2, 3)) > 0))

    def test_per_example_draws_need_no_loop_over_examples(self):
        # The query loop is the only loop in the graph: no map_fn over the examples.
        seeds = tf.constant([[1, 2]] * 4, tf.int64)
        graph = self.attack.get_concrete_function(
            self.x[:4], self.y[:4], tf.constant(0.1), seeds
        ).graph.as_graph_def()
        ops = [n.op for n in graph.node] + [
            n.op for f in graph.library.function for n in f.node_def
        ]
        self.assertEqual(ops.count("While") + ops.count("StatelessWhile"), 1)

    def test_uses_no_gradients(self):
        source = inspect.getsource(square)
        self.assertNotIn("GradientTape", source)
        self.assertNotIn("gradient(", source)

        # A model with no gradient at all (piecewise constant logits) is fine.
        @tf.function
        def attack(x, y):
            def model_fn(images):
                return tf.stop_gradient(tf.round(self.model(images) * 4.0))

            return square.square_linf(model_fn, x, y, 0.1, steps=20)

        self.assertEqual(attack(self.x[:4], self.y[:4]).shape, self.x[:4].shape)

    def test_per_example_seeds_independent_of_batch(self):
        seeds = tf.constant([[11, 1], [22, 2], [33, 3]], tf.int64)
        x, y, eps = self.x[:3], self.y[:3], tf.constant(0.08)
        together = self.attack(x, y, eps, seeds)
        self.assertNotAllClose(together, x)
        for i in range(3):
            alone = self.attack(x[i : i + 1], y[i : i + 1], eps, seeds[i : i + 1])
            self.assertAllEqual(alone[0], together[i])
        swapped = self.attack(x[::-1], y[::-1], eps, seeds[::-1])
        self.assertAllEqual(swapped[::-1], together)

    def test_single_seed_is_deterministic(self):
        a = self.attack(self.x[:8], self.y[:8], tf.constant(0.08), tf.constant([5, 6]))
        b = self.attack(self.x[:8], self.y[:8], tf.constant(0.08), tf.constant([5, 6]))
        self.assertAllEqual(a, b)
        c = self.attack(self.x[:8], self.y[:8], tf.constant(0.08), tf.constant([7, 6]))
        self.assertNotAllClose(a, c)

    def test_unknown_batch_size_matches_static(self):
        # The runner retraces with an unknown batch size once it sees a second batch shape.
        @tf.function(
            input_signature=[
                tf.TensorSpec([None, *SHAPE], tf.float32),
                tf.TensorSpec([None], tf.int32),
                tf.TensorSpec([None, 2], tf.int64),
            ]
        )
        def attack(x, y, seeds):
            return square.square_linf(self.model, x, y, 0.08, steps=120, seed=seeds)

        seeds = tf.constant([[1, 5], [2, 6], [3, 7]], tf.int64)
        static = square.square_linf(self.model, self.x[:3], self.y[:3], 0.08, steps=120, seed=seeds)
        self.assertAllEqual(attack(self.x[:3], self.y[:3], seeds), static)
        self.assertAllEqual(attack(self.x[:2], self.y[:2], seeds[:2]), static[:2])

    def test_eager_matches_compiled(self):
        eager = square.square_linf(
            self.model, self.x[:4], self.y[:4], 0.08, steps=QUERIES, seed=[3, 4]
        )
        compiled = self.attack(self.x[:4], self.y[:4], tf.constant(0.08), tf.constant([3, 4]))
        self.assertAllClose(eager, compiled, atol=1e-6)
        # Both calls above with eps tensors share one trace.
        self.attack(self.x[:4], self.y[:4], tf.constant(0.05), tf.constant([3, 4]))
        before = self.attack.experimental_get_tracing_count()
        self.attack(self.x[:4], self.y[:4], tf.constant(0.02), tf.constant([3, 4]))
        self.assertEqual(self.attack.experimental_get_tracing_count(), before)

    @parameterized.parameters(10, 100, 1000, 5000, 10000)
    def test_side_schedule_matches_reference(self, steps):
        h, w, c = 32, 32, 3
        iterations = sorted({0, 1, 2, *range(0, steps, max(steps // 97, 1)), steps - 1})
        sides = [int(square.square_side(i, steps, 0.8, h, w, c)) for i in iterations]
        self.assertEqual(sides, [_reference_side(i, steps, 0.8, h, w, c) for i in iterations])

    def test_margin_loss(self):
        z = np.array([[3.0, 1.0, 0.5], [0.0, 2.0, 4.0]], np.float32)
        y = np.array([0, 1], np.int32)
        self.assertAllClose(square.margin_loss(z, y, False), [2.0, -2.0])
        self.assertAllClose(square.margin_loss(z, y, True), [-2.0, 2.0])

    def test_rejects_step_size_and_non_images(self):
        with self.assertRaisesRegex(ValueError, "step size"):
            square.square_linf(self.model, self.x[:2], self.y[:2], 0.1, step_size=0.1)
        with self.assertRaisesRegex(ValueError, "images"):
            square.square_linf(lambda v: v, np.zeros((2, 5), np.float32), self.y[:2], 0.1)

    def test_defaults_are_accepted(self):
        params = {**square.DEFAULTS["square_linf"], "steps": 3}
        adv = square.square_linf(self.model, self.x[:2], self.y[:2], 0.05, **params)
        self.assertEqual(adv.shape, self.x[:2].shape)


if __name__ == "__main__":
    tf.test.main()
