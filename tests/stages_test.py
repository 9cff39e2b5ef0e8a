"""Tests for the training stages: what each trains, what it freezes, that losses fall."""

import dataclasses
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from s2s_tf import constants
from s2s_tf import data as data_lib
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import classifiers
from s2s_tf.models import s2s_model
from s2s_tf.train import checkpointing
from s2s_tf.train import optim
from s2s_tf.train import stages
from s2s_tf.train import train_lib
from s2s_tf.train import trainer

TINY_AE = ae_lib.AutoencoderConfig(stage_widths=((4,), (8,)))
SIZE = (16, 16)
SYNTHETIC = data_lib.DataConfig(source="testing", image_size=SIZE, global_batch_size=8)
FASHION_MNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
TESTDATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata")


def _strategy():
    return tf.distribute.OneDeviceStrategy("/cpu:0")


def _loop(steps):
    return trainer.LoopConfig(
        train_steps=steps, steps_per_loop=5, checkpoint_every=100, eval_every=100, summary_every=5
    )


def _save_stage1_inputs(directory):
    """Saves an (untrained) tiny autoencoder and `testing` classifier; returns the config."""
    keras.utils.set_random_seed(0)
    ae = ae_lib.build_autoencoder(TINY_AE, input_shape=(16, 16, 3))
    ae(tf.random.normal((8, 16, 16, 3)), training=True)  # non-trivial BN statistics
    classifier = classifiers.build_classifier_with_preprocessing("testing", (16, 16), 10)
    return stages.ModelConfig(
        classifier="testing",
        image_size=(16, 16),
        autoencoder=TINY_AE,
        autoencoder_path=checkpointing.save_keras_atomic(ae, os.path.join(directory, "ae.keras")),
        classifier_path=checkpointing.save_keras_atomic(
            classifier, os.path.join(directory, "clf.keras")
        ),
    )


def _weights(model):
    return [np.array(w) for w in model.weights]


class DecoderStageTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.parameters("xent", "kl")
    def test_only_decoder_variables_change(self, loss):
        workdir = tempfile.mkdtemp()
        model_config = _save_stage1_inputs(workdir)
        stage = stages.DecoderStage(model_config, loss=loss, reconstruction_weight=0.1)
        run = trainer.Trainer(
            stage, _strategy(), _loop(5), optim.OptimizerConfig(learning_rate=0.01), workdir,
            SYNTHETIC,
        )  # fmt: skip
        encoder = ae_lib.get_encoder(stage.autoencoder)
        decoder = ae_lib.get_decoder(stage.autoencoder)
        before = [_weights(m) for m in (encoder, stage.classifier, decoder)]
        self.assertEqual(
            {v.path for v in stage.trainable_variables},
            {v.path for v in decoder.trainable_variables},
        )
        run.train()
        after = [_weights(m) for m in (encoder, stage.classifier, decoder)]
        for frozen_before, frozen_after in zip(before[:2], after[:2], strict=True):
            for b, a in zip(frozen_before, frozen_after, strict=True):
                self.assertAllEqual(b, a)  # bit-identical, BN moving statistics included
        changed = [not np.array_equal(b, a) for b, a in zip(before[2], after[2], strict=True)]
        self.assertTrue(all(changed[:2]), "decoder conv weights did not change")
        final = os.path.join(workdir, "stage2")
        self.assertTrue(os.path.exists(os.path.join(final, constants.DEFENDED_FILE)))

    def test_starts_from_the_authors_checkpoint(self):
        """--init_from: the PyTorch SegNet fixture (.npz) is converted on load."""
        config = stages.ModelConfig(
            classifier="testing",
            image_size=(32, 32),
            autoencoder_path=os.path.join(TESTDATA, "segnet_fixture_state.npz"),
        )
        stage = stages.DecoderStage(config)
        stage.build()
        with np.load(os.path.join(TESTDATA, "segnet_fixture_reference.npz")) as reference:
            images = np.transpose(reference["input"], (0, 2, 3, 1))
            expected = np.transpose(reference["output"], (0, 2, 3, 1))
        self.assertAllClose(stage.autoencoder(images, training=False), expected, atol=1e-5, rtol=0)
        self.assertFalse(ae_lib.get_encoder(stage.autoencoder).trainable)

    def test_needs_the_stage1_autoencoder(self):
        stage = stages.DecoderStage(stages.ModelConfig(autoencoder_path="/nonexistent/ae.keras"))
        with self.assertRaisesRegex(FileNotFoundError, "stage-1 autoencoder"):
            stage.build()
        with self.assertRaisesRegex(ValueError, "stage-2 loss"):
            stages.DecoderStage(stages.ModelConfig(), loss="mse")


class LossesFallTest(tf.test.TestCase, parameterized.TestCase):
    """A few dozen steps on real Fashion-MNIST lower the training loss."""

    def setUp(self):
        super().setUp()
        if not os.path.exists(FASHION_MNIST):
            self.skipTest(f"{FASHION_MNIST} missing: apt-get install dataset-fashion-mnist")

    @parameterized.parameters("stage0", "stage1")
    def test_loss_falls(self, stage):
        keras.utils.set_random_seed(0)
        workdir = tempfile.mkdtemp()
        config = train_lib.TrainConfig(
            stage=stage,
            model=stages.ModelConfig(
                classifier="lenet5",
                image_size=(28, 28),
                autoencoder=ae_lib.AutoencoderConfig(stage_widths=((8, 8), (16, 16))),
            ),
            train_data=data_lib.DataConfig(image_size=(28, 28), global_batch_size=32),
            loop=dataclasses.replace(_loop(5), steps_per_loop=5),
            optimizer=optim.OptimizerConfig(learning_rate=3e-3),
        )
        first = train_lib.train(config, workdir, _strategy())["train"]["loss"]
        # Same workdir, more steps: resumes at step 5 and trains on.
        config = dataclasses.replace(config, loop=dataclasses.replace(config.loop, train_steps=40))
        result = train_lib.train(config, workdir, _strategy())
        self.assertEqual(result["step"], 40)
        self.assertLess(result["train"]["loss"], 0.8 * first)


