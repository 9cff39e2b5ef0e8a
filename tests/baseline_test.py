"""Tests of what makes the main job's baseline credible.

- BatchNorm statistics are re-estimated on training data at the end of every
  stage that trains BatchNorm, and the saved models carry them;
- stage 2's default loss needs no labels (KL to the classifier's clean predictions);
- the pipeline's training defaults are the measured ones.
"""

import dataclasses
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

from s2s_tf import constants
from s2s_tf import data as data_lib
from s2s_tf import pipeline
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import classifiers
from s2s_tf.models import s2s_model
from s2s_tf.train import checkpointing
from s2s_tf.train import optim
from s2s_tf.train import stages
from s2s_tf.train import train_lib
from s2s_tf.train import trainer

SIZE = (16, 16)
TINY_AE = ae_lib.AutoencoderConfig(stage_widths=((4,), (8,)))
SYNTHETIC = data_lib.DataConfig(source="testing", image_size=SIZE, global_batch_size=8)


def _loop(steps):
    return trainer.LoopConfig(
        train_steps=steps, steps_per_loop=steps, checkpoint_every=100, eval_every=100,
        summary_every=100,
    )  # fmt: skip


def _all_batch_norms(model):
    """Every BatchNormalization layer of `model`, trainable or not, nested ones included."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
        elif hasattr(layer, "layers"):
            found.extend(_all_batch_norms(layer))
    return found


def _bn_stats(layers):
    return [(np.array(layer.moving_mean), np.array(layer.moving_variance)) for layer in layers]


class RecalibrateBatchNormTest(tf.test.TestCase):
    def _model(self):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4, 4, 2))
        x = keras.layers.Conv2D(3, 3, padding="same", name="conv")(inputs)
        x = keras.layers.BatchNormalization(momentum=0.99, name="trained")(x)
        frozen = keras.layers.BatchNormalization(name="frozen")
        frozen.trainable = False
        return keras.Model(inputs, frozen(x))

    def test_statistics_are_the_average_of_the_batches(self):
        model = self._model()
        layer = model.get_layer("trained")
        frozen_before = _bn_stats([model.get_layer("frozen")])
        rng = np.random.default_rng(0)
        batches = [rng.normal(3.0, 2.0, (5, 4, 4, 2)).astype("float32") for _ in range(3)]

        used = stages.recalibrate_batch_norm(
            lambda x: model(x, training=True), stages.trained_batch_norms(model), batches
        )

        self.assertEqual(used, 3)
        features = [np.asarray(model.get_layer("conv")(b)) for b in batches]
        expected_mean = np.mean([f.mean(axis=(0, 1, 2)) for f in features], axis=0)
        expected_variance = np.mean([f.var(axis=(0, 1, 2)) for f in features], axis=0)
        self.assertAllClose(layer.moving_mean, expected_mean, rtol=1e-5, atol=1e-5)
        self.assertAllClose(layer.moving_variance, expected_variance, rtol=1e-4, atol=1e-5)
        self.assertEqual(layer.momentum, 0.99)  # restored
        for before, after in zip(
            frozen_before, _bn_stats([model.get_layer("frozen")]), strict=True
        ):
            self.assertAllEqual(before, after)

    def test_no_batches_is_an_error(self):
        model = self._model()
        with self.assertRaisesRegex(ValueError, "no batches"):
            stages.recalibrate_batch_norm(
                lambda x: model(x, training=True), stages.trained_batch_norms(model), []
            )
        self.assertEqual(model.get_layer("trained").momentum, 0.99)

    def test_finds_nested_trained_layers_only(self):
        classifier = classifiers.build_classifier_with_preprocessing("small_cnn", SIZE, 10)
        self.assertLen(stages.trained_batch_norms(classifier), 6)
        autoencoder = ae_lib.build_autoencoder(TINY_AE, input_shape=(*SIZE, 3))
        ae_lib.get_encoder(autoencoder).trainable = False
        names = {layer.name for layer in stages.trained_batch_norms(autoencoder)}
        self.assertEqual(names, {"bn11d", "bn21d"})


class StageRecalibrationTest(tf.test.TestCase):
    def _train_small_cnn(self, batches):
        workdir = tempfile.mkdtemp()
        keras.utils.set_random_seed(0)
        config = train_lib.TrainConfig(
            stage="stage0",
            model=stages.ModelConfig(classifier="small_cnn", image_size=SIZE),
            train_data=SYNTHETIC,
            eval_data=dataclasses.replace(SYNTHETIC, split="test", augment=False),
            loop=_loop(4),
            optimizer=optim.OptimizerConfig(learning_rate=0.05),
            bn_recalibration_batches=batches,
        )
        result = train_lib.train(config, workdir, tf.distribute.OneDeviceStrategy("/cpu:0"))
        saved = keras.saving.load_model(constants.classifier_path(workdir))
        return workdir, result, saved

    def test_saved_classifier_has_training_data_statistics(self):
        _, result, saved = self._train_small_cnn(batches=3)
        # The first BatchNorm's input does not depend on any statistics: recompute it.
        inner = saved.get_layer("classifier")
        # The recalibration reads the training pipeline as training does (augmented).
        batches = data_lib.make_dataset_fn(SYNTHETIC, training=True)(None).take(3)
        features = [
            np.asarray(inner.get_layer("block1_conv1")(saved.get_layer("preprocess")(x)))
            for x, _ in batches
        ]
        layer = inner.get_layer("block1_conv1_bn")
        expected = np.mean([f.mean(axis=(0, 1, 2)) for f in features], axis=0)
        self.assertAllClose(layer.moving_mean, expected, rtol=1e-4, atol=1e-5)
        expected = np.mean([f.var(axis=(0, 1, 2)) for f in features], axis=0)
        self.assertAllClose(layer.moving_variance, expected, rtol=1e-3, atol=1e-5)
        # The reported evaluation is the saved model's, the moving-average one is kept too.
        self.assertIn("eval_before_bn_recalibration", result)
        self.assertEqual(set(result["eval"]), {"loss", "accuracy"})

    def test_zero_batches_keeps_the_moving_averages(self):
        workdir, result, saved = self._train_small_cnn(batches=0)
        self.assertNotIn("eval_before_bn_recalibration", result)
        restored = classifiers.build_classifier_with_preprocessing("small_cnn", SIZE, 10)
        checkpoint = tf.train.Checkpoint(classifier=restored)
        checkpoint.read(tf.train.latest_checkpoint(os.path.join(workdir, "stage0", "checkpoints")))
        for a, b in zip(restored.weights, saved.weights, strict=True):
            self.assertAllEqual(a, b)

    def test_stage2_recalibrates_the_decoder_only(self):
        workdir = tempfile.mkdtemp()
        keras.utils.set_random_seed(0)
        ae = ae_lib.build_autoencoder(TINY_AE, input_shape=(*SIZE, 3))
        ae(tf.random.normal((8, *SIZE, 3)), training=True)  # non-trivial statistics
        classifier = classifiers.build_classifier_with_preprocessing("small_cnn", SIZE, 10)
        config = stages.ModelConfig(
            classifier="small_cnn",
            image_size=SIZE,
            autoencoder=TINY_AE,
            autoencoder_path=checkpointing.save_keras_atomic(ae, os.path.join(workdir, "a.keras")),
            classifier_path=checkpointing.save_keras_atomic(
                classifier, os.path.join(workdir, "c.keras")
            ),
        )
        stage = stages.DecoderStage(config, recalibration=stages.Recalibration(SYNTHETIC, 2))
        run = trainer.Trainer(
            stage, tf.distribute.OneDeviceStrategy("/cpu:0"), _loop(3), optim.OptimizerConfig(),
            workdir, SYNTHETIC,
        )  # fmt: skip
        run.train()  # saves the final models, which re-estimates the decoder's statistics
        frozen = _all_batch_norms(ae_lib.get_encoder(ae)) + _all_batch_norms(classifier)
        saved = s2s_model.load_keras(constants.defended_path(workdir), "defended")
        saved_frozen = _all_batch_norms(
            ae_lib.get_encoder(s2s_model.get_autoencoder(saved))
        ) + _all_batch_norms(s2s_model.get_classifier(saved))
        self.assertLen(saved_frozen, 2 + 6)
        for (m0, v0), (m1, v1) in zip(_bn_stats(frozen), _bn_stats(saved_frozen), strict=True):
            self.assertAllEqual(m0, m1)
            self.assertAllEqual(v0, v1)
        self.assertEqual(stage.recalibrate_batch_norm(), 2)  # the decoder's two, done once
        before = _bn_stats(stages.trained_batch_norms(stage.decoder))
        self.assertEqual(stage.recalibrate_batch_norm(), 2)
        after = _bn_stats(stages.trained_batch_norms(stage.decoder))
        for (m0, _), (m1, _) in zip(before, after, strict=True):
            self.assertAllEqual(m0, m1)


class LabelFreeStage2Test(tf.test.TestCase):
    def test_default_loss_ignores_labels(self):
        workdir = tempfile.mkdtemp()
        keras.utils.set_random_seed(0)
        ae = ae_lib.build_autoencoder(TINY_AE, input_shape=(*SIZE, 3))
        classifier = classifiers.build_classifier_with_preprocessing("testing", SIZE, 10)
        config = stages.ModelConfig(
            classifier="testing",
            image_size=SIZE,
            autoencoder_path=checkpointing.save_keras_atomic(ae, os.path.join(workdir, "a.keras")),
            classifier_path=checkpointing.save_keras_atomic(
                classifier, os.path.join(workdir, "c.keras")
            ),
        )
        images = tf.random.uniform((4, *SIZE, 3))
        labels, other = tf.constant([0, 1, 2, 3]), tf.constant([9, 8, 7, 6])
        default, xent = stages.DecoderStage(config), stages.DecoderStage(config, loss="xent")
        for stage, label_free in ((default, True), (xent, False)):
            stage.build()
            a = stage.train_outputs(images, labels)["task_loss"]
            b = stage.train_outputs(images, other)["task_loss"]
            self.assertEqual(bool(np.allclose(a, b)), label_free, stage.loss)

    def test_defaults(self):
        self.assertEqual(train_lib.TrainConfig().stage2_loss, "kl")
        config = pipeline.PipelineConfig()
        self.assertEqual(config.stage2_loss, "kl")
        model = stages.ModelConfig(autoencoder_path="ae.keras")
        stage0 = pipeline._train_config(config, "stage0", config.classifier_steps, model)
        stage2 = pipeline._train_config(config, "stage2", config.stage2_steps, model)
        self.assertEqual(stage0.train_data.augment, "off")
        self.assertEqual(stage0.optimizer.learning_rate, config.learning_rate)
        self.assertEqual(stage2.optimizer.learning_rate, config.stage2_learning_rate)
        self.assertEqual(stage2.optimizer.schedule, "cosine")
        self.assertEqual(
            (stage2.stage2_loss, stage2.reconstruction_weight), ("kl", config.reconstruction_weight)
        )
        self.assertIsInstance(train_lib.make_stage(stage2).recalibration, stages.Recalibration)


if __name__ == "__main__":
    tf.test.main()
