"""The paper's five claims, each with a verdict computed from `robustness.json` alone.

`claims(document)` reads the evaluation's report document (the dict written to
`robustness.json`) and returns one entry per claim: its status, the numbers it
rests on, and a sentence written from those numbers. `readme_text` joins the
sentences into the paragraph the README carries for a run, so the README's
claim rows are generated from the run they describe. Everything is read in
sorted order, so the text is the same from the document and from its JSON
(written with sorted keys). Every status follows from intervals or counts
stored in the document:

1. Clean accuracy kept: paired bootstrap interval of defended - classifier
   accuracy on the same examples, against a tolerance of `CLEAN_TOLERANCE`.
2. Class-agnostic, structure-following gradients: the counterfactual
   analysis's statuses (`counterfactual`).
3. The S2SNet damps perturbations: bootstrap intervals of the median ratio
   ||P(x+d) - P(x)||_2 / ||d||_2, against 1, for every run analysed.
4. White-box resilience comparable to gray-box: per eps, the per-example worst
   case over the full gray-box runs against that over the full white-box-family
   runs (end to end, BPDA, surrogates), paired, within `WHITE_GRAY_MARGIN`;
   the same numbers for each baseline defense beside it.
5. Relations between models: the rankings of `relations` (point estimates, no
   interval: its status says whether the two groups rank alike).
"""

import numpy as np

from s2s_tf.analysis import counterfactual
from s2s_tf.analysis import relations
from s2s_tf.robustness import stats

SUPPORTED = counterfactual.SUPPORTED
CONTRADICTED = counterfactual.CONTRADICTED
UNDECIDED = "undecided (the interval straddles the bound)"
# Claim 1: the defended model may lose at most this much clean accuracy (2 points).
CLEAN_TOLERANCE = 0.02
# Claim 4: white-box and gray-box worst cases count as comparable within 5 points.
WHITE_GRAY_MARGIN = 0.05
# Threat models (before any "@temperature") of the white-box family of claim 4.
WHITE_FAMILY = ("white_box", "bpda", "surrogate")
BOOTSTRAP = {"num_resamples": 2000, "seed": 0, "confidence": 0.95}


def _pct(value):
    return f"{100 * value:.1f}%"


def _within(interval, low, high):
    """SUPPORTED inside [low, high], CONTRADICTED wholly outside, else UNDECIDED."""
    if low <= interval[0] and interval[1] <= high:
        return SUPPORTED
    if interval[0] > high or interval[1] < low:
        return CONTRADICTED
    return UNDECIDED


def _overall(statuses):
    statuses = list(statuses)
    if not statuses:
        return None
    if CONTRADICTED in statuses:
        return CONTRADICTED
    return SUPPORTED if all(s == SUPPORTED for s in statuses) else UNDECIDED


def clean_claim(results):
    """Claim 1 from the per-example clean results of the classifier and the defended model."""
    per_example = results["per_example"]
    defended = np.asarray(per_example["clean/defended"], float)
    classifier = np.asarray(per_example["clean/classifier"], float)
    difference = stats.bootstrap(stats.mean_statistic, defended - classifier, **BOOTSTRAP)
    status = _within(difference["interval"], -CLEAN_TOLERANCE, np.inf)
    low, high = difference["interval"]
    return {
        "status": status,
        "classifier": float(classifier.mean()),
        "defended": float(defended.mean()),
        "difference": difference,
        "text": (
            f"Clean accuracy kept (within {100 * CLEAN_TOLERANCE:g} points): {status}: "
            f"classifier {_pct(classifier.mean())}, defended {_pct(defended.mean())}, "
            f"difference {100 * difference['estimate']:+.1f} points "
            f"[{100 * low:+.1f}, {100 * high:+.1f}] on {len(defended)} examples."
        ),
    }


def _family(source):
    base = source.split("@")[0]
    if base == "gray_box":
        return "gray_box"
    return "white_box" if base in WHITE_FAMILY else None


def family_worst_case(results, eps_key):
    """Per family ("gray_box", "white_box"), bool [N]: robust after every full run at eps."""
    per_example = results["per_example"]
    clean = np.asarray(per_example["clean/defended"], bool)
    worst = {}
    for key, info in results.get("runs", {}).items():
        family = _family(info.get("source", info["threat"]))
        if family is None or not info["full"] or info["eps"] != eps_key:
            continue
        correct = np.asarray(per_example[key], bool)
        worst[family] = worst.get(family, clean) & correct
    return worst


