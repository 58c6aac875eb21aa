"""Remote repos (dstack's `repos: [{url, branch, hash, path}]`): `gpufleet apply` clones them on the
user's machine (gpufleet.upload.clone) and packs the working tree as a local repo's. Cloned from a real
git repository served by file:// (made here: a default branch and a `dev` branch, two commits each)."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from gpufleet import upload
from gpufleet.commands import apply
from gpufleet.errors import ConfigError
from gpufleet.models.run import RUN_CONFIG
from gpufleet.runconfig import parse_run


def git(cwd: Path, *args: str) -> str:
    p = subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=cwd, check=True,
                       capture_output=True)
    return p.stdout.decode().strip()


@pytest.fixture(scope="module")
def origin(tmp_path_factory) -> dict[str, str]:
    """A bare repository (file:// URL) with branches main (a.txt v1, v2) and dev (from main's first
    commit: dev.txt d1, d2); the commits by name."""
    base = tmp_path_factory.mktemp("origin")
    work = base / "work"
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    (work / "a.txt").write_text("v1\n")
    (work / ".gitignore").write_text("*.log\n")
    git(work, "add", ".")
    git(work, "commit", "-q", "-m", "one")
    first = git(work, "rev-parse", "HEAD")
    (work / "a.txt").write_text("v2\n")
    git(work, "commit", "-q", "-am", "two")
    main = git(work, "rev-parse", "HEAD")
    git(work, "checkout", "-q", "-b", "dev", first)
    (work / "dev.txt").write_text("d1\n")
    git(work, "add", "dev.txt")
    git(work, "commit", "-q", "-m", "d1")
    dev1 = git(work, "rev-parse", "HEAD")
    (work / "dev.txt").write_text("d2\n")
    git(work, "commit", "-q", "-am", "d2")
    dev2 = git(work, "rev-parse", "HEAD")
    git(base, "clone", "-q", "--bare", str(work), "origin.git")
    git(base / "origin.git", "symbolic-ref", "HEAD", "refs/heads/main")
    return {"url": f"file://{base}/origin.git", "first": first, "main": main, "dev1": dev1, "dev2": dev2}


def tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*"))
            if p.is_file() and ".git" not in p.relative_to(path).parts}


@pytest.mark.parametrize(("branch", "commit", "want", "files"), [
    (None, None, "main", {".gitignore": "*.log\n", "a.txt": "v2\n"}),  # the remote's default branch
    ("dev", None, "dev2", {".gitignore": "*.log\n", "a.txt": "v1\n", "dev.txt": "d2\n"}),
    ("dev", "dev1", "dev1", {".gitignore": "*.log\n", "a.txt": "v1\n", "dev.txt": "d1\n"}),
    (None, "first", "first", {".gitignore": "*.log\n", "a.txt": "v1\n"}),
    (None, "dev1:short", "dev1", {".gitignore": "*.log\n", "a.txt": "v1\n", "dev.txt": "d1\n"}),
])
def test_clone_checks_out_the_branch_and_the_commit(origin, tmp_path, branch, commit, want, files):
    if commit is not None:
        name, _, short = commit.partition(":")
        commit = origin[name][:8] if short else origin[name]
    got = upload.clone(origin["url"], tmp_path / "c", branch, commit)
    assert got == origin[want]
    assert tree(tmp_path / "c") == files


@pytest.mark.parametrize(("branch", "commit", "needle"), [
    ("nope", None, "nope"),
    ("nope", "first", "nope"),  # with a hash, the branch must exist all the same (as dstack's clone)
    (None, "0123456789abcdef0123456789abcdef01234567", "0123456789abcdef"),
])
def test_a_failed_clone_says_why_with_gits_message(origin, tmp_path, branch, commit, needle):
    commit = origin.get(commit, commit)
    with pytest.raises(upload.UploadError) as e:
        upload.clone(origin["url"], tmp_path / "c", branch, commit)
    assert str(e.value).startswith(f"cannot clone {origin['url']}") and needle in str(e.value)


def test_credentials_in_a_url_are_masked_in_messages(tmp_path):
    assert upload.mask_url("fatal: https://bob:hunter2@h/x and https://tok@h/y, ssh://git@h/z") == \
        "fatal: https://bob:***@h/x and https://***@h/y, ssh://git@h/z"
    with pytest.raises(upload.UploadError) as e:
        upload.clone("http://bob:hunter2@127.0.0.1:9/x.git", tmp_path / "c", timeout=20)
    assert "hunter2" not in str(e.value) and "bob:***@127.0.0.1" in str(e.value)


def test_git_never_prompts_and_has_a_timeout(tmp_path, monkeypatch):
    env = upload._clone_env()
    assert env["GIT_TERMINAL_PROMPT"] == "0" and "ext" not in env["GIT_ALLOW_PROTOCOL"].split(":")
    monkeypatch.setenv(upload.CLONE_TIMEOUT_ENV, "0.001")
    with pytest.raises(upload.UploadError, match="more than 0 s"):
        upload.clone("file:///nonexistent/x.git", tmp_path / "c")


def unpack(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def test_a_remote_repo_is_packed_as_a_local_one_and_the_summary_names_the_commit(origin, tmp_path):
    cfg = RUN_CONFIG.validate_python({"type": "task", "image": "busybox", "commands": ["true"],
                                      "repos": [{"url": origin["url"], "branch": "dev", "path": "/workflow/x"}]})
    packed = upload.pack(cfg.uploads, tmp_path, lambda loc, msg: AssertionError(msg))
    members = unpack(packed.data)
    assert members["0/dev.txt"] == b"d2\n" and not any("/.git/" in m for m in members)
    assert packed.lines == [f"repo {origin['url']}, branch dev at commit {origin['dev2'][:12]} (cloned here) "
                            "to /workflow/x"]
    dry = upload.pack(cfg.uploads, tmp_path, lambda loc, msg: AssertionError(msg), clone_repos=False)
    assert dry.files == 0 and "not in a dry run" in dry.lines[0]


def test_apply_refuses_a_clone_failure_with_the_file_line_and_field(origin, tmp_path):
    text = (f"type: task\nimage: busybox\ncommands: [true]\nrepos:\n  - url: {origin['url']}\n"
            "    branch: nope\n")
    path = tmp_path / "t.dstack.yml"
    path.write_text(text)
    req = parse_run(text, str(path), values=False)
    with pytest.raises(ConfigError) as e:
        apply._pack(req, text, path)
    p = e.value.problems[0]
    assert p.line == 5 and p.field.startswith("repos[0]") and "nope" in p.message
    assert apply._pack(req, text, path, clone=False).files == 0  # a dry run does not clone
