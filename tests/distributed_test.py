"""Distributed training: 1 vs 2 replicas, two local workers, and batch checks.

Every run is a subprocess of `distributed_worker.py` holding one strategy
(TensorFlow splits the CPU into logical devices only before it initialises,
and two multi-replica strategies in one process can collide in collectives).

- `LocalReplicasTest`: the same initial models and the same global batches
  trained on one device and on two logical CPU devices (`MirroredStrategy`)
  give the same per-step losses and the same weights, BatchNorm statistics
  included, for stage 1 (synchronised BatchNorm), stage 1 with hard gradient
  clipping, stage 0 (SGD and Adam) and stage 2.
- `MultiWorkerTest`: two local workers under `MultiWorkerMirroredStrategy`
  train stage 1 with `train_lib.train` into one workdir and agree.
"""

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_worker.py")
_TOLERANCE = 1e-5
_SCENARIOS = ("stage1", "stage1_clip", "stage0", "stage0_adam", "stage2")
_TIMEOUT_S = 240
_LOG_TAIL = 6000


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **extra)
    # The workers talk gRPC to each other on 127.0.0.1; never through a proxy.
    env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"
    return env


def _run_workers(argvs, envs, cwd, timeout=_TIMEOUT_S):
    """Runs `distributed_worker.py` once per argv, all at once, in `cwd`.

    When one fails (or the deadline passes) the others are killed, so a worker
    waiting forever for a dead peer fails the test instead of blocking it.

    Returns:
      `(ok, report)`: whether all exited 0, and each one's exit code and log tail.
    """
    procs = []
    timed_out = False
    try:
        for i, (argv, env) in enumerate(zip(argvs, envs, strict=True)):
            log = open(os.path.join(cwd, f"worker_{i}.log"), "w+", encoding="utf-8")  # noqa: SIM115
            command = [sys.executable, _WORKER, *argv]
            proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
            procs.append((proc, log))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p, _ in procs):
            if any(p.poll() not in (None, 0) for p, _ in procs):
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.2)
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    reports = []
    for i, (proc, log) in enumerate(procs):
        log.seek(0)
        reports.append(f"--- worker {i} exit {proc.returncode}:\n{log.read()[-_LOG_TAIL:]}")
        log.close()
    ok = not timed_out and all(p.returncode == 0 for p, _ in procs)
    prefix = f"timed out after {timeout} s\n" if timed_out else ""
    return ok, prefix + "\n".join(reports)


def _load(path):
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def _weights(results, scenario, kind):
    count = len(results[f"{scenario}|names"])
    return [results[f"{scenario}|{kind}|{i}"] for i in range(count)]