def white_gray(results):
    """Claim 4's comparison per eps: gray-box vs white-box-family worst cases, paired."""
    out = {}
    for eps_key in sorted(results.get("headline", {}), key=relations.eps_value):
        worst = family_worst_case(results, eps_key)
        if len(worst) < 2:
            continue
        gray, white = worst["gray_box"], worst["white_box"]
        difference = stats.bootstrap(
            stats.mean_statistic, gray.astype(float) - white.astype(float), **BOOTSTRAP
        )
        out[eps_key] = {
            "gray_box": float(gray.mean()),
            "white_box": float(white.mean()),
            "difference": difference,
            "mcnemar": stats.compare(gray, white),
            "status": _within(difference["interval"], -WHITE_GRAY_MARGIN, WHITE_GRAY_MARGIN),
        }
    return out


def white_gray_claim(results, baselines=None):
    """Claim 4 for the S2SNet, with the same comparison for each baseline beside it."""
    by_eps = white_gray(results)
    status = _overall(e["status"] for e in by_eps.values())
    cells = [
        f"{eps} gray-box {_pct(e['gray_box'])} vs white-box {_pct(e['white_box'])}"
        for eps, e in by_eps.items()
    ]
    baselines = dict(sorted((baselines or {}).items()))
    others = {name: white_gray(entry["results"]) for name, entry in baselines.items()}
    largest = max(by_eps, key=relations.eps_value) if by_eps else None
    beside = [
        f"{name} {_pct(entry['results']['headline'][largest]['robust_accuracy'])}"
        for name, entry in baselines.items()
        if largest in entry["results"].get("headline", {})
    ]
    text = (
        f"White-box robustness comparable to gray-box (within {100 * WHITE_GRAY_MARGIN:g} "
        f"points, worst case over end to end, BPDA and surrogates): {status}: "
        + "; ".join(cells)
        + "."
    )
    if beside:
        headline = results["headline"][largest]["robust_accuracy"]
        text += (
            f" Worst-case robust accuracy at {largest}: S2SNet {_pct(headline)}, "
            + ", ".join(beside)
            + "."
        )
    return {"status": status, "by_eps": by_eps, "baselines": others, "text": text}


def effective_claim(summary):
    """Claim 3 from the effective-perturbation summaries (median L2 ratio against 1)."""
    statuses, cells = {}, []
    for key, entry in sorted((summary or {}).items()):
        ratio = ((entry.get("l2") or {}).get("ratio") or {}).get("median")
        if not ratio:
            continue
        statuses[key] = _within(ratio["interval"], -np.inf, 1.0)
        cells.append(f"{key} {ratio['estimate']:.2f}")
    status = _overall(statuses.values())
    return {
        "status": status,
        "runs": statuses,
        "text": (
            "The S2SNet damps adversarial perturbations (median ||P(x+d) - P(x)||_2 / ||d||_2 "
            f"below 1): {status}: " + ", ".join(cells) + "."
        ),
    }


def gradient_claim(analysis):
    """Claim 2 from the counterfactual analysis."""
    if not analysis:
        return {"status": None, "text": "Gradients: not run (needs two or more classes)."}
    parts, statuses = [], []
    for key, claim in sorted(analysis["claims"].items()):
        statuses.append(claim["status"])
        diffs = ", ".join(
            f"{name} {d['estimate']:+.3f} [{d['interval'][0]:+.3f}, {d['interval'][1]:+.3f}]"
            for name, d in sorted(claim["differences"].items())
        )
        parts.append(f"{key} ({claim['direction']} claimed): {claim['status']} ({diffs})")
    return {
        "status": _overall(statuses),
        "text": f"Gradients ({analysis['num_images']} images): " + "; ".join(parts) + ".",
    }


def relations_claim(summary):
    """Claim 5 from the relations summary (rankings; point estimates)."""
    if not summary:
        return {"status": None, "text": "Relations: no transfer matrix."}
    same, tied = summary["same_order"], summary.get("tied_order", {})
    if None in same.values():
        status = "not comparable"
    elif any(not same[r] and not tied.get(r) for r in same):
        status = "different order"
    elif any(tied.values()):
        status = "undecided (tied drops)"
    else:
        status = "same order"
    examples = summary.get("num_examples")
    on = f" ({examples} examples; point estimates)" if examples else ""
    return {"status": status, "text": f"Relations{on}: {summary['statement']}"}


def claims(document):
    """{"1" .. "5": {"status", "text", ...}} of a report document."""
    results = document["results"]
    return {
        "1": clean_claim(results),
        "2": gradient_claim(document.get("counterfactual")),
        "3": effective_claim(document.get("effective_perturbations")),
        "4": white_gray_claim(results, document.get("baselines")),
        "5": relations_claim(document.get("relations")),
    }


def readme_text(document):
    """The README paragraph of a run's claims, written from its report document."""
    rows = claims(document)
    return "**The paper's claims on this model.** " + " ".join(
        f"({number}) {entry['text']}" for number, entry in rows.items()
    )
