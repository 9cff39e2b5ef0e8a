"""Tests for the ART cross-check of an exported defended model (`robustness.art_crosscheck`)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import tensorflow as tf
from absl import flags

from s2s_tf import config_io
from s2s_tf import crosscheck_main
from s2s_tf import data as data_lib
from s2s_tf import testing_utils
from s2s_tf.export import export_lib
from s2s_tf.robustness import art_crosscheck

SIZE = (16, 16)


class CrossCheckTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.dir = tempfile.mkdtemp()
        models = testing_utils.build_tiny_defended(SIZE)
        cls.classifier, cls.defended = models["classifier"], models["defended"]
        cls.purifier = models["purifier"]
        path = os.path.join(cls.dir, "defended.keras")
        cls.defended.save(path)
        cls.export_dir = export_lib.export(
            export_lib.ExportConfig(
                export_base=os.path.join(cls.dir, "export"),
                defended_path=path,
                warmup_batch_sizes=(1,),
            )
        )
        cls.images = np.random.default_rng(1).uniform(size=(12, *SIZE, 3)).astype(np.float32)
        # Labels the defended model gets right, so every example is attacked.
        cls.labels = np.argmax(cls.defended(cls.images), -1)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)
        super().tearDownClass()

    def test_views_match_the_models(self):
        views = art_crosscheck.export_views(self.export_dir)
        x = tf.constant(self.images[:4])
        self.assertAllClose(views["defended"](x), self.defended(x), atol=1e-5)
        self.assertAllClose(views["undefended"](x), self.classifier(x), atol=1e-5)
        # BPDA: the defended forward pass ...
        self.assertAllClose(views["bpda"](x), self.defended(x), atol=1e-5)
        # ... and the classifier's gradient at the purified images, the autoencoder as identity.
        with tf.GradientTape() as tape:
            tape.watch(x)
            bpda = tf.reduce_sum(views["bpda"](x) * tf.one_hot(self.labels[:4], 10))
        purified = tf.constant(self.purifier(x))
        with tf.GradientTape() as tape2:
            tape2.watch(purified)
            reference = tf.reduce_sum(self.classifier(purified) * tf.one_hot(self.labels[:4], 10))
        self.assertAllClose(tape.gradient(bpda, x), tape2.gradient(reference, purified), atol=1e-5)

    def test_not_an_export(self):
        folder = tempfile.mkdtemp(dir=self.dir)
        module = tf.Module()
        module.f = tf.function(lambda x: {"logits": x}, input_signature=[tf.TensorSpec(None)])
        tf.saved_model.save(module, folder, signatures={"serving_default": module.f})
        with self.assertRaisesRegex(ValueError, "not an s2s_tf export"):
            art_crosscheck.export_views(folder)

    def test_cascade(self):
        config = art_crosscheck.CrossCheckConfig(
            eps=16 / 255, steps=5, square_queries=20, batch_size=5
        )
        result = art_crosscheck.run(self.export_dir, self.images, self.labels, config)
        names = [row["run"] for row in result["runs"]]
        self.assertEqual(
            names,
            [
                f"{threat}/{attack}"
                for threat in art_crosscheck.THREAT_MODELS
                for attack in art_crosscheck.APGD_LOSSES
            ]
            + ["gradient_free/square"],
        )
        self.assertTrue(all(result["clean"]))
        # Each run attacks what the runs before it left robust.
        attacked = len(self.labels)
        for row in result["runs"]:
            self.assertEqual(row["attacked"], attacked)
            attacked -= row["fooled"]
        self.assertEqual(sum(result["robust"]), attacked)
        self.assertEqual(result["robust_accuracy"], attacked / len(self.labels))
        # The attacks work: a random tiny model does not resist 16/255 everywhere.
        self.assertLess(attacked, len(self.labels))

    def test_views_loaded_once_and_clean_given(self):
        views = art_crosscheck.export_views(self.export_dir)
        clean = art_crosscheck.clean_correct(views, self.images, self.labels, batch_size=5)
        self.assertTrue(all(clean))  # the labels are the defended model's own answers
        wrong = (self.labels + 1) % 10
        self.assertFalse(any(art_crosscheck.clean_correct(views, self.images, wrong)))
        # A clean mask given by the caller: the examples it marks wrong are neither attacked
        # nor robust.
        mask = clean.copy()
        mask[:4] = False
        config = art_crosscheck.CrossCheckConfig(
            eps=16 / 255,
            steps=2,
            square_queries=0,
            attacks=("apgd_ce",),
            threat_models=("white_box",),
            batch_size=5,
        )
        result = art_crosscheck.run(views, self.images, self.labels, config, clean=mask)
        self.assertEqual(result["runs"][0]["attacked"], len(self.labels) - 4)
        self.assertEqual(result["clean"], mask.tolist())
        self.assertFalse(any(result["robust"][:4]))
        with self.assertRaisesRegex(ValueError, "clean covers 3 examples"):
            art_crosscheck.run(views, self.images, self.labels, config, clean=mask[:3])

    def test_budget_guard(self):
        x = np.zeros((2, 4, 4, 3), np.float32)
        art_crosscheck._check_budget("ok", x, x + 0.1, 0.1)
        with self.assertRaisesRegex(RuntimeError, "breaks? the budget"):
            art_crosscheck._check_budget("bad", x, x + 0.2, 0.1)

    def test_config_validation(self):
        with self.assertRaisesRegex(ValueError, "eps"):
            art_crosscheck.CrossCheckConfig(eps=0.0).validate()
        with self.assertRaisesRegex(ValueError, "unknown attack"):
            art_crosscheck.CrossCheckConfig(eps=0.1, attacks=("fgsm",)).validate()
        with self.assertRaisesRegex(ValueError, "unknown threat model"):
            art_crosscheck.CrossCheckConfig(eps=0.1, threat_models=("surrogate",)).validate()

    def test_compare(self):
        ours = [True, True, False, False]
        self.assertTrue(art_crosscheck.compare(ours, [True, True, False, False])["passed"])
        lower = art_crosscheck.compare([False, True, False, False], ours)
        self.assertTrue(lower["passed"])  # ours below theirs: expected (the surrogate)
        self.assertEqual(lower["missed"], [])
        flattering = art_crosscheck.compare(ours, [True, False, False, False])
        self.assertFalse(flattering["passed"])
        self.assertEqual(flattering["missed"], [1])
        self.assertEqual((flattering["ours"], flattering["theirs"]), (0.5, 0.25))
        self.assertTrue(
            art_crosscheck.compare(ours, [True, False, False, False], tolerance=0.25)["passed"]
        )
        with self.assertRaisesRegex(ValueError, "different examples"):
            art_crosscheck.compare(ours, [True])

    def test_binary_rejects_bad_input_before_attacking(self):
        report = os.path.join(self.dir, "robustness.json")
        per_example = {"clean/defended": [1, 1], "white_box/apgd_ce/8/255": [1, 0]}
        with open(report, "w") as f:
            json.dump({"results": {"per_example": per_example, "headline": {"8/255": {}}}}, f)
        cases = [
            (["--report=" + os.path.join(self.dir, "missing.json")], "no file"),
            (["--eps=4/255"], r"no results at \['4/255'\]"),
            (["--num_examples=3"], r"num_examples must be in \[1, 2\]"),
            ([f"--export_dir={self.dir}"], "no saved_model.pb"),
        ]
        for overrides, message in cases:
            fv = flags.FlagValues()
            crosscheck_main.define_flags(fv)
            fv(
                ["s2s_crosscheck", f"--export_dir={self.export_dir}", f"--report={report}"]
                + overrides
            )
            with self.assertRaisesRegex(ValueError, message):
                crosscheck_main.check(fv)
        fv = flags.FlagValues()
        crosscheck_main.define_flags(fv)
        fv(["s2s_crosscheck", f"--export_dir={self.export_dir}", f"--report={report}"])
        checked = crosscheck_main.check(fv)
        self.assertEqual((checked.keys, checked.num_examples), (["8/255"], 2))
        self.assertEqual(checked.image_size, SIZE)  # the export's, from its model card
        self.assertEqual([c.eps for c in checked.configs], [8 / 255])
        with open(report, "w") as f:
            json.dump({"results": {}}, f)
        fv = flags.FlagValues()
        crosscheck_main.define_flags(fv)
        fv(["s2s_crosscheck", f"--export_dir={self.export_dir}", f"--report={report}"])
        with self.assertRaisesRegex(ValueError, "not a robustness.json"):
            crosscheck_main.check(fv)
        # Parse time: a bad budget, an unknown attack, a missing required flag.
        for argv in (["--eps=8/256x"], ["--attacks=fgsm"], []):
            fv = flags.FlagValues()
            crosscheck_main.define_flags(fv)
            base = [f"--export_dir={self.export_dir}"] + ([f"--report={report}"] if argv else [])
            with self.assertRaises(flags.IllegalFlagValueError):
                fv(["s2s_crosscheck", *base, *argv])

    def test_binary_fails_on_a_flattering_report(self):
        # A report that counts every example robust: ART disagrees (not even clean accuracy
        # is 100 % on the testing source's random labels), so the binary exits 1 and says which.
        data = data_lib.DataConfig(source="testing", split="test", image_size=SIZE)
        n = 6
        report = os.path.join(self.dir, "flattering", "robustness.json")
        os.makedirs(os.path.dirname(report))
        per_example = {"clean/defended": [1] * n, "white_box/apgd_ce/8/255": [1] * n}
        with open(report, "w") as f:
            json.dump(
                {
                    "config": {"data": config_io.config_to_dict(data)},
                    "results": {"per_example": per_example, "headline": {"8/255": {}}},
                },
                f,
            )
        argv = [
            sys.executable,
            "-m",
            "s2s_tf.crosscheck_main",
            f"--export_dir={self.export_dir}",
            f"--report={report}",
            "--steps=2",
            "--square_queries=5",
            "--threat_models=white_box",
            "--attacks=apgd_ce",
        ]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        self.assertEqual(out.returncode, 1, out.stderr[-2000:])
        self.assertIn("8/255: report 100.0%", out.stdout)
        self.assertIn("FAILED", out.stdout)
        with open(os.path.join(os.path.dirname(report), crosscheck_main.OUTPUT_FILE)) as f:
            written = json.load(f)["checks"]["8/255"]
        self.assertFalse(written["comparison"]["passed"])
        self.assertEqual(
            written["comparison"]["missed"],
            [i for i in range(n) if not written["art"]["robust"][i]],
        )
        self.assertEqual([row["run"] for row in written["art"]["runs"]][0], "white_box/apgd_ce")
        # A tolerance of 100 points passes the same comparison.
        passed = subprocess.run(
            [*argv, "--tolerance=1"], env=env, capture_output=True, text=True, timeout=600
        )
        self.assertEqual(passed.returncode, 0, passed.stderr[-2000:])
        self.assertIn("passed", passed.stdout)


if __name__ == "__main__":
    tf.test.main()
