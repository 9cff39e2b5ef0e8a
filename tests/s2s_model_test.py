"""Tests for the composite defended model."""

import os
import tempfile

import keras
import tensorflow as tf

from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import preprocessing
from s2s_tf.models import s2s_model

SHAPE = (12, 12, 3)


def _tiny_classifier():
    inputs = keras.Input(SHAPE)
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(5)(x), name="tiny")


class S2SModelTest(tf.test.TestCase):
    def setUp(self):
        super().setUp()
        keras.utils.set_random_seed(0)
        self.ae = ae_lib.build_autoencoder(
            ae_lib.AutoencoderConfig(stage_widths=((4,), (8,))), input_shape=SHAPE
        )
        self.classifier = _tiny_classifier()
        self.model = s2s_model.build_s2s_model(self.ae, self.classifier)
        self.x = tf.random.uniform((3, *SHAPE), seed=1)

    def test_composite_equals_the_parts_in_sequence(self):
        normalised = preprocessing.Normalize()(self.x)
        reconstruction = preprocessing.Denormalize()(self.ae(normalised))
        self.assertAllClose(self.model(self.x), self.classifier(reconstruction), atol=1e-5)

    def test_parts_are_shared_not_copied(self):
        self.assertIs(s2s_model.get_autoencoder(self.model), self.ae)
        nested = s2s_model.get_classifier(self.model)
        self.assertIs(nested.layers[1], self.classifier)
        self.assertEqual(
            self.model.count_params(), self.ae.count_params() + self.classifier.count_params()
        )

    def test_gradients_flow_end_to_end(self):
        with tf.GradientTape() as tape:
            tape.watch(self.x)
            loss = tf.reduce_sum(self.model(self.x)[:, 0])
        grad = tape.gradient(loss, self.x)
        self.assertGreater(float(tf.reduce_max(tf.abs(grad))), 0.0)

    def test_purifier_returns_reconstruction_in_pixel_units(self):
        purifier = s2s_model.build_purifier(self.ae, SHAPE)
        expected = preprocessing.Denormalize()(self.ae(preprocessing.Normalize()(self.x)))
        self.assertAllClose(purifier(self.x), expected, atol=1e-6)
        clipped = s2s_model.build_purifier(self.ae, SHAPE, clip=True)(self.x)
        self.assertAllClose(clipped, tf.clip_by_value(expected, 0.0, 1.0), atol=1e-6)

    def test_channel_mismatch_raises(self):
        gray_ae = ae_lib.build_autoencoder(
            ae_lib.AutoencoderConfig(stage_widths=((4,),), channels=1), input_shape=(12, 12, 1)
        )
        with self.assertRaisesRegex(ValueError, "1 channels"):
            s2s_model.build_s2s_model(gray_ae, self.classifier)

    def test_keras_round_trip_in_safe_mode(self):
        path = os.path.join(tempfile.mkdtemp(), "defended.keras")
        self.model.save(path)
        loaded = keras.saving.load_model(path, safe_mode=True)
        self.assertAllClose(loaded(self.x), self.model(self.x), atol=1e-6)


if __name__ == "__main__":
    tf.test.main()
