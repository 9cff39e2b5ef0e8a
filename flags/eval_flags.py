"""Flags of the evaluation binary (`s2s_tf.evaluate_main`)."""

import os

from absl import flags

from s2s_tf.flags import common_flags

THREAT_MODELS = ("gray_box", "white_box", "bpda", "transfer", "gradient_free")


def parse_eps_list(text):
    """Parses "2/255,4/255,0.03" into floats in [0, 1].

    Raises:
      ValueError: naming --eps for an item that is not a number or a fraction a/b in [0, 1].
    """
    values = []
    for item in text.split(","):
        try:
            num, _, den = item.strip().partition("/")
            value = float(num) / (float(den) if den else 1.0)
        except (ValueError, ZeroDivisionError):
            raise ValueError(
                f"--eps items must be numbers or fractions like 8/255, got {item!r}"
            ) from None
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"--eps values are in [0, 1] pixel units, got {item!r}")
        values.append(value)
    return tuple(values)


def parse_named_paths(text):
    """Parses "vgg=/a.keras,lenet=/b.keras" into (("vgg", "/a.keras"), ...)."""
    pairs = []
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--transfer_classifiers items must be name=path, got {item!r}")
        pairs.append((name, path))
    return tuple(pairs)


def _check_list(name, allowed):
    def check(values):
        unknown = [v for v in values if v not in allowed]
        if unknown:
            raise flags.ValidationError(
                f"--{name}: unknown {unknown}; choose from {sorted(allowed)}"
            )
        return True

    flags.register_validator(name, check)


def define_eval_flags(dataset_names, attack_names):
    """Defines every flag of the evaluation binary.

    Args:
      dataset_names: the data registry's names.
      attack_names: the attack registry's names.
    """
    common_flags.define_workdir_flag(required=False)
    common_flags.define_data_flags(dataset_names)
    flags.DEFINE_string("eval_split", "test", "Split the examples come from.")
    flags.DEFINE_string(
        "defended_path", None, "Defended .keras model; default <workdir>/stage2/defended.keras."
    )
    flags.DEFINE_string("autoencoder_path", None, "Autoencoder .keras (with --classifier_path).")
    flags.DEFINE_string("classifier_path", None, "[0, 1]-input classifier .keras.")
    flags.DEFINE_string(
        "transfer_classifiers", "", "Further classifiers for the transfer matrix: name=path,..."
    )
    flags.DEFINE_string("output_dir", None, "Report directory; default <workdir>/eval_report.")
    flags.DEFINE_list("attacks", ["fgsm", "pgd"], "Gradient attacks to run.")
    _check_list("attacks", attack_names)
    flags.DEFINE_string("eps", "2/255,4/255,8/255,16/255", "L-inf budgets (pixel units).")
    flags.DEFINE_list("threat_models", list(THREAT_MODELS), "Threat models to evaluate.")
    _check_list("threat_models", THREAT_MODELS)
    flags.DEFINE_integer("num_examples", 500, "Examples attacked.", lower_bound=1)
    flags.DEFINE_integer("steps", 10, "Iterations of iterative attacks.", lower_bound=1)
    flags.DEFINE_integer("restarts", 1, "Random restarts of PGD.", lower_bound=1)
    flags.DEFINE_integer("spsa_examples", 50, "Examples for SPSA (slow).", lower_bound=1)
    flags.DEFINE_integer(
        "gradient_examples", 64, "Examples of the gradient analysis.", lower_bound=2
    )
    common_flags.register_parser_check("eps", parse_eps_list)
    common_flags.register_parser_check("transfer_classifiers", parse_named_paths)

    @flags.multi_flags_validator(
        ["workdir", "defended_path", "autoencoder_path", "classifier_path"],
        message="give --workdir (with a finished stage 2), --defended_path, or both "
        "--autoencoder_path and --classifier_path; the model files must exist",
    )
    def _has_models(values):
        if values["autoencoder_path"] or values["classifier_path"]:
            paths = [values["autoencoder_path"], values["classifier_path"]]
        else:
            default = values["workdir"] and os.path.join(
                values["workdir"], "stage2", "defended.keras"
            )
            paths = [values["defended_path"] or default]
        return all(p and os.path.exists(p) for p in paths)
