"""Tests for s2s_tf/robustness/streaming.py: a split streamed in shards equals one in-memory run.

- `StreamTest` (in process, no strategy): a folder of PNGs streamed in shards of 7
  gives every number of one in-memory `Evaluator` run over the same examples
  (per-example results, headline, rows; times aside); a rerun reads the shards.
- `ProcessesTest` (subprocesses of this file, one strategy each): the same with 2
  replicas; SIGKILL in the middle of a shard, then a rerun on 2 workers: the same
  results, no finished shard attacked again, each missing shard by one worker
  (the attack calls are logged); memory stays flat over the shards, while the
  in-memory path holds the split.
- `ChoicesTest`: the threat model the checks rerun is chosen once, on the first
  shard, and every shard reruns it, as an in-memory run choosing on those examples.
- `SurrogateTest`: the surrogate's scales are measured once, on the split's first
  examples, as an in-memory run measures them.
- `PartsTest`: shard ranges, workers, TF_CONFIG, shard files, the streamed reader.
"""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
import zlib
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf

import s2s_tf
from s2s_tf import data as data_lib
from s2s_tf import testing_utils
from s2s_tf.analysis import report
from s2s_tf.data import input_pipeline
from s2s_tf.models import s2s_model
from s2s_tf.robustness import cascade
from s2s_tf.robustness import evaluation
from s2s_tf.robustness import sharded
from s2s_tf.robustness import streaming
from s2s_tf.train import distribute

SIZE, CLASSES, EXAMPLES, SHARD = 16, 3, 23, 7
CONFIG = evaluation.EvalConfig(
    attacks=("apgd_ce",),
    gradient_free_attacks=("square",),
    threat_models=("white_box", "gradient_free", "transfer"),
    eps=(8 / 255,),
    num_examples=None,
    batch_size=4,
    steps=3,
    restarts=1,
    target_classes=1,
    gradient_free_examples=10,  # crosses a shard boundary: the split's first ten
    gradient_free_queries=5,
    check_extra_restarts=1,
)
# Memory: one cheap attack, large images, so a shard's images outweigh the noise.
MEMORY_SIZE, MEMORY_EXAMPLES, MEMORY_SHARD = 64, 1200, 100
MEMORY_CONFIG = evaluation.EvalConfig(
    attacks=("fgsm",),
    gradient_free_attacks=(),
    threat_models=("white_box",),
    eps=(8 / 255,),
    num_examples=None,
    batch_size=MEMORY_SHARD,
    steps=1,
    check_extra_restarts=1,
)
CONFIGS = {"small": CONFIG, "memory": MEMORY_CONFIG}
_TIMEOUT_S = 900


def write_folder(root, count, size, seed=0):
    """`count` random PNGs of `size` px in CLASSES class folders under `root`."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        folder = os.path.join(root, f"class{index % CLASSES}")
        os.makedirs(folder, exist_ok=True)
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        tf.io.write_file(os.path.join(folder, f"{index:06d}.png"), tf.io.encode_png(image))
    return root


def data_config(folder, size):
    return data_lib.DataConfig(source="folder", folder=folder, split="test", image_size=(size,) * 2)


def load_models(path):
    defended = s2s_model.load_keras(path, "defended model")
    purifier = s2s_model.build_purifier(
        s2s_model.get_autoencoder(defended), defended.input_shape[1:]
    )
    return evaluation.Models(
        classifier=s2s_model.get_classifier(defended), defended=defended, purifier=purifier
    )


def comparable(results):
    """`results` without wall-clock times, as JSON would store them."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ("timing", "seconds")}
        if isinstance(value, list | tuple):
            return [strip(v) for v in value]
        return value

    return json.loads(json.dumps(strip(results), default=report.jsonable))


def _tmpdir(test):
    directory = tempfile.mkdtemp(prefix="streaming_test_")
    test.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    return directory


