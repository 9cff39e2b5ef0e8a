"""Tests for s2s_tf/robustness/attacks/base.py: the best iterate is kept, not the last one."""

import numpy as np
import tensorflow as tf

from s2s_tf.robustness.attacks import base
from s2s_tf.robustness.attacks import pgd

SHAPE = (1, 4, 4, 1)


def _linear_model(x):
    """Class 1 when the image's mean exceeds 0.5 (logit difference 40 * (mean - 0.5))."""
    m = tf.reduce_mean(x, axis=[1, 2, 3])
    return tf.stack([tf.zeros_like(m), 40.0 * (m - 0.5)], axis=-1)


def _scripted(means):
    """An `update` that ignores the gradient and walks through images of the given means."""

    def update(adv, grad, state):
        del adv, grad
        i = state[0]
        image = tf.fill(SHAPE, tf.gather(tf.constant(means, tf.float32), i))
        return image, (i + 1,)

    return update


def _run(means, start, label=0):
    x = tf.fill(SHAPE, 0.0)
    adv = tf.fill(SHAPE, start)
    y = tf.constant([label], tf.int32)
    result = base.best_iterate_loop(
        _linear_model, x, y, adv, _scripted(means), len(means), state=(tf.constant(0),)
    )
    return float(tf.reduce_mean(result))


class BestIterateTest(tf.test.TestCase):
    def test_the_first_misclassified_iterate_is_kept(self):
        # Iterates: start 0.2, then 0.4, 0.6 (fooled), 0.7 (fooled, higher loss), 0.3 (last).
        self.assertAlmostEqual(_run([0.4, 0.6, 0.7, 0.3], start=0.2), 0.6, places=6)

    def test_without_success_the_highest_loss_is_kept(self):
        # Never above 0.5: the highest loss is at the highest mean, 0.45, not the last, 0.1.
        self.assertAlmostEqual(_run([0.3, 0.45, 0.2, 0.1], start=0.0), 0.45, places=6)

    def test_a_fooled_last_iterate_counts(self):
        self.assertAlmostEqual(_run([0.1, 0.2, 0.9], start=0.0), 0.9, places=6)

    def test_targeted_success_means_reaching_the_target(self):
        x = tf.fill(SHAPE, 0.0)
        result = base.best_iterate_loop(
            _linear_model,
            x,
            tf.constant([1], tf.int32),
            tf.fill(SHAPE, 0.1),
            _scripted([0.7, 0.2]),
            2,
            targeted=True,
            state=(tf.constant(0),),
        )
        self.assertAlmostEqual(float(tf.reduce_mean(result)), 0.7, places=6)

    def test_pgd_keeps_an_example_that_an_overshooting_step_would_lose(self):
        # A band classifier: class 1 only for means in (0.5, 0.6). Large PGD steps cross the
        # band; the last iterate lands beyond it, the best iterate is inside.
        def band(x):
            m = tf.reduce_mean(x, axis=[1, 2, 3])
            inside = -400.0 * (m - 0.5) * (m - 0.6)
            return tf.stack([tf.zeros_like(m), inside], axis=-1)

        x = np.full(SHAPE, 0.46, np.float32)
        adv = pgd.bim(band, x, [0], 0.3, steps=6, step_size=0.12)
        self.assertEqual(int(tf.argmax(band(adv), -1)[0]), 1)


if __name__ == "__main__":
    tf.test.main()
