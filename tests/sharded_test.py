"""Tests for s2s_tf/robustness/sharded.py: attack runs in resumable shards equal local runs."""

import dataclasses
import os
import shutil
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
        attacks=("pgd", "apgd_ce"),
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

    def test_indices_seed_each_example_as_in_the_whole_run(self):
        models, _, _, _ = _setup()
        rng = np.random.default_rng(3)
        images = rng.uniform(size=(40, *SHAPE)).astype(np.float32)
        labels = np.asarray(models.defended(images)).argmax(-1)
        runs = sharded.ShardedAttacks(tf.distribute.OneDeviceStrategy("/cpu:0"), 8, 0)
        scored = {"defended": models.defended}
        args = ("testing", models.defended, scored)  # uniform noise in the ball
        whole = runs.correct(*args, images, labels, 0.5, {}, "k")["defended"]
        part = slice(10, 30)
        subset = runs.correct(
            *args, images[part], labels[part], 0.5, {}, "k", indices=np.arange(10, 30)
        )["defended"]
        self.assertAllEqual(subset, whole[part])
        # Without the indices the subset's examples get other random starts.
        renumbered = runs.correct(*args, images[part], labels[part], 0.5, {}, "k")["defended"]
        self.assertNotAllEqual(renumbered, whole[part])
        with self.assertRaisesRegex(ValueError, "indices must be one int per image"):
            runs.correct(*args, images[part], labels[part], 0.5, {}, "k", indices=[1, 2])

    def test_the_shard_key_covers_settings_code_and_examples(self):
        config = evaluation.EvalConfig()
        key_args = ("apgd_ce", "surrogate@1/apgd_ce/8/255", 8 / 255, {"steps": 3}, 1)
        scored = {"defended": None}

        def key(config, indices=None, model_key="m"):
            runs = sharded.ShardedAttacks(
                None, 4, 0, model_key=model_key, settings=sharded.settings_key(config)
            )
            return runs.shard_key(*key_args, scored, np.arange(5) if indices is None else indices)

        base = key(config)
        hotter = dataclasses.replace(config, surrogate_temperatures=(0.3, 1.0, 4.0))
        self.assertNotEqual(key(hotter), base)
        self.assertNotEqual(key(dataclasses.replace(config, steps=7)), base)
        self.assertNotEqual(key(config, indices=np.arange(1, 6)), base)
        self.assertNotEqual(key(config, model_key="other"), base)
        self.assertIn(f"code={sharded.loaded_code_version()}", base)
        # Which examples are attacked is in the indices; their count changes no result.
        self.assertEqual(key(dataclasses.replace(config, num_examples=7)), base)

    def test_code_version_follows_the_sources(self):
        root = tempfile.mkdtemp()
        os.makedirs(os.path.join(root, "attacks"))
        for name in ("runner.py", os.path.join("attacks", "pgd.py")):
            with open(os.path.join(root, name), "w") as f:
                f.write("x = 1\n")
        sources = ("attacks", "runner.py")
        first = sharded.code_version(sources, root)
        self.assertEqual(sharded.code_version(sources, root), first)
        with open(os.path.join(root, "attacks", "pgd.py"), "w") as f:
            f.write("x = 2\n")
        second = sharded.code_version(sources, root)
        self.assertNotEqual(second, first)
        with open(os.path.join(root, "runner.py"), "w") as f:
            f.write('"""A docstring."""\n\n# a comment\nx  =  (1)\n')
        self.assertEqual(sharded.code_version(sources, root), second)  # layout, no code
        with open(os.path.join(root, "runner.py"), "w") as f:
            f.write('x = 1\ny = "a string that is not a docstring"\n')
        self.assertNotEqual(sharded.code_version(sources, root), second)
        with open(os.path.join(root, "runner.py"), "w") as f:
            f.write('def f():\n    """Doc."""\n\n\nx = 1\n')
        third = sharded.code_version(sources, root)
        self.assertNotEqual(third, second)  # a new function
        with open(os.path.join(root, "runner.py"), "w") as f:
            f.write('def f():\n    """Another doc."""\n\n\nx = 1\n')
        self.assertEqual(sharded.code_version(sources, root), third)  # its docstring only
        with self.assertRaisesRegex(FileNotFoundError, "missing.py"):
            sharded.code_version(("missing.py",), root)
        self.assertLen(sharded.code_version(), 16)  # the package's own sources exist

    def test_file_fingerprint_changes_with_the_bytes(self):
        directory = tempfile.mkdtemp()
        path = os.path.join(directory, "m.keras")
        with open(path, "wb") as f:
            f.write(b"one")
        first = sharded.file_fingerprint([path, None])
        with open(path, "wb") as f:
            f.write(b"two")
        self.assertNotEqual(first, sharded.file_fingerprint([path, None]))

    def test_file_fingerprint_is_the_bytes_not_the_path(self):
        directory = tempfile.mkdtemp()
        path = os.path.join(directory, "m.keras")
        with open(path, "wb") as f:
            f.write(b"model")
        copy = os.path.join(tempfile.mkdtemp(), "elsewhere.keras")
        shutil.copy(path, copy)
        first = sharded.file_fingerprint([path, None])
        # The same bytes elsewhere, or by a relative path, are the same models.
        self.assertEqual(sharded.file_fingerprint([copy, None]), first)
        relative = os.path.relpath(path)
        self.assertEqual(sharded.file_fingerprint([relative, None]), first)
        # Which model a file is, and the names the results use, count.
        self.assertNotEqual(sharded.file_fingerprint([None, path]), first)
        self.assertNotEqual(sharded.file_fingerprint([path, None], names=["vgg16"]), first)
        # Digests computed already give the same key without reading the files again.
        digests = s2s_model.file_digests([path])
        self.assertEqual(sharded.file_fingerprint([path, None], digests=digests), first)
        with self.assertRaisesRegex(FileNotFoundError, "missing.keras"):
            sharded.file_fingerprint([os.path.join(directory, "missing.keras")])


if __name__ == "__main__":
    tf.test.main()
