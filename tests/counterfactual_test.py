"""Tests for the counterfactual test of claim 2 (class-agnostic, structure-following gradients)."""

import json

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from s2s_tf.analysis import counterfactual as cf
from s2s_tf.analysis import gradient_analysis as ga
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import classifiers
from s2s_tf.models import s2s_model
from s2s_tf.robustness import stats

SHAPE = (16, 16, 3)
NUM_CLASSES = 6


def _tiny_models():
    """Classifier alone, stage-1-like AE + classifier and stage-2-like S2SNet (random weights)."""
    keras.utils.set_random_seed(0)
    classifier = classifiers.build_classifier_with_preprocessing("testing", SHAPE, NUM_CLASSES)
    config = ae_lib.AutoencoderConfig(stage_widths=((4,), (8,)), num_stages=2)
    reconstruction = s2s_model.build_s2s_model(
        ae_lib.build_autoencoder(config, SHAPE), classifier, name="reconstruction"
    )
    s2s = s2s_model.build_s2s_model(ae_lib.build_autoencoder(config, SHAPE), classifier)
    return {"classifier": classifier, "reconstruction": reconstruction, "s2s": s2s}


def _images(num, seed=1):
    return np.random.default_rng(seed).uniform(size=(num, *SHAPE)).astype(np.float32)


def _width(result):
    low, high = result["interval"]
    return high - low


class BootstrapTest(tf.test.TestCase):
    def test_interval_contains_the_estimate_and_narrows_with_more_images(self):
        rng = np.random.default_rng(0)
        small = stats.bootstrap(stats.mean_statistic, rng.normal(1.0, 1.0, 20))
        large = stats.bootstrap(stats.mean_statistic, rng.normal(1.0, 1.0, 2000))
        for result in (small, large):
            low, high = result["interval"]
            self.assertLess(low, result["estimate"])
            self.assertLess(result["estimate"], high)
        # The width shrinks like 1 / sqrt(n): 10x here, demand at least 4x.
        self.assertLess(_width(large), _width(small) / 4)
        self.assertLess(large["interval"][0], 1.0)
        self.assertGreater(large["interval"][1], 1.0)

    def test_seeded_and_paired(self):
        rng = np.random.default_rng(3)
        a, b = rng.normal(size=50), rng.normal(size=50)
        first = stats.bootstrap(stats.ratio_of_means, np.abs(a), np.abs(b), seed=7)
        self.assertEqual(first, stats.bootstrap(stats.ratio_of_means, np.abs(a), np.abs(b), seed=7))
        self.assertAllClose(first["estimate"], np.abs(a).sum() / np.abs(b).sum())
        # Paired resampling: a statistic of (a, a) sees identical resamples, so a - a is 0.
        same = stats.bootstrap(lambda x, y: np.mean(x - y, axis=-1), a, a)
        self.assertEqual(same["interval"], [0.0, 0.0])

    def test_rejects_bad_samples(self):
        with self.assertRaises(ValueError):
            stats.bootstrap(stats.mean_statistic, [])
        with self.assertRaises(ValueError):
            stats.bootstrap(stats.ratio_of_means, [1.0, 2.0], [1.0])


class VerdictTest(tf.test.TestCase, parameterized.TestCase):
    def _per_image(self, shift_classifier, shift_reconstruction, n=64):
        rng = np.random.default_rng(0)
        base = rng.normal(0.3, 0.1, n)
        # Alternating +-0.05 noise has mean exactly 0, so a zero shift is a zero difference.
        noise = 0.05 * np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
        return {
            "classifier": base,
            "reconstruction": base + shift_classifier - shift_reconstruction,
            "s2s": base + shift_classifier + noise,
        }

    @parameterized.named_parameters(
        ("clearly_higher", 0.5, 0.5, +1, cf.SUPPORTED),
        ("clearly_lower", -0.5, -0.5, +1, cf.CONTRADICTED),
        ("no_difference", 0.0, 0.0, +1, cf.NOT_SUPPORTED),
        ("only_vs_classifier", 0.5, 0.0, +1, cf.NOT_SUPPORTED),
        ("lower_vs_reconstruction", 0.5, -0.5, +1, cf.CONTRADICTED),
        ("claimed_lower", -0.5, -0.5, -1, cf.SUPPORTED),
    )
    def test_verdict_from_intervals(self, vs_classifier, vs_reconstruction, direction, status):
        per_image = self._per_image(vs_classifier, vs_reconstruction)
        claim = cf.evaluate_claim(per_image, "s2s", "the statistic is higher", direction)
        self.assertEqual(claim["status"], status)
        self.assertIn(status, claim["verdict"])
        self.assertEqual(set(claim["differences"]), {"s2s - classifier", "s2s - reconstruction"})
        diff = claim["differences"]["s2s - classifier"]
        self.assertAllClose(diff["estimate"], vs_classifier, atol=1e-9)
        low, high = diff["interval"]
        self.assertLessEqual(low, diff["estimate"])
        self.assertLessEqual(diff["estimate"], high)

    def test_claim_verdict_on_raw_intervals(self):
        self.assertEqual(cf.claim_verdict({"a": (0.1, 0.2), "b": (0.01, 0.3)}, 1), cf.SUPPORTED)
        self.assertEqual(cf.claim_verdict({"a": (0.1, 0.2), "b": (-0.3, -0.1)}, 1), cf.CONTRADICTED)
        self.assertEqual(cf.claim_verdict({"a": (-0.1, 0.2)}, 1), cf.NOT_SUPPORTED)
        self.assertEqual(cf.claim_verdict({"a": (-0.2, -0.1)}, -1), cf.SUPPORTED)
        with self.assertRaises(ValueError):
            cf.claim_verdict({}, 1)
        with self.assertRaises(ValueError):
            cf.claim_verdict({"a": (0.0, 1.0)}, 0)


class CounterfactualAnalysisTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.models = _tiny_models()
        cls.images = _images(12)
        cls.result = cf.counterfactual_analysis(
            cls.models, cls.images, top_k=3, batch_size=5, num_resamples=200
        )

    def test_centred_gradients_match_a_manual_tape(self):
        model = self.models["s2s"]
        classes = np.array([[2, 0], [5, 1]])
        grads = cf.centred_class_gradients(model, self.images[:2], classes, batch_size=1)
        self.assertEqual(grads.shape, (2, 2, *SHAPE))
        x = tf.constant(self.images[1:2])
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits = model(x)
            centred = logits[0, 5] - tf.reduce_mean(logits[0])
        self.assertAllClose(grads[1, 0], tape.gradient(centred, x)[0], atol=1e-6)
        self.assertGreater(np.abs(grads).max(), 0.0)

    def test_every_model_uses_the_reference_classes(self):
        result = self.result
        reference = ga.top_k_classes(self.models["classifier"], self.images, 3)
        self.assertAllEqual(result["classes"], reference)
        own = ga.top_k_classes(self.models["s2s"], self.images, 3)
        # Meaningful only if the S2SNet's own top-k differ from the shared classes somewhere.
        self.assertTrue(np.any(own != reference), "pick images where the models' top-k differ")
        for name in ("s2s", "reconstruction"):
            grads = cf.centred_class_gradients(self.models[name], self.images, reference)
            expected = ga.class_specificity(grads)["per_image"]
            self.assertAllClose(result["per_image"]["class_specificity"][name], expected)
            own_grads = cf.centred_class_gradients(self.models[name], self.images, own)
            own_value = ga.class_specificity(own_grads)["per_image"]
            self.assertNotAllClose(result["per_image"]["class_specificity"][name], own_value)

    def test_structure_alignment_averages_the_shared_classes(self):
        grads = cf.centred_class_gradients(self.models["s2s"], self.images, self.result["classes"])
        expected = np.mean(
            [ga.structure_alignment(grads[:, k], self.images)["per_image"] for k in range(3)],
            axis=0,
        )
        self.assertAllClose(self.result["per_image"]["structure_alignment"]["s2s"], expected)

    def test_report_is_json_with_consistent_intervals(self):
        result = json.loads(json.dumps(self.result))
        self.assertEqual(result["num_images"], 12)
        for key in cf.CLAIMS:
            claim = result["claims"][key]
            self.assertIn(claim["status"], (cf.SUPPORTED, cf.CONTRADICTED, cf.NOT_SUPPORTED))
            for name, summary in claim["models"].items():
                values = result["per_image"][key][name]
                self.assertAllClose(summary["estimate"], np.mean(values))
                low, high = summary["interval"]
                self.assertLessEqual(low, summary["estimate"])
                self.assertLessEqual(summary["estimate"], high)
            diff = claim["differences"]["s2s - reconstruction"]
            expected = np.mean(result["per_image"][key]["s2s"]) - np.mean(
                result["per_image"][key]["reconstruction"]
            )
            self.assertAllClose(diff["estimate"], expected)

    def test_difference_interval_narrows_with_more_images(self):
        widths = []
        for num in (8, 64):
            result = cf.counterfactual_analysis(
                self.models, _images(num, seed=num), top_k=2, batch_size=32, num_resamples=300
            )
            diff = result["claims"]["class_specificity"]["differences"]["s2s - classifier"]
            widths.append(_width(diff))
        self.assertLess(widths[1], widths[0])

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "top_k"):
            cf.counterfactual_analysis(self.models, self.images[:2], top_k=NUM_CLASSES)
        with self.assertRaisesRegex(ValueError, "subject"):
            cf.counterfactual_analysis(self.models, self.images[:2], subject="missing")
        with self.assertRaisesRegex(ValueError, "number of classes"):
            other = classifiers.build_classifier_with_preprocessing("testing", SHAPE, 4)
            cf.counterfactual_analysis({**self.models, "other": other}, self.images[:2])


if __name__ == "__main__":
    tf.test.main()
