"""End-to-end tests of the training binary, run as `python -m s2s_tf.train_main`.

Covers resuming after SIGKILL, SIGTERM preemption (exit 143), rerunning a
finished stage, the stage0 -> stage1 -> stage2 chain with its TensorBoard
summaries, and flags that must fail before any work.
"""

import gzip
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from s2s_tf import constants
from s2s_tf.models import s2s_model

TINY_ARGS = (
    "--dataset=testing",
    "--classifier=testing",
    "--num_classes=10",
    "--ae_stage_widths=4;8",
    "--ae_stages=2",
    "--image_size=16",
    "--batch_size=8",
)
# Long enough to be killed mid-run, short enough to finish in seconds: one step
# per call, a checkpoint every 5 steps, evaluation and image summaries only at the end.
LONG_RUN_STEPS = 200
LONG_RUN_ARGS = (
    f"--train_steps={LONG_RUN_STEPS}",
    "--steps_per_loop=1",
    "--checkpoint_every=5",
    f"--eval_every={LONG_RUN_STEPS}",
    f"--summary_every={LONG_RUN_STEPS}",
)
TIMEOUT_S = 180
ITERATIONS_KEY = "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"
LOG_LINE = re.compile(r"^([IWEF]\d{4} |INFO:|WARNING|Traceback)")
CHECKPOINT_FILE = re.compile(r"^ckpt-(\d+)\.(index|data-\d{5}-of-\d{5})$")


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def _command(workdir, stage, *extra):
    argv = [sys.executable, "-m", "s2s_tf.train_main"]
    if stage is not None:
        argv.append(f"--stage={stage}")
    if workdir is not None:
        argv.append(f"--workdir={workdir}")
    return argv + list(extra)


