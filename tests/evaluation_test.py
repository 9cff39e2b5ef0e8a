"""Tests for s2s_tf/robustness/evaluation.py: configs, presets, the Evaluator, transfer."""

import time
from unittest import mock

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import s2s_model
from s2s_tf.robustness import evaluation
from s2s_tf.robustness import runner

# Nearest-template classifiers: accurate on `_template_images`, each on its own pixels.
TEMPLATE_SEED = 7
NUM_TEMPLATES = 3


def _templates(shape):
    rng = np.random.default_rng(TEMPLATE_SEED)
    return 0.5 + rng.uniform(-0.05, 0.05, (NUM_TEMPLATES, *shape))


def _template_images(shape, n):
    """Noisy copies of the class templates, and their labels."""
    rng = np.random.default_rng(TEMPLATE_SEED + 1)
    labels = np.arange(n) % NUM_TEMPLATES
    images = _templates(shape)[labels] + rng.normal(0.0, 0.02, (n, *shape))
    return np.clip(images, 0.0, 1.0).astype(np.float32), labels


def _template_classifier(pixels, name):
    """Logit k = 2<x, T_k> - |T_k|^2 over the pixels where the bool mask `pixels` is set."""
    mask = pixels.reshape(-1)
    templates = _templates(pixels.shape).reshape(NUM_TEMPLATES, -1) * mask
    inputs = keras.Input(pixels.shape)
    dense = keras.layers.Dense(NUM_TEMPLATES)
    model = keras.Model(inputs, dense(keras.layers.Flatten()(inputs)), name=name)
    dense.set_weights([2.0 * templates.T, -np.sum(np.square(templates), axis=1)])
    return model


def _accuracy(model, images, labels):
    """Fraction of `images` that `model` (a Keras model) classifies as `labels`, by argmax."""
    return float(np.mean(np.argmax(model(images), -1) == labels))


def _transfer_by_hand(named, images, labels, config):
    """The transfer matrix: each source's `run_attack` examples scored on every target."""
    expected = {}
    for source_name, source in named.items():
        adversarial = runner.run_attack(
            config.transfer_attack,
            source,
            images,
            labels,
            max(config.eps),  # the default transfer_eps
            steps=config.steps,
            restarts=config.restarts,
            batch_size=config.batch_size,
            seed=config.seed,
        )
        expected[source_name] = {
            target_name: _accuracy(target, adversarial, labels)
            for target_name, target in named.items()
        }
    return expected


class EvalConfigTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.named_parameters(
        ("attack", dict(attacks=("nope",)), "unknown attacks"),
        ("threat", dict(threat_models=("black_box",)), "unknown threat"),
        ("eps", dict(eps=(2.0,)), "eps"),
        ("examples", dict(num_examples=0), "num_examples"),
        ("reference", dict(attacks=("pgd",), check_attack="fgsm"), "check_attack"),
        ("no_gradients", dict(attacks=("apgd_ce", "square")), "must use gradients"),
        ("temperature", dict(surrogate_temperatures=(0.0,)), "surrogate_temperatures"),
    )
    def test_bad_config(self, kwargs, pattern):
        with self.assertRaisesRegex(ValueError, pattern):
            evaluation.EvalConfig(**kwargs).validate()

    def test_presets(self):
        fast, standard = evaluation.preset("fast"), evaluation.preset("standard")
        self.assertGreaterEqual(standard.num_examples, 500)
        self.assertEqual(standard.steps, 100)
        self.assertEqual(standard.target_classes, 9)
        self.assertEqual(standard.gradient_free_queries, 5000)
        self.assertIsNone(standard.gradient_free_examples)  # Square sees every example
        self.assertGreaterEqual(len(standard.surrogate_temperatures), 3)
        for attack in ("apgd_ce", "apgd_t", "apgd_dlr", "fab_t"):
            self.assertIn(attack, standard.attacks)
        self.assertIn("square", standard.gradient_free_attacks)
        self.assertLessEqual(set(fast.attacks), set(standard.attacks))
        self.assertIn("apgd_t", fast.attacks)
        self.assertLess(fast.steps, standard.steps)
        # At 50 steps APGD's checkpoints stay apart; at 20 they fall on every step.
        self.assertGreaterEqual(fast.steps, 50)
        self.assertTrue(fast.cascade and standard.cascade)
        self.assertEqual(evaluation.preset("fast", steps=7).steps, 7)
        with self.assertRaisesRegex(ValueError, "unknown attack preset"):
            evaluation.preset("strong")


