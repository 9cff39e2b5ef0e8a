"""Library entry point of the export binary: trained models in, a TF Serving version out.

    path = export_lib.export(ExportConfig(export_base=..., defended_path=...))

loads the trained autoencoder and classifier (from a stage-2 `defended.keras`
or from two `.keras` files), builds the composite with
`s2s_model.build_s2s_model` and writes it with `keras.export.ExportArchive`
into TF Serving's layout:

    <export_base>/
      models.config            ModelServerConfig (base_path as the server sees it)
      batching_parameters      for --enable_batching
      <version>/               saved_model.pb, variables/, assets.extra/
        assets.extra/tf_serving_warmup_requests, export_config.json,
                     model_card.json, model_card.md (see `model_card`)

The version directory is written as `.tmp-<version>-<pid>-<hex>` beside its
target and renamed into place, so a server polling the base path (it loads
only all-digit names) never sees half a version; an existing version is
replaced only with `overwrite=True`. Directories left by a killed export are
removed (or, for a replaced version, restored) by the next export.

Each version's model card records what the version was made from
(`provenance.made_from`: the SHA-256 of the model files and of the report,
and the export's settings); `export_unless_current` reuses the latest version only when
that record equals the current one, so a retrained model or a rerun evaluation
always gets a new version.

The environment variable `S2S_EXPORT_PAUSE_BEFORE_RENAME` (seconds) makes an
export sleep once its temporary directory is complete, before the rename;
tests use it to kill an export at that point.
"""

import dataclasses
import json
import os
import re
import shutil
import time
import uuid

import keras
from absl import logging

from s2s_tf import config_io
from s2s_tf import constants
from s2s_tf.config_io import setting
from s2s_tf.export import model_card
from s2s_tf.export import provenance
from s2s_tf.export import serving_files
from s2s_tf.export import signatures
from s2s_tf.models import s2s_model
from s2s_tf.models import torch_convert

# Where the training binary leaves its final models (see `s2s_tf.train_lib`).
CONFIG_FILE = "export_config.json"
PAUSE_ENV = "S2S_EXPORT_PAUSE_BEFORE_RENAME"
_PARTIAL = re.compile(r"^\.(tmp|old)-(\d+)-(\d+)-[0-9a-f]+$")


def _check_model_name(name):
    if not constants.MODEL_NAME_PATTERN.match(name or ""):
        raise ValueError("--model_name must be letters, digits, '_', '.' or '-'")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """One export (written to `<version>/assets.extra/export_config.json`).

    Attributes:
      export_base: the model's base path; versions are its subdirectories.
      defended_path: a `.keras` composite from `build_s2s_model` (stage 2's
        `defended.keras`), or None to use the two paths below.
      autoencoder_path: a `.keras` autoencoder (normalised space).
      classifier_path: a `.keras` classifier on [0, 1] images.
      version: the version number; None takes the next free one.
      overwrite: replace an existing version.
      model_name: the model's name in `models.config` and the warm-up requests.
      image_size: (H, W) to serve at; None takes the classifier's input size
        (needed when the classifier accepts any size).
      top_k: classes reported by `top_k_scores`/`top_k_classes`.
      out_of_range: "clip" or "error" for float inputs outside [0, 1].
      max_image_bytes: the largest encoded image `predict_image_bytes` accepts.
      max_image_size: the largest height/width (pixels) of an encoded image.
      max_batch_size: `batching_parameters`' largest merged batch.
      batch_timeout_micros: how long the server waits to fill a batch.
      num_batch_threads: threads that run merged batches.
      warmup_batch_sizes: batch sizes of the warm-up requests.
      serving_base_path: `export_base` as the server sees it (e.g. inside the
        container); None means "/models/<model_name>".
      report_path: the robustness report (robustness.json) whose numbers go into
        the model card; None takes `<workdir>/eval_report/robustness.json` when
        the models are in a workdir's stage folder and that report exists.
    """

    export_base: str = ""
    defended_path: str | None = None
    autoencoder_path: str | None = None
    classifier_path: str | None = None
    version: int | None = setting(
        None, "Version number; default: the next free one.", lower_bound=1, kind="int"
    )
    overwrite: bool = setting(False, "Replace the version if it exists.")
    model_name: str = setting(
        "s2s", "Model name in models.config and warm-up requests.", check=_check_model_name
    )
    image_size: tuple[int, int] | None = setting(
        None,
        "'S' or 'H,W'; default: the classifier's input size.",
        parse=config_io.parse_image_size,
        unparse=config_io.unparse_image_size,
    )
    top_k: int = setting(5, "Classes reported by top_k_scores/top_k_classes.", lower_bound=1)
    out_of_range: str = setting(
        "clip",
        "Float inputs outside [0, 1]: clip them, or reject the request (NaN/Inf always fail).",
        choices=constants.OUT_OF_RANGE_MODES,
    )
    max_image_bytes: int = setting(
        10 * 2**20, "Largest encoded image predict_image_bytes accepts.", lower_bound=1
    )
    max_image_size: int = setting(
        4096, "Largest height or width (pixels) of an encoded image.", lower_bound=1
    )
    max_batch_size: int = setting(32, "batching_parameters: largest merged batch.", lower_bound=1)
    batch_timeout_micros: int = setting(
        1000, "batching_parameters: wait to fill a batch.", lower_bound=0
    )
    num_batch_threads: int = setting(4, "batching_parameters: batch threads.", lower_bound=1)
    warmup_batch_sizes: tuple[int, ...] = setting(
        (1,),
        "Batch sizes of the warm-up requests.",
        parse=lambda text: config_io.parse_int_list(text, "warmup_batch_sizes"),
        unparse=lambda sizes: ",".join(str(s) for s in sizes),
    )
    serving_base_path: str | None = setting(
        None, "--export_base as the server sees it; default /models/<name>."
    )
    report_path: str | None = setting(
        None,
        "robustness.json whose numbers go into the model card; default: the workdir's "
        "eval_report/robustness.json when it exists.",
    )

    def validate(self):
        """Raises ValueError naming the first invalid field."""
        if not self.export_base:
            raise ValueError("export_base is required")
        parts = (self.autoencoder_path, self.classifier_path)
        if bool(self.defended_path) == any(parts) or (any(parts) and not all(parts)):
            raise ValueError("give defended_path, or both autoencoder_path and classifier_path")
        if self.version is not None and self.version < 1:
            raise ValueError(f"version must be >= 1, got {self.version}")
        if not constants.MODEL_NAME_PATTERN.match(self.model_name):
            raise ValueError(
                f"model_name must be letters, digits, '_', '.', '-': {self.model_name!r}"
            )
        if min(self.max_batch_size, self.num_batch_threads, *self.warmup_batch_sizes) < 1:
            raise ValueError(
                "max_batch_size, num_batch_threads and warmup_batch_sizes must be >= 1"
            )
        if self.batch_timeout_micros < 0:
            raise ValueError("batch_timeout_micros must be >= 0")
        self.signature_options((1, 1)).validate()
        if self.image_size is not None:
            self.signature_options(self.image_size).validate()

    def signature_options(self, image_size):
        """The `signatures.SignatureOptions` of this config at `image_size`."""
        return signatures.SignatureOptions(
            image_size=tuple(image_size),
            top_k=self.top_k,
            out_of_range=self.out_of_range,
            max_image_bytes=self.max_image_bytes,
            max_image_size=self.max_image_size,
        )


