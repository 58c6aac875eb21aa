"""`ansible-test sanity` on the gpufleet.fleet collection is clean, as certification asks.

scripts/sanity.py builds the collection from this checkout, installs it into a temporary
`ansible_collections/gpufleet/fleet` and runs `ansible-test sanity --python 3.11` there, with HOME in
this test's temporary folder: ansible-test's per-test virtual environments and its pip bootstrap
script (a stand-in the script writes, see its docstring) start empty every time, so nothing left on
the machine makes it pass. It needs the package index (ansible-test installs each test's
requirements, pylint among them): about 2.5 minutes on 2 cores.

The collection's sanity ignores must be ones that ansible-lint's `sanity` rule allows.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from ansiblelint.rules.sanity import CheckSanityIgnoreFiles

ROOT = Path(__file__).resolve().parents[2]
# the tests that found something before (and the ignore file's own check); the rest ran clean already
MUST_RUN = {"validate-modules", "pylint", "pep8", "shebang", "import", "compile", "ansible-doc", "ignores",
            "yamllint", "runtime-metadata"}


def test_ignore_file_holds_only_ignores_ansible_lint_allows():
    ignores = sorted((ROOT / "tests" / "sanity").glob("ignore-*.txt"))
    assert [p.name for p in ignores] == ["ignore-2.19.txt"]
    for line in ignores[0].read_text().splitlines():
        path, test = line.split("#", 1)[0].split()
        assert test in CheckSanityIgnoreFiles.allowed_ignores, line
        assert (ROOT / path).is_file(), line


def test_ansible_test_sanity_is_clean(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "sanity.py"), "--home", str(tmp_path / "home"),
                        "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=840)
    out = p.stdout + p.stderr
    report = f"exit {p.returncode}\n{out[-20000:]}"
    assert p.returncode == 0, report
    assert not re.search(r"^(ERROR|FATAL):", out, re.M), report
    ran = set(re.findall(r'^Running sanity test "([^"]+)"', out, re.M))
    assert MUST_RUN <= ran, (sorted(MUST_RUN - ran), report)
    # its HOME only: the stand-in bootstrap script was used, nothing was downloaded outside the index
    assert "Using cached pip" in out and not re.search(r"Downloading pip \S+ bootstrap script", out), report