class ReconstructionStageTest(tf.test.TestCase):
    def test_eval_reports_classifier_and_defended_accuracy(self):
        workdir = tempfile.mkdtemp()
        model_config = dataclasses.replace(_save_stage1_inputs(workdir), autoencoder_path=None)
        stage = stages.ReconstructionStage(model_config, loss="l1", with_classifier=True)
        eval_data = dataclasses.replace(SYNTHETIC, split="test", augment=False)
        run = trainer.Trainer(
            stage, _strategy(), _loop(5), optim.OptimizerConfig(), workdir, SYNTHETIC, eval_data
        )
        result = run.train()
        self.assertEqual(
            set(result["eval"]), {"loss", "psnr", "accuracy_classifier", "accuracy_defended"}
        )
        # The reported accuracies are those of the saved models, recomputed here.
        images, labels = data_lib.load_numpy(eval_data)
        ae_path = os.path.join(workdir, "stage1", constants.AUTOENCODER_FILE)
        defended = s2s_model.build_s2s_model(s2s_model.load_keras(ae_path), stage.classifier)
        for key, model in (
            ("accuracy_classifier", stage.classifier),
            ("accuracy_defended", defended),
        ):
            predictions = np.argmax(model(images, training=False), -1)
            self.assertAllClose(result["eval"][key], np.mean(predictions == labels), atol=1e-6)


class DecoderTrainingTest(tf.test.TestCase):
    """Stage 2 on a separable toy set: the classifier's gradients must teach the decoder."""

    def test_loss_falls_and_defended_accuracy_rises_above_chance(self):
        workdir = tempfile.mkdtemp()
        train_data = _write_colour_folder(os.path.join(workdir, "data"))
        eval_data = dataclasses.replace(train_data, split="test")
        stage = stages.DecoderStage(_save_colour_models(workdir), loss="xent")
        run = trainer.Trainer(
            stage,
            _strategy(),
            dataclasses.replace(_loop(30), steps_per_loop=10),
            optim.OptimizerConfig(learning_rate=0.01),
            workdir,
            train_data,
            eval_data,
        )
        before = run.evaluate()
        # The clean classifier is perfect; the constant reconstruction sits exactly at chance.
        self.assertEqual(before["accuracy_classifier"], 1.0)
        self.assertEqual(before["accuracy_defended"], 0.5)
        after = run.train()["eval"]
        self.assertLess(after["task_loss"], 0.5 * before["task_loss"])
        self.assertGreaterEqual(after["accuracy_defended"], 0.9)


def _write_colour_folder(root, per_class=16):
    """A separable toy set as a folder source: class 0 reddish, class 1 greenish noise.

    Returns:
      The training `DataConfig`; a held-out "test" split of the same size is written too.
    """
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label, name in enumerate(("0_red", "1_green")):
            os.makedirs(os.path.join(root, split, name))
            for i in range(per_class):
                image = rng.uniform(0.3, 0.7, (*SIZE, 3))
                image[..., label] += 0.25
                png = tf.io.encode_png(np.round(image * 255).astype(np.uint8))
                tf.io.write_file(os.path.join(root, split, name, f"{i}.png"), png)
    return data_lib.DataConfig(
        source="folder", folder=root, image_size=SIZE, global_batch_size=8, augment=False
    )


def _save_colour_models(directory):
    """Saves a perfect red-vs-green classifier and an autoencoder with a constant output.

    The classifier compares the mean red and green values. The decoder's last conv
    starts at zero, so every reconstruction is the same image and the defended model
    starts at chance; only training the decoder through the classifier can fix that.
    """
    keras.utils.set_random_seed(0)
    inputs = keras.Input((*SIZE, 3))
    dense = keras.layers.Dense(2)
    classifier = keras.Model(inputs, dense(keras.layers.GlobalAveragePooling2D()(inputs)))
    dense.set_weights([np.array([[20.0, -20.0], [-20.0, 20.0], [0.0, 0.0]]), np.zeros(2)])
    ae = ae_lib.build_autoencoder(TINY_AE, input_shape=(*SIZE, 3))
    ae(tf.random.normal((8, *SIZE, 3)), training=True)  # non-trivial BN statistics
    final = ae_lib.get_decoder(ae).get_layer("conv_final")
    final.kernel.assign(tf.zeros_like(final.kernel))
    return stages.ModelConfig(
        num_classes=2,
        image_size=SIZE,
        autoencoder=TINY_AE,
        autoencoder_path=checkpointing.save_keras_atomic(ae, os.path.join(directory, "ae.keras")),
        classifier_path=checkpointing.save_keras_atomic(
            classifier, os.path.join(directory, "clf.keras")
        ),
    )


if __name__ == "__main__":
    tf.test.main()