@dataclasses.dataclass(frozen=True)
class ServingModels:
    """The three models behind the signatures, sharing the trained weights."""

    defended: keras.Model
    purifier: keras.Model
    classifier: keras.Model
    image_size: tuple[int, int]


def default_sources(workdir):
    """Model paths in a training workdir: stage 2's composite, else its two parts.

    Returns:
      A dict of `ExportConfig` source fields.
    """
    defended = constants.defended_path(workdir)
    parts = [constants.autoencoder_path(workdir, "stage2"), constants.classifier_path(workdir)]
    if not os.path.exists(defended) and all(os.path.exists(p) for p in parts):
        return {"autoencoder_path": parts[0], "classifier_path": parts[1]}
    return {"defended_path": defended}


def load_models(config):
    """Loads (autoencoder, classifier) from the config's files.

    The autoencoder is a `.keras` file or the authors' PyTorch checkpoint
    (`torch_convert.CHECKPOINT_SUFFIXES`, converted on load).
    """
    if config.defended_path:
        defended = s2s_model.load_keras(config.defended_path, "defended model")
        return s2s_model.get_autoencoder(defended), s2s_model.get_classifier(defended)
    autoencoder = torch_convert.load_autoencoder(config.autoencoder_path)
    return autoencoder, s2s_model.load_keras(config.classifier_path, "classifier")


def build_serving_models(autoencoder, classifier, image_size=None):
    """Builds the composite, the purifier and the classifier at one input size.

    Raises:
      ValueError: when no size is known, or `image_size` contradicts the classifier's.
    """
    model_size = tuple(classifier.input_shape[1:3])
    if image_size is not None:
        image_size = tuple(image_size)
        if any(m is not None and m != s for m, s in zip(model_size, image_size, strict=True)):
            raise ValueError(f"image_size {image_size} differs from the classifier's {model_size}")
    size = image_size or model_size
    if None in size:
        raise ValueError("the classifier accepts any size: give image_size")
    input_shape = (*size, classifier.input_shape[-1])
    return ServingModels(
        defended=s2s_model.build_s2s_model(autoencoder, classifier, input_shape),
        purifier=s2s_model.build_purifier(autoencoder, input_shape),
        classifier=classifier,
        image_size=size,
    )


def write_saved_model(models, path, options):
    """Writes the four signatures of `models` to `path` with `keras.export.ExportArchive`."""
    archive = keras.export.ExportArchive()
    for model in (models.defended, models.purifier, models.classifier):
        archive.track(model)
    endpoints = signatures.serving_endpoints(
        models.defended, models.purifier, models.classifier, options
    )
    for name, (fn, input_signature) in endpoints.items():
        archive.add_endpoint(name, fn, input_signature=input_signature)
    archive.write_out(path, verbose=False)
    return path


