"""Evaluation under tf.distribute: the trainer's eval loop and `robustness.distributed`.

Multi-replica runs are subprocesses of `distributed_eval_worker.py`, one strategy
per process (TensorFlow splits the CPU into logical devices only before it
initialises):

- `LocalReplicasTest`: 1, 2 and 3 replicas x eval sizes that divide into the global
  batch, leave a remainder smaller and larger than the replica count, or are
  smaller than the replica count: `Trainer.evaluate` of stages 0, 1 and 2 gives
  the means of all examples computed at once, and the same numbers on every
  replica count; `evaluate_examples` gives the same per-example results (a noise
  attack seeded by example index, and BIM) in example order.
- `ResumeTest`: a run killed (SIGKILL) between shards, then rerun: the same
  results as an uninterrupted run, and the finished shards are not recomputed.
- `MultiWorkerTest`: two local workers under `MultiWorkerMirroredStrategy` give
  the single-process results; only the chief writes shards.
- `EngineTest` (in process, one device): errors, shard files, stale shards.
"""

import contextlib
import glob
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import s2s_tf
from s2s_tf import data as data_lib
from s2s_tf.robustness import distributed

_HERE = os.path.dirname(os.path.abspath(__file__))
_WORKER = os.path.join(_HERE, "distributed_eval_worker.py")
sys.path.insert(0, _HERE)  # the worker's constants, without running it
import distributed_eval_worker as worker  # noqa: E402

_TIMEOUT_S = 300
_RTOL = 1e-5


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **extra)
    # The workers import the s2s_tf that this test imported (checkout or installed).
    root = os.path.dirname(os.path.dirname(os.path.abspath(s2s_tf.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"  # workers talk gRPC locally
    return env


class _Workers:
    """Worker subprocesses logging to files in `cwd`; all are killed when one fails."""

    def __init__(self, cwd):
        self.cwd, self.procs = cwd, []

    def start(self, argv, env=None):
        path = os.path.join(self.cwd, f"worker{len(self.procs)}.log")
        log = open(path, "w+", encoding="utf-8")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            [sys.executable, _WORKER, *argv],
            cwd=self.cwd,
            env=env or _env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs.append((proc, log))
        return proc

    def wait(self, timeout=_TIMEOUT_S):
        """Waits for all, killing the rest when one fails; returns None if all exited 0."""
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p, _ in self.procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p, _ in self.procs):
                break
            time.sleep(0.1)
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        report = []
        for proc, log in self.procs:
            log.seek(0)
            report.append(f"--- {proc.args[2:]} exit {proc.returncode}:\n{log.read()[-5000:]}")
            log.close()
        return None if all(p.returncode == 0 for p, _ in self.procs) else "\n".join(report)


def _load(path):
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def _shard_files(directory):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "shard-*.npz")))


def _shard_range(name):
    start, end = name[: -len(".npz")].split("-")[-2:]
    return int(start), int(end)


