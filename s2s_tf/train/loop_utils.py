"""The trainer's bookkeeping: metric sums over replicas, padding, schedules and progress.

Metrics are per-example sums reduced over replicas into plain variables (so a
mean is over examples, whatever the number of replicas), and the outer loop's
schedule (checkpoint, summary and evaluation boundaries) is a function of the
global step only, so a resumed run reports at the same steps as an
uninterrupted one.
"""

import contextlib
import time

import keras
import tensorflow as tf
from absl import logging


class Progress:
    """Console progress: step, metrics, images/s and ETA."""

    def __init__(self, name, start_step, total):
        self.name, self.start_step, self.total = name, start_step, total
        self.start_time = time.perf_counter()

    def log(self, step, metrics):
        """Logs one line for `step` with `metrics` (a dict of floats) and the ETA."""
        elapsed = time.perf_counter() - self.start_time
        done = step - self.start_step
        eta = elapsed / done * (self.total - step) if done else 0.0
        logging.info(
            "%s step %d/%d (%.0f%%) | %s | ETA %s",
            self.name,
            step,
            self.total,
            100.0 * step / self.total,
            format_metrics(metrics),
            duration(eta),
        )


class RobustWatch:
    """Watches a held-out robust accuracy for a collapse (catastrophic overfitting).

    Fast adversarial training can suddenly overfit to its one-step attack: robust
    accuracy under a multi-step attack falls to about 0 within an epoch while the
    training attack's accuracy rises (Wong et al. 2020). A check below
    `fraction` of the best seen so far, and at least `min_drop` below it, is flagged
    and logged as a warning.
    """

    def __init__(self, fraction=0.5, min_drop=0.1):
        self.fraction, self.min_drop, self.best = fraction, min_drop, None

    def update(self, results, name, step):
        """Returns `results` (a dict with "accuracy") plus "overfitting_suspected" (0 or 1)."""
        results = dict(results)
        accuracy = results.get("accuracy")
        if accuracy is None:
            return results
        self.best = max(accuracy, self.best or 0.0)
        # The absolute drop keeps a small check's noise near 0 % from raising the alarm.
        suspected = accuracy < self.fraction * self.best and self.best - accuracy >= self.min_drop
        results["overfitting_suspected"] = float(suspected)
        if suspected:
            logging.warning(
                "%s at step %d: held-out robust accuracy %.3f < %.0f%% of its best %.3f "
                "(catastrophic overfitting?)",
                name,
                step,
                accuracy,
                100 * self.fraction,
                self.best,
            )
        return results


@contextlib.contextmanager
def dtype_policy(mixed_precision):
    """Builds the models under "mixed_float16" when asked, restoring the policy after."""
    previous = keras.config.dtype_policy()
    if mixed_precision:
        keras.config.set_dtype_policy("mixed_float16")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def pad_to(images, labels, size):
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


def accumulators(keys):
    """One float32 sum variable per key (not trainable, not checkpointed)."""
    return {k: tf.Variable(0.0, trainable=False, dtype=tf.float32, name=f"sum_{k}") for k in keys}


def accumulate(strategy, sums, per_replica):
    """Adds per-replica sums, reduced over the replicas, to `sums`."""
    for key, value in per_replica.items():
        sums[key].assign_add(strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None))


def reset(sums):
    """Sets every sum to 0."""
    for var in sums.values():
        var.assign(0.0)


def means(sums):
    """Each sum divided by the "examples" sum (at least 1), as floats."""
    count = max(float(sums["examples"].numpy()), 1.0)
    return {k: float(v.numpy()) / count for k, v in sums.items() if k != "examples"}


def to_next(step, every):
    """Steps from `step` to the next multiple of `every`."""
    return every - step % every


def crossed(step, num, every):
    """Whether (step - num, step] contains a multiple of `every`."""
    return step // every > (step - num) // every


def format_metrics(metrics):
    """`{"loss": 0.5}` -> "loss 0.5"."""
    return " ".join(f"{k} {v:.4g}" for k, v in metrics.items())


def duration(seconds):
    """Seconds as "1h02m03s" or "2m03s"."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def noop_writer(logdir):
    """A summary writer that writes nothing (non-chief workers)."""
    del logdir
    return tf.summary.create_noop_writer()
