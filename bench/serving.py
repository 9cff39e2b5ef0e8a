r"""Benchmark: the exported defended SavedModel vs the autoencoder and classifier SavedModels.

    python bench/serving.py
    python bench/serving.py --ae=vgg3 --image_size=64 --json_out=/tmp/serving.json

Builds untrained models (SegNet autoencoder + classifier, 32 px by default),
saves them to `.keras` in a temporary directory and exports:

* defended: `export_lib.export` (the composite with its input checks),
  called through its `serving_default` signature;
* two-step: the autoencoder in [0, 1] units (`s2s_model.build_purifier`) and
  the classifier, each exported with `model.export` (Keras' plain serving
  signature, no input checks), called one after the other; the purified images
  stay a tensor between the calls, so no serialisation is counted.

Both are loaded back with `tf.saved_model.load` and timed in-process on one
fixed batch at batch sizes 1 and 32 (interleaved calls after warm-up, median),
which is what a model server does for each request once it has parsed it.
Prints latency, throughput and the ratio defended / two-step latency
(goal <= 1.1) per batch size.
"""

import os
import statistics
import tempfile
import time

import bench_util
import keras
import numpy as np
import tensorflow as tf
from absl import app
from absl import flags

from s2s_tf.export import export_lib
from s2s_tf.export import signatures
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import classifiers
from s2s_tf.models import s2s_model

RATIO_GOAL = 1.1
FLAGS = flags.FLAGS

flags.DEFINE_integer("image_size", 32, "Square image size.")
flags.DEFINE_enum("ae", "medium", list(bench_util.AE_PRESETS), "Autoencoder stage widths.")
flags.DEFINE_string("classifier", "small_cnn", "Classifier registry name.")
flags.DEFINE_integer("num_classes", 10, "Classifier outputs.")
flags.DEFINE_list("batch_sizes", ["1", "32"], "Batch sizes to time.")
flags.DEFINE_integer("warmup_calls", 5, "Untimed calls of each model per batch size.")
flags.DEFINE_integer("timed_calls", 50, "Timed calls of each model per batch size (median).")
flags.DEFINE_string("json_out", None, "Also write the numbers to this JSON file.")


def export_models(directory):
    """Exports the defended model and the two-step baseline; returns the three paths."""
    shape = (FLAGS.image_size, FLAGS.image_size, 3)
    config = ae_lib.AutoencoderConfig(stage_widths=bench_util.AE_PRESETS[FLAGS.ae])
    autoencoder = ae_lib.build_autoencoder(config, input_shape=shape)
    classifier = classifiers.build_classifier_with_preprocessing(
        FLAGS.classifier, shape, FLAGS.num_classes
    )
    ae_path = os.path.join(directory, "autoencoder.keras")
    classifier_path = os.path.join(directory, "classifier.keras")
    autoencoder.save(ae_path)
    classifier.save(classifier_path)
    defended = export_lib.export(
        export_lib.ExportConfig(
            export_base=os.path.join(directory, "export"),
            autoencoder_path=ae_path,
            classifier_path=classifier_path,
        )
    )
    # The composite's autoencoder stage in [0, 1] units, clipped, as the composite runs it.
    purifier = s2s_model.build_purifier(autoencoder, shape)
    purifier_dir = os.path.join(directory, "purifier")
    classifier_dir = os.path.join(directory, "classifier")
    purifier.export(purifier_dir, verbose=False)
    classifier.export(classifier_dir, verbose=False)
    return defended, purifier_dir, classifier_dir


def measure(defended, purifier, classifier, images):
    """Seconds per call of the defended signature and of the two-step baseline."""
    x = tf.constant(images)
    serve = defended.signatures[signatures.DEFAULT_SIGNATURE]
    calls = {
        "defended": lambda: serve(images=x)["logits"].numpy(),
        "two_step": lambda: classifier.serve(purifier.serve(x)).numpy(),
    }
    np.testing.assert_allclose(calls["defended"](), calls["two_step"](), rtol=1e-4, atol=1e-4)
    times = {name: [] for name in calls}
    for repeat in range(FLAGS.warmup_calls + FLAGS.timed_calls):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if repeat >= FLAGS.warmup_calls:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def report(results):
    m, c = results["machine"], results["config"]
    lines = [
        "",
        "Exported defended SavedModel vs autoencoder + classifier SavedModels",
        f"  machine   {m['cpus_usable']} usable CPUs, {m['cpu_model']}; device {m['device']}",
        f"            TensorFlow {m['tensorflow']}, Keras {m['keras']}",
        f"  config    {c['image_size']} px, ae {c['ae']} {bench_util.AE_PRESETS[c['ae']]}, "
        f"{c['classifier']}; {c['timed_calls']} timed calls each, median",
        "",
        f"  {'batch':>5}  {'model':<10}{'ms/call':>10}{'images/s':>12}",
    ]
    for batch, row in results["batches"].items():
        for name in ("defended", "two_step"):
            seconds = row["seconds"][name]
            lines.append(
                f"  {batch:>5}  {name:<10}{1000 * seconds:>10.3f}{int(batch) / seconds:>12.1f}"
            )
        verdict = "PASS" if row["ratio"] <= RATIO_GOAL else "FAIL"
        lines.append(
            f"  {batch:>5}  defended / two-step latency {row['ratio']:.3f}  "
            f"goal <= {RATIO_GOAL}  {verdict}"
        )
    bench_util.print_report(lines, m)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    batch_sizes = [int(b) for b in FLAGS.batch_sizes]
    if min(batch_sizes + [FLAGS.warmup_calls, FLAGS.timed_calls]) < 1:
        raise app.UsageError("batch sizes, --warmup_calls and --timed_calls must be >= 1")
    keras.utils.set_random_seed(0)
    machine = bench_util.machine_info()
    with tempfile.TemporaryDirectory() as directory:
        paths = export_models(directory)
        defended, purifier, classifier = (tf.saved_model.load(p) for p in paths)
        rng = np.random.default_rng(0)
        batches = {}
        for batch in batch_sizes:
            size = FLAGS.image_size
            images = rng.random((batch, size, size, 3), dtype=np.float32)
            seconds = measure(defended, purifier, classifier, images)
            batches[str(batch)] = {
                "seconds": seconds,
                "ratio": seconds["defended"] / seconds["two_step"],
            }
    results = {
        "machine": machine,
        "batches": batches,
        "goal": {"defended_over_two_step": RATIO_GOAL},
        "pass": all(row["ratio"] <= RATIO_GOAL for row in batches.values()),
        "config": {
            "image_size": FLAGS.image_size,
            "ae": FLAGS.ae,
            "classifier": FLAGS.classifier,
            "num_classes": FLAGS.num_classes,
            "timed_calls": FLAGS.timed_calls,
        },
    }
    report(results)
    bench_util.write_json(results, FLAGS.json_out)


if __name__ == "__main__":
    app.run(main)
