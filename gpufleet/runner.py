"""A thin, isolated wrapper around ansible-runner (as ansible-navigator does it).

- one private data dir under the state directory, a unique ident per run, artifacts rotated;
- host-key checking forced on (ansible-runner would silently turn it off);
- our own cancel callback, so Ctrl-C stops the run cleanly and our signal handling is restored;
- an event handler that only records per-host outcomes, and tells the caller (for progress).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import ansible_runner
import yaml

from gpufleet import paths
from gpufleet.models import HostStatus

ROTATE_ARTIFACTS = 20  # the newest plays' artifacts kept (gpufleet's own rotation: see _rotate)
_plays_lock = threading.Lock()
_plays_running: set[str] = set()  # idents of this process's plays in progress: their artifacts are never pruned
RUN_IDENT = "GPUFLEET_PLAY"  # in each ansible-playbook's environment: which play it is, to cancel only that one
# Forks beyond what the controller's CPUs can drive buy no speed, only memory (an ansible-playbook
# worker is ~15 MiB): on 2 CPUs, 64 nodes took 23.6 s with 64 forks (1.17 GB) and 24.1 s with 16 (377 MiB).
MAX_FORKS = min(64, max(16, 8 * (os.cpu_count() or 1)))
STALE_VARS_S = 3600  # a vars file is read when its playbook starts; one this old was left behind


@dataclass
class HostOutcome:
    host: str
    status: HostStatus = HostStatus.PENDING
    message: str = ""
    results: dict[str, dict] = field(default_factory=dict)  # task action -> module result

    def __post_init__(self) -> None:
        self.status = HostStatus(self.status)


@dataclass
class PlaybookResult:
    status: str  # successful | failed | canceled | timeout
    rc: int
    hosts: dict[str, HostOutcome]
    artifact_dir: str
    canceled: bool = False


def ansible_env(forks: int | None = None) -> dict[str, str]:
    """Environment for ansible-playbook runs: the settings gpufleet relies on."""
    root = paths.content_root()
    env = {
        "ANSIBLE_HOST_KEY_CHECKING": "True",  # never off: ssh_config does accept-new, known_hosts per fleet
        "ANSIBLE_ROLES_PATH": str(root / "roles"),
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_DEPRECATION_WARNINGS": "False",
        "ANSIBLE_SYSTEM_WARNINGS": "False",
        "ANSIBLE_TIMEOUT": "15",
        "ANSIBLE_SSH_RETRIES": "2",
        "ANSIBLE_PIPELINING": "True",
        "ANSIBLE_GATHERING": "explicit",
        # task arguments (secret env values among them) never go into the event stream or artifacts
        "ANSIBLE_DISPLAY_ARGS_TO_STDOUT": "False",
        "ANSIBLE_LOCAL_TEMP": str(paths.ensure_private_dir(paths.home() / "tmp")),
        # ansible-playbook from the same environment as this Python (a venv need not be activated)
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    if forks:
        env["ANSIBLE_FORKS"] = str(forks)
    return env


def run_playbook(name: str, inventory: Path, *, limit: list[str] | None = None,
                 extravars: dict | None = None, unsafe_vars: dict | None = None, forks: int | None = None,
                 on_update: Callable[[HostOutcome], None] | None = None,
                 cancel: threading.Event | None = None, skip_tags: list[str] | None = None) -> PlaybookResult:
    """Run ``playbooks/<name>.yml`` against ``inventory``; return each host's outcome.

    ``unsafe_vars`` reach the play as extra vars through a private file, every string in them
    tagged !unsafe (see write_unsafe_vars); the file is removed when the play is over. Setting
    ``cancel`` (or Ctrl-C, in the main thread) stops this play and its workers, no other. Tasks tagged
    with one of ``skip_tags`` are left out when the play is read (no worker is started for them)."""
    hosts: dict[str, HostOutcome] = {h: HostOutcome(h) for h in (limit or [])}
    cancel = cancel or threading.Event()
    ident = f"{time.strftime('%Y%m%dT%H%M%S')}-{name}-{uuid.uuid4().hex[:8]}"

    def handle(event: dict) -> bool:
        data = event.get("event_data") or {}
        host = data.get("host")
        kind = event.get("event", "")
        if not host:
            return True
        outcome = hosts.setdefault(host, HostOutcome(host))
        res = data.get("res") or {}
        if kind == "runner_on_start" and outcome.status == HostStatus.PENDING:
            outcome.status = HostStatus.RUNNING
        elif kind == "runner_on_ok":
            outcome.results[data.get("task_action", "")] = res
            if outcome.status in (HostStatus.PENDING, HostStatus.RUNNING):
                outcome.status = HostStatus.RUNNING
        elif kind == "runner_on_unreachable":
            outcome.status, outcome.message = HostStatus.UNREACHABLE, str(res.get("msg", "")).strip()
        elif kind == "runner_on_failed" and not data.get("ignore_errors"):
            outcome.status, outcome.message = HostStatus.FAILED, _failure_message(res)
        elif kind == "runner_on_skipped":
            pass
        else:
            return True
        if on_update:
            on_update(outcome)
        return True

    def on_sigint(signum, frame):  # first Ctrl-C: stop the run cleanly; runner kills its process group
        cancel.set()

    def canceled() -> bool:
        if cancel.is_set():
            _kill_playbook_workers(ident)
        return cancel.is_set()

    if forks is None and limit:  # one fork per host (Ansible's default is 5): the hosts are asked at once
        forks = min(max(len(limit), 5), MAX_FORKS)
    previous = signal.signal(signal.SIGINT, on_sigint) if threading.current_thread() is threading.main_thread() \
        else None
    private = paths.ensure_private_dir(paths.home() / "runner")
    vars_file = write_unsafe_vars(unsafe_vars) if unsafe_vars is not None else None
    _rotate(private / "artifacts", ident)
    try:
        r = ansible_runner.run(
            private_data_dir=str(private), ident=ident, rotate_artifacts=0,
            playbook=str(paths.playbook(name)), inventory=str(inventory),
            limit=",".join(limit) if limit else None, extravars=extravars or {},
            envvars={**ansible_env(forks), RUN_IDENT: ident}, quiet=True, event_handler=handle,
            cmdline=f"-e @{shlex.quote(str(vars_file))}" if vars_file else None,
            cancel_callback=canceled, suppress_env_files=True, skip_tags=",".join(skip_tags) if skip_tags else None,
            fact_cache_type="memory",  # facts are read from the event stream; none are written to disk
            settings={"suppress_ansible_output": True})
    finally:
        if vars_file is not None:
            vars_file.unlink(missing_ok=True)
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        with _plays_lock:
            _plays_running.discard(ident)
    _scrub_command_artifact(Path(r.config.artifact_dir), {**ansible_env(forks), RUN_IDENT: ident})
    for outcome in hosts.values():
        if outcome.status == HostStatus.RUNNING:
            outcome.status = HostStatus.OK
            if on_update:
                on_update(outcome)
    return PlaybookResult(r.status, r.rc or 0, hosts, r.config.artifact_dir, canceled=cancel.is_set())


def _rotate(artifacts: Path, ident: str) -> None:
    """Keep the newest ROTATE_ARTIFACTS plays' artifacts, never one still running. ansible-runner's
    own rotation counts every folder, so with more plays at once than it keeps (the server starts
    runs in parallel) it removed the folder of a play still running, which then failed."""
    with _plays_lock:
        _plays_running.add(ident)
        try:
            done = [d for d in artifacts.iterdir() if d.is_dir() and d.name not in _plays_running]
        except FileNotFoundError:
            return
        done.sort(key=lambda d: d.stat().st_mtime if d.exists() else 0.0)
        for d in done[:max(0, len(done) - ROTATE_ARTIFACTS)]:
            shutil.rmtree(d, ignore_errors=True)


def _kill_playbook_workers(ident: str) -> None:
    """Kill every process below this process's ansible-playbook of run ``ident`` (the server runs
    several at once). Its workers run in sessions of their own (ansible calls os.setsid in each),
    out of reach of ansible-runner's kill of the playbook's process group: left alone, they and
    their ssh go on until their task ends."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    todo = [pid for pid in children.get(os.getpid(), []) if _is_playbook(pid, ident)]
    below: list[int] = []
    while todo:
        pid = todo.pop()
        kids = children.get(pid, [])
        below += kids
        todo += kids
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _is_playbook(pid: int, ident: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"ansible-playbook" not in f.read():
                return False
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"{RUN_IDENT}={ident}".encode() in f.read().split(b"\0")
    except OSError:
        return False


def _scrub_command_artifact(artifact_dir: Path, ours: dict[str, str]) -> None:
    """ansible-runner records the whole environment of ansible-playbook in artifacts/<ident>/command:
    whatever the user had exported (cloud keys, tokens) would sit there. Keep the command, the
    folder and the variables gpufleet set; drop the rest."""
    path = artifact_dir / "command"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    env = data.get("env") or {}
    data["env"] = {k: v for k, v in env.items() if k in ours}
    data["env_note"] = "gpufleet keeps only the variables it sets; the rest of the environment is not recorded"
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


class _UnsafeStr(str):
    pass


class _UnsafeList(list):
    pass


class _UnsafeDict(dict):
    pass


class _UnsafeDumper(yaml.SafeDumper):
    pass


# ansible-core 2.19 reads `!unsafe "true"` as a boolean, so a lone string is tagged only when YAML
# reads it as a string anyway; lists and mappings are tagged whole, which keeps their strings strings.
_UnsafeDumper.add_representer(_UnsafeStr, lambda d, v: d.represent_scalar("!unsafe", str(v), style="'"))
_UnsafeDumper.add_representer(_UnsafeList, lambda d, v: d.represent_sequence("!unsafe", list(v)))
_UnsafeDumper.add_representer(_UnsafeDict, lambda d, v: d.represent_mapping("!unsafe", dict(v)))


def _mark(value):
    if isinstance(value, str):
        return _UnsafeStr(value) if isinstance(_plain(value), str) else value
    if isinstance(value, dict):
        return _UnsafeDict(value)
    if isinstance(value, (list, tuple)):
        return _UnsafeList(value)
    return value


def _plain(value: str):
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def write_unsafe_vars(data: dict) -> Path:
    """A vars file for `-e @file` in which every string is tagged !unsafe: values from configs
    (commands, env values, names) reach the hosts literally and are never templated here.
    Created 0600, since env values may be secrets; the caller removes it."""
    folder = paths.ensure_private_dir(paths.home() / "runner" / "vars")
    for old in folder.glob("vars-*.yml"):  # left by a gpufleet that was killed: read long ago
        try:
            if time.time() - old.stat().st_mtime > STALE_VARS_S:
                old.unlink()
        except OSError:
            pass
    fd, name = tempfile.mkstemp(prefix="vars-", suffix=".yml", dir=folder)
    with os.fdopen(fd, "w") as f:
        yaml.dump({k: _mark(v) for k, v in data.items()}, f, Dumper=_UnsafeDumper, sort_keys=False)
    return Path(name)


def _failure_message(res: dict) -> str:
    msg = str(res.get("msg") or "").strip()
    stderr = str(res.get("stderr") or res.get("module_stderr") or "").strip()
    if stderr and stderr not in msg:
        msg = f"{msg}: {stderr}" if msg else stderr
    return msg[:2000] or "the task failed"
