"""The evaluate binary under tf.distribute: replica counts agree, and a killed run resumes."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import unittest

from s2s_tf import testing_utils

ARGS = [
    "--dataset=testing",
    "--image_size=16",
    "--attack_preset=fast",
    "--attacks=fgsm,pgd,apgd_ce",
    "--adaptive_attacks=pgd",
    "--gradient_free_attacks=square",
    "--threat_models=white_box,bpda,gradient_free,transfer",
    "--eps=4/255,8/255",
    "--num_examples=13",
    "--batch_size=6",
    "--steps=3",
    "--gradient_free_examples=5",
    "--gradient_free_queries=10",
    "--gradient_examples=4",
    "--effective_examples=4",
]


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
    )
    if result.returncode != 0:
        raise AssertionError(result.stderr[-3000:])
    with open(os.path.join(outdir, "robustness.json")) as f:
        return json.load(f)["results"]


class EvaluateMainTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.workdir = tempfile.mkdtemp()
        testing_utils.save_tiny_models(cls.workdir)
        cls.one = _run(cls.workdir, os.path.join(cls.workdir, "one"), "--num_cpu_devices=1")

    def test_two_replicas_give_the_one_replica_results(self):
        two = _run(self.workdir, os.path.join(self.workdir, "two"), "--num_cpu_devices=2")
        self.assertEqual(sorted(two["per_example"]), sorted(self.one["per_example"]))
        for key, values in self.one["per_example"].items():
            self.assertEqual(two["per_example"][key], values, key)
        self.assertEqual(two["headline"], self.one["headline"])

    def test_a_killed_evaluation_resumes_to_the_same_report(self):
        outdir = os.path.join(self.workdir, "killed")
        process = subprocess.Popen(
            _command(self.workdir, outdir, "--num_cpu_devices=1"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=tempfile.gettempdir(),
        )
        shards = os.path.join(outdir, "shards")
        deadline = time.time() + 600
        while time.time() < deadline and process.poll() is None:
            if os.path.isdir(shards) and len(os.listdir(shards)) >= 4:
                break
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
        process.wait()
        finished = len(os.listdir(shards))
        self.assertGreater(finished, 0, "no shard was written before the kill")
        self.assertFalse(os.path.exists(os.path.join(outdir, "robustness.json")))
        resumed = _run(self.workdir, outdir, "--num_cpu_devices=1")
        self.assertEqual(resumed["per_example"], self.one["per_example"])
        self.assertEqual(resumed["headline"], self.one["headline"])


if __name__ == "__main__":
    unittest.main()
