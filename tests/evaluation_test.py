"""Tests for s2s_tf/robustness/evaluation.py: configs, presets, the Evaluator, transfer."""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import s2s_model
from s2s_tf.robustness import evaluation
from s2s_tf.robustness import runner

# Nearest-template classifiers: accurate on `_template_images`, each on its own pixels.
TEMPLATE_SEED = 7
NUM_TEMPLATES = 3


def _templates(shape):
    rng = np.random.default_rng(TEMPLATE_SEED)
    return 0.5 + rng.uniform(-0.05, 0.05, (NUM_TEMPLATES, *shape))


def _template_images(shape, n):
    """Noisy copies of the class templates, and their labels."""
    rng = np.random.default_rng(TEMPLATE_SEED + 1)
    labels = np.arange(n) % NUM_TEMPLATES
    images = _templates(shape)[labels] + rng.normal(0.0, 0.02, (n, *shape))
    return np.clip(images, 0.0, 1.0).astype(np.float32), labels


def _template_classifier(pixels, name):
    """Logit k = 2<x, T_k> - |T_k|^2 over the pixels where the bool mask `pixels` is set."""
    mask = pixels.reshape(-1)
    templates = _templates(pixels.shape).reshape(NUM_TEMPLATES, -1) * mask
    inputs = keras.Input(pixels.shape)
    dense = keras.layers.Dense(NUM_TEMPLATES)
    model = keras.Model(inputs, dense(keras.layers.Flatten()(inputs)), name=name)
    dense.set_weights([2.0 * templates.T, -np.sum(np.square(templates), axis=1)])
    return model


def _accuracy(model, images, labels):
    """Fraction of `images` that `model` (a Keras model) classifies as `labels`, by argmax."""
    return float(np.mean(np.argmax(model(images), -1) == labels))


def _transfer_by_hand(named, images, labels, config):
    """The transfer matrix: each source's `run_attack` examples scored on every target."""
    expected = {}
    for source_name, source in named.items():
        adversarial = runner.run_attack(
            config.transfer_attack,
            source,
            images,
            labels,
            max(config.eps),  # the default transfer_eps
            steps=config.steps,
            restarts=config.restarts,
            batch_size=config.batch_size,
            seed=config.seed,
        )
        expected[source_name] = {
            target_name: _accuracy(target, adversarial, labels)
            for target_name, target in named.items()
        }
    return expected


class EvalConfigTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.named_parameters(
        ("attack", dict(attacks=("nope",)), "unknown attacks"),
        ("threat", dict(threat_models=("black_box",)), "unknown threat"),
        ("eps", dict(eps=(2.0,)), "eps"),
        ("examples", dict(num_examples=0), "num_examples"),
    )
    def test_bad_config(self, kwargs, pattern):
        with self.assertRaisesRegex(ValueError, pattern):
            evaluation.EvalConfig(**kwargs).validate()

    def test_presets(self):
        fast, standard = evaluation.preset("fast"), evaluation.preset("standard")
        self.assertGreaterEqual(standard.num_examples, 500)
        self.assertEqual(standard.steps, 100)
        self.assertIn("apgd_ce", standard.attacks)
        self.assertIn("apgd_t", standard.attacks)
        self.assertIn("square", standard.gradient_free_attacks)
        self.assertLessEqual(set(fast.attacks), set(standard.attacks))
        self.assertIn("apgd_t", fast.attacks)
        self.assertLess(fast.steps, standard.steps)
        self.assertEqual(evaluation.preset("fast", steps=7).steps, 7)
        with self.assertRaisesRegex(ValueError, "unknown attack preset"):
            evaluation.preset("strong")


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
            others={"other": _template_classifier(np.ones(shape, bool), "other")},
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
            adaptive_attacks=("pgd",),
            gradient_free_attacks=("testing",),
            gradient_free_examples=2,
            check_attack="pgd",
        )
        messages = []
        evaluator = evaluation.Evaluator(models, images, labels, config, messages.append)
        results = evaluator.run()
        self.assertEqual(results["clean"]["classifier"], 1.0)
        self.assertEqual(
            set(results["threats"]),
            {
                "gray_box",
                "white_box",
                "bpda",
                "surrogate",
                "gradient_free",
                "check_large_eps",
                "check_more_steps",
                "check_restarts",
            },
        )
        self.assertEqual(results["threats"]["gradient_free"]["testing"]["4/255"]["n"], 2)
        self.assertEqual(set(results["threats"]["white_box"]["pgd"]), {"4/255", "16/255"})
        # The gray-box row also reports the undefended classifier, which PGD beats.
        gray = results["threats"]["gray_box"]["pgd"]["16/255"]
        self.assertLess(gray["classifier"], 1.0)
        matrix = results["transfer"]["matrix"]
        self.assertEqual(set(matrix), {"classifier", "defended", "other"})
        for row in matrix.values():
            self.assertEqual(set(row), {"classifier", "defended", "other"})
        self.assertEqual(set(results["transfer"]["matrices"]), {"4/255", "16/255"})
        self.assertNotIn("relations", results["transfer"])  # the analysis computes it
        self.assertTrue(any("transfer" in m for m in messages))
        # Progress per batch: 6 examples in batches of 3.
        self.assertIn("  pgd: 3/6 examples", messages)
        self.assertIn("  pgd: 6/6 examples", messages)
        self.assertLen(evaluator.adversarial["white_box/pgd/16/255"], 6)


class TransferMatrixTest(tf.test.TestCase):
    def test_matrix_matches_attacks_run_by_hand(self):
        keras.utils.set_random_seed(0)
        shape = (8, 8, 3)
        half = np.random.default_rng(0).uniform(size=shape) < 0.5
        classifier = _template_classifier(half, "classifier")
        other = _template_classifier(~half, "other")
        ae = ae_lib.build_autoencoder(ae_lib.AutoencoderConfig(stage_widths=((4,),)), shape)
        models = evaluation.Models(
            classifier=classifier,
            defended=s2s_model.build_s2s_model(ae, classifier),
            purifier=s2s_model.build_purifier(ae, shape),
            others={"other": other},
        )
        images, labels = _template_images(shape, 8)
        config = evaluation.EvalConfig(
            attacks=("pgd",),
            eps=(12 / 255,),
            threat_models=("transfer",),
            num_examples=8,
            batch_size=4,
            steps=3,
            restarts=1,
            transfer_attack="pgd",
            seed=3,
        )
        matrix = evaluation.Evaluator(models, images, labels, config, lambda _: None).run()
        matrix = matrix["transfer"]["matrix"]
        named = {"classifier": classifier, "defended": models.defended, "other": other}
        self.assertEqual(_accuracy(classifier, images, labels), 1.0)
        self.assertEqual(_accuracy(other, images, labels), 1.0)
        expected = _transfer_by_hand(named, images, labels, config)
        # The fixture tells sources and targets apart: the two classifiers look at disjoint
        # pixels, so an attack on one beats it and leaves the other alone.
        self.assertLess(expected["classifier"]["classifier"], expected["classifier"]["other"])
        self.assertLess(expected["other"]["other"], expected["other"]["classifier"])
        self.assertEqual(set(matrix), set(expected))
        for source_name, row in expected.items():
            self.assertEqual(set(matrix[source_name]), set(row), source_name)
            for target_name, value in row.items():
                self.assertAllClose(
                    matrix[source_name][target_name], value, msg=f"{source_name} -> {target_name}"
                )


if __name__ == "__main__":
    tf.test.main()
