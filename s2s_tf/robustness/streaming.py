"""A whole split, streamed from tf.data in fixed-size shards: bounded memory, resumable, shared.

    results = streaming.evaluate_split(
        models, data_config, eval_config, shard_dir,
        stream=streaming.StreamConfig(shard_size=1000), worker=streaming.Worker(0, 1),
        strategy=strategy, model_key=sharded.file_fingerprint(paths))

The split (`data.read_shards`: the source and preprocessing of `data.load_numpy`,
in the same order) is cut into shards of `shard_size` examples. Each shard is
read, attacked by the whole suite (one `evaluation.Evaluator` per shard, whose
random starts are seeded by each example's index in the split), written with
its per-example results (a temporary file, then `os.replace`: a killed worker
leaves no partial shard) and dropped before the next is read, so host memory
holds a few shards whatever the size of the split.

Workers split shards, not examples: worker w of W takes the shards i with
i % W == w (no coordinator), on its own devices (`strategy` is local to the
worker). A shard file is named by its example range and a key (the models,
every setting that changes results, the code, the data), so the shards of a
split are the same whatever the number of workers, and a rerun on any number
of workers computes only the missing ones. Worker 0 waits until every shard
exists, then merges them (`merge`: per-example results concatenated in order,
counts summed, everything downstream recomputed by `evaluation.finalize`),
which gives the numbers of one in-memory `Evaluator` run over the same examples.

The runs the checks repeat (the threat model whose reference run fooled the
most, which the convergence checks and the large-eps run attack again) are
chosen once, on the first shard (`cascade`), and every other shard is given
that choice: so every example is rechecked through the same threat model, as
in an in-memory `Evaluator` run given `choose_on=shard_size`. A worker without
the first shard waits for its file before its own first shard (with one
gradient threat model there is nothing to choose, and no wait).

Raising `convergence_rounds` on a finished evaluation reuses its shards: a
shard of the same work with fewer rounds is read back and given only the
rounds it lacks (`_MoreRounds`), then written under the new key. This module
is not part of the shard key's code version (`EVALUATION_CODE`): it decides
which shards to compute, not any run's results, which the cascade computes.
"""

import ctypes
import ctypes.util
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import time

import numpy as np
import tensorflow as tf
from absl import logging

from s2s_tf import data as data_lib
from s2s_tf.config_io import setting
from s2s_tf.data import input_pipeline
from s2s_tf.robustness import cascade
from s2s_tf.robustness import evaluation
from s2s_tf.robustness import merging
from s2s_tf.robustness import sharded as sharded_lib

# Sources (relative to this package) whose code decides a shard's results, beyond the
# attack code that `sharded.code_version` covers.
EVALUATION_CODE = (*sharded_lib.ATTACK_CODE, "cascade.py", "eval_config.py", "evaluation.py")
_PREFIX = "examples"
_POLL_S = 5.0


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """How a split is cut into shards and how long worker 0 waits for the others.

    Attributes:
      shard_size: examples per shard (read, attacked, written, dropped).
      merge_timeout_s: seconds worker 0 waits, after its own shards, for the
        other workers' shards before it fails (naming the missing ones).
    """

    shard_size: int = setting(
        1000,
        "Examples per evaluation shard: read, attacked by the whole suite, written, dropped. "
        "Host memory holds a few shards whatever the split's size.",
        flag="eval_shard_size",
        lower_bound=1,
    )
    merge_timeout_s: float = setting(
        86400.0,
        "Seconds worker 0 waits for the other evaluation workers' shards before failing.",
        flag="eval_merge_timeout",
        lower_bound=0.0,
    )


@dataclasses.dataclass(frozen=True)
class Worker:
    """This process's place among the processes that share an evaluation's shards.

    Attributes:
      index: this worker (0 merges and returns the results).
      count: how many workers share the shards.
    """

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"worker index must be in [0, {self.count}), got {self.index}")

    def shards(self, count):
        """The indices of the `count` shards that this worker computes."""
        return list(range(self.index, count, self.count))


