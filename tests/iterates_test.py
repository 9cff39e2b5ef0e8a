"""Tests for s2s_tf.robustness.attacks.iterates: best-iterate tracking, seeds, budgets."""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from s2s_tf.robustness.attacks import iterates


def _fold(steps, x0):
    """Runs update_best over `steps`, a list of (x, loss, success), from init_best(x0)."""
    state = iterates.init_best(tf.constant(x0))
    for x, loss, success in steps:
        state = iterates.update_best(
            *state, tf.constant(x), tf.constant(loss), tf.constant(success)
        )
    return state


class UpdateBestTest(tf.test.TestCase, parameterized.TestCase):
    def test_keeps_highest_loss_not_last(self):
        # Two examples whose losses oscillate; neither ever succeeds.
        losses = [[0.1, 0.5], [0.9, 0.2], [0.3, 0.7], [0.9, 0.1], [0.2, 0.6]]
        steps = [
            (np.full([2, 3], i, np.float32), np.float32(loss), np.array([False, False]))
            for i, loss in enumerate(losses)
        ]
        x, loss, success = _fold(steps, np.full([2, 3], -1.0, np.float32))
        # Example 0 peaks at 0.9 first at iterate 1 (ties keep the first); example 1 at 2.
        self.assertAllEqual(x[:, 0], [1.0, 2.0])
        self.assertAllClose(loss, [0.9, 0.7])
        self.assertAllEqual(success, [False, False])

    def test_first_success_is_sticky(self):
        steps = [
            (np.full([2, 1], 0.0, np.float32), np.float32([1.0, 1.0]), np.array([False, True])),
            (np.full([2, 1], 1.0, np.float32), np.float32([0.5, 9.0]), np.array([True, True])),
            (np.full([2, 1], 2.0, np.float32), np.float32([8.0, 9.0]), np.array([True, False])),
        ]
        x, loss, success = _fold(steps, np.full([2, 1], -1.0, np.float32))
        # Example 0 first succeeds at iterate 1 (lower loss than iterate 0: success wins,
        # and iterate 2's higher loss does not replace it); example 1 at iterate 0.
        self.assertAllEqual(x[:, 0], [1.0, 0.0])
        self.assertAllClose(loss, [0.5, 1.0])
        self.assertAllEqual(success, [True, True])

    def test_nan_loss_never_wins(self):
        steps = [
            (np.zeros([1, 1], np.float32), np.float32([1.0]), np.array([False])),
            (np.ones([1, 1], np.float32), np.float32([np.nan]), np.array([False])),
        ]
        x, loss, _ = _fold(steps, np.full([1, 1], -1.0, np.float32))
        self.assertAllEqual(x, [[0.0]])
        self.assertAllClose(loss, [1.0])

    def test_init_best_keeps_successful_input(self):
        x0 = np.zeros([2, 2], np.float32)
        state = iterates.init_best(tf.constant(x0), tf.constant([True, False]))
        state = iterates.update_best(
            *state, tf.ones([2, 2]), tf.constant([5.0, 5.0]), tf.constant([True, True])
        )
        self.assertAllEqual(state[0], [[0.0, 0.0], [1.0, 1.0]])
        self.assertAllEqual(state[1], [-np.inf, 5.0])

    def test_works_in_tf_function(self):
        @tf.function
        def run(xs, losses, successes):
            state = iterates.init_best(xs[0])
            for i in tf.range(tf.shape(xs)[0]):
                state = iterates.update_best(*state, xs[i], losses[i], successes[i])
            return state

        xs = tf.reshape(tf.range(12, dtype=tf.float32), [4, 3, 1])
        losses = tf.constant([[1.0, 0.0, 0.0], [3.0, 0.0, 2.0], [2.0, 1.0, 9.0], [0.0, 5.0, 1.0]])
        successes = tf.constant([[False] * 3, [False] * 3, [False, False, True], [False] * 3])
        x, _, success = run(xs, losses, successes)
        self.assertAllEqual(x[:, 0], [3.0, 10.0, 8.0])
        self.assertAllEqual(success, [False, False, True])


