"""Attack runs under tf.distribute: per-example correctness on every replica, in resumable shards.

`ShardedAttacks` is what `evaluation.Evaluator` uses when it is given a
strategy: each attack run becomes one `distributed.ExampleEvaluator` call
whose per-example function attacks a slice of examples on its replica
(seeded by each example's index in the whole evaluation, so the result depends
neither on the replica count nor on the subset attacked), enforces the budget,
and returns whether every scored model still classifies each adversarial
example correctly. Restarts are folded in per example as the worst case. With
a shard directory, finished shards survive a crash and a rerun of the same
command continues where it stopped. A shard's key holds the models' identity,
every setting that changes results (`settings_key`), a version of the attack
code (`code_version`) and the examples' indices, so no changed run ever reads
a stale shard.

Attacks that cannot run inside a graph (`cw_l2`, whose runner is eager) run on
the host with `runner.run_attack`, batch by batch, as without a strategy.
"""

import ast
import dataclasses
import functools
import hashlib
import json
import os

import numpy as np
import tensorflow as tf

from s2s_tf.models import s2s_model
from s2s_tf.robustness import distributed
from s2s_tf.robustness import runner
from s2s_tf.robustness.attacks import base
from s2s_tf.robustness.attacks import get_spec

_HERE = os.path.dirname(os.path.abspath(__file__))
# The sources (relative to this package; folders: every .py inside) whose code decides an
# attack run's per-example results: editing the code (not the docstrings or comments) of any
# of them makes earlier shards stale.
ATTACK_CODE = (
    "attacks",
    "cleverhans_shim.py",
    "distributed.py",
    "runner.py",
    "sharded.py",
    "surrogates.py",
    "threat_models.py",
)
# Config fields that change no example's result: which examples a run attacks enters
# the key through their indices.
NOT_RESULT_SETTINGS = ("num_examples",)


def code_version(sources=ATTACK_CODE, root=_HERE):
    """A short hash of the code in the source files that compute results.

    What is hashed is each file's name and its syntax tree without docstrings, so
    comments, docstrings and formatting do not make finished shards stale; any
    change to the code itself does (a rename included: the hash cannot tell a pure
    refactor from a change of results, so it assumes the latter). The tree's
    form can differ between Python versions, so shards do not carry over from one
    to another.

    Args:
      sources: files or folders relative to `root`; a folder stands for every
        `.py` file under it, in sorted order.
      root: the folder `sources` are relative to.

    Raises:
      FileNotFoundError: when a source is missing (a key without it would let a
        changed attack reuse stale shards).
    """
    digest = hashlib.sha256()
    for source in sources:
        path = os.path.join(root, source)
        if os.path.isdir(path):
            files = sorted(
                os.path.join(folder, name)
                for folder, _, names in os.walk(path)
                for name in names
                if name.endswith(".py")
            )
        elif os.path.isfile(path):
            files = [path]
        else:
            raise FileNotFoundError(f"attack source {path} not found; cannot version the shards")
        for file in files:
            digest.update(os.path.relpath(file, root).encode())
            with open(file, "rb") as f:
                digest.update(_code_only(f.read(), file).encode())
    return digest.hexdigest()[:16]


def _code_only(source, filename):
    """`source`'s syntax tree without docstrings, dumped as text (no comments, no layout)."""
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


@functools.cache
def loaded_code_version(sources=ATTACK_CODE):
    """`code_version` of this package's `sources`, hashed once per process (when first asked).

    The code a process runs is the code it loaded; files edited while it runs do
    not change what it computes, so they do not change its keys either.
    """
    return code_version(tuple(sources))


def settings_key(config, ignore=NOT_RESULT_SETTINGS):
    """Every field of a config dataclass but `ignore`, as sorted JSON (part of a shard key).

    Every field is in unless listed in `ignore`, so a setting added later is in the
    key without anyone remembering to add it.
    """
    values = dataclasses.asdict(config)
    for name in ignore:
        values.pop(name, None)
    return json.dumps(values, sort_keys=True, default=repr)


def _project(spec, x, adv, eps, clip_min, clip_max):
    """`registry.enforce_budget` in the graph (projection; "reject" specs never get here)."""
    return base.project(x, adv, eps, spec.norm, clip_min, clip_max)


def _indices_digest(indices):
    return hashlib.blake2b(
        np.ascontiguousarray(indices, np.int64).tobytes(), digest_size=8
    ).hexdigest()


