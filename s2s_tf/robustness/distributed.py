"""Per-example evaluation at scale: every replica, every worker, in shards that survive a crash.

    results = distributed.evaluate_examples(
        strategy, fn, images, labels, batch_size=256,
        shard_dir=os.path.join(workdir, "eval_shards"), key="pgd eps=8/255 steps=20 model=...",
        progress=logging.info)

`fn(x, y, index, *args)` computes per-example tensors (e.g. `{"correct": bool [b],
"adversarial_correct": bool [b]}`) for a batch of images, their labels and their
global int64 example indices (so an attack can seed its random start per
example, e.g. `tf.random.experimental.stateless_fold_in(seed, index[i])`, and
give every example the same start whatever the batch it falls in). The indices
are 0..N-1 unless `indices` gives each example's own (its place in a larger
split, when `images` is a part of it). `args` are scalars passed to every
replica (an attack's eps and step size), so one compiled step serves them all.

- Each global batch is cut into one contiguous slice per replica; each replica
  runs `fn` on its slice inside one `tf.function` (`strategy.run`), and
  `strategy.gather` brings the per-example results back in example order, on
  every worker. The examples are split evenly over the fewest batches of at
  most the global batch (333 examples in batches of 250: 167 + 166, not 250 +
  83), and each batch is padded with zero images (index -1) to a multiple of
  `ROW_GRANULE` rows per replica: at most 7 padded rows per replica and batch
  (a shard's last batch padded to a power of two, or to a full batch, cost up
  to half or all of a batch per attack run and shard), and at most
  per-replica-batch / 8 distinct shapes. The padded rows are dropped, so no
  replica ever sees an empty batch and 1, 2 or 3 replicas give the same
  per-example results when `fn` is a function of each example alone.
- With `shard_dir`, the examples are cut into shards of `shard_size`; each
  finished shard is written atomically (a temporary name in the same folder,
  then `os.replace`) as `shard-<fingerprint of key>-<start>-<end>.npz`, holding
  the key and a digest of its images and labels. A rerun reads the finished
  shards back instead of recomputing them, and its result equals an
  uninterrupted run's. Under `MultiWorkerMirroredStrategy` every worker
  computes, only the chief writes, and a shard is skipped only when every worker
  can read it (each worker needs its results, and the computation is
  collective, so the workers must agree on what to compute).
"""

import hashlib
import math
import os
import time
import zipfile

import numpy as np
import tensorflow as tf
from absl import logging

from s2s_tf.train import distribute

DEFAULT_SHARD_SIZE = 1024
PAD_INDEX = -1
# A batch is padded to a multiple of this many rows per replica.
ROW_GRANULE = 8
_PREFIX = "shard"
_META_KEY = "__key__"
_META_DIGEST = "__digest__"
# Collective all-gather does not carry every dtype (bool above all); these travel as int32
# and are cast back on the host.
_GATHER_AS_INT32 = (tf.bool, tf.int8, tf.uint8, tf.int16, tf.uint16)


def evaluate_examples(
    strategy,
    fn,
    images,
    labels,
    *,
    batch_size,
    shard_dir=None,
    shard_size=DEFAULT_SHARD_SIZE,
    key="",
    progress=None,
    indices=None,
    args=(),
):
    """Runs a per-example function over all examples on all replicas; see the module docstring.

    Every worker must call this with the same arguments (the computation is collective).
    To run one `fn` over several example sets, build an `ExampleEvaluator` once instead:
    it compiles `fn` once.

    Args:
      strategy: a `tf.distribute.Strategy`, or None for the default (one device).
      fn: `fn(x, y, index, *args) -> dict of tensors` with a leading axis of the
        batch size; `x` float32 `[b, ...]`, `y` int32 `[b]`, `index` int64 `[b]`
        (`PAD_INDEX` on padding rows, whose results are dropped). Runs per replica.
      images: numpy array `[N, ...]`.
      labels: numpy array `[N]` of int labels.
      batch_size: examples per step over all replicas; each replica takes
        `ceil(batch_size / replicas)`.
      shard_dir: folder of finished shards, for resuming; None keeps nothing.
      shard_size: examples per shard (a multiple of the global batch wastes no
        padded rows).
      key: a description of the work: the model's identity (e.g. its file and a hash
        of its weights), the attack and its parameters, the data. Shards written
        under another key are never read; shards of the same key are trusted if
        their examples match, so a key that omits the model would return a
        previous model's results.
      progress: called with a line of text (examples done, examples/s over all
        workers, ETA) after each shard.
      indices: int `[N]`, the examples' indices passed to `fn` (>= 0; default
        0..N-1). They are part of each shard's digest.
      args: scalars (numbers or scalar tensors) passed to `fn` after `index`; a
        new value does not recompile `fn`.

    Returns:
      A dict of numpy arrays of length N, in example order, keyed as `fn`'s outputs.

    Raises:
      ValueError: for empty or mismatched inputs or indices, a non-positive batch
        or shard size, or `fn` outputs that are not per-example.
    """
    evaluator = ExampleEvaluator(strategy, fn, batch_size=batch_size)
    return evaluator(
        images,
        labels,
        shard_dir=shard_dir,
        shard_size=shard_size,
        key=key,
        progress=progress,
        indices=indices,
        args=args,
    )


