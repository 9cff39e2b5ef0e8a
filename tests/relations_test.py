"""Tests for s2s_tf/analysis/relations.py: claim 5's rankings, by drop, per group."""

import copy

import tensorflow as tf

from s2s_tf.analysis import relations
from s2s_tf.analysis import verdicts

# Unequal clean accuracies: resnet is left with the lowest accuracy under attack but loses
# the least, so ranking by the accuracy left and by the drop disagree.
CLEAN = {
    "vgg": 0.95,
    "resnet": 0.60,
    "alexnet": 0.80,
    "vgg+s2s": 0.90,
    "resnet+s2s": 0.55,
    "alexnet+s2s": 0.75,
}
# "16/255" sorts before "2/255" as text; the rankings must read the numerically smallest eps.
SMALL, LARGE = "2/255", "16/255"


def _engine_matrices():
    """The engine's matrices; the defended rows here come from the masked gradient."""
    small = {
        "vgg": {"vgg": 0.50, "resnet": 0.55, "alexnet": 0.75},
        "resnet": {"vgg": 0.90, "resnet": 0.30, "alexnet": 0.78},
        "alexnet": {"vgg": 0.90, "resnet": 0.58, "alexnet": 0.45},
    }
    large = {
        "vgg": {"vgg": 0.50, "resnet": 0.50, "alexnet": 0.60},
        "resnet": {"vgg": 0.20, "resnet": 0.00, "alexnet": 0.10},
        "alexnet": {"vgg": 0.80, "resnet": 0.55, "alexnet": 0.10},
    }
    matrices = {SMALL: small, LARGE: large}
    for eps, matrix in matrices.items():
        names = list(matrix)
        for name in names:
            # Masked end-to-end gradient: the defended models look unbeatable on their own.
            matrix[f"{name}+s2s"] = {t: 0.9 for t in (*names, *(f"{n}+s2s" for n in names))}
            matrix[name].update({f"{n}+s2s": 0.7 for n in names})
        del eps
    return matrices


def _defended_rows():
    """Rows of the examples made through each defended model's surrogate."""
    small = {
        "vgg+s2s": {"vgg+s2s": 0.40, "resnet+s2s": 0.50, "alexnet+s2s": 0.70},
        "resnet+s2s": {"vgg+s2s": 0.80, "resnet+s2s": 0.35, "alexnet+s2s": 0.70},
        "alexnet+s2s": {"vgg+s2s": 0.85, "resnet+s2s": 0.50, "alexnet+s2s": 0.45},
    }
    large = {
        "vgg+s2s": {"vgg+s2s": 0.10, "resnet+s2s": 0.45, "alexnet+s2s": 0.60},
        "resnet+s2s": {"vgg+s2s": 0.30, "resnet+s2s": 0.05, "alexnet+s2s": 0.20},
        "alexnet+s2s": {"vgg+s2s": 0.80, "resnet+s2s": 0.50, "alexnet+s2s": 0.10},
    }
    for rows in (small, large):
        for row in rows.values():
            row.update({"vgg": 0.6, "resnet": 0.4, "alexnet": 0.5})
    return {SMALL: small, LARGE: large}


