"""dstack's `repos[].if_exists: skip`: the repo is bound at a staging path and the container's start
script (upload.place_repo, in launch.run_command) copies it to its path when that is missing or empty,
leaves a path that is not empty as it is (saying so), and fails on a path that is a file. The script is
run here by a real /bin/sh against real folders (the staging path moved under tmp_path)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from gpufleet import upload
from gpufleet.launch import run_command
from gpufleet.models.run import RUN_CONFIG


def cfg(**fields):
    return RUN_CONFIG.validate_python({"type": "task", "image": "busybox", "commands": ["true"], **fields})


@pytest.fixture
def staging(tmp_path, monkeypatch) -> Path:
    stage = tmp_path / "stage"
    (stage / "sub").mkdir(parents=True)
    (stage / "train.py").write_text("print(1)\n")
    (stage / "sub" / "data.txt").write_text("d\n")
    monkeypatch.setattr(upload, "REPO_STAGING", str(stage))
    return stage


def start(target: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """The run's start script (`commands: [echo started]`), as the container runs it."""
    c = cfg(repos=[{"local_path": ".", "path": str(target), "if_exists": "skip"}], commands=["echo started", "pwd"],
            working_dir=str(tmp_path / "wd"))
    entrypoint, command = run_command(c)
    assert entrypoint is None and command[:2] == ["/bin/sh", "-c"]
    return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, check=False)


@pytest.mark.parametrize("before", ["missing", "empty", "lost+found"])
def test_a_missing_or_empty_path_gets_the_repo(staging, tmp_path, before):
    target = tmp_path / "my repo"
    if before != "missing":
        target.mkdir()
    if before == "lost+found":
        (target / "lost+found").mkdir()  # a new volume's: empty for dstack too
    p = start(target, tmp_path)
    assert p.returncode == 0 and "started" in p.stdout, p.stderr
    assert (target / "train.py").read_text() == "print(1)\n" and (target / "sub" / "data.txt").exists()
    assert p.stdout.splitlines()[-1] == str(tmp_path / "wd")  # then in the working directory, made


def test_a_path_that_is_not_empty_is_left_as_it_is(staging, tmp_path):
    target = tmp_path / "repo"
    target.mkdir()
    (target / "mine.txt").write_text("kept\n")
    p = start(target, tmp_path)
    assert p.returncode == 0 and "started" in p.stdout
    assert f"gpufleet: {target} is not empty: the repo is not put there (if_exists: skip)" in p.stdout
    assert sorted(x.name for x in target.iterdir()) == ["mine.txt"]


def test_a_path_that_is_a_file_fails_the_start(staging, tmp_path):
    target = tmp_path / "repo"
    target.write_text("x")
    p = start(target, tmp_path)
    assert p.returncode == 1 and "started" not in p.stdout
    assert f"gpufleet: the repo path {target} is not a directory" in p.stderr


def test_the_repo_is_bound_at_the_staging_path_and_error_keeps_the_bind(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUFLEET_HOME", str(tmp_path / "home"))
    skip = cfg(repos=[{"local_path": ".", "path": "/my-repo", "if_exists": "skip"}], files=["af:/etc/af"])
    (tmp_path / "af").write_text("a")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    packed = upload.pack(skip.uploads, tmp_path, lambda loc, msg: AssertionError(msg))
    upload_id, _ = upload.receive([packed.data], 10**8)
    upload.place(upload_id, "r", 2, 10**8)
    assert upload.host_binds(skip.uploads, "r")[1] == [{"src": "0", "dst": upload.REPO_STAGING},
                                                       {"src": "1/af", "dst": "/etc/af"}]
    from test_volopts import vars_of

    assert vars_of(skip)["workload_workdir"] == "/"  # podman makes no missing workdir: the script's cd does
    error = cfg(repos=[{"local_path": ".", "path": "/my-repo"}], files=["af:/etc/af"])
    assert upload.host_binds(error.uploads, "r")[1][0] == {"src": "0", "dst": "/my-repo"}
    assert upload.place_repo(error.uploads) == "" and "/my-repo" not in run_command(error)[1][-1]
    assert vars_of(error)["workload_workdir"] == "/workflow"


def test_with_an_entrypoint_the_repo_is_placed_before_it_runs(staging, tmp_path):
    target = tmp_path / "r"
    c = cfg(repos=[{"local_path": ".", "path": str(target), "if_exists": "skip"}], entrypoint="cat",
            commands=[str(target / "train.py")])
    entrypoint, command = run_command(c)
    p = subprocess.run([entrypoint, *command], capture_output=True, text=True, check=False)
    assert p.returncode == 0 and p.stdout == "print(1)\n", p.stderr


def test_a_task_without_commands_cannot_skip():
    with pytest.raises(Exception, match="needs `commands`"):
        cfg(repos=[{"local_path": ".", "if_exists": "skip"}], commands=[])
    dev = RUN_CONFIG.validate_python({"type": "dev-environment", "image": "busybox",
                                      "repos": [{"local_path": ".", "if_exists": "skip"}]})
    assert dev.uploads[0].if_exists == "skip" and upload.place_repo(dev.uploads)
