r"""Benchmark: a split streamed in shards vs held in memory, and 1 vs N replicas.

    python bench/eval_scaling.py                       # --mode=stream: 2,000, 20,000, 60,000
    python bench/eval_scaling.py --mode=stream --split_sizes=1000,10000 --image_size=32 \
        --attack=apgd_ce --steps=10 --json_out=/tmp/eval_stream.json
    python bench/eval_scaling.py --mode=replicas --replicas=1,2,4 --per_replica_batch=64

--mode=stream writes a folder of random PNGs (the largest of --split_sizes) and
a tiny defended model, then evaluates the first N images of the folder for
each N, each in a fresh process (so its peak memory, VmHWM, is its own): the
whole suite of one threat model (`--attack` on the white-box model, its
convergence reruns and the large-eps run) through `streaming.evaluate_split`
in shards of --shard_size, and through one in-memory `evaluation.Evaluator`
over `data.load_numpy` (the path before streaming). Both run the attacks on
one replica (`ShardedAttacks`, as the binary does). It reports examples/s
and peak RSS of each, the throughput ratio streaming / in-memory (goal >= 0.95)
and how much each path's peak grows from the smallest N to the largest and
between the two largest, and, for the largest streamed N, the peak after each
quarter of its shards. Streaming holds a few shards at once (the one being
attacked, the next one prefetched, the one being decoded), so a run of fewer
than about 4 shards never fills its read-ahead: the peak rises from 2,000 to
20,000 examples by about that read-ahead, then stays flat (goal: less than one
shard's images between the two largest N, and over the second half of the
largest run's shards).

--mode=replicas runs PGD-k through `distributed.ExampleEvaluator` on 1 and N
replicas (the first N GPUs, else N logical CPU devices, which share the cores:
there the ratio is the engine's overhead, not a speed-up). The per-replica
batch is fixed (weak scaling); the median of --timed_calls calls after one
untimed call is reported.
"""

import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import bench_util
import keras
import numpy as np
import tensorflow as tf
from absl import app
from absl import flags
from tensorflow.python.eager import context

from s2s_tf import data as data_lib
from s2s_tf import testing_utils
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import classifiers
from s2s_tf.models import s2s_model
from s2s_tf.robustness import distributed
from s2s_tf.robustness import evaluation
from s2s_tf.robustness import sharded
from s2s_tf.robustness import streaming
from s2s_tf.robustness.attacks import pgd
from s2s_tf.train import distribute

FLAGS = flags.FLAGS

flags.DEFINE_enum("mode", "stream", ["stream", "replicas"], "What to measure (see above).")
flags.DEFINE_list(
    "split_sizes", ["2000", "20000", "60000"], "Stream mode: examples per evaluation."
)
flags.DEFINE_integer("shard_size", 1000, "Stream mode: examples per shard.", lower_bound=1)
flags.DEFINE_string("attack", "fgsm", "Stream mode: the attack of the suite.")
flags.DEFINE_integer("batch_size", 250, "Stream mode: attack batch size.", lower_bound=1)
flags.DEFINE_string("workdir", None, "Stream mode: folder for the images and the model.")
flags.DEFINE_string("child", None, "Internal: one stream-mode measurement, as JSON.")
flags.DEFINE_list("replicas", ["1", "2"], "Replica counts to measure; the first is the baseline.")
flags.DEFINE_integer("image_size", 32, "Square image size.", lower_bound=8)
flags.DEFINE_enum("ae", "tiny", list(bench_util.AE_PRESETS), "Autoencoder stage widths.")
flags.DEFINE_string("classifier", "small_cnn", "Classifier registry name.")
flags.DEFINE_integer("per_replica_batch", 16, "Examples per replica and step.", lower_bound=1)
flags.DEFINE_integer("examples", 128, "Replicas mode: examples per timed call.", lower_bound=1)
flags.DEFINE_integer("steps", 5, "PGD steps k (stream mode: the attack's steps).", lower_bound=1)
flags.DEFINE_float("eps", 8.0 / 255.0, "L-inf budget in [0, 1] pixel units.")
flags.DEFINE_integer("timed_calls", 3, "Timed calls per replica count (median).", lower_bound=1)
flags.DEFINE_string("json_out", None, "Also write the numbers to this JSON file.")
flags.DEFINE_integer(
    "heap_dump_every",
    0,
    "Stream mode: write a jemalloc heap profile after every this many shards (0: none); "
    "needs LD_PRELOAD of a jemalloc built with profiling and MALLOC_CONF=prof:true "
    "(see heap_dump).",
    lower_bound=0,
)


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
    if FLAGS.child:
        measure_stream(json.loads(FLAGS.child))
    elif FLAGS.mode == "stream":
        run_stream()
    else:
        run_replicas()


