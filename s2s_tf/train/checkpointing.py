"""Checkpoints and final models that survive crashes, preemption and multi-worker runs.

- `StageCheckpoints` wraps `tf.train.CheckpointManager` for one stage. Under
  `MultiWorkerMirroredStrategy` every worker takes part in a save, so
  non-chief workers write to a private scratch directory (deleted after each
  save) and everyone restores from the chief's directory.
- TensorFlow writes a checkpoint's data under a temporary name and only then
  lists it in the `checkpoint` state file, so a process killed mid-save leaves
  at most unreferenced temporary files; `restore` removes them.
- `save_keras_atomic` writes a `.keras` file under a temporary name and renames
  it into place, so a reader never sees half a model.
"""

import glob
import os
import shutil

import tensorflow as tf
from absl import logging

from s2s_tf.train import distribute

CHECKPOINT_SUBDIR = "checkpoints"


class StageCheckpoints:
    """Saves and restores one stage's `tf.train.Checkpoint`.

    Args:
      checkpoint: the `tf.train.Checkpoint` (optimizer, models).
      stage_dir: the stage's directory; checkpoints go to `stage_dir/checkpoints`.
      strategy: the distribution strategy (decides who is chief).
      max_to_keep: checkpoints kept by the chief.
    """

    def __init__(self, checkpoint, stage_dir, strategy, max_to_keep=3):
        self.checkpoint = checkpoint
        self.directory = os.path.join(stage_dir, CHECKPOINT_SUBDIR)
        self.is_chief = distribute.is_chief(strategy)
        own = self.directory
        if not self.is_chief:
            task = strategy.cluster_resolver.task_id
            own = os.path.join(stage_dir, f"worker_{task}_scratch", CHECKPOINT_SUBDIR)
        self._own_dir = own
        self.manager = tf.train.CheckpointManager(checkpoint, own, max_to_keep=max_to_keep)

    def restore(self):
        """Restores the chief's latest checkpoint, if any; returns the number it was saved at."""
        if self.is_chief:
            _remove_partial_saves(self.directory)
        latest = tf.train.latest_checkpoint(self.directory)
        if not latest:
            return 0
        self.checkpoint.restore(latest).assert_existing_objects_matched()
        number = int(latest.rsplit("-", 1)[-1])
        logging.info("restored %s", latest)
        return number

    def save(self, step):
        """Saves a checkpoint numbered `step` (all workers must call this together)."""
        if self.manager.latest_checkpoint and self.manager.latest_checkpoint.endswith(f"-{step}"):
            return self.manager.latest_checkpoint
        path = self.manager.save(checkpoint_number=step)
        if not self.is_chief:
            shutil.rmtree(os.path.dirname(self._own_dir), ignore_errors=True)
        return path

    @property
    def latest(self):
        """Path prefix of the chief's latest checkpoint, or None."""
        return tf.train.latest_checkpoint(self.directory)


def _remove_partial_saves(directory):
    """Deletes temporary files a killed save left behind (never a listed checkpoint)."""
    for path in glob.glob(os.path.join(directory, "*_temp*")) + glob.glob(
        os.path.join(directory, "*.tmp*")
    ):
        logging.warning("removing partial checkpoint file %s", path)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)


def save_keras_atomic(model, path):
    """Saves `model` to `path` (.keras) via a temporary file and an atomic rename."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path[: -len('.keras')]}.partial.keras"
    model.save(tmp)
    os.replace(tmp, path)
    return path
