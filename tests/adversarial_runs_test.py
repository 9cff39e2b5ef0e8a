"""Adversarial training through the binary: resumed after SIGKILL, and on 1 vs 2 replicas.

Each run is `python -m s2s_tf.train_main` on the checkout (PYTHONPATH), from the
same saved tiny models:

- an adversarial stage 2 killed with SIGKILL after a checkpoint and run again ends
  with the weights of an uninterrupted run (the data stream and the attack's
  random starts follow the global step);
- adversarial stage 2 (decoder and whole autoencoder) and Madry's stage 0 give the
  same weights on one device and on two logical CPU devices.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from s2s_tf import constants
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import classifiers
from s2s_tf.models import s2s_model
from s2s_tf.train import checkpointing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16
TIMEOUT_S = 300
COMMON = (
    "--dataset=testing",
    "--classifier=testing",
    "--num_classes=10",
    "--ae_stage_widths=4;8",
    "--ae_stages=2",
    f"--image_size={SIZE}",
    "--batch_size=8",
    "--eval_split=",
    "--robust_check_examples=0",
    "--bn_recalibration_batches=2",
    "--optimizer=sgd",
    "--learning_rate=0.05",
    "--momentum=0.9",
    "--train_attack_steps=2",
    "--seed=5",
)


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)


def _save_models(directory):
    """Initial models; synchronised BatchNorm so that 2 replicas normalise as 1 would."""
    keras.utils.set_random_seed(2)
    config = ae_lib.AutoencoderConfig(stage_widths=((4,), (8,)), sync_batchnorm=True)
    ae = ae_lib.build_autoencoder(config, input_shape=(SIZE, SIZE, 3))
    ae(tf.random.normal((8, SIZE, SIZE, 3)), training=True)
    classifier = classifiers.build_classifier_with_preprocessing("testing", (SIZE, SIZE), 10)
    return (
        checkpointing.save_keras_atomic(ae, os.path.join(directory, "ae.keras")),
        checkpointing.save_keras_atomic(classifier, os.path.join(directory, "clf.keras")),
    )


def _argv(workdir, stage, models, steps, *extra):
    ae, classifier = models
    argv = [sys.executable, "-m", "s2s_tf.train_main", f"--stage={stage}", f"--workdir={workdir}"]
    argv += [*COMMON, f"--classifier_path={classifier}", f"--train_steps={steps}"]
    if stage == "stage2":
        argv += [f"--autoencoder_path={ae}", "--stage2_objective=adversarial"]
    else:
        argv += ["--stage0_objective=adversarial"]
    return argv + list(extra)


def _run(argv, cwd):
    done = subprocess.run(
        argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    if done.returncode:
        raise AssertionError(f"{argv} exited {done.returncode}:\n{done.stderr[-4000:]}")
    return done


def _final_weights(workdir, stage):
    name = constants.AUTOENCODER_FILE if stage == "stage2" else constants.CLASSIFIER_FILE
    model = s2s_model.load_keras(os.path.join(workdir, stage, name))
    return [np.array(w) for w in model.weights]


def _latest_step(directory):
    try:
        latest = tf.train.latest_checkpoint(directory)
    except (tf.errors.OpError, ValueError):
        return 0
    return int(latest.rsplit("-", 1)[-1]) if latest else 0


class AdversarialTrainMainTest(tf.test.TestCase, parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)
        self.models = _save_models(self.tmp)

    def test_resume_after_sigkill_gives_the_weights_of_an_uninterrupted_run(self):
        steps, loop = 24, ("--steps_per_loop=1", "--checkpoint_every=3")
        whole = os.path.join(self.tmp, "whole")
        _run(_argv(whole, "stage2", self.models, steps, *loop), self.tmp)

        killed = os.path.join(self.tmp, "killed")
        argv = _argv(killed, "stage2", self.models, steps, *loop)
        with open(os.path.join(self.tmp, "killed.log"), "w", encoding="utf-8") as log:
            proc = subprocess.Popen(argv, cwd=self.tmp, env=_env(), stdout=log, stderr=log)
        checkpoints = os.path.join(killed, "stage2", "checkpoints")
        deadline = time.monotonic() + TIMEOUT_S
        while _latest_step(checkpoints) < 6 and proc.poll() is None:
            self.assertLess(time.monotonic(), deadline, "no checkpoint in time")
            time.sleep(0.05)
        self.assertIsNone(proc.poll(), "the run ended before it could be killed")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=TIMEOUT_S)
        killed_at = _latest_step(checkpoints)
        self.assertBetween(killed_at, 6, steps - 1)
        rerun = _run(argv, self.tmp)
        self.assertIn(f"resumed from checkpoint at step {killed_at}/{steps}", rerun.stderr)
        for a, b in zip(
            _final_weights(whole, "stage2"), _final_weights(killed, "stage2"), strict=True
        ):
            self.assertAllEqual(a, b)

    # With the label-free KL, the attack's first gradient is a difference of two nearly
    # equal softmaxes; rounding that differs with the per-replica batch size flips the
    # sign of a few pixels' steps (12 of 6,144 in this tiny model), and the runs drift
    # apart by ~1e-3. The cross-entropy attack is well conditioned and checks the rest:
    # seeds, data order, the clean + perturbed BatchNorm batch and the summed gradients.
    @parameterized.parameters(
        ("stage2", ("--stage2_trainable=decoder", "--stage2_loss=xent")),
        ("stage2", ("--stage2_trainable=autoencoder", "--stage2_loss=xent")),
        ("stage0", ("--train_attack=fgsm_rs",)),
    )
    def test_one_and_two_replicas_agree(self, stage, options):
        runs = []
        for replicas in (1, 2):
            workdir = os.path.join(self.tmp, f"replicas{replicas}")
            extra = ("--strategy=mirrored", f"--num_cpu_devices={replicas}", *options)
            procs = _argv(workdir, stage, self.models, 4, "--steps_per_loop=2", *extra)
            runs.append((workdir, subprocess.Popen(procs, cwd=self.tmp, env=_env(), stderr=-1)))
        for _, proc in runs:
            _, err = proc.communicate(timeout=TIMEOUT_S)
            self.assertEqual(proc.returncode, 0, err.decode()[-4000:])
        one, two = (_final_weights(workdir, stage) for workdir, _ in runs)
        if stage == "stage2":  # (stage 0 starts from a classifier built from --seed)
            initial = s2s_model.load_keras(self.models[0]).weights
            moved = max(
                float(np.max(np.abs(a - np.array(b)))) for a, b in zip(one, initial, strict=True)
            )
            self.assertGreater(moved, 1e-3)  # training moved the weights: agreeing means something
        for a, b in zip(one, two, strict=True):
            self.assertAllClose(a, b, atol=1e-5, rtol=0)


if __name__ == "__main__":
    tf.test.main()
