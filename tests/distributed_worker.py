"""Runs short training jobs under one distribution strategy and dumps what they did.

`distributed_test.py` runs this script in subprocesses: TensorFlow splits the
CPU into logical devices only before it initialises, and two multi-replica
strategies in one process can collide in their collective ops, so each process
holds exactly one strategy.

Local mode (`local --replicas 1` uses `OneDeviceStrategy`, `--replicas N` splits the
CPU into N devices under `MirroredStrategy`) trains each named scenario of
`SCENARIOS` with its own `trainer.Trainer`, starting from the models in
`--init_dir` (see `prepare`), and writes to `--out` (an `.npz`) for each
scenario: the initial and final weights, the per-step training losses, and the
largest difference between the replicas' copies of a variable. The
`bad_batch` scenario instead records the error that a global batch which does
not split over the replicas raises.

Multi-worker mode (`multi_worker`, with `TF_CONFIG` set) trains stage 1 with
`train_lib.train` under `MultiWorkerMirroredStrategy` and dumps this worker's
final autoencoder weights (and the chief's saved model's).

    python distributed_worker.py prepare --init_dir D
    python distributed_worker.py local --replicas 2 --init_dir D --workdir W --out F stage1 ...
    TF_CONFIG=... python distributed_worker.py multi_worker --workdir W --out F
"""

import argparse
import dataclasses
import glob
import json
import os
import sys
from unittest import mock

import keras
import numpy as np
import tensorflow as tf

from s2s_tf import data as data_lib
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import classifiers
from s2s_tf.models import s2s_model
from s2s_tf.train import checkpointing
from s2s_tf.train import distribute
from s2s_tf.train import optim
from s2s_tf.train import stages
from s2s_tf.train import train_lib
from s2s_tf.train import trainer

IMAGE_SIZE = (16, 16)
GLOBAL_BATCH = 8
TRAIN_STEPS = 3
INIT_AUTOENCODER = "init_autoencoder.keras"
INIT_CLASSIFIER = "init_classifier.keras"
TINY_AE = ae_lib.AutoencoderConfig(stage_widths=((4,), (8,)), sync_batchnorm=True)

# Scenario -> (stage, optimizer). SGD keeps the update linear in the gradient, so 1 and N
# replicas agree to float rounding. Adam runs on stage 0 only: a conv bias in front of
# BatchNorm has a gradient that is zero up to rounding, and Adam's normalisation turns that
# rounding noise into steps of up to lr, which then differ between runs. `stage1_clip`
# clips hard (the gradient norm is far above 0.01), so each step moves the trainable
# weights by exactly lr * clip_global_norm.
SCENARIOS = {
    "stage1": ("stage1", optim.OptimizerConfig(name="sgd", learning_rate=0.5, momentum=0.9)),
    "stage1_clip": (
        "stage1",
        optim.OptimizerConfig(name="sgd", learning_rate=2.0, momentum=0.0, clip_global_norm=0.01),
    ),
    "stage0": ("stage0", optim.OptimizerConfig(name="sgd", learning_rate=0.5, momentum=0.9)),
    "stage0_adam": ("stage0", optim.OptimizerConfig(name="adam", learning_rate=1e-2)),
    "stage2": ("stage2", optim.OptimizerConfig(name="sgd", learning_rate=0.5, momentum=0.9)),
}
BAD_BATCH = "bad_batch"


def train_data(global_batch_size=GLOBAL_BATCH):
    """The synthetic training split, shuffled and augmented.

    A host has one input pipeline whatever its number of replicas, and the replicas take
    consecutive per-replica batches of it, so 1 and 2 local replicas see the same global
    batches.
    """
    return data_lib.DataConfig(
        source="testing",
        image_size=IMAGE_SIZE,
        global_batch_size=global_batch_size,
        shuffle_buffer=64,
        seed=7,
        augment=True,
    )


