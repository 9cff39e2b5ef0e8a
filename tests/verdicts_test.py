"""Tests for the claims' verdicts (verdicts.py) and their report sections (claims_report.py)."""

import json

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from s2s_tf.analysis import claims_report
from s2s_tf.analysis import counterfactual
from s2s_tf.analysis import verdicts

N = 200
SMALL, LARGE = "2/255", "16/255"  # "16/255" sorts first as text


def _correct(fooled, n=N):
    """bool [n], False on the examples in `fooled`."""
    out = np.ones(n, bool)
    out[list(fooled)] = False
    return out


def _results(runs, clean_classifier=None):
    """Evaluation results holding the given runs: {key: (source, full, fooled examples)}."""
    per_example = {
        "clean/defended": [1] * N,
        "clean/classifier": [
            int(c) for c in (clean_classifier if clean_classifier is not None else _correct([]))
        ],
    }
    infos = {}
    for key, (source, full, fooled) in runs.items():
        threat, attack, eps = key.split("/", 2)
        per_example[key] = [int(c) for c in _correct(fooled)]
        infos[key] = {
            "threat": threat,
            "source": source,
            "attack": attack,
            "eps": eps,
            "full": full,
        }
    headline = {}
    for eps in (SMALL, LARGE):
        robust = np.ones(N, bool)
        for key in runs:
            if key.endswith(eps):
                robust &= np.asarray(per_example[key], bool)
        headline[eps] = {"robust_accuracy": float(robust.mean()), "ci95": [0.0, 1.0]}
    return {
        "num_examples": N,
        "clean": {"classifier": 1.0, "defended": 1.0},
        "per_example": per_example,
        "runs": infos,
        "headline": headline,
    }


def _comparable_runs():
    """Gray-box and white-box family fool the same 40 examples at each eps."""
    runs = {}
    for eps in (SMALL, LARGE):
        runs[f"gray_box/apgd_ce/{eps}"] = ("gray_box", True, range(40))
        runs[f"white_box/apgd_ce/{eps}"] = ("white_box", True, range(40))
        runs[f"bpda/apgd_ce/{eps}"] = ("bpda", True, range(38))
    return runs


class CleanClaimTest(tf.test.TestCase):
    def test_kept_lost_and_undecided(self):
        kept = verdicts.clean_claim(_results({}))
        self.assertEqual(kept["status"], verdicts.SUPPORTED)
        # The classifier is right on 30 examples the defended model gets wrong.
        results = _results({})
        results["per_example"]["clean/defended"] = [int(c) for c in _correct(range(30))]
        lost = verdicts.clean_claim(results)
        self.assertEqual(lost["status"], verdicts.CONTRADICTED)
        self.assertAlmostEqual(lost["difference"]["estimate"], -0.15)
        results["per_example"]["clean/defended"] = [int(c) for c in _correct(range(4))]
        self.assertEqual(verdicts.clean_claim(results)["status"], verdicts.UNDECIDED)


class WhiteGrayTest(tf.test.TestCase, parameterized.TestCase):
    def test_comparable(self):
        claim = verdicts.white_gray_claim(_results(_comparable_runs()))
        self.assertEqual(claim["status"], verdicts.SUPPORTED)
        self.assertEqual(list(claim["by_eps"]), [SMALL, LARGE])

    def test_the_white_box_family_is_a_per_example_worst_case(self):
        runs = _comparable_runs()
        # Each white-box-family run alone fools 40, but different ones: together 80.
        runs[f"bpda/apgd_ce/{LARGE}"] = ("bpda", True, range(40, 80))
        runs[f"surrogate@1/apgd_ce/{LARGE}"] = ("surrogate@1", True, range(40))
        claim = verdicts.white_gray_claim(_results(runs))
        self.assertAlmostEqual(claim["by_eps"][LARGE]["white_box"], 0.6)
        self.assertAlmostEqual(claim["by_eps"][LARGE]["gray_box"], 0.8)
        self.assertEqual(claim["by_eps"][LARGE]["status"], verdicts.CONTRADICTED)
        self.assertEqual(claim["status"], verdicts.CONTRADICTED)

    def test_cascade_runs_do_not_count(self):
        runs = _comparable_runs()
        # A cascade run attacked only what was left: its per-example 1s are not "robust".
        runs[f"white_box/apgd_t/{LARGE}"] = ("white_box", False, range(100, 180))
        claim = verdicts.white_gray_claim(_results(runs))
        self.assertEqual(claim["by_eps"][LARGE]["status"], verdicts.SUPPORTED)

    def test_baselines_beside(self):
        baseline = {
            "title": "t",
            "threat_models": ["bpda"],
            "results": _results(_comparable_runs()),
        }
        baseline["results"]["headline"][LARGE]["robust_accuracy"] = 0.25
        claim = verdicts.white_gray_claim(_results(_comparable_runs()), {"jpeg": baseline})
        self.assertIn("jpeg 25.0%", claim["text"])
        self.assertEqual(claim["baselines"]["jpeg"][LARGE]["status"], verdicts.SUPPORTED)


