"""Tests for stage checkpoints and atomic model files."""

import os
import tempfile

import keras
import tensorflow as tf

from s2s_tf.models import s2s_model
from s2s_tf.train import checkpointing


class CheckpointingTest(tf.test.TestCase):
    def test_save_restore_and_partial_save_cleanup(self):
        stage_dir = tempfile.mkdtemp()
        strategy = tf.distribute.get_strategy()
        variable = tf.Variable(1.0)
        checkpoints = checkpointing.StageCheckpoints(
            tf.train.Checkpoint(v=variable), stage_dir, strategy
        )
        self.assertEqual(checkpoints.restore(), 0)
        variable.assign(5.0)
        path = checkpoints.save(12)
        self.assertTrue(path.endswith("ckpt-12"))
        self.assertEqual(checkpoints.save(12), path)  # same step: no second save
        # A save killed half-way leaves temporary files behind.
        partial = os.path.join(checkpoints.directory, "ckpt-13_temp")
        os.makedirs(partial)
        variable.assign(0.0)
        fresh = checkpointing.StageCheckpoints(tf.train.Checkpoint(v=variable), stage_dir, strategy)
        self.assertEqual(fresh.restore(), 12)
        self.assertEqual(float(variable.numpy()), 5.0)
        self.assertFalse(os.path.exists(partial))
        self.assertEqual(fresh.latest, path)

    def test_atomic_keras_save_and_load(self):
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        path = os.path.join(tempfile.mkdtemp(), "sub", "model.keras")
        checkpointing.save_keras_atomic(model, path)
        self.assertEqual(os.listdir(os.path.dirname(path)), ["model.keras"])
        loaded = s2s_model.load_keras(path, "test model")
        self.assertAllClose(loaded(tf.ones((1, 3))), model(tf.ones((1, 3))))
        with self.assertRaisesRegex(FileNotFoundError, "test model not found"):
            s2s_model.load_keras(path + ".missing", "test model")


if __name__ == "__main__":
    tf.test.main()
