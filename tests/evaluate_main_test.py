"""The evaluate binary: replica and worker counts agree, and a killed run resumes.

The split (13 examples) streams in shards of 5; every run's report must hold the
same per-example results and headline as one uninterrupted process on one replica.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import unittest

import s2s_tf
from s2s_tf import testing_utils

ARGS = [
    "--dataset=testing",
    "--image_size=16",
    "--attack_preset=fast",
    "--attacks=apgd_ce",
    "--gradient_free_attacks=square",
    "--threat_models=white_box,gradient_free,transfer",
    "--eps=8/255",
    "--num_examples=13",
    "--batch_size=6",
    "--steps=3",
    "--target_classes=1",
    "--gradient_free_examples=5",
    "--gradient_free_queries=10",
    "--gradient_examples=4",
    "--effective_examples=4",
    "--eval_shard_size=5",
]


def _env():
    """The binary imports the s2s_tf that this test imported (checkout or installed)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(s2s_tf.__file__)))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def _command(workdir, outdir, *extra):
    return [
        sys.executable,
        "-m",
        "s2s_tf.evaluate_main",
        f"--workdir={workdir}",
        f"--output_dir={outdir}",
        *ARGS,
        *extra,
    ]


def _run(workdir, outdir, *extra):
    result = subprocess.run(
        _command(workdir, outdir, *extra),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        cwd=tempfile.gettempdir(),
        env=_env(),
    )
    if result.returncode != 0:
        raise AssertionError(result.stderr[-3000:])
    with open(os.path.join(outdir, "robustness.json")) as f:
        return json.load(f)["results"]


def _shard_files(outdir):
    shards = os.path.join(outdir, "shards")
    if not os.path.isdir(shards):
        return []
    return sorted(n for n in os.listdir(shards) if n.startswith("examples-"))


class EvaluateMainTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.workdir = tempfile.mkdtemp()
        testing_utils.save_tiny_models(cls.workdir)
        cls.one = _run(cls.workdir, os.path.join(cls.workdir, "one"), "--num_cpu_devices=1")

    def _assert_same(self, results):
        self.assertEqual(sorted(results["per_example"]), sorted(self.one["per_example"]))
        for key, values in self.one["per_example"].items():
            self.assertEqual(results["per_example"][key], values, key)
        self.assertEqual(results["headline"], self.one["headline"])

    def test_the_split_streams_in_shards(self):
        outdir = os.path.join(self.workdir, "one")
        self.assertEqual(len(_shard_files(outdir)), 3)  # 13 examples in shards of 5
        self.assertEqual(self.one["num_examples"], 13)

    def test_two_replicas_give_the_one_replica_results(self):
        two = _run(self.workdir, os.path.join(self.workdir, "two"), "--num_cpu_devices=2")
        self._assert_same(two)

    def test_two_workers_share_the_shards(self):
        outdir = os.path.join(self.workdir, "workers")
        workers = [
            subprocess.Popen(
                _command(self.workdir, outdir, "--eval_workers=2", f"--eval_worker_index={i}"),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                cwd=tempfile.gettempdir(),
                env=_env(),
            )
            for i in range(2)
        ]
        for worker in workers:
            _, stderr = worker.communicate(timeout=900)
            self.assertEqual(worker.returncode, 0, stderr[-3000:])
        self.assertEqual(len(_shard_files(outdir)), 3)
        with open(os.path.join(outdir, "robustness.json")) as f:
            self._assert_same(json.load(f)["results"])

    def test_a_killed_evaluation_resumes_to_the_same_report(self):
        outdir = os.path.join(self.workdir, "killed")
        process = subprocess.Popen(
            _command(self.workdir, outdir, "--num_cpu_devices=1"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=tempfile.gettempdir(),
            env=_env(),
        )
        deadline = time.time() + 600
        while time.time() < deadline and process.poll() is None and not _shard_files(outdir):
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
        process.wait()
        finished = _shard_files(outdir)
        self.assertIn(len(finished), (1, 2), "the kill did not land before the last shard")
        self.assertFalse(os.path.exists(os.path.join(outdir, "robustness.json")))
        paths = [os.path.join(outdir, "shards", name) for name in finished]
        written = [os.stat(path).st_mtime_ns for path in paths]
        resumed = _run(self.workdir, outdir, "--num_cpu_devices=1")
        self._assert_same(resumed)
        # The finished shards were read back, not computed and written again.
        self.assertEqual([os.stat(path).st_mtime_ns for path in paths], written)


if __name__ == "__main__":
    unittest.main()