def _tiny_models(shape, others=None):
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape)
    logits = keras.layers.Dense(3)(keras.layers.Flatten()(inputs))
    classifier = keras.Model(inputs, logits)
    ae = ae_lib.build_autoencoder(ae_lib.AutoencoderConfig(stage_widths=((4,),)), shape)
    return evaluation.Models(
        classifier=classifier,
        defended=s2s_model.build_s2s_model(ae, classifier),
        purifier=s2s_model.build_purifier(ae, shape),
        others=others or {},
    )


def _accurate_defended_models(shape):
    """An untrained autoencoder and, behind it, a nearest-template classifier of the
    purified templates: the defended model is right on `_template_images`."""
    keras.utils.set_random_seed(0)
    ae = ae_lib.build_autoencoder(ae_lib.AutoencoderConfig(stage_widths=((4,),)), shape)
    purifier = s2s_model.build_purifier(ae, shape)
    purified = np.asarray(purifier(_templates(shape).astype(np.float32))).reshape(NUM_TEMPLATES, -1)
    inputs = keras.Input(shape)
    dense = keras.layers.Dense(NUM_TEMPLATES)
    classifier = keras.Model(inputs, dense(keras.layers.Flatten()(inputs)))
    dense.set_weights([2.0 * purified.T, -np.sum(np.square(purified), axis=1)])
    return evaluation.Models(classifier, s2s_model.build_s2s_model(ae, classifier), purifier)


def _noisy_gradient(model):
    """`model` forward; backward, a fixed random direction (a masked gradient)."""

    @tf.custom_gradient
    def scramble(x):
        def grad(upstream):
            del upstream
            return tf.random.stateless_normal(tf.shape(x), seed=(5, 6))

        return tf.identity(x), grad

    return lambda x: model(scramble(x))


def _small_config(**overrides):
    settings = dict(
        attacks=("pgd", "fgsm"),
        eps=(4 / 255, 16 / 255),
        num_examples=12,
        batch_size=4,
        steps=3,
        gradient_free_attacks=("testing",),
        surrogate_temperatures=(1.0,),
        surrogate_calibration_examples=4,
        check_attack="pgd",
        threat_models=("surrogate", "bpda", "white_box", "gray_box", "gradient_free"),
        convergence_rounds=1,
    )
    settings.update(overrides)
    return evaluation.EvalConfig(**settings)


