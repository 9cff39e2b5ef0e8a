"""Robustness evaluation of an S2SNet-defended classifier: every threat model, per example.

All images are float32 in [0, 1] and every eps is in pixel units. The threat
models (who attacks which model, see `threat_models`) run one attack suite
(`EvalConfig.attacks`) through each gradient backward pass, then the
gradient-free attacks; every run keeps, per example, whether the defended
model still classifies the adversarial image correctly. The headline number
at each eps is the per-example worst case over every run there (AutoAttack's
robust accuracy), with a 95 % Wilson interval.

The runs at each eps, in order:
1. reference: `check_attack` (APGD-CE) on every clean-correct example through
   every gradient threat model: paired runs for the masking checks;
2. cascade: the rest of the suite, then the gradient-free attacks, each on the
   examples still robust after every earlier run (AutoAttack's cascade: the
   same worst case as running every attack on every example, in less time;
   `cascade=False` runs the full matrix);
3. convergence: the reference run that fooled the most is rerun with twice the
   steps and with more restarts, on the examples it left robust; with
   `convergence_rounds` > 1, round k reruns it with 2**k times the steps, and
   with twice round k-1's extra restarts, each on the examples its round k-1
   left robust. When the last round (or the restarts)
   still fools significantly more examples (exact McNemar, one-sided since
   a rerun keeps what its base fooled), the headline is marked not
   converged; every rerun counts in the worst case;
and once: the large-eps runs (the strongest threat model and the surrogate
must reach ~0 %), and the transfer matrix.

`EvalConfig` and the presets live in `eval_config` (re-exported here).
"""

import collections
import time

import numpy as np
from absl import logging

from s2s_tf.robustness import attacks as attacks_lib
from s2s_tf.robustness import runner
from s2s_tf.robustness import stats
from s2s_tf.robustness import threat_models
from s2s_tf.robustness.eval_config import PRESETS  # noqa: F401 (re-exported)
from s2s_tf.robustness.eval_config import EvalConfig  # noqa: F401 (re-exported)
from s2s_tf.robustness.eval_config import preset  # noqa: F401 (re-exported)

Models = threat_models.Models

# Run-name prefixes of the convergence and large-eps runs.
CHECK_BASE, MORE_STEPS, MORE_RESTARTS = "check_base", "check_more_steps", "check_restarts"
LARGE_EPS = "check_large_eps"


# One convergence rerun: its row in `results["convergence"]`, its run name, the run it
# is paired with (and attacks what that left robust), what it adds, its attack parameters.
Rerun = collections.namedtuple("Rerun", "row run base adds overrides")


def _more_steps_name(round_):
    """The run name of convergence round `round_` (1: twice the steps; k: 2**k times)."""
    return MORE_STEPS if round_ == 1 else f"{MORE_STEPS}_x{2**round_}"


def _restarts(config, round_):
    """The restarts of round `round_` of the restarts rerun: the preset's, plus
    `check_extra_restarts` in round 1, twice as many extra in each further round."""
    return config.restarts + config.check_extra_restarts * 2 ** (round_ - 1)


def _more_restarts_name(config, round_):
    """The run name of round `round_` of the restarts rerun (k > 1: named by its restarts)."""
    return MORE_RESTARTS if round_ == 1 else f"{MORE_RESTARTS}_r{_restarts(config, round_)}"


def convergence_reruns(config):
    """The convergence reruns of `config`, in order (the cascade runs them, the checks test
    them): twice the steps and more restarts against the reference run; then, in each
    round k of `convergence_rounds`, 2**k times the steps against round k-1 of the steps,
    and twice round k-1's extra restarts against round k-1 of the restarts."""
    reruns = []
    for k in range(1, config.convergence_rounds + 1):
        steps_base = CHECK_BASE if k == 1 else _more_steps_name(k - 1)
        restarts_base = CHECK_BASE if k == 1 else _more_restarts_name(config, k - 1)
        restarts = _restarts(config, k)
        reruns += [
            Rerun(
                "more_steps" if k == 1 else f"more_steps_x{2**k}",
                _more_steps_name(k),
                steps_base,
                "twice the steps" if k == 1 else f"{2**k}x the steps",
                {"steps": 2**k * config.steps},
            ),
            Rerun(
                "more_restarts" if k == 1 else f"more_restarts_r{restarts}",
                _more_restarts_name(config, k),
                restarts_base,
                "more restarts" if k == 1 else f"{restarts} restarts",
                {"restarts": restarts},
            ),
        ]
    return reruns


def eps_key(eps):
    """A readable, stable key for an eps: "8/255"."""
    return f"{eps * 255:g}/255"


def run_key(threat, attack, eps):
    """The key of one run's per-example results: "white_box/pgd/8/255"."""
    return f"{threat}/{attack}/{eps_key(eps)}"


