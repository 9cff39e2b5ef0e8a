"""Adversarial training: the inner attack, one adversarial step of stages 0 and 2, the check.

- one adversarial stage-2 step on a tiny model: the perturbation stays within the
  budget and [0, 1]; no label tensor is an ancestor of the loss (label-free by
  default); only the chosen part's variables change, the classifier's and (decoder
  only) the encoder's stay bit-identical, BatchNorm statistics included;
- the inner attack follows the soft-routing surrogate's gradient, not the hard
  switches' (the test fails if the attack differentiates the real model);
- Madry's stage 0 attacks the labels and trains on the perturbed images;
- the settings parse budgets like "8/255" and reject bad ones.
"""

import dataclasses
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from s2s_tf import data as data_lib
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import classifiers
from s2s_tf.models import s2s_model
from s2s_tf.robustness import surrogates
from s2s_tf.train import adversarial
from s2s_tf.train import checkpointing
from s2s_tf.train import optim
from s2s_tf.train import stages
from s2s_tf.train import train_lib
from s2s_tf.train import trainer

TINY_AE = ae_lib.AutoencoderConfig(stage_widths=((4,), (8,)))
SIZE = (16, 16)
DATA = data_lib.DataConfig(source="testing", image_size=SIZE, global_batch_size=8, seed=3)
EPS = 8 / 255


def _save_models(directory):
    """A tiny autoencoder (with non-trivial BatchNorm statistics) and classifier on disk."""
    keras.utils.set_random_seed(0)
    ae = ae_lib.build_autoencoder(TINY_AE, input_shape=(*SIZE, 3))
    ae(tf.random.normal((8, *SIZE, 3)), training=True)
    classifier = classifiers.build_classifier_with_preprocessing("testing", SIZE, 10)
    return stages.ModelConfig(
        classifier="testing",
        image_size=SIZE,
        autoencoder=TINY_AE,
        autoencoder_path=checkpointing.save_keras_atomic(ae, os.path.join(directory, "ae.keras")),
        classifier_path=checkpointing.save_keras_atomic(
            classifier, os.path.join(directory, "clf.keras")
        ),
    )


def _weights(model):
    return [np.array(w) for w in model.weights]


def _ancestors(tensor):
    """Every op the tensor depends on (inputs and control inputs, transitively)."""
    seen, stack = set(), [tensor.op]
    while stack:
        op = stack.pop()
        if op.name in seen:
            continue
        seen.add(op.name)
        stack.extend(t.op for t in op.inputs)
        stack.extend(op.control_inputs)
    return seen


def _batch():
    images, labels = data_lib.load_numpy(
        data_lib.DataConfig(source="testing", image_size=SIZE, num_examples=8)
    )
    return tf.constant(images), tf.constant(labels)