def worker_from_tf_config(raw):
    """The `Worker` a `TF_CONFIG` describes: the chief (if any) is 0, worker i follows.

    Raises:
      ValueError: for a TF_CONFIG without a cluster of chief/worker tasks naming this task.
    """
    try:
        config = json.loads(raw or "")
        cluster, task = config["cluster"], config["task"]
        kind, index = task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"TF_CONFIG needs 'cluster' and 'task' (type, index), got {raw!r}") from e
    chiefs, workers = len(cluster.get("chief", [])), len(cluster.get("worker", []))
    if kind not in ("chief", "worker") or index >= (chiefs if kind == "chief" else workers):
        raise ValueError(f"TF_CONFIG task {task} is not a chief or worker of {cluster}")
    return Worker(index if kind == "chief" else chiefs + index, chiefs + workers)


def shard_key(model_key, config, data, scales=None):
    """What a shard's results depend on besides its examples' range (a file-name fingerprint).

    The models, every setting of the evaluation (`sharded.settings_key`: all but
    the number of examples), the evaluation and attack code, the data: its
    source, split, folder and preprocessing (not its batch size or length, so a
    longer evaluation of the same split reuses the shards it shares), and the
    surrogate's calibrated `scales` (measured on the split's first examples, as
    many as the evaluation has up to `surrogate_calibration_examples`: a shorter
    evaluation may have measured others).
    """
    data_fields = dataclasses.asdict(data)
    for name in ("global_batch_size", "num_examples", "shuffle_buffer", "cache", "augment"):
        data_fields.pop(name, None)
    return json.dumps(
        {
            "models": model_key,
            "settings": sharded_lib.settings_key(config),
            "code": sharded_lib.loaded_code_version(EVALUATION_CODE),
            "data": data_fields,
            "surrogate_scales": None
            if scales is None
            else {k: float(v) for k, v in scales.items()},
        },
        sort_keys=True,
        default=repr,
    )


def shard_ranges(total, shard_size):
    """The [start, end) example ranges of the shards of `total` examples."""
    return [(start, min(start + shard_size, total)) for start in range(0, total, shard_size)]


def evaluate_split(
    models,
    data,
    config,
    shard_dir,
    *,
    stream=StreamConfig(),
    worker=Worker(),
    strategy=None,
    model_key="",
    progress=logging.info,
    summary_dir=None,
):
    """Evaluates every example of a split in shards; see the module docstring.

    Args:
      models: an `evaluation.Models`.
      data: the split's `data.DataConfig` (its `image_size` the models').
      config: the `evaluation.EvalConfig`; its `num_examples` bounds the split.
      shard_dir: the folder of finished shards (shared by all workers).
      stream: a `StreamConfig`.
      worker: this process's `Worker`.
      strategy: a `tf.distribute.Strategy` on this worker's devices (attacks in
        per-replica slices, resumable inside a shard), or None (in-process).
      model_key: identifies the models (`sharded.file_fingerprint` of their files).
      progress: callable(str) told about each shard.
      summary_dir: folder for TensorBoard progress scalars, or None.

    Returns:
      The merged results (worker 0), or None (other workers, once their shards exist).

    Raises:
      TimeoutError: when worker 0 waited `merge_timeout_s` for missing shards.
    """
    bounds = [n for n in (data.num_examples, config.num_examples) if n is not None]
    data = dataclasses.replace(data, num_examples=min(bounds) if bounds else None)
    total = input_pipeline.count_examples(data)
    ranges = shard_ranges(total, stream.shard_size)
    _calibrate(models, data, config)
    scales = getattr(models, "scales", None)
    files = ShardFiles(shard_dir, shard_key(model_key, config, data, scales))
    mine = worker.shards(len(ranges))
    todo = [i for i in mine if files.read(*ranges[i]) is None]
    # Finished shards of the same work with fewer convergence rounds get only the rounds
    # they lack (`_MoreRounds`), not the whole suite again.
    # Only where each one is: its results are read when its turn comes, so memory holds
    # one shard's results, not every finished shard's.
    fewer = _fewer_rounds(shard_dir, model_key, config, data, scales)
    earlier = {i: found for i in todo if (found := _holder(fewer, ranges[i])) is not None}
    progress(
        f"evaluation worker {worker.index}/{worker.count}: {total} examples in {len(ranges)} "
        f"shards of {stream.shard_size}; {len(mine)} are this worker's, {len(todo)} to compute"
        + (f" ({len(earlier)} by adding convergence rounds to finished shards)" if earlier else "")
    )
    meter = _Meter(total, ranges, files, progress, summary_dir, worker)
    # One ShardedAttacks for every shard: its compiled steps serve them all.
    sharded = None
    if strategy is not None:
        sharded = sharded_lib.ShardedAttacks(
            strategy,
            config.batch_size,
            config.seed,
            model_key=model_key,
            settings=sharded_lib.settings_key(config),
        )
    # With several gradient threat models the first shard chooses the run the checks
    # repeat, and the other shards wait for its choice (`cascade`).
    choose_once = len(cascade.gradient_sources(models, config)) > 1
    choices = None
    for index, images, labels in input_pipeline.read_shards(data, stream.shard_size, wanted=todo):
        start, end = ranges[index]
        if sharded is not None:  # the runs finished inside a shard survive a kill in its middle
            sharded.shard_dir = os.path.join(
                shard_dir, "runs", f"{files.fingerprint}-{start}-{end}"
            )
        if index > 0 and choices is None and choose_once:
            first = files.wait_for(ranges[:1], stream.merge_timeout_s, progress)[0]
            choices = first["choices"]
        stored = earlier.pop(index).read(start, end) if index in earlier else None
        if stored is not None:
            results = _add_rounds(models, images, labels, config, start, sharded, progress, stored)
        else:
            results = _evaluate_shard(
                models, images, labels, config, start, sharded, progress, choices
            )
        files.write(start, end, results)
        if sharded is not None:
            _delete(sharded.shard_dir)
        del images, labels, results
        _release_free_memory()
        meter.shard_done(start, end)
    if worker.index != 0:
        return None
    parts = files.wait_for(ranges, stream.merge_timeout_s, progress)
    return merging.merge(parts, config)


