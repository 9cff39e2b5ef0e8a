r"""Binary: checks an evaluation's headline with another attack library (ART) on the export.

  s2s_crosscheck --export_dir=workdir/fmnist/export/3 \
      --report=workdir/fmnist/eval_standard500/robustness.json

Runs ART's APGD-CE and APGD-DLR through the exported SavedModel's white-box,
BPDA and gray-box views and ART's Square attack on it (`robustness.art_crosscheck`),
on the examples the report was computed on, at each eps of the report's headline
(or --eps), and compares per example: the report's worst case may be at most
--tolerance above ART's. Writes <report folder>/crosscheck_art.json (or --output)
and exits with status 1 when a comparison fails, naming the examples ART fooled
that the report counts robust. Needs `pip install adversarial-robustness-toolbox`
(the `crosscheck` extra).
"""

import dataclasses
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging

from s2s_tf import config_io
from s2s_tf import data as data_lib
from s2s_tf.export import model_card
from s2s_tf.export import serving_files
from s2s_tf.robustness import art_crosscheck
from s2s_tf.robustness import evaluation

FLAGS = flags.FLAGS
OUTPUT_FILE = "crosscheck_art.json"


def define_flags(flag_values=FLAGS):
    """Defines the binary's flags on `flag_values`; what needs no file is checked at parse time."""
    defaults = art_crosscheck.CrossCheckConfig(eps=1.0)
    fv = flag_values
    flags.DEFINE_string(
        "export_dir", None, "An exported SavedModel version folder.", flag_values=fv
    )
    flags.DEFINE_string(
        "report", None, "robustness.json of the evaluation to check.", flag_values=fv
    )
    flags.DEFINE_string(
        "eps", None, "Budgets to check, e.g. 8/255 (default: the report's).", flag_values=fv
    )
    flags.DEFINE_integer(
        "num_examples", None, "Check the report's first N examples.", lower_bound=1, flag_values=fv
    )
    flags.DEFINE_integer("steps", defaults.steps, "APGD iterations.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer(
        "square_queries",
        defaults.square_queries,
        "Square's queries (0: no Square).",
        lower_bound=0,
        flag_values=fv,
    )
    flags.DEFINE_multi_enum(
        "attacks",
        list(defaults.attacks),
        list(art_crosscheck.APGD_LOSSES),
        "APGD variants.",
        flag_values=fv,
    )
    flags.DEFINE_multi_enum(
        "threat_models",
        list(defaults.threat_models),
        list(art_crosscheck.THREAT_MODELS),
        "Gradient views of the export.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "batch_size", defaults.batch_size, "Examples per ART call.", lower_bound=1, flag_values=fv
    )
    flags.DEFINE_float(
        "tolerance", 0.01, "How far above ART's the report may be.", lower_bound=0, flag_values=fv
    )
    flags.DEFINE_integer("seed", defaults.seed, "Seed of ART's random draws.", flag_values=fv)
    flags.DEFINE_string(
        "output", None, f"The JSON's path (default: {OUTPUT_FILE} beside --report).", flag_values=fv
    )
    flags.mark_flags_as_required(["export_dir", "report"], flag_values=fv)
    flags.register_validator("eps", _valid_eps, "--eps: budgets like 8/255,16/255", flag_values=fv)


def _valid_eps(text):
    try:
        return text is None or bool(config_io.parse_eps_list(text))
    except ValueError:
        return False


def load_report(path):
    """The report's results, with a clear error for what is not one."""
    if not os.path.isfile(path):
        raise ValueError(f"--report: no file {path}")
    with open(path, encoding="utf-8") as f:
        document = json.load(f)
    if "per_example" not in document.get("results", {}):
        raise ValueError(f"--report: {path} holds no per-example results (not a robustness.json)")
    return document


def export_image_size(export_dir):
    """(H, W) the export serves, from its model card."""
    path = os.path.join(export_dir, serving_files.WARMUP_DIR, model_card.CARD_JSON)
    if not os.path.isfile(path):
        raise ValueError(f"--export_dir: no model card {path}; cannot tell the input size")
    with open(path, encoding="utf-8") as f:
        return json.load(f)["input"]["image_size"]


