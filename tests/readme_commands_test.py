"""Every command the README shows works as written, from the repository root and from elsewhere.

The test reads the README's ```bash blocks, joins continued lines and picks the
commands that start one of the project's binaries (the console scripts
`s2s_*` or `python -m s2s_tf...`). Each runs in a subprocess with `--helpxml`
appended, with the virtual environment's bin directory first on PATH (as after
`source .venv/bin/activate`):

- from the repository root, as written (the checkout's `s2s_tf/` then shadows
  the installed package for `python -m`, so both must agree);
- from a temporary directory, with the README's relative repository paths
  (`flags/presets/...`) made absolute, as a user elsewhere would write them.

The binary must start, read its flagfile (if any) and know every flag the
command passes. Checking the flags against `--helpxml` rather than running the
command keeps the test fast and offline (the commands name ImageNet folders and
checkpoints that do not exist here). The set-up scripts themselves
(`scripts/*.sh`) are what CI runs, so they are not run again here.
"""

import os
import re
import shlex
import subprocess
import sys
import tempfile
import unittest
import xml.etree.ElementTree as ET

_REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
_README = os.path.join(_REPO_ROOT, "README.md")
_CONSOLE_SCRIPTS = (
    "s2s_convert",
    "s2s_crosscheck",
    "s2s_demo",
    "s2s_evaluate",
    "s2s_export",
    "s2s_pipeline",
    "s2s_train",
)
# Paths the README writes relative to the repository root.
_REPO_RELATIVE = ("flags/presets/",)
_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)


def readme_commands(text):
    """The binary commands of the README's bash blocks, continuation lines joined."""
    commands = []
    for block in _BLOCK.findall(text):
        for line in _shell_lines(block):
            words = shlex.split(line)
            while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
                words = words[1:]  # VAR=value prefixes
            if not words:
                continue
            if words[0] in _CONSOLE_SCRIPTS or (
                os.path.basename(words[0]).startswith("python")
                and words[1:2] == ["-m"]
                and words[2].startswith("s2s_tf.")
            ):
                commands.append(line)
    return commands


def _shell_lines(block):
    """The block's commands: continuations joined, comments dropped, quotes kept whole."""
    pending = ""
    for line in block.replace("\\\n", " ").splitlines():
        if not pending:
            line = line.split(" #", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
        pending = f"{pending}\n{line}" if pending else line
        try:
            shlex.split(pending)
        except ValueError:  # an open quote: the command goes on on the next line
            continue
        yield pending
        pending = ""


def _flag_names(command):
    """The flag names a command passes (`--x=1`, `--x 1`, `--nox`)."""
    names = set()
    for word in shlex.split(command):
        match = re.match(r"^--([A-Za-z0-9_]+)", word)
        if match:
            names.add(match.group(1))
    return names


def _defined_flags(helpxml):
    root = ET.fromstring(helpxml[helpxml.index("<?xml") :])
    # absl's own special flags are not listed; the flags inside a --flagfile are parsed
    # by the binary itself, which fails on an unknown one before printing its help.
    defined = {"flagfile", "undefok"}
    for flag in root.iter("flag"):
        name = flag.findtext("name")
        defined.add(name)
        if flag.findtext("type") == "bool":
            defined.add(f"no{name}")
    return defined


@unittest.skipUnless(os.path.isfile(_README), "no README.md (tests run outside the repository)")
class ReadmeCommandsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        with open(_README, encoding="utf-8") as f:
            cls.commands = readme_commands(f.read())
        bin_dir = os.path.dirname(sys.executable)
        cls.env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
        cls.env["TF_CPP_MIN_LOG_LEVEL"] = "3"

    def test_the_readme_shows_every_binary(self):
        shown = " ".join(self.commands)
        for script in _CONSOLE_SCRIPTS:
            self.assertIn(script, shown, f"the README shows no {script} command")

    def _check(self, command, cwd):
        result = subprocess.run(
            ["bash", "-c", f"{command} --helpxml"],
            cwd=cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        self.assertIn("<?xml", result.stdout, f"{command!r} in {cwd}:\n{result.stderr[-2000:]}")
        unknown = _flag_names(command) - _defined_flags(result.stdout)
        self.assertEqual(unknown, set(), f"{command!r} passes flags its binary does not define")

    def test_commands_work_from_the_repository_root(self):
        self.assertGreaterEqual(len(self.commands), 10, self.commands)
        for command in self.commands:
            with self.subTest(command=command):
                self._check(command, _REPO_ROOT)

    def test_commands_work_from_elsewhere_with_absolute_paths(self):
        elsewhere = tempfile.mkdtemp()
        for command in self.commands:
            for relative in _REPO_RELATIVE:
                command = re.sub(
                    rf"(?<![\w/]){re.escape(relative)}",
                    os.path.join(_REPO_ROOT, relative),
                    command,
                )
            with self.subTest(command=command):
                self._check(command, elsewhere)

    def test_the_extraction_finds_commands_and_skips_the_rest(self):
        text = (
            "```bash\n# comment\nP=1 s2s_train --stage=stage1 \\\n   --workdir=/w  # why\n"
            "bash scripts/run_main.sh\npython -m s2s_tf.demo_main --dataset=testing\n"
            "pip install x\n```\n```python\ns2s_train --not_bash\n```\n"
        )
        self.assertEqual(
            readme_commands(text),
            [
                "P=1 s2s_train --stage=stage1     --workdir=/w",
                "python -m s2s_tf.demo_main --dataset=testing",
            ],
        )


if __name__ == "__main__":
    unittest.main()