def _calibrate(models, data, config):
    """Sets the surrogate's scales once, from the split's first examples, for every shard.

    An `Evaluator` measures them on its own first images unless they are set, so
    without this each shard would measure its own, and the results would depend
    on how the split is cut. (Also when every shard is done: the report's own
    attacks on a few examples use the surrogate too.)
    """
    if "surrogate" not in config.threat_models or getattr(models, "scales", None) is not None:
        return
    count = config.surrogate_calibration_examples
    if data.num_examples is not None:  # an in-memory run's images[:count] of a shorter split
        count = min(count, data.num_examples)
    images, _ = data_lib.load_numpy(dataclasses.replace(data, num_examples=count))
    models.calibrate(images)


def _evaluate_shard(models, images, labels, config, start, sharded, progress, choices=None):
    """The results of one `Evaluator` over the shard's examples (their indices from `start`),
    given the first shard's `choices` (None on the first shard, which makes them)."""
    return _shard_evaluator(models, images, labels, config, start, sharded, progress, choices).run()


def _shard_evaluator(models, images, labels, config, start, sharded, progress, choices=None):
    """The `Evaluator` of one shard (its examples' indices from `start`)."""
    end = start + len(images)
    gradient_free = config.gradient_free_examples
    if gradient_free is not None:  # the split's first examples, not each shard's
        gradient_free = max(0, min(gradient_free - start, len(images)))
    shard_config = dataclasses.replace(
        config, num_examples=None, gradient_free_examples=gradient_free
    )
    return evaluation.Evaluator(
        models,
        images,
        labels,
        shard_config,
        progress=lambda line: progress(f"[examples {start}-{end}] {line}"),
        sharded=sharded,
        keep=0,
        index_offset=start,
        choices=choices,
    )


def _fewer_rounds(shard_dir, model_key, config, data, scales):
    """The shard files of this evaluation with fewer convergence rounds, most rounds first."""
    return [
        ShardFiles(
            shard_dir,
            shard_key(model_key, dataclasses.replace(config, convergence_rounds=r), data, scales),
        )
        for r in range(config.convergence_rounds - 1, 0, -1)
    ]


def _holder(files, bounds):
    """The first of `files` that holds a readable finished shard of `bounds`, or None."""
    return next((f for f in files if f.read(*bounds) is not None), None)


