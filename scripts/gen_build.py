"""Writes the root BUILD file from the sources: the Bazel graph follows the imports.

One py_library per module (named after the module, or `pkg_sub` for a package's
`__init__.py`), one py_binary per `*_main.py` (over a `*_lib` library of the same
source), one py_test per `tests/*_test.py`, and the benchmarks. Deps are the
first-party imports of each source, so the file never drifts from the code:

    python scripts/gen_build.py          # rewrite BUILD
    python scripts/gen_build.py --check  # exit 1 if BUILD is out of date

`tests/build_targets_test.py` runs the check. Library sources are listed under
their import path (`s2s_tf/flags/...`, through the `s2s_tf/flags -> ../flags`
link), so Bazel's runfiles hold the same tree as an installed wheel.
"""

import ast
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PACKAGE = "s2s_tf"

# Test size and data beyond the imports: (size, comment, data expression).
TEST_EXTRAS = {
    "build_targets_test": (
        "small",
        "The test reads this file, the generator and the module sources.",
        '["BUILD", "scripts/gen_build.py"] + glob(["s2s_tf/**/*.py", "flags/**/*.py", '
        '"export/**/*.py", "tests/*_test.py"])',
    ),
    "convert_main_test": (
        "medium",
        "Runs `python -m s2s_tf.convert_main` in subprocesses on the committed fixture.",
        '[":convert_main"] + glob(["tests/testdata/*.npz"])',
    ),
    "distributed_test": (
        "large",
        "The workers run tests/distributed_worker.py in subprocesses.",
        '[":distributed_worker"]',
    ),
    "distributed_eval_test": (
        "large",
        "The replicas and workers run tests/distributed_eval_worker.py in subprocesses.",
        '[":distributed_eval_worker"]',
    ),
    "eval_lib_test": (
        "medium",
        "Runs `python -m s2s_tf.evaluate_main` in a subprocess.",
        '[":evaluate_main"]',
    ),
    "export_main_test": (
        "medium",
        "Runs `python -m s2s_tf.export.export_saved_model_main` in subprocesses.",
        '[":export_saved_model_main"]',
    ),
    "presets_test": (
        "medium",
        "Parses each preset with the training binary's flags in a subprocess.",
        '["s2s_tf/flags/presets/" + f for f in PRESETS] + [":train_main"]',
    ),
    "readme_commands_test": (
        "large",
        "Runs the README's commands in subprocesses, from the root and from elsewhere.",
        '["README.md"] + ["s2s_tf/flags/presets/" + f for f in PRESETS]',
    ),
    "torch_convert_test": (
        "medium",
        "The fixture and the PyTorch script that made it (imported when PyTorch is installed).",
        'glob(["tests/testdata/*"])',
    ),
    "train_main_test": ("large", "Runs `python -m s2s_tf.train_main` in subprocesses.", None),
}
SMALL_TESTS = frozenset(
    {
        "autoencoder_test",
        "config_io_test",
        "constants_test",
        "export_serving_files_test",
        "layers_test",
        "losses_test",
        "optim_test",
        "package_test",
        "preprocessing_test",
        "s2s_model_test",
        "vgg16_init_test",
        "iterates_test",
    }
)
HEADER = """\
# Bazel targets for s2s_tf, written by scripts/gen_build.py (do not edit by hand; run
# `python scripts/gen_build.py` after adding, removing or changing imports of a module).
#
# Library sources are listed under their import path: `s2s_tf/flags` and `s2s_tf/export`
# are links to the top-level `flags/` and `export/`, so runfiles hold the same package
# tree as an installed wheel. Third-party pip packages (tensorflow, keras, numpy, absl-py,
# tensorflow-datasets, cleverhans, adversarial-robustness-toolbox) are not in deps; they
# come from the Python environment.
#
# Offline: .ci/bazel_check.sh (uses bazel/rules_python_stub) queries the graph and runs the
# fast unit tests.

load("@rules_python//python:defs.bzl", "py_binary", "py_library", "py_test")

package(default_visibility = ["//visibility:public"])

PRESETS = [{presets}]
"""


