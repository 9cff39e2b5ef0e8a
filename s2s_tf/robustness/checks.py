"""Sanity checks against gradient masking and of convergence, decided by exact paired tests.

A defense that only hides its gradients looks strong under white-box attacks
and collapses under others (Athalye et al. 2018; Carlini et al. 2019, "On
Evaluating Adversarial Robustness"). Each check compares two runs on the same
examples with McNemar's exact test (`stats.compare`) and fails only when the
run that should be weaker fools significantly more examples (p < 0.05). Every
check prints the discordant counts (fooled by A only / B only) and p; a check
whose weaker run fools more but whose discordant pairs are too few for any
significant result is undecided (`passed` None).

The checks, at every eps:
- convergence: the strongest reference run (the threat model where
  `check_attack` fooled the most) rerun with twice the steps and with more
  restarts, and with 2**k times the steps in round k of `convergence_rounds`,
  must not fool significantly more than its base; `convergence` turns the
  last round's and the restarts' checks into the headline's "converged"
  verdict (the earlier rounds' checks are reported, and may fail);
- masking: each threat model's reference run against white-box's (a
  weaker-information attack that fools more means masked gradients), and the
  gradient-free and transfer attacks against the whole gradient ensemble. A
  cascade's gradient-free run attacks only what the gradient attacks left, so
  its check counts what it fools there as fooled by it only (conservative);
and once, at `large_eps`: the strongest threat model and the best surrogate
must reach ~0 %.
"""

import numpy as np

from s2s_tf.robustness import stats
from s2s_tf.robustness.evaluation import CHECK_BASE
from s2s_tf.robustness.evaluation import LARGE_EPS
from s2s_tf.robustness.evaluation import MORE_RESTARTS
from s2s_tf.robustness.evaluation import MORE_STEPS
from s2s_tf.robustness.evaluation import convergence_reruns
from s2s_tf.robustness.evaluation import eps_key
from s2s_tf.robustness.evaluation import run_key

# Accuracy at the large eps must not exceed this.
LARGE_EPS_MAX_ACCURACY = 0.05
_CHECK_PREFIXES = (CHECK_BASE, MORE_STEPS, MORE_RESTARTS, LARGE_EPS)


def _paired(per_example, key_a, key_b):
    """The per-example results of two runs on their common (leading) examples."""
    a, b = np.asarray(per_example[key_a], bool), np.asarray(per_example[key_b], bool)
    n = min(len(a), len(b))
    return a[:n], b[:n]


def _verdict(name, result, n, weaker, stronger, expectation):
    counts = (
        f"fooled by {stronger} only: {result['only_a']}, by {weaker} only: {result['only_b']}, "
        f"exact McNemar p = {result['p_value']:.3g} on {n} examples"
    )
    if result["b_stronger"]:
        passed, verdict = False, f"FAIL: {expectation}. "
    elif result["only_b"] > result["only_a"] and not result["decidable"]:
        passed, verdict = None, "undecided: too few discordant pairs for a significant result. "
    else:
        passed, verdict = True, ""
    return {"name": name, "passed": passed, "detail": verdict + counts, **result}


def _check(name, per_example, weaker, stronger, expectation):
    """A check that run `stronger` is at least as strong as run `weaker` (paired)."""
    a, b = _paired(per_example, stronger, weaker)
    return _verdict(name, stats.compare(a, b), len(a), weaker, stronger, expectation)


def _check_new(name, new, n, weaker, stronger, expectation):
    """A check from a count only: `weaker` fooled `new` examples `stronger` left robust.

    For a cascade run, which never saw the examples the earlier runs fooled:
    those count as fooled by neither, so the test is one-sided and conservative
    (it fails sooner than a paired test would).
    """
    a, b = np.ones(n, bool), np.ones(n, bool)
    b[:new] = False
    return _verdict(name, stats.compare(a, b), n, weaker, stronger, expectation)


