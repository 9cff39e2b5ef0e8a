r"""Benchmark: PGD evaluation through `distributed.evaluate_examples` on 1 and N replicas.

    python bench/eval_scaling.py
    python bench/eval_scaling.py --replicas=1,2,4 --per_replica_batch=64 --examples=2048 \
        --ae=vgg3 --json_out=/tmp/eval_scaling.json

It builds the defended composite (`s2s_model.build_s2s_model`: an untrained
SegNet autoencoder + a registry classifier) under each strategy's scope and runs
PGD-k (`attacks.pgd.pgd`, random start) over `--examples` random
images with `distributed.ExampleEvaluator`, which is how the robustness
evaluation runs at scale: per-replica slices, `strategy.run` in one
`tf.function`, per-example results gathered back in order. It reports
examples x steps / s for each replica count and the ratio to 1 replica.

Replicas are the first N GPUs when the machine has GPUs (1 replica:
`OneDeviceStrategy`; more: `MirroredStrategy`), else N logical CPU devices
(`distribute.split_cpu`). Logical CPU devices share the same cores, so on a CPU
the ratio shows the engine's overhead, not a speed-up; scaling needs real devices.
The per-replica batch is fixed (weak scaling): N replicas evaluate N times as many
examples per step. Each count runs one untimed call (it compiles), then
`--timed_calls` calls; the median is reported.
"""

import statistics
import time

import bench_util
import keras
import numpy as np
import tensorflow as tf
from absl import app
from absl import flags

from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import classifiers
from s2s_tf.models import s2s_model
from s2s_tf.robustness import distributed
from s2s_tf.robustness.attacks import pgd
from s2s_tf.train import distribute

FLAGS = flags.FLAGS

flags.DEFINE_list("replicas", ["1", "2"], "Replica counts to measure; the first is the baseline.")
flags.DEFINE_integer("image_size", 32, "Square image size.", lower_bound=8)
flags.DEFINE_enum("ae", "tiny", list(bench_util.AE_PRESETS), "Autoencoder stage widths.")
flags.DEFINE_string("classifier", "small_cnn", "Classifier registry name.")
flags.DEFINE_integer("per_replica_batch", 16, "Examples per replica and step.", lower_bound=1)
flags.DEFINE_integer("examples", 128, "Examples evaluated per timed call.", lower_bound=1)
flags.DEFINE_integer("steps", 5, "PGD steps k.", lower_bound=1)
flags.DEFINE_float("eps", 8.0 / 255.0, "L-inf budget in [0, 1] pixel units.")
flags.DEFINE_integer("timed_calls", 3, "Timed calls per replica count (median).", lower_bound=1)
flags.DEFINE_string("json_out", None, "Also write the numbers to this JSON file.")


def make_strategy(replicas):
    """`replicas` GPUs, else logical CPU devices (split before TensorFlow initialises)."""
    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
    if replicas > len(devices):
        raise app.UsageError(f"{replicas} replicas asked, {len(devices)} devices: {devices}")
    if replicas == 1:
        return tf.distribute.OneDeviceStrategy(devices[0])
    cross_device_ops = None if gpus else tf.distribute.ReductionToOneDevice()
    return tf.distribute.MirroredStrategy(devices[:replicas], cross_device_ops=cross_device_ops)


def pgd_fn(model):
    """PGD-k from a random start; the seed comes from the index of the batch's first example."""
    seed = tf.constant([0, 0], tf.int64)

    def fn(x, y, index):
        # The library's PGD takes one seed per batch; the cost is the same as per example.
        adversarial = pgd.pgd(
            model, x, y, FLAGS.eps, steps=FLAGS.steps, seed=seed + tf.stack([index[0], 0])
        )
        predictions = tf.argmax(model(adversarial, training=False), -1, output_type=tf.int32)
        return {"adversarial_correct": tf.equal(predictions, y)}

    return fn