def plan(document, fv=FLAGS):
    """(eps values, eps keys, number of examples, export's (H, W)), checked against the files."""
    headline = document["results"]["headline"]
    eps = config_io.parse_eps_list(fv.eps) if fv.eps else None
    keys = [evaluation.eps_key(e) for e in eps] if eps else list(headline)
    missing = [key for key in keys if key not in headline]
    if missing:
        raise ValueError(f"--eps: the report has no results at {missing}; it has {list(headline)}")
    values = eps or config_io.parse_eps_list(",".join(keys))
    n = len(document["results"]["per_example"]["clean/defended"])
    if fv.num_examples is not None and not 0 < fv.num_examples <= n:
        raise ValueError(f"--num_examples must be in [1, {n}] (the report's examples)")
    if not os.path.isfile(os.path.join(fv.export_dir, "saved_model.pb")):
        raise ValueError(f"--export_dir: no saved_model.pb in {fv.export_dir}")
    size = tuple(export_image_size(fv.export_dir))
    return values, keys, fv.num_examples or n, size


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `check` found: the report, one config per eps (with its key), examples, input size.

    `image_size` is the export's, from its card: reports written before they recorded
    the evaluated size hold the flag's default in their data config, and the
    evaluation ran at the model's size.
    """

    document: dict
    configs: list
    keys: list
    num_examples: int
    image_size: tuple


def check(fv=FLAGS):
    """Everything the files tell before any attack: a `Plan`.

    Raises:
      ValueError: naming the first problem.
    """
    document = load_report(fv.report)
    eps_values, keys, n, size = plan(document, fv)
    configs = [
        art_crosscheck.CrossCheckConfig(
            eps=eps,
            steps=fv.steps,
            square_queries=fv.square_queries,
            attacks=tuple(fv.attacks),
            threat_models=tuple(fv.threat_models),
            batch_size=fv.batch_size,
            seed=fv.seed,
        )
        for eps in eps_values
    ]
    for config in configs:
        config.validate()
    return Plan(document, configs, keys, n, size)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        checked = check(FLAGS)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    document, n = checked.document, checked.num_examples
    data = config_io.config_from_dict(data_lib.DataConfig, document["config"]["data"])
    data = dataclasses.replace(data, num_examples=n, augment="off", image_size=checked.image_size)
    images, labels = data_lib.load_numpy(data)
    per_example = document["results"]["per_example"]
    views = art_crosscheck.export_views(FLAGS.export_dir)  # loaded once for every eps
    clean = art_crosscheck.clean_correct(views, images, labels, FLAGS.batch_size)
    checks, failed = {}, []
    for key, config in zip(checked.keys, checked.configs, strict=True):
        logging.info("ART on %s: %d examples at %s", FLAGS.export_dir, n, key)
        theirs = art_crosscheck.run(
            views, images, labels, config, progress=logging.info, clean=clean
        )
        ours = evaluation.worst_case(per_example, key)[0][:n]
        verdict = art_crosscheck.compare(ours, theirs["robust"], FLAGS.tolerance)
        checks[key] = {"art": theirs, "comparison": verdict}
        print(
            f"{key}: report {verdict['ours']:.1%}, ART {verdict['theirs']:.1%} on {n} examples "
            f"({'passed' if verdict['passed'] else 'FAILED'}; ART fooled "
            f"{len(verdict['missed'])} that the report counts robust)"
        )
        for row in theirs["runs"]:
            print(
                f"  {row['run']}: {row['fooled']} of {row['attacked']} fooled, {row['seconds']} s"
            )
        if not verdict["passed"]:
            failed.append(key)
    output = FLAGS.output or os.path.join(os.path.dirname(FLAGS.report), OUTPUT_FILE)
    art_crosscheck.write_json(
        {"export_dir": FLAGS.export_dir, "report": FLAGS.report, "checks": checks}, output
    )
    print(f"wrote {output}")
    if failed:
        print(f"the report is above ART's worst case by more than {FLAGS.tolerance} at {failed}")
        sys.exit(1)


def run():
    """Console-script entry point."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