class EvaluatorTest(tf.test.TestCase):
    def test_runs_every_threat_model_on_a_tiny_model(self):
        shape = (8, 8, 3)
        models = _tiny_models(shape, {"other": _template_classifier(np.ones(shape, bool), "o")})
        rng = np.random.default_rng(0)
        images = rng.uniform(size=(6, *shape)).astype(np.float32)
        labels = np.asarray(models.classifier(images)).argmax(-1)  # the classifier is right
        config = _small_config(
            num_examples=6,
            batch_size=3,
            gradient_free_examples=2,
            threat_models=(
                "gray_box",
                "white_box",
                "bpda",
                "surrogate",
                "gradient_free",
                "transfer",
            ),
        )
        messages = []
        evaluator = evaluation.Evaluator(models, images, labels, config, messages.append)
        results = evaluator.run()
        self.assertEqual(results["clean"]["classifier"], 1.0)
        threats = set(results["threats"])
        self.assertLessEqual(
            {"gray_box", "white_box", "bpda", "surrogate@1", "gradient_free"}, threats
        )
        self.assertLessEqual({"check_large_eps", "check_more_steps", "check_restarts"}, threats)
        self.assertEqual(results["runs"]["gradient_free/testing/4/255"]["attacked"] <= 2, True)
        self.assertEqual(set(results["threats"]["white_box"]["pgd"]), {"4/255", "16/255"})
        self.assertEqual(set(results["surrogate_scales"]), {"pool1"})
        # The gray-box reference row also reports the undefended classifier.
        gray = results["threats"]["gray_box"]["pgd"]["16/255"]
        self.assertLess(gray["classifier"], 1.0)
        matrix = results["transfer"]["matrix"]
        self.assertEqual(set(matrix), {"classifier", "defended", "other"})
        for row in matrix.values():
            self.assertEqual(set(row), {"classifier", "defended", "other"})
        self.assertEqual(set(results["transfer"]["matrices"]), {"4/255", "16/255"})
        self.assertNotIn("relations", results["transfer"])  # the analysis computes it
        self.assertTrue(any("transfer" in m for m in messages))
        self.assertIn("  pgd: 3/6 examples", messages)
        self.assertLen(evaluator.adversarial["white_box/pgd/16/255"], 6)
        self.assertIn(results["converged"], (True, False, None))
        difference = results["gradient_difference"]
        self.assertEqual(difference["white_box"], 0.0)  # the end-to-end gradient itself
        self.assertGreater(difference["surrogate@1"], 0.01)
        self.assertGreater(difference["bpda"], 0.01)
        self.assertEqual(set(results["convergence"]), {"4/255", "16/255"})

    def test_the_suite_runs_through_every_gradient_threat_model(self):
        shape = (8, 8, 3)
        models = _tiny_models(shape)
        images, labels = _template_images(shape, 12)
        config = _small_config(cascade=False, surrogate_temperatures=(0.5, 2.0))
        results = evaluation.Evaluator(models, images, labels, config, lambda _: None).run()
        attacks_by_threat = {}
        for info in results["runs"].values():
            if not info["threat"].startswith("check_") and info["threat"] != "gradient_free":
                attacks_by_threat.setdefault(info["threat"], set()).add(info["attack"])
        self.assertEqual(
            set(attacks_by_threat),
            {"surrogate@0.5", "surrogate@2", "bpda", "white_box", "gray_box"},
        )
        for threat, attacks in attacks_by_threat.items():
            self.assertEqual(attacks, set(config.attacks), threat)

    def test_cascade_gives_the_full_matrix_worst_case_in_less_work(self):
        shape = (8, 8, 3)
        images, labels = _template_images(shape, 16)
        out, seconds = {}, {}
        for cascade in (False, True):
            # An accurate classifier behind an identity purifier: the attacks have
            # clean-correct examples to fool, and leave some robust at the small eps.
            classifier = _template_classifier(np.ones(shape, bool), "template")
            inputs = keras.Input(shape)
            identity = keras.Model(inputs, keras.layers.Identity()(inputs))
            models = evaluation.Models(classifier, classifier, identity)
            config = _small_config(
                cascade=cascade,
                eps=(2 / 255, 8 / 255),
                num_examples=16,
                threat_models=("white_box", "bpda", "gradient_free"),
                attacks=("pgd", "fgsm"),
            )
            start = time.perf_counter()
            out[cascade] = evaluation.Evaluator(
                models, images, labels, config, lambda _: None
            ).run()
            seconds[cascade] = time.perf_counter() - start
        attacked = {c: sum(r["attacked"] for r in out[c]["runs"].values()) for c in out}
        print("attacked examples (full, cascade):", attacked, "seconds:", seconds)
        self.assertEqual(out[True]["clean"]["defended"], 1.0)
        for eps, row in out[False]["headline"].items():
            self.assertEqual(row["robust"], out[True]["headline"][eps]["robust"], eps)
        rows = [out[False]["headline"][e]["robust"] for e in ("2/255", "8/255")]
        self.assertGreater(rows[0], rows[1])  # the attacks fool some, not all, at 2/255
        self.assertLess(rows[1], 16)
        for eps in ("2/255", "8/255"):
            worst = {
                c: np.all(
                    [
                        np.asarray(v, bool)
                        for k, v in out[c]["per_example"].items()
                        if evaluation._is_budget_run(k, eps) or k == "clean/defended"
                    ],
                    axis=0,
                )
                for c in out
            }
            self.assertAllEqual(worst[False], worst[True])
        self.assertLess(attacked[True], attacked[False])

    def test_convergence_checks_rerun_the_strongest_threat_model(self):
        shape = (8, 8, 3)
        models = _accurate_defended_models(shape)
        models.defended = _noisy_gradient(models.defended)  # white-box: a masked gradient
        images, labels = _template_images(shape, 12)
        config = _small_config(
            threat_models=("white_box", "surrogate"), eps=(32 / 255,), convergence_rounds=2
        )
        results = evaluation.Evaluator(models, images, labels, config, lambda _: None).run()
        runs = results["runs"]
        fooled = {
            t: runs[evaluation.run_key(t, "pgd", 32 / 255)]["fooled"]
            for t in ("white_box", "surrogate@1")
        }
        print("fooled by the reference runs:", fooled)
        self.assertGreater(fooled["surrogate@1"], fooled["white_box"])
        rerun = runs[evaluation.run_key("check_more_steps", "pgd", 32 / 255)]
        self.assertEqual(rerun["source"], "surrogate@1")
        # Only the examples the base run left robust are attacked again.
        base = runs[evaluation.run_key("surrogate@1", "pgd", 32 / 255)]
        self.assertEqual(rerun["attacked"], base["attacked"] - base["fooled"])
        base_examples = results["per_example"][evaluation.run_key("check_base", "pgd", 32 / 255)]
        rerun_examples = results["per_example"][
            evaluation.run_key("check_more_steps", "pgd", 32 / 255)
        ]
        self.assertTrue(all(r <= b for r, b in zip(rerun_examples, base_examples, strict=True)))
        # Round 2 (4x the steps) attacks what round 1 left robust, and counts in the headline.
        round2 = runs[evaluation.run_key("check_more_steps_x4", "pgd", 32 / 255)]
        self.assertEqual(round2["attacked"], sum(rerun_examples))
        self.assertTrue(evaluation._is_budget_run("check_more_steps_x4/pgd/32/255", "32/255"))
        self.assertFalse(evaluation._is_budget_run("check_base/pgd/32/255", "32/255"))
        self.assertEqual(
            results["convergence"]["32/255"]["deciding"], ["more_steps_x4", "more_restarts_r5"]
        )
        self.assertEqual(results["convergence"]["32/255"]["source"], "surrogate@1")
        large = runs[evaluation.run_key("check_large_eps", "pgd", config.large_eps)]
        self.assertEqual(large["source"], "surrogate@1")

    def test_convergence_rounds_multiply_the_steps_on_what_is_left(self):
        shape = (8, 8, 3)
        models = _accurate_defended_models(shape)
        images, labels = _template_images(shape, 12)
        config = _small_config(threat_models=("white_box",), eps=(2 / 255,), convergence_rounds=3)
        steps = {}
        run_attack = evaluation.Evaluator.run_attack

        def spy(ev, key, attack, model_fn, eps, indices, scored, **overrides):
            steps[key.split("/")[0]] = (
                overrides.get("steps", overrides.get("restarts")),
                len(indices),
            )
            return run_attack(ev, key, attack, model_fn, eps, indices, scored, **overrides)

        with mock.patch.object(evaluation.Evaluator, "run_attack", spy):
            results = evaluation.Evaluator(models, images, labels, config, lambda _: None).run()
        print("steps and examples per run:", steps)
        per_example = results["per_example"]
        rounds = ["check_more_steps", "check_more_steps_x4", "check_more_steps_x8"]
        self.assertEqual([steps[r][0] for r in rounds], [6, 12, 24])
        left = [sum(per_example[evaluation.run_key(r, "pgd", 2 / 255)]) for r in rounds]
        self.assertGreater(left[0], 0)  # something is left to attack at every round
        self.assertEqual([steps[r][1] for r in rounds[1:]], left[:-1])
        # The restarts rerun's rounds: 1 + 2, 1 + 4, 1 + 8 restarts, each on what the
        # round before left robust.
        rounds = ["check_restarts", "check_restarts_r5", "check_restarts_r9"]
        self.assertEqual([steps[r][0] for r in rounds], [3, 5, 9])
        left = [sum(per_example[evaluation.run_key(r, "pgd", 2 / 255)]) for r in rounds]
        self.assertEqual([steps[r][1] for r in rounds[1:]], left[:-1])
        self.assertEqual(
            results["convergence"]["2/255"]["deciding"], ["more_steps_x8", "more_restarts_r9"]
        )
        self.assertIn("more_steps_x4", results["convergence"]["2/255"])
        self.assertLessEqual(results["headline"]["2/255"]["robust"], left[-1])

    def _evaluate_white_box_through(self, backward):
        """Evaluates a defended model whose input passes `backward` first."""
        shape = (8, 8, 3)
        models = _tiny_models(shape)
        classifier = models.classifier
        models.defended = lambda x: classifier(backward(x))
        images, labels = _template_images(shape, 12)
        config = _small_config(threat_models=("white_box",))
        evaluation.Evaluator(models, images, labels, config, lambda _: None).run()

    def test_zero_gradient_stops_the_evaluation(self):
        with self.assertRaisesRegex(ValueError, "threat model 'white_box'.*zero"):
            self._evaluate_white_box_through(tf.stop_gradient)

    def test_nan_gradient_stops_the_evaluation(self):
        @tf.custom_gradient
        def nan_backward(x):
            return tf.identity(x), lambda upstream: upstream * float("nan")

        with self.assertRaisesRegex(ValueError, "threat model 'white_box'.*NaN"):
            self._evaluate_white_box_through(nan_backward)

    def test_gradient_check_traces_once_per_model(self):
        # A streaming evaluation checks every shard; the check must not trace each time.
        shape = (8, 8, 3)
        models = _tiny_models(shape)
        images, labels = _template_images(shape, 12)
        for start in (0, 4, 8):
            runner.check_gradients(models.defended, images[start:], labels[start:], "defended")
        compiled = runner._gradient_fn(models.defended)
        self.assertEqual(compiled.experimental_get_tracing_count(), 2)  # a 2nd shape: unknown

    def test_rows_start_from_clean_correctness(self):
        shape = (8, 8, 3)
        models = _tiny_models(shape)
        images, labels = _template_images(shape, 12)
        clean = np.asarray(models.defended(images)).argmax(-1) == labels
        self.assertFalse(clean.all())  # some examples are wrong before any attack
        config = _small_config(threat_models=("gray_box",), attacks=("pgd",), eps=(1e-6,))
        results = evaluation.Evaluator(models, images, labels, config, lambda _: None).run()
        row = results["threats"]["gray_box"]["pgd"][evaluation.eps_key(1e-6)]
        self.assertLessEqual(row["defended"], results["clean"]["defended"] + 1e-9)
        self.assertAllClose(row["defended"], clean.mean())