class ExampleEvaluator:
    """`fn` compiled once for a strategy and global batch; called like `evaluate_examples`.

    Args:
      strategy: a `tf.distribute.Strategy`, or None for the default (one device).
      fn: the per-example function (see `evaluate_examples`).
      batch_size: examples per step over all replicas.

    Raises:
      ValueError: for a non-positive batch size.
    """

    def __init__(self, strategy, fn, *, batch_size):
        _check_positive("batch_size", batch_size)
        self.strategy = strategy or tf.distribute.get_strategy()
        replicas = self.strategy.num_replicas_in_sync
        self.per_replica = math.ceil(batch_size / replicas)
        self.global_batch = self.per_replica * replicas
        self._step = _make_step(self.strategy, fn)

    def __call__(
        self,
        images,
        labels,
        *,
        shard_dir=None,
        shard_size=DEFAULT_SHARD_SIZE,
        key="",
        progress=None,
        indices=None,
        args=(),
    ):
        """Evaluates one example set; arguments, result and errors as `evaluate_examples`'s."""
        images, labels = _check_inputs(images, labels, shard_size)
        indices = _check_indices(indices, len(images))
        args = tuple(tf.convert_to_tensor(a) for a in args)
        store = _ShardStore(shard_dir, key, distribute.is_chief(self.strategy))
        shards = [
            (start, end, store.digest(images, labels, indices, start, end))
            for start, end in _shard_ranges(len(images), shard_size)
        ]
        found = _agree_on_finished(self.strategy, [store.read(*shard) for shard in shards])
        resumed = sum(e - s for (s, e, _), r in zip(shards, found, strict=True) if r is not None)
        clock = _Clock(len(images), resumed)
        if resumed:
            _report(progress, f"resuming: {resumed}/{len(images)} examples read from {shard_dir}")
        results = []
        for (start, end, digest), done in zip(shards, found, strict=True):
            if done is None:
                done = _run_shard(
                    self._step, (images, labels, indices), args, (start, end), self.per_replica
                )
                store.write(start, end, digest, done)
                _report(progress, clock.advance(end - start))
            results.append(done)
        return _concatenate(results)


def _check_positive(name, value):
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_inputs(images, labels, shard_size):
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim < 1 or not len(images):
        raise ValueError(f"evaluate_examples needs at least one example, got images {images.shape}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels {labels.shape} do not match images {images.shape}: need [N]")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    _check_positive("shard_size", shard_size)
    return images.astype(np.float32, copy=False), labels.astype(np.int32, copy=False)


def _check_indices(indices, count):
    if indices is None:
        return np.arange(count, dtype=np.int64)
    indices = np.asarray(indices)
    if indices.shape != (count,) or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices must be {count} integers (one per image), got {indices.shape}")
    if indices.min() < 0:
        raise ValueError(f"indices must be >= 0 ({PAD_INDEX} marks padding), got {indices.min()}")
    return indices.astype(np.int64)


def _shard_ranges(count, shard_size):
    return [(start, min(start + shard_size, count)) for start in range(0, count, shard_size)]