def _add_rounds(models, images, labels, config, start, sharded, progress, stored):
    """A finished shard's results (`stored`, made with fewer convergence rounds) with the
    rounds `config` adds: the results one evaluation with every round would have made."""
    evaluator = _shard_evaluator(
        models, images, labels, config, start, sharded, progress, stored["choices"]
    )
    return _MoreRounds(evaluator, stored).run()


class _MoreRounds(cascade.Cascade):
    """Runs only the convergence reruns that a finished shard's results lack.

    Round k of the more-steps rerun depends on nothing but what ran before it at
    its eps: it attacks what round k-1 left robust, and its counts ("new",
    "robust after") are against the worst case over every earlier run at that
    eps. Both are in the stored per-example results, so the added rounds give
    what an evaluation with every round would have given (each example's
    random start is seeded by its index), and the runs are stored in the order
    such an evaluation makes them. Extending changes no run the shard holds.
    """

    def __init__(self, evaluator, stored):
        super().__init__(evaluator)
        evaluator.resume(stored)

    def run(self):
        """Adds the missing rounds at each eps; returns the results, finalized."""
        results, attack = self.ev.results, self.config.check_attack
        strongest = results.get("choices", {}).get("strongest", {})
        for eps in self.config.eps:
            key = evaluation.eps_key(eps)
            if key not in strongest:
                continue  # no gradient threat model: no convergence reruns
            reruns = [
                evaluation.run_key(r.run, attack, eps)
                for r in evaluation.convergence_reruns(self.config)
            ]
            held = [run for run in reruns if run in results["runs"]]
            before = set(results["runs"])
            self._convergence(self._given(strongest[key]), eps, self._robust(key))
            _move_after(results, held[-1], [r for r in reruns if r not in before])
        return evaluation.finalize(results, self.ev.config)

    def _robust(self, key):
        """Per example: robust after every run at eps `key` (what the next rerun sees)."""
        runs, per_example = self.ev.results["runs"], self.ev.results["per_example"]
        robust = self.ev.clean["defended"].copy()
        for run, info in runs.items():
            if info["eps"] == key and not info["threat"].startswith(evaluation.LARGE_EPS):
                robust &= np.asarray(per_example[run], bool)
        return robust

    def _run(self, variant, threat, attack, model_fn, eps, robust, **kw):
        """A rerun the shard holds keeps its stored results (it already counts in `robust`)."""
        stored = self.ev.results["runs"].get(kw.get("key"))
        if stored is not None:
            return stored
        return super()._run(variant, threat, attack, model_fn, eps, robust, **kw)


def _move_after(results, anchor, keys):
    """Puts `keys` right after `anchor` in the results' run-keyed tables (their run order)."""
    for table in ("runs", "per_example", "timing"):
        entries = results.get(table, {})
        if anchor not in entries:
            continue
        moved = {k: entries.pop(k) for k in keys if k in entries}
        reordered = {}
        for k, v in entries.items():
            reordered[k] = v
            if k == anchor:
                reordered.update(moved)
        results[table] = reordered


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None (another C library, or none found)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def _release_free_memory():
    """Hands the pages that a finished shard freed back to the system (glibc only).

    glibc keeps freed memory resident in its heaps, and the transient buffers of
    each shard (copies of its images, attack tensors of a varying number of rows)
    land at different places in them, so without this the peak resident size
    creeps up shard after shard (6.6-8.4 MiB over the last 6 of 12 shards of 100
    64-px images) while the memory in use stays flat. Results are unchanged: it
    frees nothing that is in use.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _delete(folder):
    """Deletes a finished shard's run results (its own file now holds them)."""
    try:
        shutil.rmtree(folder)
    except FileNotFoundError:
        pass  # no run wrote a file (e.g. a shard of eager-only attacks)
    except OSError as e:
        logging.warning("could not delete %s (%s); it can be deleted by hand", folder, e)


