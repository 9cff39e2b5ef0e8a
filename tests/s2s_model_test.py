"""Tests for the composite defended model."""

import hashlib
import os

import keras
import numpy as np
import tensorflow as tf

from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import preprocessing
from s2s_tf.models import s2s_model

SHAPE = (12, 12, 3)
# conv_final biases in the autoencoder's normalised space: red far above 1 after
# Denormalize, green far below 0, blue around the ImageNet mean.
OUT_OF_RANGE_BIAS = (6.0, -6.0, 0.0)


def _tiny_classifier():
    inputs = keras.Input(SHAPE)
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(5)(x), name="tiny")


def push_out_of_range(autoencoder, bias=OUT_OF_RANGE_BIAS):
    """Sets the final conv's bias so that reconstructions leave [0, 1]."""
    conv = ae_lib.get_decoder(autoencoder).get_layer("conv_final")
    conv.bias.assign(np.asarray(bias, np.float32))


def unclipped_reconstruction(autoencoder, x):
    """Denormalize(autoencoder(Normalize(x))), computed by hand, without the clip."""
    return preprocessing.Denormalize()(autoencoder(preprocessing.Normalize()(x)))


def build_unclipped_composite(autoencoder, classifier, name="s2s_defended"):
    """The composite as builds before the clip saved it: no clip after Denormalize."""
    inputs = keras.Input(SHAPE, name="image")
    x = preprocessing.Normalize(name="ae_normalize")(inputs)
    x = s2s_model._renamed(autoencoder, s2s_model.AUTOENCODER_NAME)(x)
    x = preprocessing.Denormalize(name="ae_denormalize")(x)
    logits = s2s_model._renamed(classifier, s2s_model.CLASSIFIER_NAME)(x)
    return keras.Model(inputs, logits, name=name)


