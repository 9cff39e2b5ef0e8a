"""The model card of an exported version: what the model is, what it saw, how well it does.

    card = model_card.build_card(sources, autoencoder, classifier, image_size, report_path)
    model_card.write_card(assets_extra_dir, card)

writes `model_card.json` and `model_card.md` (the same numbers) beside the
warm-up requests. The card names the classifier and its input size, the
autoencoder's shape, the training data and stage-2 loss, how each part was
trained (stage 2's objective, paper or adversarial, what it trained and its
inner attack; the classifier's, standard or Madry; each stage's steps, batch,
learning rate and augmentation), all read from the `config.json` that training
writes beside each stage's models when there is one, software versions, and,
from the robustness report (`<workdir>/eval_report/robustness.json`) when
there is one: clean accuracy with and without the defense, the per-example
worst-case robust accuracy per eps, whether the attacks converged, and the
sanity checks (failed, undecided and not run, each named). Without a report
those fields say "not evaluated" rather than anything that could pass for a
result.

Provenance is by content: the card records the SHA-256 of the exported model
files and of the report, and the report records the SHA-256 of the files it
evaluated (`model_files`), so "the evaluated model is the exported one" means
the same bytes, whatever the paths. A report without those hashes leaves the
question open ("unknown"), with a warning.
"""

import datetime
import json
import os

import keras
import tensorflow as tf

import s2s_tf
from s2s_tf import config_io
from s2s_tf import constants
from s2s_tf.export import provenance as provenance_lib
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import s2s_model
from s2s_tf.train import adversarial as adversarial_lib

CARD_JSON = "model_card.json"
CARD_MARKDOWN = "model_card.md"
# The evaluation binary's report file in its output folder (s2s_tf.robustness.report).
REPORT_JSON = constants.REPORT_JSON
NOT_EVALUATED = "not evaluated"
UNKNOWN = "unknown"
# How a sanity check ended: `passed` True / False, or None with data (undecided) or without.
PASSED, FAILED, UNDECIDED, NOT_RUN = "passed", "failed", "undecided", "not run"
# The file training writes beside a stage's final models (s2s_tf.train.train_lib).
_STAGE_CONFIG = "config.json"


def default_report_path(model_path):
    """The workdir's report for a model saved in a workdir's stage folder, else None.

    `<workdir>/stage2/defended.keras` -> `<workdir>/eval_report/robustness.json`.
    """
    if not model_path:
        return None
    stage_dir = os.path.dirname(os.path.abspath(model_path))
    if os.path.basename(stage_dir) not in constants.STAGES:
        return None
    return os.path.join(constants.eval_report_dir(os.path.dirname(stage_dir)), REPORT_JSON)


def load_report(path):
    """The report document at `path`.

    Raises:
      FileNotFoundError: when `path` does not exist.
      ValueError: when it is not a robustness report (no "results").
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"robustness report not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            document = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"robustness report {path} is not valid JSON: {e}") from None
    if not isinstance(document, dict) or not isinstance(document.get("results"), dict):
        raise ValueError(f"{path} is not a robustness report (no 'results')")
    return document


def _stage_config(model_path):
    """The training config written beside `model_path` by train_lib, or None."""
    if not model_path:
        return None
    path = os.path.join(os.path.dirname(os.path.abspath(model_path)), _STAGE_CONFIG)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    return config if isinstance(config, dict) and "stage" in config else None


def _data(train_data):
    if not train_data:
        return UNKNOWN
    keys = ("source", "split", "image_size", "data_dir", "folder", "tfds_name", "num_examples")
    return {key: train_data.get(key) for key in keys if train_data.get(key) is not None}


def _budget(config):
    """A stage's training budget from its config: steps, batch, learning rate, augmentation."""
    loop, optimizer = config.get("loop") or {}, config.get("optimizer") or {}
    data = config.get("train_data") or {}
    return {
        "train_steps": loop.get("train_steps", UNKNOWN),
        "global_batch_size": data.get("global_batch_size", UNKNOWN),
        "learning_rate": optimizer.get("learning_rate", UNKNOWN),
        "schedule": optimizer.get("schedule", UNKNOWN),
        "augment": data.get("augment", UNKNOWN),
    }


