"""Tests for the per-example losses and metrics."""

import numpy as np
import tensorflow as tf

from s2s_tf.train import losses


class LossesTest(tf.test.TestCase):
    def test_reconstruction_losses_per_example(self):
        target = tf.zeros((2, 2, 2, 1))
        recon = tf.constant(np.array([1.0, -1.0, 2.0, 0.0, 0, 0, 0, 0]).reshape(2, 2, 2, 1))
        self.assertAllClose(losses.reconstruction_loss(target, recon, "mse"), [1.5, 0.0])
        self.assertAllClose(losses.reconstruction_loss(target, recon, "l1"), [1.0, 0.0])
        with self.assertRaisesRegex(ValueError, "reconstruction loss"):
            losses.reconstruction_loss(target, recon, "huber")

    def test_cross_entropy_and_correct(self):
        logits = tf.constant([[10.0, 0.0], [0.0, 10.0]])
        labels = tf.constant([0, 0])
        xent = losses.cross_entropy(labels, logits).numpy()
        self.assertLess(xent[0], 1e-3)
        self.assertGreater(xent[1], 9.0)
        self.assertAllEqual(losses.correct(labels, logits), [1.0, 0.0])

    def test_kl_is_zero_for_equal_logits_and_positive_otherwise(self):
        reference = tf.constant([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
        self.assertAllClose(losses.kl_to_reference(reference, reference), [0.0, 0.0], atol=1e-6)
        other = tf.constant([[3.0, 2.0, 1.0], [5.0, 0.0, 0.0]])
        self.assertTrue(np.all(losses.kl_to_reference(reference, other).numpy() > 0.1))

    def test_kl_is_kl_of_reference_to_prediction(self):
        """KL(p_ref || p) = sum p_ref * log(p_ref / p), in that direction."""
        reference = tf.constant([[0.0, np.log(3.0)]])  # p_ref = (1/4, 3/4)
        logits = tf.constant([[0.0, 0.0]])  # p = (1/2, 1/2)
        expected = 0.25 * np.log(0.25 / 0.5) + 0.75 * np.log(0.75 / 0.5)
        reverse = 0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)
        self.assertAllClose(losses.kl_to_reference(reference, logits), [expected], atol=1e-6)
        self.assertNotAllClose([expected], [reverse])

    def test_kl_gradient_flows_only_to_the_prediction(self):
        reference = tf.Variable([[1.0, 2.0]])
        logits = tf.Variable([[2.0, 1.0]])
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(losses.kl_to_reference(reference, logits))
        grad_ref, grad_logits = tape.gradient(loss, [reference, logits])
        self.assertIsNone(grad_ref)
        self.assertIsNotNone(grad_logits)

    def test_psnr(self):
        images = tf.zeros((1, 4, 4, 3))
        noisy = tf.fill((1, 4, 4, 3), 0.1)  # mse 0.01 -> 20 dB
        self.assertAllClose(losses.psnr(images, noisy), [20.0], atol=1e-3)
        # Values outside [0, 1] are clipped first; a perfect match is capped at 100 dB.
        self.assertAllClose(losses.psnr(images, -noisy), [100.0], atol=1e-3)
        self.assertAllClose(losses.psnr(images + 0.5, images + 0.5), [100.0], atol=1e-3)


if __name__ == "__main__":
    tf.test.main()