def _ratio(estimate, low, high):
    median = {"estimate": estimate, "interval": [low, high]}
    return {"num_perturbed": 10, "l2": {"ratio": {"median": median}}, "linf": {}}


class EffectiveClaimTest(tf.test.TestCase):
    def test_against_one(self):
        below = {"white_box/a/2/255": _ratio(0.5, 0.4, 0.6), "bpda/a/2/255": _ratio(0.7, 0.6, 0.8)}
        self.assertEqual(verdicts.effective_claim(below)["status"], verdicts.SUPPORTED)
        above = {**below, "white_box/a/16/255": _ratio(2.8, 2.0, 3.5)}
        self.assertEqual(verdicts.effective_claim(above)["status"], verdicts.CONTRADICTED)
        straddles = {**below, "white_box/a/16/255": _ratio(1.0, 0.8, 1.2)}
        self.assertEqual(verdicts.effective_claim(straddles)["status"], verdicts.UNDECIDED)


def _document():
    diff = {"estimate": -0.1, "interval": [-0.2, -0.05]}
    return {
        "config": {"attack": {"threat_models": ["gray_box", "white_box", "bpda"]}},
        "results": _results(_comparable_runs()),
        "counterfactual": {
            "num_images": 8,
            "top_k": 3,
            "claims": {
                "structure_alignment": {
                    "status": counterfactual.NOT_SUPPORTED,
                    "direction": "higher",
                    "models": {"s2s": diff},
                    "differences": {"s2s - classifier": diff},
                    "verdict": "v",
                },
                "class_dependent_share": {
                    "status": counterfactual.SUPPORTED,
                    "direction": "lower",
                    "models": {"s2s": diff},
                    "differences": {"s2s - reconstruction": diff, "s2s - classifier": diff},
                    "verdict": "v",
                },
            },
        },
        # Not in sorted order: json.dumps(sort_keys=True) reorders them.
        "effective_perturbations": {
            "white_box/a/2/255": _ratio(0.7, 0.6, 0.8),
            "white_box/a/16/255": _ratio(0.5, 0.4, 0.6),
        },
        "baselines": {},
        "relations": {},
    }


class DocumentTest(tf.test.TestCase):
    def test_the_same_text_from_the_document_and_its_json(self):
        document = _document()
        text = verdicts.readme_text(document)
        again = json.loads(json.dumps(document, sort_keys=True))
        self.assertEqual(verdicts.readme_text(again), text)
        self.assertLess(text.index("(1)"), text.index("(5)"))
        # Claim 2's status: any counterfactual statistic not supported leaves it undecided.
        self.assertEqual(verdicts.claims(document)["2"]["status"], verdicts.UNDECIDED)

    def test_report_sections_carry_the_table_and_the_readme_text(self):
        document = _document()
        markdown = "\n".join(claims_report.sections(document))
        self.assertIn("> " + verdicts.readme_text(document), markdown)
        for number, entry in verdicts.claims(document).items():
            self.assertIn(f"| {number} | {entry['status'] or 'not run'} |", markdown)
        self.assertIn("### Claim 4", markdown)
        # Eps columns in numeric order, though "16/255" sorts first as text.
        self.assertIn(f"| defense | threat models | clean | {SMALL} | {LARGE} |", markdown)


if __name__ == "__main__":
    tf.test.main()
