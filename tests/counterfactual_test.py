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


def _family(eps, num_classes=10, dim=64, seed=0):
    """Class gradients g_c = s + eps * r_c: a shared part and a class-dependent part."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=dim)
    return shared[None] + eps * rng.normal(size=(num_classes, dim))


class LinearModel:
    """Logits W x + b, so the input gradient of logit c is exactly row c of W."""

    def __init__(self, weights, seed=0):
        self.weights = tf.constant(np.asarray(weights, np.float32).reshape(len(weights), -1))
        bias = np.random.default_rng(seed).normal(size=len(weights))
        self.bias = tf.constant(bias, tf.float32)

    def __call__(self, x):
        flat = tf.reshape(x, (tf.shape(x)[0], -1))
        return flat @ tf.transpose(self.weights) + self.bias


def _linear_family_models(s2s_eps, classifier_eps=1.0, reconstruction_eps=0.7):
    """Linear models of the g_c = s + eps * r_c family, sharing s and r (only eps differs)."""
    dim = int(np.prod(SHAPE))
    return {
        name: LinearModel(_family(eps, NUM_CLASSES, dim).reshape(NUM_CLASSES, *SHAPE))
        for name, eps in (
            ("classifier", classifier_eps),
            ("reconstruction", reconstruction_eps),
            ("s2s", s2s_eps),
        )
    }


class ClassDependentShareTest(tf.test.TestCase):
    def test_monotone_in_the_class_dependent_part_where_the_centred_cosine_is_not(self):
        grid = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
        top = [0, 1, 2]
        share, centred_cosine = [], []
        for eps in grid:
            grads = _family(eps)
            share.append(float(cf.class_dependent_share(grads[None, top])[0]))
            # Centred over all C classes, as the gradients of z_c - mean_j z_j are.
            centred = grads - grads.mean(axis=0, keepdims=True)
            centred_cosine.append(ga.class_specificity(centred[None, top])["mean"])
        self.assertTrue(np.all(np.diff(share) > 0), share)
        self.assertLess(share[0], 0.01)
        self.assertGreater(share[-1], 0.5)
        # The centred cosine does not move with eps at all: it cannot see class signal.
        self.assertLess(np.ptp(centred_cosine), 1e-9, centred_cosine)

    def test_known_values(self):
        e1, e2 = np.eye(2)
        grads = np.stack([[e1, e1], [e1, e2], [e1, -e1]])  # [3 images, 2 classes, 2]
        self.assertAllClose(cf.class_dependent_share(grads), [0.0, 0.5, 1.0])

    def test_rejects_one_class_and_vanishing_gradients(self):
        with self.assertRaisesRegex(ValueError, "K>=2"):
            cf.class_dependent_share(np.ones((2, 1, 4)))
        grads = np.ones((3, 2, 4))
        grads[1] = 0.0
        with self.assertRaisesRegex(ValueError, r"images \[1\]"):
            cf.class_dependent_share(grads)


class LinearFamilyVerdictTest(tf.test.TestCase, parameterized.TestCase):
    """End to end on models whose class-dependent gradient part is known: the claim can fail."""

    @parameterized.named_parameters(
        ("less_class_specific", 0.05, cf.SUPPORTED, ["s2s", "reconstruction", "classifier"]),
        ("more_class_specific", 3.0, cf.CONTRADICTED, ["reconstruction", "classifier", "s2s"]),
    )
    def test_verdict_follows_the_class_dependent_part(self, s2s_eps, status, ascending):
        result = cf.counterfactual_analysis(
            _linear_family_models(s2s_eps), _images(16), top_k=3, num_resamples=200
        )
        claim = result["claims"]["class_dependent_share"]
        self.assertEqual(claim["status"], status, claim["verdict"])
        shares = {m: np.mean(v) for m, v in result["per_image"]["class_dependent_share"].items()}
        self.assertEqual(sorted(shares, key=shares.get), ascending)


class CounterfactualAnalysisTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.models = _tiny_models()
        cls.images = _images(12)
        cls.result = cf.counterfactual_analysis(
            cls.models, cls.images, top_k=3, batch_size=5, num_resamples=200
        )

    def test_raw_and_centred_gradients_match_a_manual_tape(self):
        model = self.models["s2s"]
        classes = np.array([[2, 0], [5, 1]])
        raw, centred = cf.class_gradients(model, self.images[:2], classes, batch_size=1)
        self.assertEqual(raw.shape, (2, 2, *SHAPE))
        x = tf.constant(self.images[1:2])
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            logits = model(x)
            logit = logits[0, 5]
            centred_logit = logit - tf.reduce_mean(logits[0])
        self.assertAllClose(raw[1, 0], tape.gradient(logit, x)[0], atol=1e-6)
        self.assertAllClose(centred[1, 0], tape.gradient(centred_logit, x)[0], atol=1e-6)
        self.assertNotAllClose(raw[1, 0], centred[1, 0])

    def test_every_model_uses_the_reference_classes(self):
        result = self.result
        reference = ga.top_k_classes(self.models["classifier"], self.images, 3)
        self.assertAllEqual(result["classes"], reference)
        own = ga.top_k_classes(self.models["s2s"], self.images, 3)
        # Meaningful only if the S2SNet's own top-k differ from the shared classes somewhere.
        self.assertTrue(np.any(own != reference), "pick images where the models' top-k differ")
        for name in ("s2s", "reconstruction"):
            raw, _ = cf.class_gradients(self.models[name], self.images, reference)
            expected = cf.class_dependent_share(raw)
            stored = result["per_image"]["class_dependent_share"][name]
            self.assertAllClose(stored, expected)
            own_raw, _ = cf.class_gradients(self.models[name], self.images, own)
            self.assertNotAllClose(stored, cf.class_dependent_share(own_raw))

    def test_structure_alignment_averages_the_shared_classes(self):
        _, centred = cf.class_gradients(self.models["s2s"], self.images, self.result["classes"])
        expected = np.mean(
            [ga.structure_alignment(centred[:, k], self.images)["per_image"] for k in range(3)],
            axis=0,
        )
        self.assertAllClose(self.result["per_image"]["structure_alignment"]["s2s"], expected)

    def test_every_verdict_is_reproduced_from_the_json(self):
        result = json.loads(json.dumps(self.result))
        settings = result["bootstrap"]
        for key, (_, direction) in cf.CLAIMS.items():
            claim = result["claims"][key]
            per_image = result["per_image"][key]
            self.assertEqual(claim["direction"], "higher" if direction > 0 else "lower")
            intervals = {}
            for name in ("classifier", "reconstruction"):
                diff = np.asarray(per_image["s2s"]) - np.asarray(per_image[name])
                again = stats.bootstrap(stats.mean_statistic, diff, **settings)
                self.assertEqual(claim["differences"][f"s2s - {name}"], again)
                intervals[name] = again["interval"]
            self.assertEqual(claim["status"], cf.claim_verdict(intervals, direction))
            for name, summary in claim["models"].items():
                again = stats.bootstrap(stats.mean_statistic, per_image[name], **settings)
                self.assertEqual(summary, again)

    def test_difference_interval_narrows_with_more_images(self):
        widths = []
        for num in (8, 64):
            result = cf.counterfactual_analysis(
                self.models, _images(num, seed=num), top_k=2, batch_size=32, num_resamples=300
            )
            diff = result["claims"]["class_dependent_share"]["differences"]["s2s - classifier"]
            widths.append(_width(diff))
        self.assertLess(widths[1], widths[0])

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "top_k"):
            cf.counterfactual_analysis(self.models, self.images[:2], top_k=NUM_CLASSES + 1)
        with self.assertRaisesRegex(ValueError, "subject"):
            cf.counterfactual_analysis(self.models, self.images[:2], subject="missing")
        with self.assertRaisesRegex(ValueError, "number of classes"):
            other = classifiers.build_classifier_with_preprocessing("testing", SHAPE, 4)
            cf.counterfactual_analysis({**self.models, "other": other}, self.images[:2])


if __name__ == "__main__":
    tf.test.main()