class TransferMatrixTest(tf.test.TestCase):
    def test_matrix_matches_attacks_run_by_hand(self):
        keras.utils.set_random_seed(0)
        shape = (8, 8, 3)
        half = np.random.default_rng(0).uniform(size=shape) < 0.5
        classifier = _template_classifier(half, "classifier")
        other = _template_classifier(~half, "other")
        ae = ae_lib.build_autoencoder(ae_lib.AutoencoderConfig(stage_widths=((4,),)), shape)
        models = evaluation.Models(
            classifier=classifier,
            defended=s2s_model.build_s2s_model(ae, classifier),
            purifier=s2s_model.build_purifier(ae, shape),
            others={"other": other},
        )
        images, labels = _template_images(shape, 8)
        config = evaluation.EvalConfig(
            attacks=("pgd",),
            eps=(12 / 255,),
            threat_models=("transfer",),
            num_examples=8,
            batch_size=4,
            steps=3,
            restarts=1,
            transfer_attack="pgd",
            seed=3,
        )
        matrix = evaluation.Evaluator(models, images, labels, config, lambda _: None).run()
        matrix = matrix["transfer"]["matrix"]
        named = {"classifier": classifier, "defended": models.defended, "other": other}
        self.assertEqual(_accuracy(classifier, images, labels), 1.0)
        self.assertEqual(_accuracy(other, images, labels), 1.0)
        expected = _transfer_by_hand(named, images, labels, config)
        # The fixture tells sources and targets apart: the two classifiers look at disjoint
        # pixels, so an attack on one beats it and leaves the other alone.
        self.assertLess(expected["classifier"]["classifier"], expected["classifier"]["other"])
        self.assertLess(expected["other"]["other"], expected["other"]["classifier"])
        self.assertEqual(set(matrix), set(expected))
        for source_name, row in expected.items():
            self.assertEqual(set(matrix[source_name]), set(row), source_name)
            for target_name, value in row.items():
                self.assertAllClose(
                    matrix[source_name][target_name], value, msg=f"{source_name} -> {target_name}"
                )


if __name__ == "__main__":
    tf.test.main()
