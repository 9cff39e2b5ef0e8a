"""Runs evaluations under one distribution strategy and dumps what they computed.

`distributed_eval_test.py` runs this script in subprocesses, each holding one
strategy (TensorFlow splits the CPU into logical devices only before it
initialises).

- `local --replicas R`: on 1 device (`OneDeviceStrategy`) or R logical CPU
  devices (`MirroredStrategy`), for every eval size of `SIZES`: `Trainer.evaluate`
  of stages 0, 1 and 2 (and the same means computed directly on all examples at
  once), and `distributed.evaluate_examples` of a per-example seeded noise attack
  and of BIM on the tiny classifier.
- `resume --replicas R --shard_dir D`: BIM through `evaluate_examples` with
  shards in D, recording which example indices `fn` ran on; `--slow S` sleeps S s
  after each shard (so a test can kill the process between shards). Then, in the
  same process, an uninterrupted run without shards, a rerun over the finished
  shards and a run under another key.
- `multi_worker` (with TF_CONFIG): the noise attack, BIM and stage 0's
  `Trainer.evaluate` as one worker of the cluster, shards in this worker's own
  `--shard_dir`, and the attacks again on this process alone; then BIM again
  over the same own folders (only the chief's holds shards) and twice over one
  `--shared_dir` of all workers, recording which indices `fn` ran on.

    python distributed_eval_worker.py local --replicas 2 --tmp D --out F
    python distributed_eval_worker.py resume --replicas 2 --shard_dir D --out F [--slow 1]
    TF_CONFIG=... python distributed_eval_worker.py multi_worker --tmp D --shard_dir S \
        --shared_dir H --out F
"""

import argparse
import dataclasses
import os
import sys
import threading
import time

import distributed_worker
import keras
import numpy as np
import tensorflow as tf

from s2s_tf import data as data_lib
from s2s_tf.models import classifiers
from s2s_tf.robustness import distributed
from s2s_tf.robustness.attacks import pgd
from s2s_tf.train import distribute
from s2s_tf.train import train_lib
from s2s_tf.train import trainer

IMAGE_SIZE = distributed_worker.IMAGE_SIZE
EVAL_BATCH = 6  # the trainer's global eval batch: splits over 1, 2 and 3 replicas
ATTACK_BATCH = 4  # the engine's: 3 replicas take ceil(4 / 3) = 2 each
SHARD_SIZE = 5
# Divisible by the eval batch; a remainder (13 % 6 = 1) smaller than 2 and 3 replicas; a
# remainder (17 % 6 = 5) larger than them; fewer examples than replicas.
SIZES = (12, 13, 17, 2, 1)
STAGES = ("stage0", "stage1", "stage2")
EPS = 8.0 / 255.0
RESUME_SIZE = 23  # 5 shards of 5, the last one short
MW_SIZES = (13, 1)  # two workers' shards of 7 and 6 examples; one worker without any
NOISE_SEED = (7, 11)


def eval_data(num_examples):
    return data_lib.DataConfig(
        source="testing",
        split="test",
        image_size=IMAGE_SIZE,
        global_batch_size=EVAL_BATCH,
        num_examples=num_examples,
    )


def build_classifier():
    """The tiny [0, 1]-input classifier, the same in every process."""
    keras.utils.set_random_seed(3)
    return classifiers.build_classifier_with_preprocessing("testing", (*IMAGE_SIZE, 3), 10)


def noise_attack(model):
    """Uniform L-inf noise seeded by each example's index, so any batching gives the same."""

    def fn(x, y, index):
        def one_noise(i):
            seed = tf.random.experimental.stateless_fold_in(tf.constant(NOISE_SEED, tf.int64), i)
            return tf.random.stateless_uniform(x.shape[1:], seed, -EPS, EPS)

        noise = tf.map_fn(one_noise, index, fn_output_signature=tf.float32)
        noisy = tf.clip_by_value(x + noise, 0.0, 1.0)
        logits = model(noisy, training=False)
        return {
            "noise": noise,
            "index": index,
            "logits": logits,
            "correct": tf.equal(tf.argmax(logits, -1, output_type=tf.int32), y),
        }

    return fn