class RelationsTest(tf.test.TestCase):
    def setUp(self):
        super().setUp()
        self.summary = relations.summarize(_engine_matrices(), CLEAN, _defended_rows())

    def test_ranks_undefended_by_drop_at_the_smallest_eps(self):
        plain = self.summary["groups"]["undefended"]
        self.assertEqual(
            self.summary["rank_eps"], {"easiest_to_fool": SMALL, "transfers_best": LARGE}
        )
        # Drops at 2/255: vgg 0.45, alexnet 0.35, resnet 0.30 (resnet has the least accuracy left).
        self.assertEqual(plain["easiest_to_fool"], ["vgg", "alexnet", "resnet"])
        self.assertAlmostEqual(plain["self_drop"]["vgg"][SMALL], 0.45)
        # At 16/255 the drops would rank alexnet (0.70) and resnet (0.60) first.
        self.assertAlmostEqual(plain["self_drop"]["alexnet"][LARGE], 0.70)

    def test_transfer_ranks_by_mean_drop_within_the_group_at_the_largest_eps(self):
        plain = self.summary["groups"]["undefended"]
        # resnet's examples at 16/255: vgg 0.95 - 0.20, alexnet 0.80 - 0.10.
        self.assertAlmostEqual(plain["transfer_drop"][LARGE]["resnet"], (0.75 + 0.70) / 2)
        self.assertEqual(plain["transfers_best"], ["resnet", "vgg", "alexnet"])

    def test_defended_models_ranked_apart_from_their_surrogate_rows(self):
        defended = self.summary["groups"]["defended"]
        self.assertEqual(defended["models"], ["vgg+s2s", "resnet+s2s", "alexnet+s2s"])
        self.assertEqual(defended["self_accuracy"]["vgg+s2s"], {SMALL: 0.40, LARGE: 0.10})
        # Drops at 2/255: vgg+s2s 0.50, alexnet+s2s 0.30, resnet+s2s 0.20.
        self.assertEqual(defended["easiest_to_fool"], ["vgg+s2s", "alexnet+s2s", "resnet+s2s"])
        # Within the defended group only: resnet+s2s's examples at 16/255 cost vgg+s2s 0.60
        # and alexnet+s2s 0.55 (the undefended targets' 0.4 / 0.5 do not count).
        self.assertAlmostEqual(defended["transfer_drop"][LARGE]["resnet+s2s"], (0.60 + 0.55) / 2)
        self.assertEqual(defended["transfers_best"][0], "resnet+s2s")
        self.assertEqual(
            self.summary["same_order"], {"easiest_to_fool": True, "transfers_best": True}
        )

    def test_orders_that_differ_are_reported(self):
        rows = _defended_rows()
        rows[SMALL]["resnet+s2s"]["resnet+s2s"] = 0.0  # now loses 0.55, the most
        summary = relations.summarize(_engine_matrices(), CLEAN, rows)
        self.assertEqual(summary["groups"]["defended"]["easiest_to_fool"][0], "resnet+s2s")
        self.assertFalse(summary["same_order"]["easiest_to_fool"])
        self.assertIn(
            "For easiest to fool the defended ranking is not the same as the undefended one",
            summary["statement"],
        )

    def test_a_defended_model_without_surrogate_rows_is_refused(self):
        rows = _defended_rows()
        del rows[LARGE]["alexnet+s2s"]
        with self.assertRaisesRegex(ValueError, r"alexnet\+s2s.*masked"):
            relations.summarize(_engine_matrices(), CLEAN, rows)

    def test_statement_is_written_from_the_numbers(self):
        text = self.summary["statement"]
        self.assertIn(f"at eps {SMALL} (points): vgg (45.0) > alexnet (35.0) > resnet (30.0)", text)
        self.assertIn("vgg+s2s (50.0) > alexnet+s2s (30.0) > resnet+s2s (20.0)", text)
        self.assertIn(f"at eps {LARGE} (points): resnet (72.5)", text)
        self.assertEqual(text, relations.statement(copy.deepcopy(self.summary)))

    def test_ties_are_shown(self):
        rows = _defended_rows()
        # alexnet+s2s now loses exactly what vgg+s2s loses, at both eps.
        rows[SMALL]["alexnet+s2s"]["alexnet+s2s"] = 0.25
        rows[LARGE]["alexnet+s2s"]["alexnet+s2s"] = -0.05
        defended = relations.summarize(_engine_matrices(), CLEAN, rows)["groups"]["defended"]
        self.assertEqual(defended["tied"]["easiest_to_fool"], [True, False])
        self.assertIn(
            "alexnet+s2s (50.0) = vgg+s2s (50.0) > resnet+s2s",
            relations.statement(relations.summarize(_engine_matrices(), CLEAN, rows)),
        )

    def test_a_tie_at_the_shown_eps_names_the_eps_that_orders_it(self):
        rows = _defended_rows()
        # alexnet+s2s loses what vgg+s2s loses at 2/255 (0.50), less at 16/255.
        rows[SMALL]["alexnet+s2s"]["alexnet+s2s"] = 0.25
        summary = relations.summarize(_engine_matrices(), CLEAN, rows)
        self.assertEqual(summary["groups"]["defended"]["tied"]["easiest_to_fool"], [False, False])
        self.assertIn(
            f"vgg+s2s (50.0) > alexnet+s2s (50.0; ordered at {LARGE}: 80.0 > 65.0)",
            summary["statement"],
        )

    def test_a_tie_leaves_the_comparison_undecided(self):
        matrices = _engine_matrices()
        # alexnet's examples now cost vgg and resnet (0.90 + 0.55) / 2 at 16/255, what
        # resnet's cost vgg and alexnet (0.75 + 0.70) / 2; at 2/255 both cost 0.035.
        matrices[LARGE]["alexnet"].update(vgg=0.05, resnet=0.05)
        summary = relations.summarize(matrices, CLEAN, _defended_rows())
        plain = summary["groups"]["undefended"]
        self.assertIn(True, plain["tied"]["transfers_best"], plain["transfer_drop"])
        self.assertEqual(summary["tied_order"], {"easiest_to_fool": False, "transfers_best": True})
        self.assertIn(
            "for best transfer the rankings cannot be compared (a tie in a group)",
            summary["statement"],
        )
        document = {"relations": summary}
        self.assertEqual(
            verdicts.relations_claim(document["relations"])["status"], "undecided (tied drops)"
        )
        untied = relations.summarize(_engine_matrices(), CLEAN, _defended_rows())
        self.assertEqual(verdicts.relations_claim(untied)["status"], "same order")

    def test_small_groups(self):
        matrices = {
            SMALL: {"a": {"a": 0.1, "defended": 0.5}, "defended": {"a": 0.4, "defended": 0.2}}
        }
        summary = relations.summarize(matrices, {"a": 0.9, "defended": 0.8}, matrices)
        self.assertEqual(summary["groups"]["undefended"], {"models": ["a"]})
        self.assertEqual(summary["same_order"], {"easiest_to_fool": None, "transfers_best": None})
        self.assertIn("fewer than two models (a)", summary["statement"])
        self.assertEqual(relations.summarize({}, CLEAN), {})

    def test_names(self):
        self.assertTrue(relations.is_defended("defended"))
        self.assertTrue(relations.is_defended("vgg+s2s"))
        self.assertFalse(relations.is_defended("classifier"))
        self.assertEqual(relations.partner("defended"), "classifier")
        self.assertEqual(relations.partner("vgg+s2s"), "vgg")
        self.assertAlmostEqual(relations.eps_value("16/255"), 16 / 255)


if __name__ == "__main__":
    tf.test.main()
