"""The run plan of an evaluation: reference runs, the attack cascade, convergence reruns.

`Cascade(evaluator).run()` fills the evaluator's `results["per_example"]` and
`results["runs"]` (see `evaluation` for the order of the runs and why).

Two runs are chosen from results: the gradient threat model whose reference
run fooled the most at each eps (the convergence checks rerun it) and the best
surrogate temperature at the largest eps (the large-eps check runs it). They
are chosen on the evaluation's first `Evaluator.choose_on` examples, or given
(`Evaluator.choices`), and recorded in `results["choices"]`: so a split
evaluated in shards, each shard given the first shard's choices, reruns the
same threat model on every example as an in-memory run that chooses on the
first shard's examples.
Every gradient threat model's model is checked first: a gradient that is zero
for a whole batch, or not finite, stops the evaluation with an error naming
the threat model, instead of letting the attacks degrade to noise.
"""

import numpy as np

from s2s_tf.robustness import attacks as attacks_lib
from s2s_tf.robustness import runner
from s2s_tf.robustness import threat_models
from s2s_tf.robustness.evaluation import CHECK_BASE
from s2s_tf.robustness.evaluation import LARGE_EPS
from s2s_tf.robustness.evaluation import convergence_reruns
from s2s_tf.robustness.evaluation import eps_key
from s2s_tf.robustness.evaluation import run_key

# Examples of the gradient check.
_GUARD_EXAMPLES = 32


def gradient_sources(models, config):
    """Run name -> (threat model, model_fn) of every gradient threat model, in order."""
    sources = {}
    for name in config.threat_models:
        threat = threat_models.get(name)
        if threat.gradient:
            for variant, model_fn in threat.sources(models, config).items():
                sources[variant] = (threat, model_fn)
    return sources


