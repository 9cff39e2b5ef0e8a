"""The report's claims sections: each claim's verdict and the numbers it is read from.

`sections(document)` returns Markdown lines for `report.md`: a summary table of
the five claims (`verdicts`), the README paragraph written from them, and one
section per claim with the tables a reader needs to recompute its verdict from
`robustness.json`.
"""

from s2s_tf.analysis import relations
from s2s_tf.analysis import verdicts


def _pct(value):
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _interval(entry):
    if not entry:
        return "n/a"
    low, high = entry["interval"]
    return f"{entry['estimate']:.3g} [{low:.3g}, {high:.3g}]"


def sections(document):
    """Markdown lines of every claims section of the report."""
    rows = verdicts.claims(document)
    out = [
        "",
        "## The paper's claims",
        "",
        "Each status is computed from `robustness.json` (`s2s_tf.analysis.verdicts`); the "
        "sections below give the numbers it is read from.",
        "",
        _table(["claim", "status"], [(n, e["status"] or "not run") for n, e in rows.items()]),
        "",
        "README text for this run (`verdicts.readme_text`):",
        "",
        "> " + verdicts.readme_text(document),
    ]
    out += _counterfactual_section(document.get("counterfactual"))
    out += _effective_section(document.get("effective_perturbations"))
    out += _baselines_section(document, rows["4"])
    out += _relations_section(document.get("relations"))
    return out


def _counterfactual_section(analysis):
    out = ["", "### Claim 2: counterfactual gradient analysis", ""]
    if not analysis:
        return out + ["Not run (it needs a classifier with at least 2 classes)."]
    out.append(
        f"{analysis['num_images']} images; input gradients of the same {analysis['top_k']} "
        "class logits per image for every model (the class-dependent share from the raw "
        "logits, structure alignment from the centred ones); mean and bootstrap 95% interval."
    )
    for name, claim in analysis["claims"].items():
        models = claim["models"]
        rows = [(model, _interval(entry)) for model, entry in models.items()]
        rows += [(diff, _interval(entry)) for diff, entry in claim["differences"].items()]
        out += ["", f"#### {name}", "", _table(["model / difference", name], rows), ""]
        out.append(f"**{claim['status']}**: {claim['verdict']}")
    return out


def _effective_section(summary):
    if not summary:
        return []
    rows = []
    for key, entry in summary.items():
        l2, linf = entry.get("l2") or {}, entry.get("linf") or {}
        rows.append(
            (
                key,
                entry["num_perturbed"],
                _interval((l2.get("input") or {}).get("median")),
                _interval((l2.get("passed_on") or {}).get("median")),
                _interval((l2.get("ratio") or {}).get("median")),
                _interval((linf.get("ratio") or {}).get("median")),
            )
        )
    return [
        "",
        "### Claim 3: effective perturbations",
        "",
        "How much of an adversarial perturbation the S2SNet passes on to the classifier: "
        "||S2S(x+d) - S2S(x)|| against ||d|| per example (medians, bootstrap 95% intervals).",
        "",
        _table(
            ["run", "n", "median ||d||_2", "median passed on (L2)", "ratio L2", "ratio L-inf"],
            rows,
        ),
    ]


def _robust_cells(results, eps_keys):
    headline = results.get("headline", {})
    cells = []
    for eps in eps_keys:
        h = headline.get(eps)
        cells.append(
            "n/a"
            if h is None
            else f"{_pct(h['robust_accuracy'])} [{_pct(h['ci95'][0])}, {_pct(h['ci95'][1])}]"
        )
    return cells


def _baselines_section(document, claim):
    results = document["results"]
    eps_keys = sorted(results.get("headline", {}), key=relations.eps_value)
    threats = document.get("config", {}).get("attack", {}).get("threat_models", [])
    rows = [
        ["S2SNet", ", ".join(threats), _pct(results["clean"]["defended"])]
        + _robust_cells(results, eps_keys)
    ]
    comparisons = {"S2SNet": claim["by_eps"], **claim["baselines"]}
    for name, entry in sorted((document.get("baselines") or {}).items()):
        r = entry["results"]
        rows.append(
            [
                f"{name} ({entry['title']})",
                ", ".join(entry["threat_models"]),
                _pct(r["clean"]["defended"]),
            ]
            + _robust_cells(r, eps_keys)
        )
    compare_rows = []
    for name, by_eps in comparisons.items():
        for eps, e in by_eps.items():
            d, m = e["difference"], e["mcnemar"]
            compare_rows.append(
                (
                    name,
                    eps,
                    _pct(e["gray_box"]),
                    _pct(e["white_box"]),
                    f"{100 * d['estimate']:+.1f} [{100 * d['interval'][0]:+.1f}, "
                    f"{100 * d['interval'][1]:+.1f}]",
                    f"{m['only_a']} / {m['only_b']}, p = {m['p_value']:.3g}",
                    e["status"],
                )
            )
    return [
        "",
        "### Claim 4: white-box against gray-box, beside input-transformation baselines",
        "",
        "Every defense in front of the same classifier, on the same examples, with the same "
        "attack suite and per-example worst case (a baseline without a useful gradient is "
        "attacked with BPDA where the S2SNet is attacked end to end; the surrogate needs an "
        "autoencoder). Robust accuracy with 95% Wilson intervals:",
        "",
        _table(["defense", "threat models", "clean", *eps_keys], rows),
        "",
        "Gray-box against white-box (worst case over the full runs of each family: end to "
        "end, BPDA, surrogates), paired on the same examples: difference in points with a "
        f"bootstrap 95% interval, comparable within {100 * verdicts.WHITE_GRAY_MARGIN:g} points; "
        "fooled by gray-box only / white-box only, exact McNemar p.",
        "",
        _table(
            ["defense", "eps", "gray-box", "white-box", "gray - white", "only / only, p", "status"],
            compare_rows,
        ),
    ]


def _relations_section(summary):
    if not summary:
        return []
    out = [
        "",
        "### Claim 5: relations between models",
        "",
        f"{summary.get('num_examples', '?')} examples, {summary.get('attack', '?')}; undefended "
        "models attacked end to end, defended ones through their soft-routing surrogates. "
        "Drops from clean accuracy, in points.",
    ]
    for group, entry in summary["groups"].items():
        if "easiest_to_fool" not in entry:
            continue
        eps = summary["eps"]  # ascending by value (relations.summarize)
        rows = [
            [m, _pct(entry["clean"][m])]
            + [f"{100 * entry['self_drop'][m][e]:.1f}" for e in eps]
            + [f"{100 * entry['transfer_drop'][e][m]:.1f}" for e in eps]
            for m in entry["models"]
        ]
        header = ["model", "clean"] + [f"own drop {e}" for e in eps]
        header += [f"transfer drop {e}" for e in eps]
        out += ["", f"{group}:", "", _table(header, rows)]
    return out + ["", summary["statement"]]