def versions(export_base):
    """The version numbers present under `export_base` (all-digit directories)."""
    if not os.path.isdir(export_base):
        return []
    names = os.listdir(export_base)
    return sorted(
        int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(export_base, n))
    )


def next_version(export_base):
    """One more than the highest version present, or 1."""
    return max(versions(export_base), default=0) + 1


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_partial_exports(export_base):
    """Removes what killed exports left: temporary versions, and restores replaced ones."""
    for name in sorted(os.listdir(export_base)):
        match = _PARTIAL.match(name)
        if not match or _alive(int(match.group(3))):
            continue
        path = os.path.join(export_base, name)
        target = os.path.join(export_base, match.group(2))
        if match.group(1) == "old" and not os.path.exists(target):
            os.rename(path, target)  # the replacement never landed: keep the old version
        else:
            shutil.rmtree(path, ignore_errors=True)


def _move_into_place(tmp, target, overwrite):
    """Renames `tmp` to `target`; with `overwrite` an existing target is swapped out first."""
    if not os.path.exists(target):
        os.rename(tmp, target)
        return
    if not overwrite:
        raise FileExistsError(f"version exists (pass overwrite to replace it): {target}")
    base, version = os.path.split(target)
    old = os.path.join(base, f".old-{version}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def report_path(config):
    """The report of `config`'s model card: the given one, or the workdir's if it exists.

    Raises:
      FileNotFoundError: when `config.report_path` is given and missing.
    """
    if config.report_path:
        if not os.path.exists(config.report_path):
            raise FileNotFoundError(f"robustness report not found: {config.report_path}")
        return config.report_path
    default = model_card.default_report_path(config.defended_path or config.autoencoder_path)
    return default if default and os.path.exists(default) else None


def recorded_provenance(version_dir):
    """The provenance in a version's model card, or None when it has none."""
    path = os.path.join(version_dir, serving_files.WARMUP_DIR, model_card.CARD_JSON)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("provenance")
    except (OSError, ValueError, AttributeError):
        return None


def current_version(config):
    """The latest version's directory if it was made from exactly what `config` gives now.

    Returns:
      The directory, or None when there is no version, or the latest one was
      made from other model bytes, another report (or none) or other settings.
    """
    config.validate()
    existing = versions(config.export_base)
    if not existing:
        return None
    latest = os.path.join(config.export_base, str(existing[-1]))
    if recorded_provenance(latest) != provenance.made_from(config, report_path(config)):
        return None
    return latest


def export_unless_current(config):
    """`export(config)` unless the latest version is `current_version`; returns its directory."""
    latest = current_version(config)
    if latest:
        logging.info("reusing export version %s: same models, report and settings", latest)
        return latest
    return export(config)


def _write_model_card(config, directory, parts, image_size, report, made_from):
    autoencoder, classifier = parts
    card = model_card.build_card(
        provenance.sources(config), autoencoder, classifier, image_size, report, made_from
    )
    return model_card.write_card(os.path.join(directory, serving_files.WARMUP_DIR), card)


def export(config):
    """Exports the defended model as one TF Serving version.

    Args:
      config: an `ExportConfig`.

    Returns:
      The path of the version directory.

    Raises:
      ValueError: for an invalid config.
      FileNotFoundError: when a model file or the given report is missing.
      FileExistsError: when the version exists and `overwrite` is off.
    """
    config.validate()
    report = report_path(config)
    base = config.export_base
    if os.path.isdir(base):
        clean_partial_exports(base)
    version = config.version or next_version(base)
    target = os.path.join(base, str(version))
    if os.path.exists(target) and not config.overwrite:
        raise FileExistsError(f"version exists (pass overwrite to replace it): {target}")
    autoencoder, classifier = load_models(config)
    made_from = provenance.made_from(config, report)
    models = build_serving_models(autoencoder, classifier, config.image_size)
    os.makedirs(base, exist_ok=True)
    tmp = os.path.join(base, f".tmp-{version}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write_saved_model(models, tmp, config.signature_options(models.image_size))
        requests = serving_files.warmup_requests(
            config.model_name, models.image_size, config.warmup_batch_sizes
        )
        serving_files.write_warmup_requests(tmp, requests)
        with open(
            os.path.join(tmp, serving_files.WARMUP_DIR, CONFIG_FILE), "w", encoding="utf-8"
        ) as f:
            json.dump(dataclasses.asdict(config), f, indent=2, sort_keys=True)
        parts = (autoencoder, classifier)
        _write_model_card(config, tmp, parts, models.image_size, report, made_from)
        serving_files.write_model_server_config(
            base, config.model_name, config.serving_base_path or f"/models/{config.model_name}"
        )
        serving_files.write_batching_parameters(
            base, config.max_batch_size, config.batch_timeout_micros, config.num_batch_threads
        )
        if os.environ.get(PAUSE_ENV):
            time.sleep(float(os.environ[PAUSE_ENV]))
        _move_into_place(tmp, target, config.overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
