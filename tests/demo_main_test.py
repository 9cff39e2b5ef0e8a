"""Tests for the demo binary: a tiny end-to-end run and flags that fail before any work."""

import json
import os
import subprocess
import sys
import tempfile

import tensorflow as tf
from absl import flags
from absl.testing import flagsaver
from absl.testing import parameterized

from s2s_tf import demo_main

FLAGS = flags.FLAGS
TINY_FLAGS = dict(
    dataset="testing",
    classifier="testing",
    num_classes=10,
    image_size="16",
    batch_size=4,
    ae_stage_widths="4;8",
    ae_stages=2,
)


def setUpModule():
    if "ae_stages" not in FLAGS:
        demo_main.define_flags()
    FLAGS(["demo_main"])  # parse defaults; the tests override values with flagsaver


class DemoMainTest(tf.test.TestCase, parameterized.TestCase):
    def test_tiny_run_writes_config_and_summary(self):
        workdir = tempfile.mkdtemp()
        with flagsaver.flagsaver(workdir=workdir, **TINY_FLAGS):
            demo_main.main(["demo_main"])
        with open(os.path.join(workdir, "summary.json")) as f:
            summary = json.load(f)
        with open(os.path.join(workdir, "config.json")) as f:
            config = json.load(f)
        self.assertEqual(summary["batch_shape"], [4, 16, 16, 3])
        self.assertEqual(summary["logits_shape"], [4, 10])
        self.assertEqual(
            summary["defended_params"],
            summary["autoencoder_params"] + summary["classifier_params"],
        )
        self.assertEqual(config["autoencoder"]["stage_widths"], [[4], [8]])
        self.assertEqual(config["data"]["source"], "testing")

    def test_config_from_flags_maps_tfds_names(self):
        with flagsaver.flagsaver(**{**TINY_FLAGS, "dataset": "tfds:x"}):
            config = demo_main.config_from_flags()
        self.assertEqual(config.data.source, "tfds:x")  # data.load_source resolves the prefix

    @parameterized.named_parameters(
        ("unknown_classifier", ["--classifier=resnet9000"], "classifier"),
        ("unknown_dataset", ["--dataset=mnistx"], "dataset"),
        ("bad_widths", ["--ae_stage_widths=64,x"], "ae_stage_widths"),
        ("too_many_stages", ["--ae_stage_widths=8;16", "--ae_stages=3"], "ae_stages"),
        ("bad_image_size", ["--image_size=0"], "image_size"),
        ("folder_without_path", ["--dataset=folder"], "image_folder"),
        ("zero_batch", ["--batch_size=0"], "batch_size"),
    )
    def test_bad_flags_fail_before_any_work(self, argv, flag_name):
        workdir = os.path.join(tempfile.mkdtemp(), "never_created")
        result = subprocess.run(
            [sys.executable, "-m", "s2s_tf.demo_main", f"--workdir={workdir}", *argv],
            # Outside the checkout, so `-m` imports the package under test, not the sources.
            cwd=tempfile.gettempdir(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(flag_name, result.stderr)
        self.assertFalse(os.path.exists(workdir))


if __name__ == "__main__":
    tf.test.main()
