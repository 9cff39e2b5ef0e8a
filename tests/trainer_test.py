"""Tests for the trainer: loop config, step accounting, precision and XLA options."""

import os
import tempfile

import keras
import tensorflow as tf
from absl.testing import parameterized

from s2s_tf import data as data_lib
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.train import loop_utils
from s2s_tf.train import optim
from s2s_tf.train import stages
from s2s_tf.train import trainer

DATA = data_lib.DataConfig(source="testing", image_size=(16, 16), global_batch_size=8)


def _stage(pool_impl="native"):
    ae = ae_lib.AutoencoderConfig(stage_widths=((4,), (8,)), pool_impl=pool_impl)
    return stages.ReconstructionStage(stages.ModelConfig(image_size=(16, 16), autoencoder=ae))


class TrainerTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.named_parameters(
        ("zero_steps", dict(train_steps=0), "train_steps"),
        ("float", dict(steps_per_loop=2.5), "steps_per_loop"),
    )
    def test_bad_loop_config(self, kwargs, pattern):
        with self.assertRaisesRegex(ValueError, pattern):
            trainer.LoopConfig(**kwargs).validate()

    def test_crossed(self):
        self.assertTrue(loop_utils.crossed(10, 5, 10))
        self.assertTrue(loop_utils.crossed(12, 5, 10))
        self.assertFalse(loop_utils.crossed(9, 5, 10))
        self.assertEqual(loop_utils.to_next(7, 5), 3)

    def test_robust_watch_flags_a_collapse_only(self):
        watch = loop_utils.RobustWatch(fraction=0.5, min_drop=0.1)
        flags = [
            watch.update({"accuracy": a}, "stage2", step)["overfitting_suspected"]
            for step, a in enumerate((0.30, 0.45, 0.40, 0.20, 0.05))
        ]
        self.assertEqual(flags, [0.0, 0.0, 0.0, 1.0, 1.0])
        self.assertEqual(watch.best, 0.45)
        small = loop_utils.RobustWatch()  # near 0 %, noise is not a collapse
        small.update({"accuracy": 0.06}, "stage2", 0)
        self.assertEqual(small.update({"accuracy": 0.0}, "stage2", 1)["overfitting_suspected"], 0)
        self.assertEqual(small.update({"psnr": 20.0}, "stage1", 2), {"psnr": 20.0})

    def test_steps_checkpoints_and_summaries(self):
        workdir = tempfile.mkdtemp()
        loop = trainer.LoopConfig(
            train_steps=7, steps_per_loop=3, checkpoint_every=4, eval_every=4, summary_every=4
        )
        run = trainer.Trainer(
            _stage(), tf.distribute.get_strategy(), loop, optim.OptimizerConfig(), workdir, DATA
        )
        result = run.train()
        self.assertEqual(result["step"], 7)
        self.assertEqual(run.step, 7)
        names = os.listdir(os.path.join(workdir, "stage1", "checkpoints"))
        # Loops stop at checkpoint boundaries: steps 4 and 7 (the end) were saved.
        self.assertIn("ckpt-4.index", names)
        self.assertIn("ckpt-7.index", names)
        self.assertTrue(os.listdir(os.path.join(workdir, "train", "stage1")))
        self.assertGreater(result["train"]["images_per_sec"], 0)
        self.assertGreater(result["train"]["psnr"], 0)

    @parameterized.named_parameters(
        ("mixed_precision", dict(mixed_precision=True), "native"),
        ("xla", dict(jit_compile=True), "stock"),
    )
    def test_precision_and_compilation_options_train(self, options, pool_impl):
        loop = trainer.LoopConfig(train_steps=2, steps_per_loop=2, **options)
        config = optim.OptimizerConfig(clip_global_norm=1.0)
        stage = _stage(pool_impl)
        run = trainer.Trainer(
            stage, tf.distribute.get_strategy(), loop, config, tempfile.mkdtemp(), DATA
        )
        result = run.train()
        if options.get("mixed_precision"):
            conv = ae_lib.get_encoder(stage.autoencoder).get_layer("conv11")
            self.assertEqual(conv.compute_dtype, "float16")
            self.assertEqual(keras.config.dtype_policy().name, "float32")  # restored
        self.assertEqual(result["step"], 2)
        self.assertTrue(tf.math.is_finite(result["train"]["loss"]))


if __name__ == "__main__":
    tf.test.main()