def bim_attack(model):
    """Three steps of L-inf BIM (PGD without random start): deterministic per example."""

    def fn(x, y, index):
        adversarial = pgd.bim(lambda v: model(v, training=False), x, y, EPS, steps=3)
        predictions = tf.argmax(model(adversarial, training=False), -1, output_type=tf.int32)
        return {
            "adversarial": adversarial,
            "adversarial_correct": tf.equal(predictions, y),
            "index": index,
        }

    return fn


class Recorder:
    """Wraps an attack so that each run of it records the (real) example indices it saw."""

    def __init__(self):
        self._indices, self._lock = [], threading.Lock()

    def wrap(self, fn):
        def record(index):
            with self._lock:  # replicas run in threads
                self._indices.extend(int(i) for i in index.numpy() if i >= 0)
            return np.int32(0)

        def wrapped(x, y, index):
            done = tf.py_function(record, [index], tf.int32)
            with tf.control_dependencies([done]):
                return fn(tf.identity(x), y, index)

        return wrapped

    def take(self):
        """The indices recorded since the last `take`, sorted."""
        with self._lock:
            indices, self._indices = sorted(self._indices), []
        return np.array(indices, np.int64)


def make_strategy(replicas):
    if replicas > 1:
        distribute.split_cpu(replicas)
        strategy = distribute.create_strategy("mirrored")
    else:
        strategy = distribute.create_strategy("one_device")
    if strategy.num_replicas_in_sync != replicas:
        raise RuntimeError(f"wanted {replicas} replicas, got {strategy.num_replicas_in_sync}")
    return strategy


def make_trainer(stage_name, strategy, init_dir, workdir):
    """A `Trainer` of a tiny stage, from the models that `distributed_worker.prepare` wrote."""
    _, optimizer = distributed_worker.SCENARIOS[stage_name]
    config = distributed_worker.train_config(
        stage_name, optimizer, init_dir, global_batch_size=EVAL_BATCH
    )
    classifier_path = os.path.join(init_dir, distributed_worker.INIT_CLASSIFIER)
    # Stage 1 with a classifier also evaluates the classifier alone and defended.
    model = dataclasses.replace(config.model, classifier_path=classifier_path)
    config = dataclasses.replace(config, model=model)
    stage = train_lib.make_stage(config)
    keras.utils.set_random_seed(5)  # stage 1 initialises its autoencoder
    run = trainer.Trainer(
        stage, strategy, config.loop, config.optimizer, workdir, config.train_data, eval_data(1)
    )
    return stage, run


def trainer_evals(strategy, tmp, stage_names=STAGES, sizes=SIZES):
    """`Trainer.evaluate` and the direct means on all examples at once, per stage and size."""
    init_dir = os.path.join(tmp, "init")
    distributed_worker.prepare(init_dir)
    arrays = {}
    for name in stage_names:
        stage, run = make_trainer(name, strategy, init_dir, os.path.join(tmp, "work"))
        for size in sizes:
            data = eval_data(size)
            results = run.evaluate(data)
            images, labels = data_lib.load_numpy(data)
            direct = stage.eval_outputs(tf.constant(images), tf.constant(labels))
            for key in stage.eval_keys:
                arrays[f"trainer|{name}|{size}|{key}"] = np.array(results[key])
                direct_mean = np.mean(np.asarray(direct[key], np.float64))
                arrays[f"direct|{name}|{size}|{key}"] = np.array(direct_mean)
    return arrays


def attack_evals(strategy, model, sizes=SIZES, shard_dir=None):
    """`evaluate_examples` of the noise attack and BIM for every size (each compiled once)."""
    arrays = {}
    for name, make in (("noise", noise_attack), ("bim", bim_attack)):
        evaluate = distributed.ExampleEvaluator(strategy, make(model), batch_size=ATTACK_BATCH)
        for size in sizes:
            images, labels = data_lib.load_numpy(eval_data(size))
            results = evaluate(
                images,
                labels,
                shard_dir=os.path.join(shard_dir, f"{name}{size}") if shard_dir else None,
                shard_size=SHARD_SIZE,
                key=f"{name} size={size}",
            )
            arrays.update({f"{name}|{size}|{k}": v for k, v in results.items()})
    return arrays


