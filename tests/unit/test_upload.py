"""Code upload (dstack's `repos`, `files`, `working_dir`): the forms and where each item lands, what the
CLI packs from a git working tree and from folders (.gitignore, .dstackignore), the size limit, and
the server's checks of an archive the hosts unpack as root."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from gpufleet import upload
from gpufleet.errors import ConfigError
from gpufleet.models.run import RUN_CONFIG
from gpufleet.runconfig import UNSUPPORTED, parse_run

CORPUS = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "dstack-configs"


def cfg(**fields):
    return RUN_CONFIG.validate_python({"type": "task", "image": "busybox", "commands": ["true"], **fields})


def where(**fields) -> list[tuple[str, str, str]]:
    return [(u.kind, u.url or u.local_path, u.path) for u in cfg(**fields).uploads]


# --------------------------------------------------------------------------- forms

@pytest.mark.parametrize(("fields", "expected"), [
    ({"repos": ["."]}, [("repo", ".", "/workflow")]),
    ({"repos": [".."]}, [("repo", "..", "/workflow")]),
    ({"repos": ["..:/my-repo"]}, [("repo", "..", "/my-repo")]),
    ({"repos": [{"local_path": "..", "path": "/my-repo"}]}, [("repo", "..", "/my-repo")]),
    ({"repos": [{"local_path": ".", "path": "sub"}]}, [("repo", ".", "/workflow/sub")]),
    ({"repos": ["."], "working_dir": "/workspace"}, [("repo", ".", "/workspace")]),
    ({"repos": ["."], "working_dir": "src"}, [("repo", ".", "/workflow/src")]),  # dstack's pre-0.20 reading
    ({"files": ["train.py"]}, [("file", "train.py", "/workflow/train.py")]),
    ({"files": [".:examples"]}, [("file", ".", "/workflow/examples")]),
    ({"files": ["../examples"]}, [("file", "../examples", "/examples")]),
    ({"files": ["~/.ssh/id_rsa"]}, [("file", "~/.ssh/id_rsa", "/root/.ssh/id_rsa")]),
    ({"files": ["~/.ssh/id_rsa:/root/.ssh/id_rsa"]}, [("file", "~/.ssh/id_rsa", "/root/.ssh/id_rsa")]),
    ({"files": ["../configs:~/configs"]}, [("file", "../configs", "/root/configs")]),
    ({"files": [{"local_path": "a", "path": "/x/a"}]}, [("file", "a", "/x/a")]),
    ({"repos": ["."], "files": ["c.yaml"]}, [("repo", ".", "/workflow"), ("file", "c.yaml", "/workflow/c.yaml")]),
    ({"files": ["C:\\data:/data"]}, [("file", "C:\\data", "/data")]),
    ({"repos": ["https://github.com/dstackai/dstack"]}, [("repo", "https://github.com/dstackai/dstack", "/workflow")]),
    ({"repos": ["https://github.com/x/y.git:/r"]}, [("repo", "https://github.com/x/y.git", "/r")]),
    ({"repos": ["git@github.com:x/y.git:sub"]}, [("repo", "git@github.com:x/y.git", "/workflow/sub")]),
    ({"repos": [{"url": "ssh://git@host/x/y", "branch": "dev", "hash": "abc123", "path": "/r"}]},
     [("repo", "ssh://git@host/x/y", "/r")]),
])
def test_forms_and_where_each_item_lands(fields, expected):
    assert where(**fields) == expected


@pytest.mark.parametrize(("fields", "workdir"), [
    ({}, None),  # the image's, as in dstack
    ({"working_dir": "/w"}, "/w"),
    ({"working_dir": "sub"}, "/workflow/sub"),
    ({"files": ["a"]}, "/workflow"),  # a run that uploads code works in /workflow unless it says otherwise
])
def test_working_dir(fields, workdir):
    assert cfg(**fields).workdir == workdir


@pytest.mark.parametrize(("fields", "needle"), [
    ({"repos": ["https://user:s3cret@github.com/x/y"]}, "password or token"),
    ({"repos": ["https://ghp_s3cret@github.com/x/y"]}, "password or token"),
    ({"repos": [{"url": "ssh://git:s3cret@host/x/y"}]}, "password or token"),
    ({"repos": [{"url": "ftp://host/x/y"}]}, "scheme"),
    ({"repos": [{"url": "--upload-pack=touch /tmp/x"}]}, "git URL"),
    ({"repos": [{"url": "ext::sh -c touch% /tmp/x"}]}, "git URL"),
    ({"repos": [{"url": "https://h/x", "local_path": "."}]}, "not both"),
    ({"repos": [{"url": "https://h/x", "hash": "main"}]}, "commit hash"),
    ({"repos": [{"url": "https://h/x", "branch": "--force"}]}, "not a git branch"),
    ({"repos": [{"local_path": ".", "branch": "main"}]}, "working tree"),
    ({"repos": [{"local_path": ".", "hash": "abcd"}]}, "working tree"),
    ({"repos": [{"local_path": ".", "if_exists": "skip"}], "commands": []}, "`if_exists: skip` needs `commands`"),
    ({"repos": [{"local_path": ".", "if_exists": "keep"}]}, "if_exists"),
    ({"repos": [".", ".."]}, "at most 1"),
    ({"repos": [{"path": "/r"}]}, "local_path"),
    ({"repos": [{"path": "/r"}]}, "url"),
    ({"files": ["a:b:c"]}, "LOCAL:PATH"),
    ({"files": ["..:/"]}, "root directory"),
    ({"files": [{"local_path": "a", "path": "C:\\x"}]}, "Unix path"),
    ({"files": ["~/a"], "user": "1000"}, "absolute path"),
    ({"files": ["a:~bob/x"]}, "~username"),
    ({"working_dir": "~/w"}, "absolute path"),
])
def test_refused_forms(fields, needle):
    with pytest.raises(Exception, match=None) as e:
        cfg(**fields)
    assert needle in str(e.value)


def test_refusals_name_the_line_and_field(tmp_path):
    text = "type: task\nimage: busybox\ncommands: [true]\nrepos:\n  - https://u:s3cret@github.com/x/y\n"
    with pytest.raises(ConfigError) as e:
        parse_run(text, str(tmp_path / "t.yml"))
    p = e.value.problems[0]
    assert p.line == 5 and "repos[0]" in p.field and "password or token" in p.message
    assert "s3cret" not in str(e.value) and "s3cret" not in p.message


def test_repos_and_files_are_no_longer_listed_as_unsupported():
    for kind in UNSUPPORTED.values():
        assert "repos" not in kind and "files" not in kind and "single_branch" in kind


def test_every_corpus_file_with_repos_or_files_loads_or_is_refused_for_if_exists():
    manifest = CORPUS / "manifest.tsv"
    if not manifest.exists():
        pytest.skip("no dstack corpus next to the checkout")
    seen = loaded = 0
    for row in manifest.read_text().splitlines()[1:]:
        cols = row.split("\t")
        if cols[3] not in ("task", "dev-environment") or cols[5] != "-":
            continue
        path = CORPUS / cols[6]
        text = path.read_text()
        if "\nrepos:" not in text and "\nfiles:" not in text:
            continue
        seen += 1
        try:
            parse_run(text, str(path), values=False)
            loaded += 1
        except ConfigError as e:
            for p in e.problems:  # refused, if at all, for another field or for a remote repo only
                assert not p.field.startswith(("repos", "files", "working_dir")) or p.field.endswith("if_exists"), p
    assert seen >= 10 and loaded >= 1


# --------------------------------------------------------------------------- packing

def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=cwd, check=True,
                   capture_output=True)


@pytest.fixture
def repo(tmp_path) -> Path:
    r = tmp_path / "repo"
    (r / "sub").mkdir(parents=True)
    git(r, "init", "-q")
    (r / "committed.txt").write_text("committed\n")
    (r / "modified.txt").write_text("before\n")
    (r / ".gitignore").write_text("ignored.txt\nbig/\n")
    (r / ".dstackignore").write_text("secret*.txt\n")
    (r / "sub" / "secret-tracked.txt").write_text("s\n")
    (r / "deleted.txt").write_text("d\n")
    git(r, "add", "-A")
    git(r, "commit", "-qm", "init")
    (r / "modified.txt").write_text("after\n")  # an uncommitted change
    (r / "untracked.txt").write_text("untracked\n")
    (r / "ignored.txt").write_text("ignored\n")
    (r / "secret.txt").write_text("dstackignored\n")
    (r / "big").mkdir()
    (r / "big" / "blob").write_bytes(b"x" * 1000)
    (r / "deleted.txt").unlink()
    (r / "link").symlink_to("committed.txt")
    (r / "out-link").symlink_to("/etc/hostname")
    (r / "run.yml").write_text("type: task\n")
    return r


def unpack(data: bytes) -> dict[str, tarfile.TarInfo | bytes]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for m in tar:
            out[m.name] = tar.extractfile(m).read() if m.isfile() else m
    return out


def no_problem(loc, msg):
    return AssertionError(f"{loc}: {msg}")


def test_a_repo_is_its_working_tree_less_what_is_ignored(repo):
    packed = upload.pack(cfg(repos=["."]).uploads, repo, no_problem)
    tar = unpack(packed.data)
    assert json.loads(tar[upload.MANIFEST]) == {"items": ["0"]}
    assert tar["0/committed.txt"] == b"committed\n"
    assert tar["0/modified.txt"] == b"after\n"  # the uncommitted change
    assert tar["0/untracked.txt"] == b"untracked\n"
    assert tar["0/link"].issym() and tar["0/link"].linkname == "committed.txt"
    assert isinstance(tar.get("0/out-link"), bytes)  # a link out of the repo: the file it points to
    for gone in ("0/ignored.txt", "0/secret.txt", "0/sub/secret-tracked.txt", "0/big/blob", "0/deleted.txt"):
        assert gone not in tar, gone
    assert not any(n.startswith("0/.git/") for n in tar)
    assert all(m.uid == 0 and m.uname == "" for m in tarfile.open(fileobj=io.BytesIO(packed.data)).getmembers())
    assert packed.summary().startswith("uploading ") and f"repo {repo} to /workflow" in packed.summary()
    upload.check_archive(_write(repo.parent / "a.tar.gz", packed.data), 10**9)


def test_a_repo_from_a_subfolder_is_the_whole_repo(repo):
    packed = upload.pack(cfg(repos=[".."]).uploads, repo / "sub", no_problem)
    assert "0/committed.txt" in unpack(packed.data)


def test_files_folders_follow_gitignore_even_outside_git_and_single_files(tmp_path, repo):
    plain = tmp_path / "plain"
    (plain / "d").mkdir(parents=True)
    (plain / ".gitignore").write_text("*.log\n")
    (plain / "d" / ".dstackignore").write_text("private\n")
    (plain / "a.py").write_text("a\n")
    (plain / "x.log").write_text("log\n")
    (plain / "d" / "private").write_text("p\n")
    (plain / "d" / "kept").write_text("k\n")
    key = tmp_path / "id_rsa"
    key.write_text("key\n")
    key.chmod(0o600)
    packed = upload.pack(cfg(files=[f"{plain}:/data", f"{key}:~/.ssh/id_rsa", "committed.txt"]).uploads,
                         repo, no_problem)
    tar = unpack(packed.data)
    assert json.loads(tar[upload.MANIFEST])["items"] == ["0", "1/id_rsa", "2/committed.txt"]
    assert tar["0/a.py"] == b"a\n" and tar["0/d/kept"] == b"k\n" and "0/x.log" not in tar and "0/d/private" not in tar
    assert tar["1/id_rsa"] == b"key\n"
    with tarfile.open(fileobj=io.BytesIO(packed.data)) as t:
        assert t.getmember("1/id_rsa").mode == 0o600
    assert tar["2/committed.txt"] == b"committed\n"
    assert packed.files == 6  # with .gitignore and .dstackignore, as dstack


def test_a_missing_path_and_a_plain_folder_as_a_repo_are_errors_with_their_item(tmp_path, repo):
    seen = []

    def problem(loc, msg):
        seen.append((loc, msg))
        return ValueError(msg)

    with pytest.raises(ValueError):
        upload.pack(cfg(repos=["."], files=["a", "nope"]).uploads, repo, problem)
    assert seen[-1][0] == ("files", 0) and "no such file" in seen[-1][1]
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError):
        upload.pack(cfg(repos=["plain"]).uploads, tmp_path, problem)
    assert seen[-1][0] == ("repos", 0) and "not a git repository" in seen[-1][1]


def test_over_the_limit_nothing_is_packed_and_the_largest_are_named(repo):
    (repo / "weights.bin").write_bytes(b"w" * 50_000)
    with pytest.raises(upload.UploadError) as e:
        upload.pack(cfg(repos=["."]).uploads, repo, no_problem, limit=20_000)
    text = str(e.value)
    assert "over the upload limit of 19.5 KB" in text and "weights.bin (48.8 KB)" in text
    assert ".dstackignore" in text and upload.LIMIT_ENV in text


@pytest.mark.parametrize(("text", "size"), [("100MB", 100 * 2**20), ("2GiB", 2 * 2**30), ("500", 500),
                                            ("1.5K", 1536), (None, upload.DEFAULT_LIMIT)])
def test_limits(text, size):
    assert upload.parse_limit(text) == size


# --------------------------------------------------------------------------- the server's side

def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _archive(members: list[tuple[str, str, str]], items=("0",)) -> bytes:
    """(name, type: f/d/l, content or link target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = json.dumps({"items": list(items)}).encode()
        info = tarfile.TarInfo(upload.MANIFEST)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for name, kind, value in members:
            info = tarfile.TarInfo(name)
            if kind == "d":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "l":
                info.type, info.linkname = tarfile.SYMTYPE, value
                tar.addfile(info)
            elif kind == "h":
                info.type, info.linkname = tarfile.LNKTYPE, value
                tar.addfile(info)
            else:
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value.encode()))
    return buf.getvalue()


