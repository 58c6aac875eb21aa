"""dstack's `repos` and `files` on the lab: `gpufleet apply` packs a git working tree (its uncommitted
change and untracked file in, its .gitignore'd and .dstackignore'd files out) and a folder and a file
of `files`, a real local server keeps the archive, the hosts get it through the fleet's jump chain and
the container finds each item at its path, in /workflow; over the limit, nothing is submitted. A remote
repo (`url`, `branch`) is cloned by `gpufleet apply` on this machine, never on the hosts. `if_exists:
skip`: the repo lands in a missing path, and a path the image fills is left as it is."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import Cli

from gpufleet.lab import core

pytestmark = pytest.mark.lab
IMAGE = core.LAB_IMAGE


@pytest.fixture(scope="module")
def site(lab_factory, tmp_path_factory):
    lab = lab_factory(nodes=1, gpus=1, vendor="nvidia")
    cli = Cli(tmp_path_factory.mktemp("upload-home") / "home")
    cli("apply", "-f", str(lab.fleet_file), "-y", check=0)
    yield cli
    # the lab's hosts share this machine's disk: the folder a finished run's container keeps goes too
    for name in ("upload-ok", "upload-user", "upload-url", "upload-skip", "upload-skipped"):
        shutil.rmtree(f"/var/lib/gpufleet/uploads/gpufleet-{name}", ignore_errors=True)


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=cwd, check=True,
                   capture_output=True)


def make_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "committed.txt").write_text("committed-content\n")
    (repo / "modified.txt").write_text("as-committed\n")
    (repo / ".gitignore").write_text("ignored.txt\n")
    (repo / ".dstackignore").write_text("dstackignored.txt\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "init")
    (repo / "modified.txt").write_text("uncommitted-change\n")
    (repo / "untracked.txt").write_text("untracked-content\n")
    (repo / "ignored.txt").write_text("IGNORED\n")
    (repo / "dstackignored.txt").write_text("DSTACKIGNORED\n")
    return repo


def test_repo_and_files_are_in_the_container(site, tmp_path):
    repo = make_repo(tmp_path)
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "data.csv").write_text("a,b\n")
    (tmp_path / "note.txt").write_text("single-file\n")
    (repo / "run.yml").write_text(
        f"type: task\nname: upload-ok\nimage: {IMAGE}\n"
        "repos: [.]\n"
        "files:\n  - ../extra:/data\n  - ../note.txt:~/note.txt\n"
        "commands:\n"
        "  - echo \"pwd=$(pwd)\"\n"
        "  - cat committed.txt modified.txt untracked.txt /data/data.csv /root/note.txt\n"
        "  - for f in ignored.txt dstackignored.txt; do test -e $f && echo \"LEAKED $f\" || echo \"absent $f\"; done\n"
        "  - echo changed > modified.txt && echo writable\n")
    p = site("apply", "-f", str(repo / "run.yml"), "-y", timeout=240)
    out = p.stdout
    assert p.returncode == 0, out + p.stderr + site.server_log()
    assert "uploading " in out and f"repo {repo} to /workflow" in out and "../extra to /data" in out
    assert "pwd=/workflow" in out
    for text in ("committed-content", "uncommitted-change", "untracked-content", "a,b", "single-file",
                 "absent ignored.txt", "absent dstackignored.txt", "writable"):
        assert text in out, text
    assert "LEAKED" not in out and "IGNORED" not in out
    archive = site.home / "uploads" / "run-upload-ok.tar.gz"
    if archive.exists():  # until the sweep after the run's end
        assert archive.stat().st_mode & 0o777 == 0o600
    assert (repo / "modified.txt").read_text() == "uncommitted-change\n"  # the container's copy, not the user's
    unpacked = list(Path("/var/lib/gpufleet/uploads/gpufleet-upload-ok").glob("*/0/committed.txt"))
    assert len(unpacked) == 1 and unpacked[0].parent.parent.stat().st_mode & 0o777 == 0o700


def test_the_containers_user_owns_the_code(site, tmp_path):
    repo = make_repo(tmp_path)
    (repo / "run.yml").write_text(
        f"type: task\nname: upload-user\nimage: {IMAGE}\nuser: '1234:2345'\nrepos: [.]\n"
        "files: ['../note.txt:note.txt']\n"
        "commands:\n  - stat -c 'owner=%u:%g' . committed.txt\n  - cat note.txt\n"
        "  - echo more >> committed.txt && mkdir made && echo user-writes\n")
    (tmp_path / "note.txt").write_text("note-for-user\n")
    p = site("apply", "-f", str(repo / "run.yml"), "-y", timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("owner=1234:2345") == 2 and "note-for-user" in p.stdout and "user-writes" in p.stdout


def test_over_the_limit_nothing_is_sent(site, tmp_path):
    repo = make_repo(tmp_path)
    (repo / "weights.bin").write_bytes(b"w" * 8192)
    (repo / "run.yml").write_text(f"type: task\nname: upload-big\nimage: {IMAGE}\nrepos: [.]\ncommands: [true]\n")
    p = site("apply", "-f", str(repo / "run.yml"), "-y", env={"GPUFLEET_UPLOAD_LIMIT": "4KB"})
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "over the upload limit of 4.0 KB" in p.stderr and "weights.bin (8.0 KB)" in p.stderr, p.stderr
    assert "upload-big" not in site("ps", "-a").stdout


def test_a_missing_local_path_is_refused_with_its_line(site, tmp_path):
    (tmp_path / "run.yml").write_text(f"type: task\nimage: {IMAGE}\nfiles:\n  - nope.txt\ncommands: [true]\n")
    p = site("apply", "-f", str(tmp_path / "run.yml"), "-y")
    assert p.returncode == 2 and f"{tmp_path / 'run.yml'}:4:" in p.stderr and "no such file" in p.stderr, p.stderr


def test_a_remote_repos_branch_is_cloned_by_apply_and_in_the_container(site, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    (work / "main.txt").write_text("on-main\n")
    git(work, "add", "-A")
    git(work, "commit", "-qm", "main")
    git(work, "checkout", "-q", "-b", "dev")
    (work / "dev.txt").write_text("on-dev-branch\n")
    git(work, "add", "-A")
    git(work, "commit", "-qm", "dev")
    git(tmp_path, "clone", "-q", "--bare", str(work), "origin.git")
    url = f"file://{tmp_path}/origin.git"
    (tmp_path / "run.yml").write_text(
        f"type: task\nname: upload-url\nimage: {IMAGE}\n"
        f"repos:\n  - url: {url}\n    branch: dev\n    path: /workflow/x\n"
        "commands:\n  - cat /workflow/x/dev.txt /workflow/x/main.txt\n"
        "  - test -e /workflow/x/.git && echo HAS-GIT || echo no-git\n")
    p = site("apply", "-f", str(tmp_path / "run.yml"), "-y", timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr + site.server_log()
    assert f"repo {url}, branch dev at commit " in p.stdout and "(cloned here) to /workflow/x" in p.stdout
    assert "on-dev-branch" in p.stdout and "on-main" in p.stdout and "no-git" in p.stdout


def test_if_exists_skip_puts_the_repo_in_a_missing_path_and_leaves_the_images_alone(site, tmp_path):
    repo = make_repo(tmp_path)
    (repo / "run.yml").write_text(
        f"type: task\nname: upload-skip\nimage: {IMAGE}\n"
        "repos:\n  - local_path: .\n    path: /my-repo\n    if_exists: skip\n"
        "commands:\n  - cat /my-repo/committed.txt /my-repo/untracked.txt\n")
    p = site("apply", "-f", str(repo / "run.yml"), "-y", timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr + site.server_log()
    assert "committed-content" in p.stdout and "untracked-content" in p.stdout
    (repo / "run.yml").write_text(  # the image's /etc is not empty: skipped, the image's files stay
        f"type: task\nname: upload-skipped\nimage: {IMAGE}\n"
        "repos:\n  - local_path: .\n    path: /etc\n    if_exists: skip\n"
        "commands:\n  - test -e /etc/committed.txt && echo PUT || echo not-put\n  - test -s /etc/passwd && echo kept\n")
    p = site("apply", "-f", str(repo / "run.yml"), "-y", timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "/etc is not empty: the repo is not put there (if_exists: skip)" in p.stdout + p.stderr
    assert "not-put" in p.stdout and "kept" in p.stdout and "PUT" not in p.stdout
