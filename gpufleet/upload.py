"""Code upload: dstack's `repos` and `files`, from the machine of `gpufleet apply` into the run's containers.

The CLI packs (``pack``) what the run's `repos` and `files` name into one tar.gz: item N of
``RunConfig.uploads`` (the repo first) under the folder ``N/`` (a file as ``N/NAME``), with a manifest
first (``MANIFEST``: which path of the archive each item is). A repo is its working tree as git sees
it: tracked files (with their uncommitted changes), untracked files that .gitignore does not exclude,
less what `.dstackignore` files exclude; a directory of `files` the same way, git's ignore rules read
even where it is no git repo (as dstack does); never a `.git` folder. Over the limit
(``GPUFLEET_UPLOAD_LIMIT``, default 100 MiB of files), nothing is sent and the error names the largest.

The server keeps the archive (``receive``, then ``place``) in its state directory, 0600, under the
run's name, until the run has ended (``sweep``); it checks every member first (``check_archive``) since
the hosts unpack it as root. At each start the workload role copies it through the fleet's jump chain
to a per-run folder on the host, unpacks it and binds each item at its container path
(``host_binds``, the module's `uploads`); the folder goes with the container.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import re
import secrets
import shlex
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from gpufleet import paths
from gpufleet.errors import GpufleetError

LIMIT_ENV = "GPUFLEET_UPLOAD_LIMIT"
# bytes of files, before compression (server.settings.DEFAULT_UPLOAD_LIMIT); dstack takes 2 MiB of code
DEFAULT_LIMIT = 100 * 2**20
MANIFEST = "gpufleet-upload.json"
PENDING_TTL = 3600.0  # seconds an upload waits for its run's submission
PLACED_GRACE = 120.0  # seconds a placed upload is kept before its run shows (it is being submitted)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.I)
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_ID = re.compile(r"^[0-9a-f]{32}$")


class UploadError(GpufleetError):
    """What the run uploads cannot be packed or taken (a missing path, over the limit, a bad archive)."""


def human(n: float) -> str:
    """1.2 MB, 340 B (powers of 1024, as dstack's sizeof_fmt)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def parse_limit(text: str | int | None, what: str = LIMIT_ENV) -> int:
    """A size in bytes: a number, or with a unit (500KB, 100MB, 2GiB; powers of 1024)."""
    if text is None or text == "":
        return DEFAULT_LIMIT
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise UploadError(f"{what}: {text!r} is not a size like 100MB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()[:1]])


# --------------------------------------------------------------------------- packing (the CLI)

@dataclass
class Packed:
    """The archive to send, and what it holds: ``lines`` says what goes where."""

    data: bytes
    files: int
    size: int
    lines: list[str]

    def summary(self) -> str:
        return (f"uploading {human(len(self.data))} ({self.files} file{'s' * (self.files != 1)}, "
                f"{human(self.size)} unpacked): " + "; ".join(self.lines))


def _git(args: list[str], cwd: Path, git_dir: str | None = None) -> list[str]:
    argv = ["git", *([f"--git-dir={git_dir}", f"--work-tree={cwd}"] if git_dir else []), *args]
    try:
        p = subprocess.run(argv, cwd=cwd, capture_output=True, timeout=300, check=False)
    except FileNotFoundError:
        raise UploadError("git is not installed here: gpufleet reads .gitignore with it") from None
    if p.returncode != 0:
        raise UploadError(f"git {' '.join(args[:2])} in {cwd}: {p.stderr.decode(errors='replace').strip()}")
    return [x for x in p.stdout.decode(errors="surrogateescape").split("\0") if x]


def _toplevel(path: Path) -> Path | None:
    p = subprocess.run(["git", "-C", str(path), "rev-parse", "--show-toplevel"], capture_output=True, check=False)
    return Path(p.stdout.decode().strip()) if p.returncode == 0 else None


def listing(root: Path, git_dir: str | None = None) -> list[str]:
    """The files under ``root`` (paths relative to it) as git sees them: tracked and untracked ones that
    the ignore rules (.gitignore, .git/info/exclude) leave, less those `.dstackignore` files exclude.
    ``git_dir``: an empty repository, for a folder that is in none (git's rules read all the same)."""
    want = _git(["ls-files", "-z", "-c", "-o", "--exclude-standard"], root, git_dir)
    dropped = set(_git(["ls-files", "-z", "-c", "-i", "--exclude-per-directory=.dstackignore"], root, git_dir))
    dropped |= set(_git(["ls-files", "-z", "-o", "-i", "--exclude-per-directory=.dstackignore"], root, git_dir))
    return sorted({p for p in want if p not in dropped})


def _folder_listing(root: Path) -> list[str]:
    if _toplevel(root) is not None:
        return listing(root)
    with tempfile.TemporaryDirectory(prefix="gpufleet-git-") as tmp:
        subprocess.run(["git", "init", "-q", "--bare", tmp], capture_output=True, check=True)
        return listing(root, git_dir=tmp)


def _entries(root: Path, rels: Iterable[str]) -> list[tuple[str, Path]]:
    """(path in the item, local path) of what is there and is a file or a symlink (a submodule's
    folder, a deleted tracked file: left out)."""
    out = []
    for rel in rels:
        p = root / rel
        try:
            st = p.lstat()
        except FileNotFoundError:
            continue  # deleted in the working tree: not there, as in the container of dstack's diff
        if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
            out.append((rel, p))
    return out


# --------------------------------------------------------------------------- remote repos (the CLI)

CLONE_TIMEOUT_ENV = "GPUFLEET_CLONE_TIMEOUT"
CLONE_TIMEOUT = 600.0  # seconds for each git command of a clone


def mask_url(text: str) -> str:
    """``text`` with the credentials of any URL in it masked (`https://user:***@host`, a lone user of
    https as `***`: a token)."""
    def one(m: re.Match) -> str:
        scheme, user, password = m.group(1), m.group(2), m.group(3)
        if password is not None:
            return f"{scheme}{user}:***@"
        return f"{scheme}***@" if scheme.lower().startswith("http") else m.group(0)
    return re.sub(r"([A-Za-z][A-Za-z0-9+.-]*://)([^/@\s:]*)(?::([^/@\s]*))?@", one, text)


def _clone_env() -> dict[str, str]:
    """git's environment for a clone: no prompt (a terminal or a GUI askpass), only the transports
    a repo URL may use (also for what git follows from there)."""
    from gpufleet.models.run import GIT_PROTOCOLS

    env = dict(os.environ, GIT_TERMINAL_PROMPT="0", GIT_ALLOW_PROTOCOL=":".join(GIT_PROTOCOLS), LC_ALL="C")
    env.pop("GIT_ASKPASS", None)
    env.pop("SSH_ASKPASS", None)
    return env


def _clone_git(args: list[str], url: str, timeout: float) -> subprocess.CompletedProcess:
    try:
        # a session of its own: no terminal for ssh to ask a password on; stdin closed
        return subprocess.run(["git", *args], capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout,
                              env=_clone_env(), start_new_session=True, check=False)
    except FileNotFoundError:
        raise UploadError(f"cannot clone {mask_url(url)}: git is not installed here") from None
    except subprocess.TimeoutExpired:
        raise UploadError(f"cannot clone {mask_url(url)}: git took more than {timeout:.0f} s "
                          f"({CLONE_TIMEOUT_ENV} sets the limit)") from None


def _clone_error(url: str, what: str, p: subprocess.CompletedProcess) -> UploadError:
    err = mask_url(p.stderr.decode(errors="replace").strip()) or f"git exited with {p.returncode}"
    return UploadError(f"cannot clone {mask_url(url)}{what}: {err}")


def clone(url: str, dest: Path, branch: str | None = None, commit: str | None = None,
          timeout: float | None = None) -> str:
    """Clone ``url`` into the new folder ``dest`` as dstack's runner checks a remote repo out: ``branch``
    (else the remote's default branch), at ``commit`` when given (else the branch's head); only the
    working tree matters (gpufleet uploads no .git), so it fetches as little as it can: the branch's head
    (`--depth 1`), or the commit alone, else (a short hash, a server that will not give a commit by
    hash) the history to find it in. The commit checked out (its full hash); an UploadError with git's
    message, the URL's credentials masked."""
    if timeout is None:
        timeout = float(os.environ.get(CLONE_TIMEOUT_ENV) or CLONE_TIMEOUT)
    what = "".join([f" (branch {branch})" if branch else "", f" (commit {commit})" if commit else ""])
    at = ["--branch", branch] if branch else []
    if commit is None:
        p = _clone_git(["clone", "--quiet", "--depth", "1", *at, "--", url, str(dest)], url, timeout)
        if p.returncode != 0:
            raise _clone_error(url, what, p)
    else:
        p = _clone_git(["init", "--quiet", str(dest)], url, timeout)
        refs = [commit, f"refs/heads/{branch}"] if branch else [commit]  # the branch must exist, as in dstack
        if p.returncode == 0 and re.fullmatch(r"[0-9a-fA-F]{40}|[0-9a-fA-F]{64}", commit):
            p = _clone_git(["-C", str(dest), "fetch", "--quiet", "--depth", "1", "--", url, *refs], url, timeout)
        else:
            p = subprocess.CompletedProcess([], 1)
        if p.returncode == 0:
            p = _clone_git(["-C", str(dest), "checkout", "--quiet", "--detach", commit], url, timeout)
        if p.returncode != 0:  # a short hash, or a server that does not give a commit by its hash
            shutil.rmtree(dest, ignore_errors=True)
            p = _clone_git(["clone", "--quiet", "--no-checkout", *at, "--", url, str(dest)], url, timeout)
            if p.returncode != 0:
                raise _clone_error(url, what, p)
            p = _clone_git(["-C", str(dest), "checkout", "--quiet", "--detach", commit], url, timeout)
            if p.returncode != 0:
                raise _clone_error(url, what, p)
    p = _clone_git(["-C", str(dest), "rev-parse", "HEAD"], url, timeout)
    if p.returncode != 0:
        raise _clone_error(url, what, p)
    return p.stdout.decode().strip()


def pack(uploads: list, config_dir: Path, problem: Callable[[tuple, str], Exception],
         limit: int | None = None, clone_repos: bool = True) -> Packed | None:
    """The archive of a run's ``uploads`` (RunConfig.uploads), local paths read from ``config_dir``
    (the configuration file's folder); None when there are none. ``problem(loc, message)``: the error
    for an item (a config error with its line). Over ``limit`` bytes of files, an UploadError naming
    the largest. A remote repo (``url``) is cloned into a temporary folder and packed as a local
    one; ``clone_repos=False`` (a dry run): not cloned, an empty item in its place."""
    if not uploads:
        return None
    with contextlib.ExitStack() as stack:
        return _pack(uploads, config_dir, problem, limit, clone_repos, stack)


def _pack(uploads: list, config_dir: Path, problem: Callable[[tuple, str], Exception],
          limit: int | None, clone_repos: bool, stack: contextlib.ExitStack) -> Packed:
    limit = parse_limit(os.environ.get(LIMIT_ENV)) if limit is None else limit
    n_repos = sum(1 for u in uploads if u.kind == "repo")
    items: list[tuple[str, list[tuple[str, Path]]]] = []  # (its path in the archive, [(name, local)])
    lines = []
    for u in uploads:
        loc = ("repos", u.index) if u.kind == "repo" else ("files", u.index - n_repos)
        if getattr(u, "url", None):
            at = "".join([f", branch {u.branch}" if u.branch else "", f", commit {u.hash}" if u.hash else ""])
            if not clone_repos:
                items.append((str(u.index), []))
                lines.append(f"repo {mask_url(u.url)}{at} to {u.path} (cloned here first; not in a dry run)")
                continue
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpufleet-clone-")))
            try:
                commit = clone(u.url, tmp / "repo", u.branch, u.hash)
            except UploadError as e:
                raise problem(loc, str(e)) from None
            items.append((str(u.index), _entries(tmp / "repo", listing(tmp / "repo"))))
            lines.append(f"repo {mask_url(u.url)}{f', branch {u.branch}' if u.branch else ''} at commit "
                         f"{commit[:12]} (cloned here) to {u.path}")
            continue
        local = (config_dir / Path(u.local_path).expanduser()).absolute()
        if u.kind == "repo":
            if not local.is_dir():
                raise problem(loc, f"{u.local_path}: no such directory ({local})")
            top = _toplevel(local)
            if top is None:
                raise problem(loc, f"{u.local_path}: not a git repository ({local}); upload a plain folder with "
                                   "`files` instead")
            items.append((str(u.index), _entries(top, listing(top))))
            lines.append(f"repo {top} to {u.path}")
        elif local.is_dir():
            items.append((str(u.index), _entries(local, _folder_listing(local))))
            lines.append(f"{u.local_path} to {u.path}")
        elif local.is_file():
            items.append((f"{u.index}/{local.name}", [("", local.resolve())]))  # a link: the file it points to
            lines.append(f"{u.local_path} to {u.path}")
        else:
            raise problem(loc, f"{u.local_path}: no such file or directory ({local})")
    sizes = [(f"{src}/{name}" if name else src, p, p.lstat().st_size) for src, entries in items for name, p in entries]
    total = sum(s for _, _, s in sizes)
    if total > limit:
        biggest = sorted(sizes, key=lambda x: -x[2])[:5]
        raise UploadError(
            f"the run's repos and files are {human(total)} ({len(sizes)} files), over the upload limit of "
            f"{human(limit)}; the largest: " + ", ".join(f"{p} ({human(s)})" for _, p, s in biggest) +
            f". Exclude what the run does not need with .gitignore or .dstackignore, or raise the limit with "
            f"{LIMIT_ENV}=200MB (the server has its own, upload_limit in server.yml)")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tar:
        _add_bytes(tar, MANIFEST, json.dumps({"items": [src for src, _ in items]}).encode())
        dirs: set[str] = set()
        for src, entries in items:
            top = src.split("/")[0]
            _add_dir(tar, top, dirs)
            for name, p in entries:
                arc = f"{src}/{name}" if name else src
                parts = arc.split("/")
                for i in range(2, len(parts)):
                    _add_dir(tar, "/".join(parts[:i]), dirs)
                _add_path(tar, arc, p, top)
    return Packed(buf.getvalue(), len(sizes), total, lines)


def _clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""  # no local user names in the archive
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = _clean(tarfile.TarInfo(name))
    info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str, dirs: set[str]) -> None:
    if name in dirs:
        return
    dirs.add(name)
    info = _clean(tarfile.TarInfo(name))
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
    tar.addfile(info)


def _add_path(tar: tarfile.TarFile, arc: str, p: Path, top: str) -> None:
    """A file, or a symlink: kept when it stays inside its item (written relative), else the file it
    points to (as dstack does), else left out."""
    if p.is_symlink():
        target = os.readlink(p)
        inside = posixpath.normpath(posixpath.join(posixpath.dirname(arc), target))
        if not target.startswith("/") and (inside == top or inside.startswith(top + "/")):
            info = _clean(tarfile.TarInfo(arc))
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
            tar.addfile(info)
            return
        if not p.is_file():
            return  # a link to a folder or to nothing, outside the item
        p = p.resolve()
    info = _clean(tar.gettarinfo(str(p), arc))
    info.mode &= 0o777
    with open(p, "rb") as f:
        tar.addfile(info, f)


# --------------------------------------------------------------------------- the server

def root() -> Path:
    return paths.ensure_private_dir(paths.home() / "uploads")


def pending_path(upload_id: str) -> Path:
    if not _ID.match(upload_id or ""):
        raise UploadError(f"{upload_id!r} is not an upload id")
    return paths.ensure_private_dir(root() / "pending") / f"{upload_id}.tar.gz"


def run_archive(name: str) -> Path:
    """Where a run's upload is kept (under its name, as its secrets are: it outlives a requeue)."""
    return root() / f"run-{name}.tar.gz"


def receive(chunks: Iterable[bytes], limit: int) -> tuple[str, int]:
    """Store an upload's bytes (at most ``limit``) as a pending upload, 0600: (its id, its size)."""
    upload_id = secrets.token_hex(16)
    path = pending_path(upload_id)
    size = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise UploadError(f"the upload is over this server's limit of {human(limit)} (upload_limit in "
                                      "its server.yml): exclude files with .gitignore or .dstackignore")
                f.write(chunk)
        check_archive(path, limit)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return upload_id, size


def check_archive(path: Path, limit: int) -> list[str]:
    """The items of an upload (each a path in the archive: ``N`` or ``N/NAME``) after checking every
    member, since the hosts unpack it as root: relative names below an item, no '..', only files,
    folders and symlinks that stay inside their item, no member under a symlink, at most ``limit``
    bytes unpacked."""
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            first = tar.next()
            if first is None or first.name != MANIFEST or not first.isfile() or first.size > 65536:
                raise UploadError(f"not a gpufleet upload (no {MANIFEST} first)")
            items = json.loads(tar.extractfile(first).read()).get("items")
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise UploadError(f"not a gpufleet upload (bad {MANIFEST})")
            for n, item in enumerate(items):
                if not re.fullmatch(rf"{n}(/[^/\0]+)?", item) or item.endswith(("/.", "/..")):
                    raise UploadError(f"not a gpufleet upload (item {item!r})")
            links: set[str] = set()
            seen: dict[str, tarfile.TarInfo] = {}
            total = 0
            for m in tar:
                if m.offset == first.offset:
                    continue  # the manifest
                name = m.name
                parts = name.split("/")
                if name.startswith("/") or ".." in parts or "." in parts or "" in parts or "\0" in name or \
                        not parts[0].isdigit() or int(parts[0]) >= len(items):
                    raise UploadError(f"the upload holds {name!r}, outside its items")
                if not (m.isfile() or m.isdir() or m.issym()):
                    raise UploadError(f"the upload holds {name!r}, which is not a file, folder or symlink")
                if any("/".join(parts[:i]) in links for i in range(1, len(parts))):
                    raise UploadError(f"the upload holds {name!r} under a symlink")
                if m.issym():
                    target = posixpath.normpath(posixpath.join(posixpath.dirname(name), m.linkname))
                    if m.linkname.startswith("/") or not target.startswith(parts[0] + "/"):
                        raise UploadError(f"the upload's symlink {name!r} points outside its item")
                    links.add(name)
                total += m.size
                if total > limit:
                    raise UploadError(f"the upload unpacks to more than this server's limit of {human(limit)}")
                seen[name] = m
            for item in items:
                m = seen.get(item)
                if m is None or (not m.isfile() if "/" in item else not m.isdir()):
                    raise UploadError(f"the upload's item {item!r} is missing or of the wrong kind")
            return items
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise UploadError(f"the upload is not a readable tar.gz: {e}") from None


def place(upload_id: str, name: str, count: int, limit: int) -> Path:
    """Make pending upload ``upload_id`` run ``name``'s (replacing an ended run's), checking that it
    holds ``count`` items (the run's `repos` and `files`)."""
    src = pending_path(upload_id)
    if not src.exists():
        raise UploadError("the run's upload is not on the server (it waits an hour for its run): apply it again")
    items = check_archive(src, limit)
    if len(items) != count:
        raise UploadError(f"the upload holds {len(items)} items, the run's repos and files are {count}")
    dst = run_archive(name)
    os.utime(src)  # placed now: the sweep leaves it alone while its run is being created
    os.replace(src, dst)
    return dst


def sweep(live_names: set[str], now: float | None = None) -> list[Path]:
    """Remove the uploads of runs that are no longer live, and pending ones older than PENDING_TTL."""
    now = time.time() if now is None else now
    gone = []
    base = paths.home() / "uploads"
    if not base.is_dir():
        return gone
    for p in base.glob("run-*.tar.gz"):
        try:
            young = now - p.stat().st_mtime < PLACED_GRACE
        except FileNotFoundError:
            continue
        if p.name[4:-7] not in live_names and not young:
            p.unlink(missing_ok=True)
            gone.append(p)
    for p in (base / "pending").glob("*.tar.gz") if (base / "pending").is_dir() else []:
        try:
            if now - p.stat().st_mtime > PENDING_TTL:
                p.unlink(missing_ok=True)
                gone.append(p)
        except FileNotFoundError:
            pass
    return gone


# where a repo with `if_exists: skip` is bound; place_repo's lines copy it to its path at start
REPO_STAGING = "/.gpufleet-repo"


def place_repo(uploads: list, workdir: str | None = None) -> str:
    """The start script's lines (sh) that put a repo with `if_exists: skip` in place, as dstack's runner
    does: its path a file: the run fails; not empty (a `lost+found` alone is empty): left as it is,
    with a message; else (missing or empty) the repo is copied there from REPO_STAGING. Then into
    ``workdir`` (made if missing: the container starts in /, as podman makes no missing working
    directory and nothing is bound there now). "" for none."""
    for u in uploads:
        if u.kind == "repo" and getattr(u, "if_exists", "error") == "skip":
            t, q = shlex.quote(u.path), lambda text: shlex.quote(f"gpufleet: {text}")
            return "\n".join([
                f"if [ -e {t} ] && [ ! -d {t} ]; then echo {q(f'the repo path {u.path} is not a directory')} >&2; "
                "exit 1; fi",
                f'if [ -n "$(ls -A {t} 2>/dev/null | grep -vx lost+found)" ]; then '
                f"echo {q(f'{u.path} is not empty: the repo is not put there (if_exists: skip)')}",
                f"else mkdir -p {t} || {{ echo {q(f'cannot make the repo path {u.path}')} >&2; exit 1; }}; "
                f"cp -a {REPO_STAGING}/. {t}/; fi",
                *([f"mkdir -p {shlex.quote(workdir)} && cd {shlex.quote(workdir)}"] if workdir else [])])
    return ""


def host_binds(uploads: list, name: str) -> tuple[str | None, list[dict[str, str]]]:
    """For the workload role: the run's archive on this server (None: nothing to upload) and each item's
    bind: its path in the unpacked folder and its container path (REPO_STAGING for a repo with
    `if_exists: skip`: place_repo puts it in place)."""
    if not uploads:
        return None, []
    archive = run_archive(name)
    if not archive.exists():
        raise UploadError(f"run {name}: its upload (repos, files) is not on this server any more: apply it again")
    items = manifest_items(archive)
    if len(items) != len(uploads):
        raise UploadError(f"run {name}: its upload holds {len(items)} items, its repos and files are {len(uploads)}")
    return str(archive), [{"src": src, "dst": REPO_STAGING if place_repo([u]) else u.path}
                          for src, u in zip(items, uploads, strict=True)]


def manifest_items(path: Path) -> list[str]:
    """The items of an upload checked when it was placed (its manifest, the archive's first member)."""
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            first = tar.next()
            return json.loads(tar.extractfile(first).read())["items"]
    except (tarfile.TarError, OSError, EOFError, ValueError, KeyError, AttributeError) as e:
        raise UploadError(f"cannot read the upload {path}: {e}") from None


def upload_owner(user: str | None) -> tuple[int | None, int | None]:
    """Who should own the unpacked upload on the host, so that the container's `user` may write to it,
    as dstack gives the code to the run's user: its numeric uid and gid (a name cannot be looked up
    in the image from here: the files stay root's)."""
    if not user:
        return None, None
    name, _, group = user.partition(":")
    return (int(name) if name.isdigit() else None), (int(group) if group.isdigit() else None)