class Evaluator:
    """Runs the configured threat models and keeps every per-example result.

    A run's per-example entry is 1 when the defended model classifies the
    example correctly clean and after the run's attack, else 0; an example a
    cascade run skipped because an earlier run had fooled it is 1 (this run did
    not fool it). `results["runs"]` counts, per run, the examples attacked, the
    examples fooled that no earlier run at that eps had fooled, and the seconds;
    `results["gradient_difference"]` holds, per gradient threat model, the
    relative distance |g - g_e2e| / |g_e2e| of its input gradient from the
    end-to-end one on the first examples (0: the same backward pass).

    Args:
      models: a `Models`. Its surrogate scales are measured on the first
        `surrogate_calibration_examples` images unless already set (set them
        once for a split evaluated in shards, so every shard uses the same).
      images: float32 [N, H, W, C] in [0, 1].
      labels: int [N].
      config: an `EvalConfig`.
      progress: callable(str) told about each unit of work (e.g. logging.info).
      sharded: a `sharded.ShardedAttacks` to run the attacks on a `tf.distribute`
        strategy in resumable shards; None runs them here, batch by batch.
      keep: adversarial examples kept per run (of the first examples, aligned with
        `images`; an example a run did not attack is kept clean), for the report.
      index_offset: the index of `images[0]` in the whole split, so each
        example's random start is the same whichever shard it is evaluated in.
    """

    def __init__(
        self,
        models,
        images,
        labels,
        config,
        progress=logging.info,
        sharded=None,
        keep=64,
        index_offset=0,
        choose_on=None,
        choices=None,
    ):
        config.validate()
        self.models, self.config, self.progress = models, config, progress
        self.sharded, self.keep, self.index_offset = sharded, keep, index_offset
        self.choose_on, self.choices = choose_on, choices
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
            "runs": {},
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

    def attack(self, name, model_fn, eps, images=None, labels=None, indices=None, **overrides):
        """Adversarial examples of `images` (default: all) made on `model_fn`."""
        images = self.images if images is None else images
        labels = self.labels[: len(images)] if labels is None else labels
        indices = np.arange(len(images)) if indices is None else indices
        spec, config = attacks_lib.get_spec(name), self.config
        eps = spec.budget(eps, images.shape[1:], config.l2_eps_scale)

        def batch_done(done, total):
            if total > config.batch_size:  # one line per batch only when there are several
                self.progress(f"  {name}: {done}/{total} examples")

        return runner.run_attack(
            name,
            model_fn,
            images,
            labels,
            eps,
            batch_size=config.batch_size,
            seed=config.seed,
            progress=batch_done,
            indices=np.asarray(indices) + self.index_offset,
            **self._params(spec, overrides),
        )

    def run_attack(self, key, name, source, eps, indices, scored, **overrides):
        """Per scored model, whether it classifies each adversarial example correctly.

        Args:
          key: the run's key (`run_key`), for shards and the report's examples.
          name: the attack.
          source: the model_fn the attack runs on.
          eps: the L-inf budget of the evaluation (L2 attacks scale it).
          indices: int [n], the examples attacked (indices into `self.images`).
          scored: dict name -> model_fn scored on the adversarial examples.
          **overrides: attack parameters (steps, restarts, ...).

        Returns:
          A dict name -> bool [n].
        """
        images, labels = self.images[indices], self.labels[indices]
        start = time.perf_counter()
        if self.sharded is None:
            adversarial = self.attack(name, source, eps, images, labels, indices, **overrides)
            # The first `keep` examples of the evaluation, aligned with `self.images`
            # (those this run did not attack stay clean).
            kept = self.images[: self.keep].copy()
            inside = np.asarray(indices) < self.keep
            kept[np.asarray(indices)[inside]] = adversarial[inside]
            self.adversarial[key] = kept
            correct = {k: self.correct(m, adversarial, labels) for k, m in scored.items()}
        else:
            spec = attacks_lib.get_spec(name)
            budget = spec.budget(eps, images.shape[1:], self.config.l2_eps_scale)
            params = self._params(spec, overrides)
            correct = self.sharded.correct(
                name,
                source,
                scored,
                images,
                labels,
                budget,
                params,
                key,
                indices=np.asarray(indices, np.int64) + self.index_offset,
            )
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

    def resume(self, results):
        """Takes a finished evaluation's `results` as this one's, to add runs to them.

        The clean correctness comes from their per-example table, so further runs
        start from the same examples (`streaming`'s added convergence rounds).
        """
        self.results = results
        per_example = results["per_example"]
        self.clean = {
            name: np.asarray(per_example[f"clean/{name}"], bool)
            for name in ("defended", "classifier")
        }

    def run(self):
        """Runs every configured part; returns `self.results` (finalized)."""
        from s2s_tf.robustness import cascade  # the run plan; it imports this module

        models, config = self.models, self.config
        self.progress(f"clean accuracy on {len(self.images)} examples")
        clean = self.correct(models.defended, self.images)
        self.clean = {"defended": clean, "classifier": self.correct(models.classifier, self.images)}
        self.results["per_example"]["clean/defended"] = [int(c) for c in clean]
        self.results["per_example"]["clean/classifier"] = [int(c) for c in self.clean["classifier"]]
        self.results["clean"] = {
            "classifier": float(np.mean(self.clean["classifier"])),
            "defended": float(np.mean(clean)),
            **{name: self.accuracy(fn, self.images) for name, fn in models.others.items()},
        }
        if "surrogate" in config.threat_models:
            scales = models.calibrate(self.images[: config.surrogate_calibration_examples])
            self.results["surrogate_scales"] = dict(scales)
        cascade.Cascade(self).run()
        if "transfer" in config.threat_models:
            self.results["transfer"] = self._transfer()
        return finalize(self.results, config)

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
        everything = np.arange(len(self.images))
        matrices = {}
        for eps in sorted({min(config.eps), transfer_eps}):
            matrix = matrices.setdefault(eps_key(eps), {})
            for source_name, source in named.items():
                self.progress(
                    f"transfer: {config.transfer_attack} on {source_name}, {eps_key(eps)}"
                )
                key = f"transfer/{config.transfer_attack}@{source_name}/{eps_key(eps)}"
                correct = self.run_attack(
                    key, config.transfer_attack, source, eps, everything, named
                )
                matrix[source_name] = {t: float(np.mean(c)) for t, c in correct.items()}
                if source_name != "defended":
                    survived = self.clean["defended"] & correct["defended"]
                    self.results["per_example"][key] = [int(c) for c in survived]
        return {
            "attack": config.transfer_attack,
            "eps": transfer_eps,
            "matrix": matrices[eps_key(transfer_eps)],
            "matrices": matrices,
        }