class AdversarialStage2Test(tf.test.TestCase, parameterized.TestCase):
    def _stage(self, workdir, trainable="decoder", loss="kl", **attack):
        config = adversarial.AdversarialConfig(
            train_eps=EPS, train_attack_steps=2, robust_check_examples=0, **attack
        )
        return stages.DecoderStage(
            _save_models(workdir),
            loss=loss,
            objective="adversarial",
            trainable=trainable,
            adversarial=config,
            calibration_data=DATA,
        )

    @parameterized.parameters("decoder", "autoencoder")
    def test_one_step_trains_only_the_chosen_part(self, trainable):
        workdir = tempfile.mkdtemp()
        stage = self._stage(workdir, trainable)
        loop = trainer.LoopConfig(train_steps=1, steps_per_loop=1)
        sgd = optim.OptimizerConfig(name="sgd", learning_rate=0.5, momentum=0.0)
        run = trainer.Trainer(stage, tf.distribute.get_strategy(), loop, sgd, workdir, DATA)
        images, labels = _batch()
        perturbed = stage.perturb(images, labels, tf.constant(0, tf.int64)).numpy()
        size = np.max(np.abs(perturbed - images.numpy()), axis=(1, 2, 3))
        self.assertAllLessEqual(size, EPS + 1e-6)
        self.assertGreater(size.min(), 0.9 * EPS)  # the attack uses its budget
        self.assertAllInRange(perturbed, 0.0, 1.0)

        encoder = ae_lib.get_encoder(stage.autoencoder)
        parts = (stage.classifier, encoder, stage.decoder)
        before = [_weights(m) for m in parts]
        result = run.train()
        self.assertEqual(result["step"], 1)
        self.assertLessEqual(result["train"]["perturbation_linf"], EPS + 1e-6)
        after = [_weights(m) for m in parts]
        for b, a in zip(before[0], after[0], strict=True):
            self.assertAllEqual(b, a)  # the classifier: bit-identical
        changed = [
            [not np.array_equal(b, a) for b, a in zip(bs, as_, strict=True)]
            for bs, as_ in zip(before, after, strict=True)
        ]
        encoder_changed = any(changed[1])
        self.assertEqual(encoder_changed, trainable == "autoencoder")
        if trainable == "decoder":
            for b, a in zip(before[1], after[1], strict=True):
                self.assertAllEqual(b, a)  # BatchNorm moving statistics included
        self.assertTrue(any(changed[2]), "the decoder did not change")

    @parameterized.parameters(
        ("paper", "auto", "decoder"),
        ("adversarial", "auto", "autoencoder"),
        ("adversarial", "decoder", "decoder"),
        ("paper", "autoencoder", "autoencoder"),
    )
    def test_auto_trains_what_measured_better_for_the_objective(self, objective, given, trains):
        config = train_lib.TrainConfig(
            stage="stage2",
            model=stages.ModelConfig(autoencoder_path="stage1/autoencoder.keras"),
            stage2_objective=objective,
            stage2_trainable=given,
        )
        config.validate()
        self.assertEqual(train_lib.TrainConfig().stage2_trainable, "auto")
        self.assertEqual(train_lib.resolve(config).stage2_trainable, trains)
        with self.assertRaisesRegex(ValueError, "stage2_trainable must be one of"):
            dataclasses.replace(config, stage2_trainable="encoder").validate()

    @parameterized.parameters(("kl", False), ("xent", True))
    def test_labels_enter_the_loss_only_with_xent(self, loss, uses_labels):
        stage = self._stage(tempfile.mkdtemp(), loss=loss)
        stage.build()
        stage.global_step = tf.Variable(0, dtype=tf.int64)
        images, labels = _batch()

        @tf.function
        def step(images, labels):
            outputs = stage.train_outputs(images, labels)
            return outputs["loss"], outputs["perturbation_linf"]

        concrete = step.get_concrete_function(
            tf.TensorSpec(images.shape, tf.float32), tf.TensorSpec(labels.shape, tf.int32)
        )
        label_input = concrete.graph.inputs[1]
        self.assertEqual(label_input.dtype, tf.int32)
        for output in concrete.graph.outputs:
            self.assertEqual(label_input.op.name in _ancestors(output), uses_labels)
        # The same in numbers: other labels, the same loss. Each call moves the decoder's
        # BatchNorm statistics (training mode), which the next call's attack reads: reset them.
        weights = stage.autoencoder.get_weights()
        first = step(images, labels)
        stage.autoencoder.set_weights(weights)
        other = step(images, (labels + 1) % 10)
        self.assertEqual(bool(np.allclose(first[0], other[0])), not uses_labels)

    def test_inner_attack_follows_the_surrogate_gradient(self):
        # One FGSM step from the random start: its sign must be the surrogate gradient's.
        stage = self._stage(tempfile.mkdtemp(), train_attack="fgsm_rs", train_step_size=1 / 255)
        stage.build()
        images, labels = _batch()
        step = tf.constant(5, tf.int64)
        perturbed = stage.perturb(images, labels, step)
        seeds = adversarial.example_seeds(0, step, images.shape[0])
        start = adversarial.project(images, adversarial.random_start(images, EPS, seeds), EPS)

        purifier = s2s_model.build_purifier(stage.autoencoder, (*SIZE, 3))
        composite = s2s_model.build_s2s_model(stage.autoencoder, stage.classifier)
        clean = composite(images)

        def loss(logits):
            return tf.reduce_sum(adversarial.trades_kl(clean, logits))

        with tf.GradientTape() as tape:
            real = purifier(start)
            tape.watch(real)
            upstream_loss = loss(stage.classifier(real))
        upstream = tape.gradient(upstream_loss, real)
        smooth = surrogates.soft_routing_purifier(
            purifier, stage.adversarial.train_surrogate_temperature, scales=stage.surrogate_scales
        )
        with tf.GradientTape() as tape:
            tape.watch(start)
            surrogate_out = smooth(start)
        surrogate_grad = tape.gradient(surrogate_out, start, output_gradients=upstream)
        with tf.GradientTape() as tape:
            tape.watch(start)
            hard_loss = loss(composite(start))
        hard_grad = tape.gradient(hard_loss, start)

        moved = perturbed - start
        free = tf.abs(moved) > 0.5 / 255  # steps the projection did not cut
        direction = tf.sign(moved)[free]
        agree_surrogate = np.mean(direction == tf.sign(surrogate_grad)[free])
        agree_hard = np.mean(direction == tf.sign(hard_grad)[free])
        self.assertGreater(int(tf.reduce_sum(tf.cast(free, tf.int32))), 1000)
        self.assertGreater(agree_surrogate, 0.99)
        self.assertLess(agree_hard, 0.9)

    def test_needs_its_settings(self):
        config = _save_models(tempfile.mkdtemp())
        with self.assertRaisesRegex(ValueError, "needs an AdversarialConfig"):
            stages.DecoderStage(config, objective="adversarial")
        with self.assertRaisesRegex(ValueError, "calibration_data"):
            stages.DecoderStage(
                config, objective="adversarial", adversarial=adversarial.AdversarialConfig()
            )
        with self.assertRaisesRegex(ValueError, "trainable must be one of"):
            stages.DecoderStage(config, trainable="encoder")


