"""Library entry point of the evaluation binary: load models, attack, analyse, report.

    eval_lib.evaluate(config, outdir)

loads the defended model (stage 2's `defended.keras`, or an autoencoder and a
classifier), runs `evaluation.Evaluator` over the configured threat models on
the split, streamed in resumable shards (`streaming`), the gradient analysis
of the classifier alone vs the defended model, the sanity checks, and writes
`robustness.json`, `report.md`, the plots and TensorBoard summaries into `outdir`.
"""

import contextlib
import dataclasses
import os

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from s2s_tf import config_io
from s2s_tf import data as data_lib
from s2s_tf.analysis import baselines as baselines_lib
from s2s_tf.analysis import claims
from s2s_tf.analysis import gradient_analysis
from s2s_tf.analysis import report
from s2s_tf.config_io import setting
from s2s_tf.models import s2s_model
from s2s_tf.robustness import checks as checks_lib
from s2s_tf.robustness import evaluation
from s2s_tf.robustness import sharded as sharded_lib
from s2s_tf.robustness import streaming


@dataclasses.dataclass(frozen=True)
class EvalRunConfig:
    """One evaluation run.

    Attributes:
      data: the evaluation split (its `num_examples` bounds the examples read).
      defended_path: a defended `.keras` model (stage 2's `defended.keras`), or
        None to compose `autoencoder_path` and `classifier_path`.
      autoencoder_path: an autoencoder `.keras` (normalised space).
      classifier_path: a [0, 1]-input classifier `.keras`.
      transfer_classifiers: (name, path) pairs of further [0, 1]-input
        classifiers for the transfer matrix, undefended only (a "<name>+s2s"
        needs an S2SNet of its own: give it in `transfer_defended`).
      transfer_defended: (name, path) pairs of further defended models (each
        with its own S2SNet, e.g. stage 2 run against that classifier); each
        enters the matrix as "<name>+s2s" and its classifier as "<name>".
      baselines: input-transformation defenses (`baselines.BASELINES`) put in
        front of the same classifier and evaluated with the same attacks (claim 4).
      attack: the attack settings (`evaluation.EvalConfig`).
      stream: how the split is cut into shards (`streaming.StreamConfig`).
      gradient_examples: images used by the gradient analysis and the
        counterfactual test of claim 2 (>= 256 for a test of the claim).
      gradient_top_k: class logits compared per image for class specificity.
      reconstruction_autoencoder_path: the stage-1 autoencoder (.keras), the
        counterfactual "reconstruction only" model of claim 2; None leaves it out.
      effective_examples: examples of the effective-perturbation analysis (claim 3).
      relations_examples: the first examples of claim 5's transfer matrix.
      attack_preset: the `evaluation.PRESETS` entry `attack` was built from (for the report).
    """

    data: data_lib.DataConfig = data_lib.DataConfig(split="test", augment=False)
    defended_path: str | None = None
    autoencoder_path: str | None = None
    classifier_path: str | None = None
    transfer_classifiers: tuple = setting(
        (),
        "Further undefended classifiers for the transfer matrix: name=path,... (defended "
        "ones, each with its own S2SNet, go in --transfer_defended).",
        parse=config_io.parse_named_paths,
        unparse=config_io.unparse_named_paths,
    )
    transfer_defended: tuple = setting(
        (),
        "Further defended models, each with its own S2SNet, for the transfer matrix: name=path,...",
        parse=config_io.parse_named_paths,
        unparse=config_io.unparse_named_paths,
    )
    baselines: tuple = setting(
        ("jpeg", "bit_depth"),
        "Input-transformation baselines (claim 4) evaluated in front of the same classifier "
        "with the same attacks ('' for none).",
        choices=lambda: baselines_lib.BASELINES,
    )
    attack: evaluation.EvalConfig = evaluation.EvalConfig()
    stream: streaming.StreamConfig = streaming.StreamConfig()
    gradient_examples: int = setting(
        256, "Examples of the gradient analysis and the counterfactual test.", lower_bound=2
    )
    reconstruction_autoencoder_path: str | None = setting(
        None, "Stage-1 autoencoder (.keras): the reconstruction-only counterfactual of claim 2."
    )
    effective_examples: int = setting(
        64, "Examples of the effective-perturbation analysis (claim 3).", lower_bound=1
    )
    relations_examples: int = setting(
        200,
        "Examples of claim 5's transfer matrix, each model attacked at its strongest "
        "(defended ones through their surrogates).",
        lower_bound=2,
    )
    attack_preset: str = setting(
        "standard",
        "Attack suite: standard (AutoAttack-like, >= 500 examples) or fast (main job, CI); "
        "attack flags given explicitly override it.",
        choices=tuple(evaluation.PRESETS),
    )
    gradient_top_k: int = 5

    def model_paths(self):
        """Every model file this run reads (None where a path is not given)."""
        paths = [self.defended_path, self.autoencoder_path, self.classifier_path]
        return paths + [path for _, path in self._transfer_models()]

    def model_key(self, digests=None):
        """The models' identity in the shard keys: their files' bytes and the transfer
        models' names (`sharded.file_fingerprint`), not the paths they lie at.

        Args:
          digests: `s2s_model.file_digests(self.model_paths())`, if already computed.
        """
        names = [name for name, _ in self._transfer_models()]
        return sharded_lib.file_fingerprint(self.model_paths(), names, digests)

    def _transfer_models(self):
        """(name, path) of every further model of the transfer matrix."""
        return (*self.transfer_classifiers, *self.transfer_defended)

    def validate(self):
        """Raises ValueError / FileNotFoundError naming what is wrong or missing."""
        self.attack.validate()
        if not self.defended_path and not (self.autoencoder_path and self.classifier_path):
            raise ValueError("give defended_path, or both autoencoder_path and classifier_path")
        for path in self.model_paths():
            if path and not os.path.exists(path):
                raise FileNotFoundError(f"model file not found: {path}")