class S2SModelTest(tf.test.TestCase):
    def setUp(self):
        super().setUp()
        keras.utils.set_random_seed(0)
        self.ae = ae_lib.build_autoencoder(
            ae_lib.AutoencoderConfig(stage_widths=((4,), (8,))), input_shape=SHAPE
        )
        push_out_of_range(self.ae)
        self.classifier = _tiny_classifier()
        self.model = s2s_model.build_s2s_model(self.ae, self.classifier)
        self.x = tf.random.uniform((3, *SHAPE), seed=1)
        raw = unclipped_reconstruction(self.ae, self.x).numpy()
        # Every test below is about reconstructions that leave [0, 1]: make sure some do.
        self.assertGreater(raw.max(), 1.05)
        self.assertLess(raw.min(), -0.05)
        self.raw = raw

    def test_composite_equals_the_parts_in_sequence(self):
        clipped = np.clip(self.raw, 0.0, 1.0)
        self.assertAllClose(self.model(self.x), self.classifier(clipped), atol=1e-5)
        # Without the clip the logits differ, so the equality above can fail.
        unclipped = self.classifier(self.raw).numpy()
        self.assertGreater(np.abs(unclipped - self.model(self.x).numpy()).max(), 1e-2)

    def test_composite_is_the_classifier_after_the_purifier(self):
        purifier = s2s_model.build_purifier(self.ae, SHAPE)
        self.assertAllEqual(self.model(self.x), self.classifier(purifier(self.x)))

    def test_purifier_returns_the_clipped_reconstruction(self):
        purified = s2s_model.build_purifier(self.ae, SHAPE)(self.x).numpy()
        self.assertAllClose(purified, np.clip(self.raw, 0.0, 1.0), atol=1e-6)
        self.assertBetween(purified.min(), 0.0, 1.0)
        self.assertBetween(purified.max(), 0.0, 1.0)

    def test_image_from_reconstruction_is_what_the_purifier_returns(self):
        output = self.ae(preprocessing.Normalize()(self.x))
        purifier = s2s_model.build_purifier(self.ae, SHAPE)
        self.assertAllEqual(s2s_model.image_from_reconstruction(output), purifier(self.x))

    def test_parts_are_shared_not_copied(self):
        self.assertIs(s2s_model.get_autoencoder(self.model), self.ae)
        nested = s2s_model.get_classifier(self.model)
        self.assertIs(nested.layers[1], self.classifier)
        self.assertEqual(
            self.model.count_params(), self.ae.count_params() + self.classifier.count_params()
        )

    def test_gradients_flow_end_to_end(self):
        push_out_of_range(self.ae, (0.0, 0.0, 0.0))  # nothing clipped
        with tf.GradientTape() as tape:
            tape.watch(self.x)
            loss = tf.reduce_sum(self.model(self.x)[:, 0])
        grad = tape.gradient(loss, self.x)
        self.assertGreater(float(tf.reduce_max(tf.abs(grad))), 0.0)

    def test_clipped_channels_pass_no_gradient(self):
        purifier = s2s_model.build_purifier(self.ae, SHAPE)
        self.assertTrue(np.all(self.raw[..., 0] > 1.0) and np.all(self.raw[..., 1] < 0.0))
        for channel, expect_zero in ((0, True), (1, True), (2, False)):
            with tf.GradientTape() as tape:
                tape.watch(self.x)
                value = tf.reduce_sum(purifier(self.x)[..., channel])
            peak = float(tf.reduce_max(tf.abs(tape.gradient(value, self.x))))
            if expect_zero:
                self.assertEqual(peak, 0.0, f"channel {channel}")
            else:
                self.assertGreater(peak, 0.0, f"channel {channel}")

    def test_channel_mismatch_raises(self):
        gray_ae = ae_lib.build_autoencoder(
            ae_lib.AutoencoderConfig(stage_widths=((4,),), channels=1), input_shape=(12, 12, 1)
        )
        with self.assertRaisesRegex(ValueError, "1 channels"):
            s2s_model.build_s2s_model(gray_ae, self.classifier)

    def test_keras_round_trip_in_safe_mode(self):
        path = os.path.join(self.get_temp_dir(), "defended.keras")
        self.model.save(path)
        loaded = keras.saving.load_model(path, safe_mode=True)
        self.assertAllClose(loaded(self.x), self.model(self.x), atol=1e-6)

    def test_a_file_saved_without_the_clip_loads_as_todays_composite(self):
        old = build_unclipped_composite(self.ae, self.classifier, name="old_defended")
        path = os.path.join(self.get_temp_dir(), "defended.keras")
        old.save(path)
        raw_old = keras.saving.load_model(path, safe_mode=True)
        self.assertNotIn(s2s_model.CLIP_NAME, [layer.name for layer in raw_old.layers])
        self.assertGreater(np.abs(raw_old(self.x).numpy() - self.model(self.x).numpy()).max(), 1e-2)
        loaded = s2s_model.load_keras(path, "defended")
        self.assertEqual(loaded.name, "old_defended")
        self.assertIn(s2s_model.CLIP_NAME, [layer.name for layer in loaded.layers])
        self.assertAllClose(loaded(self.x), self.model(self.x), atol=1e-5)

    def test_load_keras_leaves_other_models_alone(self):
        path = os.path.join(self.get_temp_dir(), "classifier.keras")
        self.classifier.save(path)
        loaded = s2s_model.load_keras(path, "classifier")
        self.assertFalse(s2s_model.is_composite(loaded))
        self.assertEqual(loaded.name, "tiny")
        self.assertAllClose(loaded(self.x), self.classifier(self.x), atol=1e-6)
        with self.assertRaisesRegex(FileNotFoundError, "classifier not found"):
            s2s_model.load_keras(path + ".missing", "classifier")

    def test_file_digests_are_content_hashes(self):
        directory = self.get_temp_dir()
        a, b, c = (os.path.join(directory, name) for name in ("a.keras", "b.keras", "c.keras"))
        for path, data in ((a, b"same bytes"), (b, b"same bytes"), (c, b"other bytes")):
            with open(path, "wb") as f:
                f.write(data)
        digests = s2s_model.file_digests([a, None, b, c])
        self.assertEqual(list(digests), [a, b, c])
        self.assertEqual(digests[a], hashlib.sha256(b"same bytes").hexdigest())
        self.assertEqual(digests[a], digests[b])
        self.assertNotEqual(digests[a], digests[c])
        with self.assertRaisesRegex(FileNotFoundError, "missing.keras"):
            s2s_model.file_digests([os.path.join(directory, "missing.keras")])


if __name__ == "__main__":
    tf.test.main()