class ShardedAttacks:
    """Runs attacks over all examples on a `tf.distribute` strategy.

    Each kind of run (attack, source model, static parameters, scored models)
    compiles once; its eps and step size are arguments, so further budgets and
    further example sets reuse the compiled step.

    Args:
      strategy: the `tf.distribute.Strategy` (mirrored, multi-worker, one device).
      batch_size: examples per step over all replicas.
      seed: the attacks' seed.
      shard_dir: folder for finished shards (resumable runs), or None.
      model_key: identifies the evaluated models (e.g. a hash of their files), so
        shards of another model are never reused.
      progress: callable(str) for progress lines (examples/s, ETA).
      settings: every setting that changes results (`settings_key(eval_config)`),
        so shards made under other settings (a surrogate temperature, a step
        count) are never reused. The attack code's version is added here.
    """

    def __init__(
        self, strategy, batch_size, seed, shard_dir=None, model_key="", progress=None, settings=""
    ):
        self.strategy, self.batch_size, self.seed = strategy, batch_size, seed
        self.shard_dir, self.model_key, self.progress = shard_dir, model_key, progress
        self.settings, self.code = settings, loaded_code_version()
        self._evaluators = {}

    def shard_key(self, name, run_key, eps, params, restarts, scored, indices):
        """The key of one run's shards: models, settings, code, run, examples."""
        return "|".join(
            [
                self.model_key,
                self.settings,
                f"code={self.code}",
                run_key,
                name,
                f"eps={float(eps)!r}",
                repr(sorted(params.items())),
                f"restarts={restarts}",
                f"seed={self.seed}",
                f"batch={self.batch_size}",
                ",".join(sorted(scored)),
                f"indices={_indices_digest(indices)}",
            ]
        )

    def correct(self, name, source, scored, images, labels, eps, params, run_key, indices=None):
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
          indices: int64 [N], the examples' indices in the whole evaluation, which
            seed their random starts (default 0..N-1): an example gets the same
            start in a subset (a cascade's survivors, a shard of the split) as in
            a run on every example.

        Returns:
          A dict name -> bool [N].

        Raises:
          ValueError: for indices that are not one non-negative int per image.
        """
        spec = get_spec(name)
        images = np.asarray(images, np.float32)
        labels = np.asarray(labels, np.int32)
        if indices is None:
            indices = np.arange(len(images), dtype=np.int64)
        indices = np.asarray(indices)
        if indices.shape != (len(images),) or not np.issubdtype(indices.dtype, np.integer):
            raise ValueError(
                f"indices must be one int per image ({len(images)}), got {indices.shape}"
            )
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
                indices=indices,
                **params,
            )
            return {
                k: runner.predict(m, adversarial, self.batch_size) == labels
                for k, m in scored.items()
            }
        step = runner.step_size_for(spec, eps, params.get("steps"))
        args = [tf.constant(eps, tf.float32)]
        if step is not None:
            args.append(tf.constant(step, tf.float32))
        evaluate = self._evaluator(name, source, scored, params, restarts, step is None)
        out = evaluate(
            images,
            labels,
            shard_dir=self.shard_dir,
            key=self.shard_key(name, run_key, eps, params, restarts, scored, indices),
            progress=self.progress,
            indices=indices,
            args=args,
        )
        return {k: np.asarray(out[k], bool) for k in scored}

    def _evaluator(self, name, source, scored, params, restarts, own_step):
        """The compiled per-example evaluator of one kind of run (cached)."""
        key = (
            name,
            id(source),
            repr(sorted(params.items())),
            restarts,
            tuple(sorted((k, id(m)) for k, m in scored.items())),
            own_step,
        )
        if key not in self._evaluators:
            spec = get_spec(name)
            attack = runner.compiled_attack(name, source, **params)
            seed = self.seed

            def fn(x, y, index, eps, step=None):
                correct = {k: tf.ones_like(y, tf.bool) for k in scored}
                for run in range(restarts):
                    seeds = runner.example_seeds(seed, tf.maximum(index, 0), run)
                    adv = _project(spec, x, attack(x, y, eps, step, seeds), eps, 0.0, 1.0)
                    for k, model in scored.items():
                        pred = tf.argmax(model(adv), -1, output_type=tf.int32)
                        correct[k] &= tf.equal(pred, y)
                return correct

            evaluator = distributed.ExampleEvaluator(self.strategy, fn, batch_size=self.batch_size)
            # The models stay referenced with their evaluator, so their ids stay theirs.
            self._evaluators[key] = (evaluator, source, dict(scored))
        return self._evaluators[key][0]


def file_fingerprint(paths, names=(), digests=None):
    """A short hash of the given model files' bytes (the identity of the evaluated models).

    What counts is each file's SHA-256, its place in `paths` (which model it is)
    and `names` (what the results call the models), not where it lies: the same
    files named by a relative or an absolute path, or mounted elsewhere on another
    worker, keep their key and their shards.

    Args:
      paths: model files, in a fixed order; None or "" for an absent one.
      names: strings that name the models in the results.
      digests: {path: SHA-256} of `paths` as `s2s_model.file_digests` returns
        them, when already computed (the files are then not read again).

    Raises:
      FileNotFoundError: for a path that is not a file.
    """
    if digests is None:
        digests = s2s_model.file_digests(paths)
    digest = hashlib.sha256()
    for name in names:
        digest.update(f"name:{name}\0".encode())
    for path in paths:
        digest.update(f"{digests[path] if path else 'absent'}\0".encode())
    return digest.hexdigest()[:16]