# The inner attack of adversarial training (`AdversarialConfig`); stage 2 adds its own terms.
_ATTACK_KEYS = (
    "train_eps",
    "train_eps_ramp_steps",
    "train_attack",
    "train_attack_steps",
    "train_step_size",
)
_STAGE2_ATTACK_KEYS = (*_ATTACK_KEYS, "robust_weight", "train_surrogate_temperature")


def _inner_attack(config, keys):
    """The recorded inner attack's `keys`; UNKNOWN for all when the config has none.

    A recorded attack without a setting added after it was written ran with that
    setting's default, as `config_io.config_from_dict` reads such a config back.
    """
    adversarial = config.get("adversarial")
    if not adversarial:
        return dict.fromkeys(keys, UNKNOWN)
    recorded = {**config_io.config_to_dict(adversarial_lib.AdversarialConfig()), **adversarial}
    return {key: recorded[key] for key in keys}


def _training(training, classifier_training):
    """How the defense (stages 1 and 2) and the classifier (stage 0) were trained."""
    card = {"stage2": UNKNOWN, "stage1": UNKNOWN, "classifier": UNKNOWN}
    if training:
        objective = training.get("stage2_objective", UNKNOWN)
        card["stage2"] = {
            "objective": objective,
            "trainable": training.get("stage2_trainable", UNKNOWN),
            **_budget(training),
        }
        if objective == "adversarial":
            card["stage2"]["inner_attack"] = _inner_attack(training, _STAGE2_ATTACK_KEYS)
        stage1 = _stage_config(training.get("model", {}).get("autoencoder_path"))
        if stage1:
            card["stage1"] = _budget(stage1)
    if classifier_training:
        objective = classifier_training.get("stage0_objective", UNKNOWN)
        card["classifier"] = {"objective": objective, **_budget(classifier_training)}
        if objective == "adversarial":
            card["classifier"]["inner_attack"] = _inner_attack(classifier_training, _ATTACK_KEYS)
    return card


def _autoencoder(autoencoder, training):
    convs = ae_lib.encoder_conv_layers(autoencoder)
    card = {
        "encoder_conv_widths": [layer.filters for layer in convs],
        "parameters": int(autoencoder.count_params()),
    }
    if training:
        card["config"] = training.get("model", {}).get("autoencoder", UNKNOWN)
    return card


def _classifier(classifier, sources, training, classifier_training):
    model = (training or {}).get("model", {})
    name = (classifier_training or training or {}).get("model", {}).get("classifier")
    return {
        "name": name or classifier.name,
        "path": sources.get("classifier_path") or model.get("classifier_path") or UNKNOWN,
        "input_size": list(classifier.input_shape[1:3]),
        "num_classes": int(classifier.output_shape[-1]),
    }


def _convergence(results):
    """The attacks' convergence verdict from the report, when the evaluation made one."""
    if "converged" not in results:
        return {"converged": NOT_EVALUATED}
    details = {}
    for eps, row in (results.get("convergence") or {}).items():
        reruns = {
            what: {"passed": row[what].get("passed"), "detail": row[what].get("detail")}
            for what in row
            if what.startswith("more_") and isinstance(row.get(what), dict)
        }
        details[eps] = {
            "converged": row.get("converged"),
            "source": row.get("source"),
            "deciding": row.get("deciding"),
            **reruns,
        }
    return {"converged": results["converged"], "convergence": details}