class MadryStage0Test(tf.test.TestCase):
    def test_trains_on_perturbed_images_of_the_labels(self):
        config = _save_models(tempfile.mkdtemp())
        attack = adversarial.AdversarialConfig(train_eps=EPS, train_attack_steps=3)
        stage = stages.ClassifierStage(config, adversarial=attack)
        stage.build()
        stage.global_step = tf.Variable(0, dtype=tf.int64)
        images, labels = _batch()
        perturbed = stage.perturb(images, labels, stage.global_step)
        size = np.max(np.abs(perturbed - images), axis=(1, 2, 3))
        self.assertAllLessEqual(size, EPS + 1e-6)
        self.assertAllInRange(perturbed, 0.0, 1.0)
        # The attack raises the cross-entropy of the labels above the clean one.
        clean_loss = tf.keras.losses.sparse_categorical_crossentropy(
            labels, stage.classifier(images), from_logits=True
        )
        adv_loss = tf.keras.losses.sparse_categorical_crossentropy(
            labels, stage.classifier(perturbed), from_logits=True
        )
        self.assertGreater(float(tf.reduce_mean(adv_loss)), float(tf.reduce_mean(clean_loss)))
        outputs = stage.train_outputs(images, labels)
        self.assertAllClose(
            outputs["loss"],
            tf.keras.losses.sparse_categorical_crossentropy(
                labels, stage.classifier(perturbed, training=True), from_logits=True
            ),
        )
        check = stage.robust_check(images, labels)
        self.assertLessEqual(check["accuracy"], check["clean_accuracy"])
        self.assertLessEqual(check["perturbation_linf"], EPS + 1e-6)

    def test_budget_ramp(self):
        # With a ramp, the training attack's budget (and step) grows with the global step.
        config = _save_models(tempfile.mkdtemp())
        attack = adversarial.AdversarialConfig(
            train_eps=EPS, train_attack_steps=3, train_eps_ramp_steps=4
        )
        stage = stages.ClassifierStage(config, adversarial=attack)
        stage.build()
        images, labels = _batch()
        for step, share in ((0, 0.25), (1, 0.5), (3, 1.0), (100, 1.0)):
            perturbed = stage.perturb(images, labels, tf.constant(step, tf.int64))
            size = np.max(np.abs(perturbed - images), axis=(1, 2, 3))
            self.assertAllLessEqual(size, share * EPS + 1e-6)
            self.assertGreater(size.min(), 0.9 * share * EPS, f"step {step}")


