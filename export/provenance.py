"""What an exported version was made from, by content: SHA-256 of model files and report.

    record = provenance.made_from(export_config, report_path)
    provenance.evaluated_is_exported(report, sources, record["model_files"])

Paths say where a file was, not what it held: a model retrained in place, or a
report rerun beside it, keeps its path. So an export records the SHA-256 of
the model files it read and of the robustness report whose numbers go into
its model card, and the evaluation records the SHA-256 of the files it
evaluated (`robustness.json`'s "model_files", `s2s_model.file_digests`). The
card compares the two; the export library reuses a version only when its
record equals the current one.
"""

import dataclasses
import json

import s2s_tf
from s2s_tf.models import s2s_model

# The model-file fields of an export (and of an evaluation's config).
SOURCE_KEYS = ("defended_path", "autoencoder_path", "classifier_path")
# Settings that name a version rather than shape it.
_NOT_RECORDED = ("version", "overwrite")


def model_sources(paths):
    """The model files of an export or an evaluation: the composite, else its two parts.

    Args:
      paths: a dict with `SOURCE_KEYS` entries (an export's sources or a report's config).
    """
    paths = paths or {}
    if paths.get("defended_path"):
        return [paths["defended_path"]]
    return [paths[key] for key in ("autoencoder_path", "classifier_path") if paths.get(key)]


def sources(config):
    """The `SOURCE_KEYS` fields of an `export_lib.ExportConfig`."""
    return {key: getattr(config, key) for key in SOURCE_KEYS}


def made_from(config, report_path):
    """The record of what an export of `config` is made from (stored in its model card).

    Args:
      config: an `export_lib.ExportConfig`.
      report_path: the robustness.json going into the card, or None.

    Returns:
      {"model_files": {path: sha256}, "report": {"path", "sha256"} or None,
      "settings": the config without version/overwrite, "s2s_tf": the version}.

    Raises:
      FileNotFoundError: naming a model file that does not exist.
    """
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_RECORDED}
    report = None
    if report_path:
        report = {"path": report_path, "sha256": s2s_model.file_sha256(report_path)}
    return {
        "model_files": s2s_model.file_digests(model_sources(sources(config))),
        "report": report,
        # Through JSON, so it equals what a card read back holds (lists, not tuples).
        "settings": json.loads(json.dumps(settings)),
        "s2s_tf": s2s_tf.__version__,
    }


def evaluated_is_exported(report, export_sources, exported):
    """Whether a report evaluated the exported bytes.

    Args:
      report: a robustness.json document (its "config" names the evaluated
        files, its "model_files" holds their SHA-256).
      export_sources: the export's `SOURCE_KEYS` paths.
      exported: {path: sha256} of the exported files (`made_from`'s "model_files").

    Returns:
      {"evaluated_model": the evaluated paths (or "unknown"), "evaluated_sha256":
      {path: sha256 or None}, "evaluated_model_is_exported": True when the
      evaluated and exported files hold the same bytes, False when they differ,
      None when the report records no hash of an evaluated file}.
    """
    evaluated_paths = model_sources(report.get("config"))
    recorded = report.get("model_files") or {}
    evaluated = {path: recorded.get(path) for path in evaluated_paths}
    out = {"evaluated_model": evaluated_paths or "unknown", "evaluated_sha256": evaluated}
    if not evaluated_paths or None in evaluated.values():
        out["evaluated_model_is_exported"] = None
    else:
        wanted = sorted(exported[path] for path in model_sources(export_sources))
        out["evaluated_model_is_exported"] = sorted(evaluated.values()) == wanted
    return out
