"""Tests for optimizers, schedules and replica-aware gradient clipping."""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from s2s_tf.train import optim


class ScheduleTest(tf.test.TestCase, parameterized.TestCase):
    def _lr_at(self, schedule, step):
        return float(schedule(step)) if callable(schedule) else float(schedule)

    def test_constant(self):
        schedule = optim.build_schedule(optim.OptimizerConfig(learning_rate=0.1), 100)
        self.assertAllClose([self._lr_at(schedule, s) for s in (0, 50, 99)], [0.1] * 3)

    def test_cosine_with_warmup_peaks_then_reaches_zero(self):
        config = optim.OptimizerConfig(learning_rate=0.1, schedule="cosine", warmup_steps=10)
        schedule = optim.build_schedule(config, 110)
        self.assertAllClose(self._lr_at(schedule, 0), 0.0, atol=1e-7)
        self.assertAllClose(self._lr_at(schedule, 5), 0.05, atol=1e-6)
        self.assertAllClose(self._lr_at(schedule, 10), 0.1, atol=1e-6)
        self.assertAllClose(self._lr_at(schedule, 60), 0.05, atol=1e-6)
        self.assertAllClose(self._lr_at(schedule, 110), 0.0, atol=1e-7)

    def test_step_decays_at_fractions(self):
        config = optim.OptimizerConfig(learning_rate=1.0, schedule="step", step_factor=0.1)
        schedule = optim.build_schedule(config, 100)
        lrs = [self._lr_at(schedule, s) for s in (0, 50, 51, 75, 76)]
        self.assertAllClose(lrs, [1.0, 1.0, 0.1, 0.1, 0.01], atol=1e-7)

    @parameterized.named_parameters(
        ("name", dict(name="lamb"), "optimizer"),
        ("schedule", dict(schedule="poly"), "schedule"),
        ("lr", dict(learning_rate=-1.0), "learning_rate"),
        ("boundaries", dict(step_boundaries=(1.5,)), "step_boundaries"),
        ("clip", dict(clip_global_norm=0.0), "clip_global_norm"),
        ("momentum", dict(momentum=1.0), "momentum"),
    )
    def test_invalid_configs_raise(self, kwargs, pattern):
        with self.assertRaisesRegex(ValueError, pattern):
            optim.OptimizerConfig(**kwargs).validate()


class OptimizerTest(tf.test.TestCase):
    def test_builds_each_kind(self):
        adam = optim.build_optimizer(optim.OptimizerConfig(weight_decay=1e-4), 10)
        self.assertIsInstance(adam, keras.optimizers.Adam)
        self.assertAllClose(adam.weight_decay, 1e-4)
        sgd = optim.build_optimizer(optim.OptimizerConfig(name="sgd", momentum=0.8), 10)
        self.assertIsInstance(sgd, keras.optimizers.SGD)
        self.assertAllClose(sgd.momentum, 0.8)
        mixed = optim.build_optimizer(optim.OptimizerConfig(), 10, mixed_precision=True)
        self.assertIsInstance(mixed, keras.optimizers.LossScaleOptimizer)

    def test_current_learning_rate_follows_the_schedule(self):
        config = optim.OptimizerConfig(learning_rate=1.0, schedule="step", step_factor=0.5)
        optimizer = optim.build_optimizer(config, 4)
        variable = keras.Variable(1.0)
        optimizer.build([variable])
        rates = []
        for _ in range(4):
            rates.append(optim.current_learning_rate(optimizer))
            optimizer.apply([tf.constant(1.0)], [variable])
        self.assertAllClose(rates, [1.0, 1.0, 1.0, 0.5])


class ClipTest(tf.test.TestCase):
    def test_no_clip_returns_gradients_unchanged(self):
        grads = [tf.constant([3.0, 4.0])]
        self.assertIs(optim.clip_gradients(grads, None, 1), grads)

    def test_single_replica_clips_by_global_norm(self):
        grads = [tf.constant([3.0, 0.0]), tf.constant([4.0])]  # global norm 5
        clipped = optim.clip_gradients(grads, 1.0, 1)
        self.assertAllClose(np.concatenate([g.numpy() for g in clipped]), [0.6, 0.0, 0.8])


if __name__ == "__main__":
    tf.test.main()