class _Fixture:
    """A tiny defended model and a folder of PNGs, made once for the module."""

    _made = None

    @classmethod
    def get(cls):
        if cls._made is None:
            root = tempfile.mkdtemp(prefix="streaming_test_")
            models = testing_utils.save_tiny_models(root, size=(SIZE, SIZE), num_classes=CLASSES)
            folder = write_folder(os.path.join(root, "images"), EXAMPLES, SIZE)
            data = data_config(folder, SIZE)
            images, labels = data_lib.load_numpy(data)
            reference = evaluation.Evaluator(
                load_models(models["defended"]), images, labels, CONFIG, lambda line: None,
                choose_on=SHARD,
            ).run()  # fmt: skip
            cls._made = (root, models["defended"], folder, comparable(reference))
        return cls._made


class StreamTest(tf.test.TestCase):
    def test_streamed_shards_give_the_in_memory_numbers(self):
        _, model_path, folder, reference = _Fixture.get()
        shard_dir = _tmpdir(self)
        stream = streaming.StreamConfig(shard_size=SHARD)
        lines, summaries = [], os.path.join(shard_dir, "tensorboard")
        results = streaming.evaluate_split(
            load_models(model_path), data_config(folder, SIZE), CONFIG, shard_dir,
            stream=stream, progress=lines.append, summary_dir=summaries,
        )  # fmt: skip
        self.assertEqual(comparable(results), reference)
        self.assertLen([n for n in os.listdir(shard_dir) if n.startswith("examples-")], 4)
        done = [line for line in lines if line.startswith("shard [")]
        self.assertLen(done, 4)
        self.assertRegex(done[-1], r"23/23 examples \(100%\) \| .* examples/s \| ETA 0h00m00s")
        scalars = _scalars(summaries)
        self.assertEqual(scalars["eval_progress/examples_done"], [7, 14, 21, 23])
        self.assertLen(scalars["eval_progress/examples_per_second"], 4)
        self.assertEqual(scalars["eval_progress/eta_seconds"][-1], 0.0)
        # A rerun reads every shard back: no Evaluator runs.
        original, calls = evaluation.Evaluator.run, []
        evaluation.Evaluator.run = lambda self: calls.append(self) or original(self)
        try:
            again = streaming.evaluate_split(
                load_models(model_path), data_config(folder, SIZE), CONFIG, shard_dir,
                stream=stream, progress=lambda line: None,
            )  # fmt: skip
        finally:
            evaluation.Evaluator.run = original
        self.assertEmpty(calls)
        self.assertEqual(comparable(again), reference)


