"""Adversarial-space relations between models (the paper's claim 5), from transfer matrices.

The seed paper reports, over AlexNet, VGG16, ResNet50 and InceptionV3, that
VGG16 is the easiest to fool and that ResNet50's perturbations transfer best,
and that the same relations hold between the four models defended by their own
S2SNets. Given, at each eps, the accuracy of every target model on examples
made on every source model, and each model's clean accuracy, this module ranks
the undefended and the defended models separately:

- easiest to fool: by the DROP from clean accuracy under the model's own attack
  (the diagonal) at the smallest eps, ties broken at the next eps. The drop,
  not the accuracy left, so a model is not "easy to fool" for being less
  accurate to begin with;
- transfers best: by the mean drop its examples cause in the other models of
  its group, at the largest eps (ties broken at the next smaller one).

A defended model ("defended", or "<name>+s2s" with an S2SNet of its own) is
attacked through its soft-routing surrogate, the strongest threat model: the
end-to-end gradient through the SegNet's unpooling switches is masked, so
examples made with it would understate both its own vulnerability and what its
examples do to others. Those rows come from `defended_rows`; the transfer
matrix of the engine gives the undefended rows. `statement` writes the claim's
sentence from the numbers.
"""

DEFENDED = "defended"
SUFFIX = "+s2s"
GROUPS = ("undefended", "defended")


def is_defended(name):
    """Whether a model name of the transfer matrix is a defended model."""
    return name == DEFENDED or name.endswith(SUFFIX)


def partner(name):
    """The undefended classifier of a defended model's name ("vgg+s2s" -> "vgg")."""
    return "classifier" if name == DEFENDED else name[: -len(SUFFIX)]


def eps_value(key):
    """ "8/255" -> 8 / 255."""
    numerator, _, denominator = key.partition("/")
    return float(numerator) / (float(denominator) if denominator else 1.0)


def _rows(matrices, defended_rows, eps_keys, models):
    """{eps: {source: {target: accuracy}}}: defended sources from `defended_rows`."""
    missing = sorted(
        m
        for m in models
        if is_defended(m) and any(m not in defended_rows.get(e, {}) for e in eps_keys)
    )
    if missing:
        raise ValueError(
            f"no surrogate-attack rows for the defended models {missing}: their end-to-end "
            "gradient is masked, so the transfer matrix's rows would understate them"
        )
    return {
        e: {s: (defended_rows[e][s] if is_defended(s) else matrices[e][s]) for s in models}
        for e in eps_keys
    }


def _ranking(models, keys):
    """Models sorted by descending `keys[m]` (lists compared element-wise), then by name.

    Returns:
      (ranking, tied): tied[i] says whether ranking[i] and ranking[i + 1] have
      equal keys (their order is then only alphabetical).
    """
    # Rounded, so accuracies that differ only by float error tie.
    keys = {m: [round(-v, 9) for v in values] for m, values in keys.items()}
    ranking = sorted(models, key=lambda m: (keys[m], m))
    return ranking, [keys[a] == keys[b] for a, b in zip(ranking, ranking[1:], strict=False)]


def _group(models, rows, clean, eps_keys):
    """The rankings of one group of models (at least two)."""
    self_drop = {m: {e: clean[m] - rows[e][m][m] for e in eps_keys} for m in models}
    transfer_drop = {
        e: {
            s: sum(clean[t] - rows[e][s][t] for t in models if t != s) / (len(models) - 1)
            for s in models
        }
        for e in eps_keys
    }
    easiest, easiest_tied = _ranking(
        models, {m: [self_drop[m][e] for e in eps_keys] for m in models}
    )
    descending = eps_keys[::-1]
    best, best_tied = _ranking(
        models, {s: [transfer_drop[e][s] for e in descending] for s in models}
    )
    return {
        "models": list(models),
        "clean": {m: clean[m] for m in models},
        "self_accuracy": {m: {e: rows[e][m][m] for e in eps_keys} for m in models},
        "self_drop": self_drop,
        "easiest_to_fool": easiest,
        "transfer_drop": transfer_drop,
        "transfers_best": best,
        "tied": {"easiest_to_fool": easiest_tied, "transfers_best": best_tied},
    }