def train_config(stage, optimizer, init_dir, loop=None, global_batch_size=GLOBAL_BATCH):
    """A `TrainConfig` of the tiny models; stage 0 and 2 load their models from `init_dir`."""
    model = stages.ModelConfig(
        classifier="testing", num_classes=10, image_size=IMAGE_SIZE, autoencoder=TINY_AE
    )
    if stage in ("stage0", "stage2"):
        model = dataclasses.replace(model, classifier_path=os.path.join(init_dir, INIT_CLASSIFIER))
    if stage == "stage2":
        model = dataclasses.replace(
            model, autoencoder_path=os.path.join(init_dir, INIT_AUTOENCODER)
        )
    loop = loop or trainer.LoopConfig(
        train_steps=TRAIN_STEPS,
        steps_per_loop=1,
        checkpoint_every=1000,
        eval_every=1000,
        summary_every=1000,
    )
    return train_lib.TrainConfig(
        stage=stage,
        model=model,
        train_data=train_data(global_batch_size),
        loop=loop,
        optimizer=optimizer,
        reconstruction_weight=0.5,
    )


def prepare(init_dir, seed=1):
    """Writes the initial autoencoder and classifier that every run starts from."""
    keras.utils.set_random_seed(seed)
    os.makedirs(init_dir, exist_ok=True)
    autoencoder = ae_lib.build_autoencoder(TINY_AE, input_shape=(*IMAGE_SIZE, 3))
    classifier = classifiers.build_classifier_with_preprocessing(
        "testing", (*IMAGE_SIZE, 3), num_classes=10
    )
    checkpointing.save_keras_atomic(autoencoder, os.path.join(init_dir, INIT_AUTOENCODER))
    checkpointing.save_keras_atomic(classifier, os.path.join(init_dir, INIT_CLASSIFIER))


def stage_model(stage):
    """The model whose weights a stage changes (all of them, moving statistics included)."""
    return stage.classifier if isinstance(stage, stages.ClassifierStage) else stage.autoencoder


def replica_spread(model):
    """Largest difference between the per-replica copies of a variable of `model`.

    Returns:
      `(spread, count)`: the difference, and how many variables have several copies.
    """
    spread, count = 0.0, 0
    for variable in model.weights:
        components = getattr(variable.value, "values", ())
        if len(components) < 2:
            continue
        count += 1
        first = np.asarray(components[0])
        for other in components[1:]:
            spread = max(spread, float(np.max(np.abs(np.asarray(other) - first))))
    return spread, count


def read_scalars(logdir, tag):
    """The values of scalar summary `tag` in the event files of `logdir`, by step."""
    values = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(tf.make_ndarray(value.tensor))
    return [values[step] for step in sorted(values)]


def run_scenario(name, strategy, init_dir, workdir):
    """Trains one scenario from the initial models; returns its arrays for the `.npz`."""
    stage_name, optimizer = SCENARIOS[name]
    config = train_config(stage_name, optimizer, init_dir)
    config.validate()
    workdir = os.path.join(workdir, name)
    stage = train_lib.make_stage(config)
    run = trainer.Trainer(
        stage, strategy, config.loop, config.optimizer, workdir, config.train_data
    )
    model = stage_model(stage)
    if stage_name == "stage1":  # stage 1 always builds its autoencoder: load the initial one
        initial = keras.saving.load_model(os.path.join(init_dir, INIT_AUTOENCODER), compile=False)
        model.set_weights(initial.get_weights())
    init = [np.array(w) for w in model.get_weights()]
    result = run.train()
    if result["step"] != TRAIN_STEPS:
        raise RuntimeError(f"{name}: trained to step {result['step']}, not {TRAIN_STEPS}")
    spread, copied = replica_spread(model)
    arrays = {
        f"{name}|names": np.array([w.path for w in model.weights]),
        f"{name}|trainable": np.array([w.trainable for w in model.weights]),
        f"{name}|loss": np.array(read_scalars(os.path.join(workdir, "train", stage.name), "loss")),
        f"{name}|spread": np.array(spread),
        f"{name}|copied": np.array(copied),
        f"{name}|learning_rate": np.array(optimizer.learning_rate),
        f"{name}|clip_global_norm": np.array(optimizer.clip_global_norm or 0.0),
    }
    for i, (before, after) in enumerate(zip(init, model.get_weights(), strict=True)):
        arrays[f"{name}|init|{i}"] = before
        arrays[f"{name}|final|{i}"] = np.array(after)
    return arrays