def load_models(config):
    """The models of a run.

    Returns:
      (`evaluation.Models`, the defended keras model, the purifier keras model,
      {"<name>+s2s": `claims.OwnS2S`} of the `transfer_defended` models).
    """
    if config.defended_path:
        defended = s2s_model.load_keras(config.defended_path, "defended model")
        autoencoder = s2s_model.get_autoencoder(defended)
        classifier = s2s_model.get_classifier(defended)
    else:
        autoencoder = s2s_model.load_keras(config.autoencoder_path, "autoencoder model")
        classifier = s2s_model.load_keras(config.classifier_path, "classifier model")
        defended = s2s_model.build_s2s_model(autoencoder, classifier)
    shape = defended.input_shape[1:]
    purifier = s2s_model.build_purifier(autoencoder, shape)
    others, own = {}, {}
    for name, path in config.transfer_classifiers:
        others[name] = _at_size(s2s_model.load_keras(path, f"transfer classifier {name}"), shape)
    for name, path in config.transfer_defended:
        other = s2s_model.load_keras(path, f"defended transfer model {name}")
        other_classifier = s2s_model.get_classifier(other)
        others[name] = _at_size(other_classifier, shape)
        others[f"{name}+s2s"] = _at_size(other, shape)
        own_shape = other.input_shape[1:]
        own_purifier = s2s_model.build_purifier(s2s_model.get_autoencoder(other), own_shape)
        size = None if tuple(own_shape[:2]) == tuple(shape[:2]) else tuple(own_shape[:2])
        own[f"{name}+s2s"] = claims.OwnS2S(
            evaluation.Models(other_classifier, other, own_purifier), size
        )
    models = evaluation.Models(
        classifier=classifier, defended=defended, purifier=purifier, others=others
    )
    return models, defended, purifier, own


def _at_size(model, shape):
    """`model` on images of `shape`: resized (bilinear, differentiable) when it takes another size.

    The paper's classifiers differ in input size (InceptionV3: 299 px, the others
    224 px); the transfer matrix feeds every model the evaluation's images, so a
    model of another size sees them resized inside its graph, and attacks on it
    differentiate through the resize.
    """
    size = tuple(model.input_shape[1:3])
    if size == tuple(shape[:2]) or None in size:
        return model
    inputs = keras.Input(shape)
    return keras.Model(inputs, model(keras.layers.Resizing(*size)(inputs)), name=f"{model.name}_at")