def library_sources():
    """Import-path-relative paths of every module of the package (links followed)."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, PACKAGE), followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
        rel_dir = os.path.relpath(dirpath, ROOT).replace(os.sep, "/")
        paths.extend(f"{rel_dir}/{f}" for f in sorted(filenames) if f.endswith(".py"))
    return paths


def module_name(path):
    """`s2s_tf/flags/x.py` -> `s2s_tf.flags.x`; a package's `__init__.py` -> the package."""
    parts = path[: -len(".py")].split("/")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def target_name(path):
    """The library name of a module: its base name, or `a_b` for package `a.b`."""
    if path.endswith("/__init__.py"):
        return module_name(path).replace(".", "_")
    name = os.path.basename(path)[: -len(".py")]
    return f"{name}_lib" if name.endswith("_main") else name


def first_party_imports(path, source, known_modules):
    """First-party modules a file imports; `from a import b` is `a.b` when that is a module."""
    found = set()
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in known_modules else node.module)
    return {m for m in found if m == PACKAGE or m.startswith(PACKAGE + ".")}


def _deps(path, owner, known, own=None):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        modules = first_party_imports(path, f.read(), known)
    if own is not None:
        modules.add(own.rpartition(".")[0])
    deps = set()
    for module in modules - {""}:
        # `import a.b.c` runs the packages' __init__ files; the module's own library covers them.
        while module and module not in owner:
            module = module.rpartition(".")[0]
        if module:
            deps.add(owner[module])
    deps.discard(owner.get(own))
    return sorted(deps)


def _rule(kind, name, srcs, deps, main=None, size=None, comment=None, data=None):
    lines = [f"{kind}(", f'    name = "{name}",']
    if size:
        lines.append(f'    size = "{size}",')
    lines.append("    srcs = [" + ", ".join(f'"{s}"' for s in srcs) + "],")
    if comment:
        lines.append(f"    # {comment}")
    if data:
        lines.append(f"    data = {data},")
    if main:
        lines.append(f'    main = "{main}",')
    if deps:
        lines.append("    deps = [")
        lines.extend(f'        ":{d}",' for d in deps)
        lines.append("    ],")
    lines.append(")")
    return "\n".join(lines)


def generate():
    """Returns the text of the BUILD file."""
    sources = library_sources()
    known = {module_name(p) for p in sources}
    owner = {module_name(p): target_name(p) for p in sources}
    names = sorted(owner.values())
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise SystemExit(f"modules with the same target name: {clashes}; rename one")
    presets = sorted(os.listdir(os.path.join(ROOT, "flags", "presets")))
    blocks = [HEADER.format(presets=", ".join(f'"{p}"' for p in presets)).rstrip()]
    for path in sources:
        own = module_name(path)
        blocks.append(_rule("py_library", owner[own], [path], _deps(path, owner, known, own)))
        if path.endswith("_main.py"):
            name = owner[own][: -len("_lib")]
            blocks.append(_rule("py_binary", name, [path], [owner[own]], main=path))
    for name in ("attacks", "eval_scaling", "serving", "train_step"):
        path = f"bench/{name}.py"
        if os.path.exists(os.path.join(ROOT, path)):
            srcs = ["bench/bench_util.py", path]
            deps = sorted(set(_deps(srcs[0], owner, known) + _deps(path, owner, known)))
            blocks.append(_rule("py_binary", f"bench_{name}", srcs, deps, main=path))
    for worker in ("tests/distributed_worker.py", "tests/distributed_eval_worker.py"):
        name = os.path.basename(worker)[: -len(".py")]
        deps = _deps(worker, owner, known)
        blocks.append(_rule("py_binary", name, [worker], deps, main=worker))
    for test in sorted(os.listdir(os.path.join(ROOT, "tests"))):
        if not test.endswith("_test.py"):
            continue
        name, path = test[: -len(".py")], f"tests/{test}"
        size, comment, data = TEST_EXTRAS.get(
            name, ("small" if name in SMALL_TESTS else "medium", None, None)
        )
        if name.endswith("_main_test") and data is None:
            data = f'[":{name[: -len("_test")]}"]'
        deps = _deps(path, owner, known)
        blocks.append(_rule("py_test", name, [path], deps, path, size, comment, data))
    return "\n\n".join(blocks) + "\n"


def main(argv):
    text = generate()
    path = os.path.join(ROOT, "BUILD")
    if "--check" in argv:
        with open(path, encoding="utf-8") as f:
            if f.read() != text:
                print("BUILD is out of date: run python scripts/gen_build.py", file=sys.stderr)
                return 1
        return 0
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