@pytest.mark.parametrize(("members", "needle"), [
    ([("0", "d", ""), ("0/../../etc/x", "f", "x")], "outside its items"),
    ([("0", "d", ""), ("/etc/x", "f", "x")], "outside its items"),
    ([("0", "d", ""), ("1/x", "f", "x")], "outside its items"),
    ([("0", "d", ""), ("0/l", "l", "/etc")], "points outside"),
    ([("0", "d", ""), ("0/l", "l", "../../etc")], "points outside"),
    ([("0", "d", ""), ("0/l", "l", "sub"), ("0/l/x", "f", "x")], "under a symlink"),
    ([("0", "d", ""), ("0/h", "h", "/etc/shadow")], "not a file, folder or symlink"),
    ([("0/x", "f", "x")], "missing or of the wrong kind"),
    ([("0", "d", ""), ("0/big", "f", "x" * 200)], "unpacks to more"),
])
def test_the_server_refuses_an_archive_that_would_write_outside_its_folder(tmp_path, members, needle):
    path = _write(tmp_path / "a.tar.gz", _archive(members))
    with pytest.raises(upload.UploadError) as e:
        upload.check_archive(path, 100)
    assert needle in str(e.value)


def test_a_file_item_must_be_a_file_not_a_symlink(tmp_path):
    path = _write(tmp_path / "a.tar.gz", _archive([("0", "d", ""), ("0/x", "l", "y"), ("0/y", "f", "y")],
                                                  items=("0/x",)))
    with pytest.raises(upload.UploadError, match="wrong kind"):
        upload.check_archive(path, 100)


