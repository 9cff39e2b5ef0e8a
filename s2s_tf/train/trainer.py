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
  start, saves every `checkpoint_every` steps, at the end and on SIGTERM.
"""

import abc
import contextlib
import dataclasses
import os
import signal
import time

import keras
import tensorflow as tf
from absl import logging

from s2s_tf import data as data_lib
from s2s_tf.config_io import setting
from s2s_tf.train import checkpointing
from s2s_tf.train import distribute
from s2s_tf.train import optim


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
        with strategy.scope(), _dtype_policy(loop.mixed_precision):
            stage.build()
            self.optimizer = optim.build_optimizer(
                optimizer_config, loop.train_steps, loop.mixed_precision
            )
            self.optimizer.build(stage.trainable_variables)  # keras-team/keras#23085
        self.checkpoints = checkpointing.StageCheckpoints(
            tf.train.Checkpoint(optimizer=self.optimizer, **stage.checkpoint_items()),
            self.stage_dir,
            strategy,
            loop.max_checkpoints,
        )
        self.restored_step = self.checkpoints.restore()
        self._train_sums = _accumulators(("examples", *stage.train_keys))
        self._eval_sums = _accumulators(("examples", *stage.eval_keys))
        self._train_loop = self._make_train_loop()
        self._eval_loops = {}  # per-replica batch size -> compiled eval loop
        writer = tf.summary.create_file_writer if self.is_chief else _noop_writer
        self.train_writer = writer(os.path.join(workdir, "train", stage.name))
        self.eval_writer = writer(os.path.join(workdir, "eval", stage.name))
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
                _accumulate(self.strategy, self._train_sums, per_replica)

        return train_loop

    def _make_eval_loop(self, per_replica_batch):
        """A compiled loop that adds every batch of an eval iterator to the eval sums.

        The last global batch of a split leaves some replicas a short or empty batch
        (and a worker whose shard ran out gets empty ones). Each replica pads its batch
        to `per_replica_batch` rows and masks the padding out of the sums and of the
        example count, so all run the same shapes and the means are one device's.
        """

        def replica_eval(images, labels):
            images, labels, valid = _pad_to(images, labels, per_replica_batch)
            outputs = self.stage.eval_outputs(images, labels)
            # tf.where, not a product: a padded all-zero image may give inf or NaN
            # (e.g. PSNR), and NaN * 0 is NaN.
            sums = {
                k: tf.reduce_sum(tf.where(valid, tf.cast(v, tf.float32), 0.0))
                for k, v in outputs.items()
            }
            sums["examples"] = tf.reduce_sum(tf.cast(valid, tf.float32))
            return sums

        # The loop runs in the graph: called per batch from Python, the step would be traced
        # again for every new combination of per-replica batch shapes.
        @tf.function
        def eval_loop(iterator):
            for batch in iterator:
                per_replica = self.strategy.run(replica_eval, args=batch)
                _accumulate(self.strategy, self._eval_sums, per_replica)

        return eval_loop

    def evaluate(self, eval_data=None, tag_prefix=""):
        """Means over an eval split of the stage's eval outputs, each example counted once.

        Args:
          eval_data: the split (a `data.DataConfig`); defaults to the trainer's.
          tag_prefix: prefix of the summaries' tags (e.g. for a second evaluation
            at the same step, of the final model).

        Returns:
          Per-example means keyed by the stage's `eval_keys` (empty without a split).

        Raises:
          ValueError: when the global batch does not split over the replicas.
        """
        eval_data = self.eval_data if eval_data is None else eval_data
        if eval_data is None or not self.stage.eval_keys:
            return {}
        distribute.check_global_batch(eval_data.global_batch_size, self.strategy)
        per_replica = eval_data.global_batch_size // self.strategy.num_replicas_in_sync
        if per_replica not in self._eval_loops:
            self._eval_loops[per_replica] = self._make_eval_loop(per_replica)
        _reset(self._eval_sums)
        dataset = self.strategy.distribute_datasets_from_function(
            data_lib.make_dataset_fn(eval_data, training=False)
        )
        self._eval_loops[per_replica](iter(dataset))
        results = _means(self._eval_sums)
        with self.eval_writer.as_default(step=self.step):
            for key, value in results.items():
                tf.summary.scalar(f"{tag_prefix}{key}", value)
        logging.info("%s eval at step %d: %s", self.stage.name, self.step, _format(results))
        return results

    def _sample_batch(self):
        config = self.eval_data or self.train_data
        config = dataclasses.replace(config, global_batch_size=8, num_examples=8)
        images, labels = data_lib.load_numpy(config)
        return tf.constant(images), tf.constant(labels)

    def train(self):
        """Trains to `loop.train_steps`, then saves, evaluates and writes the final model.

        Returns:
          A dict with the final step, the last train and eval metrics, the final
          model paths and whether training stopped early on SIGTERM.
        """
        total, start = self.loop.train_steps, self.step
        if start:
            logging.info("%s: resumed from checkpoint at step %d/%d", self.stage.name, start, total)
        # A new seed per resume, so a restarted run does not replay the same batches.
        data = dataclasses.replace(self.train_data, seed=self.train_data.seed + start)
        iterator = iter(
            self.strategy.distribute_datasets_from_function(
                data_lib.make_dataset_fn(data, training=True)
            )
        )
        sample = self._sample_batch() if self.is_chief else None
        if self._config_text:
            with self.train_writer.as_default(step=start):
                tf.summary.text("config", f"```\n{self._config_text}\n```")
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            train_metrics = self._run(iterator, total, sample)
        finally:
            signal.signal(signal.SIGTERM, previous)
        if self._preempted:
            self.checkpoints.save(self.step)
            logging.warning("%s: SIGTERM, checkpoint saved at step %d", self.stage.name, self.step)
            return {"step": self.step, "preempted": True, "train": train_metrics}
        self.checkpoints.save(self.step)
        eval_metrics = self.evaluate()
        paths = self.stage.save_final(self.stage_dir) if self.is_chief else []
        self.train_writer.flush()
        self.eval_writer.flush()
        return {
            "step": self.step,
            "preempted": False,
            "train": train_metrics,
            "eval": eval_metrics,
            "final_models": paths,
        }

    def _run(self, iterator, total, sample):
        metrics, clock = {}, _Progress(self.stage.name, self.step, total)
        while self.step < total and not self._preempted:
            step = self.step
            num = min(
                self.loop.steps_per_loop, total - step, _to_next(step, self.loop.checkpoint_every)
            )
            _reset(self._train_sums)
            start = time.perf_counter()
            self._train_loop(iterator, tf.constant(num, tf.int32))
            metrics = _means(self._train_sums)
            step = self.step
            metrics["images_per_sec"] = (
                num * self.train_data.global_batch_size / (time.perf_counter() - start)
            )
            metrics["learning_rate"] = optim.current_learning_rate(self.optimizer)
            clock.log(step, metrics)
            with self.train_writer.as_default(step=step):
                for key, value in metrics.items():
                    tf.summary.scalar(key, value)
                if sample is not None and _crossed(step, num, self.loop.summary_every):
                    self.stage.summaries(*sample, step)
            if _crossed(step, num, self.loop.checkpoint_every) and step < total:
                self.checkpoints.save(step)
            if _crossed(step, num, self.loop.eval_every) and step < total:
                self.evaluate()
        return metrics

    def _on_sigterm(self, signum, frame):
        del signum, frame
        self._preempted = True


class _Progress:
    """Console progress: step, metrics, images/s and ETA."""

    def __init__(self, name, start_step, total):
        self.name, self.start_step, self.total = name, start_step, total
        self.start_time = time.perf_counter()

    def log(self, step, metrics):
        elapsed = time.perf_counter() - self.start_time
        done = step - self.start_step
        eta = elapsed / done * (self.total - step) if done else 0.0
        logging.info(
            "%s step %d/%d (%.0f%%) | %s | ETA %s",
            self.name,
            step,
            self.total,
            100.0 * step / self.total,
            _format(metrics),
            _duration(eta),
        )


@contextlib.contextmanager
def _dtype_policy(mixed_precision):
    """Builds the models under "mixed_float16" when asked, restoring the policy after."""
    previous = keras.config.dtype_policy()
    if mixed_precision:
        keras.config.set_dtype_policy("mixed_float16")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _pad_to(images, labels, size):
    """Pads a batch of at most `size` rows (maybe none) to exactly `size` rows.

    Returns:
      `(images, labels, valid)`: the padded batch (zero images, label 0) and a
      bool `[size]` that is True for the real rows.
    """
    count = tf.shape(images)[0]
    padding = [[0, size - count]]
    images = tf.pad(images, padding + [[0, 0]] * (images.shape.rank - 1))
    images = tf.ensure_shape(images, [size, *images.shape[1:]])
    labels = tf.pad(labels, padding)
    valid = tf.range(size) < count
    return images, tf.ensure_shape(labels, [size]), valid


def _accumulators(keys):
    return {k: tf.Variable(0.0, trainable=False, dtype=tf.float32, name=f"sum_{k}") for k in keys}


def _accumulate(strategy, sums, per_replica):
    for key, value in per_replica.items():
        sums[key].assign_add(strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None))


def _reset(sums):
    for var in sums.values():
        var.assign(0.0)


def _means(sums):
    count = max(float(sums["examples"].numpy()), 1.0)
    return {k: float(v.numpy()) / count for k, v in sums.items() if k != "examples"}


def _to_next(step, every):
    return every - step % every


def _crossed(step, num, every):
    """Whether (step - num, step] contains a multiple of `every`."""
    return step // every > (step - num) // every


def _format(metrics):
    return " ".join(f"{k} {v:.4g}" for k, v in metrics.items())


def _duration(seconds):
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _noop_writer(logdir):
    del logdir
    return tf.summary.create_noop_writer()
