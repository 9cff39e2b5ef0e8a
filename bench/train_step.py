r"""Benchmark: stage-2 training throughput of the Trainer's loop vs a bare step and the input.

    python bench/train_step.py
    python bench/train_step.py --image_size=64 --ae_stages=3 --batch_size=64 --json_out=/tmp/b.json

On one machine, with untrained models saved to a temporary directory, it builds a
stage-2 setup (`stages.DecoderStage` under `trainer.Trainer` and a strategy) and
measures, in images per second:

* loop: `Trainer._train_loop(iterator, steps_per_loop)` on a distributed iterator
  that repeats one in-memory batch (input cost ~0), metrics and strategy included;
* bare: the same computation (stage-2 per-example loss averaged over the batch,
  gradients of the decoder's trainable variables, `optimizer.apply` of the same
  optimizer type) in a plain `tf.function` called once per step on the same batch,
  no strategy, no metrics, no in-graph loop;
* pipeline: batches of `data.make_dataset_fn(config, training=True)(None)`,
  iterated eagerly.

Loop and bare calls are timed interleaved (after a compile warm-up) and the median
is reported. Goals: loop / bare >= 0.9 (the loop adds little to the step) and
pipeline / loop >= 5 (the input keeps up with room to spare). The pipeline is
measured alone; during training it shares the CPU with the step.
"""

import os
import statistics
import tempfile
import time

import bench_util
import numpy as np
import tensorflow as tf
from absl import app
from absl import flags

from s2s_tf import constants
from s2s_tf import data as data_lib
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import classifiers
from s2s_tf.train import checkpointing
from s2s_tf.train import distribute
from s2s_tf.train import optim
from s2s_tf.train import stages
from s2s_tf.train import trainer

LOOP_GOAL = 0.9
PIPELINE_GOAL = 5.0

FLAGS = flags.FLAGS

flags.DEFINE_string("image_size", "32", "Image size: 'S' or 'H,W'.")
flags.DEFINE_integer("ae_stages", 3, "Autoencoder stages (AutoencoderConfig.num_stages).")
flags.DEFINE_string("classifier", "small_cnn", "Classifier registry name.")
flags.DEFINE_integer("num_classes", 10, "Classifier outputs.")
flags.DEFINE_integer("batch_size", 32, "Global batch size.", lower_bound=1)
flags.DEFINE_integer(
    "steps_per_loop", 10, "Steps per timed call (loop) / per timed group (bare).", lower_bound=1
)
flags.DEFINE_integer(
    "warmup_calls", 2, "Untimed calls (groups) before timing; the first compiles.", lower_bound=1
)
flags.DEFINE_integer(
    "timed_calls", 5, "Timed calls (groups) of loop and bare; the median is used.", lower_bound=1
)
flags.DEFINE_enum("strategy", "mirrored", ["mirrored", "one_device"], "Strategy of the loop.")
flags.DEFINE_enum("optimizer", "adam", list(optim.OPTIMIZERS), "Optimizer of loop and bare step.")
flags.DEFINE_string(
    "source",
    None,
    "Input source of the pipeline measurement (default: fashion_mnist if its files "
    f"exist in {data_lib.FASHION_MNIST_DIR}, else testing).",
)
flags.DEFINE_integer("pipeline_batches", 300, "Timed pipeline batches.")
flags.DEFINE_integer("pipeline_warmup", 20, "Untimed pipeline batches first.")
flags.DEFINE_string("json_out", None, "Also write the numbers to this JSON file.")


def _image_size(text):
    size = [int(s) for s in text.split(",") if s.strip()]
    if len(size) not in (1, 2) or min(size) < 1:
        raise app.UsageError(f"--image_size must be 'S' or 'H,W', got {text!r}")
    return tuple(size * 2 if len(size) == 1 else size)