def _runs_at(results, eps):
    return {k: v for k, v in results.get("runs", {}).items() if v["eps"] == eps_key(eps)}


def _reference_keys(results, config, eps):
    """run name -> key of each threat model's reference (check_attack, every example) run."""
    out = {}
    for key, info in _runs_at(results, eps).items():
        reference = info["full"] and info["attack"] == config.check_attack
        if reference and not info["threat"].startswith(_CHECK_PREFIXES):
            out[info["threat"]] = key
    return out


def _gradient_ensemble(results, config, eps):
    """Per example, robust after every gradient run at eps (None when there are none)."""
    per_example, worst = results["per_example"], None
    for key, info in _runs_at(results, eps).items():
        if info["attack"] in config.attacks and not info["threat"].startswith(LARGE_EPS):
            correct = np.asarray(per_example[key], bool)
            worst = correct if worst is None else worst[: len(correct)] & correct[: len(worst)]
    return worst


def convergence(results, config):
    """Per eps: do more steps or more restarts of the strongest run still fool more?

    Each rerun is tested against its base (the reference run; round k of the
    more-steps or the restarts rerun against its round k-1). The verdict at an
    eps is the last more-steps round's and the last restarts round's.

    Returns:
      A dict eps key -> {"source", "converged", "deciding" (the reruns whose
      checks decide), and per rerun ("more_steps", "more_restarts",
      "more_steps_x4", "more_restarts_r5", ...) its check} ("converged" False when a deciding rerun
      fools significantly more, None when undecided, else True); eps without
      reruns are left out. Only the deciding checks are sanity checks.
    """
    per_example, out, attack = results["per_example"], {}, config.check_attack
    for eps in config.eps:
        if run_key(CHECK_BASE, attack, eps) not in per_example:
            continue
        row = {"source": results["runs"].get(run_key(MORE_STEPS, attack, eps), {})}
        row["source"] = row["source"].get("source")
        deciding = {}
        for rerun in convergence_reruns(config):
            key = run_key(rerun.run, attack, eps)
            if key not in per_example:
                continue
            row[rerun.row] = _check(
                f"{rerun.adds} do not help {attack} on {row['source']} ({eps_key(eps)})",
                per_example,
                key,
                run_key(rerun.base, attack, eps),
                "the attack has not converged: more effort still fools more examples",
            )
            deciding["restarts" if rerun.run.startswith(MORE_RESTARTS) else "steps"] = rerun.row
        row["deciding"] = list(deciding.values())
        by_rerun = {i: {"converged": row[w]["passed"]} for i, w in enumerate(row["deciding"])}
        row["converged"] = overall_convergence(by_rerun)
        out[eps_key(eps)] = row
    return out


def overall_convergence(convergence_by_eps):
    """False if any eps is not converged, None if any is undecided (or none ran), else True."""
    verdicts = [row["converged"] for row in convergence_by_eps.values()]
    if not verdicts or (None in verdicts and False not in verdicts):
        return None
    return False not in verdicts


def sanity_checks(results, config):
    """Every check, as dicts with "name", "passed" (bool or None) and "detail".

    Args:
      results: `Evaluator.results` (with "per_example" and "runs").
      config: the run's `EvalConfig`.
    """
    per_example = results["per_example"]
    checks = _large_eps_checks(results, config)
    for eps in config.eps:
        conv = convergence(results, config).get(eps_key(eps), {})
        checks += [conv[w] for w in conv.get("deciding", ())]
        references = _reference_keys(results, config, eps)
        white = references.get("white_box")
        for threat, key in references.items():
            if white is None or threat == "white_box":
                continue
            checks.append(
                _check(
                    f"{threat} {config.check_attack} does not beat white-box ({eps_key(eps)})",
                    per_example,
                    key,
                    white,
                    "a weaker-information attack fools more: possible gradient masking",
                )
            )
        checks += _ensemble_checks(results, config, eps)
    return checks