def _is_budget_run(run, key):
    """Whether per-example run `run` is an attack at eps key `key` that counts in the headline."""
    return run.endswith(f"/{key}") and not run.startswith(("clean/", LARGE_EPS, CHECK_BASE))


def worst_case(per_example, key):
    """The per-example worst case at eps key `key` ("8/255") of a results' "per_example".

    Returns:
      (bool [n]: correct clean and after every run at that eps that counts in
      the headline, sorted names of those runs without the eps).
    """
    robust = np.asarray(per_example["clean/defended"], bool).copy()
    runs = []
    for run, correct in per_example.items():
        if not _is_budget_run(run, key):
            continue
        correct = np.asarray(correct, bool)
        robust[: len(correct)] &= correct
        runs.append(run[: -len(key) - 1])
    return robust, sorted(runs)


def headline(results, eps_list):
    """Per eps, the per-example worst case over every run at that eps, with a 95 % interval.

    An example counts as robust at eps when the defended model classifies it
    correctly clean and after every attack of every threat model run at that eps
    (attacks run on a subset, such as gradient-free ones limited to the first
    examples, constrain their examples only). The large-eps runs are not a
    budget of the evaluation and are left out.

    Returns:
      A dict eps key -> {"robust_accuracy", "ci95", "robust", "n", "runs"}.
    """
    table = {}
    for eps in eps_list:
        key = eps_key(eps)
        robust, runs = worst_case(results["per_example"], key)
        n, k = len(robust), int(robust.sum())
        low, high = stats.wilson_interval(k, n)
        table[key] = {
            "robust_accuracy": k / n if n else 0.0,
            "ci95": [low, high],
            "robust": k,
            "n": n,
            "runs": runs,
        }
    return table


def finalize(results, config):
    """Recomputes everything derived from `results["per_example"]` and `results["runs"]`.

    The headline, the per-run rows and the convergence verdict; so results of
    shards merged by concatenating their per-example lists (and summing their
    run counts) give the same numbers as one run over all their examples.

    Returns:
      `results`, updated in place.
    """
    from s2s_tf.robustness import checks  # checks imports this module

    results["headline"] = headline(results, config.eps)
    results["threats"] = _rows(results)
    results["convergence"] = checks.convergence(results, config)
    results["converged"] = checks.overall_convergence(results["convergence"])
    results["surrogate_sweep"] = checks.surrogate_sweep(results, config)
    return results


def _rows(results):
    """threat -> attack -> eps key -> row, for every run of a threat model at a budget.

    A row's "defended" is the accuracy under that run alone, from clean
    correctness, for runs that attacked every clean-correct example ("full");
    cascade runs (which attacked only what earlier runs left) report instead
    "robust_after": the worst-case accuracy after every run up to them.
    """
    per_example, runs = results["per_example"], results.get("runs", {})
    clean_classifier = per_example.get("clean/classifier")
    table = {}
    for key, info in runs.items():
        threat, attack, eps = info["threat"], info["attack"], info["eps"]
        correct = np.asarray(per_example[key], bool)
        row = {"n": len(correct), "full": info["full"], **_counts(info)}
        if info["full"]:
            row["defended"] = float(np.mean(correct))
        else:
            row["robust_after"] = info["robust_after"] / max(len(correct), 1)
        classifier_key = f"{key}#classifier"
        if classifier_key in per_example and clean_classifier is not None:
            row["classifier"] = float(np.mean(np.asarray(per_example[classifier_key], bool)))
        table.setdefault(threat, {}).setdefault(attack, {})[eps] = row
    return table


def _counts(info):
    return {k: info[k] for k in ("attacked", "fooled", "new", "seconds") if k in info}