def summarize(matrices, clean, defended_rows=None):
    """The claim-5 summary: rankings of the undefended and the defended models, separately.

    Args:
      matrices: transfer matrices, {eps key (e.g. "8/255"): {source: {target:
        accuracy}}}; their undefended sources' rows are used.
      clean: {model: clean accuracy}; the models, in this order (those with no
        row are left out).
      defended_rows: {eps key: {defended source: {target: accuracy}}} of the
        examples made on each defended model through its surrogate (required
        for every defended model of the matrices).

    Returns:
      A JSON-serialisable dict: "eps" (the keys, ascending), "rank_eps" (where
      each ranking is read), "groups" ({"undefended" / "defended": the group's
      "models", "clean", "self_accuracy", "self_drop", "easiest_to_fool"
      (ranking), "transfer_drop", "transfers_best" (ranking), "tied" ({ranking:
      whether each adjacent pair ties})}, or {"models"}
      alone for a group of fewer than two), "same_order" ({ranking: whether the
      defended ranking, mapped to the classifiers, equals the undefended one;
      None when either group is too small}), "tied_order" ({ranking: whether
      either group's ranking has a tie, which leaves that comparison to the
      models' names}) and "statement". Empty without matrices.

    Raises:
      ValueError: when a defended model has no surrogate rows.
    """
    eps_keys = sorted(matrices, key=eps_value)
    if not eps_keys:
        return {}
    defended_rows = defended_rows or {}
    sources = {**matrices[eps_keys[0]], **defended_rows.get(eps_keys[0], {})}
    models = [m for m in clean if m in sources]
    rows = _rows(matrices, defended_rows, eps_keys, models)
    groups = {}
    for group in GROUPS:
        members = [m for m in models if is_defended(m) == (group == "defended")]
        groups[group] = (
            _group(members, rows, clean, eps_keys) if len(members) >= 2 else {"models": members}
        )
    same_order, tied_order = {}, {}
    for ranking in ("easiest_to_fool", "transfers_best"):
        plain, defended = groups["undefended"].get(ranking), groups["defended"].get(ranking)
        same_order[ranking] = (
            None
            if plain is None or defended is None
            else [partner(m) for m in defended] == [m for m in plain if m in map(partner, defended)]
        )
        # A tie in either group leaves the order of its models to their names.
        tied_order[ranking] = same_order[ranking] is not None and any(
            any(groups[g]["tied"][ranking]) for g in GROUPS
        )
    summary = {
        "eps": eps_keys,
        "rank_eps": {"easiest_to_fool": eps_keys[0], "transfers_best": eps_keys[-1]},
        "groups": groups,
        "same_order": same_order,
        "tied_order": tied_order,
    }
    summary["statement"] = statement(summary)
    return summary


def _points(value):
    return f"{100 * value:.1f}"


def _ranked(group, ranking, by_eps, order):
    """ "a (45.0) > b (30.0)", with "=" between models whose keys tie.

    Args:
      group: a `_group` dict.
      ranking: "easiest_to_fool" or "transfers_best".
      by_eps: {eps key: {model: value}}, the values the ranking compares.
      order: the eps keys in the order the ranking compares them; the values
        shown are those at order[0]. Where two neighbours show the same value
        there but do not tie, the eps that orders them is named with theirs.
    """
    names, tied = group[ranking], group["tied"][ranking]
    shown = by_eps[order[0]]
    out = f"{names[0]} ({_points(shown[names[0]])})"
    for first, name, tie in zip(names[:-1], names[1:], tied, strict=True):
        out += f" {'=' if tie else '>'} {name} ({_points(shown[name])}"
        if not tie and _points(shown[first]) == _points(shown[name]):
            for eps in order[1:]:
                values = by_eps[eps]
                if _points(values[first]) != _points(values[name]):
                    out += f"; ordered at {eps}: {_points(values[first])} > {_points(values[name])}"
                    break
        out += ")"
    return out


def _group_sentence(group, label, attack, eps_keys):
    """One group's rankings, read as `_group` ranks: drops from the smallest eps up,
    transfer from the largest down."""
    if "easiest_to_fool" not in group:
        return f"{label}: fewer than two models ({', '.join(group['models']) or 'none'})."
    self_drop = {e: {m: d[e] for m, d in group["self_drop"].items()} for e in eps_keys}
    easiest = _ranked(group, "easiest_to_fool", self_drop, eps_keys)
    best = _ranked(group, "transfers_best", group["transfer_drop"], eps_keys[::-1])
    return (
        f"{label}, easiest to fool by the drop from clean accuracy under {attack} at eps "
        f"{eps_keys[0]} (points): {easiest}; best transfer by the mean drop of the group's other "
        f"models at eps {eps_keys[-1]} (points): {best}."
    )


def statement(summary):
    """The claim-5 sentences, written from a `summarize` result."""
    if not summary:
        return "Claim 5 needs a transfer matrix."
    groups, eps_keys = summary["groups"], summary["eps"]
    parts = [
        _group_sentence(groups["undefended"], "Undefended", "their own white-box attack", eps_keys),
        _group_sentence(
            groups["defended"],
            "Defended (each with its own S2SNet)",
            "their own attack through the soft-routing surrogate",
            eps_keys,
        ),
    ]
    same = summary["same_order"]
    if None in same.values():
        parts.append("The two groups cannot be compared (a group has fewer than two models).")
    else:
        tied = summary.get("tied_order", {})
        words = {True: "is the same as", False: "is not the same as"}
        clauses = []
        for ranking, label in (
            ("easiest_to_fool", "easiest to fool"),
            ("transfers_best", "best transfer"),
        ):
            if tied.get(ranking):
                clauses.append(f"for {label} the rankings cannot be compared (a tie in a group)")
            else:
                clauses.append(
                    f"for {label} the defended ranking {words[same[ranking]]} the undefended one"
                )
        sentence = "; ".join(clauses)
        parts.append(sentence[0].upper() + sentence[1:] + ".")
    return " ".join(parts)
