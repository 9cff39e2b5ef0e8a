r"""Benchmarks of the compiled attacks: PGD-k and Square against the model's own passes.

    python bench/attacks.py                     # both
    python bench/attacks.py --benches=pgd --ae=tiny --batch_size=64 --steps=20
    python bench/attacks.py --benches=square --square_queries=1000 --json_out=/tmp/sq.json

PGD (--benches=pgd). On one machine it builds the defended composite
(`s2s_model.build_s2s_model`: an untrained SegNet autoencoder + small_cnn, 32 px by
default) and measures, in images x steps per second on one fixed batch:

* ours: `runner.run_attack("pgd", ...)` with k steps (compiled once, cached;
  includes the numpy conversions and the final budget check);
* floor: one forward+backward of the cross-entropy with respect to the input
  in a plain `tf.function` (the cost of one PGD step with nothing else);
* stock: CleverHans' `projected_gradient_descent` called eagerly with the same
  model, batch, eps, step and k (its per-step gradient is a `tf.function`).

Goals: ours / floor >= 0.8 (the attack loop adds little to the model's cost)
and ours / stock >= 2.

Square (--benches=square). For each of --square_models (default: LeNet-5 at 28 px, and
small_cnn behind the tiny autoencoder), in images x forward passes per second:

* square: `runner.run_attack("square", ...)` with --square_queries queries (k + 2 forward
  passes: the clean batch, the stripes, one per query), labels = the model's predictions;
* forward, chained: k + 2 forward passes of the batch in one `tf.while_loop`, each input
  depending on the previous logits (sequential, as Square's queries are);
* forward, call: one forward pass per `tf.function` call;
* forward, independent: as chained but the passes do not depend on each other, so they
  may overlap on several cores (shown, not the goal's floor).

Goal: square / the faster sequential forward >= 0.8, in wall time (CPU time is shown too;
it is steadier on a shared machine). The run fails if Square fooled every example, since
it then stops early and its rate would be overstated.

Cascade (--benches=cascade, `cascade_bench.py`): one evaluation with the AutoAttack-style
cascade and one with every attack on every example, on the main job's trained models; their
times and the check that both give the same per-example worst case.

Calls are timed interleaved after warm-up calls and the median is reported.
"""

import statistics
import time

import bench_util
import cascade_bench
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


def time_interleaved(calls):
    """Times each callable, interleaved after warm-up calls.

    Returns:
        (wall seconds of each timed call, wall seconds of the first call, process CPU
        seconds of each timed call), each a dict by name.
    """
    times = {name: [] for name in calls}
    cpu = {name: [] for name in calls}
    first = {}
    for name, call in calls.items():
        start = time.perf_counter()
        call()
        first[name] = time.perf_counter() - start
    for repeat in range(FLAGS.warmup_calls - 1 + FLAGS.timed_calls):
        for name, call in calls.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            call()
            if repeat >= FLAGS.warmup_calls - 1:
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return times, first, cpu


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
    times, first, _ = time_interleaved(calls)
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


def run_pgd():
    """The PGD benchmark: builds the composite, measures, prints and returns the numbers."""
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
    return results


# --- Square: queries x examples per second against forward passes of the same model ---------

SQUARE_GOAL = 0.8
flags.DEFINE_list(
    "benches", ["pgd", "square"], "Benchmarks to run, of: pgd, square, cascade (trained models)."
)
flags.DEFINE_list(
    "square_models",
    ["lenet5", "tiny_ae+small_cnn"],
    "Square's models: a classifier registry name, or <preset>_ae+<name> for it behind an "
    f"autoencoder, <preset> one of {sorted(bench_util.AE_PRESETS)} (the main job's is "
    "small_ae+small_cnn).",
)
flags.DEFINE_integer("square_image_size", 28, "Square's square image size.", lower_bound=8)
flags.DEFINE_integer("square_batch_size", 100, "Square's images per batch.", lower_bound=1)
flags.DEFINE_integer("square_queries", 300, "Square's queries (steps).", lower_bound=1)
flags.DEFINE_float(
    "square_eps",
    1.0 / 255.0,
    "Square's L-inf budget; small, so that some examples survive every query (the attack "
    "stops once all are fooled, which would shorten the timed work; this is checked).",
)


def build_square_model(name):
    """A classifier at Square's image size, or it behind an autoencoder ("<preset>_ae+")."""
    shape = (FLAGS.square_image_size, FLAGS.square_image_size, 3)
    ae, _, classifier = name.rpartition("+")
    classifier = classifiers.build_classifier_with_preprocessing(
        classifier, shape, FLAGS.num_classes
    )
    if not ae:
        return classifier
    preset = ae.removesuffix("_ae")
    if preset not in bench_util.AE_PRESETS or not ae.endswith("_ae"):
        raise app.UsageError(f"--square_models: {ae!r} is not one of the <preset>_ae names")
    config = ae_lib.AutoencoderConfig(stage_widths=bench_util.AE_PRESETS[preset])
    return s2s_model.build_s2s_model(
        ae_lib.build_autoencoder(config, input_shape=shape), classifier
    )