class HelpersTest(tf.test.TestCase, parameterized.TestCase):
    def test_select_broadcasts_over_example_axes(self):
        a, b = tf.ones([3, 2, 2]), tf.zeros([3, 2, 2])
        out = iterates.select(tf.constant([True, False, True]), a, b)
        self.assertAllEqual(tf.reduce_sum(out, [1, 2]), [4.0, 0.0, 4.0])

    @parameterized.parameters((False, [False, True, True]), (True, [True, False, False]))
    def test_misclassified(self, targeted, expected):
        logits = tf.constant([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
        out = iterates.misclassified(logits, tf.constant([0, 0, 1]), targeted)
        self.assertAllEqual(out, expected)

    def test_budget_violation(self):
        # Binary fractions, so that no rounding blurs the edge of the ball.
        x = tf.constant([[0.5, 0.0]])
        feasible = iterates.budget_violation(x, x + [[0.125, 0.125]], 0.125, 0.0, 1.0)
        self.assertEqual(float(feasible), 0.0)
        self.assertAllClose(iterates.budget_violation(x, x + [[0.375, 0.0]], 0.125, 0.0, 1.0), 0.25)
        # Below clip_min while inside the ball.
        self.assertAllClose(
            iterates.budget_violation(x, x - [[0.0, 0.0625]], 0.125, 0.0, 1.0), 0.0625
        )

    def test_loss_and_gradient(self):
        w = tf.constant([[1.0, -2.0], [3.0, 0.5]])

        def loss_fn(logits):
            return logits[:, 0]

        logits, loss, grad = iterates.loss_and_gradient(lambda x: x @ w, loss_fn, tf.ones([2, 2]))
        self.assertAllClose(loss, [4.0, 4.0])
        self.assertAllClose(grad, [[1.0, 3.0], [1.0, 3.0]])
        # A loss that ignores the input has a zero (not None) gradient.
        _, _, grad = iterates.loss_and_gradient(lambda x: w, lambda z: z[:, 0], tf.ones([2, 2]))
        self.assertAllEqual(grad, tf.zeros([2, 2]))


class SeedsTest(tf.test.TestCase, parameterized.TestCase):
    SEEDS = np.array([[1, 2], [3, 4], [5, 6], [7, 8]], np.int64)

    @parameterized.parameters([[2]], [[3, 2]], [[4]], [[2, 3]])
    def test_check_seed_shapes(self, shape):
        seed = np.zeros(shape, np.int64)
        if shape in ([2], [3, 2]):
            self.assertEqual(iterates.check_seed(seed, 3).dtype, tf.int64)
        else:
            with self.assertRaisesRegex(ValueError, "seed"):
                iterates.check_seed(seed, 3)

    def test_per_example_seed_rows_must_match_batch(self):
        with self.assertRaisesRegex(ValueError, "rows"):
            iterates.check_seed(np.zeros([3, 2], np.int64), 4)

    def test_rows_depend_only_on_own_seed(self):
        together = iterates.per_example_uniform([5, 2], self.SEEDS, -1.0, 1.0, salt=3)
        self.assertEqual(together.shape, [4, 5, 2])
        for i in range(4):
            alone = iterates.per_example_uniform([5, 2], self.SEEDS[i : i + 1], -1.0, 1.0, salt=3)
            self.assertAllEqual(alone[0], together[i])
        reordered = iterates.per_example_uniform([5, 2], self.SEEDS[::-1], -1.0, 1.0, salt=3)
        self.assertAllEqual(reordered[::-1], together)
        self.assertAllInRange(together, -1.0, 1.0)

    def test_salts_and_seeds_give_different_streams(self):
        a = iterates.per_example_uniform([8], self.SEEDS, salt=0)
        b = iterates.per_example_uniform([8], self.SEEDS, salt=1)
        self.assertNotAllClose(a, b)
        # Distinct seeds give distinct rows.
        self.assertNotAllClose(a[0], a[1])

    def test_single_seed_is_deterministic(self):
        seed = tf.constant([4, 2], tf.int64)
        a = iterates.per_example_uniform([3], seed, batch_size=5, salt=7)
        b = iterates.per_example_uniform([3], seed, batch_size=5, salt=7)
        self.assertEqual(a.shape, [5, 3])
        self.assertAllEqual(a, b)
        self.assertNotAllClose(a, iterates.per_example_uniform([3], seed + 1, batch_size=5))
        with self.assertRaisesRegex(ValueError, "batch_size"):
            iterates.per_example_uniform([3], seed)

    def test_same_in_tf_function_with_tensor_salt(self):
        fn = tf.function(lambda s, salt: iterates.per_example_uniform([4], s, salt=salt))
        graph = fn(tf.constant(self.SEEDS), tf.constant(2))
        self.assertAllEqual(graph, iterates.per_example_uniform([4], self.SEEDS, salt=2))


if __name__ == "__main__":
    tf.test.main()
