"""End-to-end test of the evaluation run and its report, and of the evaluate binary's flags."""

import hashlib
import json
import os
import subprocess
import sys
import tempfile

import tensorflow as tf
from absl.testing import parameterized

from s2s_tf import data as data_lib
from s2s_tf import testing_utils
from s2s_tf.analysis import verdicts
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import s2s_model
from s2s_tf.robustness import eval_lib
from s2s_tf.robustness import evaluation
from s2s_tf.robustness import runner
from s2s_tf.train import checkpointing

SIZE = (16, 16)


def _run_evaluate_main(*argv, timeout):
    """The evaluate binary in a fresh process, run from outside the checkout (as installed)."""
    return subprocess.run(
        [sys.executable, "-m", "s2s_tf.evaluate_main", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=tempfile.gettempdir(),
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )


class EvaluateTest(tf.test.TestCase):
    def test_report_files_and_consistent_numbers(self):
        workdir = tempfile.mkdtemp()
        paths = testing_utils.save_tiny_models(workdir, SIZE)
        # lenet5 with an S2SNet of its own (its own autoencoder), for claim 5's defended group.
        lenet5 = s2s_model.load_keras(paths["lenet5"], "lenet5")
        own_ae = ae_lib.build_autoencoder(
            ae_lib.AutoencoderConfig(stage_widths=((4,), (8,))), input_shape=(*SIZE, 3)
        )
        lenet5_s2s = checkpointing.save_keras_atomic(
            s2s_model.build_s2s_model(own_ae, lenet5), os.path.join(workdir, "lenet5_s2s.keras")
        )
        config = eval_lib.EvalRunConfig(
            # Not the model's size: the evaluation runs at the model's and records that.
            data=data_lib.DataConfig(source="testing", split="test", image_size=(20, 20)),
            defended_path=paths["defended"],
            transfer_defended=(("lenet5", lenet5_s2s),),
            baselines=("bit_depth",),
            relations_examples=6,
            attack=evaluation.EvalConfig(
                attacks=("fgsm", "pgd"),
                eps=(8 / 255,),
                num_examples=12,
                batch_size=6,
                steps=2,
                gradient_free_examples=3,
                surrogate_temperatures=(1.0,),
            ),
            gradient_examples=6,
            gradient_top_k=3,
        )
        outdir = os.path.join(workdir, "eval_report")
        document = eval_lib.evaluate(config, outdir, progress=lambda message: None)
        for name in ("robustness.json", "report.md", "accuracy_vs_eps.png", "examples.png"):
            self.assertTrue(os.path.exists(os.path.join(outdir, name)), name)
        self.assertTrue(os.path.exists(os.path.join(outdir, "gradient_histograms.png")))
        self.assertTrue(os.listdir(os.path.join(outdir, "tensorboard")))
        with open(os.path.join(outdir, "robustness.json")) as f:
            saved = json.load(f)
        self.assertEqual(saved["results"]["clean"], document["results"]["clean"])
        self.assertEqual(saved["config"]["data"]["image_size"], list(SIZE))
        # The evaluated bytes, which the export's model card compares with the exported ones.
        for path in (paths["defended"], lenet5_s2s):
            with open(path, "rb") as f:
                self.assertEqual(saved["model_files"][path], hashlib.sha256(f.read()).hexdigest())
        # The report's clean accuracy is the defended model's accuracy on the same examples.
        images, labels = data_lib.load_numpy(
            data_lib.DataConfig(source="testing", split="test", image_size=SIZE, num_examples=12)
        )
        defended = s2s_model.load_keras(paths["defended"], "defended")
        expected = runner.accuracy(defended, images, labels)
        self.assertAlmostEqual(saved["results"]["clean"]["defended"], expected)
        with open(os.path.join(outdir, "report.md")) as f:
            markdown = f.read()
        self.assertIn(f"| defended | {100 * expected:.1f}% |", markdown)
        self.assertIn("## Sanity checks", markdown)
        self.assertEqual(
            set(saved["results"]["transfer"]["matrix"]),
            {"classifier", "defended", "lenet5", "lenet5+s2s"},
        )
        self.assertEqual(set(saved["gradients"]), {"classifier", "defended"})
        for check in saved["checks"]:
            self.assertIn(check["passed"], (True, False, None))
            word = {True: "PASS", False: "**FAIL**", None: "undecided"}[check["passed"]]
            self.assertIn(f"| {word} | {check['name']} |", markdown)
        # The headline is the per-example worst case, never above any single run.
        headline = saved["results"]["headline"]["8/255"]
        for by_eps in saved["results"]["threats"]["white_box"].values():
            row = by_eps["8/255"]  # cascade runs report robust_after, full runs defended
            self.assertLessEqual(
                headline["robust_accuracy"], row.get("defended", row.get("robust_after"))
            )
        self.assertIn("## Robust accuracy (per-example worst case", markdown)
        # The claims: every status and the README text are recomputed from the JSON alone.
        self.assertEqual(saved["counterfactual"]["num_images"], 6)
        recomputed = verdicts.claims(saved)
        for number, entry in recomputed.items():
            self.assertIn(f"| {number} | {entry['status'] or 'not run'} |", markdown)
        self.assertIn("> " + verdicts.readme_text(saved), markdown)
        self.assertEqual(
            recomputed["2"]["status"],
            verdicts.claims(document)["2"]["status"],
        )
        self.assertIn(
            f"white_box/{config.attack.check_attack}/8/255", saved["effective_perturbations"]
        )
        # Claim 4: the baseline ran on the same examples, without surrogate or end-to-end runs.
        baseline = saved["baselines"]["bit_depth"]
        self.assertEqual(baseline["results"]["num_examples"], 12)
        self.assertNotIn("white_box", baseline["threat_models"])
        self.assertNotIn("surrogate", baseline["threat_models"])
        self.assertIn("bpda", baseline["threat_models"])
        self.assertIn("| bit_depth (bit-depth reduction to 4 bits) |", markdown)
        # Claim 5: undefended and defended groups; the defended rows made through surrogates.
        relations = saved["relations"]
        self.assertEqual(set(relations["rows"]["8/255"]), {"classifier", "lenet5"})
        self.assertEqual(set(relations["surrogate_rows"]["8/255"]), {"defended", "lenet5+s2s"})
        self.assertEqual(
            relations["groups"]["defended"]["self_accuracy"]["lenet5+s2s"]["8/255"],
            relations["surrogate_rows"]["8/255"]["lenet5+s2s"]["lenet5+s2s"],
        )
        self.assertIn(relations["statement"], markdown)
        for name in ("effective_examples.png", "effective_norms.png"):
            self.assertTrue(os.path.exists(os.path.join(outdir, name)), name)

    def test_explicit_image_size_must_match_the_model(self):
        # Without --image_size the evaluation runs at the model's size (the test above); an
        # explicit one that differs is refused before any attack, by the binary too.
        workdir = tempfile.mkdtemp()
        paths = testing_utils.save_tiny_models(workdir, SIZE)
        output_dir = os.path.join(workdir, "report")
        result = _run_evaluate_main(
            f"--defended_path={paths['defended']}",
            "--dataset=testing",
            "--image_size=20",
            "--num_examples=4",
            f"--output_dir={output_dir}",
            timeout=300,
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(
            "--image_size 20 differs from the defended model's input size 16", result.stderr
        )
        self.assertFalse(os.path.exists(os.path.join(output_dir, "shards")))

    def test_missing_model_is_named(self):
        config = eval_lib.EvalRunConfig(defended_path="/nonexistent/defended.keras")
        with self.assertRaisesRegex(FileNotFoundError, "defended.keras"):
            config.validate()


class EvaluateMainFlagsTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.named_parameters(
        ("no_models", ["--workdir=/nonexistent"], "workdir"),
        ("bad_attack", ["--attacks=pgd,deepfool"], "attacks"),
        ("bad_eps", ["--eps=8/0"], "eps"),
        ("eps_range", ["--eps=300/255"], "eps"),
        ("bad_threat", ["--threat_models=black_box"], "threat_models"),
        ("bad_transfer", ["--transfer_classifiers=nopath"], "transfer_classifiers"),
    )
    def test_bad_flags_fail_at_parse_time(self, argv, flag_name):
        workdir = tempfile.mkdtemp()
        stage2 = os.path.join(workdir, "stage2")
        os.makedirs(stage2)
        with open(os.path.join(stage2, "defended.keras"), "w") as f:
            f.write("placeholder: flags fail before any model is read")
        output_dir = os.path.join(workdir, "report")
        result = _run_evaluate_main(
            f"--workdir={workdir}", f"--output_dir={output_dir}", *argv, timeout=120
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(flag_name, result.stderr)
        self.assertFalse(os.path.exists(output_dir))


if __name__ == "__main__":
    tf.test.main()