class LocalReplicasTest(tf.test.TestCase, parameterized.TestCase):
    """One device vs two logical CPU devices, each in its own process, run once."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp(prefix="distributed_test_")
        init_dir = os.path.join(cls.tmp, "init")
        cls.failure = None
        ok, report = _run_workers([["prepare", "--init_dir", init_dir]], [_env()], cls.tmp)
        if not ok:
            cls.failure = f"preparing the initial models failed:\n{report}"
            return
        argvs = [
            [
                "local",
                f"--replicas={replicas}",
                f"--init_dir={init_dir}",
                f"--workdir={os.path.join(cls.tmp, f'replicas{replicas}')}",
                f"--out={os.path.join(cls.tmp, f'replicas{replicas}.npz')}",
                *_SCENARIOS,
                "bad_batch",
            ]
            for replicas in (1, 2)
        ]
        ok, report = _run_workers(argvs, [_env(), _env()], cls.tmp)
        if not ok:
            cls.failure = f"a training process failed:\n{report}"
            return
        cls.one = _load(os.path.join(cls.tmp, "replicas1.npz"))
        cls.two = _load(os.path.join(cls.tmp, "replicas2.npz"))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)
        super().tearDownClass()

    def setUp(self):
        super().setUp()
        if self.failure:
            self.fail(self.failure)

    def test_runs_use_one_and_two_replicas(self):
        self.assertEqual(int(self.one["replicas"]), 1)
        self.assertEqual(int(self.two["replicas"]), 2)

    @parameterized.parameters(*_SCENARIOS)
    def test_two_replicas_train_as_one(self, scenario):
        one, two = self.one, self.two
        names = [str(n) for n in one[f"{scenario}|names"]]
        self.assertEqual(names, [str(n) for n in two[f"{scenario}|names"]])
        for name, a, b in zip(
            names, _weights(one, scenario, "init"), _weights(two, scenario, "init"), strict=True
        ):
            self.assertAllEqual(a, b, msg=f"initial {name}")

        losses_one, losses_two = one[f"{scenario}|loss"], two[f"{scenario}|loss"]
        self.assertLen(losses_one, 3)
        self.assertAllClose(losses_one, losses_two, atol=_TOLERANCE, rtol=0)

        for name, a, b in zip(
            names, _weights(one, scenario, "final"), _weights(two, scenario, "final"), strict=True
        ):
            self.assertAllClose(a, b, atol=_TOLERANCE, rtol=0, msg=f"final {name}")
        # Every variable has a copy per replica, and the copies agree.
        self.assertEqual(int(two[f"{scenario}|copied"]), len(names))
        self.assertLessEqual(float(two[f"{scenario}|spread"]), _TOLERANCE)

        # Training moved the weights far beyond the tolerance, so agreeing means something.
        moved = max(
            float(np.max(np.abs(final - init)))
            for final, init, trainable in zip(
                _weights(one, scenario, "final"),
                _weights(one, scenario, "init"),
                one[f"{scenario}|trainable"],
                strict=True,
            )
            if trainable
        )
        self.assertGreater(moved, 100 * _TOLERANCE)

    @parameterized.parameters(1, 2)
    def test_clipping_bounds_every_step_of_the_summed_gradient(self, replicas):
        # Plain SGD with a clip far below the gradient norm: each step moves the trainable
        # weights by exactly lr * clip. Clipping each replica's partial gradient, or not
        # clipping, moves them further.
        results = self.one if replicas == 1 else self.two
        scenario = "stage1_clip"
        clip = float(results[f"{scenario}|clip_global_norm"])
        step_length = float(results[f"{scenario}|learning_rate"]) * clip
        self.assertGreater(clip, 0.0)
        squares = [
            np.sum(np.square(final.astype(np.float64) - init))
            for final, init, trainable in zip(
                _weights(results, scenario, "final"),
                _weights(results, scenario, "init"),
                results[f"{scenario}|trainable"],
                strict=True,
            )
            if trainable
        ]
        distance = float(np.sqrt(np.sum(squares)))
        steps = len(results[f"{scenario}|loss"])
        self.assertLessEqual(distance, steps * step_length * (1 + 1e-4))
        self.assertGreater(distance, step_length)

    def test_global_batch_not_divisible_by_replicas(self):
        error = str(self.two["bad_batch|error"])
        self.assertStartsWith(error, "ValueError")
        self.assertIn("global batch size 3", error)
        self.assertIn("2 replicas", error)
        # The same config with one replica (global batch 2) trains.
        self.assertEqual(str(self.one["bad_batch|error"]), "no error")


def _free_ports(count):
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class MultiWorkerTest(tf.test.TestCase):
    """Two local worker processes under `MultiWorkerMirroredStrategy`."""

    def test_two_workers_train_stage1_into_one_workdir(self):
        tmp = tempfile.mkdtemp(prefix="distributed_test_")
        self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
        workdir = os.path.join(tmp, "work")
        cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
        argvs, envs, outs = [], [], []
        for index in range(2):
            outs.append(os.path.join(tmp, f"worker{index}.npz"))
            argvs.append(["multi_worker", f"--workdir={workdir}", f"--out={outs[-1]}"])
            tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
            envs.append(_env(TF_CONFIG=json.dumps(tf_config)))
        ok, report = _run_workers(argvs, envs, tmp)
        self.assertTrue(ok, report)

        chief, other = (_load(path) for path in outs)
        self.assertEqual(int(chief["replicas"]), 2)
        self.assertEqual(int(other["replicas"]), 2)
        self.assertTrue(bool(chief["is_chief"]))
        self.assertFalse(bool(other["is_chief"]))
        chief_result, other_result = (json.loads(str(r["result"])) for r in (chief, other))
        self.assertEqual(chief_result["step"], 4)
        self.assertEqual(other_result["step"], 4)
        self.assertAllClose(chief_result["train"]["loss"], other_result["train"]["loss"])

        # Each worker initialised its own model; both must end with the same weights, and
        # the chief's saved model must hold them.
        count = len([key for key in chief if key.startswith("final|")])
        self.assertGreater(count, 0)
        for i in range(count):
            self.assertAllClose(
                chief[f"final|{i}"], other[f"final|{i}"], atol=_TOLERANCE, rtol=0, msg=str(i)
            )
            self.assertAllEqual(chief[f"final|{i}"], chief[f"saved|{i}"], msg=str(i))
        self.assertFalse([key for key in other if key.startswith("saved|")])

        stage_dir = os.path.join(workdir, "stage1")
        final_model = os.path.join(stage_dir, "autoencoder.keras")
        self.assertEqual(chief_result["final_models"], [final_model])
        self.assertEqual(other_result["final_models"], [])
        self.assertTrue(os.path.isfile(final_model))
        for name in ("config.json", "result.json"):
            self.assertTrue(os.path.isfile(os.path.join(stage_dir, name)), name)
        checkpoints = os.path.join(stage_dir, "checkpoints")
        self.assertEqual(
            tf.train.latest_checkpoint(checkpoints), os.path.join(checkpoints, "ckpt-4")
        )
        self.assertTrue(glob.glob(os.path.join(checkpoints, "ckpt-2.index")))
        self.assertEqual(glob.glob(os.path.join(stage_dir, "worker_*_scratch")), [])


if __name__ == "__main__":
    tf.test.main()
