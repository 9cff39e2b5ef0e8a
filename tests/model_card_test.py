"""Tests of the model card written into every exported version."""

import copy
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from unittest import mock

import keras
import tensorflow as tf

from s2s_tf import config_io
from s2s_tf import constants
from s2s_tf import data as data_lib
from s2s_tf.export import export_lib
from s2s_tf.export import model_card
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import classifiers
from s2s_tf.models import s2s_model
from s2s_tf.train import adversarial
from s2s_tf.train import losses
from s2s_tf.train import optim
from s2s_tf.train import stages
from s2s_tf.train import train_lib
from s2s_tf.train import trainer

SIZE = (16, 16)
TINY_AE = ae_lib.AutoencoderConfig(stage_widths=((4,), (8,)))
_SETUP_PY = os.path.join(os.path.dirname(__file__), "..", "setup.py")
# The loss training did not default to: a card that reports the default is caught.
STAGE2_LOSS = next(x for x in losses.STAGE2_LOSSES if x != train_lib.TrainConfig().stage2_loss)


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _distribution_version(*names):
    """The installed version of the first of `names` that is installed (package metadata)."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    raise AssertionError(f"none of {names} is installed")


def _report(defended_path, digest=None):
    """A robustness.json document in eval_lib's schema, with distinctive numbers.

    Args:
      defended_path: the evaluated model's path, as the report's config gives it.
      digest: the SHA-256 the report records for it; None records no hashes.
    """
    return {
        "config": {"defended_path": defended_path, "data": {"split": "test"}},
        **({"model_files": {defended_path: digest}} if digest else {}),
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
            {
                "name": "bpda pgd does not beat white-box (8/255)",
                "passed": None,
                "detail": "undecided: too few discordant pairs for a significant result. "
                "fooled by white_box/best only: 0, by bpda/pgd only: 2",
                "only_a": 0,
                "only_b": 2,
                "p_value": 0.5,
                "decidable": False,
            },
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
        cls.autoencoder = ae_lib.build_autoencoder(TINY_AE, input_shape=(*SIZE, 3))
        cls.classifier = classifiers.build_classifier_with_preprocessing("testing", SIZE, 10)
        cls.defended = constants.defended_path(cls.workdir)
        os.makedirs(os.path.dirname(cls.defended))
        s2s_model.build_s2s_model(cls.autoencoder, cls.classifier).save(cls.defended)
        model = stages.ModelConfig(
            classifier="testing",
            image_size=SIZE,
            autoencoder=TINY_AE,
            classifier_path=constants.classifier_path(cls.workdir),
            autoencoder_path=constants.autoencoder_path(cls.workdir),
        )
        config = train_lib.TrainConfig(
            stage="stage2", model=model, stage2_loss=STAGE2_LOSS, reconstruction_weight=0.5
        )
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

    def _card(self, report_path):
        """The card `export` would write for `report_path`, without writing a SavedModel."""
        sources = {"defended_path": self.defended}
        card = model_card.build_card(sources, self.autoencoder, self.classifier, SIZE, report_path)
        return json.loads(json.dumps(card)), model_card.markdown(card)

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
        self.assertEqual(card["stage2_loss"], STAGE2_LOSS)
        self.assertIn(f"Stage-2 loss: {STAGE2_LOSS} (reconstruction weight 0.5)", text)
        self.assertEqual(card["reconstruction_weight"], 0.5)
        self.assertEqual(card["data"]["defense_training"]["source"], "fashion_mnist")
        self.assertEqual(card["data"]["classifier_training"], model_card.UNKNOWN)
        # Versions from the installed packages' metadata and setup.py, not from the
        # module attributes the card reads.
        with open(_SETUP_PY, encoding="utf-8") as f:
            (package_version,) = re.findall(r'version="([^"]+)"', f.read())
        software = {
            "tensorflow": _distribution_version("tensorflow", "tensorflow-cpu", "tf-nightly"),
            "keras": _distribution_version("keras"),
            "s2s_tf": package_version,
        }
        self.assertEqual(card["software"], software)
        self.assertIn(", ".join(f"{k} {v}" for k, v in software.items()), text)
        # Without a report the card still names the exported bytes.
        self.assertEqual(card["provenance"]["model_files"], {self.defended: _sha256(self.defended)})
        self.assertIsNone(card["provenance"]["report"])

    def test_numbers_equal_the_workdirs_report(self):
        document = _report(self.defended, _sha256(self.defended))
        report_path = self._write_report(document)
        card, text = self._export()
        evaluation, results = card["evaluation"], document["results"]
        self.assertEqual(evaluation["clean_accuracy"], results["clean"])
        self.assertEqual(evaluation["robust_accuracy"], results["headline"])
        self.assertEqual(evaluation["examples"], 40)
        self.assertIs(evaluation["evaluated_model_is_exported"], True)
        self.assertEqual(card["provenance"]["report"]["sha256"], _sha256(report_path))
        for shown in (
            "classifier alone 92.5%",
            "defended 90.0%",
            "| 2/255 | 37.5% | 24.0%-53.0% | 2 |",
            f"report `{report_path}`: `{_sha256(report_path)}`",
        ):
            self.assertIn(shown, text)
        self.assertLess(text.index("| 2/255 |"), text.index("| 16/255 | 5.0% | 1.0%-17.0% | 1 |"))
        self.assertNotIn("WARNING", text)

    def test_training_objectives_and_budgets_are_named(self):
        """An adversarial stage 2 over a stage-1 autoencoder, in front of a Madry classifier."""
        workdir = self.get_temp_dir()
        model = stages.ModelConfig(
            classifier="testing",
            image_size=SIZE,
            autoencoder=TINY_AE,
            classifier_path=constants.classifier_path(workdir),
            autoencoder_path=constants.autoencoder_path(workdir),
        )

        def save(stage, steps, batch, rate, augment, **fields):
            config = train_lib.TrainConfig(
                stage=stage,
                model=model,
                train_data=data_lib.DataConfig(global_batch_size=batch, augment=augment),
                loop=trainer.LoopConfig(train_steps=steps),
                optimizer=optim.OptimizerConfig(learning_rate=rate),
                **fields,
            )
            directory = os.path.join(workdir, stage)
            os.makedirs(directory, exist_ok=True)
            config_io.save_config(config, directory)

        stage2_attack = adversarial.AdversarialConfig(
            train_eps=4 / 255, train_attack_steps=3, robust_weight=2.5, train_eps_ramp_steps=40
        )
        save(
            "stage2", 123, 48, 7e-4, "crop",
            stage2_objective="adversarial", stage2_trainable="autoencoder",
            adversarial=stage2_attack,
        )  # fmt: skip
        save("stage1", 77, 32, 2e-3, "crop_flip")
        madry = adversarial.AdversarialConfig(train_eps=6 / 255, train_attack="fgsm_rs")
        save("stage0", 55, 16, 1e-3, "off", stage0_objective="adversarial", adversarial=madry)
        sources = {"defended_path": constants.defended_path(workdir)}
        card = model_card.build_card(
            sources, self.autoencoder, self.classifier, SIZE, None,
            provenance={"model_files": {}, "report": None},
        )  # fmt: skip
        card = json.loads(json.dumps(card))
        training = card["training"]
        self.assertEqual(
            training["stage2"],
            {
                "objective": "adversarial",
                "trainable": "autoencoder",
                "train_steps": 123,
                "global_batch_size": 48,
                "learning_rate": 7e-4,
                "schedule": optim.OptimizerConfig().schedule,
                "augment": "crop",
                "inner_attack": {
                    "train_eps": 4 / 255,
                    "train_eps_ramp_steps": 40,
                    "train_attack": stage2_attack.train_attack,
                    "train_attack_steps": 3,
                    "train_step_size": None,
                    "robust_weight": 2.5,
                    "train_surrogate_temperature": stage2_attack.train_surrogate_temperature,
                },
            },
        )
        self.assertEqual(training["stage1"]["train_steps"], 77)
        self.assertEqual(training["stage1"]["augment"], "crop_flip")
        self.assertEqual(training["classifier"]["objective"], "adversarial")
        self.assertEqual(training["classifier"]["train_steps"], 55)
        self.assertEqual(training["classifier"]["inner_attack"]["train_attack"], "fgsm_rs")
        self.assertNotIn("robust_weight", training["classifier"]["inner_attack"])
        self.assertEqual(training["classifier"]["inner_attack"]["train_eps_ramp_steps"], 0)
        text = model_card.markdown(card)
        for shown in (
            "- Stage 2: objective adversarial, trains the autoencoder; 123 steps of batch 48",
            "augmentation crop; inner attack: train_eps 4/255, train_eps_ramp_steps 40, "
            "train_attack",
            "train_attack_steps 3, train_step_size default, robust_weight 2.5",
            "- Stage 1: 77 steps of batch 32",
            "augmentation crop_flip",
            "- Classifier training: objective adversarial; 55 steps of batch 16",
            "train_eps 6/255, train_eps_ramp_steps 0, train_attack fgsm_rs",
        ):
            self.assertIn(shown, text)
        # A config recorded before the ramp existed ran without one.
        path = os.path.join(workdir, "stage0", "config.json")
        with open(path) as f:
            recorded = json.load(f)
        del recorded["adversarial"]["train_eps_ramp_steps"]
        with open(path, "w") as f:
            json.dump(recorded, f)
        card = json.loads(json.dumps(model_card.build_card(
            sources, self.autoencoder, self.classifier, SIZE, None,
            provenance={"model_files": {}, "report": None},
        )))  # fmt: skip
        training = card["training"]
        self.assertEqual(training["classifier"]["inner_attack"]["train_eps_ramp_steps"], 0)
        # The class fixture's paper stage 2 has no stage-1 or classifier config beside it.
        paper = self._card(None)[0]["training"]
        self.assertEqual(paper["stage2"]["objective"], "paper")
        self.assertNotIn("inner_attack", paper["stage2"])
        self.assertEqual(paper["stage1"], model_card.UNKNOWN)
        self.assertEqual(paper["classifier"], model_card.UNKNOWN)

    def test_undecided_checks_are_not_called_not_run(self):
        self._write_report(_report(self.defended, _sha256(self.defended)))
        card, text = self._export()
        checks = card["evaluation"]["sanity_checks"]
        self.assertEqual(checks["passed"], 1)
        names = {
            status: [c["name"] for c in checks[status]] for status in checks if status != "passed"
        }
        self.assertEqual(
            names,
            {
                "failed": ["Restarts do not raise accuracy"],
                "undecided": ["bpda pgd does not beat white-box (8/255)"],
                "not run": ["SPSA below PGD"],
            },
        )
        self.assertIn("1 passed, 1 failed, 1 undecided, 1 not run.", text)
        self.assertIn("- FAILED: Restarts do not raise accuracy: 5% -> 9%", text)
        self.assertIn("- UNDECIDED: bpda pgd does not beat white-box (8/255): undecided: too", text)
        self.assertIn("- NOT RUN: SPSA below PGD: not run", text)
        self.assertNotIn("(not run)", text)

    def test_check_status(self):
        cases = (
            ({"passed": True}, "passed"),
            ({"passed": False, "detail": "FAIL"}, "failed"),
            ({"passed": None, "detail": "undecided: too few discordant pairs"}, "undecided"),
            ({"passed": None, "detail": "", "only_a": 0, "only_b": 1}, "undecided"),
            ({"passed": None, "detail": "not run"}, "not run"),
            ({"passed": None}, "not run"),
        )
        for check, status in cases:
            self.assertEqual(model_card.check_status(check), status, check)

    def test_provenance_is_by_content_not_by_path(self):
        same_bytes = self._other("copy/defended.keras")
        os.makedirs(os.path.dirname(same_bytes), exist_ok=True)
        shutil.copyfile(self.defended, same_bytes)
        other_bytes = hashlib.sha256(b"a model retrained in place").hexdigest()
        for document, expected, warning in (
            # Another path, the same bytes: the exported model was evaluated.
            (_report(same_bytes, _sha256(self.defended)), True, None),
            # The exported path, other bytes (retrained since): not this version's numbers.
            (_report(self.defended, other_bytes), False, "whose bytes (SHA-256) differ"),
            # No hashes recorded: unknown, said so.
            (_report(self.defended), None, "records no content hash"),
        ):
            path = self._write_report(document, self._other(f"report_{expected}.json"))
            card, text = self._card(path)
            self.assertIs(card["evaluation"]["evaluated_model_is_exported"], expected)
            if warning:
                self.assertIn("WARNING: the report", text)
                self.assertIn(warning, text)
            else:
                self.assertNotIn("WARNING", text)

    def test_convergence_is_shown(self):
        row = {
            "source": "surrogate",
            "converged": False,
            "more_steps": {"passed": False, "detail": "FAIL: the attack has not converged"},
            "more_restarts": {"passed": True, "detail": "fooled by a only: 0"},
        }
        for converged, shown in (
            (False, "Robust accuracy: NOT CONVERGED (more attack effort still fooled more"),
            (True, "Robust accuracy: converged"),
            (None, "Robust accuracy: convergence undecided"),
        ):
            document = _report(self.defended, _sha256(self.defended))
            document["results"].update(
                converged=converged, convergence={"8/255": dict(row, converged=converged)}
            )
            path = self._write_report(document, self._other(f"converged_{converged}.json"))
            card, text = self._card(path)
            self.assertIs(card["evaluation"]["converged"], converged)
            self.assertEqual(card["evaluation"]["convergence"]["8/255"]["source"], "surrogate")
            self.assertIn(shown, text)
            self.assertIn("  - more steps: FAIL: the attack has not converged", text)
        # With a second round, the first is shown as not deciding.
        rounds = dict(
            row,
            converged=None,
            deciding=["more_steps_x4", "more_restarts"],
            more_steps_x4={"passed": None, "detail": "undecided: too few discordant pairs"},
        )
        document = _report(self.defended, _sha256(self.defended))
        document["results"].update(converged=None, convergence={"8/255": rounds})
        card, text = self._card(self._write_report(document, self._other("rounds.json")))
        self.assertEqual(
            card["evaluation"]["convergence"]["8/255"]["deciding"],
            ["more_steps_x4", "more_restarts"],
        )
        self.assertIn("  - more steps (an earlier round, not deciding", text)
        self.assertIn("  - more steps x4: undecided", text)
        # A report from before the convergence verdict says so rather than guessing.
        path = self._write_report(_report(self.defended), self._other("old.json"))
        card, text = self._card(path)
        self.assertEqual(card["evaluation"]["converged"], model_card.NOT_EVALUATED)
        self.assertIn("Convergence: not evaluated.", text)

    def test_report_without_headline_or_checks(self):
        document = _report(self.defended)
        del document["results"]["headline"], document["checks"]
        card, _ = self._card(self._write_report(document, self._other("r.json")))
        self.assertEqual(card["evaluation"]["clean_accuracy"]["defended"], 0.9)
        self.assertEqual(card["evaluation"]["robust_accuracy"], model_card.NOT_EVALUATED)
        self.assertEqual(card["evaluation"]["sanity_checks"], model_card.NOT_EVALUATED)

    def test_top_level_headline_is_read(self):
        document = copy.deepcopy(_report(self.defended))
        document["headline"] = document["results"].pop("headline")
        card, _ = self._card(self._write_report(document, self._other("h.json")))
        self.assertEqual(card["evaluation"]["robust_accuracy"], document["headline"])

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
