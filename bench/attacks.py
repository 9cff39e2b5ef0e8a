r"""Benchmark: compiled PGD-k throughput vs one forward+backward and vs stock CleverHans PGD.

    python bench/attacks.py
    python bench/attacks.py --ae=tiny --batch_size=64 --steps=20 --json_out=/tmp/pgd.json

On one machine it builds the defended composite (`s2s_model.build_s2s_model`:
an untrained SegNet autoencoder + small_cnn, 32 px by default) and measures, in
images x steps per second on one fixed batch:

* ours: `runner.run_attack("pgd", ...)` with k steps (compiled once, cached;
  includes the numpy conversions and the final budget check);
* floor: one forward+backward of the cross-entropy with respect to the input
  in a plain `tf.function` (the cost of one PGD step with nothing else);
* stock: CleverHans' `projected_gradient_descent` called eagerly with the same
  model, batch, eps, step and k (its per-step gradient is a `tf.function`).

Calls are timed interleaved after warm-up calls and the median is reported.
Goals: ours / floor >= 0.8 (the attack loop adds little to the model's cost)
and ours / stock >= 2.
"""

import statistics
import time

import bench_util
import keras
import numpy as np
import tensorflow as tf
from absl import app
from absl import flags
from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent

from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import classifiers
from s2s_tf.models import s2s_model
from s2s_tf.robustness import runner

FLOOR_GOAL = 0.8
STOCK_GOAL = 2.0
FLAGS = flags.FLAGS

flags.DEFINE_integer("image_size", 32, "Square image size.")
flags.DEFINE_enum("ae", "medium", list(bench_util.AE_PRESETS), "Autoencoder stage widths.")
flags.DEFINE_string("classifier", "small_cnn", "Classifier registry name.")
flags.DEFINE_integer("num_classes", 10, "Classifier outputs.")
flags.DEFINE_integer("batch_size", 32, "Images per batch.", lower_bound=1)
flags.DEFINE_integer("steps", 10, "PGD steps k.", lower_bound=1)
flags.DEFINE_float("eps", 8.0 / 255.0, "L-inf budget in [0, 1] pixel units.")
flags.DEFINE_integer(
    "warmup_calls", 2, "Untimed calls of each measurement; the first compiles.", lower_bound=1
)
flags.DEFINE_integer(
    "timed_calls", 7, "Timed calls of each measurement; the median is used.", lower_bound=1
)
flags.DEFINE_string("json_out", None, "Also write the numbers to this JSON file.")


def build_model():
    """The defended composite: [0, 1] image -> autoencoder -> classifier -> logits."""
    shape = (FLAGS.image_size, FLAGS.image_size, 3)
    config = ae_lib.AutoencoderConfig(stage_widths=bench_util.AE_PRESETS[FLAGS.ae])
    autoencoder = ae_lib.build_autoencoder(config, input_shape=shape)
    classifier = classifiers.build_classifier_with_preprocessing(
        FLAGS.classifier, shape, FLAGS.num_classes
    )
    return s2s_model.build_s2s_model(autoencoder, classifier)


def measure(model, images, labels):
    """Times ours, the floor and stock, interleaved; returns seconds per call of each."""
    k, eps = FLAGS.steps, FLAGS.eps
    step_size = 2.5 * eps / k
    x, y = tf.constant(images), tf.constant(labels)

    @tf.function
    def forward_backward(x, y):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=model(x))
        return tape.gradient(loss, x)

    calls = {
        "ours": lambda: runner.run_attack("pgd", model, images, labels, eps, steps=k),
        "floor": lambda: forward_backward(x, y).numpy(),
        "stock": lambda: projected_gradient_descent(
            model,
            x,
            eps,
            step_size,
            k,
            np.inf,
            clip_min=0.0,
            clip_max=1.0,
            y=y,
            rand_init=True,
            sanity_checks=False,
        ).numpy(),
    }
    times = {name: [] for name in calls}
    first = {}
    for name, call in calls.items():
        start = time.perf_counter()
        call()
        first[name] = time.perf_counter() - start
    for repeat in range(FLAGS.warmup_calls - 1 + FLAGS.timed_calls):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if repeat >= FLAGS.warmup_calls - 1:
                times[name].append(time.perf_counter() - start)
    return times, first