class Cascade:
    """Runs an `evaluation.Evaluator`'s attacks in order, each on the examples it must see."""

    def __init__(self, evaluator):
        self.ev, self.config = evaluator, evaluator.config
        models, config = evaluator.models, evaluator.config
        self.sources = gradient_sources(models, config)
        self.free = [
            threat_models.get(n)
            for n in config.threat_models
            if not threat_models.get(n).gradient and threat_models.get(n).attacker is not None
        ]

    def run(self):
        """Every run at every eps, then the large-eps runs."""
        self._guard()
        given = self.ev.choices
        choices = self.ev.results["choices"] = {"strongest": {}, "large_eps": []}
        for eps in self.config.eps:
            robust = self.ev.clean["defended"].copy()
            references = {}
            for variant, (threat, model_fn) in self.sources.items():
                attack = self.config.check_attack
                references[variant] = self._run(variant, threat, attack, model_fn, eps, robust)
            for variant, (threat, model_fn) in self.sources.items():
                for attack in self.config.attacks:
                    if attack != self.config.check_attack:
                        full = not self.config.cascade
                        self._run(variant, threat, attack, model_fn, eps, robust, full=full)
            for threat in self.free:
                model_fn = threat.attacker(self.ev.models, self.config)
                for attack in threat.attacks(self.config):
                    full = not self.config.cascade
                    self._run(threat.name, threat, attack, model_fn, eps, robust, full=full)
            if references:
                if given is not None:
                    strongest = self._given(given["strongest"].get(eps_key(eps)))
                else:
                    strongest = self._most_fooled(references, eps)
                choices["strongest"][eps_key(eps)] = strongest
                self._convergence(strongest, eps, robust)
        if choices["strongest"]:
            if given is not None:
                variants = [self._given(variant) for variant in given["large_eps"]]
            else:
                largest = eps_key(max(self.config.eps))
                variants = self._large_eps_variants(choices["strongest"][largest])
            choices["large_eps"] = variants
            self._large_eps(variants)

    def _given(self, variant):
        """A given choice, checked against this evaluation's threat models."""
        if variant not in self.sources:
            raise ValueError(
                f"the given choice {variant!r} is no run of this evaluation's threat models "
                f"{list(self.sources)}: it comes from another evaluation"
            )
        return variant

    def _most_fooled(self, variants, eps):
        """Of `variants`, the one whose reference run at `eps` fooled the most of the
        first `choose_on` examples (the first in order on a tie)."""
        per_example, limit = self.ev.results["per_example"], self.ev.choose_on
        clean = self.ev.clean["defended"][:limit]

        def fooled(variant):
            survived = np.asarray(per_example[run_key(variant, self.config.check_attack, eps)])
            return int(np.sum(clean & ~survived[:limit].astype(bool)))

        return max(variants, key=fooled)

    def _guard(self):
        """Checks every gradient threat model; records how far each backward pass is from
        the end-to-end one (a surrogate that matches it is effectively hard routing)."""
        images = self.ev.images[:_GUARD_EXAMPLES]
        labels = self.ev.labels[:_GUARD_EXAMPLES]
        grads = {
            variant: runner.check_gradients(model_fn, images, labels, f"threat model {variant!r}")
            for variant, (_, model_fn) in self.sources.items()
        }
        white = runner.check_gradients(
            self.ev.models.defended, images, labels, "the defended model (end to end)"
        )
        self.ev.results["gradient_difference"] = {
            variant: float(np.linalg.norm(g - white) / np.linalg.norm(white))
            for variant, g in grads.items()
        }

    def _run(self, variant, threat, attack, model_fn, eps, robust, *, full=True, **kw):
        """One attack run at `eps`; updates `robust` (bool [N], in place) and the results.

        Args:
          variant: the run's threat name (a threat model or one of its variants).
          threat: its `ThreatModel`.
          attack: the attack's name.
          model_fn: the model attacked.
          eps: the budget.
          robust: per example, robust after every earlier run at this eps.
          full: attack every clean-correct example (else only the `robust` ones).
          **kw: `key` (the run key, default from variant/attack/eps), `overrides`
            (attack parameters), `record_as` (the threat name of the row), `only`
            (bool [N]: attack exactly these examples) and `floor` (bool [N]: the
            per-example result of the examples not attacked, default clean).

        Returns:
          The run's info dict (also stored in `results["runs"]`).
        """
        ev, config = self.ev, self.config
        key = kw.get("key") or run_key(variant, attack, eps)
        clean = ev.clean["defended"]
        candidates = clean | ev.clean["classifier"] if threat.score_classifier else clean
        limit = threat.num_examples(config, len(clean))
        todo = kw.get("only", candidates if full else robust)
        indices = np.flatnonzero(todo[:limit])
        overrides = dict(kw.get("overrides", {}))
        if threat.steps and not attacks_lib.get_spec(attack).own_schedule:
            overrides.setdefault("steps", threat.steps(config))
        scored = {"defended": ev.models.defended}
        if threat.score_classifier and full:
            scored["classifier"] = ev.models.classifier
        self.ev.progress(
            f"{variant}: {attack} eps={eps_key(eps)} on {len(indices)} examples"
            + ("" if full else f" (cascade: {int(robust.sum())} still robust)")
        )
        correct = {k: np.ones(0, bool) for k in scored}
        if len(indices):
            correct = ev.run_attack(key, attack, model_fn, eps, indices, scored, **overrides)
        survived = clean.copy() if "floor" not in kw else kw["floor"].copy()
        survived[indices] &= correct["defended"]
        fooled = ~correct["defended"] & clean[indices]
        new = int(np.sum(robust[indices] & fooled))
        robust[indices] &= correct["defended"]
        per_example = ev.results["per_example"]
        per_example[key] = [int(c) for c in survived]
        if "classifier" in correct:
            by_classifier = ev.clean["classifier"].copy()
            by_classifier[indices] &= correct["classifier"]
            per_example[f"{key}#classifier"] = [int(c) for c in by_classifier]
        info = {
            "threat": kw.get("record_as", variant),
            "source": variant,
            "attack": attack,
            "eps": eps_key(eps),
            "full": bool(full),
            "attacked": len(indices),
            "fooled": int(fooled.sum()),
            "new": new,
            "robust_after": int(robust.sum()),
            "seconds": float(ev.results["timing"].get(key, 0.0)),
        }
        ev.results["runs"][key] = info
        return info

    def _convergence(self, strongest, eps, robust):
        """Reruns the strongest reference run with twice the steps and with more restarts,
        then, in each further round k of `convergence_rounds`, with 2**k times the steps
        and with twice round k-1's extra restarts.

        Only on the examples the base left robust (its fooled ones need no second try);
        round k's base is round k-1.
        """
        config, attack = self.config, self.config.check_attack
        threat, model_fn = self.sources[strongest]
        per_example = self.ev.results["per_example"]
        per_example[run_key(CHECK_BASE, attack, eps)] = list(
            per_example[run_key(strongest, attack, eps)]
        )
        # Each rerun attacks the examples its base left robust; the others keep the base's
        # result, so a rerun can only add fooled examples and the paired test is one-sided
        # (it flags "not converged" sooner, never later). Round k > 1 of each rerun has
        # its round k-1 as its base.
        for rerun in convergence_reruns(config):
            base = np.asarray(per_example[run_key(rerun.base, attack, eps)], bool)
            self._run(
                strongest,
                threat,
                attack,
                model_fn,
                eps,
                robust,
                key=run_key(rerun.run, attack, eps),
                overrides=rerun.overrides,
                record_as=rerun.run,
                only=base,
                floor=base,
            )

    def _large_eps_variants(self, strongest):
        """The strongest threat model at the largest eps, and the best surrogate if another."""
        variants = [strongest]
        surrogates = [v for v, (t, _) in self.sources.items() if t.name == "surrogate"]
        if surrogates and strongest not in surrogates:
            variants.append(self._most_fooled(surrogates, max(self.config.eps)))
        return variants

    def _large_eps(self, variants):
        """`variants` (the strongest, then the best surrogate) at `large_eps` (must reach ~0 %)."""
        config, attack = self.config, self.config.check_attack
        for i, variant in enumerate(variants):
            threat, model_fn = self.sources[variant]
            name = LARGE_EPS if i == 0 else f"{LARGE_EPS}_surrogate"
            robust = self.ev.clean["defended"].copy()
            self._run(
                variant,
                threat,
                attack,
                model_fn,
                config.large_eps,
                robust,
                key=run_key(name, attack, config.large_eps),
                record_as=name,
            )