def _default_source():
    path = os.path.join(data_lib.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")
    return "fashion_mnist" if os.path.isfile(path) else "testing"


def _save_models(directory, size):
    """Saves an untrained stage-1 autoencoder and classifier; returns the stage-2 ModelConfig."""
    ae_config = ae_lib.AutoencoderConfig(num_stages=FLAGS.ae_stages)
    autoencoder = ae_lib.build_autoencoder(ae_config, input_shape=(*size, 3))
    classifier = classifiers.build_classifier_with_preprocessing(
        FLAGS.classifier, (*size, 3), FLAGS.num_classes
    )
    return stages.ModelConfig(
        classifier=FLAGS.classifier,
        num_classes=FLAGS.num_classes,
        classifier_path=checkpointing.save_keras_atomic(
            classifier, os.path.join(directory, constants.CLASSIFIER_FILE)
        ),
        image_size=size,
        autoencoder=ae_config,
        autoencoder_path=checkpointing.save_keras_atomic(
            autoencoder, os.path.join(directory, constants.AUTOENCODER_FILE)
        ),
    )


def _make_bare_step(stage, optimizer, batch_size):
    """One stage-2 step as a plain tf.function: loss, decoder gradients, apply."""
    variables = stage.trainable_variables

    @tf.function
    def step(images, labels):
        with tf.GradientTape() as tape:
            per_example = stage.train_outputs(images, labels)["loss"]
            loss = tf.reduce_sum(per_example) / batch_size
        grads = tape.gradient(loss, variables)
        optimizer.apply(grads, variables)
        return loss

    return step


def _median_rate(seconds, images):
    return images / statistics.median(seconds)


def measure_train(model_config, data_config, workdir):
    """Times the Trainer's loop and the bare step, interleaved; returns their numbers."""
    batch, steps = data_config.global_batch_size, FLAGS.steps_per_loop
    rng = np.random.default_rng(0)
    images = rng.random((batch, *data_config.image_size, 3), dtype=np.float32)
    labels = rng.integers(0, FLAGS.num_classes, size=(batch,), dtype=np.int32)
    loop_config = trainer.LoopConfig(train_steps=10**9, steps_per_loop=steps)
    optimizer_config = optim.OptimizerConfig(name=FLAGS.optimizer)

    strategy = distribute.create_strategy(FLAGS.strategy)
    run = trainer.Trainer(
        stages.DecoderStage(model_config),
        strategy,
        loop_config,
        optimizer_config,
        workdir,
        data_config,
    )

    def one_batch(context):
        per_replica = context.get_per_replica_batch_size(batch)
        start = context.input_pipeline_id * per_replica
        return tf.data.Dataset.from_tensors(
            (images[start : start + per_replica], labels[start : start + per_replica])
        ).repeat()

    iterator = iter(strategy.distribute_datasets_from_function(one_batch))
    num_steps = tf.constant(steps, tf.int32)

    def loop_call():
        run._train_loop(iterator, num_steps)
        return run._train_sums["examples"].numpy()  # waits for the call to finish

    bare_stage = stages.DecoderStage(model_config)
    bare_stage.build()
    bare_optimizer = optim.build_optimizer(optimizer_config, loop_config.train_steps)
    bare_optimizer.build(bare_stage.trainable_variables)
    bare_step = _make_bare_step(bare_stage, bare_optimizer, batch)
    images_t, labels_t = tf.constant(images), tf.constant(labels)

    def bare_call():
        loss = None
        for _ in range(steps):
            loss = bare_step(images_t, labels_t)
        return loss.numpy()

    def timed(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    loop_compile = timed(loop_call)
    bare_compile = timed(bare_call)
    for _ in range(FLAGS.warmup_calls - 1):
        loop_call()
        bare_call()
    loop_times, bare_times = [], []
    for _ in range(FLAGS.timed_calls):
        loop_times.append(timed(loop_call))
        bare_times.append(timed(bare_call))
    return {
        "replicas": strategy.num_replicas_in_sync,
        "trainable_variables": len(bare_stage.trainable_variables),
        "loop_images_per_sec": _median_rate(loop_times, steps * batch),
        "bare_images_per_sec": _median_rate(bare_times, steps * batch),
        "loop_best_images_per_sec": steps * batch / min(loop_times),
        "bare_best_images_per_sec": steps * batch / min(bare_times),
        "loop_seconds_per_call": loop_times,
        "bare_seconds_per_group": bare_times,
        "loop_first_call_seconds": loop_compile,
        "bare_first_group_seconds": bare_compile,
    }


def measure_pipeline(data_config):
    """Images/s of the training input pipeline, iterated eagerly after a warm-up."""
    dataset = data_lib.make_dataset_fn(data_config, training=True)(None)
    iterator = iter(dataset)
    for _ in range(FLAGS.pipeline_warmup):
        next(iterator)
    count = 0
    start = time.perf_counter()
    for _ in range(FLAGS.pipeline_batches):
        images, _ = next(iterator)
        count += int(images.shape[0])
    seconds = time.perf_counter() - start
    return {"pipeline_images_per_sec": count / seconds, "pipeline_seconds": seconds}


def _verdict(value, goal):
    return "PASS" if value >= goal else "FAIL"


def report(results):
    m, c = results["machine"], results["config"]
    lines = [
        "",
        "Stage-2 training throughput",
        f"  machine   {m['cpu_count']} CPUs ({m['cpus_usable']} usable), {m['cpu_model']}",
        f"  device    {m['device']}; TensorFlow {m['tensorflow']}, Keras {m['keras']}",
        f"  config    image {c['image_size'][0]}x{c['image_size'][1]}, "
        f"ae_stages {c['ae_stages']}, classifier {c['classifier']}, batch {c['batch_size']}, "
        f"steps_per_loop {c['steps_per_loop']}, strategy {c['strategy']} "
        f"({results['replicas']} replica(s)), optimizer {c['optimizer']}, "
        f"source {c['source']}",
        "",
        f"  {'measurement':<44}{'images/s':>12}{'ms/step':>10}",
    ]
    batch = c["batch_size"]
    for label, key in (
        ("loop  (Trainer._train_loop, 1 repeated batch)", "loop_images_per_sec"),
        ("bare  (plain tf.function step per call)", "bare_images_per_sec"),
        ("pipeline (make_dataset_fn, training=True)", "pipeline_images_per_sec"),
    ):
        rate = results[key]
        lines.append(f"  {label:<44}{rate:>12.1f}{1000.0 * batch / rate:>10.2f}")
    loop_ratio, pipe_ratio = results["loop_over_bare"], results["pipeline_over_loop"]
    lines += [
        "",
        f"  loop / bare      {loop_ratio:6.3f}  goal >= {LOOP_GOAL:<4}  "
        f"{_verdict(loop_ratio, LOOP_GOAL)}",
        f"  pipeline / loop  {pipe_ratio:6.2f}  goal >= {PIPELINE_GOAL:<4}  "
        f"{_verdict(pipe_ratio, PIPELINE_GOAL)}",
        "",
        f"  loop / bare from the fastest calls: "
        f"{results['loop_best_images_per_sec'] / results['bare_best_images_per_sec']:.3f}",
        f"  first call (compile): loop {results['loop_first_call_seconds']:.1f} s, "
        f"bare {results['bare_first_group_seconds']:.1f} s; timed calls: "
        f"{c['timed_calls']} x {c['steps_per_loop']} steps, median",
    ]
    bench_util.print_report(lines, m, " (rerun on an idle machine or raise --timed_calls)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    size = _image_size(FLAGS.image_size)
    source = FLAGS.source or _default_source()
    data_config = data_lib.DataConfig(
        source=source, image_size=size, global_batch_size=FLAGS.batch_size
    )
    results = {"machine": bench_util.machine_info()}
    with tempfile.TemporaryDirectory(prefix="s2s_bench_") as tmp:
        model_config = _save_models(os.path.join(tmp, "models"), size)
        results.update(measure_train(model_config, data_config, os.path.join(tmp, "work")))
    results.update(measure_pipeline(data_config))
    results["loop_over_bare"] = results["loop_images_per_sec"] / results["bare_images_per_sec"]
    results["pipeline_over_loop"] = (
        results["pipeline_images_per_sec"] / results["loop_images_per_sec"]
    )
    results["config"] = {
        "image_size": list(size),
        "ae_stages": FLAGS.ae_stages,
        "classifier": FLAGS.classifier,
        "batch_size": FLAGS.batch_size,
        "steps_per_loop": FLAGS.steps_per_loop,
        "warmup_calls": FLAGS.warmup_calls,
        "timed_calls": FLAGS.timed_calls,
        "strategy": FLAGS.strategy,
        "optimizer": FLAGS.optimizer,
        "source": source,
        "pipeline_batches": FLAGS.pipeline_batches,
    }
    results["goals"] = {"loop_over_bare": LOOP_GOAL, "pipeline_over_loop": PIPELINE_GOAL}
    results["pass"] = {
        "loop_over_bare": results["loop_over_bare"] >= LOOP_GOAL,
        "pipeline_over_loop": results["pipeline_over_loop"] >= PIPELINE_GOAL,
    }
    report(results)
    bench_util.write_json(results, FLAGS.json_out)


if __name__ == "__main__":
    app.run(main)