def local(args):
    strategy = make_strategy(args.replicas)
    arrays = {"replicas": np.array(strategy.num_replicas_in_sync)}
    arrays.update(trainer_evals(strategy, args.tmp))
    arrays.update(attack_evals(strategy, build_classifier()))
    np.savez(args.out, **arrays)


class RecordedBim:
    """BIM through one `ExampleEvaluator`, recording the indices that `fn` ran on."""

    def __init__(self, strategy, model):
        self.recorder = Recorder()
        fn = self.recorder.wrap(bim_attack(model))
        self.evaluate = distributed.ExampleEvaluator(strategy, fn, batch_size=ATTACK_BATCH)

    def __call__(self, size, shard_dir, key, progress=None):
        images, labels = data_lib.load_numpy(eval_data(size))
        self.recorder.take()
        results = self.evaluate(
            images, labels, shard_dir=shard_dir, shard_size=SHARD_SIZE, key=key, progress=progress
        )
        results["computed"] = self.recorder.take()
        return results


def resume(args):
    """BIM over `RESUME_SIZE` examples in shards; see the module docstring."""
    bim = RecordedBim(make_strategy(args.replicas), build_classifier())
    lines = []

    def progress(line):
        lines.append(line)
        print(line, flush=True)
        time.sleep(args.slow)

    arrays = {}
    for name, shard_dir, key in (
        ("resumed", args.shard_dir, "bim resume"),
        ("fresh", None, "bim resume"),
        ("again", args.shard_dir, "bim resume"),
        ("other_key", args.shard_dir, "bim resume, another model"),
    ):
        results = bim(RESUME_SIZE, shard_dir, key, progress)
        arrays.update({f"{name}|{k}": v for k, v in results.items()})
    arrays["progress"] = np.array(lines)
    np.savez(args.out, **arrays)


def multi_worker(args):
    """Evaluations as one worker of TF_CONFIG's cluster, and the same on this process alone."""
    strategy = distribute.create_strategy("multi_worker")
    arrays = {
        "replicas": np.array(strategy.num_replicas_in_sync),
        "is_chief": np.array(distribute.is_chief(strategy)),
    }
    arrays.update(trainer_evals(strategy, args.tmp, stage_names=("stage0",), sizes=MW_SIZES))
    model = build_classifier()
    arrays.update(attack_evals(strategy, model, sizes=MW_SIZES, shard_dir=args.shard_dir))
    reference = attack_evals(None, model, sizes=MW_SIZES)  # the default strategy: one device
    arrays.update({f"reference|{k}": v for k, v in reference.items()})
    # BIM again over the same own folders (only the chief's holds shards), then twice over
    # a folder of all workers.
    bim, size = RecordedBim(strategy, model), MW_SIZES[0]
    own = os.path.join(args.shard_dir, f"bim{size}")
    runs = (("own", own), ("shared", args.shared_dir), ("shared_again", args.shared_dir))
    for name, shard_dir in runs:
        results = bim(size, shard_dir, f"bim size={size}")
        arrays.update({f"{name}|{k}": v for k, v in results.items()})
    np.savez(args.out, **arrays)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    loc = commands.add_parser("local", help="every eval path on 1 device or N CPU devices")
    loc.add_argument("--replicas", type=int, required=True)
    loc.add_argument("--tmp", required=True)
    loc.add_argument("--out", required=True)
    res = commands.add_parser("resume", help="BIM in shards, recording what was computed")
    res.add_argument("--replicas", type=int, required=True)
    res.add_argument("--shard_dir", required=True)
    res.add_argument("--out", required=True)
    res.add_argument("--slow", type=float, default=0.0)
    multi = commands.add_parser("multi_worker", help="one worker of TF_CONFIG's cluster")
    multi.add_argument("--tmp", required=True)
    multi.add_argument("--shard_dir", required=True, help="this worker's own shard folder")
    multi.add_argument("--shared_dir", required=True, help="a shard folder of all workers")
    multi.add_argument("--out", required=True)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    {"local": local, "resume": resume, "multi_worker": multi_worker}[args.command](args)


if __name__ == "__main__":
    main()
