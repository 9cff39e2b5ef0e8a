"""Tests for s2s_tf/robustness/checks.py: convergence and masking checks by exact paired tests."""

import dataclasses

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from s2s_tf.analysis import report
from s2s_tf.robustness import checks
from s2s_tf.robustness import evaluation

N = 40
EPS = 8 / 255
CONFIG = evaluation.EvalConfig(
    attacks=("pgd", "fgsm"),
    eps=(EPS,),
    steps=5,
    check_attack="pgd",
    surrogate_temperatures=(1.0, 3.0),
)


def _correct(fooled):
    """Per example: True unless its index is in `fooled`."""
    correct = np.ones(N, int)
    correct[list(fooled)] = 0
    return correct.tolist()


def _results(**fooled):
    """A results dict in which each run fools the examples given (default: the first 20).

    The reference runs (pgd) and the reruns attack every example; the cascade runs
    (fgsm, square) only what is left, and count as "new" what they fool.
    """
    base = range(20)
    full = {
        "white_box": fooled.get("white", base),
        "gray_box": fooled.get("gray", range(15)),
        "bpda": fooled.get("bpda", base),
        "surrogate@1": fooled.get("surrogate", base),
        "surrogate@3": fooled.get("surrogate_hot", range(5)),
        "check_more_steps": fooled.get("more_steps", base),
        "check_restarts": fooled.get("restarts", base),
        "check_base": fooled.get("surrogate", base),
    }
    if "more_steps_x4" in fooled:  # a second round, based on the first
        full["check_more_steps_x4"] = fooled["more_steps_x4"]
    if "restarts_r5" in fooled:  # the restarts' second round: 1 + 2 * 2 restarts
        full["check_restarts_r5"] = fooled["restarts_r5"]
    per_example, runs = {}, {}
    for threat, examples in full.items():
        key = evaluation.run_key(threat, "pgd", EPS)
        per_example[key] = _correct(examples)
        runs[key] = {
            "threat": threat,
            "source": "surrogate@1",
            "attack": "pgd",
            "eps": "8/255",
            "full": True,
            "fooled": len(examples),
            "new": 0,
        }
    del runs[evaluation.run_key("check_base", "pgd", EPS)]
    new = fooled.get("square_new", 0)
    key = "gradient_free/square/8/255"
    per_example[key] = _correct(range(20, 20 + new))
    runs[key] = {
        "threat": "gradient_free",
        "source": "gradient_free",
        "attack": "square",
        "eps": "8/255",
        "full": False,
        "fooled": new,
        "new": new,
    }
    large = evaluation.run_key("check_large_eps", "pgd", CONFIG.large_eps)
    per_example[large] = _correct(fooled.get("large", range(N)))
    runs[large] = {
        "threat": "check_large_eps",
        "source": "surrogate@1",
        "attack": "pgd",
        "eps": evaluation.eps_key(CONFIG.large_eps),
        "full": True,
        "fooled": 0,
        "new": 0,
    }
    per_example["clean/defended"] = _correct([])
    return {"per_example": per_example, "runs": runs}


def _by_outcome(found):
    return {
        "failed": [c["name"] for c in found if c["passed"] is False],
        "undecided": [c["name"] for c in found if c["passed"] is None],
    }