class LocalReplicasTest(tf.test.TestCase, parameterized.TestCase):
    """1, 2 and 3 logical CPU replicas, one process each, run once for the class."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp(prefix="distributed_eval_test_")
        workers = _Workers(cls.tmp)
        for replicas in (1, 2, 3):
            tmp = os.path.join(cls.tmp, f"r{replicas}")
            os.makedirs(tmp)
            argv = ["local", f"--replicas={replicas}", f"--tmp={tmp}", f"--out={tmp}.npz"]
            workers.start(argv)
        cls.failure = workers.wait()
        if not cls.failure:
            cls.runs = {r: _load(os.path.join(cls.tmp, f"r{r}.npz")) for r in (1, 2, 3)}

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)
        super().tearDownClass()

    def setUp(self):
        super().setUp()
        if self.failure:
            self.fail(f"a worker failed:\n{self.failure}")

    def _trainer_keys(self, run, stage):
        return [k for k in run if k.startswith(f"trainer|{stage}|")]

    @parameterized.product(replicas=(1, 2, 3), stage=worker.STAGES)
    def test_trainer_evaluate_counts_every_example_once(self, replicas, stage):
        run = self.runs[replicas]
        self.assertEqual(int(run["replicas"]), replicas)
        keys = self._trainer_keys(run, stage)
        self.assertEqual({int(k.split("|")[2]) for k in keys}, set(worker.SIZES))
        for key in keys:
            direct = run[key.replace("trainer|", "direct|", 1)]
            self.assertAllClose(run[key], direct, rtol=_RTOL, atol=1e-6, msg=key)

    @parameterized.product(replicas=(2, 3), stage=worker.STAGES)
    def test_trainer_evaluate_equals_one_replica(self, replicas, stage):
        one, many = self.runs[1], self.runs[replicas]
        keys = self._trainer_keys(one, stage)
        self.assertEqual(keys, self._trainer_keys(many, stage))
        for key in keys:
            self.assertAllClose(many[key], one[key], rtol=_RTOL, atol=1e-6, msg=key)

    def test_trainer_means_depend_on_the_examples(self):
        # Were padded rows counted (or real ones lost), the means would move; that shows
        # only if different example sets give different means.
        losses = [float(self.runs[1][f"trainer|stage0|{n}|loss"]) for n in worker.SIZES]
        self.assertLen(set(losses), len(losses))

    @parameterized.product(replicas=(1, 2, 3), size=worker.SIZES)
    def test_engine_keeps_example_order(self, replicas, size):
        run = self.runs[replicas]
        for attack in ("noise", "bim"):
            self.assertAllEqual(run[f"{attack}|{size}|index"], np.arange(size))

    @parameterized.product(replicas=(2, 3), size=worker.SIZES)
    def test_engine_equals_one_replica(self, replicas, size):
        one, many = self.runs[1], self.runs[replicas]
        for key in sorted(k for k in one if k.split("|")[1:2] == [str(size)]):
            self.assertEqual(one[key].shape[0], size, msg=key)
            if one[key].dtype.kind == "f" and key.endswith("logits"):
                self.assertAllClose(many[key], one[key], rtol=1e-6, atol=1e-6, msg=key)
            else:  # seeded noise, adversarial images and correctness: bit for bit
                self.assertEqual(many[key].dtype, one[key].dtype, msg=key)
                self.assertAllEqual(many[key], one[key], msg=key)

    def test_attacks_did_something(self):
        run, size = self.runs[1], max(worker.SIZES)
        noise = run[f"noise|{size}|noise"]
        self.assertLessEqual(np.max(np.abs(noise)), worker.EPS)
        self.assertGreater(np.min(np.max(np.abs(noise), axis=(1, 2, 3))), worker.EPS / 2)
        # Each example has its own noise: seeded by index, not by batch position.
        self.assertFalse(np.allclose(noise[0], noise[worker.ATTACK_BATCH]))
        self.assertEqual(run[f"noise|{size}|correct"].dtype, np.bool_)
        images, _ = data_lib.load_numpy(worker.eval_data(size))
        moved = np.abs(run[f"bim|{size}|adversarial"] - images)
        self.assertLessEqual(np.max(moved), worker.EPS + 1e-6)
        self.assertGreater(np.max(moved), worker.EPS / 2)


class ResumeTest(tf.test.TestCase):
    """Kill a run between shards, run again, and compare with an uninterrupted run."""

    def test_killed_run_resumes_from_finished_shards(self):
        tmp = tempfile.mkdtemp(prefix="distributed_eval_test_")
        self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
        shard_dir, out = os.path.join(tmp, "shards"), os.path.join(tmp, "out.npz")
        argv = ["resume", "--replicas=2", f"--shard_dir={shard_dir}", f"--out={out}"]
        workers = _Workers(tmp)
        # Sleeping after each shard leaves time to kill it between shards, even on a busy CPU.
        proc = workers.start([*argv, "--slow=1.5"])
        deadline = time.monotonic() + _TIMEOUT_S
        while len(_shard_files(shard_dir)) < 2 and proc.poll() is None:
            self.assertLess(time.monotonic(), deadline, "no shard written in time")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        workers.wait()
        self.assertEqual(proc.returncode, -signal.SIGKILL, "the worker ended before the kill")
        finished = [_shard_range(name) for name in _shard_files(shard_dir)]
        shards = math.ceil(worker.RESUME_SIZE / worker.SHARD_SIZE)
        self.assertBetween(len(finished), 2, shards - 1)

        rerun = _Workers(tmp)
        rerun.start(argv)
        failure = rerun.wait()
        self.assertIsNone(failure, failure)
        run = _load(out)
        done = {i for start, end in finished for i in range(start, end)}
        expected = [i for i in range(worker.RESUME_SIZE) if i not in done]
        self.assertAllEqual(run["resumed|computed"], expected)
        self.assertAllEqual(run["fresh|computed"], np.arange(worker.RESUME_SIZE))
        for key in ("adversarial", "adversarial_correct", "index"):
            self.assertAllEqual(run[f"resumed|{key}"], run[f"fresh|{key}"], msg=key)
            self.assertAllEqual(run[f"again|{key}"], run[f"fresh|{key}"], msg=key)
            self.assertAllEqual(run[f"other_key|{key}"], run[f"fresh|{key}"], msg=key)
        self.assertEmpty(run["again|computed"])  # every shard finished: nothing to compute
        # Shards of other work (another key) are never read.
        self.assertAllEqual(run["other_key|computed"], np.arange(worker.RESUME_SIZE))
        self.assertLen(_shard_files(shard_dir), 2 * shards)
        progress = [str(line) for line in run["progress"]]
        self.assertIn(f"resuming: {len(done)}/{worker.RESUME_SIZE} examples", progress[0])
        line = rf"evaluated \d+/{worker.RESUME_SIZE} examples .* examples/s \| ETA \d+m\d\ds"
        self.assertRegex(progress[1], line)


def _free_ports(count):
    with contextlib.ExitStack() as stack:  # all held open at once, so the ports differ
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


class MultiWorkerTest(tf.test.TestCase):
    """Two local worker processes under `MultiWorkerMirroredStrategy`, one CPU each."""

    def test_two_workers_equal_one_process(self):
        tmp = tempfile.mkdtemp(prefix="distributed_eval_test_")
        self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
        cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
        workers, shared = _Workers(tmp), os.path.join(tmp, "shared")
        for index in range(2):
            base = os.path.join(tmp, f"w{index}")
            os.makedirs(base)
            tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            argv = [f"--tmp={base}", f"--shard_dir={base}/shards", f"--shared_dir={shared}"]
            workers.start(["multi_worker", *argv, f"--out={base}.npz"], _env(TF_CONFIG=tf_config))
        failure = workers.wait()
        self.assertIsNone(failure, failure)
        chief, other = (_load(os.path.join(tmp, f"w{i}.npz")) for i in range(2))
        self.assertEqual(int(chief["replicas"]), 2)
        self.assertTrue(bool(chief["is_chief"]))
        self.assertFalse(bool(other["is_chief"]))

        for run in (chief, other):
            for key in (k for k in run if k.startswith("trainer|")):
                direct = run[key.replace("trainer|", "direct|", 1)]
                self.assertAllClose(run[key], direct, rtol=_RTOL, atol=1e-6, msg=key)
            for size in worker.MW_SIZES:
                self.assertAllEqual(run[f"bim|{size}|index"], np.arange(size))
            for key in (k for k in run if k.startswith(("noise|", "bim|"))):
                reference = run[f"reference|{key}"]
                if key.endswith("logits"):
                    self.assertAllClose(run[key], reference, rtol=1e-6, atol=1e-6, msg=key)
                else:
                    self.assertAllEqual(run[key], reference, msg=key)

        # Only the chief writes shards.
        self.assertNotEmpty(_shard_files(os.path.join(tmp, "w0", "shards", "bim13")))
        self.assertFalse(os.path.exists(os.path.join(tmp, "w1", "shards")))
        size = worker.MW_SIZES[0]
        for name, examples in (("own", size), ("shared", size), ("shared_again", 0)):
            # Each worker runs fn on its replica's rows: together, on every example once.
            # Own folders: the other worker lacks the chief's shards, so all are computed;
            # a shared folder is read by everyone the second time.
            computed = np.concatenate([chief[f"{name}|computed"], other[f"{name}|computed"]])
            self.assertAllEqual(np.sort(computed), np.arange(examples), msg=name)
        self.assertNotEmpty(chief["own|computed"])
        self.assertNotEmpty(other["own|computed"])
        for run in (chief, other):
            for name in ("own", "shared", "shared_again"):
                self.assertAllEqual(
                    run[f"{name}|adversarial"], run[f"reference|bim|{size}|adversarial"]
                )


def _identity_fn(x, y, index):
    return {"label": y, "index": index, "mean": tf.reduce_mean(x, axis=[1, 2, 3])}


class EngineTest(tf.test.TestCase):
    """`evaluate_examples` on one device, in this process."""

    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(0)
        self.images = rng.uniform(size=(11, 4, 4, 3)).astype(np.float32)
        self.labels = rng.integers(0, 10, size=11)
        tmp = tempfile.mkdtemp(prefix="distributed_eval_test_")
        self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
        self.shard_dir = os.path.join(tmp, "shards")

    def _evaluate(self, fn=_identity_fn, **kwargs):
        kwargs = {"batch_size": 4, "shard_dir": self.shard_dir, "shard_size": 5, **kwargs}
        return distributed.evaluate_examples(None, fn, self.images, self.labels, **kwargs)

    def test_results_in_example_order_with_their_dtypes(self):
        results = self._evaluate(shard_dir=None)
        self.assertAllEqual(results["index"], np.arange(11))
        self.assertAllEqual(results["label"], self.labels)
        self.assertEqual(results["label"].dtype, np.int32)
        self.assertAllClose(results["mean"], self.images.mean(axis=(1, 2, 3)))

    def test_batches_are_even_and_padded_to_the_granule(self):
        rows_seen = []

        def fn(x, y, index):
            # Runs once per batch (inside the compiled step, as a py_function).
            tf.py_function(lambda n: rows_seen.append(int(n)), [tf.shape(x)[0]], [])
            return _identity_fn(x, y, index)

        rng = np.random.default_rng(1)
        images = rng.uniform(size=(333, 2, 2, 3)).astype(np.float32)
        labels = rng.integers(0, 10, size=333)
        results = distributed.evaluate_examples(None, fn, images, labels, batch_size=250)
        self.assertAllEqual(results["index"], np.arange(333))
        # 333 in batches of at most 250: 167 + 166 rows, each padded to 168 (a multiple
        # of 8), not 250 + 83 with the 83 padded to 128 or to 250.
        self.assertEqual(rows_seen, [168, 168])
        rows_seen.clear()
        distributed.evaluate_examples(None, fn, images[:19], labels[:19], batch_size=250)
        self.assertEqual(rows_seen, [24])

    def test_shard_files_are_named_by_range(self):
        key = "identity"
        self._evaluate(key=key)
        fingerprint = distributed._ShardStore(None, key, True).fingerprint
        expected = [
            f"shard-{fingerprint}-{s:010d}-{e:010d}.npz" for s, e in ((0, 5), (5, 10), (10, 11))
        ]
        self.assertEqual(sorted(os.listdir(self.shard_dir)), expected)

    def test_shards_of_other_data_or_corrupt_are_recomputed(self):
        first = self._evaluate()
        names = _shard_files(self.shard_dir)
        with open(os.path.join(self.shard_dir, names[0]), "wb") as f:
            f.write(b"not a zip file")
        self.images[7] += 0.5  # shard [5, 10) was computed from other images
        with self.assertLogs(level="WARNING") as logs:
            second = self._evaluate()
        self.assertLen(logs.output, 2)
        self.assertAllEqual(second["index"], first["index"])
        self.assertAllClose(second["mean"], self.images.mean(axis=(1, 2, 3)))
        self.assertNotAllClose(second["mean"][7], first["mean"][7])

    def test_bad_inputs_are_named(self):
        cases = [
            (dict(images=self.images[:0], labels=self.labels[:0]), "at least one example"),
            (dict(labels=self.labels[:3]), "do not match images"),
            (dict(labels=self.labels.astype(np.float32)), "labels must be integers"),
            (dict(batch_size=0), "batch_size must be a positive int"),
            (dict(shard_size=2.5), "shard_size must be a positive int"),
        ]
        for overrides, message in cases:
            args = {"images": self.images, "labels": self.labels, "batch_size": 4, **overrides}
            with self.assertRaisesRegex(ValueError, message):
                distributed.evaluate_examples(None, _identity_fn, **args)

    def test_outputs_must_be_per_example(self):
        with self.assertRaisesRegex(ValueError, "'total' must be per-example"):
            self._evaluate(fn=lambda x, y, index: {"total": tf.reduce_sum(x)}, shard_dir=None)


if __name__ == "__main__":
    tf.test.main()