def test_a_linked_file_is_sent_as_the_file(tmp_path):
    (tmp_path / "real.txt").write_text("real\n")
    (tmp_path / "link.txt").symlink_to("real.txt")
    tar = unpack(upload.pack(cfg(files=["link.txt:/x"]).uploads, tmp_path, no_problem).data)
    assert json.loads(tar[upload.MANIFEST])["items"] == ["0/link.txt"] and tar["0/link.txt"] == b"real\n"


def test_receive_place_binds_and_sweep(tmp_path, monkeypatch, repo):
    monkeypatch.setenv("GPUFLEET_HOME", str(tmp_path / "home"))
    c = cfg(repos=["."], files=["committed.txt:/etc/app.txt"])
    packed = upload.pack(c.uploads, repo, no_problem)
    upload_id, size = upload.receive([packed.data], 10**8)
    pending = upload.pending_path(upload_id)
    assert size == len(packed.data) and pending.stat().st_mode & 0o777 == 0o600
    with pytest.raises(upload.UploadError, match="2 items"):
        upload.place(upload_id, "r1", 1, 10**8)
    archive = upload.place(upload_id, "r1", 2, 10**8)
    assert archive == upload.run_archive("r1") and not pending.exists()
    assert upload.host_binds(c.uploads, "r1") == (str(archive), [{"src": "0", "dst": "/workflow"},
                                                                  {"src": "1/committed.txt", "dst": "/etc/app.txt"}])
    assert upload.host_binds([], "r1") == (None, [])
    with pytest.raises(upload.UploadError, match="not on this server"):
        upload.host_binds(c.uploads, "other")
    with pytest.raises(upload.UploadError, match="over this server's limit"):
        upload.receive([packed.data], 10)
    assert not any((tmp_path / "home" / "uploads" / "pending").iterdir())
    # the sweep keeps a live run's upload and a just placed one, removes an ended run's
    assert upload.sweep({"r1"}) == []
    assert upload.sweep(set()) == []  # placed a moment ago: its run may be being created
    old = archive.stat().st_mtime - 3600
    os.utime(archive, (old, old))
    assert upload.sweep(set()) == [archive] and not archive.exists()


