"""Tests for s2s_tf.models.classifiers."""

import os
from unittest import mock

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from keras.src.utils import file_utils

from s2s_tf.models.classifiers import CLASSIFIERS
from s2s_tf.models.classifiers import AdaptiveAveragePooling2D
from s2s_tf.models.classifiers import build_classifier
from s2s_tf.models.classifiers import build_classifier_with_preprocessing
from s2s_tf.models.classifiers import get_spec
from s2s_tf.models.preprocessing import PREPROCESS_MODES
from s2s_tf.models.preprocessing import Preprocess


class _DownloadAttemptedError(Exception):
    """Raised by the patched downloader: the real ImageNet path was reached."""


def _images(size, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 1.0, size=(batch, size, size, 3)).astype(np.float32)


def _torch_adaptive_avg_pool(x, out_h, out_w):
    """Numpy reference of PyTorch's AdaptiveAvgPool2d on NHWC arrays."""
    n, h, w, c = x.shape
    out = np.zeros((n, out_h, out_w, c), np.float64)
    for i in range(out_h):
        h0, h1 = int(np.floor(i * h / out_h)), int(np.ceil((i + 1) * h / out_h))
        for j in range(out_w):
            w0, w1 = int(np.floor(j * w / out_w)), int(np.ceil((j + 1) * w / out_w))
            out[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
    return out


class RegistryTest(tf.test.TestCase, parameterized.TestCase):
    def test_specs_are_consistent(self):
        self.assertIn("testing", CLASSIFIERS)
        for name, spec in CLASSIFIERS.items():
            self.assertEqual(spec.name, name)
            self.assertIn(spec.preprocessing, PREPROCESS_MODES)
            self.assertLessEqual(spec.min_size, min(spec.input_size))
            self.assertTrue(spec.description)
            self.assertIs(get_spec(name), spec)

    @parameterized.named_parameters((name, name) for name in sorted(CLASSIFIERS))
    def test_every_entry_builds_at_min_size_and_returns_logits(self, name):
        spec = get_spec(name)
        model = build_classifier(name, (spec.min_size, spec.min_size), num_classes=10)
        self.assertEqual(model.name, name)
        self.assertIs(model.layers[-1].activation, keras.activations.linear)
        logits = keras.ops.convert_to_numpy(model(_images(spec.min_size), training=False))
        self.assertEqual(logits.shape, (2, 10))
        self.assertTrue(np.all(np.isfinite(logits)))
        self.assertFalse(np.allclose(logits.sum(axis=-1), 1.0))

    @parameterized.parameters("small_cnn", "lenet5")
    def test_small_cnns_take_28_px(self, name):
        model = build_classifier(name, (28, 28), num_classes=10)
        self.assertEqual(model(_images(28)).shape, (2, 10))

    def test_unknown_name_lists_registry(self):
        with self.assertRaisesRegex(ValueError, "resnet50.*testing"):
            build_classifier("resnet51")
        with self.assertRaisesRegex(ValueError, "registered"):
            get_spec("nope")

    def test_input_below_min_size_raises(self):
        with self.assertRaisesRegex(ValueError, "inception_v3.*at least 75x75"):
            build_classifier("inception_v3", (74, 74), num_classes=10)
        with self.assertRaisesRegex(ValueError, "alexnet.*at least 63x63"):
            build_classifier("alexnet", (224, 62), num_classes=10)

    def test_input_shape_forms(self):
        model = build_classifier("testing", (12, 16, 1), num_classes=3)
        self.assertEqual(model.input_shape, (None, 12, 16, 1))
        self.assertEqual(build_classifier("testing").input_shape, (None, 32, 32, 3))
        with self.assertRaisesRegex(ValueError, "input_shape"):
            build_classifier("testing", (32,))


class WithPreprocessingTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.named_parameters(
        ("testing", "testing", 16), ("small_cnn", "small_cnn", 16), ("resnet50", "resnet50", 32)
    )
    def test_equals_manual_preprocessing(self, name, size):
        model = build_classifier_with_preprocessing(name, (size, size), num_classes=10)
        classifier = model.get_layer("classifier")
        self.assertIsInstance(model.get_layer("preprocess"), Preprocess)
        x = _images(size)
        manual = classifier(Preprocess(get_spec(name).preprocessing)(x), training=False)
        self.assertAllClose(model(x, training=False), manual, atol=1e-5, rtol=1e-5)

    def test_keras_round_trip_safe_mode(self):
        model = build_classifier_with_preprocessing("testing", (16, 16), num_classes=4)
        path = os.path.join(self.get_temp_dir(), "with_pre.keras")
        model.save(path)
        loaded = keras.saving.load_model(path, safe_mode=True)
        x = _images(16)
        self.assertAllClose(loaded(x), model(x))


class WeightsTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.parameters("testing", "small_cnn")
    def test_weights_file_round_trip(self, name):
        model = build_classifier(name, (16, 16), num_classes=5)
        path = os.path.join(self.get_temp_dir(), f"{name}.weights.h5")
        model.save_weights(path)
        restored = build_classifier(name, (16, 16), num_classes=5, weights=path)
        x = _images(16)
        self.assertAllClose(restored(x, training=False), model(x, training=False))
        wrapped = build_classifier_with_preprocessing(name, (16, 16), num_classes=5, weights=path)
        mode = get_spec(name).preprocessing
        self.assertAllClose(wrapped(x), model(Preprocess(mode)(x), training=False), atol=1e-5)

    def test_keras_file_round_trip_and_checks(self):
        model = build_classifier("testing", (16, 16), num_classes=5)
        path = os.path.join(self.get_temp_dir(), "testing.keras")
        model.save(path)
        restored = build_classifier("testing", (16, 16), num_classes=5, weights=path)
        x = _images(16)
        self.assertAllClose(restored(x), model(x))
        wrapped = build_classifier_with_preprocessing("testing", (16, 16), 5, weights=path)
        self.assertEqual(wrapped.get_layer("classifier").name, "classifier")
        with self.assertRaisesRegex(ValueError, "5 classes"):
            build_classifier("testing", (16, 16), num_classes=7, weights=path)

    def test_keras_file_with_preprocessing_is_rejected(self):
        path = os.path.join(self.get_temp_dir(), "wrapped.keras")
        build_classifier_with_preprocessing("testing", (16, 16), num_classes=5).save(path)
        with self.assertRaisesRegex(ValueError, "Preprocess"):
            build_classifier("testing", (16, 16), num_classes=5, weights=path)

    def test_missing_file_names_path(self):
        path = os.path.join(self.get_temp_dir(), "absent.weights.h5")
        with self.assertRaisesRegex(FileNotFoundError, "absent.weights.h5"):
            build_classifier("testing", weights=path)

    def test_unsupported_suffix(self):
        path = os.path.join(self.get_temp_dir(), "weights.txt")
        with open(path, "w") as f:
            f.write("not weights")
        with self.assertRaisesRegex(ValueError, "weights.h5"):
            build_classifier("testing", weights=path)


class ImagenetWeightsTest(tf.test.TestCase, parameterized.TestCase):
    """Checks run before any download; the downloader is patched to detect one."""

    def _patch_download(self):
        patcher = mock.patch.object(
            file_utils, "get_file", side_effect=_DownloadAttemptedError("download")
        )
        self.addCleanup(patcher.stop)
        return patcher.start()

    def test_alexnet_has_no_imagenet_weights(self):
        spec = get_spec("alexnet")
        self.assertFalse(spec.imagenet_weights)
        self.assertEqual(spec.preprocessing, "torch")
        get_file = self._patch_download()
        with self.assertRaisesRegex(ValueError, "No Keras ImageNet weights.*alexnet.*weights.h5"):
            build_classifier("alexnet", weights="imagenet")
        get_file.assert_not_called()

    @parameterized.named_parameters(
        ("num_classes", "resnet50", None, 10, "num_classes=1000"),
        ("shape", "resnet50", (64, 64), 1000, "input_shape"),
        ("mobilenet_odd_size", "mobilenet_v2", (100, 100), 1000, "input_shape"),
        ("channels", "vgg16", (224, 224, 1), 1000, "input_shape"),
        ("small_cnn", "small_cnn", None, 1000, "No Keras ImageNet weights"),
    )
    def test_rejected_before_download(self, name, shape, num_classes, regex):
        get_file = self._patch_download()
        with self.assertRaisesRegex(ValueError, regex):
            build_classifier(name, shape, num_classes=num_classes, weights="imagenet")
        get_file.assert_not_called()

    @parameterized.named_parameters(
        ("mobilenet_128", "mobilenet_v2", (128, 128)), ("resnet50_default", "resnet50", None)
    )
    def test_valid_request_reaches_keras_download(self, name, shape):
        self._patch_download()
        with self.assertRaises(_DownloadAttemptedError):
            build_classifier(name, shape, weights="imagenet")


class AlexNetTest(tf.test.TestCase, parameterized.TestCase):
    def test_torchvision_parameter_count_and_shapes(self):
        model = build_classifier("alexnet", num_classes=1000)
        self.assertEqual(model.count_params(), 61_100_840)
        self.assertEqual(model.get_layer("features_12").output.shape, (None, 6, 6, 256))
        self.assertEqual(model.get_layer("flatten").output.shape, (None, 9216))
        self.assertIs(model.layers[-1].activation, keras.activations.linear)

    @parameterized.parameters(
        ((13, 13), (6, 6)),
        ((5, 5), (6, 6)),
        ((8, 8), (6, 6)),
        ((6, 6), (6, 6)),
        ((7, 11), (6, 6)),
        ((1, 9), (3, 2)),
    )
    def test_adaptive_pool_matches_pytorch_formula(self, in_hw, out_hw):
        x = np.random.default_rng(0).normal(size=(2, *in_hw, 3)).astype(np.float32)
        out = AdaptiveAveragePooling2D(out_hw)(x)
        self.assertAllClose(out, _torch_adaptive_avg_pool(x, *out_hw), atol=1e-5)

    def test_adaptive_pool_serialization(self):
        layer = AdaptiveAveragePooling2D(6)
        clone = AdaptiveAveragePooling2D.from_config(layer.get_config())
        self.assertEqual(clone.output_size, (6, 6))
        inputs = keras.Input((9, 9, 2))
        model = keras.Model(inputs, AdaptiveAveragePooling2D((6, 6), name="pool")(inputs))
        path = os.path.join(self.get_temp_dir(), "pool.keras")
        model.save(path)
        loaded = keras.saving.load_model(path, safe_mode=True)
        x = np.random.default_rng(1).normal(size=(2, 9, 9, 2)).astype(np.float32)
        self.assertAllClose(loaded(x), model(x))


if __name__ == "__main__":
    tf.test.main()
