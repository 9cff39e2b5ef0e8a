"""Sanity checks against gradient masking, decided by exact paired tests at every eps.

A defense that only hides its gradients looks strong under white-box attacks
and collapses under others (Athalye et al. 2018; Carlini et al. 2019, "On
Evaluating Adversarial Robustness"). Each check compares two runs on the same
examples with McNemar's exact test (`stats.compare`) and fails only when the
run that should be weaker fools significantly more examples (p < 0.05). Every
check prints the discordant counts (fooled by A only / B only) and p, and a
check whose discordant pairs are too few for any significant result says that
it cannot be decided with the examples given (`passed` None) when the weaker
run fools more examples but too few pairs differ for any significant result.
"""

import numpy as np

from s2s_tf.robustness import attacks as attacks_lib
from s2s_tf.robustness import stats
from s2s_tf.robustness.evaluation import eps_key
from s2s_tf.robustness.evaluation import run_key

# White-box accuracy at the large eps must not exceed this.
LARGE_EPS_MAX_ACCURACY = 0.05


def _paired(per_example, key_a, key_b):
    """The per-example results of two runs on their common (leading) examples."""
    a, b = np.asarray(per_example[key_a], bool), np.asarray(per_example[key_b], bool)
    n = min(len(a), len(b))
    return a[:n], b[:n]


def _check(name, per_example, weaker, stronger, expectation):
    """A check that run `stronger` is at least as strong as run `weaker`.

    Fails when `weaker` fools significantly more examples than `stronger`.
    """
    a, b = _paired(per_example, stronger, weaker)
    result = stats.compare(a, b)
    counts = (
        f"fooled by {stronger} only: {result['only_a']}, by {weaker} only: {result['only_b']}, "
        f"exact McNemar p = {result['p_value']:.3g} on {len(a)} examples"
    )
    if result["b_stronger"]:
        passed, verdict = False, f"FAIL: {expectation}. "
    elif result["only_b"] > result["only_a"] and not result["decidable"]:
        passed, verdict = None, "cannot be decided with these examples (too few discordant). "
    else:
        passed, verdict = True, ""
    return {"name": name, "passed": passed, "detail": verdict + counts, **result}


def _strongest_white_box(per_example, attacks, eps):
    """The per-example worst case over the white-box attacks at eps (a synthetic run key)."""
    keys = [run_key("white_box", a, eps) for a in attacks]
    keys = [k for k in keys if k in per_example]
    if not keys:
        return None
    n = min(len(per_example[k]) for k in keys)
    worst = np.ones(n, bool)
    for key in keys:
        worst &= np.asarray(per_example[key][:n], bool)
    return worst


def sanity_checks(results, config):
    """Every check at every eps, as dicts with "name", "passed" (bool or None) and "detail".

    Args:
      results: `Evaluator.results` (with "per_example").
      config: the run's `EvalConfig`.
    """
    per_example = dict(results["per_example"])
    checks = [_large_eps_check(results, config)]
    for eps in config.eps:
        checks += _optimisation_checks(per_example, config, eps)
        worst = _strongest_white_box(per_example, config.attacks, eps)
        if worst is None:
            continue
        best_key = f"white_box/best/{eps_key(eps)}"
        per_example[best_key] = worst
        for threat in ("bpda", "surrogate", "gradient_free"):
            for attack in _attacks_of(results, threat):
                key = run_key(threat, attack, eps)
                if key in per_example:
                    checks.append(
                        _check(
                            f"{threat} {attack} does not beat white-box ({eps_key(eps)})",
                            per_example,
                            key,
                            best_key,
                            "a weaker-information attack fools more: possible gradient masking",
                        )
                    )
        for key in [
            k for k in per_example if k.startswith("transfer/") and k.endswith(eps_key(eps))
        ]:
            checks.append(
                _check(
                    f"{key.split('/')[1]} transfer does not beat the white-box attacks",
                    per_example,
                    key,
                    best_key,
                    "a transfer attack fools more: possible gradient masking",
                )
            )
    return checks


def _attacks_of(results, threat):
    return list(results.get("threats", {}).get(threat, {}))


def _large_eps_check(results, config):
    key = run_key("check_large_eps", config.check_attack, config.large_eps)
    correct = np.asarray(results["per_example"].get(key, []), bool)
    if not len(correct):
        return {
            "name": "White-box accuracy falls to ~0% at large eps",
            "passed": None,
            "detail": "not run",
        }
    k, n = int(correct.sum()), len(correct)
    low, high = stats.wilson_interval(k, n)
    return {
        "name": "White-box accuracy falls to ~0% at large eps",
        "passed": k / n <= LARGE_EPS_MAX_ACCURACY,
        "detail": f"{config.check_attack} at eps={eps_key(config.large_eps)}: {k}/{n} correct "
        f"({k / n:.1%}, 95% CI {low:.1%}-{high:.1%}; must be <= {LARGE_EPS_MAX_ACCURACY:.0%})",
    }


def _optimisation_checks(per_example, config, eps):
    """More steps and restarts do not help; iterative beats single-step; white beats gray."""
    checks = []
    base = run_key("white_box", config.check_attack, eps)
    if base in per_example:
        for rerun, what in (
            ("check_more_steps", "twice the steps"),
            ("check_restarts", "more restarts"),
        ):
            key = run_key(rerun, config.check_attack, eps)
            if key in per_example:
                checks.append(
                    _check(
                        f"{what} do not help {config.check_attack} ({eps_key(eps)})",
                        per_example,
                        key,
                        base,
                        "the attack is under-optimised: its numbers overstate robustness",
                    )
                )
    white = [a for a in config.attacks if run_key("white_box", a, eps) in per_example]
    single = [a for a in white if not attacks_lib.ATTACKS[a].iterative]
    for s in single:
        for m in [a for a in white if attacks_lib.ATTACKS[a].iterative]:
            checks.append(
                _check(
                    f"iterative {m} at least as strong as single-step {s} ({eps_key(eps)})",
                    per_example,
                    run_key("white_box", s, eps),
                    run_key("white_box", m, eps),
                    "a single step fools more than the iterative attack: possible masking",
                )
            )
    for attack in white:
        gray = run_key("gray_box", attack, eps)
        if gray in per_example:
            checks.append(
                _check(
                    f"white-box {attack} at least as strong as gray-box {attack} ({eps_key(eps)})",
                    per_example,
                    gray,
                    run_key("white_box", attack, eps),
                    "the end-to-end gradient is weaker than the classifier's: possible masking",
                )
            )
    return checks


def adaptive_comparison(results, config):
    """Which backward pass attacks best, per eps: white-box vs BPDA vs surrogate (for the report).

    Returns:
      A list of rows {"eps", "a", "b", "only_a", "only_b", "p_value", "winner"}.
    """
    per_example = results["per_example"]
    rows = []
    for eps in config.eps:
        for attack in config.adaptive_attacks:
            keys = [run_key(t, attack, eps) for t in ("white_box", "bpda", "surrogate")]
            keys = [k for k in keys if k in per_example]
            for i, key_a in enumerate(keys):
                for key_b in keys[i + 1 :]:
                    a, b = _paired(per_example, key_a, key_b)
                    result = stats.compare(a, b)
                    winner = (
                        key_b
                        if result["b_stronger"]
                        else key_a
                        if result["a_stronger"]
                        else "neither"
                    )
                    rows.append(
                        {"eps": eps_key(eps), "a": key_a, "b": key_b, "winner": winner, **result}
                    )
    return rows