def _evaluation(report, report_path, sources, exported):
    """The card's numbers from the report (each "not evaluated" without one)."""
    if report is None:
        keys = ("clean_accuracy", "robust_accuracy", "sanity_checks")
        return {"report": NOT_EVALUATED, **dict.fromkeys(keys, NOT_EVALUATED)}
    results = report["results"]
    clean = results.get("clean", {})
    headline = report.get("headline") or results.get("headline")
    checks = report.get("checks")
    evaluated = report.get("config", {})
    return {
        "report": os.path.abspath(report_path),
        # A report of other model bytes (e.g. before retraining) does not describe this export.
        **provenance_lib.evaluated_is_exported(report, sources, exported),
        "examples": results.get("num_examples"),
        "split": evaluated.get("data", {}).get("split", UNKNOWN),
        "clean_accuracy": {
            "classifier": clean.get("classifier", NOT_EVALUATED),
            "defended": clean.get("defended", NOT_EVALUATED),
        },
        "robust_accuracy": headline if isinstance(headline, dict) and headline else NOT_EVALUATED,
        **_convergence(results),
        "sanity_checks": NOT_EVALUATED if checks is None else _checks(checks),
    }


def check_status(check):
    """How a check ended: passed, failed, undecided (`passed` None, but it ran) or not run.

    A check whose `passed` is None is undecided when it carries paired counts
    or a reason (e.g. too few discordant pairs), and "not run" when it had no data.
    """
    if check.get("passed") is True:
        return PASSED
    if check.get("passed") is False:
        return FAILED
    detail = str(check.get("detail") or "").strip().lower()
    ran = "only_a" in check or (detail and not detail.startswith(NOT_RUN))
    return UNDECIDED if ran else NOT_RUN


def _checks(checks):
    by_status = {status: [] for status in (FAILED, UNDECIDED, NOT_RUN)}
    passed = 0
    for check in checks:
        status = check_status(check)
        if status == PASSED:
            passed += 1
        else:
            by_status[status].append({"name": check.get("name"), "detail": check.get("detail")})
    return {"passed": passed, **by_status}


def build_card(sources, autoencoder, classifier, image_size, report_path=None, provenance=None):
    """The model card of one export, as a JSON-ready dict.

    Args:
      sources: the export's model paths, a dict with "defended_path" or
        "autoencoder_path" and "classifier_path".
      autoencoder: the exported autoencoder (normalised space).
      classifier: the exported [0, 1]-input classifier.
      image_size: (H, W) the version serves.
      report_path: a robustness.json, or None for a card without results.
      provenance: what the export was made from (`provenance.made_from`), with
        "model_files" {path: sha256}; None hashes the source files here.

    Returns:
      The card.

    Raises:
      FileNotFoundError, ValueError: for a missing or malformed report.
    """
    training = _stage_config(sources.get("defended_path") or sources.get("autoencoder_path"))
    classifier_training = _stage_config(
        sources.get("classifier_path") or (training or {}).get("model", {}).get("classifier_path")
    )
    report = load_report(report_path) if report_path else None
    if provenance is None:
        files = s2s_model.file_digests(provenance_lib.model_sources(sources))
        digest = s2s_model.file_sha256(report_path) if report_path else None
        report_record = {"path": report_path, "sha256": digest} if report_path else None
        provenance = {"model_files": files, "report": report_record}
    return {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": {k: v for k, v in sources.items() if v},
        "input": {"image_size": list(image_size), "range": "float32 RGB in [0, 1]"},
        "classifier": _classifier(classifier, sources, training, classifier_training),
        "autoencoder": _autoencoder(autoencoder, training),
        "data": {
            "defense_training": _data((training or {}).get("train_data")),
            "classifier_training": _data((classifier_training or {}).get("train_data")),
        },
        "stage2_loss": (training or {}).get("stage2_loss", UNKNOWN),
        "reconstruction_weight": (training or {}).get("reconstruction_weight", UNKNOWN),
        "training": _training(training, classifier_training),
        "evaluation": _evaluation(report, report_path, sources, provenance["model_files"]),
        "provenance": provenance,
        "software": {
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "s2s_tf": s2s_tf.__version__,
        },
    }