def _verdict(value, goal):
    return "PASS" if value >= goal else "FAIL"


def report(results):
    m, c = results["machine"], results["config"]
    rates = results["rates"]
    lines = [
        "",
        f"PGD-{c['steps']} throughput on the defended composite",
        f"  machine   {m['cpus_usable']} usable CPUs, {m['cpu_model']}; device {m['device']}",
        f"            TensorFlow {m['tensorflow']}, Keras {m['keras']}",
        f"  config    {c['image_size']} px, ae {c['ae']} {bench_util.AE_PRESETS[c['ae']]}, "
        f"{c['classifier']}, batch {c['batch_size']}, eps {c['eps']:.4f}, "
        f"{results['parameters']:,} parameters",
        "",
        f"  {'measurement':<52}{'img*steps/s':>12}{'ms/step':>10}",
    ]
    batch = c["batch_size"]
    for label, key in (
        ("ours  (run_attack('pgd'), compiled, cached)", "ours"),
        ("floor (one fwd+bwd wrt input, tf.function)", "floor"),
        ("stock (cleverhans projected_gradient_descent, eager)", "stock"),
    ):
        lines.append(f"  {label:<52}{rates[key]:>12.1f}{1000.0 * batch / rates[key]:>10.2f}")
    floor_ratio, stock_ratio = results["ours_over_floor"], results["ours_over_stock"]
    lines += [
        "",
        f"  ours / floor  {floor_ratio:6.3f}  goal >= {FLOOR_GOAL:<4} "
        f"{_verdict(floor_ratio, FLOOR_GOAL)}",
        f"  ours / stock  {stock_ratio:6.3f}  goal >= {STOCK_GOAL:<4} "
        f"{_verdict(stock_ratio, STOCK_GOAL)}",
        "",
        "  first call (s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in results["first_call_seconds"].items())
        + f"; timed: {c['timed_calls']} calls each, median",
    ]
    bench_util.print_report(lines, m)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    keras.utils.set_random_seed(0)
    model = build_model()
    rng = np.random.default_rng(0)
    size = FLAGS.image_size
    images = rng.random((FLAGS.batch_size, size, size, 3), dtype=np.float32)
    labels = rng.integers(0, FLAGS.num_classes, FLAGS.batch_size).astype(np.int32)
    times, first = measure(model, images, labels)
    work = {"ours": FLAGS.steps, "floor": 1, "stock": FLAGS.steps}
    rates = {k: work[k] * FLAGS.batch_size / statistics.median(v) for k, v in times.items()}
    results = {
        "machine": bench_util.machine_info(),
        "parameters": model.count_params(),
        "rates": rates,
        "seconds_per_call": times,
        "first_call_seconds": first,
        "ours_over_floor": rates["ours"] / rates["floor"],
        "ours_over_stock": rates["ours"] / rates["stock"],
        "goals": {"ours_over_floor": FLOOR_GOAL, "ours_over_stock": STOCK_GOAL},
        "config": {
            "image_size": size,
            "ae": FLAGS.ae,
            "classifier": FLAGS.classifier,
            "batch_size": FLAGS.batch_size,
            "steps": FLAGS.steps,
            "eps": FLAGS.eps,
            "timed_calls": FLAGS.timed_calls,
        },
    }
    results["pass"] = {
        "ours_over_floor": results["ours_over_floor"] >= FLOOR_GOAL,
        "ours_over_stock": results["ours_over_stock"] >= STOCK_GOAL,
    }
    report(results)
    bench_util.write_json(results, FLAGS.json_out)


if __name__ == "__main__":
    app.run(main)
