"""Tests for the per-example losses and metrics."""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import s2s_model
from s2s_tf.train import decoder_stage
from s2s_tf.train import losses
from s2s_tf.train import stage_common


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


class Stage2LossCompositionTest(tf.test.TestCase, parameterized.TestCase):
    """Stage 2's objective: task loss + reconstruction_weight x reconstruction, per example."""

    SHAPE = (8, 8, 3)

    def _stage(self, loss, weight, kind="mse"):
        keras.utils.set_random_seed(0)
        stage = decoder_stage.DecoderStage(
            None, loss=loss, reconstruction_weight=weight, reconstruction_loss=kind
        )
        stage.autoencoder = ae_lib.build_autoencoder(
            ae_lib.AutoencoderConfig(stage_widths=((4,),)), self.SHAPE
        )
        inputs = keras.Input(self.SHAPE)
        stage.classifier = keras.Model(
            inputs, keras.layers.Dense(5)(keras.layers.Flatten()(inputs))
        )
        return stage

    @parameterized.parameters(
        ("kl", 0.0, "mse"), ("kl", 1.0, "mse"), ("kl", 2.5, "l1"), ("xent", 0.5, "mse")
    )
    def test_paper_objective_is_the_weighted_sum(self, loss, weight, kind):
        stage = self._stage(loss, weight, kind)
        rng = np.random.default_rng(0)
        images = tf.constant(rng.uniform(size=(4, *self.SHAPE)).astype(np.float32))
        labels = tf.constant([0, 1, 2, 3])
        outputs = stage.train_outputs(images, labels)
        # The same forward pass, the terms computed here from the library's losses.
        target = stage_common.normalize(images)
        reconstruction = ae_lib.decoder_only_forward(stage.autoencoder, target, training=True)
        logits = stage.classifier(s2s_model.image_from_reconstruction(reconstruction))
        if loss == "kl":
            task = losses.kl_to_reference(stage.classifier(images), logits)
        else:
            task = losses.cross_entropy(labels, logits)
        recon = losses.reconstruction_loss(target, reconstruction, kind)
        self.assertGreater(float(tf.reduce_min(recon)), 1e-4)  # the weight must matter
        self.assertGreater(float(tf.reduce_min(task)), 1e-6)
        self.assertAllClose(outputs["task_loss"], task, atol=1e-5)
        self.assertAllClose(outputs["reconstruction"], recon, atol=1e-5)
        self.assertAllClose(outputs["loss"], task + weight * recon, atol=1e-5)
        self.assertEqual(outputs["loss"].shape, (4,))  # per example, averaged by the trainer

    def test_negative_weight_is_refused(self):
        with self.assertRaisesRegex(ValueError, "reconstruction_weight"):
            decoder_stage.DecoderStage(None, reconstruction_weight=-1.0)


if __name__ == "__main__":
    tf.test.main()
