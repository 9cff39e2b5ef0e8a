"""Tests for s2s_tf/robustness/merging.py: shards' results merge into one run's results."""

import copy
import json

import numpy as np
import tensorflow as tf

from s2s_tf.analysis import report
from s2s_tf.robustness import evaluation
from s2s_tf.robustness import merging

CONFIG = evaluation.EvalConfig(attacks=("apgd_ce",), threat_models=("white_box",), eps=(8 / 255,))
RUN = "white_box/apgd_ce/8/255"


def _part(correct, classifier, source="white_box", seconds=1.5, difference=0.25):
    """An `Evaluator.run()` result of len(correct) examples, every one clean-correct."""
    n = len(correct)
    return {
        "num_examples": n,
        "clean": {"defended": 1.0, "classifier": sum(classifier) / n},
        "timing": {RUN: seconds},
        "gradient_difference": {"white_box": difference},
        "runs": {
            RUN: {
                "threat": "white_box",
                "source": source,
                "attack": "apgd_ce",
                "eps": "8/255",
                "full": True,
                "attacked": n,
                "fooled": n - sum(correct),
                "new": n - sum(correct),
                "robust_after": sum(correct),
                "seconds": seconds,
            }
        },
        "per_example": {
            "clean/defended": [1] * n,
            "clean/classifier": list(classifier),
            RUN: list(correct),
        },
    }


def _plain(results):
    """`results` as the report's JSON stores them (per-example arrays as lists)."""
    return json.loads(json.dumps(results, default=report.jsonable))


class MergeTest(tf.test.TestCase):
    def test_parts_merge_into_the_results_of_all_their_examples(self):
        # Parts of the same size with the same counts: counts still add up.
        first = _part([1, 0, 1, 0], [1, 0, 0, 0], difference=0.25)
        second = _part([0, 1, 0, 1], [1, 1, 1, 0], difference=0.75)
        merged = merging.merge(copy.deepcopy([first, second]), CONFIG)
        whole = _part([1, 0, 1, 0, 0, 1, 0, 1], [1, 0, 0, 0, 1, 1, 1, 0], seconds=3.0)
        self.assertEqual(_plain(merged), _plain(merging.merge([whole], CONFIG)))
        # One byte per example and run, whatever the parts held.
        self.assertEqual(merged["per_example"][RUN].dtype, np.uint8)
        self.assertEqual(merged["per_example"][RUN].tolist(), [1, 0, 1, 0, 0, 1, 0, 1])
        self.assertEqual(merged["num_examples"], 8)
        self.assertEqual(merged["runs"][RUN]["attacked"], 8)
        self.assertEqual(merged["clean"]["classifier"], 0.5)  # 1/4 and 3/4, exactly
        self.assertEqual(merged["timing"][RUN], 3.0)
        self.assertEqual(merged["headline"]["8/255"]["robust"], 4)
        self.assertEqual(merged["threats"]["white_box"]["apgd_ce"]["8/255"]["defended"], 0.5)
        # Computed on an Evaluator's first examples: the split's are the first part's.
        self.assertEqual(merged["gradient_difference"], {"white_box": 0.25})

    def test_choices_that_differ_are_listed_with_their_examples(self):
        parts = [_part([1, 0], [1, 1]), _part([1, 1, 0], [1, 0, 0], source="bpda")]
        merged = merging.merge(parts, CONFIG)
        self.assertEqual(merged["runs"][RUN]["source"], "white_box (2 examples), bpda (3 examples)")

    def test_a_run_missing_from_some_parts(self):
        check = "check_large_eps/apgd_ce/64/255"
        first, second = _part([1, 0], [1, 1]), _part([1, 1], [1, 0])
        first["per_example"][check] = [0, 0]
        merged = merging.merge(copy.deepcopy([first, second]), CONFIG)
        self.assertNotIn(check, merged["per_example"])
        self.assertEqual(merged["runs_not_in_every_shard"], {check: "in 1 of 2 shards"})
        # A run that counts in the headline cannot be left out.
        first["per_example"]["white_box/pgd/8/255"] = [0, 0]
        with self.assertRaisesRegex(ValueError, "count in the headline"):
            merging.merge([first, second], CONFIG)

    def test_values_that_no_rule_settles_are_an_error(self):
        first, second = _part([1, 0], [1, 1]), _part([1, 1], [1, 0])
        first["surrogate_scales"], second["surrogate_scales"] = {"pool1": 1.3}, {"pool1": 1.7}
        with self.assertRaisesRegex(ValueError, "disagree on .*surrogate_scales/pool1"):
            merging.merge([first, second], CONFIG)
        first["surrogate_scales"] = second["surrogate_scales"]  # measured once: kept
        self.assertEqual(merging.merge([first, second], CONFIG)["surrogate_scales"]["pool1"], 1.7)

    def test_bad_parts_are_named(self):
        with self.assertRaisesRegex(ValueError, "no shard results"):
            merging.merge([], CONFIG)
        short = _part([1, 0], [1, 1])
        short["per_example"][RUN] = [1]
        with self.assertRaisesRegex(ValueError, "has 1 results in shard 0 of 2 examples"):
            merging.merge([short], CONFIG)


if __name__ == "__main__":
    tf.test.main()