# --------------------------------------------------------------------------- the role's and module's side

def test_container_vars_carry_the_archive_the_binds_and_the_workdir(tmp_path, monkeypatch, repo):
    from test_volopts import vars_of

    monkeypatch.setenv("GPUFLEET_HOME", str(tmp_path / "home"))
    c = cfg(repos=["."], files=["committed.txt:/etc/app.txt"])
    upload_id, _ = upload.receive([upload.pack(c.uploads, repo, no_problem).data], 10**8)
    upload.place(upload_id, "r", 2, 10**8)
    v = vars_of(c)
    assert v["workload_upload_archive"] == str(upload.run_archive("r")) and v["workload_workdir"] == "/workflow"
    assert v["workload_uploads"] == [{"src": "0", "dst": "/workflow"},
                                     {"src": "1/committed.txt", "dst": "/etc/app.txt"}]
    v = vars_of(cfg())
    assert (v["workload_upload_archive"], v["workload_uploads"], v["workload_workdir"]) == (None, [], None)


def test_module_binds_the_items_and_refuses_a_symlink_or_a_bad_path(monkeypatch, tmp_path):
    from conftest import container_module
    from test_hostpolicy import Failed, FakeModule

    mod = container_module(monkeypatch)
    base = tmp_path / "up"
    (base / "0").mkdir(parents=True)
    (base / "1").mkdir()
    (base / "1" / "id_rsa").write_text("k")
    (base / "2").mkdir()
    (base / "2" / "x").symlink_to("/etc/shadow")

    def mounts(uploads, **params):
        m = FakeModule(upload_dir=str(base), uploads=uploads, volume_roots=[], **params)
        spec = mod.validate(m)
        return [a for a in mod.run_argv("podman", m.params, spec, "r1") if a.startswith("--volume")]

    assert mounts([{"src": "0", "dst": "/workflow"}, {"src": "1/id_rsa", "dst": "/root/.ssh/id_rsa"}]) == [
        f"--volume={base}/0:/workflow", f"--volume={base}/1/id_rsa:/root/.ssh/id_rsa"]
    for bad, needle in (({"src": "2/x", "dst": "/x"}, "symlink"), ({"src": "3", "dst": "/x"}, "missing"),
                        ({"src": "../etc", "dst": "/x"}, "not an item"), ({"src": "0", "dst": "/"}, "absolute"),
                        ({"src": "0", "dst": "/a:/b"}, "absolute"), ({"src": "0", "dst": "rel"}, "absolute")):
        with pytest.raises(Failed, match=needle):
            mounts([bad])
    m = FakeModule(upload_dir=str(base), uploads=[{"src": "0", "dst": "/w"}])
    assert mod.config_run_id(m.params, mod.validate(m)) != mod.config_run_id(FakeModule().params,
                                                                             mod.validate(FakeModule()))


