"""Tests of the serving signatures' input checks, decoding and outputs, in memory."""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from s2s_tf import data as data_lib
from s2s_tf.export import serving_files
from s2s_tf.export import signatures
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import classifiers
from s2s_tf.models import s2s_model

SIZE = (16, 16)


def _options(**kwargs):
    return signatures.SignatureOptions(image_size=SIZE, **kwargs)


def _checker(**kwargs):
    options = _options(**kwargs)
    return tf.function(
        lambda images: signatures.check_images(images, options),
        input_signature=[tf.TensorSpec(None, tf.float32)],
    )


def _decoder(**kwargs):
    options = _options(**kwargs)
    return tf.function(
        lambda image_bytes: signatures.decode_images(image_bytes, options),
        input_signature=[tf.TensorSpec(None, tf.string)],
    )


def _png(shape):
    return tf.io.encode_png(tf.zeros(shape, tf.uint8)).numpy()


class CheckImagesTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.named_parameters(
        ("rank3", (16, 16, 3), "rank-4 tensor .* got rank\\] \\[3\\]"),
        ("rank5", (1, 2, 16, 16, 3), "got rank\\] \\[5\\]"),
        ("gray", (2, 16, 16, 1), "3 \\(RGB\\) channels; got shape\\] \\[2 16 16 1\\]"),
        ("rgba", (2, 16, 16, 4), "3 \\(RGB\\) channels"),
        ("size", (2, 20, 16, 3), "16x16 pixels .* \\[2 20 16 3\\]"),
    )
    def test_bad_shape_names_the_problem(self, shape, message):
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, message):
            _checker()(np.zeros(shape, np.float32))

    @parameterized.parameters("clip", "error")
    def test_nan_and_inf_are_errors_in_both_modes(self, mode):
        check = _checker(out_of_range=mode)
        for bad in (np.nan, np.inf, -np.inf):
            images = np.full((2, 16, 16, 3), 0.5, np.float32)
            images[1, 3, 4, 0] = bad
            with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "NaN or Inf"):
                check(images)

    def test_out_of_range_clip_and_error(self):
        images = np.linspace(-1.0, 2.0, 2 * 16 * 16 * 3, dtype=np.float32).reshape(2, 16, 16, 3)
        self.assertAllClose(_checker(out_of_range="clip")(images), np.clip(images, 0.0, 1.0))
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "must be in \\[0, 1\\]"):
            _checker(out_of_range="error")(images)
        inside = np.clip(images, 0.0, 1.0)
        self.assertAllEqual(_checker(out_of_range="error")(inside), inside)

    def test_empty_batch_passes(self):
        self.assertEqual(_checker()(np.zeros((0, 16, 16, 3), np.float32)).shape, (0, 16, 16, 3))

    def test_invalid_options(self):
        for kwargs in ({"top_k": 0}, {"out_of_range": "wrap"}, {"max_image_bytes": 0}):
            with self.assertRaises(ValueError):
                _options(**kwargs).validate()


class DecodeImagesTest(tf.test.TestCase, parameterized.TestCase):
    def test_matches_the_training_evaluation_view(self):
        images = tf.image.convert_image_dtype(
            serving_files.example_images(3, (24, 40), seed=1), tf.uint8
        )
        encoded = [tf.io.encode_png(image).numpy() for image in images]
        decoded = _decoder()(np.array(encoded, object))
        for image, got in zip(images, decoded, strict=True):
            self.assertAllClose(got, data_lib.preprocess_eval(image, SIZE), atol=1e-6)

    def test_jpeg_gray_and_rgba(self):
        gray = tf.io.encode_jpeg(tf.fill([20, 10, 1], tf.constant(128, tf.uint8))).numpy()
        rgba = tf.io.encode_png(tf.fill([10, 10, 4], tf.constant(255, tf.uint8))).numpy()
        decoded = _decoder()(np.array([gray, rgba], object)).numpy()
        self.assertEqual(decoded.shape, (2, 16, 16, 3))
        self.assertAllClose(decoded[0], np.full((16, 16, 3), 128 / 255), atol=2 / 255)
        self.assertAllClose(decoded[1], np.ones((16, 16, 3)))

    @parameterized.named_parameters(
        ("empty", b"", "image_bytes\\[1\\] is empty"),
        ("not_an_image", b"GIF89a not really", "image_bytes\\[1\\] is not a JPEG or PNG"),
        ("two_channels", _png([8, 8, 2]), "image_bytes\\[1\\] has 2 channels"),
        ("too_high", _png([300, 8, 3]), "image_bytes\\[1\\] is 300x8 pixels"),
        ("truncated_png", _png([8, 8, 3])[:40], "PNG"),
    )
    def test_bad_bytes_name_the_problem(self, bad, message):
        good = _png([8, 8, 3])
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, message):
            _decoder(max_image_size=256)(np.array([good, bad], object))

    def test_too_many_bytes(self):
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "bytes; the limit is 50"):
            _decoder(max_image_bytes=50)(np.array([_png([64, 64, 3])], object))

    def test_rank_and_empty_batch(self):
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "rank-1 string tensor"):
            _decoder()(tf.constant(_png([8, 8, 3])))
        self.assertEqual(_decoder()(np.array([], object)).shape, (0, 16, 16, 3))


class EndpointsTest(tf.test.TestCase):
    def test_outputs_empty_batch_and_purify(self):
        autoencoder = ae_lib.build_autoencoder(
            ae_lib.AutoencoderConfig(stage_widths=((4,), (8,))), input_shape=(*SIZE, 3)
        )
        classifier = classifiers.build_classifier_with_preprocessing("testing", SIZE, 10)
        defended = s2s_model.build_s2s_model(autoencoder, classifier)
        purifier = s2s_model.build_purifier(autoencoder, (*SIZE, 3))
        endpoints = signatures.serving_endpoints(defended, purifier, classifier, _options(top_k=20))
        self.assertEqual(tuple(endpoints), signatures.SIGNATURE_NAMES)
        serve = tf.function(endpoints[signatures.DEFAULT_SIGNATURE][0])
        images = serving_files.example_images(3, SIZE)
        out = serve(tf.constant(images))
        self.assertCountEqual(out, signatures.CLASSIFICATION_OUTPUTS)
        logits = defended(images, training=False)
        self.assertAllClose(out["logits"], logits, atol=1e-5)
        self.assertAllClose(out["probabilities"], tf.nn.softmax(logits), atol=1e-5)
        self.assertAllEqual(out["classes"], np.argmax(logits, -1))
        self.assertEqual(out["top_k_scores"].shape, (3, 10))  # k capped at the 10 classes
        self.assertAllEqual(out["top_k_classes"][:, 0], out["classes"])
        empty = serve(tf.zeros([0, *SIZE, 3]))
        self.assertEqual({k: tuple(v.shape) for k, v in empty.items()}["top_k_classes"], (0, 10))
        purify = tf.function(endpoints[signatures.PURIFY_SIGNATURE][0])
        purified = purify(tf.constant(images))[signatures.PURIFIED_OUTPUT]
        self.assertAllClose(purified, purifier(images), atol=1e-6)
        self.assertBetween(float(tf.reduce_min(purified)), 0.0, 1.0)
        self.assertEqual(purify(tf.zeros([0, *SIZE, 3]))["purified_images"].shape[0], 0)


if __name__ == "__main__":
    tf.test.main()
