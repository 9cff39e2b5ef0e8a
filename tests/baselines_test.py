"""Tests for the input-transformation baselines of claim 4 (JPEG, bit depth, median)."""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from s2s_tf.analysis import baselines
from s2s_tf.robustness import evaluation
from s2s_tf.robustness import runner

SHAPE = (16, 16, 3)
NUM_CLASSES = 3


def _templates():
    """Three smooth, distinct images (JPEG and 4-bit rounding keep them apart)."""
    rows, cols = np.meshgrid(np.linspace(0, 1, SHAPE[0]), np.linspace(0, 1, SHAPE[1]))
    base = [rows, cols, 1.0 - rows]
    return np.stack([np.stack([b, 0.5 * b + 0.25, 1 - b], -1) for b in base]).astype(np.float32)


def _template_classifier():
    """The nearest template: logits (2 <x, t> - ||t||^2) / 20 (softmax does not saturate)."""
    templates = _templates().reshape(NUM_CLASSES, -1)
    inputs = keras.Input(SHAPE)
    dense = keras.layers.Dense(NUM_CLASSES)
    model = keras.Model(inputs, dense(keras.layers.Flatten()(inputs)))
    dense.set_weights([0.1 * templates.T, -0.05 * np.sum(templates**2, axis=1)])
    return model


def _images(num=6, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(num) % NUM_CLASSES
    noise = rng.uniform(-0.03, 0.03, size=(num, *SHAPE))
    return np.clip(_templates()[labels] + noise, 0, 1).astype(np.float32), labels


class PurifierTest(tf.test.TestCase, parameterized.TestCase):
    def test_bit_depth_rounds_to_the_nearest_level(self):
        x = np.random.default_rng(0).uniform(size=(2, *SHAPE)).astype(np.float32)
        out = np.asarray(baselines.bit_depth_purifier(3)(x))
        levels = out * 7
        self.assertAllClose(levels, np.round(levels), atol=1e-5)
        self.assertLessEqual(np.abs(out - x).max(), 0.5 / 7 + 1e-6)
        self.assertGreater(np.abs(out - x).max(), 0.01)

    def test_jpeg_is_the_stock_encode_decode_per_image(self):
        x = np.random.default_rng(1).uniform(size=(2, *SHAPE)).astype(np.float32)
        out = np.asarray(baselines.jpeg_purifier(40)(x))
        self.assertEqual(out.shape, x.shape)
        for i in range(2):
            self.assertAllClose(out[i], tf.image.adjust_jpeg_quality(x[i], 40))
        self.assertGreater(np.abs(out - x).mean(), 0.02)
        self.assertAllInRange(out, 0.0, 1.0)

    def test_median_matches_numpy_with_reflect_padding(self):
        x = np.random.default_rng(2).uniform(size=(2, 7, 9, 3)).astype(np.float32)
        out = np.asarray(baselines.median_purifier(3)(x))
        padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
        expected = np.zeros_like(x)
        for r in range(7):
            for c in range(9):
                expected[:, r, c] = np.median(padded[:, r : r + 3, c : c + 3], axis=(1, 2))
        self.assertAllClose(out, expected)

    def test_median_has_a_gradient_and_the_others_none_useful(self):
        x = tf.constant(np.random.default_rng(3).uniform(size=(1, *SHAPE)).astype(np.float32))
        for name, useful in (("median", True), ("bit_depth", False), ("jpeg", False)):
            purifier = baselines.get(name).build()
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = tf.reduce_sum(purifier(x))
            try:
                grad = tape.gradient(y, x)
            except LookupError:  # no gradient registered (JPEG encoding)
                grad = None
            has_gradient = grad is not None and bool(np.any(np.asarray(grad)))
            self.assertEqual(has_gradient, useful, name)
            self.assertEqual(baselines.get(name).differentiable, useful, name)

    @parameterized.parameters(("jpeg", 0), ("bit_depth", 0), ("median", 2), ("median", 4))
    def test_bad_parameters(self, name, value):
        build = {
            "jpeg": baselines.jpeg_purifier,
            "bit_depth": baselines.bit_depth_purifier,
            "median": baselines.median_purifier,
        }[name]
        with self.assertRaises(ValueError):
            build(value)


class ThreatModelsTest(tf.test.TestCase):
    ALL = ("surrogate", "white_box", "bpda", "gray_box", "gradient_free", "transfer")

    def test_non_differentiable_baselines_get_bpda_for_white_box(self):
        jpeg, median = baselines.get("jpeg"), baselines.get("median")
        self.assertEqual(
            baselines.threat_models_for(jpeg, self.ALL), ("bpda", "gray_box", "gradient_free")
        )
        self.assertEqual(
            baselines.threat_models_for(median, self.ALL),
            ("white_box", "bpda", "gray_box", "gradient_free"),
        )
        self.assertEqual(
            baselines.threat_models_for(jpeg, ("white_box", "gray_box")), ("bpda", "gray_box")
        )

    def test_unknown_and_gradient_free_only(self):
        with self.assertRaisesRegex(ValueError, "unknown baseline"):
            baselines.get("blur")
        config = evaluation.EvalConfig(threat_models=("gradient_free", "surrogate"))
        images, labels = _images()
        with self.assertRaisesRegex(ValueError, "gradients"):
            baselines.evaluate("jpeg", _template_classifier(), images, labels, config)


class EvaluateTest(tf.test.TestCase):
    def test_jpeg_in_front_of_the_classifier_with_the_s2s_suite(self):
        classifier = _template_classifier()
        images, labels = _images()
        config = evaluation.EvalConfig(
            attacks=("apgd_ce",),
            eps=(1 / 255, 0.3),
            threat_models=ThreatModelsTest.ALL,
            num_examples=6,
            batch_size=6,
            steps=3,
            gradient_free_queries=4,
        )
        messages = []
        result = baselines.evaluate("jpeg", classifier, images, labels, config, messages.append)
        self.assertEqual(result["threat_models"], ["bpda", "gray_box", "gradient_free"])
        results = result["results"]
        purified = np.asarray(baselines.jpeg_purifier()(images))
        expected_clean = runner.accuracy(classifier, purified, labels)
        self.assertEqual(expected_clean, 1.0)
        self.assertAlmostEqual(results["clean"]["defended"], expected_clean)
        threats = {key.split("/")[0] for key in results["per_example"]}
        self.assertNotIn("white_box", threats)
        self.assertFalse(any(t.startswith("surrogate") for t in threats))
        self.assertIn("bpda", threats)
        self.assertEqual(results["transfer"], {})
        # BPDA beats JPEG at a large budget; a tiny one leaves these templates alone.
        self.assertLess(results["headline"][evaluation.eps_key(0.3)]["robust_accuracy"], 0.5)
        self.assertEqual(results["headline"]["1/255"]["robust_accuracy"], 1.0)
        self.assertTrue(all(m.startswith("baseline jpeg: ") for m in messages))


if __name__ == "__main__":
    tf.test.main()
