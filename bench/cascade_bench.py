"""The cascade vs the full matrix (`python bench/attacks.py --benches=cascade`).

On the main job's trained models (`--cascade_workdir`, default `workdir/fmnist`,
made by `bash scripts/run_main.sh`) and the first `--cascade_examples` Fashion-MNIST
test images, runs one evaluation with the AutoAttack-style cascade (each attack
on the examples still robust after the earlier ones) and one with every attack
on every example, with the same preset, and prints the time of each, the
examples attacked, and the per-eps worst case of both, which must be equal.
Trained models matter: on untrained ones nearly every example is fooled (or
misclassified) at once and the cascade has nothing to save.
"""

import os
import time

import bench_util
from absl import flags

from s2s_tf import data as data_lib
from s2s_tf.models import s2s_model
from s2s_tf.robustness import evaluation

FLAGS = flags.FLAGS
THREATS = ("surrogate", "bpda", "white_box", "gray_box", "gradient_free")

flags.DEFINE_string("cascade_workdir", "workdir/fmnist", "A main-job workdir (trained models).")
flags.DEFINE_integer("cascade_examples", 100, "Test images evaluated.", lower_bound=1)
flags.DEFINE_string("cascade_preset", "fast", "Attack preset of both evaluations.")


def _models_and_data():
    path = os.path.join(FLAGS.cascade_workdir, "stage2", "defended.keras")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run the main job first (scripts/run_main.sh)")
    defended = s2s_model.load_keras(path, "defended model")
    shape = tuple(defended.input_shape[1:])
    models = evaluation.Models(
        s2s_model.get_classifier(defended),
        defended,
        s2s_model.build_purifier(s2s_model.get_autoencoder(defended), shape),
    )
    data = data_lib.DataConfig(
        source="fashion_mnist",
        split="test",
        augment="off",
        num_examples=FLAGS.cascade_examples,
        image_size=shape[:2],
    )
    return models, data_lib.load_numpy(data)


def run_cascade():
    """Both evaluations; prints and returns the numbers."""
    models, (images, labels) = _models_and_data()
    out = {}
    for cascade in (True, False):
        config = evaluation.preset(
            FLAGS.cascade_preset,
            num_examples=FLAGS.cascade_examples,
            cascade=cascade,
            threat_models=THREATS,
        )
        start = time.perf_counter()
        results = evaluation.Evaluator(models, images, labels, config, lambda _: None).run()
        out["cascade" if cascade else "full"] = {
            "seconds": time.perf_counter() - start,
            "attacked": sum(r["attacked"] for r in results["runs"].values()),
            "robust": {k: v["robust"] for k, v in results["headline"].items()},
            "runs": {
                k: {"seconds": r["seconds"], "new": r["new"]} for k, r in results["runs"].items()
            },
        }
    out["speedup"] = out["full"]["seconds"] / out["cascade"]["seconds"]
    out["same_worst_case"] = out["full"]["robust"] == out["cascade"]["robust"]
    out["machine"] = bench_util.machine_info()
    lines = [
        "",
        f"Cascade vs full matrix ({FLAGS.cascade_preset} preset, {FLAGS.cascade_examples} "
        f"examples, {FLAGS.cascade_workdir})",
    ]
    for name in ("cascade", "full"):
        r = out[name]
        lines.append(
            f"  {name:<8} {r['seconds']:8.1f} s  {r['attacked']:7d} examples attacked  "
            f"robust per eps {r['robust']}"
        )
    lines += [
        f"  full / cascade time  {out['speedup']:.2f}x",
        f"  same worst case      {'PASS' if out['same_worst_case'] else 'FAIL'}",
    ]
    bench_util.print_report(lines, out["machine"])
    if not out["same_worst_case"]:
        raise SystemExit("the cascade's worst case differs from the full matrix's")
    return out


if __name__ == "__main__":
    raise SystemExit("run it as: python bench/attacks.py --benches=cascade")