def _pct(value):
    return f"{100 * value:.1f}%" if isinstance(value, int | float) else str(value)


def markdown(card):
    """The card as Markdown; every number is read from `card`."""
    evaluation, classifier = card["evaluation"], card["classifier"]
    clean = evaluation["clean_accuracy"]
    lines = [
        "# Model card: S2SNet-defended classifier",
        "",
        f"Created {card['created']}. Input: {card['input']['range']}, "
        f"{'x'.join(str(s) for s in card['input']['image_size'])} px.",
        "",
        "## Model",
        f"- Classifier: {classifier['name']} ({classifier['num_classes']} classes, input "
        f"{'x'.join(str(s) for s in classifier['input_size'])}), from `{classifier['path']}`",
        f"- Autoencoder: encoder conv widths {card['autoencoder']['encoder_conv_widths']}, "
        f"{card['autoencoder']['parameters']} parameters",
        f"- Stage-2 loss: {card['stage2_loss']} (reconstruction weight "
        f"{card['reconstruction_weight']})",
        f"- Defense trained on: `{json.dumps(card['data']['defense_training'])}`",
        f"- Classifier trained on: `{json.dumps(card['data']['classifier_training'])}`",
        *_training_lines(card["training"]),
        "",
        "## Evaluation",
    ]
    if isinstance(clean, dict):
        lines.append(
            f"Clean accuracy on {evaluation['examples']} {evaluation['split']} examples: "
            f"classifier alone {_pct(clean['classifier'])}, defended {_pct(clean['defended'])}."
        )
        lines.append(f"Report: `{evaluation['report']}`.")
        lines += _provenance_lines(evaluation)
    else:
        lines.append(f"Clean accuracy: {clean}.")
    lines += ["", "Robust accuracy (per-example worst case over every attack run):", ""]
    lines += _robust_lines(evaluation["robust_accuracy"])
    lines += ["", *_convergence_lines(evaluation)]
    lines += ["", "Sanity checks:", ""] + _check_lines(evaluation["sanity_checks"])
    software = ", ".join(f"{k} {v}" for k, v in card["software"].items())
    lines += ["", f"Software: {software}.", "", "## Provenance (SHA-256)"]
    for path, digest in card["provenance"]["model_files"].items():
        lines.append(f"- exported `{path}`: `{digest}`")
    report = card["provenance"].get("report")
    lines.append(f"- report `{report['path']}`: `{report['sha256']}`" if report else "- no report")
    return "\n".join([*lines, ""])


def _budget_text(budget):
    return (
        f"{budget['train_steps']} steps of batch {budget['global_batch_size']}, peak learning "
        f"rate {budget['learning_rate']} ({budget['schedule']}), augmentation {budget['augment']}"
    )


def _attack_text(attack):
    shown = dict(attack)
    for key in ("train_eps", "train_step_size"):
        if isinstance(shown.get(key), int | float):
            shown[key] = config_io.unparse_eps_list((shown[key],))
    if shown.get("train_step_size") is None:
        shown["train_step_size"] = "default"
    return ", ".join(f"{key} {value}" for key, value in shown.items())


def _stage_line(head, stage):
    """`head`, the stage's budget and, for adversarial training, its inner attack."""
    line = f"{head}; {_budget_text(stage)}"
    if "inner_attack" in stage:
        line += f"; inner attack: {_attack_text(stage['inner_attack'])}"
    return line


def _training_lines(training):
    """The training section of the Markdown card (every value from `training`)."""
    stage2, stage1, classifier = training["stage2"], training["stage1"], training["classifier"]
    lines = []
    if isinstance(stage2, dict):
        head = f"- Stage 2: objective {stage2['objective']}, trains the {stage2['trainable']}"
        lines.append(_stage_line(head, stage2))
    else:
        lines.append(f"- Stage 2 training: {stage2}")
    lines.append(
        f"- Stage 1: {_budget_text(stage1)}" if isinstance(stage1, dict) else f"- Stage 1: {stage1}"
    )
    if isinstance(classifier, dict):
        head = f"- Classifier training: objective {classifier['objective']}"
        lines.append(_stage_line(head, classifier))
    else:
        lines.append(f"- Classifier training: {classifier} (not trained by s2s_tf, or no config)")
    return lines