def measure(replicas, images, labels):
    """Seconds per call of `--examples` examples (timed calls) and of the first call."""
    strategy = make_strategy(replicas)
    shape = images.shape[1:]
    with strategy.scope():
        keras.utils.set_random_seed(0)
        autoencoder = ae_lib.build_autoencoder(
            ae_lib.AutoencoderConfig(stage_widths=bench_util.AE_PRESETS[FLAGS.ae]), shape
        )
        classifier = classifiers.build_classifier_with_preprocessing(FLAGS.classifier, shape, 10)
        model = s2s_model.build_s2s_model(autoencoder, classifier)
    evaluate = distributed.ExampleEvaluator(
        strategy, pgd_fn(model), batch_size=FLAGS.per_replica_batch * replicas
    )
    start = time.perf_counter()
    first_result = evaluate(images, labels, shard_size=len(images))
    first = time.perf_counter() - start
    times = []
    for _ in range(FLAGS.timed_calls):
        start = time.perf_counter()
        evaluate(images, labels, shard_size=len(images))
        times.append(time.perf_counter() - start)
    return times, first, float(np.mean(first_result["adversarial_correct"]))


def report(results):
    m, c = results["machine"], results["config"]
    lines = [
        "",
        f"PGD-{c['steps']} evaluation through distributed.evaluate_examples",
        f"  machine   {m['cpus_usable']} usable CPUs, {m['cpu_model']}; device {m['device']}",
        f"            TensorFlow {m['tensorflow']}, Keras {m['keras']}",
        f"  config    {c['image_size']} px, ae {c['ae']}, {c['classifier']}, "
        f"{c['per_replica_batch']} examples per replica and step, {c['examples']} examples, "
        f"replicas on {c['replica_devices']}",
        "",
        f"  {'replicas':>8}{'examples*steps/s':>18}{'vs 1 replica':>14}{'first call s':>14}",
    ]
    for row in results["rows"]:
        lines.append(
            f"  {row['replicas']:>8}{row['rate']:>18.1f}{row['ratio']:>14.2f}"
            f"{row['first_call_seconds']:>14.1f}"
        )
    if c["replica_devices"] == "logical CPU devices":
        lines += ["", "  logical CPU devices share the cores: the ratio is overhead, not speed-up"]
    bench_util.print_report(lines, m)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    counts = [int(r) for r in FLAGS.replicas]
    if not counts or min(counts) < 1:
        raise app.UsageError(f"--replicas must be positive ints, got {FLAGS.replicas}")
    if not tf.config.list_physical_devices("GPU"):
        distribute.split_cpu(max(counts))
    machine = bench_util.machine_info()
    rng = np.random.default_rng(0)
    size = FLAGS.image_size
    images = rng.random((FLAGS.examples, size, size, 3), dtype=np.float32)
    labels = rng.integers(0, 10, FLAGS.examples).astype(np.int32)
    rows = []
    for replicas in counts:
        times, first, accuracy = measure(replicas, images, labels)
        rate = FLAGS.examples * FLAGS.steps / statistics.median(times)
        rows.append(
            {
                "replicas": replicas,
                "rate": rate,
                "ratio": rate / rows[0]["rate"] if rows else 1.0,
                "seconds_per_call": times,
                "first_call_seconds": first,
                "adversarial_accuracy": accuracy,
            }
        )
    results = {
        "machine": machine,
        "rows": rows,
        "config": {
            "replica_devices": "GPUs" if "GPU" in machine["device"] else "logical CPU devices",
            **{
                name: getattr(FLAGS, name)
                for name in ("image_size", "ae", "classifier", "per_replica_batch", "examples")
            },
            "steps": FLAGS.steps,
            "eps": FLAGS.eps,
            "timed_calls": FLAGS.timed_calls,
        },
    }
    report(results)
    bench_util.write_json(results, FLAGS.json_out)


if __name__ == "__main__":
    app.run(main)