def _ensemble_checks(results, config, eps):
    """Gradient-free and transfer runs against the whole gradient ensemble."""
    per_example, checks = results["per_example"], []
    ensemble = _gradient_ensemble(results, config, eps)
    if ensemble is None:
        return checks
    name = f"gradient_ensemble/{eps_key(eps)}"
    expectation = "it fools examples every gradient attack left robust: possible masking"
    for key, info in _runs_at(results, eps).items():
        if info["attack"] in config.attacks or info["threat"].startswith(_CHECK_PREFIXES):
            continue
        title = f"{info['threat']} {info['attack']} does not beat the gradient attacks"
        if info["full"]:
            paired = {**per_example, name: ensemble}
            checks.append(_check(f"{title} ({eps_key(eps)})", paired, key, name, expectation))
        else:
            checks.append(
                _check_new(
                    f"{title} ({eps_key(eps)}, cascade)",
                    info["new"],
                    len(ensemble),
                    key,
                    name,
                    expectation,
                )
            )
    for key in [k for k in per_example if k.startswith("transfer/") and k.endswith(eps_key(eps))]:
        paired = {**per_example, name: ensemble}
        checks.append(
            _check(
                f"{key.split('/')[1]} transfer does not beat the gradient attacks",
                paired,
                key,
                name,
                "a transfer attack fools more: possible gradient masking",
            )
        )
    return checks


def _large_eps_checks(results, config):
    checks = []
    for prefix in (LARGE_EPS, f"{LARGE_EPS}_surrogate"):
        key = run_key(prefix, config.check_attack, config.large_eps)
        correct = np.asarray(results["per_example"].get(key, []), bool)
        if not len(correct):
            if prefix == LARGE_EPS:
                checks.append(
                    {
                        "name": "Accuracy falls to ~0% at large eps",
                        "passed": None,
                        "detail": "not run",
                    }
                )
            continue
        source = results.get("runs", {}).get(key, {}).get("source", "?")
        k, n = int(correct.sum()), len(correct)
        low, high = stats.wilson_interval(k, n)
        checks.append(
            {
                "name": f"{source} accuracy falls to ~0% at large eps",
                "passed": k / n <= LARGE_EPS_MAX_ACCURACY,
                "detail": f"{config.check_attack} on {source} at eps={eps_key(config.large_eps)}: "
                f"{k}/{n} correct ({k / n:.1%}, 95% CI {low:.1%}-{high:.1%}; "
                f"must be <= {LARGE_EPS_MAX_ACCURACY:.0%})",
            }
        )
    return checks


def adaptive_comparison(results, config):
    """Which backward pass attacks best, per eps: every pair of reference runs (for the report).

    Returns:
      A list of rows {"eps", "a", "b", "only_a", "only_b", "p_value", "winner"}.
    """
    per_example, rows = results["per_example"], []
    for eps in config.eps:
        keys = list(_reference_keys(results, config, eps).values())
        for i, key_a in enumerate(keys):
            for key_b in keys[i + 1 :]:
                a, b = _paired(per_example, key_a, key_b)
                result = stats.compare(a, b)
                winner = (
                    key_b if result["b_stronger"] else key_a if result["a_stronger"] else "neither"
                )
                rows.append(
                    {"eps": eps_key(eps), "a": key_a, "b": key_b, "winner": winner, **result}
                )
    return rows


def surrogate_sweep(results, config):
    """Per eps: examples each surrogate temperature's reference run fooled, and the winner."""
    out = {}
    for eps in config.eps:
        fooled = {
            info["threat"]: info["fooled"]
            for info in _runs_at(results, eps).values()
            if info["full"]
            and info["attack"] == config.check_attack
            and info["threat"].startswith("surrogate@")
        }
        if fooled:
            out[eps_key(eps)] = {"fooled": fooled, "winner": max(fooled, key=fooled.get)}
    return out
