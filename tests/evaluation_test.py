"""Tests for the threat models and the sanity checks against gradient masking."""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import s2s_model
from s2s_tf.robustness import evaluation


def _results(white_pgd=0.3, white_fgsm=0.5, gray_pgd=0.6, bpda_pgd=0.35, spsa=0.5, large=0.0):
    row = lambda v: {"8/255": {"defended": v}}  # noqa: E731
    return {
        "clean": {"classifier": 0.9, "defended": 0.88},
        "threats": {
            "white_box": {"fgsm": row(white_fgsm), "pgd": row(white_pgd)},
            "gray_box": {
                "pgd": {"8/255": {"defended": gray_pgd, "classifier": 0.0}},
            },
            "bpda": {"pgd": row(bpda_pgd)},
            "gradient_free": {
                "spsa": row(spsa),
                "pgd_same_subset": row(white_pgd),
                "num_examples": 10,
            },
        },
        "transfer": {
            "attack": "pgd",
            "eps": 8 / 255,
            "matrix": {
                "classifier": {"classifier": 0.0, "defended": gray_pgd},
                "defended": {"classifier": 0.2, "defended": white_pgd},
            },
        },
        "extra": {
            "large_eps": 64 / 255,
            "pgd_large_eps": large,
            "eps": 8 / 255,
            "pgd": white_pgd,
            "pgd_2x_steps": white_pgd,
            "pgd_restarts": white_pgd,
        },
    }


def _failed(checks):
    return [c["name"] for c in checks if c["passed"] is False]


class SanityChecksTest(tf.test.TestCase, parameterized.TestCase):
    def test_an_honest_result_passes_everything(self):
        checks = evaluation.sanity_checks(_results(), num_examples=100)
        self.assertGreaterEqual(len(checks), 8)
        self.assertEqual(_failed(checks), [])

    @parameterized.named_parameters(
        ("large_eps_not_zero", dict(large=0.4), "large eps"),
        ("single_step_stronger", dict(white_fgsm=0.1), "Iterative pgd"),
        ("gray_box_stronger", dict(gray_pgd=0.1), "White-box pgd"),
        ("bpda_stronger", dict(bpda_pgd=0.1), "BPDA"),
        ("spsa_stronger", dict(spsa=0.0), "SPSA"),
    )
    def test_each_symptom_fails_its_check(self, kwargs, name_part):
        failed = _failed(evaluation.sanity_checks(_results(**kwargs), num_examples=100))
        self.assertTrue(any(name_part in name for name in failed), failed)

    def test_more_steps_raising_accuracy_fails(self):
        results = _results()
        results["extra"]["pgd_2x_steps"] = 0.5
        results["extra"]["pgd_restarts"] = 0.5
        failed = _failed(evaluation.sanity_checks(results, num_examples=100))
        self.assertIn("More PGD steps do not raise accuracy", failed)
        self.assertIn("Restarts do not raise accuracy", failed)

    def test_one_example_of_noise_is_tolerated(self):
        results = _results(white_pgd=0.31, gray_pgd=0.30)
        self.assertEqual(_failed(evaluation.sanity_checks(results, num_examples=100)), [])

    @parameterized.named_parameters(
        ("attack", dict(attacks=("nope",)), "unknown attacks"),
        ("threat", dict(threat_models=("black_box",)), "unknown threat"),
        ("eps", dict(eps=(2.0,)), "eps"),
        ("examples", dict(num_examples=0), "num_examples"),
    )
    def test_bad_config(self, kwargs, pattern):
        with self.assertRaisesRegex(ValueError, pattern):
            evaluation.EvalConfig(**kwargs).validate()


class EvaluatorTest(tf.test.TestCase):
    def test_runs_every_threat_model_on_a_tiny_model(self):
        keras.utils.set_random_seed(0)
        shape = (8, 8, 3)
        inputs = keras.Input(shape)
        logits = keras.layers.Dense(3)(keras.layers.Flatten()(inputs))
        classifier = keras.Model(inputs, logits)
        ae = ae_lib.build_autoencoder(ae_lib.AutoencoderConfig(stage_widths=((4,),)), shape)
        models = evaluation.Models(
            classifier=classifier,
            defended=s2s_model.build_s2s_model(ae, classifier),
            purifier=s2s_model.build_purifier(ae, shape),
            others={"copy": classifier},
        )
        rng = np.random.default_rng(0)
        images = rng.uniform(size=(6, *shape)).astype(np.float32)
        labels = np.asarray(classifier(images)).argmax(-1)  # the classifier is right on all
        config = evaluation.EvalConfig(
            attacks=("fgsm", "pgd"),
            eps=(4 / 255, 16 / 255),
            num_examples=6,
            batch_size=3,
            steps=3,
            spsa_examples=2,
        )
        messages = []
        evaluator = evaluation.Evaluator(models, images, labels, config, messages.append)
        results = evaluator.run()
        self.assertEqual(results["clean"]["classifier"], 1.0)
        self.assertEqual(
            set(results["threats"]), {"gray_box", "white_box", "bpda", "gradient_free"}
        )
        self.assertEqual(set(results["threats"]["white_box"]["pgd"]), {"4/255", "16/255"})
        # The gray-box row also reports the undefended classifier, which PGD beats.
        gray = results["threats"]["gray_box"]["pgd"]["16/255"]
        self.assertLess(gray["classifier"], 1.0)
        matrix = results["transfer"]["matrix"]
        self.assertEqual(set(matrix), {"classifier", "defended", "copy"})
        self.assertEqual(matrix["classifier"]["copy"], matrix["classifier"]["classifier"])
        self.assertIn("pgd_large_eps", results["extra"])
        self.assertTrue(any("transfer" in m for m in messages))
        # Progress per batch: 6 examples in batches of 3.
        self.assertIn("  pgd: 3/6 examples", messages)
        self.assertIn("  pgd: 6/6 examples", messages)
        self.assertIn("white_box/pgd", evaluator.examples)


if __name__ == "__main__":
    tf.test.main()