def bad_batch_error(strategy, init_dir, workdir):
    """Trains with a global batch of replicas + 1; returns the error it raises, as text."""
    replicas = strategy.num_replicas_in_sync
    config = train_config(
        "stage1", SCENARIOS["stage1"][1], init_dir, global_batch_size=replicas + 1
    )
    try:
        train_lib.train(config, os.path.join(workdir, BAD_BATCH), strategy)
    except Exception as e:  # any type: the test checks that it is a ValueError
        return f"{type(e).__name__}: {e}"
    return "no error"


def local(args):
    """Runs the scenarios on 1 device or N logical CPU devices; writes `args.out`."""
    if args.replicas > 1:
        distribute.split_cpu(args.replicas)
        strategy = distribute.create_strategy("mirrored")
    else:
        strategy = distribute.create_strategy("one_device")
    if strategy.num_replicas_in_sync != args.replicas:
        raise RuntimeError(f"wanted {args.replicas} replicas, got {strategy.num_replicas_in_sync}")
    arrays = {"replicas": np.array(strategy.num_replicas_in_sync)}
    for name in args.scenarios:
        if name == BAD_BATCH:
            arrays[f"{BAD_BATCH}|error"] = np.array(
                bad_batch_error(strategy, args.init_dir, args.workdir)
            )
        else:
            arrays.update(run_scenario(name, strategy, args.init_dir, args.workdir))
    np.savez(args.out, **arrays)


def multi_worker(args):
    """Trains stage 1 with `train_lib.train` as one worker of TF_CONFIG's cluster."""
    strategy = distribute.create_strategy("multi_worker")
    loop = trainer.LoopConfig(
        train_steps=4, steps_per_loop=2, checkpoint_every=2, eval_every=1000, summary_every=1000
    )
    # No initial models: each worker initialises at random, and the strategy must make
    # them start (and so end) alike.
    config = train_config("stage1", SCENARIOS["stage1"][1], init_dir="", loop=loop)
    made, real_make_stage = [], train_lib.make_stage

    def make_stage(config):  # keeps the stage, to read this worker's weights afterwards
        made.append(real_make_stage(config))
        return made[-1]

    with mock.patch.object(train_lib, "make_stage", make_stage):
        result = train_lib.train(config, args.workdir, strategy)
    (stage,) = made
    arrays = {f"final|{i}": np.array(w) for i, w in enumerate(stage.autoencoder.get_weights())}
    for path in result["final_models"]:  # the chief's: read back what it wrote
        saved = s2s_model.load_keras(path, "final autoencoder")
        arrays.update({f"saved|{i}": w for i, w in enumerate(saved.get_weights())})
    arrays["replicas"] = np.array(strategy.num_replicas_in_sync)
    arrays["is_chief"] = np.array(distribute.is_chief(strategy))
    arrays["result"] = np.array(json.dumps(result))
    np.savez(args.out, **arrays)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="write the initial models")
    prep.add_argument("--init_dir", required=True)
    loc = commands.add_parser("local", help="train scenarios on one host")
    loc.add_argument("--replicas", type=int, required=True)
    loc.add_argument("--init_dir", required=True)
    loc.add_argument("--workdir", required=True)
    loc.add_argument("--out", required=True)
    loc.add_argument("scenarios", nargs="+", choices=(*SCENARIOS, BAD_BATCH))
    multi = commands.add_parser("multi_worker", help="train stage 1 as one worker of TF_CONFIG")
    multi.add_argument("--workdir", required=True)
    multi.add_argument("--out", required=True)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "prepare":
        prepare(args.init_dir)
    elif args.command == "local":
        local(args)
    else:
        multi_worker(args)


if __name__ == "__main__":
    main()
