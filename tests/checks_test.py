"""Tests for s2s_tf/robustness/checks.py: sanity checks decided by exact paired tests."""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from s2s_tf.robustness import checks
from s2s_tf.robustness import evaluation

N = 40
EPS = 8 / 255
CONFIG = evaluation.EvalConfig(
    attacks=("fgsm", "pgd"), adaptive_attacks=("pgd",), eps=(EPS,), steps=5, check_attack="pgd"
)


def _correct(fooled):
    """Per example: True unless its index is in `fooled`."""
    correct = np.ones(N, int)
    correct[list(fooled)] = 0
    return correct.tolist()


def _results(**fooled):
    """A results dict in which each run fools the examples given (default: the first 20)."""
    base = range(20)
    runs = {
        "white_box/fgsm": fooled.get("white_fgsm", range(10)),
        "white_box/pgd": fooled.get("white", base),
        "gray_box/pgd": fooled.get("gray", range(15)),
        "bpda/pgd": fooled.get("bpda", base),
        "surrogate/pgd": fooled.get("surrogate", base),
        "gradient_free/square": fooled.get("square", range(12)),
        "check_more_steps/pgd": fooled.get("more_steps", base),
        "check_restarts/pgd": fooled.get("restarts", base),
    }
    per_example = {f"{k}/8/255": _correct(v) for k, v in runs.items()}
    per_example["check_large_eps/pgd/64/255"] = _correct(fooled.get("large", range(N)))
    per_example["clean/defended"] = _correct([])
    threats = {}
    for key in runs:
        threat, attack = key.split("/")
        threats.setdefault(threat, {})[attack] = {"8/255": {}}
    return {"per_example": per_example, "threats": threats}


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

    @parameterized.named_parameters(
        ("large_eps_not_zero", dict(large=range(30)), "large eps"),
        ("more_steps_help", dict(more_steps=range(30)), "twice the steps"),
        ("restarts_help", dict(restarts=range(30)), "more restarts"),
        ("single_step_stronger", dict(white_fgsm=range(30)), "single-step"),
        ("gray_box_stronger", dict(gray=range(30)), "gray-box"),
        ("bpda_stronger", dict(bpda=range(30)), "bpda pgd does not beat"),
        ("surrogate_stronger", dict(surrogate=range(30)), "surrogate pgd does not beat"),
        ("gradient_free_stronger", dict(square=range(30)), "gradient_free square"),
    )
    def test_each_failure_is_reported(self, fooled, name_part):
        failed = _by_outcome(checks.sanity_checks(_results(**fooled), CONFIG))["failed"]
        self.assertLen(failed, 1, failed)
        self.assertIn(name_part, failed[0])

    def test_a_few_examples_difference_is_undecided_not_failed(self):
        # BPDA fools 3 more examples than white-box: too few discordant pairs to decide.
        outcome = _by_outcome(checks.sanity_checks(_results(bpda=range(23)), CONFIG))
        self.assertEqual(outcome["failed"], [])
        self.assertLen(outcome["undecided"], 1)
        self.assertIn("bpda", outcome["undecided"][0])

    def test_masking_is_judged_against_the_per_example_worst_white_box(self):
        # APGD fools 0-19 and FGSM 20-29: together 0-29, so BPDA fooling 0-29 is no stronger.
        results = _results(white_fgsm=range(20, 30), bpda=range(30))
        outcome = _by_outcome(checks.sanity_checks(results, CONFIG))
        self.assertFalse([n for n in outcome["failed"] if "bpda" in n], outcome)

    def test_adaptive_comparison_names_the_stronger_backward_pass(self):
        rows = checks.adaptive_comparison(_results(surrogate=range(35)), CONFIG)
        winners = {(r["a"], r["b"]): r["winner"] for r in rows}
        self.assertEqual(
            winners[("white_box/pgd/8/255", "surrogate/pgd/8/255")],
            "surrogate/pgd/8/255",
        )
        self.assertEqual(winners[("white_box/pgd/8/255", "bpda/pgd/8/255")], "neither")


if __name__ == "__main__":
    tf.test.main()