def _run(argv, cwd):
    """Runs the binary to completion in `cwd` (outside the checkout: the installed package runs)."""
    return subprocess.run(
        argv,
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def _checkpoint_dir(workdir, stage="stage1"):
    return os.path.join(workdir, stage, "checkpoints")


def _step_of(path):
    return int(path.rsplit("-", 1)[-1])


def _latest_step(checkpoint_dir):
    """The step of the latest listed checkpoint, or 0 (tolerates a state file being replaced)."""
    try:
        latest = tf.train.latest_checkpoint(checkpoint_dir)
    except (tf.errors.OpError, ValueError):
        return 0
    return _step_of(latest) if latest else 0


def _iterations(checkpoint_path):
    return int(tf.train.load_checkpoint(checkpoint_path).get_tensor(ITERATIONS_KEY))


def _progress_steps(log, stage, total):
    return [int(s) for s in re.findall(rf"{stage} step (\d+)/{total} ", log)]


def _read_json(*parts):
    with open(os.path.join(*parts), encoding="utf-8") as f:
        return json.load(f)


def _error_text(stderr):
    """stderr without log lines and traceback frames: a flag name in source code does not count."""
    return "\n".join(
        line
        for line in stderr.splitlines()
        if line and not line[0].isspace() and not LOG_LINE.match(line)
    )


def _tree(root):
    """Every path under `root`, relative to it."""
    found = set()
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            found.add(os.path.relpath(os.path.join(base, name), root))
    return found


def _events(logdir):
    """{tag: (plugin name, sorted steps)} over every event file in `logdir`."""
    files = tf.io.gfile.glob(os.path.join(logdir, "events.out.tfevents.*"))
    tags = {}
    for path in files:
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                plugin = value.metadata.plugin_data.plugin_name
                tags.setdefault(value.tag, (plugin, []))[1].append(event.step)
    return {tag: (plugin, sorted(steps)) for tag, (plugin, steps) in tags.items()}


def _stop(proc):
    """Kills a run a failed test left behind (only the process the test started)."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=TIMEOUT_S)


def _write_idx(path, array, magic):
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


class TrainMainTest(tf.test.TestCase, parameterized.TestCase):
    def _new_tempdir(self):
        path = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, path, ignore_errors=True)
        return path

    def _run(self, argv):
        return _run(argv, self._new_tempdir())

    def _start_and_wait_for_checkpoint(self, workdir, min_step, log_path):
        """Starts a long stage-1 run; returns it once a checkpoint >= min_step is listed."""
        argv = _command(workdir, "stage1", *TINY_ARGS, *LONG_RUN_ARGS)
        cwd = self._new_tempdir()
        # Output to a file: a full pipe would stall the run. The child keeps its own handle.
        with open(log_path, "w", encoding="utf-8") as log:
            proc = subprocess.Popen(argv, cwd=cwd, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        self.addCleanup(_stop, proc)
        deadline = time.monotonic() + TIMEOUT_S
        while _latest_step(_checkpoint_dir(workdir)) < min_step:
            if proc.poll() is not None:
                with open(log_path, encoding="utf-8") as f:
                    self.fail(f"run exited with {proc.returncode} before a checkpoint:\n{f.read()}")
            if time.monotonic() > deadline:
                self.fail("no checkpoint in time")
            time.sleep(0.01)
        self.assertIsNone(proc.poll(), "the run finished before it could be interrupted")
        return argv, proc

    def _assert_checkpoints_consistent(self, workdir, final_step):
        """Every listed checkpoint restores at its own step; nothing else is in the folder."""
        directory = _checkpoint_dir(workdir)
        state = tf.train.get_checkpoint_state(directory)
        self.assertIsNotNone(state)
        listed = [_step_of(p) for p in state.all_model_checkpoint_paths]
        self.assertEqual(_step_of(state.model_checkpoint_path), final_step)
        self.assertEqual(listed[-1], final_step)
        for path in state.all_model_checkpoint_paths:
            self.assertEqual(_iterations(path), _step_of(path), path)
        for name in os.listdir(directory):
            if name == "checkpoint":
                continue
            match = CHECKPOINT_FILE.match(name)
            self.assertIsNotNone(match, f"unexpected file {name} in {directory}")
            self.assertIn(int(match.group(1)), listed, f"unlisted checkpoint file {name}")

    def test_rerun_after_sigkill_resumes_from_last_checkpoint(self):
        workdir = self._new_tempdir()
        argv, proc = self._start_and_wait_for_checkpoint(
            workdir, 10, os.path.join(self._new_tempdir(), "killed.log")
        )
        os.kill(proc.pid, signal.SIGKILL)
        self.assertEqual(proc.wait(timeout=TIMEOUT_S), -signal.SIGKILL)
        killed_at = _latest_step(_checkpoint_dir(workdir))
        self.assertBetween(killed_at, 10, LONG_RUN_STEPS - 1)
        killed_checkpoint = tf.train.latest_checkpoint(_checkpoint_dir(workdir))
        self.assertEqual(_iterations(killed_checkpoint), killed_at)
        self.assertFalse(
            os.path.exists(os.path.join(workdir, "stage1", constants.AUTOENCODER_FILE))
        )

        rerun = self._run(argv)  # the same command

        self.assertEqual(rerun.returncode, 0, rerun.stderr)
        self.assertIn(f"resumed from checkpoint at step {killed_at}/{LONG_RUN_STEPS}", rerun.stderr)
        # The optimizer's step continued: exactly the remaining steps ran, from killed_at + 1.
        self.assertEqual(
            _progress_steps(rerun.stderr, "stage1", LONG_RUN_STEPS),
            list(range(killed_at + 1, LONG_RUN_STEPS + 1)),
        )
        result = _read_json(workdir, "stage1", "result.json")
        self.assertEqual(result["step"], LONG_RUN_STEPS)
        self.assertFalse(result["preempted"])
        self.assertTrue(os.path.exists(os.path.join(workdir, "stage1", constants.AUTOENCODER_FILE)))
        self._assert_checkpoints_consistent(workdir, LONG_RUN_STEPS)

    def test_sigterm_saves_checkpoint_and_exits_143(self):
        workdir = self._new_tempdir()
        log_path = os.path.join(self._new_tempdir(), "terminated.log")
        argv, proc = self._start_and_wait_for_checkpoint(workdir, 5, log_path)
        os.kill(proc.pid, signal.SIGTERM)
        self.assertEqual(proc.wait(timeout=TIMEOUT_S), 143)
        with open(log_path, encoding="utf-8") as f:
            log = f.read()
        saved = re.findall(r"stage1: SIGTERM, checkpoint saved at step (\d+)", log)
        self.assertLen(saved, 1, log)
        stopped_at = int(saved[0])
        self.assertBetween(stopped_at, 5, LONG_RUN_STEPS - 1)
        self.assertEqual(_latest_step(_checkpoint_dir(workdir)), stopped_at)
        self.assertEqual(
            _iterations(os.path.join(_checkpoint_dir(workdir), f"ckpt-{stopped_at}")), stopped_at
        )
        self.assertTrue(_read_json(workdir, "stage1", "result.json")["preempted"])
        self.assertFalse(
            os.path.exists(os.path.join(workdir, "stage1", constants.AUTOENCODER_FILE))
        )

        rerun = self._run(argv)

        self.assertEqual(rerun.returncode, 0, rerun.stderr)
        self.assertIn(
            f"resumed from checkpoint at step {stopped_at}/{LONG_RUN_STEPS}", rerun.stderr
        )
        self.assertEqual(
            _progress_steps(rerun.stderr, "stage1", LONG_RUN_STEPS),
            list(range(stopped_at + 1, LONG_RUN_STEPS + 1)),
        )
        result = _read_json(workdir, "stage1", "result.json")
        self.assertEqual(result["step"], LONG_RUN_STEPS)
        self.assertFalse(result["preempted"])
        self._assert_checkpoints_consistent(workdir, LONG_RUN_STEPS)

    def test_rerunning_a_finished_stage_does_not_train(self):
        workdir = self._new_tempdir()
        argv = _command(
            workdir,
            "stage1",
            *TINY_ARGS,
            "--train_steps=10",
            "--steps_per_loop=5",
            "--checkpoint_every=5",
            "--eval_every=10",
            "--summary_every=10",
        )
        first = self._run(argv)
        self.assertEqual(first.returncode, 0, first.stderr)
        self.assertEqual(_progress_steps(first.stderr, "stage1", 10), [5, 10])
        state_before = tf.train.get_checkpoint_state(_checkpoint_dir(workdir))
        train_dir = os.path.join(workdir, "train", "stage1")
        loss_steps_before = _events(train_dir)["loss"][1]

        rerun = self._run(argv)

        self.assertEqual(rerun.returncode, 0, rerun.stderr)
        self.assertIn("resumed from checkpoint at step 10/10", rerun.stderr)
        self.assertEmpty(_progress_steps(rerun.stderr, "stage1", 10))
        self.assertEqual(_read_json(workdir, "stage1", "result.json")["step"], 10)
        self.assertTrue(os.path.exists(os.path.join(workdir, "stage1", constants.AUTOENCODER_FILE)))
        # No new checkpoint and no new training summaries.
        self.assertEqual(tf.train.get_checkpoint_state(_checkpoint_dir(workdir)), state_before)
        self.assertEqual(_events(train_dir)["loss"][1], loss_steps_before)
        self._assert_checkpoints_consistent(workdir, 10)

    def test_stage_chain_writes_models_configs_and_summaries(self):
        workdir = self._new_tempdir()
        # Scalars every call (steps 2 and 4); images and histograms only at step 4.
        loop = (
            "--train_steps=4",
            "--steps_per_loop=2",
            "--checkpoint_every=4",
            "--eval_every=4",
            "--summary_every=4",
        )
        for stage in ("stage0", "stage1", "stage2"):
            result = self._run(_command(workdir, stage, *TINY_ARGS, *loop))
            self.assertEqual(result.returncode, 0, f"{stage}:\n{result.stderr}")

        for stage, models in (
            ("stage0", [constants.CLASSIFIER_FILE]),
            ("stage1", [constants.AUTOENCODER_FILE]),
            ("stage2", [constants.AUTOENCODER_FILE, constants.DEFENDED_FILE]),
        ):
            stage_dir = os.path.join(workdir, stage)
            for name in models:
                self.assertTrue(os.path.isfile(os.path.join(stage_dir, name)), f"{stage}/{name}")
            self.assertEqual(_read_json(stage_dir, "config.json")["stage"], stage)
            flag_values = _read_json(stage_dir, "flags.json")
            self.assertEqual((flag_values["stage"], flag_values["workdir"]), (stage, workdir))
            result = _read_json(stage_dir, "result.json")
            self.assertEqual(result["step"], 4)
            self.assertFalse(result["preempted"])
            self.assertCountEqual(
                result["final_models"], [os.path.join(stage_dir, m) for m in models]
            )
        # Later stages default to the earlier stages' models in the workdir.
        classifier = os.path.join(workdir, "stage0", constants.CLASSIFIER_FILE)
        stage1_config = _read_json(workdir, "stage1", "config.json")
        stage2_config = _read_json(workdir, "stage2", "config.json")
        self.assertEqual(stage1_config["model"]["classifier_path"], classifier)
        self.assertEqual(stage2_config["model"]["classifier_path"], classifier)
        self.assertEqual(
            stage2_config["model"]["autoencoder_path"],
            os.path.join(workdir, "stage1", constants.AUTOENCODER_FILE),
        )

        train_scalars = {
            "stage0": ("loss", "accuracy"),
            "stage1": ("loss", "psnr"),
            "stage2": ("loss", "task_loss", "reconstruction", "accuracy_defended"),
        }
        eval_scalars = {
            "stage0": ("loss", "accuracy"),
            "stage1": ("loss", "psnr", "accuracy_classifier", "accuracy_defended"),
            "stage2": ("task_loss", "psnr", "accuracy_classifier", "accuracy_defended"),
        }
        for stage in ("stage0", "stage1", "stage2"):
            train = _events(os.path.join(workdir, "train", stage))
            for tag in (*train_scalars[stage], "images_per_sec", "learning_rate"):
                self.assertIn(tag, train, f"{stage} train")
                self.assertEqual(train[tag], ("scalars", [2, 4]), f"{stage} {tag}")
            images = {t: s for t, (p, s) in train.items() if p == "images"}
            histograms = {t: s for t, (p, s) in train.items() if p == "histograms"}
            expected_images = {} if stage == "stage0" else {"input_over_reconstruction": [4]}
            self.assertEqual(images, expected_images, stage)
            self.assertTrue(any(t.startswith("weights/") for t in histograms), stage)
            self.assertTrue(any(t.startswith("input_gradients/") for t in histograms), stage)
            self.assertEqual({s for steps in histograms.values() for s in steps}, {4}, stage)
            evaluation = _events(os.path.join(workdir, "eval", stage))
            for tag in eval_scalars[stage]:
                self.assertEqual(evaluation.get(tag), ("scalars", [4]), f"{stage} eval {tag}")

        defended = s2s_model.load_keras(
            os.path.join(workdir, "stage2", constants.DEFENDED_FILE), "defended model"
        )
        logits = defended(np.random.default_rng(0).random((2, 16, 16, 3), dtype=np.float32))
        self.assertEqual(tuple(logits.shape), (2, 10))

    @parameterized.named_parameters(
        ("unknown_classifier", "stage1", ["--classifier=resnet9000"], ["--classifier"]),
        ("unknown_dataset", "stage1", ["--dataset=mnistx"], ["--dataset"]),
        ("negative_learning_rate", "stage1", ["--learning_rate=-1"], ["--learning_rate"]),
        ("missing_workdir", "stage1", [], ["--workdir"], "no_workdir"),
        ("missing_stage", None, [], ["--stage"]),
        ("init_from_in_stage1", "stage1", [f"--init_from={__file__}"], ["--init_from", "stage2"]),
        ("missing_init_from", "stage2", ["--init_from=/nonexistent/s2snet.pth"], ["--init_from"]),
        (
            "stage2_without_autoencoder",
            "stage2",
            [],
            ["--stage=stage2", "--autoencoder_path", "stage-1 autoencoder"],
        ),
        (
            "stage2_without_classifier",
            "stage2",
            [],
            ["--stage=stage2", "--classifier_path", "classifier"],
            "stage1_model",
        ),
        (
            "missing_fashion_mnist",
            "stage1",
            ["--dataset=fashion_mnist", "--data_dir=/nonexistent"],
            ["/nonexistent/train-images-idx3-ubyte.gz", "dataset-fashion-mnist", "data_dir"],
        ),
        (
            "missing_fashion_mnist_eval_split",
            "stage1",
            ["--dataset=fashion_mnist"],
            ["t10k-images-idx3-ubyte.gz", "dataset-fashion-mnist", "data_dir"],
            "train_split_only",
        ),
        (
            "batch_not_divisible_by_replicas",
            "stage1",
            ["--batch_size=3", "--num_cpu_devices=2"],
            ["--batch_size", "3", "2 replicas"],
        ),
        ("jit_without_stock_pooling", "stage1", ["--jit_compile"], ["--jit_compile", "stock"]),
        (
            "budget_ramp_longer_than_the_run",
            "stage0",
            ["--stage0_objective=adversarial", "--train_steps=4", "--train_eps_ramp_steps=5"],
            ["train_eps_ramp_steps (5) exceeds train_steps (4)"],
        ),
        (
            "too_many_ae_stages",
            "stage1",
            ["--ae_stages=5", "--ae_stage_widths=4;8"],
            ["--ae_stages"],
        ),
    )
    def test_bad_flags_fail_before_any_work(self, stage, args, expected, setup=None):
        root = self._new_tempdir()
        workdir = os.path.join(root, "workdir")
        if setup == "stage1_model":  # the flag validators only check that the file exists
            os.makedirs(os.path.join(workdir, "stage1"))
            open(os.path.join(workdir, "stage1", constants.AUTOENCODER_FILE), "wb").close()
        if setup == "train_split_only":  # a valid Fashion-MNIST training split, no test split
            data_dir = os.path.join(root, "fashion_mnist")
            os.makedirs(data_dir)
            images = os.path.join(data_dir, "train-images-idx3-ubyte.gz")
            _write_idx(images, np.zeros((8, 28, 28)), 2051)
            _write_idx(os.path.join(data_dir, "train-labels-idx1-ubyte.gz"), np.zeros(8), 2049)
            args = [*args, f"--data_dir={data_dir}"]
        overridden = {a.split("=")[0] for a in args}
        defaults = [a for a in TINY_ARGS if a.split("=")[0] not in overridden]
        argv = _command(None if setup == "no_workdir" else workdir, stage, *defaults, *args)
        before = _tree(root)
        cwd = self._new_tempdir()

        start = time.monotonic()
        result = _run(argv, cwd)
        elapsed = time.monotonic() - start

        self.assertNotEqual(result.returncode, 0, result.stderr)
        error = _error_text(result.stderr)
        for text in expected:
            self.assertIn(text, error)
        self.assertEqual(_tree(root), before, "the failed run wrote files")
        self.assertEmpty(os.listdir(cwd))
        self.assertEmpty(_progress_steps(result.stderr, stage or "stage1", 1000))
        self.assertLess(elapsed, 60)
