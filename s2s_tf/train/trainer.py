"""A small Orbit-style trainer: custom distributed loops, checkpoints, summaries, progress.

A `Stage` says what to build and what to compute per example; the `Trainer`
does the rest the same way for every stage:

- models, optimizer and checkpoint are created under `strategy.scope()`, and the
  optimizer is built before the first step (a Keras 3.15 + MirroredStrategy
  bug, keras-team/keras#23085, fails the first distributed `apply` otherwise);
- data comes from `strategy.distribute_datasets_from_function`;
- per-example losses are averaged over the *global* batch
  (`tf.nn.compute_average_loss`), so N replicas compute what one would;
- several steps run per `tf.function` call (`steps_per_loop`); metrics are
  per-example sums reduced over replicas into plain variables, and logging,
  summaries, evaluation and checkpoints happen in the Python outer loop;
- the global step is `optimizer.iterations`; `CheckpointManager` restores at
  start, saves every `checkpoint_every` steps, at the end and on SIGTERM;
- a resumed run reads the training stream from where the checkpoint left it
  (the data pipeline skips the batches already trained on) and the stages
  derive their randomness from the global step, so a run killed and resumed
  ends with the weights of an uninterrupted one;
- a stage may offer a robustness check (`Stage.robust_check`) that runs on a
  fixed held-out batch at every evaluation, e.g. robust accuracy under a
  multi-step attack during adversarial training (catastrophic overfitting
  shows as that accuracy collapsing).
"""

import abc
import dataclasses
import os
import signal
import time

import tensorflow as tf
from absl import logging

from s2s_tf import data as data_lib
from s2s_tf.config_io import setting
from s2s_tf.train import checkpointing
from s2s_tf.train import distribute
from s2s_tf.train import loop_utils
from s2s_tf.train import optim
from s2s_tf.train import stage_eval


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """How long to train and how often to report.

    Attributes:
      train_steps: total optimizer steps of the stage.
      steps_per_loop: steps per `tf.function` call (and per log line).
      checkpoint_every: save a checkpoint every this many steps.
      eval_every: evaluate every this many steps (and at the end).
      summary_every: image summaries and histograms every this many steps.
      max_checkpoints: checkpoints kept.
      mixed_precision: train with the "mixed_float16" policy and loss scaling.
      jit_compile: compile the per-replica step with XLA.
    """

    train_steps: int = setting(1000, "Optimizer steps of the stage.", lower_bound=1)
    steps_per_loop: int = setting(50, "Steps per tf.function call.", lower_bound=1)
    checkpoint_every: int = setting(500, "Save a checkpoint every N steps.", lower_bound=1)
    eval_every: int = setting(500, "Evaluate every N steps.", lower_bound=1)
    summary_every: int = setting(500, "Images/histograms every N steps.", lower_bound=1)
    max_checkpoints: int = 3
    mixed_precision: bool = setting(False, "mixed_float16 with loss scaling (GPU).")
    jit_compile: bool = setting(False, "Compile the train step with XLA (GPU).")

    def validate(self):
        """Raises ValueError naming the first field that is not a positive int."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type is int and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{field.name} must be a positive int, got {value!r}")


class Stage(abc.ABC):
    """One training job: its models, its per-example outputs and its final artefacts."""

    name = "stage"
    train_keys = ("loss",)
    eval_keys = ()
    # The global step (the optimizer's iteration count), set by the `Trainer`: stages
    # that draw random numbers seed them with it, so a resumed run draws the same.
    global_step = None

    @abc.abstractmethod
    def build(self):
        """Creates (or loads) the models; called under the strategy's scope."""

    @property
    @abc.abstractmethod
    def trainable_variables(self):
        """The variables the optimizer updates."""

    @abc.abstractmethod
    def checkpoint_items(self):
        """Trackables to checkpoint besides the optimizer, as a dict."""

    @abc.abstractmethod
    def train_outputs(self, images, labels):
        """Per-example tensors keyed by `train_keys`; "loss" is minimised. Runs per replica."""

    def eval_outputs(self, images, labels):
        """Per-example tensors keyed by `eval_keys`. Runs per replica in inference mode."""
        return {}

    def regularization_losses(self):
        """Extra scalar losses (e.g. kernel regularizers) of the trained models."""
        return []

    def summaries(self, images, labels, step):
        """Writes image and histogram summaries for a fixed sample batch (chief only)."""
        del images, labels, step  # stages without visual outputs write none

    # Examples of the held-out batch `robust_check` runs on (0: the stage has no check).
    robust_check_examples = 0

    def robust_check(self, images, labels):
        """Scalars about robustness on a fixed held-out batch (chief only, inference mode).

        Returns:
          A dict of floats; "accuracy" is the robust accuracy the trainer watches
          for a collapse (catastrophic overfitting).
        """
        del images, labels
        return {}

    @abc.abstractmethod
    def save_final(self, directory):
        """Writes the stage's final `.keras` model(s) into `directory`; returns their paths."""


