"""The robust job: four models side by side under the same attacks.

    robust_pipeline.run(config, workdir, strategy)

runs the whole pipeline (`pipeline.run`: classifier, stage 1, the paper's stage
2, its report and export), then trains

- an adversarial S2SNet: stage 2 with the adversarial objective, from the same
  stage-1 autoencoder in front of the same frozen classifier (`robust/`);
- an adversarially trained classifier: stage 0 with Madry's objective, the same
  inner attack and budget (`madry/`): what a user who can retrain would pick;

evaluates the classifier, both S2SNets and the adversarially trained classifier
with the same attack suite and examples (per-example worst case over every
threat model that applies: an undefended classifier has no purifier, so for it
gray-box, BPDA and the surrogate are white-box and only white-box and
gradient-free attacks run), exports the adversarial S2SNet, and writes
`robust_summary.json` and the Markdown table `robust_table.md`. Every finished
part is reused on a rerun.
"""

import dataclasses
import json
import os
import time

import keras
from absl import logging

from s2s_tf import config_io
from s2s_tf import constants
from s2s_tf import pipeline
from s2s_tf.analysis import report as report_lib
from s2s_tf.export import export_lib
from s2s_tf.models import s2s_model
from s2s_tf.robustness import eval_lib
from s2s_tf.robustness import evaluation
from s2s_tf.robustness import sharded as sharded_lib
from s2s_tf.robustness import streaming
from s2s_tf.train import optim
from s2s_tf.train import stages

ROBUST_DIR = "robust"
MADRY_DIR = "madry"
CLASSIFIER_EVAL_DIR = "eval_classifier"
SUMMARY_FILE = "robust_summary.json"
TABLE_FILE = "robust_table.md"
# The threat models of an undefended classifier (its "purifier" is the identity).
UNDEFENDED_THREATS = ("white_box", "gradient_free")
MODELS = (
    ("classifier", "classifier"),
    ("s2s_paper", "S2SNet (paper)"),
    ("s2s_adversarial", "S2SNet (adversarial)"),
    ("madry", "adversarially trained classifier"),
)