def _make_step(strategy, fn):
    """Returns `run(x, y, index, args)`: one padded global batch (numpy) -> its results (numpy).

    With `b` rows per replica (the batch's rows / the replicas), replica r takes rows
    `[r * b, (r + 1) * b)`, and `strategy.gather` concatenates the replicas' outputs in
    replica order, so the rows come back in the order they went in. One trace serves
    every batch size (after the second, the batch axis is left unknown).
    """
    replicas = strategy.num_replicas_in_sync
    dtypes = {}

    def replica_fn(x, y, index, *args):
        outputs = fn(x, y, index, *args)
        if not isinstance(outputs, dict) or not outputs:
            raise ValueError(f"fn must return a non-empty dict of tensors, got {outputs!r}")
        sendable = {}
        for name, value in outputs.items():
            if name in (_META_KEY, _META_DIGEST):
                raise ValueError(f"fn output name {name!r} is reserved for shard files")
            value = tf.convert_to_tensor(value)
            rows = x.shape[0]
            if (
                value.shape.rank is None
                or value.shape.rank < 1
                or (None not in (rows, value.shape[0]) and value.shape[0] != rows)
            ):
                raise ValueError(
                    f"fn output {name!r} must be per-example, with a leading axis of the "
                    f"batch size {rows}; got shape {value.shape}"
                )
            if None in (rows, value.shape[0]):
                with tf.control_dependencies(
                    [tf.debugging.assert_equal(tf.shape(value)[0], tf.shape(x)[0], name)]
                ):
                    value = tf.identity(value)
            dtypes[name] = value.dtype
            sendable[name] = tf.cast(value, tf.int32) if value.dtype in _GATHER_AS_INT32 else value
        return sendable

    @tf.function(reduce_retracing=True)
    def step(x, y, index, *args):
        outputs = strategy.run(replica_fn, args=(x, y, index, *args))
        return {k: strategy.gather(v, axis=0) for k, v in outputs.items()}

    def run(x, y, index, args):
        per_replica = len(x) // replicas

        def value_fn(context):
            rows = slice(
                context.replica_id_in_sync_group * per_replica,
                (context.replica_id_in_sync_group + 1) * per_replica,
            )
            return tf.constant(x[rows]), tf.constant(y[rows]), tf.constant(index[rows])

        outputs = step(*strategy.experimental_distribute_values_from_function(value_fn), *args)
        return {k: v.numpy().astype(dtypes[k].as_numpy_dtype) for k, v in outputs.items()}

    run.replicas = replicas
    return run


def _run_shard(step, examples, args, span, per_replica):
    """Computes the examples `[start, end)` = `span` batch by batch; returns their results.

    `examples` holds the images, labels and indices (the indices' padding is
    `PAD_INDEX`); the span is split evenly over the fewest batches of at most
    `per_replica` rows per replica.
    """
    images, labels, indices = examples
    (start, end), replicas = span, step.replicas
    global_batch = per_replica * replicas
    count = math.ceil((end - start) / global_batch)
    size = math.ceil((end - start) / count)
    parts = []
    for begin in range(start, end, size):
        stop = min(begin + size, end)
        rows = replicas * _padded_rows(math.ceil((stop - begin) / replicas), per_replica)
        outputs = step(
            _pad_rows(images[begin:stop], rows, 0),
            _pad_rows(labels[begin:stop], rows, 0),
            _pad_rows(indices[begin:stop], rows, PAD_INDEX),
            args,
        )
        parts.append({k: v[: stop - begin] for k, v in outputs.items()})  # drop the padding
    return _concatenate(parts)


