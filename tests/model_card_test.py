"""Tests of the model card written into every exported version."""

import copy
import json
import os
import shutil
import tempfile
from unittest import mock

import keras
import tensorflow as tf

import s2s_tf
from s2s_tf import config_io
from s2s_tf import constants
from s2s_tf.export import export_lib
from s2s_tf.export import model_card
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import classifiers
from s2s_tf.models import s2s_model
from s2s_tf.train import stages
from s2s_tf.train import train_lib

SIZE = (16, 16)
TINY_AE = ae_lib.AutoencoderConfig(stage_widths=((4,), (8,)))


def _report(defended_path):
    """A robustness.json document in eval_lib's schema, with distinctive numbers."""
    return {
        "config": {"defended_path": defended_path, "data": {"split": "test"}},
        "results": {
            "num_examples": 40,
            "clean": {"classifier": 0.925, "defended": 0.9},
            # Keyed as eval_lib writes them: as text, so "16/255" sorts before "2/255".
            "headline": {
                "16/255": {
                    "robust_accuracy": 0.05,
                    "ci95": [0.01, 0.17],
                    "robust": 2,
                    "n": 40,
                    "runs": ["white_box/pgd"],
                },
                "2/255": {
                    "robust_accuracy": 0.375,
                    "ci95": [0.24, 0.53],
                    "robust": 15,
                    "n": 40,
                    "runs": ["gray_box/pgd", "white_box/pgd"],
                },
            },
        },
        "checks": [
            {"name": "PGD falls at large eps", "passed": True, "detail": "0.0%"},
            {"name": "Restarts do not raise accuracy", "passed": False, "detail": "5% -> 9%"},
            {"name": "SPSA below PGD", "passed": None, "detail": "not run"},
        ],
    }


class ModelCardTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        """A workdir with a tiny stage-2 composite and the configs training writes beside it."""
        super().setUpClass()
        keras.utils.set_random_seed(0)
        cls.workdir = tempfile.mkdtemp()
        autoencoder = ae_lib.build_autoencoder(TINY_AE, input_shape=(*SIZE, 3))
        classifier = classifiers.build_classifier_with_preprocessing("testing", SIZE, 10)
        cls.defended = constants.defended_path(cls.workdir)
        os.makedirs(os.path.dirname(cls.defended))
        s2s_model.build_s2s_model(autoencoder, classifier).save(cls.defended)
        model = stages.ModelConfig(
            classifier="testing",
            image_size=SIZE,
            autoencoder=TINY_AE,
            classifier_path=constants.classifier_path(cls.workdir),
            autoencoder_path=constants.autoencoder_path(cls.workdir),
        )
        config = train_lib.TrainConfig(stage="stage2", model=model, reconstruction_weight=0.5)
        config_io.save_config(config, os.path.dirname(cls.defended))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.workdir, ignore_errors=True)
        super().tearDownClass()

    def _export(self, **kwargs):
        base = os.path.join(self.get_temp_dir(), "export")
        config = export_lib.ExportConfig(export_base=base, defended_path=self.defended, **kwargs)
        version = export_lib.export(config)
        extra = os.path.join(version, "assets.extra")
        with open(os.path.join(extra, model_card.CARD_JSON), encoding="utf-8") as f:
            card = json.load(f)
        with open(os.path.join(extra, model_card.CARD_MARKDOWN), encoding="utf-8") as f:
            text = f.read()
        return card, text

    def _write_report(self, document, path=None):
        path = path or os.path.join(constants.eval_report_dir(self.workdir), "robustness.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(document, f)
        self.addCleanup(os.remove, path)
        return path

    def test_without_report_says_not_evaluated(self):
        card, text = self._export()
        evaluation = card["evaluation"]
        for key in ("report", "clean_accuracy", "robust_accuracy", "sanity_checks"):
            self.assertEqual(evaluation[key], model_card.NOT_EVALUATED, key)
        self.assertIn("Clean accuracy: not evaluated", text)
        self.assertNotIn("%", text)  # no number that could pass for a result
        # What is known without a report comes from the models and training's config.json.
        self.assertEqual(card["classifier"]["name"], "testing")
        self.assertEqual(card["classifier"]["path"], constants.classifier_path(self.workdir))
        self.assertEqual(card["classifier"]["input_size"], list(SIZE))
        self.assertEqual(card["classifier"]["num_classes"], 10)
        self.assertEqual(card["autoencoder"]["encoder_conv_widths"], [4, 8])
        self.assertEqual(card["autoencoder"]["config"]["stage_widths"], [[4], [8]])
        self.assertEqual(card["stage2_loss"], train_lib.TrainConfig().stage2_loss)
        self.assertEqual(card["reconstruction_weight"], 0.5)
        self.assertEqual(card["data"]["defense_training"]["source"], "fashion_mnist")
        self.assertEqual(card["data"]["classifier_training"], model_card.UNKNOWN)
        self.assertEqual(
            card["software"],
            {
                "tensorflow": tf.__version__,
                "keras": keras.__version__,
                "s2s_tf": s2s_tf.__version__,
            },
        )

    def test_numbers_equal_the_workdirs_report(self):
        document = _report(self.defended)
        self._write_report(document)
        card, text = self._export()
        evaluation, results = card["evaluation"], document["results"]
        self.assertEqual(evaluation["clean_accuracy"], results["clean"])
        self.assertEqual(evaluation["robust_accuracy"], results["headline"])
        self.assertEqual(evaluation["examples"], 40)
        self.assertTrue(evaluation["evaluated_model_is_exported"])
        checks = evaluation["sanity_checks"]
        self.assertEqual((checks["passed"], checks["undecided"]), (1, 1))
        self.assertEqual([c["name"] for c in checks["failed"]], ["Restarts do not raise accuracy"])
        for shown in (
            "classifier alone 92.5%",
            "defended 90.0%",
            "| 2/255 | 37.5% | 24.0%-53.0% | 2 |",
        ):
            self.assertIn(shown, text)
        self.assertLess(text.index("| 2/255 |"), text.index("| 16/255 | 5.0% | 1.0%-17.0% | 1 |"))
        self.assertIn("FAILED: Restarts do not raise accuracy: 5% -> 9%", text)
        self.assertNotIn("WARNING", text)

    def test_report_without_headline_or_checks(self):
        document = _report(self.defended)
        del document["results"]["headline"], document["checks"]
        card, _ = self._export(report_path=self._write_report(document, self._other("r.json")))
        self.assertEqual(card["evaluation"]["clean_accuracy"]["defended"], 0.9)
        self.assertEqual(card["evaluation"]["robust_accuracy"], model_card.NOT_EVALUATED)
        self.assertEqual(card["evaluation"]["sanity_checks"], model_card.NOT_EVALUATED)

    def test_top_level_headline_is_read(self):
        document = copy.deepcopy(_report(self.defended))
        document["headline"] = document["results"].pop("headline")
        card, _ = self._export(report_path=self._write_report(document, self._other("h.json")))
        self.assertEqual(card["evaluation"]["robust_accuracy"], document["headline"])

    def test_report_of_another_model_is_flagged(self):
        path = self._write_report(_report("/elsewhere/defended.keras"), self._other("o.json"))
        card, text = self._export(report_path=path)
        self.assertFalse(card["evaluation"]["evaluated_model_is_exported"])
        self.assertIn("WARNING: the report evaluated `/elsewhere/defended.keras`", text)

    def test_bad_reports_fail_before_anything_is_written(self):
        base = os.path.join(self.get_temp_dir(), "bad")
        missing = self._other("missing.json")
        config = export_lib.ExportConfig(
            export_base=base, defended_path=self.defended, report_path=missing
        )
        with self.assertRaisesRegex(FileNotFoundError, "robustness report not found"):
            export_lib.export(config)
        self.assertFalse(os.path.exists(base))
        not_a_report = self._write_report({"config": {}}, self._other("bad.json"))
        with self.assertRaisesRegex(ValueError, "not a robustness report"):
            export_lib.export(export_lib.ExportConfig(
                export_base=base, defended_path=self.defended, report_path=not_a_report
            ))  # fmt: skip
        self.assertEqual(export_lib.versions(base), [])

    def test_card_is_written_before_the_version_appears(self):
        base = os.path.join(self.get_temp_dir(), "atomic")
        config = export_lib.ExportConfig(export_base=base, defended_path=self.defended)
        failing = mock.patch.object(model_card, "write_card", side_effect=OSError("disk full"))
        with failing, self.assertRaisesRegex(OSError, "disk full"):
            export_lib.export(config)
        self.assertEqual(os.listdir(base), [])  # no version, no temporary directory

    def test_default_report_path(self):
        self.assertEqual(
            model_card.default_report_path(self.defended),
            os.path.join(self.workdir, "eval_report", "robustness.json"),
        )
        self.assertIsNone(model_card.default_report_path("/models/defended.keras"))
        self.assertIsNone(model_card.default_report_path(None))

    def _other(self, name):
        return os.path.join(self.get_temp_dir(), name)


if __name__ == "__main__":
    tf.test.main()