def test_the_api_takes_an_upload_and_a_run_that_names_it(tmp_path, monkeypatch, repo):
    from fastapi.testclient import TestClient
    from test_server_api import TOKEN

    from gpufleet.server.api import Context, create_app
    from gpufleet.server.auth import token_hash
    from gpufleet.server.vault import Vault
    from gpufleet.state import Store

    monkeypatch.setenv("GPUFLEET_HOME", str(tmp_path / "home"))
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    store.bootstrap("admin", token_hash(TOKEN))
    ctx = Context(store=store, seal=Vault(tmp_path / "secret.key").seal, kick=lambda: None,
                  launch=lambda run, placements: None, background=lambda work: work(), info=lambda: {},
                  shutdown=lambda: None, upload_limit=10_000)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    text = "type: task\nname: up\nimage: busybox\nrepos: [.]\ncommands: [ls]\n"
    with TestClient(create_app(ctx)) as http:
        r = http.post("/api/uploads", content=upload.pack(cfg(repos=["."]).uploads, repo, no_problem).data,
                      headers=auth)
        assert r.status_code == 201, r.text
        upload_id = r.json()["id"]
        assert upload.pending_path(upload_id).exists()
        r = http.post("/api/runs", json={"source": "r.yml", "text": text}, headers=auth)
        assert r.status_code >= 400 and "submit it with gpufleet apply" in r.json()["detail"]
        r = http.post("/api/runs", json={"source": "r.yml", "text": text, "upload": "../../x"}, headers=auth)
        assert r.status_code >= 400 and "not an upload id" in r.json()["detail"]
        r = http.post("/api/runs", json={"source": "r.yml", "text": text.replace("repos: [.]", "repos: [.]\n"
                                         "files: [a]"), "upload": upload_id}, headers=auth)
        assert r.status_code >= 400 and "holds 1 items" in r.json()["detail"]
        r = http.post("/api/uploads", content=b"x" * 20_000, headers=auth)
        assert r.status_code >= 400 and "over this server's limit" in r.json()["detail"]
        r = http.post("/api/uploads", content=b"not a tar", headers=auth)
        assert r.status_code >= 400 and "not a readable tar.gz" in r.json()["detail"]
        assert [p.name for p in (tmp_path / "home" / "uploads" / "pending").iterdir()] == [f"{upload_id}.tar.gz"]


@pytest.mark.parametrize(("user", "owner"), [(None, (None, None)), ("1000", (1000, None)),
                                             ("1000:2000", (1000, 2000)), ("ubuntu", (None, None)),
                                             ("ubuntu:100", (None, 100))])
def test_the_upload_belongs_to_a_numeric_user(user, owner):
    assert upload.upload_owner(user) == owner