def _gradient_analysis(models, images, labels, top_k):
    result = gradient_analysis.compare_models(
        {"classifier": models.classifier, "defended": models.defended},
        images,
        labels,
        top_k=top_k,
    )
    summary, histograms = {}, {}
    for name, metrics in result["metrics"]["models"].items():
        stats = metrics["loss_gradient_statistics"]
        summary[name] = {
            "class_specificity": metrics["class_specificity"]["mean"],
            "structure_alignment": metrics["structure_alignment"]["mean"],
            "mean_abs": stats["mean_abs"],
            "std": stats["std"],
            "kurtosis": stats["kurtosis"],
            "near_zero_fraction": stats["near_zero_fraction"],
            "l2_norm_mean": stats["l2_norm_mean"],
        }
        histograms[name] = (stats["histogram"]["edges"], stats["histogram"]["counts"])
    return result, summary, histograms


def _tensorboard(outdir, results, gradients):
    writer = tf.summary.create_file_writer(os.path.join(outdir, "tensorboard"))
    with writer.as_default(step=0):
        for model, value in results["clean"].items():
            tf.summary.scalar(f"clean/{model}", value)
        for threat, table in results["threats"].items():
            for attack, by_eps in table.items():
                for eps, row in by_eps.items():
                    value = row.get("defended", row.get("robust_after"))
                    tf.summary.scalar(f"{threat}/{attack}/eps_{eps}", value)
        for eps, row in results.get("headline", {}).items():
            tf.summary.scalar(f"robust_accuracy/eps_{eps}", row["robust_accuracy"])
        for model, stats in gradients.items():
            for key, value in stats.items():
                tf.summary.scalar(f"gradients/{model}/{key}", value)
    writer.flush()


