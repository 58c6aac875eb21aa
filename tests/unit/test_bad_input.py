"""Bad input never reaches a host: every malformed fleet or run config in tests/fixtures/bad-configs
(and a few generated here: empty, binary, non-UTF-8, control characters, 10 MB) is refused by the
real CLI with exit code 2, ``file:line:column: field: reason`` and no traceback, before any ssh or
ansible-playbook runs and before anything is written to the state directory.

Each corpus file starts with three comment lines:

    # expect: <a fragment of the error message>
    # at: <line>:<column>
    # field: <the field path, or - where the problem has none (broken YAML)>

The CLI runs with a fake ``ssh``, ``scp``, ``sftp``, ``ansible`` and ``ansible-playbook`` first on
PATH that record any call in a marker file; a control case (a valid fleet) shows the fakes are what
gpufleet would call.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "fixtures" / "bad-configs"
# what the hostile values in the corpus would create if a shell or ssh ever ran them
HOSTILE_MARKERS = [Path("/tmp/gpufleet-pwned")]
FAKES = ("ssh", "scp", "sftp", "ansible", "ansible-playbook")


@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    expect: str
    at: str  # "line:column"
    field: str | None


def corpus_cases() -> list[Case]:
    cases = []
    for path in sorted(CORPUS.glob("*.yml")):
        head = path.read_text(encoding="utf-8").split("\n")[:3]
        assert head[0].startswith("# expect: ") and head[1].startswith("# at: ") and \
            head[2].startswith("# field: "), f"{path.name}: needs # expect:, # at: and # field: lines"
        field = head[2].removeprefix("# field: ").strip()
        cases.append(Case(path.stem, path, head[0].removeprefix("# expect: ").strip(),
                          head[1].removeprefix("# at: ").strip(), None if field == "-" else field))
    return cases


# generated here rather than committed: (name, bytes, expected fragment, line:column)
GENERATED = [
    ("gen-empty", b"", "the file is empty", "1:1"),
    ("gen-binary", b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 64, "not valid UTF-8 (byte 0x80)", "2:118"),
    ("gen-latin1", b"type: fleet\nname: caf\xe9\nssh_config: {user: u, hosts: [a]}\n",
     "not valid UTF-8 (byte 0xe9)", "2:10"),
    ("gen-utf16", "type: fleet\n".encode("utf-16"), "not valid UTF-8 (byte 0xff)", "1:1"),
    ("gen-nul", b"type: fleet\nname: a\x00b\nssh_config: {user: u, hosts: [a]}\n",
     "invalid YAML: character 0x0000 is not allowed", "2:8"),
    ("gen-escape", b"type: fleet\nssh_config:\n  user: u\n  hosts: [node\x1b[31m]\n",
     "invalid YAML: character 0x001b is not allowed", "4:15"),
    ("gen-10mb", b"type: fleet\n# " + b"x" * (10 * 1024 * 1024) + b"\nssh_config: {user: u, hosts: [a]}\n",
     "a config may be at most 1048576 bytes", "2:1048565"),
    ("gen-run-10mb", b"type: task\nimage: busybox\ncommands:\n" + b"  - echo hi\n" * 1_000_000,
     "a config may be at most 1048576 bytes", "87382:5"),
]


@dataclass
class Outcome:
    case: Case
    proc: subprocess.CompletedProcess
    home: Path
    marker: Path


def fake_bin(folder: Path, marker: Path) -> Path:
    folder.mkdir(parents=True)
    for name in FAKES:
        script = folder / name
        script.write_text(f"#!/bin/sh\necho \"{name} $*\" >> '{marker}'\nexit 255\n")
        script.chmod(0o755)
    return folder


def run_cli(case: Case, work: Path) -> Outcome:
    marker = work / "called"
    home = work / "home"
    bin_dir = fake_bin(work / "bin", marker)
    env = {**os.environ, "GPUFLEET_HOME": str(home), "COLUMNS": "400", "TERM": "dumb",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "gpufleet", "apply", "-f", str(case.path), "-y"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    return Outcome(case, proc, home, marker)


ALL = corpus_cases()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, Outcome]:
    """Run the CLI on every case, 8 at a time (each is a fresh Python process)."""
    for m in HOSTILE_MARKERS:
        assert not m.exists(), f"{m} exists before the test: remove it so the test can prove nothing creates it"
    base = tmp_path_factory.mktemp("bad-input")
    cases = list(ALL)
    gen_dir = base / "generated"
    gen_dir.mkdir()
    for name, data, expect, at in GENERATED:
        path = gen_dir / f"{name}.yml"
        path.write_bytes(data)
        cases.append(Case(name, path, expect, at, None))
    with ThreadPoolExecutor(8) as pool:
        done = list(pool.map(lambda c: run_cli(c, base / c.name), cases))
    return {o.case.name: o for o in done}


def test_corpus_is_large_and_covers_fleets_and_runs() -> None:
    names = [c.name for c in ALL]
    assert len(names) >= 40
    assert sum(n.startswith("fleet-") for n in names) >= 20 and sum(n.startswith("run-") for n in names) >= 20
    # hostile values create only markers this test checks for
    touched = {Path(m) for c in ALL for m in re.findall(r"touch (/[^\s'\")`=]+)", c.path.read_text())}
    assert touched <= set(HOSTILE_MARKERS), touched


@pytest.mark.parametrize("name", [c.name for c in ALL] + [g[0] for g in GENERATED])
def test_bad_config_is_refused_before_anything_runs(outcomes: dict[str, Outcome], name: str) -> None:
    o = outcomes[name]
    case, p = o.case, o.proc
    shown = f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    assert p.returncode == 2, shown
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, shown
    # the problem is on one line: error FILE:LINE:COL: [FIELD: ]MESSAGE
    lines = [line for line in p.stderr.splitlines() if f"{case.path}:{case.at}: " in line]
    assert lines, f"no error at {case.path.name}:{case.at}\n{shown}"
    prefix = f"{case.path}:{case.at}: " + (f"{case.field}: " if case.field else "")
    assert any(prefix in line and case.expect in line for line in lines), \
        f"expected {prefix!r} ... {case.expect!r}\n{shown}"
    # nothing ran, nothing was written
    assert not o.marker.exists(), f"called: {o.marker.read_text()}"
    assert not (o.home / "fleets").exists()
    assert not (o.home / "runner").exists()
    for m in HOSTILE_MARKERS:
        assert not m.exists(), f"{m} was created"


def test_fake_ssh_is_what_gpufleet_would_call(tmp_path: Path) -> None:
    """Control: with a valid fleet, the same setup does record an ssh call (so the absence of the
    marker above means something), and writes the fleet's files."""
    path = tmp_path / "ok.yml"
    path.write_text("type: fleet\nname: ok\nssh_config:\n  user: ubuntu\n  hosts: [node-1]\n"
                    "  proxy_jump: {hostname: login.invalid}\n")
    o = run_cli(Case("ok", path, "", "", None), tmp_path / "run")
    assert o.proc.returncode == 1, o.proc.stderr + o.proc.stdout
    assert "Traceback" not in o.proc.stderr
    assert o.marker.read_text().startswith("ssh -F ")
    assert (o.home / "fleets" / "ok" / "ssh_config").exists()
