"""A stage's evaluation during training: eval-split means and the held-out robustness check.

`StageEvaluator.evaluate` runs the stage's per-example eval outputs over a
whole eval split under the strategy (each example counted once, however the
last batch splits over replicas) and writes their means to TensorBoard.
`StageEvaluator.check_robustness` runs the stage's robustness check on a fixed
held-out batch on the chief and watches it for a collapse.
"""

import dataclasses

import tensorflow as tf
from absl import logging

from s2s_tf import data as data_lib
from s2s_tf.train import distribute
from s2s_tf.train import loop_utils


class StageEvaluator:
    """Evaluates a `trainer.Stage` under a strategy.

    Args:
      stage: the built stage.
      strategy: its `tf.distribute.Strategy`.
      writer: the summary writer of the eval metrics.
      step: callable returning the global step.
      train_data: the training split (`data.DataConfig`).
      eval_data: the evaluation split, or None (the robustness check then reads
        the training split without augmentation).
    """

    def __init__(self, stage, strategy, writer, step, train_data, eval_data=None):
        self.stage, self.strategy, self.writer, self.step = stage, strategy, writer, step
        self.train_data, self.eval_data = train_data, eval_data
        self._eval_sums = loop_utils.accumulators(("examples", *stage.eval_keys))
        self._eval_loops = {}  # per-replica batch size -> compiled eval loop
        self._check_batch = None
        self.robust_watch = loop_utils.RobustWatch()

    def _make_eval_loop(self, per_replica_batch):
        """A compiled loop that adds every batch of an eval iterator to the eval sums.

        The last global batch of a split leaves some replicas a short or empty batch
        (and a worker whose shard ran out gets empty ones). Each replica pads its batch
        to `per_replica_batch` rows and masks the padding out of the sums and of the
        example count, so all run the same shapes and the means are one device's.
        """

        def replica_eval(images, labels):
            images, labels, valid = loop_utils.pad_to(images, labels, per_replica_batch)
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
                loop_utils.accumulate(self.strategy, self._eval_sums, per_replica)

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
        loop_utils.reset(self._eval_sums)
        dataset = self.strategy.distribute_datasets_from_function(
            data_lib.make_dataset_fn(eval_data, training=False)
        )
        iterators = [iter(dataset)]
        self._eval_loops[per_replica](iterators[0])
        data_lib.release_in_background(iterators)
        results = loop_utils.means(self._eval_sums)
        step = self.step()
        with self.writer.as_default(step=step):
            for key, value in results.items():
                tf.summary.scalar(f"{tag_prefix}{key}", value)
        logging.info(
            "%s eval at step %d: %s", self.stage.name, step, loop_utils.format_metrics(results)
        )
        return results

    def sample_batch(self):
        """A fixed batch of 8 held-out images and labels (for image summaries)."""
        config = self.eval_data or self.train_data
        config = dataclasses.replace(config, global_batch_size=8, num_examples=8)
        images, labels = data_lib.load_numpy(config)
        return tf.constant(images), tf.constant(labels)

    def check_robustness(self, tag_prefix=""):
        """Runs the stage's robustness check on its held-out batch and writes it (chief only).

        Warns when the robust accuracy collapses (`loop_utils.RobustWatch`).

        Args:
          tag_prefix: prefix of the summaries' tags.

        Returns:
          The check's scalars (empty when the stage has none, or off the chief).
        """
        if not distribute.is_chief(self.strategy) or not self.stage.robust_check_examples:
            return {}
        if self._check_batch is None:
            config = self.eval_data or dataclasses.replace(self.train_data, augment="off")
            count = self.stage.robust_check_examples
            config = dataclasses.replace(config, global_batch_size=count, num_examples=count)
            self._check_batch = tuple(tf.constant(a) for a in data_lib.load_numpy(config))
        step = self.step()
        results = self.robust_watch.update(
            self.stage.robust_check(*self._check_batch), self.stage.name, step
        )
        with self.writer.as_default(step=step):
            for key, value in results.items():
                tf.summary.scalar(f"{tag_prefix}robust_check/{key}", value)
        logging.info(
            "%s robust check at step %d: %s",
            self.stage.name,
            step,
            loop_utils.format_metrics(results),
        )
        return results