def run_replicas():
    """1 vs N replicas (see the module docstring)."""
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


# Stream mode.


def stream_config():
    """One threat model's suite: the reference run, two convergence reruns, the large eps."""
    return evaluation.EvalConfig(
        attacks=(FLAGS.attack,),
        gradient_free_attacks=(),
        threat_models=("white_box",),
        eps=(FLAGS.eps,),
        num_examples=None,
        batch_size=FLAGS.batch_size,
        steps=FLAGS.steps,
        target_classes=1,
        check_extra_restarts=1,
    )


def status_kb(field):
    """A memory field of /proc/self/status, in kB (VmHWM, VmRSS, ...)."""
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:"))


def peak_rss_kb():
    """This process's peak RSS since its program started (VmHWM; a fork's parent excluded)."""
    return status_kb("VmHWM")


def heap_dump():
    """Writes a jemalloc heap profile now (`prof.dump`, to MALLOC_CONF's prof_prefix).

    For finding what grows between shards: run the bench with, e.g.,
    `LD_PRELOAD=libjemalloc.so.2 MALLOC_CONF=prof:true,lg_prof_sample:14,prof_prefix:/tmp/p`
    and compare two profiles with `jeprof --base=EARLY.heap python LATE.heap`.

    Raises:
      RuntimeError: when jemalloc is not loaded or profiling is off.
    """
    mallctl = getattr(ctypes.CDLL(None), "mallctl", None)
    if mallctl is None:
        raise RuntimeError("--heap_dump_every needs jemalloc: LD_PRELOAD=libjemalloc.so.2")
    status = mallctl(b"prof.dump", None, None, None, ctypes.c_size_t(0))
    if status:
        raise RuntimeError(f"jemalloc prof.dump failed ({status}): set MALLOC_CONF=prof:true")


def measure_stream(spec):
    """One evaluation of the folder's first `spec["examples"]` images; prints a JSON line."""
    defended = s2s_model.load_keras(spec["model"], "defended model")
    purifier = s2s_model.build_purifier(
        s2s_model.get_autoencoder(defended), defended.input_shape[1:]
    )
    models = evaluation.Models(s2s_model.get_classifier(defended), defended, purifier)
    data = data_lib.DataConfig(
        source="folder",
        folder=spec["folder"],
        split="test",
        image_size=(FLAGS.image_size,) * 2,
        num_examples=spec["examples"],
    )
    strategy = make_strategy(1)
    config = stream_config()
    # The peak after each finished shard: flat once the shards stop touching new memory.
    # Resident now and Python's allocated blocks after each shard: a leak grows them with
    # the shards, a running maximum of varying working sets grows only the peak.
    # Functions in the eager context (traced graphs, their gradients): TensorFlow keeps them
    # in C++, outside Python's blocks, so one traced per shard would grow memory unseen there.
    after_shards, resident, blocks, functions = [], [], [], []

    def progress(line):
        if line.startswith("shard ["):
            after_shards.append(peak_rss_kb())
            resident.append(status_kb("VmRSS"))
            blocks.append(sys.getallocatedblocks())
            functions.append(len(context.context().list_function_names()))
            if FLAGS.heap_dump_every and len(resident) % FLAGS.heap_dump_every == 0:
                heap_dump()

    start = time.perf_counter()
    if spec["path"] == "stream":
        results = streaming.evaluate_split(
            models,
            data,
            config,
            tempfile.mkdtemp(prefix="eval_scaling_"),
            stream=streaming.StreamConfig(shard_size=FLAGS.shard_size),
            strategy=strategy,
            progress=progress,
        )
    else:
        images, labels = data_lib.load_numpy(data)
        runs = sharded.ShardedAttacks(strategy, config.batch_size, config.seed)
        results = evaluation.Evaluator(
            models, images, labels, config, lambda _: None, runs, choose_on=FLAGS.shard_size
        ).run()
    seconds = time.perf_counter() - start
    headline = results["headline"][evaluation.eps_key(FLAGS.eps)]
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_rss_kb": peak_rss_kb(),
                "robust": headline,
                "peak_after_shards_kb": after_shards,
                "resident_after_shards_kb": resident,
                "python_blocks_after_shards": blocks,
                "eager_functions_after_shards": functions,
            }
        )
    )


def write_images(folder, count, size):
    """`count` random PNGs in 3 class folders (kept: a rerun reuses them)."""
    rng = np.random.default_rng(0)
    for index in range(count):
        path = os.path.join(folder, f"class{index % 3}", f"{index:06d}.png")
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            tf.io.write_file(path, tf.io.encode_png(image))


