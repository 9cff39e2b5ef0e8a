"""End-to-end tests of the export binary, run as `python -m s2s_tf.export.export_saved_model_main`.

Covers the default sources of a training workdir, refusing to overwrite a
version, SIGKILL during the export (no version directory appears, the next run
cleans up) and flags that must fail before any work.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import tensorflow as tf
from absl.testing import parameterized

from s2s_tf import constants
from s2s_tf.export import export_lib
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import classifiers
from s2s_tf.models import s2s_model

SIZE = (16, 16)
TIMEOUT_S = 120
MODULE = "s2s_tf.export.export_saved_model_main"


def _env(**extra):
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **extra)


def _run(args, cwd, **env):
    return subprocess.run(
        [sys.executable, "-m", MODULE, *args],
        cwd=cwd,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def _visible_versions(base):
    """What a model server polling `base` would consider loading (all-digit names)."""
    return sorted(n for n in os.listdir(base) if n.isdigit()) if os.path.isdir(base) else []


def _temp_dirs(base, complete):
    """The export's temporary version directories (only finished ones if `complete`)."""
    names = os.listdir(base) if os.path.isdir(base) else []
    paths = [os.path.join(base, n) for n in names if n.startswith(".tmp-")]
    if complete:
        config = os.path.join("assets.extra", export_lib.CONFIG_FILE)
        paths = [p for p in paths if os.path.exists(os.path.join(p, config))]
    return paths


def _wait_for(predicate, process, what):
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        if process.poll() is not None:
            raise AssertionError(f"export exited ({process.returncode}) before {what}")
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class ExportMainTest(tf.test.TestCase, parameterized.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.dir = tempfile.mkdtemp()
        cls.workdir = os.path.join(cls.dir, "workdir")
        os.makedirs(os.path.join(cls.workdir, "stage2"))
        autoencoder = ae_lib.build_autoencoder(
            ae_lib.AutoencoderConfig(stage_widths=((4,), (8,))), input_shape=(*SIZE, 3)
        )
        classifier = classifiers.build_classifier_with_preprocessing("testing", SIZE, 10)
        defended = s2s_model.build_s2s_model(autoencoder, classifier)
        defended.save(constants.defended_path(cls.workdir))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)
        super().tearDownClass()

    def setUp(self):
        super().setUp()
        self.cwd = tempfile.mkdtemp(dir=self.dir)

    def test_workdir_defaults_and_no_silent_overwrite(self):
        base = os.path.join(self.cwd, "export")
        first = _run([f"--workdir={self.workdir}", f"--export_base={base}"], self.cwd)
        self.assertEqual(first.returncode, 0, first.stderr[-3000:])
        version = os.path.join(base, "1")
        self.assertEqual(first.stdout.strip().splitlines()[-1], version)
        self.assertTrue(tf.saved_model.contains_saved_model(version))
        self.assertTrue(os.path.exists(os.path.join(base, "models.config")))
        self.assertTrue(os.path.exists(os.path.join(base, "batching_parameters")))
        marker = os.path.join(version, "marker")
        open(marker, "w").close()
        again = _run(
            [f"--workdir={self.workdir}", f"--export_base={base}", "--version=1"], self.cwd
        )
        self.assertNotEqual(again.returncode, 0)
        self.assertIn("version exists", again.stderr)
        self.assertTrue(os.path.exists(marker))
        self.assertEqual(_visible_versions(base), ["1"])

    @parameterized.named_parameters(("while_writing", False), ("before_rename", True))
    def test_killed_export_leaves_no_version(self, complete):
        base = os.path.join(self.cwd, "export")
        args = [f"--workdir={self.workdir}", f"--export_base={base}"]
        process = subprocess.Popen(
            [sys.executable, "-m", MODULE, *args],
            cwd=self.cwd,
            env=_env(**{export_lib.PAUSE_ENV: "600"}),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_for(lambda: _temp_dirs(base, complete), process, "a temporary version")
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=TIMEOUT_S)
        self.assertEqual(_visible_versions(base), [])
        leftovers = [n for n in os.listdir(base) if n.startswith(".tmp-")]
        self.assertLen(leftovers, 1)
        rerun = _run(args, self.cwd)
        self.assertEqual(rerun.returncode, 0, rerun.stderr[-3000:])
        self.assertEqual(_visible_versions(base), ["1"])
        self.assertEmpty([n for n in os.listdir(base) if n.startswith(".")])

    @parameterized.named_parameters(
        ("out_of_range", ["--out_of_range=wrap"], "out_of_range"),
        ("both_sources", ["--defended_path=d.keras", "--autoencoder_path=a.keras"], "not both"),
        ("half_parts", ["--autoencoder_path=a.keras"], "go together"),
        (
            "init_from_and_autoencoder",
            ["--init_from=s.npz", "--autoencoder_path=a.keras"],
            "not both",
        ),
        ("init_from_alone", ["--init_from=s.npz"], "go together"),
        ("image_size", ["--image_size=0"], "image_size"),
        ("missing_model", ["--defended_path=missing.keras"], "not found"),
    )
    def test_bad_flags_fail_before_work(self, extra, message):
        base = os.path.join(self.cwd, "export")
        args = [f"--export_base={base}"] + extra
        if not any(a.startswith(("--defended_path", "--autoencoder_path")) for a in extra):
            args.append(f"--workdir={self.workdir}")
        result = _run(args, self.cwd)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(message, result.stderr)
        self.assertFalse(os.path.exists(base))


if __name__ == "__main__":
    tf.test.main()
