"""Flags of the export binary (`s2s_tf.export.export_saved_model_main`).

`define_export_flags()` defines where the trained models come from, where the
TF Serving versions go and how the signatures treat their inputs. Everything
that can be checked without loading a model is checked here, at parse time.
"""

from absl import flags

from s2s_tf.export import export_lib
from s2s_tf.flags import common_flags
from s2s_tf.flags import config_flags


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
    config_flags.define(export_lib.ExportConfig)
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
