"""Tests that the installed package is self-contained under the `s2s_tf` namespace.

`scripts/run_tests.sh` installs the package (non-editable) and sets
S2S_TF_EXPECT_INSTALLED=1, so these checks run against site-packages, not the
source tree.
"""

import importlib.metadata
import importlib.util
import os
import sys
import unittest

import s2s_tf
import s2s_tf.export
import s2s_tf.flags
import s2s_tf.flags.common_flags

EXPECT_INSTALLED = os.environ.get("S2S_TF_EXPECT_INSTALLED") == "1"
REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


class InstalledPackageTest(unittest.TestCase):
    def setUp(self):
        if not EXPECT_INSTALLED:
            self.skipTest("S2S_TF_EXPECT_INSTALLED != 1: not run against an installed package")

    def test_imports_resolve_to_site_packages_not_the_checkout(self):
        package_dir = os.path.dirname(os.path.abspath(s2s_tf.__file__))
        self.assertIn("site-packages", package_dir)
        self.assertNotEqual(package_dir, os.path.join(REPO_ROOT, "s2s_tf"))
        for module in (s2s_tf.flags, s2s_tf.export, s2s_tf.flags.common_flags):
            path = os.path.abspath(module.__file__)
            self.assertTrue(path.startswith(package_dir + os.sep), path)

    def test_nothing_generic_at_the_top_level(self):
        site = os.path.dirname(os.path.dirname(os.path.abspath(s2s_tf.__file__)))
        for name in ("flags", "export", "tests", "bench"):
            self.assertFalse(os.path.exists(os.path.join(site, name)), f"{name} in {site}")
        files = importlib.metadata.distribution("s2s_tf").files
        top_level = {f.parts[0] for f in files if not f.parts[0].startswith("..")}
        self.assertEqual({t for t in top_level if not t.endswith(".dist-info")}, {"s2s_tf"})


class NamespaceTest(unittest.TestCase):
    def test_flags_and_export_live_in_the_namespace(self):
        self.assertEqual(s2s_tf.flags.__name__, "s2s_tf.flags")
        self.assertEqual(s2s_tf.export.__name__, "s2s_tf.export")
        # The top-level name `flags` must not be ours (absl has its own `flags`).
        spec = importlib.util.find_spec("flags")
        if spec is not None and spec.origin:
            self.assertNotEqual(
                os.path.dirname(spec.origin), os.path.dirname(s2s_tf.flags.__file__)
            )

    def test_version_matches_distribution(self):
        self.assertEqual(importlib.metadata.version("s2s_tf"), s2s_tf.__version__)
        self.assertGreaterEqual(sys.version_info[:2], (3, 10))


if __name__ == "__main__":
    unittest.main()