class ShardFiles:
    """The finished shards of one key in `directory`: `examples-<fingerprint>-<start>-<end>.json`.

    Args:
      directory: the shard folder (shared by the workers).
      key: what the results depend on (`shard_key`); shards of another key are never read.
    """

    def __init__(self, directory, key):
        self.directory, self.key = directory, key
        self.fingerprint = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
        os.makedirs(directory, exist_ok=True)

    def path(self, start, end):
        name = f"{_PREFIX}-{self.fingerprint}-{start:010d}-{end:010d}.json"
        return os.path.join(self.directory, name)

    def read(self, start, end):
        """The shard's results, or None when absent or unreadable (warned) or of other work."""
        path = self.path(start, end)
        if not os.path.exists(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                stored = json.load(f)
        except (OSError, ValueError) as e:
            logging.warning("unreadable shard %s (%s); computing it again", path, e)
            return None
        results = stored.get("results") if isinstance(stored, dict) else None
        if stored.get("key") != self.key or [stored.get("start"), stored.get("end")] != [
            start,
            end,
        ]:
            logging.warning("shard %s was made from other work; computing it again", path)
            return None
        if not isinstance(results, dict) or results.get("num_examples") != end - start:
            logging.warning("shard %s has the wrong length; computing it again", path)
            return None
        return results

    def write(self, start, end, results):
        """Writes a finished shard atomically: readers see all of it or nothing."""
        path = self.path(start, end)
        temporary = os.path.join(self.directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
        document = {"key": self.key, "start": start, "end": end, "results": results}
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(document, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)

    def done(self, ranges):
        """How many examples of `ranges` are in finished shard files (any worker's)."""
        return sum(end - start for start, end in ranges if os.path.exists(self.path(start, end)))

    def wait_for(self, ranges, timeout_s, progress):
        """Every shard's results, in order, once all exist (polling the folder).

        Raises:
          TimeoutError: naming the missing ranges after `timeout_s` seconds.
        """
        deadline, told = time.monotonic() + timeout_s, False
        while True:
            parts = [_compacted(self.read(*r)) for r in ranges]
            missing = [r for r, part in zip(ranges, parts, strict=True) if part is None]
            if not missing:
                return parts
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{len(missing)} shards are still missing in {self.directory} after "
                    f"{timeout_s:g} s (examples {missing[:5]}...): a worker stopped? Rerun the "
                    "evaluation (any number of workers): finished shards are kept."
                )
            if not told:
                progress(f"waiting for {len(missing)} shards of other workers")
                told = True
            time.sleep(min(_POLL_S, max(0.0, deadline - time.monotonic())))


def _compacted(part):
    """A shard's results with its per-example lists as uint8 arrays (None stays None).

    The merge holds every shard's results at once: as Python lists they cost
    8 bytes per example and run (and more while being joined), which grows
    with the split; as bytes they stay far below one shard's images.
    """
    if part is not None:
        part["per_example"] = {k: merging.compact(v) for k, v in part["per_example"].items()}
    return part


class _Meter:
    """Examples done (all workers' shards), examples/s and ETA: log lines and TensorBoard."""

    def __init__(self, total, ranges, files, progress, summary_dir, worker):
        self.total, self.ranges, self.files = total, ranges, files
        self.progress, self.worker = progress, worker
        self.start, self.done_at_start = time.perf_counter(), files.done(ranges)
        self.writer = None
        if summary_dir:
            name = f"progress_worker{worker.index}" if worker.count > 1 else "progress"
            self.writer = tf.summary.create_file_writer(os.path.join(summary_dir, name))

    def shard_done(self, start, end):
        done = self.files.done(self.ranges)
        elapsed = time.perf_counter() - self.start
        rate = (done - self.done_at_start) / max(elapsed, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else 0.0
        hours, rest = divmod(int(round(eta)), 3600)
        self.progress(
            f"shard [{start}, {end}) done: {done}/{self.total} examples "
            f"({100.0 * done / self.total:.0f}%) | {rate:.3g} examples/s | "
            f"ETA {hours}h{rest // 60:02d}m{rest % 60:02d}s"
        )
        if self.writer is not None:
            with self.writer.as_default(step=done):
                tf.summary.scalar("eval_progress/examples_done", done)
                tf.summary.scalar("eval_progress/examples_per_second", rate)
                tf.summary.scalar("eval_progress/eta_seconds", eta)
            self.writer.flush()