def square_calls(model, images, labels):
    """Square through the runner, and forward passes of the same batch, as timed callables."""
    k, x = FLAGS.square_queries, tf.constant(images)
    passes = k + 2  # Square's: the clean batch, the stripes, then one per query

    def loop(chained):
        @tf.function
        def forward_loop(x):
            def body(i, x_i, total):
                logits = tf.cast(model(x_i), tf.float32)
                # Chained: the next input depends on these logits, so the passes run one
                # after the other, as Square's queries must. Otherwise the input moves with
                # i only, and TensorFlow may overlap passes of different iterations.
                nudge = tf.reduce_mean(logits) if chained else tf.cast(i, tf.float32)
                return i + 1, x + 1e-9 * nudge, total + tf.reduce_sum(logits)

            start = (tf.constant(0), x, tf.constant(0.0))
            return tf.while_loop(lambda i, *_: i < passes, body, start)[2]

        return lambda: forward_loop(x).numpy()

    forward = tf.function(lambda x: model(x))
    eps = FLAGS.square_eps
    return {
        "square": lambda: runner.run_attack(
            "square", model, images, labels, eps, steps=k, batch_size=len(images)
        ),
        "forward_chained": loop(chained=True),
        "forward_call": lambda: forward(x).numpy(),
        "forward_overlapped": loop(chained=False),
    }


def _rates(seconds, n, k):
    work = {"forward_call": 1}
    return {key: work.get(key, k + 2) * n / statistics.median(t) for key, t in seconds.items()}


def run_square_one(name):
    """Square's throughput on one model against forward passes of it."""
    keras.utils.set_random_seed(0)
    model = build_square_model(name)
    size, n, k = FLAGS.square_image_size, FLAGS.square_batch_size, FLAGS.square_queries
    images = np.random.default_rng(0).random((n, size, size, 3), dtype=np.float32)
    # The model's own predictions: every example starts correctly classified.
    labels = runner.predict(model, images).astype(np.int32)
    times, first, cpu = time_interleaved(square_calls(model, images, labels))
    adv = runner.run_attack("square", model, images, labels, FLAGS.square_eps, steps=k)
    fooled = float(np.mean(runner.predict(model, adv) != labels))
    if fooled == 1.0:
        raise RuntimeError(
            f"square fooled every example of {name}, so it may have stopped before {k} "
            "queries and its rate would be overstated; lower --square_eps"
        )
    rates, cpu_rates = _rates(times, n, k), _rates(cpu, n, k)
    ratios = {}
    for label, r in (("wall", rates), ("cpu", cpu_rates)):
        # Square's queries are sequential: the floor is sequential forward passes.
        ratios[label] = r["square"] / max(r["forward_chained"], r["forward_call"])
    ratios["wall_vs_overlapped"] = rates["square"] / rates["forward_overlapped"]
    return {
        "parameters": model.count_params(),
        "rates": rates,
        "cpu_rates": cpu_rates,
        "seconds_per_call": times,
        "cpu_seconds_per_call": cpu,
        "first_call_seconds": first,
        "fooled": fooled,
        "square_over_forward": ratios,
        "pass": ratios["wall"] >= SQUARE_GOAL,
    }


def square_report(results):
    m, c = results["machine"], results["config"]
    lines = [
        "",
        f"Square ({c['queries']} queries, {c['queries'] + 2} forward passes) against forward "
        "passes of the same model and batch",
        f"  machine   {m['cpus_usable']} usable CPUs, {m['cpu_model']}; device {m['device']}",
        f"            TensorFlow {m['tensorflow']}, Keras {m['keras']}",
        f"  config    {c['image_size']} px, batch {c['batch_size']}, eps {c['eps']:.4f}",
        "",
        f"  {'model':<36}{'measurement':<40}{'img*fwd/s':>10}{'ms/fwd':>8}{'cpu ms':>8}",
    ]
    labels = {
        "square": "square (run_attack, compiled)",
        "forward_chained": "forward, chained, in one while_loop",
        "forward_call": "forward, one per tf.function call",
        "forward_overlapped": "forward, independent, in one while_loop",
    }
    batch = c["batch_size"]
    for name, r in results["models"].items():
        for key, label in labels.items():
            rate, cpu_ms = r["rates"][key], 1000.0 * batch / r["cpu_rates"][key]
            shown = f"{name} ({r['parameters']:,} p.)" if key == "square" else ""
            lines.append(
                f"  {shown:<36}{label:<40}{rate:>10.0f}{1000.0 * batch / rate:>8.2f}{cpu_ms:>8.2f}"
            )
        ratio = r["square_over_forward"]
        lines += [
            f"  {'':<36}square / sequential forward  {ratio['wall']:6.3f}  goal >= {SQUARE_GOAL} "
            f"{_verdict(ratio['wall'], SQUARE_GOAL)}  (fooled {r['fooled']:.0%})",
            f"  {'':<36}  in CPU time {ratio['cpu']:6.3f}; against independent passes "
            f"{ratio['wall_vs_overlapped']:6.3f}",
        ]
    lines += [
        "",
        f"  timed: {c['timed_calls']} calls each, median. Square's queries depend on each other,",
        "  so the goal is against sequential passes (the faster of chained and one per call);",
        "  independent passes can overlap on several cores.",
    ]
    bench_util.print_report(lines, m)


def run_square():
    """The Square benchmark on each of --square_models; prints and returns the numbers."""
    results = {
        "machine": bench_util.machine_info(),
        "models": {name: run_square_one(name) for name in FLAGS.square_models},
        "goal": SQUARE_GOAL,
        "config": {
            "image_size": FLAGS.square_image_size,
            "batch_size": FLAGS.square_batch_size,
            "queries": FLAGS.square_queries,
            "eps": FLAGS.square_eps,
            "timed_calls": FLAGS.timed_calls,
        },
    }
    square_report(results)
    return results


BENCHES = {"pgd": run_pgd, "square": run_square, "cascade": cascade_bench.run_cascade}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    unknown = sorted(set(FLAGS.benches) - set(BENCHES))
    if unknown:
        raise app.UsageError(f"Unknown --benches {unknown}; choose from {sorted(BENCHES)}")
    results = {name: BENCHES[name]() for name in FLAGS.benches}
    bench_util.write_json(results, FLAGS.json_out)


if __name__ == "__main__":
    app.run(main)
