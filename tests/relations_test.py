"""Tests for s2s_tf/analysis/relations.py: easiest to fool and best transfer from matrices."""

import tensorflow as tf

from s2s_tf.analysis import relations


def _matrices():
    # vgg falls fastest on its own attack; resnet's examples hurt the others most.
    small = {
        "vgg": {"vgg": 0.20, "resnet": 0.80, "alexnet": 0.75},
        "resnet": {"vgg": 0.60, "resnet": 0.40, "alexnet": 0.50},
        "alexnet": {"vgg": 0.85, "resnet": 0.85, "alexnet": 0.30},
    }
    large = {
        "vgg": {"vgg": 0.00, "resnet": 0.70, "alexnet": 0.60},
        "resnet": {"vgg": 0.30, "resnet": 0.00, "alexnet": 0.20},
        "alexnet": {"vgg": 0.70, "resnet": 0.75, "alexnet": 0.00},
    }
    return {"2/255": small, "8/255": large}


CLEAN = {"vgg": 0.9, "resnet": 0.9, "alexnet": 0.9}


class RelationsTest(tf.test.TestCase):
    def test_easiest_to_fool_and_best_transfer(self):
        summary = relations.summarize(_matrices(), CLEAN)
        self.assertEqual(summary["easiest_to_fool"], "vgg")
        self.assertEqual(summary["transfers_best"], "resnet")
        self.assertAlmostEqual(summary["transfer_drop"]["8/255"]["resnet"], ((0.9 - 0.3) + 0.7) / 2)
        self.assertEqual(summary["self_accuracy"]["alexnet"], {"2/255": 0.30, "8/255": 0.0})
        self.assertIn("vgg", summary["statement"])

    def test_ties_at_the_smallest_eps_are_broken_at_the_next(self):
        matrices = _matrices()
        matrices["2/255"]["alexnet"]["alexnet"] = 0.20  # ties with vgg at 2/255
        matrices["8/255"]["vgg"]["vgg"] = 0.05  # vgg is harder at 8/255
        self.assertEqual(relations.summarize(matrices, CLEAN)["easiest_to_fool"], "alexnet")

    def test_too_few_models(self):
        self.assertEqual(relations.summarize({"8/255": {"a": {"a": 0.1}}}, {"a": 0.9}), {})
        self.assertEqual(relations.summarize({}, CLEAN), {})


if __name__ == "__main__":
    tf.test.main()