class Trainer:
    """Runs a `Stage` under a strategy; see the module docstring."""

    def __init__(
        self,
        stage,
        strategy,
        loop,
        optimizer_config,
        workdir,
        train_data,
        eval_data=None,
        config_text=None,
    ):
        """Builds everything and restores the latest checkpoint, if any.

        Args:
          stage: the `Stage` to train.
          strategy: a `tf.distribute.Strategy`.
          loop: a `LoopConfig`.
          optimizer_config: an `optim.OptimizerConfig`.
          workdir: the run's directory; the stage writes to `workdir/<stage.name>`,
            summaries to `workdir/{train,eval}/<stage.name>`.
          train_data: `data.DataConfig` of the training split (global batch size).
          eval_data: `data.DataConfig` of the evaluation split, or None.
          config_text: the run's config (e.g. JSON), shown in TensorBoard's text tab.

        Raises:
          ValueError: for an invalid loop config or a global batch that does not
            split over the replicas.
        """
        loop.validate()
        distribute.check_global_batch(train_data.global_batch_size, strategy)
        if eval_data is not None:  # fail now, not after hours of training
            distribute.check_global_batch(eval_data.global_batch_size, strategy)
        self.stage, self.strategy, self.loop = stage, strategy, loop
        self.train_data, self.eval_data = train_data, eval_data
        self.stage_dir = os.path.join(workdir, stage.name)
        self.is_chief = distribute.is_chief(strategy)
        self.clip_norm = optimizer_config.clip_global_norm
        with strategy.scope(), loop_utils.dtype_policy(loop.mixed_precision):
            stage.build()
            self.optimizer = optim.build_optimizer(
                optimizer_config, loop.train_steps, loop.mixed_precision
            )
            self.optimizer.build(stage.trainable_variables)  # keras-team/keras#23085
        stage.global_step = self.optimizer.iterations
        self.checkpoints = checkpointing.StageCheckpoints(
            tf.train.Checkpoint(optimizer=self.optimizer, **stage.checkpoint_items()),
            self.stage_dir,
            strategy,
            loop.max_checkpoints,
        )
        self.restored_step = self.checkpoints.restore()
        self._train_sums = loop_utils.accumulators(("examples", *stage.train_keys))
        self._train_loop = self._make_train_loop()
        writer = tf.summary.create_file_writer if self.is_chief else loop_utils.noop_writer
        self.train_writer = writer(os.path.join(workdir, "train", stage.name))
        self.eval_writer = writer(os.path.join(workdir, "eval", stage.name))
        self.evaluator = stage_eval.StageEvaluator(
            stage, strategy, self.eval_writer, lambda: self.step, train_data, eval_data
        )
        self._preempted = False
        self._config_text = config_text

    @property
    def step(self):
        """The global step: the optimizer's iteration count."""
        return int(self.optimizer.iterations.numpy())

    def _replica_step(self, images, labels):
        variables = self.stage.trainable_variables
        with tf.GradientTape() as tape:
            outputs = self.stage.train_outputs(images, labels)
            loss = tf.nn.compute_average_loss(
                outputs["loss"], global_batch_size=self.train_data.global_batch_size
            )
            extra = self.stage.regularization_losses()
            if extra:
                loss += tf.nn.scale_regularization_loss(tf.add_n(extra))
            scaled = self.optimizer.scale_loss(loss) if self.loop.mixed_precision else loss
        grads = tape.gradient(scaled, variables)
        if self.clip_norm is not None:
            scale = self.optimizer.dynamic_scale if self.loop.mixed_precision else 1.0
            grads = [g / scale for g in grads]  # clip the true gradient, not the scaled one
            grads = optim.clip_gradients(grads, self.clip_norm, self.strategy.num_replicas_in_sync)
            grads = [g * scale for g in grads]
        self.optimizer.apply(grads, variables)
        sums = {k: tf.reduce_sum(tf.cast(v, tf.float32)) for k, v in outputs.items()}
        sums["examples"] = tf.cast(tf.shape(images)[0], tf.float32)
        return sums

    def _make_train_loop(self):
        step_fn = self._replica_step
        if self.loop.jit_compile:
            step_fn = tf.function(step_fn, jit_compile=True)

        @tf.function
        def train_loop(iterator, num_steps):
            for _ in tf.range(num_steps):
                images, labels = next(iterator)
                per_replica = self.strategy.run(step_fn, args=(images, labels))
                loop_utils.accumulate(self.strategy, self._train_sums, per_replica)

        return train_loop

    def evaluate(self, eval_data=None, tag_prefix=""):
        """Means of the stage's eval outputs over a split (`StageEvaluator.evaluate`)."""
        return self.evaluator.evaluate(eval_data, tag_prefix)

    def check_robustness(self, tag_prefix=""):
        """The stage's held-out robustness check (`StageEvaluator.check_robustness`)."""
        return self.evaluator.check_robustness(tag_prefix)

    def train(self):
        """Trains to `loop.train_steps`, then saves, evaluates and writes the final model.

        Returns:
          A dict with the final step, the last train and eval metrics, the final
          model paths and whether training stopped early on SIGTERM.
        """
        total, start = self.loop.train_steps, self.step
        if start:
            logging.info("%s: resumed from checkpoint at step %d/%d", self.stage.name, start, total)
        # The same stream as an uninterrupted run, without the batches already trained on.
        iterators = [
            iter(
                self.strategy.distribute_datasets_from_function(
                    data_lib.make_dataset_fn(self.train_data, training=True, start_step=start)
                )
            )
        ]
        sample = self.evaluator.sample_batch() if self.is_chief else None
        if self._config_text:
            with self.train_writer.as_default(step=start):
                tf.summary.text("config", f"```\n{self._config_text}\n```")
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            train_metrics = self._run(iterators[0], total, sample)
        finally:
            signal.signal(signal.SIGTERM, previous)
            data_lib.release_in_background(iterators)
        if self._preempted:
            self.checkpoints.save(self.step)
            logging.warning("%s: SIGTERM, checkpoint saved at step %d", self.stage.name, self.step)
            return {"step": self.step, "preempted": True, "train": train_metrics}
        self.checkpoints.save(self.step)
        eval_metrics = self.evaluate()
        robust = self.check_robustness()
        paths = self.stage.save_final(self.stage_dir) if self.is_chief else []
        self.train_writer.flush()
        self.eval_writer.flush()
        result = {
            "step": self.step,
            "preempted": False,
            "train": train_metrics,
            "eval": eval_metrics,
            "final_models": paths,
        }
        if robust:
            result["robust_check"] = robust
            result["robust_check_best"] = self.evaluator.robust_watch.best
        return result

    def _run(self, iterator, total, sample):
        metrics, clock = {}, loop_utils.Progress(self.stage.name, self.step, total)
        while self.step < total and not self._preempted:
            step = self.step
            num = min(
                self.loop.steps_per_loop,
                total - step,
                loop_utils.to_next(step, self.loop.checkpoint_every),
            )
            loop_utils.reset(self._train_sums)
            start = time.perf_counter()
            self._train_loop(iterator, tf.constant(num, tf.int32))
            metrics = loop_utils.means(self._train_sums)
            step = self.step
            metrics["images_per_sec"] = (
                num * self.train_data.global_batch_size / (time.perf_counter() - start)
            )
            metrics["learning_rate"] = optim.current_learning_rate(self.optimizer)
            clock.log(step, metrics)
            with self.train_writer.as_default(step=step):
                for key, value in metrics.items():
                    tf.summary.scalar(key, value)
                if sample is not None and loop_utils.crossed(step, num, self.loop.summary_every):
                    self.stage.summaries(*sample, step)
            if loop_utils.crossed(step, num, self.loop.checkpoint_every) and step < total:
                self.checkpoints.save(step)
            if loop_utils.crossed(step, num, self.loop.eval_every) and step < total:
                self.evaluate()
                self.check_robustness()
        return metrics

    def _on_sigterm(self, signum, frame):
        del signum, frame
        self._preempted = True
