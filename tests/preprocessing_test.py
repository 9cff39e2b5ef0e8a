"""Tests for s2s_tf.models.preprocessing."""

import os

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from s2s_tf.models import preprocessing
from s2s_tf.models.preprocessing import Denormalize
from s2s_tf.models.preprocessing import Normalize
from s2s_tf.models.preprocessing import Preprocess


def _images(shape=(2, 5, 7, 3), seed=0):
    return np.random.default_rng(seed).uniform(0.0, 1.0, size=shape).astype(np.float32)


class PreprocessTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.named_parameters(
        ("resnet50", "caffe", keras.applications.resnet50.preprocess_input),
        ("vgg16", "caffe", keras.applications.vgg16.preprocess_input),
        ("inception_v3", "tf", keras.applications.inception_v3.preprocess_input),
        ("mobilenet_v2", "tf", keras.applications.mobilenet_v2.preprocess_input),
        ("efficientnet", "raw255", keras.applications.efficientnet.preprocess_input),
    )
    def test_matches_keras_applications(self, mode, keras_preprocess):
        x = _images()
        expected = keras_preprocess(x * 255.0)
        self.assertAllClose(Preprocess(mode)(x), expected, atol=1e-4, rtol=1e-5)

    def test_torch_matches_imagenet_utils(self):
        x = _images()
        expected = keras.applications.imagenet_utils.preprocess_input(x * 255.0, mode="torch")
        self.assertAllClose(Preprocess("torch")(x), expected, atol=1e-5, rtol=1e-5)

    def test_identity(self):
        x = _images()
        self.assertAllEqual(Preprocess("identity")(x), x)

    def test_caffe_channel_order(self):
        # A pure-red image must end up in the last (R) channel after the BGR swap.
        x = np.zeros((1, 1, 1, 3), np.float32)
        x[..., 0] = 1.0
        out = keras.ops.convert_to_numpy(Preprocess("caffe")(x))[0, 0, 0]
        self.assertAllClose(out, [-103.939, -116.779, 255.0 - 123.68], atol=1e-4)

    def test_unknown_mode_lists_valid_modes(self):
        with self.assertRaisesRegex(ValueError, "caffe.*tf.*torch.*raw255.*identity"):
            Preprocess("bgr")

    def test_wrong_channel_count_raises(self):
        with self.assertRaisesRegex(ValueError, "3 channels"):
            Preprocess("caffe")(np.zeros((1, 4, 4, 1), np.float32))

    def test_works_inside_tf_function(self):
        layer = Preprocess("caffe")
        fn = tf.function(layer, input_signature=[tf.TensorSpec([None, None, None, 3])])
        x = _images()
        self.assertAllClose(fn(x), layer(x))


class NormalizeTest(tf.test.TestCase, parameterized.TestCase):
    def test_constants(self):
        self.assertEqual(preprocessing.IMAGENET_MEAN, (0.485, 0.456, 0.406))
        self.assertEqual(preprocessing.IMAGENET_STD, (0.229, 0.224, 0.225))

    def test_normalize_values(self):
        x = _images()
        mean = np.array(preprocessing.IMAGENET_MEAN, np.float32)
        std = np.array(preprocessing.IMAGENET_STD, np.float32)
        self.assertAllClose(Normalize()(x), (x - mean) / std)

    def test_normalize_equals_torch_mode(self):
        x = _images()
        self.assertAllClose(Normalize()(x), Preprocess("torch")(x))

    @parameterized.named_parameters(
        ("imagenet", preprocessing.IMAGENET_MEAN, preprocessing.IMAGENET_STD),
        ("custom", (0.5, 0.1, 0.9), (0.3, 2.0, 0.05)),
    )
    def test_round_trip_is_identity(self, mean, std):
        x = _images()
        self.assertAllClose(Denormalize(mean, std)(Normalize(mean, std)(x)), x, atol=1e-6)
        z = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
        self.assertAllClose(Normalize(mean, std)(Denormalize(mean, std)(z)), z, atol=1e-5)

    def test_bad_stats_raise(self):
        with self.assertRaisesRegex(ValueError, "same length"):
            Normalize(mean=(0.5, 0.5), std=(1.0, 1.0, 1.0))
        with self.assertRaisesRegex(ValueError, "positive"):
            Denormalize(mean=(0.5, 0.5, 0.5), std=(1.0, 0.0, 1.0))


class SerializationTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.named_parameters(
        ("caffe", lambda: Preprocess("caffe")),
        ("torch", lambda: Preprocess("torch")),
        ("normalize", lambda: Normalize((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))),
        ("denormalize", lambda: Denormalize()),
    )
    def test_config_round_trip(self, make_layer):
        layer = make_layer()
        clone = type(layer).from_config(layer.get_config())
        self.assertEqual(clone.get_config(), layer.get_config())
        x = _images()
        self.assertAllClose(clone(x), layer(x))
        generic = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
        self.assertIsInstance(generic, type(layer))

    def test_keras_file_round_trip_safe_mode(self):
        inputs = keras.Input((6, 6, 3))
        x = Normalize(name="normalize")(inputs)
        x = Denormalize(name="denormalize")(x)
        outputs = Preprocess("caffe", name="preprocess")(x)
        model = keras.Model(inputs, outputs)
        path = os.path.join(self.get_temp_dir(), "preprocessing.keras")
        model.save(path)
        loaded = keras.saving.load_model(path, safe_mode=True)
        self.assertIsInstance(loaded.get_layer("preprocess"), Preprocess)
        self.assertIsInstance(loaded.get_layer("normalize"), Normalize)
        self.assertEqual(loaded.get_layer("preprocess").mode, "caffe")
        x = _images((2, 6, 6, 3))
        self.assertAllClose(loaded(x), model(x))


if __name__ == "__main__":
    tf.test.main()
