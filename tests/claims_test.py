"""Tests of the wiring in s2s_tf/analysis/claims.py: which model goes where in each claim."""

import os
from unittest import mock

import keras
import numpy as np
import tensorflow as tf

from s2s_tf.analysis import baselines
from s2s_tf.analysis import claims
from s2s_tf.analysis import counterfactual
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import s2s_model
from s2s_tf.robustness import evaluation
from s2s_tf.robustness import streaming
from s2s_tf.robustness import threat_models

SHAPE = (8, 8, 3)
N = 6


def _models(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(SHAPE)
    classifier = keras.Model(inputs, keras.layers.Dense(4)(keras.layers.Flatten()(inputs)))
    ae = ae_lib.build_autoencoder(ae_lib.AutoencoderConfig(stage_widths=((4,),)), SHAPE)
    return evaluation.Models(
        classifier,
        s2s_model.build_s2s_model(ae, classifier),
        s2s_model.build_purifier(ae, SHAPE),
    )


def _evaluator(models, **config):
    images = np.random.default_rng(0).uniform(size=(N, *SHAPE)).astype(np.float32)
    config = evaluation.EvalConfig(
        eps=(2 / 255, 8 / 255),
        surrogate_temperatures=(0.3, 1.0),
        surrogate_calibration_examples=N,
        num_examples=N,
        **config,
    )
    return evaluation.Evaluator(models, images, np.arange(N) % 4, config, progress=lambda m: None)


class GradientClaimsTest(tf.test.TestCase):
    def test_subject_reference_and_reconstruction(self):
        models = _models()
        images = _evaluator(models).images
        reconstruction_ae = ae_lib.build_autoencoder(
            ae_lib.AutoencoderConfig(stage_widths=((4,),)), SHAPE
        )
        with mock.patch.object(counterfactual, "counterfactual_analysis") as analysis:
            claims.gradient_claims(models, images, reconstruction_ae, top_k=9)
        named = analysis.call_args.args[0]
        kwargs = analysis.call_args.kwargs
        self.assertIs(named["s2s"], models.defended)
        self.assertIs(named["classifier"], models.classifier)
        self.assertEqual((kwargs["subject"], kwargs["reference"]), ("s2s", "classifier"))
        self.assertEqual(kwargs["top_k"], 4)  # all of the 4 classes, no more
        expected = models.classifier(s2s_model.build_purifier(reconstruction_ae, SHAPE)(images))
        self.assertAllClose(named["reconstruction"](images), expected, atol=1e-5)


class RelationsClaimTest(tf.test.TestCase):
    def test_defended_rows_come_from_every_surrogate_temperature(self):
        models, own_models = _models(0), _models(1)
        models.others = {"other": own_models.classifier, "other+s2s": own_models.defended}
        evaluator = _evaluator(models, transfer_attack="pgd")
        calls = []

        def run_attack(key, attack, source, eps, indices, scored):
            calls.append((key, attack, source, eps))
            # Temperature 0.3 fools example 0 on every target, temperature 1 example 1.
            correct = np.ones(len(indices), bool)
            correct[0 if "@0.3" in key else 1 if "@1" in key else 2] = False
            return {t: correct.copy() for t in scored}

        evaluator.run_attack = run_attack
        own = {"other+s2s": claims.OwnS2S(own_models)}
        summary = claims.relations_claim(evaluator, ["2/255", "8/255"], own, num_examples=N)
        sources = {key.split("@", 1)[1].rsplit("/", 2)[0]: source for key, _, source, _ in calls}
        surrogate = threat_models.get("surrogate")
        for name, owner in (("defended", models), ("other+s2s", own_models)):
            for variant, fn in surrogate.sources(owner, evaluator.config).items():
                self.assertIs(sources[f"{name}~{variant}"], fn)
        self.assertIs(sources["classifier~classifier"], models.classifier)
        self.assertIs(sources["other~other"], models.others["other"])
        self.assertNotIn(models.defended, sources.values())  # never the masked gradient
        self.assertEqual({attack for _, attack, _, _ in calls}, {"pgd"})
        self.assertEqual(sorted({eps for *_, eps in calls}), [2 / 255, 8 / 255])
        # Per target, fooled by any temperature: examples 0 and 1 of 6.
        row = summary["surrogate_rows"]["8/255"]["defended"]
        self.assertAlmostEqual(row["defended"], 4 / 6)
        self.assertAlmostEqual(summary["rows"]["8/255"]["classifier"]["defended"], 5 / 6)
        self.assertEqual(set(summary["rows"]["8/255"]), {"classifier", "other"})
        self.assertEqual(summary["groups"]["defended"]["models"], ["defended", "other+s2s"])

    def test_no_transfer_matrix(self):
        self.assertEqual(claims.relations_claim(_evaluator(_models()), []), {})


class BaselinesClaimTest(tf.test.TestCase):
    def test_each_baseline_in_front_of_the_classifier_in_its_own_shards(self):
        models = _models()
        config = evaluation.EvalConfig()
        seen = []

        def evaluate_split(b_models, data, b_config, shard_dir, **kwargs):
            seen.append((b_models, b_config, shard_dir, kwargs["model_key"]))
            return None if kwargs["worker"] == "other" else {"headline": {}}

        with mock.patch.object(streaming, "evaluate_split", evaluate_split):
            out = claims.baselines_claim(
                ("jpeg", "median"),
                models.classifier,
                "data",
                config,
                "/s",
                model_key="k",
                worker="zero",
                progress=lambda m: None,
            )
            self.assertEqual(
                claims.baselines_claim(
                    ("jpeg",), models.classifier, "d", config, "/s", worker="other"
                ),
                {},
            )
        self.assertEqual(set(out), {"jpeg", "median"})
        (jpeg_models, jpeg_config, jpeg_dir, jpeg_key), (_, median_config, median_dir, _) = seen[:2]
        self.assertIs(jpeg_models.classifier, models.classifier)
        self.assertNotIn("surrogate", jpeg_config.threat_models)
        self.assertNotIn("white_box", jpeg_config.threat_models)
        self.assertIn("white_box", median_config.threat_models)
        self.assertEqual(jpeg_config.attacks, config.attacks)
        self.assertEqual(
            (jpeg_dir, median_dir),
            (os.path.join("/s", "baseline_jpeg"), os.path.join("/s", "baseline_median")),
        )
        self.assertEqual(jpeg_key, "k/baseline:jpeg")
        self.assertEqual(out["jpeg"]["threat_models"], list(jpeg_config.threat_models))
        self.assertEqual(out["jpeg"]["title"], baselines.get("jpeg").title)


class EffectiveRunsTest(tf.test.TestCase):
    def test_the_first_examples_through_each_threat_model(self):
        models = _models()
        evaluator = _evaluator(models, threat_models=("white_box", "gray_box", "gradient_free"))
        calls = []

        def attack(name, source, eps, images):
            calls.append((name, source, eps, images))
            return images + 0.01

        evaluator.attack = attack
        runs = claims.effective_runs(evaluator, num_examples=4)
        self.assertEqual(
            sorted(runs),
            sorted(
                evaluation.run_key(t, evaluator.config.check_attack, e)
                for t in ("white_box", "gray_box")
                for e in (2 / 255, 8 / 255)
            ),
        )
        for _, source, _, images in calls:
            self.assertIn(source, (models.defended, models.classifier))
            self.assertAllEqual(images, evaluator.images[:4])


if __name__ == "__main__":
    tf.test.main()
