"""Checks that the root BUILD file describes every module, test and binary.

BUILD files are Starlark, whose syntax is a subset of Python's, so the rule
calls are read with `ast` without running Bazel. Library sources are listed
under their import path: `s2s_tf/flags` and `s2s_tf/export` are links to the
top-level `flags/` and `export/`. The file is written by scripts/gen_build.py,
and the last test checks that it is up to date.
"""

import ast
import dataclasses
import glob
import os
import subprocess
import sys
import unittest

_REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
_BUILD_PATH = os.path.join(_REPO_ROOT, "BUILD")

# Source directory -> import path of the package it holds.
_PACKAGE_DIRS = {"s2s_tf": "s2s_tf"}
_FIRST_PARTY = "s2s_tf"
# Modules whose test has another name: the test named here imports or runs them.
_COVERED_BY = {
    "s2s_tf/crosscheck_main.py": "tests/art_crosscheck_test.py",
    "s2s_tf/data/input_pipeline.py": "tests/data_test.py",
    "s2s_tf/data/sources.py": "tests/data_test.py",
    "s2s_tf/demo.py": "tests/demo_main_test.py",
    "s2s_tf/export/export_saved_model_main.py": "tests/export_main_test.py",
    "s2s_tf/export/serving_files.py": "tests/export_serving_files_test.py",
    "s2s_tf/export/signatures.py": "tests/export_signatures_test.py",
    "s2s_tf/flags/common_flags.py": "tests/train_main_test.py",
    "s2s_tf/flags/convert_flags.py": "tests/convert_main_test.py",
    "s2s_tf/flags/eval_flags.py": "tests/eval_lib_test.py",
    "s2s_tf/flags/export_flags.py": "tests/export_main_test.py",
    "s2s_tf/flags/pipeline_flags.py": "tests/pipeline_test.py",
    "s2s_tf/flags/train_flags.py": "tests/train_main_test.py",
    "s2s_tf/models/checkpoint_files.py": "tests/torch_convert_test.py",
    "s2s_tf/pipeline_main.py": "tests/pipeline_test.py",
    "s2s_tf/robust_pipeline.py": "tests/pipeline_test.py",
    "s2s_tf/robustness/attacks/base.py": "tests/attack_base_test.py",
    "s2s_tf/robustness/attacks/cw_l2.py": "tests/cleverhans_shim_test.py",
    "s2s_tf/robustness/attacks/fgsm.py": "tests/attacks_test.py",
    "s2s_tf/robustness/attacks/mim.py": "tests/attacks_test.py",
    "s2s_tf/robustness/attacks/noise.py": "tests/attacks_test.py",
    "s2s_tf/robustness/attacks/pgd.py": "tests/attacks_test.py",
    "s2s_tf/robustness/attacks/registry.py": "tests/attacks_test.py",
    "s2s_tf/robustness/attacks/spsa.py": "tests/cleverhans_shim_test.py",
    "s2s_tf/analysis/claims_report.py": "tests/verdicts_test.py",
    "s2s_tf/robustness/cascade.py": "tests/evaluation_test.py",
    "s2s_tf/robustness/distributed.py": "tests/distributed_eval_test.py",
    "s2s_tf/robustness/eval_config.py": "tests/evaluation_test.py",
    "s2s_tf/analysis/report.py": "tests/eval_lib_test.py",
    "s2s_tf/robustness/runner.py": "tests/attacks_test.py",
    "s2s_tf/testing_utils.py": "tests/eval_lib_test.py",
    "s2s_tf/train/train_lib.py": "tests/stages_test.py",
    "s2s_tf/train/classifier_stage.py": "tests/stages_test.py",
    "s2s_tf/train/decoder_stage.py": "tests/stages_test.py",
    "s2s_tf/train/reconstruction_stage.py": "tests/stages_test.py",
    "s2s_tf/train/stage_common.py": "tests/stages_test.py",
    "s2s_tf/train/loop_utils.py": "tests/trainer_test.py",
    "s2s_tf/train/stage_eval.py": "tests/trainer_test.py",
}
_RULES_BZL = "@rules_python//python:defs.bzl"
_PY_RULES = ("py_library", "py_binary", "py_test")
# Third-party packages come from the Python environment, never from deps. Both
# distribution and import names are listed.
_PIP_PACKAGES = frozenset(
    {
        "absl",
        "absl_py",
        "cleverhans",
        "keras",
        "numpy",
        "np",
        "tensorboard",
        "tensorflow",
        "tensorflow_cpu",
        "tensorflow_datasets",
        "tf",
        "tfds",
    }
)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One py_* rule call of the BUILD file."""

    kind: str
    name: str
    srcs: tuple[str, ...]
    deps: tuple[str, ...]
    main: str | None
    lineno: int


def parse_build(text):
    """Reads the `load` statements and py_* rules of a BUILD file.

    Args:
      text: Contents of the BUILD file.

    Returns:
      A pair `(loads, rules)`: `loads` maps each loaded symbol to its .bzl
      label; `rules` is the list of `Rule`s in file order.

    Raises:
      ValueError: If a rule's name, srcs, deps or main is not a literal, since
        globs or computed values would hide what the checks look for.
    """
    loads, rules = {}, []
    for node in ast.parse(text, filename="BUILD").body:
        call = node.value if isinstance(node, ast.Expr) else None
        if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
            continue
        if call.func.id == "load":
            bzl = ast.literal_eval(call.args[0])
            for arg in call.args[1:]:
                loads[ast.literal_eval(arg)] = bzl
            for kw in call.keywords:
                loads[kw.arg] = bzl
        elif call.func.id in _PY_RULES:
            rules.append(_parse_rule(call))
    return loads, rules


def _parse_rule(call):
    attrs = {}
    for kw in call.keywords:
        if kw.arg in ("name", "srcs", "deps", "main"):
            try:
                attrs[kw.arg] = ast.literal_eval(kw.value)
            except ValueError as e:
                raise ValueError(
                    f"BUILD:{call.lineno}: `{kw.arg}` of {call.func.id} must be a literal"
                ) from e
    return Rule(
        kind=call.func.id,
        name=attrs.get("name", ""),
        srcs=tuple(attrs.get("srcs", ())),
        deps=tuple(attrs.get("deps", ())),
        main=attrs.get("main"),
        lineno=call.lineno,
    )


def module_name(path):
    """Import path of a source file, e.g. `flags/x.py` -> `s2s_tf.flags.x`."""
    top, *rest = path[: -len(".py")].split("/")
    parts = _PACKAGE_DIRS[top].split(".") + rest
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def library_sources(root):
    """Relative paths of all .py files under the package directories."""
    paths = []
    for top in _PACKAGE_DIRS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, top), followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
            rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
            paths.extend(f"{rel_dir}/{f}" for f in sorted(filenames) if f.endswith(".py"))
    return paths


def first_party_imports(path, source, known_modules):
    """First-party modules a source file imports, anywhere in its body.

    Args:
      path: Path of the file relative to the repository root.
      source: Contents of the file.
      known_modules: Import paths of all first-party modules and packages.

    Returns:
      The set of imported module names. `from a import b` counts as importing
      `a.b` when that is a module and `a` otherwise.
    """
    own = module_name(path) if path.split("/")[0] in _PACKAGE_DIRS else ""
    own_package = own if path.endswith("/__init__.py") else own.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = own_package.split(".")[: len(own_package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known_modules else base)
    return {m for m in found if m == _FIRST_PARTY or m.startswith(_FIRST_PARTY + ".")}


def _label_name(label):
    """`:x` or `//:x` -> `x`; anything else (other packages, repos) -> None."""
    for prefix in (":", "//:"):
        if label.startswith(prefix):
            return label[len(prefix) :]
    return None


class BuildTargetsTest(unittest.TestCase):
    """Compares the BUILD file with the modules, tests and binaries on disk."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        if not os.path.isfile(_BUILD_PATH):
            reason = f"no BUILD file at {_BUILD_PATH} (tests run outside the repository)"
            print(f"build_targets_test: skipping, {reason}", file=sys.stderr)
            raise unittest.SkipTest(reason)
        with open(_BUILD_PATH, encoding="utf-8") as f:
            cls.loads, cls.rules = parse_build(f.read())
        cls.by_name = {r.name: r for r in cls.rules}
        cls.libraries = [r for r in cls.rules if r.kind == "py_library"]
        cls.sources = library_sources(_REPO_ROOT)
        cls.tests = sorted(
            os.path.relpath(p, _REPO_ROOT).replace(os.sep, "/")
            for p in glob.glob(os.path.join(_REPO_ROOT, "tests", "*_test.py"))
        )
        cls.modules = {module_name(p): p for p in cls.sources}
        # Module -> library that owns it (first one; duplicates fail elsewhere).
        cls.owner = {}
        for lib in reversed(cls.libraries):
            for src in lib.srcs:
                if src in cls.sources:
                    cls.owner[module_name(src)] = lib.name

    def _read(self, path):
        with open(os.path.join(_REPO_ROOT, path), encoding="utf-8") as f:
            return f.read()

    def test_rules_are_loaded_from_rules_python(self):
        for kind in _PY_RULES:
            self.assertEqual(self.loads.get(kind), _RULES_BZL, f"load {kind} from {_RULES_BZL}")

    def test_target_names_are_unique(self):
        names = [r.name for r in self.rules]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        self.assertEqual(duplicates, [], "target names defined more than once")
        self.assertNotIn("", names, "a rule without a name")

    def test_every_module_is_in_exactly_one_library(self):
        counts = {p: 0 for p in self.sources}
        stale = []
        for lib in self.libraries:
            for src in lib.srcs:
                if src in counts:
                    counts[src] += 1
                else:
                    stale.append(f"BUILD:{lib.lineno}: //:{lib.name} lists {src}, not a module")
        self.assertEqual(stale, [])
        missing = [p for p, n in counts.items() if n == 0]
        self.assertEqual(missing, [], "modules without a py_library")
        repeated = [p for p, n in counts.items() if n > 1]
        self.assertEqual(repeated, [], "modules in several py_library targets")

    def test_every_test_has_a_py_test(self):
        self.assertIn("tests/build_targets_test.py", self.tests)
        for path in self.tests:
            name = os.path.basename(path)[: -len(".py")]
            with self.subTest(test=path):
                rule = self.by_name.get(name)
                self.assertIsNotNone(rule, f"no py_test //:{name} for {path}")
                self.assertEqual(rule.kind, "py_test")
                self.assertEqual(rule.srcs, (path,))
                self.assertEqual(rule.main, path)

    def test_every_binary_has_a_py_binary(self):
        binaries = [p for p in self.sources if p.endswith("_main.py")]
        self.assertNotEqual(binaries, [], "expected at least one *_main.py binary")
        for path in binaries:
            name = os.path.basename(path)[: -len(".py")]
            with self.subTest(binary=path):
                rule = self.by_name.get(name)
                self.assertIsNotNone(rule, f"no py_binary //:{name} for {path}")
                self.assertEqual(rule.kind, "py_binary")
                self.assertIn(path, rule.srcs)
                self.assertEqual(rule.main, path)

    def test_deps_refer_to_defined_targets(self):
        undefined = [
            f"//:{r.name} -> {dep}"
            for r in self.rules
            for dep in r.deps
            if _label_name(dep) not in self.by_name
        ]
        self.assertEqual(undefined, [], "deps that are not targets of this BUILD file")

    def test_no_pip_packages_in_deps(self):
        offending = [
            f"//:{r.name} -> {dep}"
            for r in self.rules
            for dep in r.deps
            if dep.startswith("@")
            or dep.rsplit(":", 1)[-1].rsplit("/", 1)[-1].replace("-", "_").lower() in _PIP_PACKAGES
        ]
        self.assertEqual(offending, [], "pip packages come from the environment, not deps")

    def test_deps_follow_imports(self):
        for rule in self.rules:
            with self.subTest(target=rule.name):
                required, allowed, unknown = self._expected_deps(rule)
                self.assertEqual(unknown, [], "imports of modules that no py_library owns")
                deps = {_label_name(d) or d for d in rule.deps}
                self.assertEqual(sorted(required - deps), [], "imported but not in deps")
                self.assertEqual(sorted(deps - allowed), [], "in deps but not imported")

    def _expected_deps(self, rule):
        """Derives a rule's deps from the imports of its sources.

        Importing a module also runs its package's `__init__.py`, so each
        module's enclosing package counts as an import. A source that a dep
        library also lists (a binary and its `*_lib`) is covered by that
        library, which carries its imports.

        Args:
          rule: The `Rule` to check.

        Returns:
          `(required, allowed, unknown)`: target names the rule must depend
          on, names it may depend on, and imported first-party modules that
          no py_library owns.
        """
        dep_names = {_label_name(d) for d in rule.deps} & set(self.by_name)
        covering = {n for n in dep_names if set(self.by_name[n].srcs) & set(rule.srcs)}
        covered = {s for n in covering for s in self.by_name[n].srcs}
        required, unknown = set(), []
        for src in rule.srcs:
            if src in covered:
                continue
            modules = first_party_imports(src, self._read(src), self.modules)
            if src in self.sources:
                modules.add(module_name(src).rpartition(".")[0])
            for module in sorted(modules - {""}):
                if module in self.owner:
                    required.add(self.owner[module])
                else:
                    unknown.append(f"{src}: {module}")
        required.discard(rule.name)
        return required, required | covering, unknown

    def test_every_module_has_a_test(self):
        for path in self.sources:
            if path.endswith("__init__.py"):
                continue
            name = os.path.basename(path)[: -len(".py")]
            own = f"tests/{name}_test.py"
            with self.subTest(module=path):
                if own in self.tests and path not in _COVERED_BY:
                    continue
                covering = _COVERED_BY.get(path)
                self.assertIsNotNone(covering, f"no {own} and no covering test named for {path}")
                self.assertIn(covering, self.tests)

    def test_build_file_is_generated_from_the_sources(self):
        script = os.path.join(_REPO_ROOT, "scripts", "gen_build.py")
        result = subprocess.run(
            [sys.executable, script, "--check"], capture_output=True, text=True, check=False
        )
        self.assertEqual(result.returncode, 0, result.stderr)


if __name__ == "__main__":
    unittest.main()
