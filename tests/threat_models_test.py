"""Tests for s2s_tf/robustness/threat_models.py and the per-example evaluation built on it."""

import keras
import numpy as np
import tensorflow as tf

from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import s2s_model
from s2s_tf.robustness import evaluation
from s2s_tf.robustness import threat_models

SHAPE = (8, 8, 3)


def _models():
    keras.utils.set_random_seed(0)
    inputs = keras.Input(SHAPE)
    logits = keras.layers.Dense(3)(keras.layers.Flatten()(inputs))
    classifier = keras.Model(inputs, logits)
    ae = ae_lib.build_autoencoder(ae_lib.AutoencoderConfig(stage_widths=((4,),)), SHAPE)
    return threat_models.Models(
        classifier=classifier,
        defended=s2s_model.build_s2s_model(ae, classifier),
        purifier=s2s_model.build_purifier(ae, SHAPE),
    )


class ThreatModelsTest(tf.test.TestCase):
    def test_registry(self):
        self.assertEqual(
            list(threat_models.THREATS),
            ["surrogate", "bpda", "white_box", "gray_box", "gradient_free", "transfer"],
        )
        for threat in threat_models.THREATS.values():
            self.assertTrue(threat.title)
        with self.assertRaisesRegex(ValueError, "black_box"):
            threat_models.get("black_box")
        with self.assertRaisesRegex(ValueError, "twice"):
            threat_models.register(threat_models.THREATS["bpda"])

    def test_derived_models_are_built_once(self):
        models = _models()
        with self.assertRaisesRegex(ValueError, "calibrate"):
            models.surrogate(0.1)
        x = tf.random.stateless_uniform([4, *SHAPE], (1, 2))
        scales = models.calibrate(x)
        self.assertIs(models.calibrate(x[:1]), scales)  # measured once
        self.assertIs(models.surrogate(0.1), models.surrogate(0.1))
        self.assertAllClose(models.surrogate(0.1)(x), models.defended(x), atol=1e-5)
        self.assertAllClose(models.bpda(x), models.defended(x), atol=1e-5)


class PerExampleEvaluationTest(tf.test.TestCase):
    def test_headline_is_the_per_example_worst_case_of_every_run(self):
        models = _models()
        rng = np.random.default_rng(0)
        images = rng.uniform(size=(12, *SHAPE)).astype(np.float32)
        labels = np.asarray(models.defended(images)).argmax(-1)  # all correct when clean
        labels[:2] = (labels[:2] + 1) % 3  # two clean errors
        config = evaluation.EvalConfig(
            attacks=("fgsm", "pgd"),
            cascade=False,
            surrogate_temperatures=(1.0,),
            gradient_free_attacks=("testing",),
            eps=(4 / 255, 16 / 255),
            num_examples=12,
            batch_size=6,
            steps=3,
            gradient_free_examples=5,
            check_attack="pgd",
            large_eps=16 / 255,  # the sanity run at a large eps is not part of the headline
        )
        results = evaluation.Evaluator(models, images, labels, config, lambda s: None).run()
        per_example = results["per_example"]
        for threat in ("gray_box", "white_box"):
            for attack in ("fgsm", "pgd"):
                self.assertLen(per_example[evaluation.run_key(threat, attack, 4 / 255)], 12)
        self.assertEqual(results["runs"]["gradient_free/testing/4/255"]["attacked"], 5 - 2)
        for eps in config.eps:
            key = evaluation.eps_key(eps)
            robust = np.asarray(per_example["clean/defended"], bool)
            runs = [
                k
                for k in per_example
                if k.endswith("/" + key) and not k.startswith("check_large_eps/")
            ]
            self.assertIn(f"surrogate@1/pgd/{key}", runs)
            self.assertIn(f"check_more_steps/pgd/{key}", runs)
            for run in runs:
                correct = np.asarray(per_example[run], bool)
                robust[: len(correct)] &= correct
            headline = results["headline"][key]
            self.assertEqual(headline["robust"], int(robust.sum()))
            self.assertEqual(headline["n"], 12)
            self.assertLessEqual(headline["robust"], 10)  # never above clean accuracy
            low, high = headline["ci95"]
            self.assertLessEqual(low, headline["robust_accuracy"])
            self.assertGreaterEqual(high, headline["robust_accuracy"])
            # The worst case is at most every single run's accuracy.
            for by_eps in results["threats"]["white_box"].values():
                self.assertLessEqual(headline["robust_accuracy"], by_eps[key]["defended"])
        self.assertIn("check_large_eps/pgd/16/255", per_example)
        self.assertNotIn("check_large_eps", str(results["headline"]["16/255"]["runs"]))


if __name__ == "__main__":
    tf.test.main()