class ChecksTest(parameterized.TestCase, tf.test.TestCase):
    def test_an_honest_result_passes_everything(self):
        found = checks.sanity_checks(_results(), CONFIG)
        self.assertGreaterEqual(len(found), 8)
        self.assertEqual(_by_outcome(found), {"failed": [], "undecided": []})
        for check in found[1:]:
            self.assertIn("McNemar p", check["detail"])
        self.assertIn("surrogate@1 accuracy falls", found[0]["name"])

    @parameterized.named_parameters(
        ("large_eps_not_zero", dict(large=range(30)), "large eps"),
        (
            "more_steps_help",
            dict(more_steps=range(30)),
            "twice the steps do not help pgd on surrogate@1",
        ),
        ("restarts_help", dict(restarts=range(30)), "more restarts"),
        ("gray_box_stronger", dict(gray=range(30)), "gray_box pgd does not beat white-box"),
        ("bpda_stronger", dict(bpda=range(30)), "bpda pgd does not beat"),
        ("surrogate_stronger", dict(surrogate=range(30)), "surrogate@1 pgd does not beat"),
        ("square_in_the_cascade", dict(square_new=8), "gradient_free square"),
    )
    def test_each_failure_is_reported(self, fooled, name_part):
        if "surrogate" in fooled:  # the reruns start from the strongest, the surrogate
            fooled.setdefault("more_steps", fooled["surrogate"])
            fooled.setdefault("restarts", fooled["surrogate"])
        failed = _by_outcome(checks.sanity_checks(_results(**fooled), CONFIG))["failed"]
        self.assertLen(failed, 1, failed)
        self.assertIn(name_part, failed[0])

    def test_a_few_examples_difference_is_undecided_not_failed(self):
        # BPDA fools 3 more examples than white-box: too few discordant pairs to decide.
        outcome = _by_outcome(checks.sanity_checks(_results(bpda=range(23)), CONFIG))
        self.assertEqual(outcome["failed"], [])
        self.assertLen(outcome["undecided"], 1)
        self.assertIn("bpda", outcome["undecided"][0])

    @parameterized.named_parameters(
        ("converged", dict(), True),
        ("more_steps_help", dict(more_steps=range(30)), False),
        ("restarts_help_a_little", dict(restarts=range(23)), None),
    )
    def test_convergence_verdict(self, fooled, expected):
        convergence = checks.convergence(_results(**fooled), CONFIG)
        self.assertEqual(convergence["8/255"]["source"], "surrogate@1")
        self.assertIs(convergence["8/255"]["converged"], expected)
        self.assertIs(checks.overall_convergence(convergence), expected)

    @parameterized.named_parameters(
        # Round 1 (twice the steps) fools 10 more; round 2 (4x) none beyond round 1.
        ("second_round_converges", dict(more_steps=range(30), more_steps_x4=range(30)), True),
        # Round 2 still fools 10 more than round 1 did.
        ("second_round_helps", dict(more_steps=range(30), more_steps_x4=range(40)), False),
        # Round 1 fooled nothing new but round 2 does: the last round decides.
        ("late_help", dict(more_steps_x4=range(30)), False),
    )
    def test_the_last_round_decides(self, fooled, expected):
        results = _results(**fooled)
        convergence = checks.convergence(results, CONFIG)["8/255"]
        self.assertIs(convergence["converged"], expected)
        self.assertEqual(convergence["deciding"], ["more_steps_x4", "more_restarts"])
        # Round 2 is paired with round 1, not with the reference run.
        self.assertEqual(
            convergence["more_steps_x4"]["only_b"],
            len(fooled["more_steps_x4"]) - len(fooled.get("more_steps", range(20))),
        )
        failed = _by_outcome(checks.sanity_checks(results, CONFIG))["failed"]
        self.assertEqual(bool(failed), not expected, failed)
        self.assertTrue(all("4x the steps" in name for name in failed), failed)

    @parameterized.named_parameters(
        # Round 1 (3 restarts) fools 10 more; round 2 (5 restarts) none beyond round 1.
        ("second_round_converges", dict(restarts=range(30), restarts_r5=range(30)), True),
        ("second_round_helps", dict(restarts=range(30), restarts_r5=range(40)), False),
        # Round 1 fooled 3 more (undecided), round 2 none beyond it: converged.
        ("settled_by_round_two", dict(restarts=range(23), restarts_r5=range(23)), True),
    )
    def test_the_last_restarts_round_decides(self, fooled, expected):
        results = _results(**fooled)
        convergence = checks.convergence(results, CONFIG)["8/255"]
        self.assertEqual(convergence["deciding"], ["more_steps", "more_restarts_r5"])
        self.assertIs(convergence["converged"], expected)
        self.assertEqual(
            convergence["more_restarts_r5"]["only_b"],
            len(fooled["restarts_r5"]) - len(fooled["restarts"]),
        )
        failed = _by_outcome(checks.sanity_checks(results, CONFIG))["failed"]
        self.assertTrue(all("5 restarts" in name for name in failed), failed)
        self.assertEqual(bool(failed), not expected, failed)

    def test_the_report_shows_every_round_of_both_reruns(self):
        results = _results(
            more_steps=range(30), more_steps_x4=range(30), restarts=range(25), restarts_r5=range(26)
        )
        results["convergence"] = checks.convergence(results, CONFIG)
        results["converged"] = checks.overall_convergence(results["convergence"])
        table = "\n".join(report._convergence_section(results))
        self.assertIn(
            "| 8/255 | surrogate@1 | 2x: 10 more / 0 fewer (p = 0.00195); x4: 0 more / 0 fewer "
            "(p = 1) | +extra: 5 more / 0 fewer (p = 0.0625); r5: 1 more / 0 fewer (p = 1) | "
            "undecided |",
            table,
        )

    def test_the_reruns_of_each_round(self):
        config = dataclasses.replace(CONFIG, convergence_rounds=3, restarts=2)
        plan = [(r.run, r.base, r.overrides) for r in evaluation.convergence_reruns(config)]
        self.assertEqual(
            plan,
            [
                ("check_more_steps", "check_base", {"steps": 10}),
                ("check_restarts", "check_base", {"restarts": 4}),
                ("check_more_steps_x4", "check_more_steps", {"steps": 20}),
                ("check_restarts_r6", "check_restarts", {"restarts": 6}),
                ("check_more_steps_x8", "check_more_steps_x4", {"steps": 40}),
                ("check_restarts_r10", "check_restarts_r6", {"restarts": 10}),
            ],
        )

    def test_overall_convergence(self):
        def of(*verdicts):
            return checks.overall_convergence({i: {"converged": v} for i, v in enumerate(verdicts)})

        self.assertIs(of(True, True), True)
        self.assertIs(of(True, None), None)
        self.assertIs(of(None, False), False)
        self.assertIsNone(of())

    def test_adaptive_comparison_names_the_stronger_backward_pass(self):
        rows = checks.adaptive_comparison(_results(surrogate=range(35)), CONFIG)
        winners = {(r["a"], r["b"]): r["winner"] for r in rows}
        pairs = {frozenset(p): w for p, w in winners.items()}
        self.assertEqual(
            pairs[frozenset(("white_box/pgd/8/255", "surrogate@1/pgd/8/255"))],
            "surrogate@1/pgd/8/255",
        )
        self.assertEqual(pairs[frozenset(("white_box/pgd/8/255", "bpda/pgd/8/255"))], "neither")
        self.assertNotIn("check_more_steps/pgd/8/255", {k for p in pairs for k in p})

    def test_surrogate_sweep_names_the_winning_temperature(self):
        sweep = checks.surrogate_sweep(_results(), CONFIG)
        self.assertEqual(sweep["8/255"]["fooled"], {"surrogate@1": 20, "surrogate@3": 5})
        self.assertEqual(sweep["8/255"]["winner"], "surrogate@1")
        hot = checks.surrogate_sweep(_results(surrogate_hot=range(25)), CONFIG)
        self.assertEqual(hot["8/255"]["winner"], "surrogate@3")


if __name__ == "__main__":
    tf.test.main()