class ChoicesTest(tf.test.TestCase):
    def test_every_shard_rechecks_the_first_shards_choice(self):
        """The strongest threat model is chosen once, on the first shard, for every shard.

        The choice is rigged to depend on where an evaluation starts (index_offset),
        so a shard that chose on its own examples would recheck another threat model
        than the in-memory run, which chooses on the first shard's examples.
        """
        _, model_path, folder, _ = _Fixture.get()
        config = dataclasses.replace(
            CONFIG, threat_models=("white_box", "bpda"), gradient_free_attacks=()
        )
        data = data_config(folder, SIZE)
        original = cascade.Cascade._most_fooled

        def rigged(self, variants, eps):
            variants = list(variants)
            return variants[(self.ev.index_offset // SHARD) % len(variants)]

        cascade.Cascade._most_fooled = rigged
        try:
            images, labels = data_lib.load_numpy(data)
            reference = evaluation.Evaluator(
                load_models(model_path), images, labels, config, lambda line: None,
                choose_on=SHARD,
            ).run()  # fmt: skip
            shard_dir = _tmpdir(self)
            results = streaming.evaluate_split(
                load_models(model_path), data, config, shard_dir,
                stream=streaming.StreamConfig(shard_size=SHARD), progress=lambda line: None,
            )  # fmt: skip
        finally:
            cascade.Cascade._most_fooled = original
        self.assertEqual(reference["choices"]["strongest"], {"8/255": "white_box"})
        # The gradients' distance is measured on an Evaluator's first 32 examples (the
        # first shard's 7 here): the one number allowed to differ (see SurrogateTest).
        results, reference = comparable(results), comparable(reference)
        self.assertNotEqual(results.pop("gradient_difference"), {})
        reference.pop("gradient_difference")
        self.assertEqual(results, reference)
        for name in os.listdir(shard_dir):
            if name.startswith("examples-"):
                with open(os.path.join(shard_dir, name)) as f:
                    self.assertEqual(json.load(f)["results"]["choices"], reference["choices"], name)

    def test_given_choices_must_name_a_run_of_the_evaluation(self):
        _, model_path, folder, _ = _Fixture.get()
        images, labels = data_lib.load_numpy(data_config(folder, SIZE))
        evaluator = evaluation.Evaluator(
            load_models(model_path), images[:4], labels[:4], CONFIG, lambda line: None,
            choices={"strongest": {"8/255": "bpda"}, "large_eps": ["bpda"]},
        )  # fmt: skip
        with self.assertRaisesRegex(ValueError, "'bpda'.*another evaluation"):
            evaluator.run()


class SurrogateTest(tf.test.TestCase):
    def test_the_surrogate_is_calibrated_once_for_every_shard(self):
        _, model_path, folder, _ = _Fixture.get()
        config = dataclasses.replace(
            CONFIG, threat_models=("surrogate",), surrogate_temperatures=(1.0,)
        )
        data = data_config(folder, SIZE)
        images, labels = data_lib.load_numpy(data)
        reference = evaluation.Evaluator(
            load_models(model_path), images, labels, config, lambda line: None
        ).run()
        self.assertNotEmpty(reference["surrogate_scales"])
        results = streaming.evaluate_split(
            load_models(model_path), data, config, _tmpdir(self),
            stream=streaming.StreamConfig(shard_size=SHARD), progress=lambda line: None,
        )  # fmt: skip
        # Scales measured per shard would differ between shards (and fail to merge).
        self.assertEqual(results["surrogate_scales"], reference["surrogate_scales"])
        # The gradients' distance is measured on an Evaluator's first 32 examples: the
        # first shard's 7 here, so it is the one number allowed to differ.
        results, reference = comparable(results), comparable(reference)
        self.assertNotEqual(results.pop("gradient_difference"), {})
        reference.pop("gradient_difference")
        self.assertEqual(results, reference)


def _rigged_attack(evaluator, key, attack, source, eps, indices, scored, **overrides):
    """A stand-in for `Evaluator.run_attack`: each run fools its own pseudo-random share of
    the examples (by the example's index in the split), more with more steps, so the
    worst case, each run's new examples and each round's examples differ."""
    steps = overrides.get("steps", evaluator.config.steps)
    share = 0.15 + 0.1 * np.log2(steps / evaluator.config.steps + 1)
    draws = [
        zlib.crc32(f"{key}:{i + evaluator.index_offset}".encode()) % 1000 / 1000 for i in indices
    ]
    survived = np.asarray(draws) >= share
    return {name: survived for name in scored}


class MoreRoundsTest(tf.test.TestCase):
    def test_more_rounds_extend_finished_shards_as_one_evaluation_would(self):
        """Raising convergence_rounds on a finished evaluation runs only the added rounds.

        The extended shards equal those of an evaluation that ran every round from the
        start: per-example results, counts, headline, verdicts and the order of the runs.
        (The attacks are rigged: the tiny model is fooled by none.)
        """
        _, model_path, folder, _ = _Fixture.get()
        data, stream = data_config(folder, SIZE), streaming.StreamConfig(shard_size=SHARD)
        one, three = (dataclasses.replace(CONFIG, convergence_rounds=r) for r in (1, 3))
        shard_dir = _tmpdir(self)
        attacked, runs, lines = [], [], []

        def counted(evaluator, key, *args, **kwargs):
            attacked.append(key)
            return _rigged_attack(evaluator, key, *args, **kwargs)

        def evaluate(config, directory, progress=lambda line: None):
            return streaming.evaluate_split(
                load_models(model_path), data, config, directory, stream=stream,
                progress=progress,
            )  # fmt: skip

        original_run = evaluation.Evaluator.run
        with mock.patch.object(evaluation.Evaluator, "run_attack", counted):
            evaluate(one, shard_dir)
            attacked.clear()
            with mock.patch.object(
                evaluation.Evaluator, "run", lambda ev: runs.append(ev) or original_run(ev)
            ):
                extended = evaluate(three, shard_dir, lines.append)
            added = set(attacked)
            fresh = evaluate(three, _tmpdir(self))
            attacked.clear()
            again = evaluate(three, shard_dir)  # every shard file now holds the three rounds
        self.assertEmpty(runs)  # no shard ran the suite again
        rounds_2_and_3 = ("check_more_steps_x4", "check_restarts_r3", "check_more_steps_x8")
        self.assertEqual(
            added, {f"{run}/apgd_ce/8/255" for run in (*rounds_2_and_3, "check_restarts_r5")}
        )
        self.assertEmpty(attacked)
        self.assertTrue(any("4 by adding convergence rounds" in line for line in lines), lines)
        # The rigged attacks make every count differ from the trivial one.
        counts = fresh["runs"]["check_more_steps_x8/apgd_ce/8/255"]
        self.assertGreater(counts["new"], 0)
        self.assertLess(counts["robust_after"], counts["attacked"])
        self.assertEqual(comparable(extended), comparable(fresh))
        self.assertEqual(list(extended["runs"]), list(fresh["runs"]))
        self.assertEqual(list(extended["per_example"]), list(fresh["per_example"]))
        self.assertEqual(comparable(again), comparable(fresh))


def _scalars(directory):
    """tag -> values of the scalar summaries in the event files under `directory`."""
    values = {}
    for root, _, names in os.walk(directory):
        for name in sorted(names):
            for record in tf.data.TFRecordDataset(os.path.join(root, name)):
                for value in tf.compat.v1.Event.FromString(record.numpy()).summary.value:
                    values.setdefault(value.tag, []).append(float(tf.make_ndarray(value.tensor)))
    return values


def _run_worker(args, wait=True):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    root = os.path.dirname(os.path.dirname(os.path.abspath(s2s_tf.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    command = [sys.executable, os.path.abspath(__file__), "worker", json.dumps(args)]
    log = open(args["out"] + ".log", "w")  # noqa: SIM115 (closed by the caller's wait)
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log = log
    return _wait(proc) if wait else proc


def _wait(proc):
    try:
        proc.wait(timeout=_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.log.close()
    return proc


def _output(proc, args):
    if proc.returncode != 0:
        with open(args["out"] + ".log") as f:
            raise AssertionError(f"worker {args} exited {proc.returncode}:\n{f.read()[-4000:]}")
    with open(args["out"]) as f:
        return json.load(f)


def _calls(log):
    with open(log) as f:
        return [json.loads(line) for line in f]


class ProcessesTest(tf.test.TestCase):
    def _args(self, tmp, name, **extra):
        _, model_path, folder, _ = _Fixture.get()
        args = {
            "models": model_path,
            "folder": folder,
            "size": SIZE,
            "config": "small",
            "shard_size": SHARD,
            "shard_dir": os.path.join(tmp, "shards"),
            "replicas": 0,
            "worker": [0, 1],
            "out": os.path.join(tmp, f"{name}.json"),
            "log": os.path.join(tmp, "calls.jsonl"),
        }
        return {**args, **extra}

    def test_two_replicas_give_the_in_memory_numbers(self):
        tmp = _tmpdir(self)
        args = self._args(tmp, "two", replicas=2)
        output = _output(_run_worker(args), args)
        self.assertEqual(output["replicas"], 2)
        self.assertEqual(comparable(output["results"]), _Fixture.get()[3])
        # Each shard's run results were deleted once its own file held them.
        self.assertEqual(os.listdir(os.path.join(args["shard_dir"], "runs")), [])

    def test_killed_in_a_shard_then_two_workers_finish_without_repeating_work(self):
        tmp = _tmpdir(self)
        first = self._args(tmp, "killed", kill_in_shard=2 * SHARD, kill_after=2)
        proc = _run_worker(first)
        self.assertEqual(proc.returncode, -signal.SIGKILL, "the worker was not killed")
        shard_dir = first["shard_dir"]
        names = sorted(n for n in os.listdir(shard_dir) if n.startswith("examples-"))
        self.assertLen(names, 2)  # shards [0, 7) and [7, 14); nothing of [14, 21)
        self.assertEqual([n for n in os.listdir(shard_dir) if n.startswith(".")], [])
        before = {n: os.stat(os.path.join(shard_dir, n)).st_mtime_ns for n in names}
        killed_calls = _calls(first["log"])
        self.assertEqual({c["shard"] for c in killed_calls}, {0, SHARD, 2 * SHARD})

        workers = [
            self._args(tmp, f"worker{i}", worker=[i, 2], log=os.path.join(tmp, f"calls{i}.jsonl"))
            for i in range(2)
        ]
        procs = [_run_worker(args, wait=False) for args in workers]
        for proc in procs:
            _wait(proc)
        output = _output(procs[0], workers[0])
        self.assertEqual(comparable(output["results"]), _Fixture.get()[3])
        self.assertEqual(procs[1].returncode, 0)
        # Worker i of 2 takes shards i, i + 2: worker 0 redid the killed shard [14, 21),
        # worker 1 the last one; the finished shards were neither attacked nor rewritten.
        self.assertEqual({c["shard"] for c in _calls(workers[0]["log"])}, {2 * SHARD})
        self.assertEqual({c["shard"] for c in _calls(workers[1]["log"])}, {3 * SHARD})
        for name, mtime in before.items():
            self.assertEqual(os.stat(os.path.join(shard_dir, name)).st_mtime_ns, mtime)

    # Alone on the machine: scripts/run_tests.sh runs the "serial" tests after the others.
    @pytest.mark.serial
    def test_memory_stays_flat_over_the_shards(self):
        tmp = _tmpdir(self)
        folder = write_folder(os.path.join(tmp, "images"), MEMORY_EXAMPLES, MEMORY_SIZE)
        models = testing_utils.save_tiny_models(
            os.path.join(tmp, "models"), size=(MEMORY_SIZE,) * 2, num_classes=CLASSES
        )
        common = dict(
            models=models["defended"], folder=folder, size=MEMORY_SIZE, config="memory",
            shard_size=MEMORY_SHARD, replicas=1,
        )  # fmt: skip
        stream_args = self._args(tmp, "stream", **common)
        memory_args = self._args(tmp, "memory", in_memory=True, **common)
        stream = _output(_run_worker(stream_args), stream_args)
        if stream["peak_rss_kb"] is None:
            self.skipTest("peak memory is read from /proc/self/status")
        memory = _output(_run_worker(memory_args), memory_args)
        self.assertEqual(comparable(stream["results"]), comparable(memory["results"]))
        image_bytes = MEMORY_SIZE * MEMORY_SIZE * 3 * 4
        shard_bytes = MEMORY_SHARD * image_bytes
        # Peak RSS after each shard: the first shards compile the few batch shapes there
        # are; then the second half of the split (6 shards) must add less than half its
        # images: no shard's images are kept. Nothing accumulates (traces, Python objects
        # and malloc's memory in use are flat from the fourth shard on), but the peak is a
        # running maximum of each shard's working set, which varies with how many
        # examples its cascade attacks: it still rises by 1.5-3.4 MB at a few shards
        # (2.8-6.3 MB over the 6, with glibc's free pages trimmed after each shard;
        # 6.5-8.4 MB without), so one shard's images (4.9 MB) is not a safe bound.
        peaks = [kb * 1024 for kb in stream["peak_rss_kb_by_shard"]]
        half = len(peaks) - len(peaks) // 2
        growth = stream["peak_rss_kb"] * 1024 - peaks[len(peaks) // 2 - 1]
        numbers = (
            f"peaks by shard (KiB) {stream['peak_rss_kb_by_shard']}, "
            f"in memory {memory['peak_rss_kb']}"
        )
        self.assertLess(growth, half * shard_bytes / 2, numbers)
        # The in-memory path holds the split: the measurement tells them apart.
        held = (memory["peak_rss_kb"] - stream["peak_rss_kb"]) * 1024
        self.assertGreater(held, MEMORY_EXAMPLES * image_bytes / 2, numbers)


class PartsTest(tf.test.TestCase):
    def test_shard_ranges_and_workers(self):
        self.assertEqual(streaming.shard_ranges(23, 7), [(0, 7), (7, 14), (14, 21), (21, 23)])
        self.assertEqual(streaming.Worker(1, 3).shards(8), [1, 4, 7])
        for index, count in ((2, 2), (-1, 2), (0, 0)):
            with self.assertRaisesRegex(ValueError, "worker index must be in"):
                streaming.Worker(index, count)

    def test_workers_from_tf_config(self):
        cluster = {"chief": ["a:1"], "worker": ["b:1", "c:1"]}
        for task, expected in ((("chief", 0), (0, 3)), (("worker", 1), (2, 3))):
            raw = json.dumps({"cluster": cluster, "task": {"type": task[0], "index": task[1]}})
            self.assertEqual(streaming.worker_from_tf_config(raw), streaming.Worker(*expected))
        for raw in (None, "{}", json.dumps({"cluster": cluster, "task": {"type": "ps"}})):
            with self.assertRaisesRegex(ValueError, "TF_CONFIG"):
                streaming.worker_from_tf_config(raw)

    def test_shard_files_ignore_other_work_and_broken_files(self):
        directory = _tmpdir(self)
        files = streaming.ShardFiles(directory, "key-a")
        results = {"num_examples": 3, "per_example": {"clean/defended": [1, 0, 1]}}
        files.write(0, 3, results)
        self.assertEqual(files.read(0, 3), results)
        self.assertEqual(os.listdir(directory), [os.path.basename(files.path(0, 3))])
        self.assertIsNone(files.read(3, 6))  # absent
        self.assertIsNone(streaming.ShardFiles(directory, "key-b").read(0, 3))
        shutil.copy(files.path(0, 3), files.path(3, 6))  # another range's results
        with self.assertLogs(level="WARNING"):
            self.assertIsNone(files.read(3, 6))
        with open(files.path(0, 3), "w") as f:
            f.write('{"key": "key-a", "start": 0, "end"')  # cut short
        with self.assertLogs(level="WARNING"):
            self.assertIsNone(files.read(0, 3))
        with self.assertRaisesRegex(TimeoutError, "1 shards are still missing"):
            files.wait_for([(3, 6)], 0.0, lambda line: None)

    def test_the_shard_key_covers_models_settings_and_data(self):
        data = data_config("/images", SIZE)
        key = streaming.shard_key("m", CONFIG, data)
        self.assertNotEqual(streaming.shard_key("other", CONFIG, data), key)
        hotter = dataclasses.replace(CONFIG, surrogate_temperatures=(0.3, 2.0))
        self.assertNotEqual(streaming.shard_key("m", hotter, data), key)
        self.assertNotEqual(streaming.shard_key("m", CONFIG, data_config("/other", SIZE)), key)
        # The surrogate's scales, measured on the split's first examples (fewer in a
        # shorter evaluation), change the attacks' results.
        scaled = streaming.shard_key("m", CONFIG, data, {"pool1": 0.5})
        self.assertNotEqual(scaled, key)
        self.assertNotEqual(streaming.shard_key("m", CONFIG, data, {"pool1": 0.25}), scaled)
        self.assertEqual(streaming.shard_key("m", CONFIG, data, {"pool1": 0.5}), scaled)
        # The split's length and the batch size do not change an example's result.
        longer = dataclasses.replace(data, num_examples=5, global_batch_size=3)
        self.assertEqual(
            streaming.shard_key("m", dataclasses.replace(CONFIG, num_examples=9), longer), key
        )

    def test_read_shards_cuts_the_load_numpy_examples(self):
        _, _, folder, _ = _Fixture.get()
        data = data_config(folder, SIZE)
        images, labels = data_lib.load_numpy(data)
        self.assertEqual(input_pipeline.count_examples(data), EXAMPLES)
        shards = list(input_pipeline.read_shards(data, SHARD))
        self.assertEqual([s for s, _, _ in shards], [0, 1, 2, 3])
        self.assertAllEqual(np.concatenate([x for _, x, _ in shards]), images)
        self.assertAllEqual(np.concatenate([y for _, _, y in shards]), labels)
        wanted = list(input_pipeline.read_shards(data, SHARD, wanted=[3, 1]))
        self.assertEqual([s for s, _, _ in wanted], [1, 3])
        self.assertAllEqual(wanted[1][1], images[21:])
        self.assertEmpty(list(input_pipeline.read_shards(data, SHARD, wanted=[])))
        with self.assertRaisesRegex(ValueError, "shard_size must be a positive int"):
            next(input_pipeline.read_shards(data, 0))

    def test_read_shards_releases_its_iterator_off_this_thread(self):
        _, _, folder, _ = _Fixture.get()
        data = data_config(folder, SIZE)
        real, deleted_on = input_pipeline.release_in_background, []

        def record(holder):
            # Runs on the thread that drops the last reference to the iterator.
            weakref.finalize(holder[0], lambda: deleted_on.append(threading.get_ident()))
            return real(holder)

        for stop_early in (False, True):
            deleted_on.clear()
            with mock.patch.object(input_pipeline, "release_in_background", record):
                shards = input_pipeline.read_shards(data, SHARD)
                if stop_early:  # the caller stops after one shard
                    next(shards)
                    shards.close()
                else:
                    self.assertLen(list(shards), 4)
            for _ in range(300):  # the release's thread (give it 30 s)
                if deleted_on:
                    break
                time.sleep(0.1)
            self.assertLen(deleted_on, 1, f"stop_early={stop_early}")
            self.assertNotEqual(deleted_on[0], threading.get_ident(), f"stop_early={stop_early}")


def _worker_main(args):
    """One evaluation in this process (see `ProcessesTest`); writes its results and peak RSS."""
    if args["replicas"] > 1:
        distribute.split_cpu(args["replicas"])
    strategy = distribute.create_strategy("mirrored") if args["replicas"] else None
    models, config = load_models(args["models"]), CONFIGS[args["config"]]
    data = data_config(args["folder"], args["size"])
    _log_attack_calls(args)
    # The workers of one test share a version of the code (tests/sharded_test.py checks
    # that the version enters the keys), even if the checkout is edited meanwhile.
    sharded.loaded_code_version = lambda sources=sharded.ATTACK_CODE: "pinned-by-the-test"
    peaks = []

    def progress(line):
        if line.startswith("shard ["):
            peaks.append(peak_rss_kb())

    if args.get("in_memory"):
        images, labels = data_lib.load_numpy(data)
        runs = (
            sharded.ShardedAttacks(strategy, config.batch_size, config.seed) if strategy else None
        )
        results = evaluation.Evaluator(models, images, labels, config, progress, runs).run()
    else:
        stream = streaming.StreamConfig(shard_size=args["shard_size"], merge_timeout_s=600)
        results = streaming.evaluate_split(
            models, data, config, args["shard_dir"], stream=stream,
            worker=streaming.Worker(*args["worker"]), strategy=strategy, progress=progress,
        )  # fmt: skip
    if results is not None:
        output = {
            "results": results,
            "replicas": strategy.num_replicas_in_sync if strategy else 0,
            "peak_rss_kb": peak_rss_kb(),
            "peak_rss_kb_by_shard": peaks,
        }
        with open(args["out"], "w") as f:
            json.dump(output, f, default=report.jsonable)


def peak_rss_kb():
    """This process's peak resident memory since it started its program, in KiB (Linux).

    `/proc/self/status` VmHWM belongs to the running program; `getrusage`'s
    ru_maxrss also counts the memory of the parent it was forked from. None
    where there is no /proc.
    """
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def _log_attack_calls(args):
    """Logs every finished attack run with its shard; SIGKILLs this process where asked."""
    original, done = evaluation.Evaluator.run_attack, {}

    def run_attack(self, key, *rest, **kwargs):
        result = original(self, key, *rest, **kwargs)
        with open(args["log"], "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "shard": self.index_offset, "run": key}) + "\n")
        done[self.index_offset] = done.get(self.index_offset, 0) + 1
        if self.index_offset == args.get("kill_in_shard") and done[self.index_offset] >= args.get(
            "kill_after", 1
        ):
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    evaluation.Evaluator.run_attack = run_attack


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        _worker_main(json.loads(sys.argv[2]))
    else:
        tf.test.main()
