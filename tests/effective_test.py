"""Tests for effective perturbations: what of δ the purifier passes on to the classifier."""

import json
import os

import keras
import numpy as np
import tensorflow as tf

from s2s_tf.analysis import effective
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import s2s_model

SHAPE = (16, 16, 3)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _pair(num=10, eps=8 / 255, seed=0):
    """Clean images and L-inf perturbed copies (one example left unperturbed)."""
    rng = np.random.default_rng(seed)
    clean = rng.uniform(0.1, 0.9, size=(num, *SHAPE)).astype(np.float32)
    delta = rng.choice([-eps, eps], size=clean.shape).astype(np.float32)
    delta[0] = 0.0  # an example the attack did not move
    return clean, np.clip(clean + delta, 0.0, 1.0)


def _identity(x):
    return x


def _constant(x):
    return tf.zeros_like(x) + 0.5


def _halving(x):
    return 0.5 * x


class NormsTest(tf.test.TestCase):
    def setUp(self):
        super().setUp()
        self.clean, self.adversarial = _pair()

    def test_identity_purifier_passes_on_exactly_delta(self):
        norms = effective.perturbation_norms(_identity, self.clean, self.adversarial, batch_size=3)
        for norm in effective.NORMS:
            self.assertAllEqual(norms[f"passed_{norm}"], norms[f"input_{norm}"])
        self.assertAllClose(norms["input_linf"][1:], np.full(9, 8 / 255), atol=1e-6)
        summary = effective.summarize_norms(norms, num_resamples=200)
        self.assertEqual(summary["num_perturbed"], 9)
        for norm in effective.NORMS:
            for stat in ("median", "mean", "of_means"):
                ratio = summary[norm]["ratio"][stat]
                self.assertAllClose(ratio["estimate"], 1.0, atol=1e-12)
                self.assertAllClose(ratio["interval"], [1.0, 1.0], atol=1e-12)

    def test_constant_purifier_passes_on_nothing(self):
        norms = effective.perturbation_norms(_constant, self.clean, self.adversarial)
        self.assertAllEqual(norms["passed_l2"], np.zeros(10))
        self.assertGreater(norms["input_l2"][1:].min(), 0.0)
        summary = effective.summarize_norms(norms, num_resamples=200)
        self.assertEqual(summary["l2"]["ratio"]["mean"]["estimate"], 0.0)
        self.assertEqual(summary["linf"]["passed_on"]["median"]["interval"], [0.0, 0.0])

    def test_linear_purifier_halves_the_perturbation(self):
        norms = effective.perturbation_norms(_halving, self.clean, self.adversarial)
        summary = effective.summarize_norms(norms, num_resamples=200)
        self.assertAllClose(summary["l2"]["ratio"]["median"]["estimate"], 0.5, atol=1e-5)
        # The unperturbed example is counted but has no ratio (0 / 0).
        self.assertEqual(summary["num_examples"], 10)
        self.assertEqual(summary["num_perturbed"], 9)

    def test_real_purifier_matches_a_manual_computation(self):
        keras.utils.set_random_seed(0)
        config = ae_lib.AutoencoderConfig(stage_widths=((4,), (8,)), num_stages=2)
        purifier = s2s_model.build_purifier(ae_lib.build_autoencoder(config, SHAPE), SHAPE)
        norms = effective.perturbation_norms(purifier, self.clean, self.adversarial[:4])
        self.assertEqual(norms["passed_l2"].shape, (4,))
        passed = purifier(self.adversarial[3:4]) - purifier(self.clean[3:4])
        self.assertAllClose(norms["passed_l2"][3], np.linalg.norm(passed), rtol=1e-4)
        self.assertAllClose(norms["passed_linf"][3], np.abs(passed).max(), rtol=1e-4)
        self.assertEqual(norms["passed_l2"][0], 0.0)  # δ = 0 passes on nothing

    def test_intervals_contain_estimates_and_narrow_with_more_examples(self):
        widths = []
        for num in (12, 400):
            clean, adversarial = _pair(num, seed=num)
            # A non-linear purifier, so the per-example ratio varies.
            norms = effective.perturbation_norms(tf.math.sqrt, clean, adversarial)
            ratio = effective.summarize_norms(norms, num_resamples=300)["l2"]["ratio"]["mean"]
            low, high = ratio["interval"]
            self.assertLessEqual(low, ratio["estimate"])
            self.assertLessEqual(ratio["estimate"], high)
            widths.append(high - low)
        self.assertLess(widths[1], widths[0] / 2)

    def test_shape_mismatch_is_an_error(self):
        with self.assertRaises(ValueError):
            effective.perturbation_norms(_identity, self.clean[:2], self.adversarial)
        with self.assertRaises(ValueError):
            effective.perturbation_norms(_identity, self.clean, self.adversarial[..., :1])


class RunsAndPlotsTest(tf.test.TestCase):
    def setUp(self):
        super().setUp()
        self.clean, adversarial = _pair()
        self.runs = {"white_box/pgd/8/255": adversarial, "bpda/apgd/8/255": adversarial[:5]}

    def test_runs_summary_is_json(self):
        result = effective.effective_perturbations(
            _halving, self.clean, self.runs, batch_size=4, num_resamples=100
        )
        summary = json.loads(json.dumps(result["summary"]))
        self.assertEqual(set(summary), set(self.runs))
        self.assertEqual(summary["bpda/apgd/8/255"]["num_examples"], 5)
        self.assertAllClose(
            summary["white_box/pgd/8/255"]["linf"]["ratio"]["of_means"]["estimate"], 0.5
        )
        self.assertEqual(len(result["norms"]["bpda/apgd/8/255"]["input_l2"]), 5)

    def test_nothing_perturbed_has_no_ratio(self):
        result = effective.effective_perturbations(_identity, self.clean, {"none": self.clean[:3]})
        self.assertIsNone(result["summary"]["none"]["l2"]["ratio"])
        self.assertEqual(result["summary"]["none"]["num_perturbed"], 0)

    def _assert_png(self, path):
        self.assertTrue(os.path.exists(path))
        self.assertGreater(os.path.getsize(path), 1000)
        with open(path, "rb") as f:
            self.assertEqual(f.read(8), PNG_MAGIC)

    def test_plots_are_written(self):
        outdir = self.get_temp_dir()
        adversarial = self.runs["white_box/pgd/8/255"]
        examples = effective.plot_effective_examples(
            _halving, self.clean, adversarial, os.path.join(outdir, "effective.png")
        )
        self._assert_png(examples)
        norms = effective.effective_perturbations(_halving, self.clean, self.runs)["norms"]
        scatter = effective.plot_norm_scatter(norms, os.path.join(outdir, "scatter.png"))
        self._assert_png(scatter)

    def test_grayscale_examples_plot(self):
        clean, adversarial = self.clean[..., :1], self.runs["white_box/pgd/8/255"][..., :1]
        path = os.path.join(self.get_temp_dir(), "gray.png")
        self._assert_png(effective.plot_effective_examples(_identity, clean, adversarial, path, 2))


if __name__ == "__main__":
    tf.test.main()
