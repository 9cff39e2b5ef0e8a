"""Flags of the export binary (`s2s_tf.export.export_saved_model_main`).

`define_export_flags()` defines where the trained models come from, where the
TF Serving versions go and how the signatures treat their inputs. Everything
that can be checked without loading a model is checked here, at parse time.
"""

import re

from absl import flags

from s2s_tf.flags import common_flags

OUT_OF_RANGE_MODES = ("clip", "error")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def parse_batch_sizes(text):
    """Parses "1,32" into (1, 32)."""
    return common_flags.parse_int_list(text, "warmup_batch_sizes")


def define_export_flags():
    """Defines every flag of the export binary."""
    common_flags.define_workdir_flag(required=False)
    flags.DEFINE_string(
        "defended_path",
        None,
        "A .keras composite (stage 2's defended.keras); default: <workdir>/stage2/defended.keras.",
    )
    flags.DEFINE_string("autoencoder_path", None, "A .keras autoencoder (with --classifier_path).")
    flags.DEFINE_string(
        "init_from",
        None,
        "Instead of --autoencoder_path: the authors' released S2SNet, as converted by "
        "s2s_tf.convert_main (.keras) or their .pth/.pt/.npz/.safetensors checkpoint.",
    )
    flags.DEFINE_string(
        "classifier_path", None, "A .keras [0, 1]-input classifier (with --autoencoder_path)."
    )
    flags.DEFINE_string("export_base", None, "TF Serving base path; default <workdir>/export.")
    flags.DEFINE_integer("version", None, "Version number; default: the next free one.", 1)
    flags.DEFINE_boolean("overwrite", False, "Replace the version if it exists.")
    flags.DEFINE_string("model_name", "s2s", "Model name in models.config and warm-up requests.")
    flags.register_validator(
        "model_name",
        lambda v: bool(_MODEL_NAME.match(v or "")),
        message="--model_name must be letters, digits, '_', '.' or '-'",
    )
    flags.DEFINE_string(
        "serving_base_path", None, "--export_base as the server sees it; default /models/<name>."
    )
    flags.DEFINE_string("image_size", None, "'S' or 'H,W'; default: the classifier's input size.")
    common_flags.register_parser_check("image_size", common_flags.parse_image_size)
    flags.DEFINE_integer("top_k", 5, "Classes reported by top_k_scores/top_k_classes.", 1)
    flags.DEFINE_enum(
        "out_of_range",
        "clip",
        OUT_OF_RANGE_MODES,
        "Float inputs outside [0, 1]: clip them, or reject the request (NaN/Inf always fail).",
    )
    flags.DEFINE_integer(
        "max_image_bytes", 10 * 2**20, "Largest encoded image predict_image_bytes accepts.", 1
    )
    flags.DEFINE_integer(
        "max_image_size", 4096, "Largest height or width (pixels) of an encoded image.", 1
    )
    flags.DEFINE_integer("max_batch_size", 32, "batching_parameters: largest merged batch.", 1)
    flags.DEFINE_integer(
        "batch_timeout_micros", 1000, "batching_parameters: wait to fill a batch.", 0
    )
    flags.DEFINE_integer("num_batch_threads", 4, "batching_parameters: batch threads.", 1)
    flags.DEFINE_string("warmup_batch_sizes", "1", "Batch sizes of the warm-up requests.")
    common_flags.register_parser_check("warmup_batch_sizes", parse_batch_sizes)
    _register_source_validator()


def _register_source_validator():
    names = [
        "workdir",
        "defended_path",
        "autoencoder_path",
        "init_from",
        "classifier_path",
        "export_base",
    ]

    @flags.multi_flags_validator(names)
    def _check_sources(values):
        if values["init_from"] and values["autoencoder_path"]:
            raise flags.ValidationError("give --init_from or --autoencoder_path, not both")
        parts = [values["autoencoder_path"] or values["init_from"], values["classifier_path"]]
        if values["defended_path"] and any(parts):
            raise flags.ValidationError(
                "give --defended_path or --autoencoder_path/--classifier_path, not both"
            )
        if any(parts) and not all(parts):
            raise flags.ValidationError("--autoencoder_path and --classifier_path go together")
        if not (values["defended_path"] or all(parts) or values["workdir"]):
            raise flags.ValidationError(
                "give --workdir, --defended_path, or --autoencoder_path and --classifier_path"
            )
        if not (values["export_base"] or values["workdir"]):
            raise flags.ValidationError("give --export_base (or --workdir for <workdir>/export)")
        return True