def train_robust(config, workdir, strategy, paths):
    """Adversarial stage 2 and Madry's stage 0; returns `paths` with theirs added."""
    base = stages.ModelConfig(
        classifier=config.classifier,
        image_size=config.data.image_size,
        autoencoder=config.autoencoder,
    )
    stage2 = dataclasses.replace(
        base, classifier_path=paths["classifier"], autoencoder_path=paths["stage1"]
    )
    steps = config.robust_stage2_steps
    robust_dir = os.path.join(workdir, ROBUST_DIR)
    pipeline.train_stage(
        config,
        robust_dir,
        strategy,
        "stage2",
        steps,
        stage2,
        stage2_objective="adversarial",
        stage2_trainable=config.robust_stage2_trainable,
        optimizer=optim.OptimizerConfig(
            learning_rate=config.robust_learning_rate,
            schedule="cosine",
            warmup_steps=min(config.warmup_steps, steps // 10),
        ),
    )
    madry_dir = os.path.join(workdir, MADRY_DIR)
    pipeline.train_stage(
        config,
        madry_dir,
        strategy,
        "stage0",
        config.robust_classifier_steps,
        base,
        stage0_objective="adversarial",
    )
    return {
        **paths,
        "s2s_adversarial": constants.defended_path(robust_dir),
        "madry": constants.classifier_path(madry_dir),
    }


def _reuse_or_time(outdir, evaluate):
    """The report in `outdir` if one exists, else `evaluate()`'s, timed into `timing.json`."""
    path = constants.report_json(outdir)
    timing = os.path.join(outdir, pipeline.TIMING_FILE)
    if os.path.exists(path):
        logging.info("reusing the report in %s", outdir)
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    started = time.perf_counter()
    document = evaluate()
    os.makedirs(outdir, exist_ok=True)
    with open(timing, "w", encoding="utf-8") as f:
        json.dump({"eval_seconds": round(time.perf_counter() - started, 1)}, f)
    return document


def evaluate_undefended(config, path, outdir, strategy=None):
    """An undefended classifier under the run's attacks: white-box and gradient-free.

    Returns:
      The document written to `<outdir>/robustness.json` ("config", "results").
    """
    attack = dataclasses.replace(
        config.attack,
        threat_models=tuple(t for t in config.attack.threat_models if t in UNDEFENDED_THREATS),
    )
    classifier = s2s_model.load_keras(path, "classifier model")
    inputs = keras.Input(classifier.input_shape[1:])
    identity = keras.Model(inputs, keras.layers.Identity()(inputs), name="identity")
    models = evaluation.Models(classifier=classifier, defended=classifier, purifier=identity)
    data = dataclasses.replace(
        config.data, split=config.eval_split, augment="off", global_batch_size=attack.batch_size
    )
    results = streaming.evaluate_split(
        models,
        data,
        attack,
        os.path.join(outdir, "shards"),
        strategy=strategy,
        model_key=sharded_lib.file_fingerprint([path]),
    )
    document = {"config": config_io.config_to_dict(attack), "results": results}
    os.makedirs(outdir, exist_ok=True)
    with open(constants.report_json(outdir), "w", encoding="utf-8") as f:
        json.dump(document, f, indent=1, default=report_lib.jsonable)
    return document


def evaluate_all(config, workdir, paths, strategy=None):
    """The four models' reports, {model key: (report directory, document)}."""
    robust_dir = os.path.join(workdir, ROBUST_DIR)
    outdirs = {
        "classifier": os.path.join(workdir, CLASSIFIER_EVAL_DIR),
        "s2s_paper": constants.eval_report_dir(workdir),
        "s2s_adversarial": constants.eval_report_dir(robust_dir),
        "madry": constants.eval_report_dir(os.path.join(workdir, MADRY_DIR)),
    }
    adversarial_run = eval_lib.EvalRunConfig(
        data=dataclasses.replace(config.data, split=config.eval_split, augment="off"),
        defended_path=paths["s2s_adversarial"],
        reconstruction_autoencoder_path=paths["stage1"],
        attack=config.attack,
        attack_preset=config.attack_preset,
        baselines=(),
    )
    runs = {
        "classifier": lambda: evaluate_undefended(
            config, paths["classifier"], outdirs["classifier"], strategy
        ),
        "s2s_paper": lambda: pipeline.evaluate(config, workdir, paths, strategy)[1],
        "s2s_adversarial": lambda: eval_lib.evaluate(
            adversarial_run, outdirs["s2s_adversarial"], strategy=strategy
        ),
        "madry": lambda: evaluate_undefended(config, paths["madry"], outdirs["madry"], strategy),
    }
    return {key: (outdirs[key], _reuse_or_time(outdirs[key], run)) for key, run in runs.items()}


def _eval_seconds(outdir):
    path = os.path.join(outdir, pipeline.TIMING_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)["eval_seconds"]


def summarize(workdir, reports):
    """Clean and worst-case robust accuracy, intervals and times of the four models."""
    robust_dir, madry_dir = (os.path.join(workdir, d) for d in (ROBUST_DIR, MADRY_DIR))
    stage1 = pipeline.stage_seconds(workdir, "stage1")

    def plus(a, b):
        return None if a is None or b is None else round(a + b, 1)

    train_seconds = {
        "classifier": pipeline.stage_seconds(workdir, "stage0"),
        "s2s_paper": plus(stage1, pipeline.stage_seconds(workdir, "stage2")),
        "s2s_adversarial": plus(stage1, pipeline.stage_seconds(robust_dir, "stage2")),
        "madry": pipeline.stage_seconds(madry_dir, "stage0"),
    }
    rows = {}
    for key, title in MODELS:
        outdir, document = reports[key]
        results = document["results"]
        rows[key] = {
            "title": title,
            "report": constants.report_json(outdir),
            "num_examples": results["num_examples"],
            "clean": results["clean"]["defended"],
            "headline": results["headline"],
            "converged": results.get("converged"),
            "train_seconds": train_seconds[key],
            "eval_seconds": _eval_seconds(outdir),
        }
    return rows


def table(rows):
    """The README table (Markdown) of `summarize`'s rows."""
    eps_keys = list(next(iter(rows.values()))["headline"])
    header = "| model | clean | " + " | ".join(eps_keys) + " | training | evaluation |"
    lines = [header, "|---" * (len(eps_keys) + 4) + "|"]
    for row in rows.values():
        cells = [
            f"{100 * h['robust_accuracy']:.1f}% ({100 * h['ci95'][0]:.1f}-{100 * h['ci95'][1]:.1f})"
            for h in (row["headline"][k] for k in eps_keys)
        ]
        lines.append(
            f"| {row['title']} | {100 * row['clean']:.1f}% | "
            + " | ".join(cells)
            + f" | {_minutes(row['train_seconds'])} | {_minutes(row['eval_seconds'])} |"
        )
    n = next(iter(rows.values()))["num_examples"]
    lines += [
        "",
        f"Robust accuracy: per-example worst case over every attack and threat model that "
        f"applies, {n} test examples, 95% Wilson intervals in parentheses. The S2SNets' "
        "training time is stages 1 and 2 (the classifier they defend is given).",
    ]
    return "\n".join(lines)


def _minutes(seconds):
    return "n/a" if seconds is None else f"{seconds / 60:.1f} min"


def run(config, workdir, strategy, print_fn=print):
    """Trains, evaluates and exports the four models (or reuses them); writes the table.

    Returns:
      Where the outputs are: the table, both exports and the seconds taken.
    """
    started = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    paths = pipeline.train_all(config, workdir, strategy)
    paths = train_robust(config, workdir, strategy, paths)
    reports = evaluate_all(config, workdir, paths, strategy)
    robust_dir = os.path.join(workdir, ROBUST_DIR)
    robust_export = export_lib.export_unless_current(
        export_lib.ExportConfig(
            export_base=constants.export_base(robust_dir),
            defended_path=paths["s2s_adversarial"],
            report_path=constants.report_json(reports["s2s_adversarial"][0]),
        )
    )
    rows = summarize(workdir, reports)
    markdown = table(rows)
    with open(os.path.join(workdir, SUMMARY_FILE), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=2)
    with open(os.path.join(workdir, TABLE_FILE), "w", encoding="utf-8") as f:
        f.write(markdown + "\n")
    outputs = {
        "table": os.path.join(workdir, TABLE_FILE),
        "export": pipeline.export(workdir, paths),
        "robust_export": robust_export,
        "tensorboard": f"tensorboard --logdir {workdir}",
        "seconds": round(time.perf_counter() - started, 1),
    }
    print_fn(markdown)
    for name, value in outputs.items():
        print_fn(f"{name}: {value}")
    return outputs
