"""End-to-end: the whole pipeline on a tiny configuration, its artefacts and their consistency."""

import dataclasses
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import tensorflow as tf

from s2s_tf import data as data_lib
from s2s_tf import pipeline
from s2s_tf import robust_pipeline
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.robustness import evaluation
from s2s_tf.train import adversarial

TINY = pipeline.PipelineConfig(
    data=data_lib.DataConfig(source="testing", image_size=(16, 16), global_batch_size=8),
    classifier="testing",
    transfer_classifier="lenet5",
    autoencoder=ae_lib.AutoencoderConfig(stage_widths=((4,), (8,))),
    classifier_steps=4,
    stage1_steps=4,
    stage2_steps=4,
    steps_per_loop=2,
    eval_examples=16,
    effective_examples=5,
    attack=evaluation.EvalConfig(
        attacks=("fgsm", "pgd"),
        eps=(8 / 255,),
        num_examples=16,
        batch_size=8,
        steps=2,
        gradient_free_examples=2,
    ),
)


class PipelineTest(tf.test.TestCase):
    def test_tiny_pipeline_artefacts_are_complete_and_consistent(self):
        workdir = tempfile.mkdtemp()
        printed = []
        outputs = pipeline.run(TINY, workdir, tf.distribute.get_strategy(), printed.append)
        expected = [
            "stage0/classifier.keras",
            "transfer_lenet5/stage0/classifier.keras",
            "stage1/autoencoder.keras",
            "stage2/autoencoder.keras",
            "stage2/defended.keras",
            "stage2/config.json",
            "eval_report/robustness.json",
            "eval_report/report.md",
            "eval_report/accuracy_vs_eps.png",
            "eval_report/gradient_histograms.png",
            "eval_report/examples.png",
            "export/models.config",
            "export/batching_parameters",
            "export/1/saved_model.pb",
            "export/1/assets.extra/tf_serving_warmup_requests",
        ]
        for path in expected:
            self.assertTrue(os.path.exists(os.path.join(workdir, path)), path)
        for kind in ("train", "eval"):
            self.assertTrue(os.listdir(os.path.join(workdir, kind, "stage2")), kind)
        self.assertEqual(outputs["export"], os.path.join(workdir, "export", "1"))
        headline = "\n".join(printed)
        self.assertIn("per-example worst case over every attack", headline)
        with open(os.path.join(workdir, "eval_report", "robustness.json")) as f:
            worst = json.load(f)["results"]["headline"]
        for eps, row in worst.items():
            self.assertIn(f"| {eps} | {100 * row['robust_accuracy']:.1f}% |", headline)
        self.assertTrue(
            os.path.exists(os.path.join(workdir, "export/1/assets.extra/model_card.json"))
        )

        # The report's clean accuracy is the exported model's accuracy on the same examples.
        with open(os.path.join(workdir, "eval_report", "robustness.json")) as f:
            report = json.load(f)
        images, labels = data_lib.load_numpy(
            dataclasses.replace(TINY.data, split="test", augment=False, num_examples=16)
        )
        served = tf.saved_model.load(outputs["export"]).signatures["serving_default"]
        classes = served(images=tf.constant(images))["classes"].numpy()
        self.assertAlmostEqual(
            report["results"]["clean"]["defended"], float(np.mean(classes == labels))
        )
        # Claim 3 ran on the configured examples (the default, 32, would read all 16).
        effective = report["effective_perturbations"]
        self.assertTrue(effective)
        self.assertEqual({row["num_examples"] for row in effective.values()}, {5})

        # A rerun reuses every finished part.
        again = pipeline.run(TINY, workdir, tf.distribute.get_strategy(), lambda line: None)
        self.assertEqual(again["export"], outputs["export"])
        self.assertLess(again["seconds"], outputs["seconds"])

    def test_robust_pipeline_trains_evaluates_and_tabulates_four_models(self):
        workdir = tempfile.mkdtemp()
        config = dataclasses.replace(
            TINY,
            transfer_classifier="",
            robust=True,
            robust_stage2_steps=2,
            robust_classifier_steps=2,
            classifier_augment="crop",
            data=dataclasses.replace(TINY.data, augment="crop"),
            adversarial=adversarial.AdversarialConfig(
                train_attack_steps=2, robust_check_examples=8, robust_check_steps=2
            ),
        )
        printed = []
        outputs = robust_pipeline.run(config, workdir, tf.distribute.get_strategy(), printed.append)
        for path in (
            "robust/stage2/defended.keras",
            "madry/stage0/classifier.keras",
            "eval_classifier/robustness.json",
            "eval_report/robustness.json",
            "robust/eval_report/robustness.json",
            "madry/eval_report/robustness.json",
            "robust/export/1/saved_model.pb",
            "robust/export/1/assets.extra/model_card.json",
            "export/1/saved_model.pb",
        ):
            self.assertTrue(os.path.exists(os.path.join(workdir, path)), path)
        with open(os.path.join(workdir, "robust", "stage2", "config.json")) as f:
            stage2 = json.load(f)
        self.assertEqual(stage2["stage2_objective"], "adversarial")
        self.assertEqual(stage2["train_data"]["augment"], "crop")
        self.assertAlmostEqual(stage2["adversarial"]["train_eps"], 8 / 255)
        with open(os.path.join(workdir, "madry", "stage0", "config.json")) as f:
            madry = json.load(f)
        self.assertEqual(madry["stage0_objective"], "adversarial")
        self.assertEqual(madry["train_data"]["augment"], "crop")
        with open(os.path.join(workdir, "madry", "stage0", "result.json")) as f:
            self.assertIn("robust_check", json.load(f))

        # Each row of the table is its model's own report.
        with open(os.path.join(workdir, robust_pipeline.SUMMARY_FILE)) as f:
            rows = json.load(f)
        self.assertEqual(list(rows), [key for key, _ in robust_pipeline.MODELS])
        table = "\n".join(printed)
        for key, row in rows.items():
            with open(row["report"]) as f:
                results = json.load(f)["results"]
            self.assertEqual(row["clean"], results["clean"]["defended"])
            self.assertEqual(row["headline"], results["headline"])
            eps = "8/255"
            h = results["headline"][eps]
            cell = f"{100 * h['robust_accuracy']:.1f}% ({100 * h['ci95'][0]:.1f}-"
            self.assertIn(f"| {row['title']} | {100 * row['clean']:.1f}% | {cell}", table)
            self.assertIsNotNone(row["train_seconds"], key)
            self.assertIsNotNone(row["eval_seconds"], key)
        # An undefended classifier is attacked white-box and gradient-free only.
        with open(rows["madry"]["report"]) as f:
            runs = json.load(f)["results"]["headline"]["8/255"]["runs"]
        self.assertTrue(runs)
        threats = {r.split("/")[0] for r in runs}
        self.assertIn("white_box", threats)
        self.assertEmpty(threats & {"gray_box", "bpda", "surrogate", "transfer"})
        self.assertEqual(outputs["robust_export"], os.path.join(workdir, "robust", "export", "1"))

        again = robust_pipeline.run(config, workdir, tf.distribute.get_strategy(), lambda _: None)
        self.assertLess(again["seconds"], outputs["seconds"])
        self.assertEqual(again["robust_export"], outputs["robust_export"])

    def test_a_budget_ramp_longer_than_a_robust_run_fails_before_any_work(self):
        root = tempfile.mkdtemp()
        workdir = os.path.join(root, "workdir")
        argv = [
            sys.executable,
            "-m",
            "s2s_tf.pipeline_main",
            f"--workdir={workdir}",
            "--dataset=testing",
            "--classifier=testing",
            "--image_size=16",
            "--robust",
            "--robust_stage2_steps=40",
            "--robust_classifier_steps=30",
            "--train_eps_ramp_steps=35",
        ]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        result = subprocess.run(
            argv, cwd=root, env=env, capture_output=True, text=True, timeout=300
        )
        self.assertNotEqual(result.returncode, 0, result.stderr)
        self.assertIn(
            "train_eps_ramp_steps (35) exceeds robust_classifier_steps (30)", result.stderr
        )
        self.assertEqual(os.listdir(root), [], "the failed run wrote files")


if __name__ == "__main__":
    tf.test.main()