def run_stream():
    """Streaming vs in-memory at each split size, each measurement in a fresh process."""
    sizes = sorted(int(n) for n in FLAGS.split_sizes)
    workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="eval_scaling_")
    folder = os.path.join(workdir, f"images{FLAGS.image_size}")
    write_images(folder, sizes[-1], FLAGS.image_size)
    model = testing_utils.save_tiny_models(
        os.path.join(workdir, "models"), size=(FLAGS.image_size,) * 2, num_classes=3
    )["defended"]
    machine = bench_util.machine_info()
    rows = []
    for examples in sizes:
        for path in ("in_memory", "stream"):
            spec = {"model": model, "folder": folder, "examples": examples, "path": path}
            flags_given = [a for a in sys.argv[1:] if not a.startswith("--child")]
            out = subprocess.run(
                [
                    sys.executable,
                    os.path.abspath(__file__),
                    *flags_given,
                    f"--child={json.dumps(spec)}",
                ],
                capture_output=True,
                text=True,
                check=True,
                env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
            )
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"examples": examples, "path": path, **row})
    report_stream(rows, machine)
    bench_util.write_json({"machine": machine, "rows": rows}, FLAGS.json_out)


def report_stream(rows, machine):
    shard_mb = FLAGS.shard_size * FLAGS.image_size**2 * 3 * 4 / 2**20
    lines = [
        "",
        f"Whole-split evaluation: {FLAGS.attack} suite (steps {FLAGS.steps}) on the white-box "
        f"model, {FLAGS.image_size} px, batch {FLAGS.batch_size}, shards of {FLAGS.shard_size} "
        f"({shard_mb:.1f} MB of images)",
        f"  machine   {machine['cpus_usable']} usable CPUs, {machine['cpu_model']}; "
        f"device {machine['device']}",
        "",
        f"  {'examples':>9}{'path':>11}{'seconds':>10}{'examples/s':>12}{'peak RSS MB':>13}"
        f"{'robust':>9}",
    ]
    by = {(r["examples"], r["path"]): r for r in rows}
    for r in rows:
        lines.append(
            f"  {r['examples']:>9}{r['path']:>11}{r['seconds']:>10.1f}"
            f"{r['examples'] / r['seconds']:>12.1f}{r['peak_rss_kb'] / 1024:>13.0f}"
            f"{r['robust']['robust']:>9}"
        )
    sizes = sorted({r["examples"] for r in rows})
    lines.append("")
    for n in sizes:
        ratio = by[(n, "in_memory")]["seconds"] / by[(n, "stream")]["seconds"]
        same = by[(n, "in_memory")]["robust"] == by[(n, "stream")]["robust"]
        lines.append(
            f"  {n} examples: streaming throughput {ratio:.2f}x in-memory; headline "
            f"{'identical' if same else 'DIFFERENT'}"
        )
    pairs = [(sizes[0], sizes[-1])] + ([(sizes[-2], sizes[-1])] if len(sizes) > 2 else [])
    for small, large in pairs:
        for path in ("stream", "in_memory"):
            grown = (by[(large, path)]["peak_rss_kb"] - by[(small, path)]["peak_rss_kb"]) / 1024
            lines.append(f"  {path} peak RSS, {small} -> {large} examples: {grown:+.0f} MB")
    lines.append(
        f"  goal for stream: memory independent of N, i.e. less than one shard's images "
        f"({shard_mb:.1f} MB) between two runs that both fill the read-ahead (the shard "
        "being attacked, the next one prefetched, the one being decoded: >= 4 shards)"
    )
    after = by[(sizes[-1], "stream")].get("peak_after_shards_kb") or []
    if len(after) >= 4:
        half, quarter = len(after) // 2, len(after) // 4
        lines.append(
            f"  stream peak over the {sizes[-1]}-example run's shards: "
            f"{after[0] / 1024:.0f} MB after the first, {after[quarter - 1] / 1024:.0f} after "
            f"{quarter}, {after[half - 1] / 1024:.0f} after {half}, {after[-1] / 1024:.0f} "
            f"after {len(after)}; the second half of the split added "
            f"{(after[-1] - after[half - 1]) / 1024:+.1f} MB"
        )
        row = by[(sizes[-1], "stream")]
        for name, values, unit in (
            ("resident (VmRSS)", row.get("resident_after_shards_kb") or [], 1024),
            ("Python allocated blocks", row.get("python_blocks_after_shards") or [], 1),
            ("functions in the eager context", row.get("eager_functions_after_shards") or [], 1),
        ):
            if len(values) == len(after):
                cells = [values[i] / unit for i in (0, quarter - 1, half - 1, len(values) - 1)]
                lines.append(
                    f"  {name} after shard 1, {quarter}, {half}, {len(values)}: "
                    + ", ".join(f"{c:.0f}" for c in cells)
                )
    bench_util.print_report(lines, machine)


if __name__ == "__main__":
    app.run(main)