def _padded_rows(needed, per_replica):
    """Rows per replica for a batch that needs `needed`: the next multiple of `ROW_GRANULE`.

    At most `per_replica` (a full batch). At most 7 rows are computed for nothing,
    and the distinct shapes (each with its own kernels and their cached memory)
    are at most `per_replica / ROW_GRANULE` + 1 whatever the number of batches.
    """
    return min(-(-needed // ROW_GRANULE) * ROW_GRANULE, per_replica)


def _pad_rows(array, rows, value):
    padding = [(0, rows - len(array))] + [(0, 0)] * (array.ndim - 1)
    return np.pad(array, padding, constant_values=value)


def _agree_on_finished(strategy, found):
    """Keeps a read shard only if every worker read it (the computation is collective).

    Each replica contributes 1 for each shard its worker lacks; the sum over all
    replicas is 0 exactly for the shards that every worker has.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return found  # one worker: its replicas read the same files
    missing = np.array([r is None for r in found], np.float32)
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda _: tf.constant(missing)
    )
    anyone_missing = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None).numpy()
    agreed = [None if lacking else r for r, lacking in zip(found, anyone_missing, strict=True)]
    dropped = sum(r is not None for r in found) - sum(r is not None for r in agreed)
    if dropped:
        logging.warning(
            "%d finished shards are not readable by every worker; computing them again "
            "(put shard_dir on storage that all workers share)",
            dropped,
        )
    return agreed


class _ShardStore:
    """Finished shards in `directory` (None: nothing is kept), written by the chief only."""

    def __init__(self, directory, key, is_chief):
        self.directory, self.key, self.is_chief = directory, key, is_chief
        self.fingerprint = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
        if directory and is_chief:
            os.makedirs(directory, exist_ok=True)

    def path(self, start, end):
        name = f"{_PREFIX}-{self.fingerprint}-{start:010d}-{end:010d}.npz"
        return os.path.join(self.directory, name)

    def digest(self, images, labels, indices, start, end):
        """What the shard `[start, end)` was computed from: its examples and their indices."""
        if not self.directory:
            return ""
        hasher = hashlib.blake2b(digest_size=16)
        for array in (images[start:end], labels[start:end], indices[start:end]):
            hasher.update(f"{array.dtype}{array.shape}".encode())
            hasher.update(np.ascontiguousarray(array).tobytes())
        hasher.update(f"{start}:{end}".encode())
        return hasher.hexdigest()

    def read(self, start, end, digest):
        """The shard's results, or None when absent, unreadable or made from other work."""
        if not self.directory or not os.path.exists(self.path(start, end)):
            return None
        try:
            with np.load(self.path(start, end), allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            logging.warning(
                "unreadable shard %s (%s); computing it again", self.path(start, end), e
            )
            return None
        if (
            str(arrays.pop(_META_KEY, "")) != self.key
            or str(arrays.pop(_META_DIGEST, "")) != digest
        ):
            logging.warning(
                "shard %s was made from other work; computing it again", self.path(start, end)
            )
            return None
        if not arrays or any(len(v) != end - start for v in arrays.values()):
            logging.warning(
                "shard %s has the wrong length; computing it again", self.path(start, end)
            )
            return None
        return arrays

    def write(self, start, end, digest, results):
        """Writes a finished shard atomically: readers see all of it or nothing."""
        if not self.directory or not self.is_chief:
            return
        path = self.path(start, end)
        temporary = os.path.join(self.directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
        with open(temporary, "wb") as f:
            np.savez(f, **results, **{_META_KEY: self.key, _META_DIGEST: digest})
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)


class _Clock:
    """Examples done, examples/s over all workers and ETA, for the progress lines."""

    def __init__(self, total, resumed):
        self.total, self.resumed, self.done = total, resumed, resumed
        self.start = time.perf_counter()

    def advance(self, count):
        self.done += count
        elapsed = time.perf_counter() - self.start
        rate = (self.done - self.resumed) / max(elapsed, 1e-9)
        eta = (self.total - self.done) / rate if rate else 0.0
        minutes, seconds = divmod(int(round(eta)), 60)
        return (
            f"evaluated {self.done}/{self.total} examples ({100.0 * self.done / self.total:.0f}%)"
            f" | {rate:.3g} examples/s | ETA {minutes}m{seconds:02d}s"
        )


def _concatenate(parts):
    keys = sorted(parts[0])
    for part in parts[1:]:
        if sorted(part) != keys:
            raise ValueError(
                f"results have different keys ({keys} vs {sorted(part)}): shards written by "
                "another fn under the same key? Use a key that describes the work."
            )
    return {k: np.concatenate([part[k] for part in parts]) for k in keys}


def _report(progress, line):
    if progress is not None:
        progress(line)
