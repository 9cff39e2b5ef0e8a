"""Robustness evaluation of an S2SNet-defended classifier under several threat models.

All images are float32 in [0, 1] and every eps is in pixel units. For a
classifier C, the autoencoder A (as a [0, 1] -> [0, 1] purifier P) and the
defended model D = C o P:

- clean: accuracy of C and of D on the clean images;
- gray_box (the paper's setting): examples made on C alone, fed to D;
- white_box: examples made on D, gradients end to end through P and C;
- bpda: examples made on D with P replaced by the identity in the backward pass
  (Athalye et al. 2018);
- transfer: examples made on one model (each classifier, defended or not)
  evaluated on every other;
- gradient_free: SPSA against D on a subset (no gradients at all).

`sanity_checks` then asks the questions Athalye et al. and Carlini et al.
("On Evaluating Adversarial Robustness", 2019) ask of every defense; a failed
check is reported, never hidden.
"""

import dataclasses
import time

import numpy as np
from absl import logging

from s2s_tf import config_io
from s2s_tf import constants
from s2s_tf.config_io import setting
from s2s_tf.robustness import attacks as attacks_lib
from s2s_tf.robustness import runner

# Attacks whose iteration counts mean something else (CW's Adam steps per binary-search
# step, SPSA's gradient estimates) keep their registry defaults instead of `steps`.
OWN_SCHEDULE = ("cw_l2", "spsa")
# Accuracy differences below this many examples' worth are noise, not findings.
TOLERANCE_EXAMPLES = 1


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What to attack and how.

    Attributes:
      attacks: registry names of the gradient attacks to run.
      eps: L∞ budgets in [0, 1] pixel units (L2 attacks scale them, see `l2_eps`).
      threat_models: a subset of `constants.THREAT_MODELS`.
      num_examples: evaluation examples.
      batch_size: attack batch size.
      steps: iterations of the iterative attacks.
      restarts: random restarts of PGD.
      spsa_examples: examples for the (slow) gradient-free SPSA attack.
      spsa_eps: the budget of the SPSA attack (default: the largest of `eps` up to 8/255).
      large_eps: the budget at which PGD must reach ~0 % accuracy.
      transfer_attack: the attack that makes the transfer matrix.
      transfer_eps: its budget (default: the largest of `eps`).
      l2_eps_scale: L2 budgets are eps * sqrt(H*W*C) * l2_eps_scale (the L2 norm
        of an L∞ perturbation of size eps on a quarter of the pixels at 0.5).
      seed: random seed of the attacks.
    """

    attacks: tuple = setting(
        ("fgsm", "pgd"), "Gradient attacks to run.", choices=lambda: attacks_lib.ATTACKS
    )
    eps: tuple = setting(
        (2 / 255, 4 / 255, 8 / 255, 16 / 255),
        "L-inf budgets (pixel units).",
        parse=config_io.parse_eps_list,
        unparse=config_io.unparse_eps_list,
    )
    threat_models: tuple = setting(
        constants.THREAT_MODELS, "Threat models to evaluate.", choices=constants.THREAT_MODELS
    )
    num_examples: int = setting(500, "Examples attacked.", lower_bound=1)
    batch_size: int = 100
    steps: int = setting(10, "Iterations of iterative attacks.", lower_bound=1)
    restarts: int = setting(1, "Random restarts of PGD.", lower_bound=1)
    spsa_examples: int = setting(50, "Examples for SPSA (slow).", lower_bound=1)
    spsa_eps: float | None = None
    large_eps: float = 64 / 255
    transfer_attack: str = "pgd"
    transfer_eps: float | None = None
    l2_eps_scale: float = 0.5
    seed: int = 0

    def validate(self):
        """Raises ValueError naming the first invalid field."""
        unknown = [a for a in (*self.attacks, self.transfer_attack) if a not in attacks_lib.ATTACKS]
        if unknown:
            raise ValueError(f"unknown attacks {unknown}; known: {sorted(attacks_lib.ATTACKS)}")
        bad = [t for t in self.threat_models if t not in constants.THREAT_MODELS]
        if bad:
            raise ValueError(f"unknown threat models {bad}; known: {constants.THREAT_MODELS}")
        if not self.eps or any(not 0 <= e <= 1 for e in self.eps):
            raise ValueError(f"eps must be non-empty values in [0, 1], got {self.eps}")
        for name in ("num_examples", "batch_size", "steps", "restarts", "spsa_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass
class Models:
    """The models under evaluation, as model functions on [0, 1] images returning logits.

    Attributes:
      classifier: the undefended classifier C.
      defended: the defended model D = C o P.
      purifier: P, the autoencoder from [0, 1] images to [0, 1] images.
      others: further classifiers (name -> model_fn) for the transfer matrix,
        e.g. {"vgg16": ..., "vgg16+s2s": ...}.
    """

    classifier: object
    defended: object
    purifier: object
    others: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.bpda = runner.bpda_model_fn(self.purifier, self.classifier)


class Evaluator:
    """Runs the configured threat models and keeps every number it computes.

    Args:
      models: a `Models`.
      images: float32 [N, H, W, C] in [0, 1].
      labels: int [N].
      config: an `EvalConfig`.
      progress: callable(str) told about each unit of work (e.g. logging.info).
    """

    def __init__(self, models, images, labels, config, progress=logging.info):
        config.validate()
        self.models, self.config, self.progress = models, config, progress
        self.images = np.asarray(images[: config.num_examples], np.float32)
        self.labels = np.asarray(labels[: config.num_examples])
        self.results = {
            "num_examples": len(self.images),
            "clean": {},
            "threats": {},
            "transfer": {},
            "timing": {},
        }
        self.examples = {}

    def accuracy(self, model_fn, images, labels=None):
        """Fraction of `images` that `model_fn` classifies correctly."""
        labels = self.labels[: len(images)] if labels is None else labels
        return float(runner.accuracy(model_fn, images, labels, self.config.batch_size))

    def attack(self, name, model_fn, eps, images=None, labels=None, **overrides):
        """Adversarial examples of `images` (default: all) made on `model_fn`."""
        images = self.images if images is None else images
        labels = self.labels if labels is None else labels
        if attacks_lib.ATTACKS[name].norm == "l2":
            eps = eps * np.sqrt(np.prod(images.shape[1:])) * self.config.l2_eps_scale
        params = {"restarts": self.config.restarts}
        if name not in OWN_SCHEDULE:
            params["steps"] = self.config.steps
        params.update(overrides)
        start = time.perf_counter()
        key = f"{name}@{eps:.4f}"

        def batch_done(done, total):
            if total > self.config.batch_size:  # one line per batch only when there are several
                self.progress(f"  {name}: {done}/{total} examples")

        adversarial = runner.run_attack(
            name,
            model_fn,
            images,
            labels,
            float(eps),
            batch_size=self.config.batch_size,
            seed=self.config.seed,
            progress=batch_done,
            **params,
        )
        self.results["timing"][key] = self.results["timing"].get(key, 0.0) + (
            time.perf_counter() - start
        )
        return adversarial

    def run(self):
        """Runs every configured part; returns `self.results`."""
        models, config = self.models, self.config
        self.progress(f"clean accuracy on {len(self.images)} examples")
        self.results["clean"] = {
            "classifier": self.accuracy(models.classifier, self.images),
            "defended": self.accuracy(models.defended, self.images),
            **{name: self.accuracy(fn, self.images) for name, fn in models.others.items()},
        }
        sources = {
            "gray_box": models.classifier,
            "white_box": models.defended,
            "bpda": models.bpda,
        }
        for threat in ("gray_box", "white_box", "bpda"):
            if threat in config.threat_models:
                self.results["threats"][threat] = self._sweep(threat, sources[threat])
        if "gradient_free" in config.threat_models:
            self.results["threats"]["gradient_free"] = self._gradient_free()
        if "transfer" in config.threat_models:
            self.results["transfer"] = self._transfer()
        self.results["extra"] = self._checks_data()
        return self.results

    def _sweep(self, threat, source):
        """Accuracy of the defended model (and of the classifier) per attack and eps."""
        table = {}
        for name in self.config.attacks:
            table[name] = {}
            for eps in self.config.eps:
                self.progress(f"{threat}: {name} eps={eps * 255:.1f}/255")
                adversarial = self.attack(name, source, eps)
                row = {"defended": self.accuracy(self.models.defended, adversarial)}
                if threat == "gray_box":
                    row["classifier"] = self.accuracy(self.models.classifier, adversarial)
                table[name][_eps_key(eps)] = row
                self._keep_example(threat, name, eps, adversarial)
        return table

    def _gradient_free(self):
        config = self.config
        n = min(config.spsa_examples, len(self.images))
        eps = config.spsa_eps or max(e for e in config.eps if e <= 8 / 255 + 1e-9)
        self.progress(f"gradient_free: spsa on {n} examples, eps={eps * 255:.1f}/255")
        images, labels = self.images[:n], self.labels[:n]
        adversarial = self.attack("spsa", self.models.defended, eps, images, labels)
        white = self.attack("pgd", self.models.defended, eps, images, labels)
        return {
            "spsa": {
                _eps_key(eps): {
                    "defended": self.accuracy(self.models.defended, adversarial, labels)
                }
            },
            "pgd_same_subset": {
                _eps_key(eps): {"defended": self.accuracy(self.models.defended, white, labels)}
            },
            "num_examples": n,
        }

    def _transfer(self):
        """Matrix source -> target of accuracy on examples made on the source."""
        config = self.config
        eps = config.transfer_eps or max(config.eps)
        named = {"classifier": self.models.classifier, "defended": self.models.defended}
        named.update(self.models.others)
        matrix = {}
        for source_name, source in named.items():
            self.progress(f"transfer: {config.transfer_attack} on {source_name}")
            adversarial = self.attack(config.transfer_attack, source, eps)
            matrix[source_name] = {
                target_name: self.accuracy(target, adversarial)
                for target_name, target in named.items()
            }
        return {"attack": config.transfer_attack, "eps": eps, "matrix": matrix}

    def _checks_data(self):
        """The extra runs the sanity checks need: large eps, more steps, restarts."""
        config, defended = self.config, self.models.defended
        eps = max(config.eps)
        self.progress(
            f"sanity runs: pgd at eps={config.large_eps * 255:.0f}/255, 2x steps, restarts"
        )
        return {
            "large_eps": config.large_eps,
            "pgd_large_eps": self.accuracy(
                defended, self.attack("pgd", defended, config.large_eps)
            ),
            "eps": eps,
            "pgd": self.accuracy(defended, self.attack("pgd", defended, eps)),
            "pgd_2x_steps": self.accuracy(
                defended, self.attack("pgd", defended, eps, steps=2 * config.steps)
            ),
            "pgd_restarts": self.accuracy(
                defended, self.attack("pgd", defended, eps, restarts=config.restarts + 2)
            ),
        }

    def _keep_example(self, threat, name, eps, adversarial):
        """Keeps the first few adversarial images of the largest eps for the report."""
        if eps == max(self.config.eps):
            self.examples[f"{threat}/{name}"] = adversarial[:4]


def _eps_key(eps):
    """A readable, stable key for an eps: "8/255"."""
    return f"{eps * 255:g}/255"


def sanity_checks(results, num_examples):
    """Pass/fail checks against gradient masking; every check is reported.

    Args:
      results: `Evaluator.results`.
      num_examples: examples per accuracy (for the noise tolerance).

    Returns:
      A list of dicts with "name", "passed" (bool or None when not run) and "detail".
    """
    tol = TOLERANCE_EXAMPLES / max(num_examples, 1) + 1e-9
    extra, threats = results.get("extra", {}), results.get("threats", {})
    checks = []

    def add(name, passed, detail):
        checks.append({"name": name, "passed": passed, "detail": detail})

    if extra:
        add(
            "PGD accuracy falls to ~0% at large eps",
            extra["pgd_large_eps"] <= 0.05,
            f"white-box PGD at eps={extra['large_eps'] * 255:.0f}/255: "
            f"{extra['pgd_large_eps']:.1%} (must be <= 5%)",
        )
        add(
            "More PGD steps do not raise accuracy",
            extra["pgd_2x_steps"] <= extra["pgd"] + tol,
            f"{extra['pgd']:.1%} -> {extra['pgd_2x_steps']:.1%} with twice the steps",
        )
        add(
            "Restarts do not raise accuracy",
            extra["pgd_restarts"] <= extra["pgd"] + tol,
            f"{extra['pgd']:.1%} -> {extra['pgd_restarts']:.1%} with more restarts",
        )
    white = threats.get("white_box", {})
    single = [a for a in white if not attacks_lib.ATTACKS[a].iterative]
    multi = [a for a in white if attacks_lib.ATTACKS[a].iterative]
    for s in single:
        for m in multi:
            worse = [e for e in white[m] if white[m][e]["defended"] > white[s][e]["defended"] + tol]
            add(
                f"Iterative {m} at least as strong as single-step {s} (white-box)",
                not worse,
                "holds at every eps" if not worse else f"weaker at eps {worse}",
            )
    gray = threats.get("gray_box", {})
    for attack in set(white) & set(gray):
        worse = [
            e
            for e in white[attack]
            if white[attack][e]["defended"] > gray[attack][e]["defended"] + tol
        ]
        add(
            f"White-box {attack} at least as strong as gray-box {attack}",
            not worse,
            "holds at every eps"
            if not worse
            else f"gray-box stronger at eps {worse}: the "
            "end-to-end gradient is weaker than the classifier's (possible gradient masking)",
        )
    checks.extend(_masking_checks(results, tol))
    return checks


def _masking_checks(results, tol):
    """Flags possible gradient masking: a weaker-information attack beating white-box PGD."""
    checks = []
    white = results.get("threats", {}).get("white_box", {}).get("pgd", {})
    bpda = results.get("threats", {}).get("bpda", {}).get("pgd", {})
    for eps in [e for e in white if e in bpda]:
        better = bpda[eps]["defended"] < white[eps]["defended"] - tol
        checks.append(
            {
                "name": f"BPDA does not beat white-box PGD (eps {eps})",
                "passed": not better,
                "detail": f"white-box {white[eps]['defended']:.1%}, "
                f"BPDA {bpda[eps]['defended']:.1%}"
                + (" - possible gradient masking" if better else ""),
            }
        )
    free = results.get("threats", {}).get("gradient_free", {})
    if free:
        eps = next(iter(free["spsa"]))
        spsa, pgd = free["spsa"][eps]["defended"], free["pgd_same_subset"][eps]["defended"]
        better = spsa < pgd - TOLERANCE_EXAMPLES / max(free["num_examples"], 1)
        checks.append(
            {
                "name": f"SPSA (gradient-free) does not beat white-box PGD (eps {eps})",
                "passed": not better,
                "detail": f"PGD {pgd:.1%}, SPSA {spsa:.1%} on {free['num_examples']} examples"
                + (" - possible gradient masking" if better else ""),
            }
        )
    transfer = results.get("transfer", {}).get("matrix", {})
    if transfer and "defended" in transfer and white:
        eps = _eps_key(results["transfer"]["eps"])
        own = transfer["defended"]["defended"]
        best = min(row["defended"] for row in transfer.values())
        better = best < own - tol
        checks.append(
            {
                "name": "Transfer attacks do not beat the white-box attack on the defended model",
                "passed": not better,
                "detail": f"white-box {own:.1%}, best transfer {best:.1%} at eps {eps}"
                + (" - possible gradient masking" if better else ""),
            }
        )
    return checks
