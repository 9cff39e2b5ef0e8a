"""Tests for s2s_tf/robustness/sharded.py: attack runs in resumable shards equal local runs."""

import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import s2s_model
from s2s_tf.robustness import distributed
from s2s_tf.robustness import evaluation
from s2s_tf.robustness import sharded
from s2s_tf.robustness import threat_models

SHAPE = (8, 8, 3)


def _setup():
    keras.utils.set_random_seed(1)
    inputs = keras.Input(SHAPE)
    classifier = keras.Model(inputs, keras.layers.Dense(4)(keras.layers.Flatten()(inputs)))
    ae = ae_lib.build_autoencoder(ae_lib.AutoencoderConfig(stage_widths=((4,),)), SHAPE)
    models = threat_models.Models(
        classifier=classifier,
        defended=s2s_model.build_s2s_model(ae, classifier),
        purifier=s2s_model.build_purifier(ae, SHAPE),
    )
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(11, *SHAPE)).astype(np.float32)
    labels = np.asarray(models.defended(images)).argmax(-1)
    config = evaluation.EvalConfig(
        attacks=("fgsm", "pgd", "apgd_ce"),
        adaptive_attacks=("pgd",),
        gradient_free_attacks=("square",),
        threat_models=("gray_box", "white_box", "bpda", "gradient_free", "transfer"),
        eps=(8 / 255,),
        num_examples=11,
        batch_size=4,
        steps=3,
        restarts=1,
        gradient_free_examples=6,
        gradient_free_queries=20,
        check_attack="pgd",
    )
    return models, images, labels, config


class ShardedAttacksTest(tf.test.TestCase):
    def test_sharded_per_example_results_equal_local_ones(self):
        models, images, labels, config = _setup()
        local = evaluation.Evaluator(models, images, labels, config, lambda s: None).run()
        shard_dir = tempfile.mkdtemp()
        runs = sharded.ShardedAttacks(
            tf.distribute.OneDeviceStrategy("/cpu:0"), 4, config.seed, shard_dir, "model-a"
        )
        remote = evaluation.Evaluator(models, images, labels, config, lambda s: None, runs).run()
        self.assertEqual(sorted(local["per_example"]), sorted(remote["per_example"]))
        for key, values in local["per_example"].items():
            self.assertEqual(values, remote["per_example"][key], key)
        self.assertEqual(local["headline"], remote["headline"])
        self.assertNotEmpty(os.listdir(shard_dir))

    def test_a_rerun_reads_the_shards_instead_of_attacking(self):
        models, images, labels, config = _setup()
        shard_dir = tempfile.mkdtemp()
        strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
        scored = {"defended": models.defended}
        args = ("pgd", models.defended, scored, images, labels, 8 / 255, {"steps": 3}, "k")
        first = sharded.ShardedAttacks(strategy, 4, 0, shard_dir, "model-a").correct(*args)
        calls = []
        original = distributed._run_shard
        distributed._run_shard = lambda *a, **k: calls.append(a) or original(*a, **k)
        try:
            again = sharded.ShardedAttacks(strategy, 4, 0, shard_dir, "model-a").correct(*args)
            self.assertEmpty(calls)
            other = sharded.ShardedAttacks(strategy, 4, 0, shard_dir, "model-b").correct(*args)
            self.assertNotEmpty(calls)  # another model's shards are never reused
        finally:
            distributed._run_shard = original
        self.assertAllEqual(first["defended"], again["defended"])
        self.assertAllEqual(first["defended"], other["defended"])

    def test_file_fingerprint_changes_with_the_bytes(self):
        directory = tempfile.mkdtemp()
        path = os.path.join(directory, "m.keras")
        with open(path, "wb") as f:
            f.write(b"one")
        first = sharded.file_fingerprint([path, None])
        with open(path, "wb") as f:
            f.write(b"two")
        self.assertNotEqual(first, sharded.file_fingerprint([path, None]))


if __name__ == "__main__":
    tf.test.main()
