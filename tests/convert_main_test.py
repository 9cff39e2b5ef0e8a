"""Tests for the checkpoint converter binary: its flags and end-to-end runs."""

import os
import subprocess
import sys
import tempfile

import numpy as np
import tensorflow as tf
from absl import flags
from absl.testing import parameterized

from s2s_tf.flags import convert_flags
from s2s_tf.models import torch_convert

TESTDATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata")
STATE_PATH = os.path.join(TESTDATA, "segnet_fixture_state.npz")
REFERENCE_PATH = os.path.join(TESTDATA, "segnet_fixture_reference.npz")
GOOD_ARGV = [f"--checkpoint={STATE_PATH}", "--output=x.keras"]


def _run(*argv):
    """Runs the binary outside the checkout, so `-m` imports the package under test."""
    return subprocess.run(
        [sys.executable, "-m", "s2s_tf.convert_main", *argv],
        cwd=tempfile.mkdtemp(),
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


class ConvertFlagsTest(tf.test.TestCase, parameterized.TestCase):
    """Flag validation, in a private `FlagValues` (other binaries' flags live in FLAGS)."""

    def parse(self, *argv):
        values = flags.FlagValues()
        convert_flags.define_convert_flags(torch_convert.CHECKPOINT_SUFFIXES, values)
        values(["convert_main", *argv])
        return values

    def test_good_flags(self):
        out = os.path.join(self.get_temp_dir(), "ae.keras")
        values = self.parse(
            f"--checkpoint={STATE_PATH}",
            f"--output={out}",
            "--image_size=256",
            "--skip_prefixes=a.,b.",
        )
        self.assertEqual((values.image_size, values.skip_prefixes), ("256", ["a.", "b."]))
        self.assertEqual(values.pool_impl, "native")

    @parameterized.named_parameters(
        ("no_checkpoint", ["--output=x.keras"], "checkpoint"),
        ("no_output", [f"--checkpoint={STATE_PATH}"], "output"),
        ("absent_checkpoint", ["--checkpoint=/absent/s2s.pth", "--output=x.keras"], "not exist"),
        ("bad_suffix", [f"--checkpoint={REFERENCE_PATH}.ckpt", "--output=x.keras"], ".npz"),
        ("output_not_keras", [f"--checkpoint={STATE_PATH}", "--output=x.h5"], ".keras"),
        ("bad_image_size", [*GOOD_ARGV, "--image_size=0"], "image_size"),
        ("bad_pool_impl", [*GOOD_ARGV, "--pool_impl=fast"], "pool_impl"),
    )
    def test_bad_flags_are_rejected_at_parse_time(self, argv, pattern):
        with self.assertRaisesRegex(flags.Error, pattern):
            self.parse(*argv)

    def test_existing_output_needs_overwrite(self):
        out = os.path.join(self.get_temp_dir(), "exists.keras")
        open(out, "wb").close()
        with self.assertRaisesRegex(flags.Error, "--overwrite"):
            self.parse(f"--checkpoint={STATE_PATH}", f"--output={out}")
        self.assertTrue(self.parse(f"--checkpoint={STATE_PATH}", f"--output={out}", "--overwrite"))


class ConvertMainTest(tf.test.TestCase):
    def test_converts_the_fixture_end_to_end(self):
        out = os.path.join(self.get_temp_dir(), "models", "autoencoder.keras")
        result = _run(f"--checkpoint={STATE_PATH}", f"--output={out}", "--image_size=32")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip().splitlines()[-1], out)
        model = torch_convert.load_autoencoder(out)
        self.assertEqual(model.input_shape, (None, 32, 32, 3))
        with np.load(REFERENCE_PATH) as reference:
            images = np.transpose(reference["input"], (0, 2, 3, 1))
            expected = np.transpose(reference["output"], (0, 2, 3, 1))
        self.assertAllClose(model(images, training=False), expected, atol=1e-5, rtol=0)

    def test_malformed_checkpoint_fails_with_the_tensor_name_and_writes_nothing(self):
        bad = os.path.join(self.get_temp_dir(), "bad.npz")
        with np.load(STATE_PATH) as state:
            np.savez(bad, **{k: state[k] for k in state.files if k != "decoder.conv_final.bias"})
        out = os.path.join(self.get_temp_dir(), "bad.keras")
        result = _run(f"--checkpoint={bad}", f"--output={out}")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("missing tensor 'decoder.conv_final.bias'", result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertFalse(os.path.exists(out))

    def test_bad_flag_fails_before_any_work(self):
        out = os.path.join(self.get_temp_dir(), "never", "ae.h5")
        result = _run(f"--checkpoint={STATE_PATH}", f"--output={out}")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("--output must end with .keras", result.stderr)
        self.assertFalse(os.path.exists(os.path.dirname(out)))


if __name__ == "__main__":
    tf.test.main()
