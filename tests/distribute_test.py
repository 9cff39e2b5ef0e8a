"""Unit tests for strategy creation and its checks (multi-replica runs: distributed_test.py)."""

import json
import os
from unittest import mock

import tensorflow as tf
from absl.testing import parameterized

from s2s_tf.train import distribute


class _FakeStrategy:
    def __init__(self, replicas):
        self.num_replicas_in_sync = replicas


class DistributeTest(tf.test.TestCase, parameterized.TestCase):
    def test_one_device_and_mirrored(self):
        one = distribute.create_strategy("one_device")
        self.assertIsInstance(one, tf.distribute.OneDeviceStrategy)
        mirrored = distribute.create_strategy("mirrored")
        self.assertIsInstance(mirrored, tf.distribute.MirroredStrategy)
        self.assertEqual(mirrored.num_replicas_in_sync, len(tf.config.list_logical_devices("CPU")))
        self.assertTrue(distribute.is_chief(mirrored))

    def test_unknown_strategy(self):
        with self.assertRaisesRegex(ValueError, "strategy must be one of"):
            distribute.create_strategy("tpu")

    def test_global_batch_must_split_over_replicas(self):
        distribute.check_global_batch(8, _FakeStrategy(2))
        with self.assertRaisesRegex(ValueError, "not divisible by the 2 replicas"):
            distribute.check_global_batch(7, _FakeStrategy(2))

    @parameterized.named_parameters(
        ("missing", None, "needs the TF_CONFIG"),
        ("not_json", "{oops", "not valid JSON"),
        ("no_task", json.dumps({"cluster": {"worker": ["a:1"]}}), "needs 'cluster' and 'task'"),
    )
    def test_tf_config_errors(self, value, pattern):
        env = {} if value is None else {"TF_CONFIG": value}
        with (
            mock.patch.dict(os.environ, env, clear=True),
            self.assertRaisesRegex(ValueError, pattern),
        ):
            distribute.create_strategy("multi_worker")

    def test_split_cpu_after_initialisation_names_the_problem(self):
        tf.constant(1.0) + 1.0  # TensorFlow is initialised by now
        with self.assertRaisesRegex(RuntimeError, "already initialised"):
            distribute.split_cpu(len(tf.config.list_logical_devices("CPU")) + 1)
        distribute.split_cpu(1)  # no-op


if __name__ == "__main__":
    tf.test.main()
