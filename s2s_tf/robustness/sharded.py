"""Attack runs under tf.distribute: per-example correctness on every replica, in resumable shards.

`ShardedAttacks` is what `evaluation.Evaluator` uses when it is given a
strategy: each attack run becomes one `distributed.evaluate_examples` call
whose per-example function attacks a slice of examples on its replica
(seeded by each example's index, so the result does not depend on the replica
count), enforces the budget, and returns whether every scored model still
classifies each adversarial example correctly. Restarts are folded in per
example as the worst case. With a shard directory, finished shards survive a
crash and a rerun of the same command continues where it stopped.

Attacks that cannot run inside a graph (`cw_l2`, whose runner is eager) run on
the host with `runner.run_attack`, batch by batch, as without a strategy.
"""

import hashlib
import os

import numpy as np
import tensorflow as tf

from s2s_tf.robustness import distributed
from s2s_tf.robustness import runner
from s2s_tf.robustness.attacks import base
from s2s_tf.robustness.attacks import get_spec


def _project(spec, x, adv, eps, clip_min, clip_max):
    """`registry.enforce_budget` in the graph (projection; "reject" specs never get here)."""
    return base.project(x, adv, eps, spec.norm, clip_min, clip_max)


class ShardedAttacks:
    """Runs attacks over all examples on a `tf.distribute` strategy.

    Args:
      strategy: the `tf.distribute.Strategy` (mirrored, multi-worker, one device).
      batch_size: examples per step over all replicas.
      seed: the attacks' seed.
      shard_dir: folder for finished shards (resumable runs), or None.
      model_key: identifies the evaluated models (e.g. a hash of their files), so
        shards of another model are never reused.
      progress: callable(str) for progress lines (examples/s, ETA).
    """

    def __init__(self, strategy, batch_size, seed, shard_dir=None, model_key="", progress=None):
        self.strategy, self.batch_size, self.seed = strategy, batch_size, seed
        self.shard_dir, self.model_key, self.progress = shard_dir, model_key, progress

    def correct(self, name, source, scored, images, labels, eps, params, run_key):
        """Per example and scored model: still correct after the attack (worst over restarts).

        Args:
          name: the attack's registry name.
          source: the model_fn the attack differentiates or queries.
          scored: dict name -> model_fn to score the adversarial examples on.
          images: float32 [N, ...] in [0, 1].
          labels: int [N].
          eps: the budget in the attack's norm.
          params: `runner.run_attack` keyword arguments (steps, restarts, attack params).
          run_key: the run's name, part of the shards' key.

        Returns:
          A dict name -> bool [N].
        """
        spec = get_spec(name)
        params = dict(params)
        restarts = params.pop("restarts", 1) if spec.stochastic else 1
        params.pop("restarts", None)
        if spec.runner is not None:  # eager-only attacks run on the host
            adversarial = runner.run_attack(
                name,
                source,
                images,
                labels,
                eps,
                batch_size=self.batch_size,
                seed=self.seed,
                restarts=restarts,
                **params,
            )
            return {
                k: runner.predict(m, adversarial, self.batch_size) == labels
                for k, m in scored.items()
            }
        attack = runner.compiled_attack(name, source, **params)
        step = runner.step_size_for(spec, eps, params.get("steps"))
        eps_t = tf.constant(eps, tf.float32)
        step_t = None if step is None else tf.constant(step, tf.float32)

        def fn(x, y, index):
            correct = {k: tf.ones_like(y, tf.bool) for k in scored}
            for run in range(restarts):
                adv = attack(
                    x, y, eps_t, step_t, runner.example_seeds(self.seed, tf.maximum(index, 0), run)
                )
                adv = _project(spec, x, adv, eps_t, 0.0, 1.0)
                for k, model in scored.items():
                    pred = tf.argmax(model(adv), -1, output_type=tf.int32)
                    correct[k] &= tf.equal(pred, y)
            return correct

        key = "|".join(
            [
                self.model_key,
                run_key,
                name,
                f"eps={eps!r}",
                repr(sorted(params.items())),
                f"restarts={restarts}",
                f"seed={self.seed}",
                ",".join(sorted(scored)),
            ]
        )
        out = distributed.evaluate_examples(
            self.strategy,
            fn,
            images,
            np.asarray(labels, np.int32),
            batch_size=self.batch_size,
            shard_dir=self.shard_dir,
            key=key,
            progress=self.progress,
        )
        return {k: np.asarray(out[k], bool) for k in scored}


def file_fingerprint(paths):
    """A short hash of the given files' bytes (the identity of the evaluated models)."""
    digest = hashlib.sha256()
    for path in paths:
        if path and os.path.isfile(path):
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        digest.update(str(path).encode())
    return digest.hexdigest()[:16]