def evaluate(
    config, outdir, progress=logging.info, strategy=None, worker=None, image_size_given=False
):
    """Runs the whole evaluation and writes the report; returns the report document.

    The split streams through the attacks in shards (`streaming.evaluate_split`),
    written under `<outdir>/shards`: memory stays bounded whatever the split's
    size, a rerun continues where an interrupted one stopped, and several
    workers can share the shards.

    Args:
      config: an `EvalRunConfig`.
      outdir: where the report goes (e.g. `<workdir>/eval_report`).
      progress: callable(str) told about each unit of work.
      strategy: a `tf.distribute.Strategy` over this worker's devices to run the
        attacks on every replica; None runs them in this process, batch by batch.
      worker: this process's `streaming.Worker` among the processes sharing the
        shards (default: the only one); worker 0 merges them and writes the report.
      image_size_given: whether the user asked for `config.data.image_size`
        (e.g. an explicit --image_size): then a defended model of another input
        size is an error, not evaluated at its own size.

    Returns:
      The dict written to `robustness.json`; None on workers other than 0, once
      their shards are written.
    """
    config.validate()
    worker = worker or streaming.Worker()
    # The bytes evaluated, hashed before they are read: the export's model card compares them.
    model_files = s2s_model.file_digests(config.model_paths())
    model_key = config.model_key(model_files)
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        models, defended, purifier, own = load_models(config)
    data = dataclasses.replace(
        config.data,
        global_batch_size=config.attack.batch_size,
        image_size=tuple(defended.input_shape[1:3]),
    )
    if data.image_size != tuple(config.data.image_size):
        if image_size_given:
            raise ValueError(
                f"--image_size {config_io.unparse_image_size(config.data.image_size)} differs "
                f"from the defended model's input size "
                f"{config_io.unparse_image_size(data.image_size)}: the evaluation runs at the "
                "model's size; pass that or leave --image_size out"
            )
        progress(
            f"evaluating at the defended model's input size {data.image_size}, not the data "
            f"config's {tuple(config.data.image_size)}"
        )
    # The report records the data as evaluated (the model's size, the attack batch).
    config = dataclasses.replace(config, data=data)
    results = streaming.evaluate_split(
        models,
        data,
        config.attack,
        os.path.join(outdir, "shards"),
        stream=config.stream,
        worker=worker,
        strategy=strategy,
        model_key=model_key,
        progress=progress,
        summary_dir=os.path.join(outdir, "tensorboard"),
    )
    # Claim 4's baselines: the same split and attacks, in front of the same classifier.
    baseline_results = claims.baselines_claim(
        config.baselines,
        models.classifier,
        data,
        config.attack,
        os.path.join(outdir, "shards"),
        model_key=model_key,
        stream=config.stream,
        worker=worker,
        strategy=strategy,
        progress=progress,
    )
    if results is None:
        progress(f"worker {worker.index}: its shards are written; worker 0 writes the report")
        return None
    # The analyses below read a few examples; only they are held in memory.
    analysis_examples = max(
        config.gradient_examples, config.effective_examples, config.relations_examples
    )
    images, labels = data_lib.load_numpy(
        dataclasses.replace(data, num_examples=min(analysis_examples, results["num_examples"]))
    )
    attack = dataclasses.replace(config.attack, num_examples=None)
    evaluator = evaluation.Evaluator(models, images, labels, attack, progress)
    checks = checks_lib.sanity_checks(results, config.attack)
    progress(f"gradient analysis on {min(config.gradient_examples, len(images))} examples")
    n = min(config.gradient_examples, len(images))
    analysis, gradients, histograms = _gradient_analysis(
        models, images[:n], labels[:n], config.gradient_top_k
    )
    examples = _example_rows(evaluator, purifier, analysis)
    progress("claims: counterfactual gradients and effective perturbations")
    reconstruction = None
    if config.reconstruction_autoencoder_path:
        reconstruction = s2s_model.load_keras(
            config.reconstruction_autoencoder_path, "reconstruction autoencoder"
        )
    gradient_claims = claims.gradient_claims(models, images[:n], reconstruction)
    os.makedirs(outdir, exist_ok=True)
    effective, effective_plots = claims.effective_claim(
        evaluator, purifier, outdir, config.effective_examples
    )
    progress(
        f"claims: relations (claim 5) on {min(config.relations_examples, len(images))} examples"
    )
    relations_summary = claims.relations_claim(
        evaluator,
        list((results.get("transfer") or {}).get("matrices", {})),
        own,
        config.relations_examples,
    )
    document = {
        "config": config_io.config_to_dict(config),
        "model_files": model_files,
        "results": results,
        "checks": checks,
        "adaptive": checks_lib.adaptive_comparison(results, config.attack),
        "meta": {"preset": config.attack_preset},
        "gradients": gradients,
        "gradient_analysis": analysis["metrics"],
        "counterfactual": gradient_claims,
        "effective_perturbations": effective,
        "relations": relations_summary,
        "baselines": baseline_results,
    }
    paths = report.write_report(
        document, outdir, examples=examples, histograms=histograms, plots=effective_plots
    )
    _tensorboard(outdir, results, gradients)
    failed = [c["name"] for c in checks if c["passed"] is False]
    converged = {True: "converged", False: "NOT CONVERGED", None: "convergence undecided"}
    progress(
        f"report: {paths['markdown']} ({len(failed)} sanity check(s) failed; attacks "
        f"{converged[results.get('converged')]})"
    )
    return document


def _example_rows(evaluator, purifier, analysis):
    """Rows of the example figure: clean, adversarial, reconstruction, gradient."""
    k, config = 4, evaluator.config
    eps = max(config.eps)
    rows = {"clean": evaluator.images[:k]}
    # The examples of the strongest reference run (the one the convergence checks rerun).
    strongest = evaluator.results.get("convergence", {}).get(evaluation.eps_key(eps), {})
    key = evaluation.run_key(strongest.get("source") or "white_box", config.check_attack, eps)
    adversarial = evaluator.adversarial.get(key)
    if adversarial is None:  # sharded runs keep no images: remake the first few here
        adversarial = evaluator.attack(
            config.check_attack, evaluator.models.defended, eps, evaluator.images[:k]
        )
    rows[f"adversarial ({key})"] = adversarial[:k]
    rows["reconstruction"] = np.asarray(purifier(evaluator.images[:k], training=False))
    gradient = analysis["examples"]["loss_gradients"].get("defended")
    if gradient is not None and len(gradient) >= k:
        rows["gradient"] = gradient[:k]
    return rows