class SettingsTest(tf.test.TestCase, parameterized.TestCase):
    def test_ramp_schedule(self):
        config = adversarial.AdversarialConfig(
            train_eps=0.1, train_attack_steps=5, train_eps_ramp_steps=10
        )
        eps, step = config.budget_at(tf.constant(4, tf.int64))
        self.assertAllClose((eps, step), (0.05, 0.025))
        self.assertAllClose(config.budget_at(9), (0.1, 0.05))
        self.assertAllClose(config.budget_at(50), (0.1, 0.05))
        flat = adversarial.AdversarialConfig(train_eps=0.1, train_attack_steps=5)
        self.assertAllClose(flat.budget_at(0), (0.1, 0.05))
        with self.assertRaisesRegex(ValueError, "train_eps_ramp_steps"):
            adversarial.AdversarialConfig(train_eps_ramp_steps=-1).validate()

    def test_a_ramp_longer_than_the_run_is_refused_where_an_adversarial_stage_runs(self):
        ramp = adversarial.AdversarialConfig(train_eps_ramp_steps=10)
        ramp.check_ramp(10, "train_steps")  # the last step has the whole budget
        with self.assertRaisesRegex(ValueError, r"train_eps_ramp_steps \(10\) exceeds x \(9\)"):
            ramp.check_ramp(9, "x")
        short = trainer.LoopConfig(train_steps=9, steps_per_loop=3)
        for stage, objective in (("stage0", "stage0_objective"), ("stage2", "stage2_objective")):
            config = train_lib.TrainConfig(
                stage=stage,
                model=stages.ModelConfig(autoencoder_path="ae.keras"),
                loop=short,
                adversarial=ramp,
                **{objective: "adversarial"},
            )
            with self.assertRaisesRegex(ValueError, r"exceeds train_steps \(9\)", msg=stage):
                config.validate()
            # Without the adversarial objective the ramp is unused and the run is valid.
            standard = getattr(train_lib.TrainConfig(), objective)
            dataclasses.replace(config, **{objective: standard}).validate()

    def test_budgets_and_step_sizes(self):
        self.assertAlmostEqual(adversarial.parse_budget("8/255"), 8 / 255)
        self.assertEqual(adversarial.unparse_budget(8 / 255), "8/255")
        pgd = adversarial.AdversarialConfig(train_eps=0.1, train_attack_steps=5)
        self.assertAlmostEqual(pgd.step_size, 0.05)
        self.assertEqual(pgd.steps, 5)
        fast = adversarial.AdversarialConfig(train_eps=0.1, train_attack="fgsm_rs")
        self.assertAlmostEqual(fast.step_size, 0.125)
        self.assertEqual(fast.steps, 1)

    @parameterized.parameters("8/255,4/255", "abc", "2", "1/0")
    def test_bad_budgets(self, text):
        with self.assertRaises(ValueError):
            adversarial.parse_budget(text)

    def test_validate_names_the_field(self):
        with self.assertRaisesRegex(ValueError, "train_attack_steps"):
            adversarial.AdversarialConfig(train_attack_steps=0).validate()
        with self.assertRaisesRegex(ValueError, "must be in"):
            adversarial.AdversarialConfig(train_eps=0.0).validate()

    def test_seeds_are_per_example_and_per_step(self):
        a = adversarial.example_seeds(1, 0, 4).numpy()
        self.assertLen({tuple(s) for s in a}, 4)
        b = adversarial.example_seeds(1, 1, 4).numpy()
        self.assertFalse(np.array_equal(a, b))

    def test_check_at_zero_budget_is_clean_accuracy(self):
        # A linear model the attack fools at a large budget and cannot touch at 0.
        w = tf.constant(np.linspace(-1.0, 1.0, 12).reshape(12, 1).astype("float32"))

        def model_fn(x):
            score = tf.reshape(x, [-1, 12]) @ w
            return tf.concat([-score, score], axis=1)

        x = tf.random.stateless_uniform((16, 2, 2, 3), (1, 2))
        y = tf.cast(model_fn(x)[:, 1] > 0, tf.int32)
        zero = adversarial.robust_accuracy_fn(model_fn, 1e-9, 3, 0)(x, y)
        self.assertEqual(zero["accuracy"], 1.0)
        large = adversarial.robust_accuracy_fn(model_fn, 0.5, 5, 0)(x, y)
        self.assertEqual(large["clean_accuracy"], 1.0)
        self.assertLess(large["accuracy"], 0.5)


if __name__ == "__main__":
    tf.test.main()
