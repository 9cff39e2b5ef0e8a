"""Robustness evaluation of an S2SNet-defended classifier: every threat model, per example.

All images are float32 in [0, 1] and every eps is in pixel units. The threat
models (who attacks which model, see `threat_models`) run each of their attacks
at each eps; every run keeps, per example, whether the defended model still
classifies the adversarial image correctly. The headline number at each eps is
the per-example worst case over every attack and threat model run there
(AutoAttack's robust accuracy), with a 95 % Wilson interval; `checks` then
compares runs pairwise with exact McNemar tests.

`PRESETS` holds the attack suites: "standard" (AutoAttack-like: APGD-CE and
APGD-T at 100 steps, Square, BPDA- and surrogate-APGD, >= 500 examples) and
"fast" (the same attacks with fewer steps and queries, for the main job and CI).
"""

import dataclasses
import time

import numpy as np
from absl import logging

from s2s_tf import config_io
from s2s_tf.config_io import setting
from s2s_tf.robustness import attacks as attacks_lib
from s2s_tf.robustness import runner
from s2s_tf.robustness import stats
from s2s_tf.robustness import threat_models

Models = threat_models.Models


def _check_attacks(names):
    unknown = [a for a in names if a not in attacks_lib.ATTACKS]
    if unknown:
        raise ValueError(f"unknown attacks {unknown}; known: {sorted(attacks_lib.ATTACKS)}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What to attack and how (the defaults are the "standard" preset).

    Attributes:
      attacks: attacks of the gray-box and white-box threat models.
      adaptive_attacks: attacks of the BPDA and surrogate threat models.
      gradient_free_attacks: attacks of the gradient-free threat model.
      eps: L-inf budgets in [0, 1] pixel units (L2 attacks scale them, see `l2_eps_scale`).
      threat_models: names of `threat_models.THREATS`.
      num_examples: evaluation examples (None: all of them).
      batch_size: attack batch size.
      steps: iterations of the iterative gradient attacks.
      restarts: random restarts of the stochastic attacks.
      target_classes: APGD-T's target classes per example.
      gradient_free_examples: examples of the gradient-free threat model (the first ones).
      gradient_free_queries: iterations (queries) of score-based attacks such as Square.
      surrogate_temperature: softmax temperature of the soft-routing surrogate.
      check_attack: the white-box attack rerun with more steps and restarts by the checks.
      check_extra_restarts: restarts the checks add to `restarts` in their rerun.
      large_eps: the budget at which white-box accuracy must reach ~0 %.
      transfer_attack: the attack that makes the transfer matrix.
      transfer_eps: its budget (default: the largest of `eps`).
      l2_eps_scale: L2 budgets are eps * sqrt(H*W*C) * l2_eps_scale.
      seed: random seed of the attacks.
    """

    attacks: tuple = setting(
        ("fgsm", "pgd", "apgd_ce", "apgd_t"),
        "Gradient attacks of the gray-box and white-box threat models.",
        choices=lambda: attacks_lib.ATTACKS,
    )
    adaptive_attacks: tuple = setting(
        ("apgd_ce",),
        "Attacks of the adaptive (BPDA, surrogate) threat models.",
        choices=lambda: attacks_lib.ATTACKS,
    )
    gradient_free_attacks: tuple = setting(
        ("square",), "Score-based attacks (no gradients).", choices=lambda: attacks_lib.ATTACKS
    )
    eps: tuple = setting(
        (2 / 255, 4 / 255, 8 / 255, 16 / 255),
        "L-inf budgets (pixel units).",
        parse=config_io.parse_eps_list,
        unparse=config_io.unparse_eps_list,
    )
    threat_models: tuple = setting(
        tuple(threat_models.THREATS),
        "Threat models to evaluate.",
        choices=tuple(threat_models.THREATS),
    )
    num_examples: int | None = setting(
        500,
        "Examples attacked (the first of the split), or 'all' for the whole split.",
        parse=config_io.parse_count,
        unparse=config_io.unparse_count,
    )
    batch_size: int = 100
    steps: int = setting(100, "Iterations of the iterative gradient attacks.", lower_bound=1)
    restarts: int = setting(1, "Random restarts of the stochastic attacks.", lower_bound=1)
    target_classes: int = setting(9, "APGD-T's target classes per example.", lower_bound=1)
    gradient_free_examples: int = setting(
        500, "Examples of the gradient-free attacks (the first ones).", lower_bound=1
    )
    gradient_free_queries: int = setting(
        5000, "Queries (iterations) of score-based attacks (Square).", lower_bound=1
    )
    surrogate_temperature: float = setting(
        0.1, "Temperature of the soft-routing surrogate.", check=config_io.check_positive
    )
    check_attack: str = "apgd_ce"
    check_extra_restarts: int = 2
    large_eps: float = 64 / 255
    transfer_attack: str = "pgd"
    transfer_eps: float | None = None
    l2_eps_scale: float = 0.5
    seed: int = 0

    def validate(self):
        """Raises ValueError naming the first invalid field."""
        _check_attacks(
            (
                *self.attacks,
                *self.adaptive_attacks,
                *self.gradient_free_attacks,
                self.transfer_attack,
                self.check_attack,
            )
        )
        for name in self.threat_models:
            threat_models.get(name)
        if not self.eps or any(not 0 <= e <= 1 for e in self.eps):
            raise ValueError(f"eps must be non-empty values in [0, 1], got {self.eps}")
        if self.num_examples is not None and self.num_examples < 1:
            raise ValueError(f"num_examples must be >= 1 or None (all), got {self.num_examples}")
        for name in ("batch_size", "steps", "restarts", "gradient_free_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


PRESETS = {
    "standard": EvalConfig(),
    # The main job's and CI's suite (minutes on a 2-core CPU): the same kinds of attack,
    # fewer steps, targets, queries and check restarts.
    "fast": EvalConfig(
        attacks=("fgsm", "apgd_ce", "apgd_t"),
        num_examples=200,
        steps=20,
        target_classes=2,
        gradient_free_examples=50,
        gradient_free_queries=300,
        check_extra_restarts=1,
    ),
}


def preset(name, **overrides):
    """The `EvalConfig` of preset `name` with `overrides`; ValueError for unknown names."""
    if name not in PRESETS:
        raise ValueError(f"unknown attack preset {name!r}; known: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def eps_key(eps):
    """A readable, stable key for an eps: "8/255"."""
    return f"{eps * 255:g}/255"


def run_key(threat, attack, eps):
    """The key of one run's per-example results: "white_box/pgd/8/255"."""
    return f"{threat}/{attack}/{eps_key(eps)}"


class Evaluator:
    """Runs the configured threat models and keeps every per-example result.

    Args:
      models: a `Models`.
      images: float32 [N, H, W, C] in [0, 1].
      labels: int [N].
      config: an `EvalConfig`.
      progress: callable(str) told about each unit of work (e.g. logging.info).
      sharded: a `sharded.ShardedAttacks` to run the attacks on a `tf.distribute`
        strategy in resumable shards; None runs them here, batch by batch.
      keep: adversarial examples kept per run (the first ones), for the report.
    """

    def __init__(
        self, models, images, labels, config, progress=logging.info, sharded=None, keep=64
    ):
        config.validate()
        self.models, self.config, self.progress = models, config, progress
        self.sharded, self.keep = sharded, keep
        # run key -> the first `keep` adversarial examples (runs in this process only).
        self.adversarial = {}
        self.images = np.asarray(images[: config.num_examples], np.float32)
        self.labels = np.asarray(labels[: config.num_examples])
        self.results = {
            "num_examples": len(self.images),
            "clean": {},
            "threats": {},
            "transfer": {},
            "timing": {},
            "per_example": {},
        }
        self.examples = {}

    def correct(self, model_fn, images, labels=None):
        """Per example: whether `model_fn` classifies `images` correctly."""
        labels = self.labels[: len(images)] if labels is None else labels
        return runner.predict(model_fn, images, self.config.batch_size) == labels

    def accuracy(self, model_fn, images, labels=None):
        """Fraction of `images` that `model_fn` classifies correctly."""
        return float(np.mean(self.correct(model_fn, images, labels))) if len(images) else 0.0

    def attack(self, name, model_fn, eps, images=None, labels=None, **overrides):
        """Adversarial examples of `images` (default: all) made on `model_fn`."""
        images = self.images if images is None else images
        labels = self.labels[: len(images)] if labels is None else labels
        spec, config = attacks_lib.get_spec(name), self.config
        eps = spec.budget(eps, images.shape[1:], config.l2_eps_scale)
        params = self._params(spec, overrides)
        start = time.perf_counter()

        def batch_done(done, total):
            if total > config.batch_size:  # one line per batch only when there are several
                self.progress(f"  {name}: {done}/{total} examples")

        adversarial = runner.run_attack(
            name,
            model_fn,
            images,
            labels,
            eps,
            batch_size=config.batch_size,
            seed=config.seed,
            progress=batch_done,
            **params,
        )
        key = f"{name}@{eps:.4f}"
        timing = self.results["timing"]
        timing[key] = timing.get(key, 0.0) + time.perf_counter() - start
        return adversarial

    def run_attack(self, key, name, source, eps, images, labels, scored, **overrides):
        """Per scored model, whether it classifies each adversarial example correctly.

        Args:
          key: the run's key (`run_key`), for shards and the report's examples.
          name: the attack.
          source: the model_fn the attack runs on.
          eps: the L-inf budget of the evaluation (L2 attacks scale it).
          images: the clean images attacked.
          labels: their labels.
          scored: dict name -> model_fn scored on the adversarial examples.
          **overrides: attack parameters (steps, restarts, ...).

        Returns:
          A dict name -> bool [n].
        """
        if self.sharded is None:
            adversarial = self.attack(name, source, eps, images, labels, **overrides)
            self.adversarial[key] = adversarial[: self.keep]
            return {k: self.correct(m, adversarial, labels) for k, m in scored.items()}
        spec, start = attacks_lib.get_spec(name), time.perf_counter()
        budget = spec.budget(eps, images.shape[1:], self.config.l2_eps_scale)
        params = self._params(spec, overrides)
        correct = self.sharded.correct(name, source, scored, images, labels, budget, params, key)
        timing = self.results["timing"]
        timing[key] = timing.get(key, 0.0) + time.perf_counter() - start
        return correct

    def _params(self, spec, overrides):
        config = self.config
        params = {"restarts": config.restarts}
        if not spec.own_schedule:
            params["steps"] = config.steps
        params.update({p: getattr(config, f) for p, f in spec.config_params.items()})
        params.update(overrides)
        return params

    def record(self, threat, attack, eps, correct, row=None):
        """Stores one run: its per-example results and its accuracy row."""
        self.results["per_example"][run_key(threat, attack, eps)] = [int(c) for c in correct]
        row = {"defended": float(np.mean(correct)), "n": len(correct), **(row or {})}
        table = self.results["threats"].setdefault(threat, {}).setdefault(attack, {})
        table[eps_key(eps)] = row

    def run(self):
        """Runs every configured part; returns `self.results`."""
        models, config = self.models, self.config
        self.progress(f"clean accuracy on {len(self.images)} examples")
        clean = self.correct(models.defended, self.images)
        self.results["per_example"]["clean/defended"] = [int(c) for c in clean]
        self.results["clean"] = {
            "classifier": self.accuracy(models.classifier, self.images),
            "defended": float(np.mean(clean)),
            **{name: self.accuracy(fn, self.images) for name, fn in models.others.items()},
        }
        for name in config.threat_models:
            threat = threat_models.get(name)
            if threat.attacker is None:
                self.results["transfer"] = self._transfer()
            else:
                self._threat(threat)
        self._check_runs()
        self.results["headline"] = headline(self.results, config.eps)
        return self.results

    def _threat(self, threat):
        config = self.config
        source = threat.attacker(self.models, config)
        n = threat.num_examples(config, len(self.images))
        images, labels = self.images[:n], self.labels[:n]
        for name in threat.attacks(config):
            own_schedule = attacks_lib.get_spec(name).own_schedule
            overrides = {"steps": threat.steps(config)} if threat.steps and not own_schedule else {}
            scored = {"defended": self.models.defended}
            if threat.score_classifier:
                scored["classifier"] = self.models.classifier
            for eps in config.eps:
                self.progress(f"{threat.name}: {name} eps={eps_key(eps)} on {n} examples")
                key = run_key(threat.name, name, eps)
                correct = self.run_attack(
                    key, name, source, eps, images, labels, scored, **overrides
                )
                row = {}
                if "classifier" in correct:
                    row["classifier"] = float(np.mean(correct["classifier"]))
                self.record(threat.name, name, eps, correct["defended"], row)

    def _transfer(self):
        """Matrices source -> target of accuracy on examples made on the source, per eps.

        Every model attacks itself with `transfer_attack` at the smallest eps and
        at the transfer eps, and its examples are scored on every model: the
        diagonal is each model's own white-box accuracy, the rest is transfer
        (`s2s_tf.analysis.relations` reads both).
        """
        config = self.config
        transfer_eps = config.transfer_eps or max(config.eps)
        named = {"classifier": self.models.classifier, "defended": self.models.defended}
        named.update(self.models.others)
        matrices = {}
        for eps in sorted({min(config.eps), transfer_eps}):
            matrix = matrices.setdefault(eps_key(eps), {})
            for source_name, source in named.items():
                self.progress(
                    f"transfer: {config.transfer_attack} on {source_name}, {eps_key(eps)}"
                )
                key = f"transfer/{config.transfer_attack}@{source_name}/{eps_key(eps)}"
                correct = self.run_attack(
                    key, config.transfer_attack, source, eps, self.images, self.labels, named
                )
                matrix[source_name] = {t: float(np.mean(c)) for t, c in correct.items()}
                if source_name != "defended":
                    self.results["per_example"][key] = [int(c) for c in correct["defended"]]
        return {
            "attack": config.transfer_attack,
            "eps": transfer_eps,
            "matrix": matrices[eps_key(transfer_eps)],
            "matrices": matrices,
        }

    def _check_runs(self):
        """The white-box reruns the checks need: large eps, more steps and restarts, every eps."""
        config, defended = self.config, self.models.defended
        attack = config.check_attack
        self.progress(
            f"check runs: {attack} at eps={eps_key(config.large_eps)}, more steps/restarts"
        )
        runs = [("check_large_eps", config.large_eps, {})]
        for eps in config.eps:
            runs.append(("check_more_steps", eps, {"steps": 2 * config.steps}))
            extra = {"restarts": config.restarts + config.check_extra_restarts}
            runs.append(("check_restarts", eps, extra))
        scored = {"defended": defended}
        for name, eps, overrides in runs:
            key = run_key(name, attack, eps)
            correct = self.run_attack(
                key, attack, defended, eps, self.images, self.labels, scored, **overrides
            )
            self.record(name, attack, eps, correct["defended"])


def headline(results, eps_list):
    """Per eps, the per-example worst case over every run at that eps, with a 95 % interval.

    An example counts as robust at eps when the defended model classifies it
    correctly clean and after every attack of every threat model run at that eps
    (attacks run on a subset, such as the gradient-free ones, constrain their
    examples only). The large-eps sanity run is not a budget of the evaluation
    and is left out.

    Returns:
      A dict eps key -> {"robust_accuracy", "ci95", "robust", "n", "runs"}.
    """
    per_example = results["per_example"]
    clean = np.asarray(per_example["clean/defended"], bool)
    table = {}
    for eps in eps_list:
        key = eps_key(eps)
        robust = clean.copy()
        runs = []
        for run, correct in per_example.items():
            if not run.endswith(f"/{key}") or run.startswith("check_large_eps/"):
                continue
            correct = np.asarray(correct, bool)
            robust[: len(correct)] &= correct
            runs.append(run[: -len(key) - 1])
        n, k = len(robust), int(robust.sum())
        low, high = stats.wilson_interval(k, n)
        table[key] = {
            "robust_accuracy": k / n if n else 0.0,
            "ci95": [low, high],
            "robust": k,
            "n": n,
            "runs": sorted(runs),
        }
    return table
