"""The library's enums and the workdir layout, written once for the library, flags and tests.

A run's workdir (see ARCHITECTURE.md):

    workdir/stage0/classifier.keras      stage 0 (the classifier, [0, 1] input)
    workdir/stage1/autoencoder.keras     stage 1 (reconstruction)
    workdir/stage2/autoencoder.keras     stage 2 (fine-tuned decoder)
    workdir/stage2/defended.keras        stage 2 composite, [0, 1] image -> logits
    workdir/eval_report/                 robustness.json, report.md, plots
    workdir/export/<version>/            the defended SavedModel for TF Serving

`flags/` imports these names (flags -> library); the library never imports flags.
"""

import os
import re

STAGES = ("stage0", "stage1", "stage2")
STRATEGIES = ("mirrored", "multi_worker", "one_device")
# How the serving signatures treat pixels outside [0, 1]: clip them, or reject the request.
OUT_OF_RANGE_MODES = ("clip", "error")
# TF Serving model names (also directory names): no path separators, no leading dot.
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

CLASSIFIER_FILE = "classifier.keras"
AUTOENCODER_FILE = "autoencoder.keras"
DEFENDED_FILE = "defended.keras"
EVAL_REPORT_DIR = "eval_report"
REPORT_JSON = "robustness.json"
EXPORT_DIR = "export"


def stage_dir(workdir, stage):
    """`workdir/<stage>`: checkpoints, flags.json and the stage's final models."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    return os.path.join(workdir, stage)


def classifier_path(workdir):
    """Stage 0's classifier (.keras, [0, 1] input)."""
    return os.path.join(stage_dir(workdir, "stage0"), CLASSIFIER_FILE)


def autoencoder_path(workdir, stage="stage1"):
    """The autoencoder of stage 1 (reconstruction) or stage 2 (fine-tuned decoder)."""
    return os.path.join(stage_dir(workdir, stage), AUTOENCODER_FILE)


def defended_path(workdir):
    """Stage 2's composite defended model (.keras, [0, 1] image -> logits)."""
    return os.path.join(stage_dir(workdir, "stage2"), DEFENDED_FILE)


def eval_report_dir(workdir):
    """Where the robustness evaluation writes its report."""
    return os.path.join(workdir, EVAL_REPORT_DIR)


def report_json(outdir):
    """The robustness report's JSON file in an evaluation's output folder."""
    return os.path.join(outdir, REPORT_JSON)


def export_base(workdir):
    """The base path of exported SavedModel versions (`<base>/<version>/`)."""
    return os.path.join(workdir, EXPORT_DIR)