def _provenance_lines(evaluation):
    """A warning unless the report is shown to have evaluated the exported bytes."""
    same, evaluated = evaluation["evaluated_model_is_exported"], evaluation["evaluated_model"]
    if same is None:
        return [
            f"WARNING: the report records no content hash of `{evaluated}`, so whether its "
            "numbers describe this version is unknown."
        ]
    if not same:
        return [
            f"WARNING: the report evaluated `{evaluated}`, whose bytes (SHA-256) differ from "
            "the exported model files; its numbers do not describe this version."
        ]
    return []


def _convergence_lines(evaluation):
    converged = evaluation.get("converged", NOT_EVALUATED)
    if converged is False:
        head = "Robust accuracy: NOT CONVERGED (more attack effort still fooled more examples)."
    elif converged is True:
        head = "Robust accuracy: converged (more attack effort fooled no more examples)."
    elif converged is None:
        head = "Robust accuracy: convergence undecided (too few discordant pairs, or no reruns)."
    else:
        return [f"Convergence: {converged}."]
    lines = [head]
    for eps in sorted(evaluation.get("convergence") or {}, key=_eps_order):
        row = evaluation["convergence"][eps]
        state = {True: "converged", False: "NOT CONVERGED", None: "undecided"}.get(
            row.get("converged"), str(row.get("converged"))
        )
        lines.append(f"- {eps} ({row.get('source') or 'n/a'}): {state}")
        deciding = row.get("deciding")
        for what in [w for w in row if w.startswith("more_")]:
            earlier = deciding is not None and what not in deciding
            note = " (an earlier round, not deciding: the next round reruns what it left)"
            lines.append(
                f"  - {what.replace('_', ' ')}{note if earlier else ''}: {row[what]['detail']}"
            )
    return lines


def _robust_lines(robust):
    if not isinstance(robust, dict):
        return [str(robust)]
    rows = ["| eps | robust accuracy | 95% CI | attack runs |", "|---|---|---|---|"]
    for eps in sorted(robust, key=_eps_order):
        row = robust[eps]
        low, high = (row.get("ci95") or [None, None])[:2]
        interval = f"{_pct(low)}-{_pct(high)}" if low is not None else "n/a"
        runs = len(row.get("runs", []))
        rows.append(f"| {eps} | {_pct(row.get('robust_accuracy'))} | {interval} | {runs} |")
    return rows


def _eps_order(key):
    """Sorts eps keys such as "8/255" by value (JSON files list them as text)."""
    numerator, _, denominator = str(key).partition("/")
    try:
        return (0, float(numerator) / float(denominator or 1), str(key))
    except ValueError:
        return (1, 0.0, str(key))


def _check_lines(checks):
    if not isinstance(checks, dict):
        return [str(checks)]
    counts = ", ".join(f"{len(checks[s])} {s}" for s in (FAILED, UNDECIDED, NOT_RUN))
    lines = [f"{checks['passed']} passed, {counts}."]
    for status in (FAILED, UNDECIDED, NOT_RUN):
        lines += [f"- {status.upper()}: {c['name']}: {c['detail']}" for c in checks[status]]
    return lines


def write_card(directory, card):
    """Writes `model_card.json` and `model_card.md` into `directory`; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    paths = (os.path.join(directory, CARD_JSON), os.path.join(directory, CARD_MARKDOWN))
    with open(paths[0], "w", encoding="utf-8") as f:
        json.dump(card, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(paths[1], "w", encoding="utf-8") as f:
        f.write(markdown(card))
    return paths
