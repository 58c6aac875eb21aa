"""The container client on gpufleet's side: asking hosts about their gpufleet containers, and the
ssh command lines for a run's logs and for attaching to it.

The runtime's command lines and the reading of `inspect` come from the workload role's
module_utils (gpufleet_inspect), the same code the gpufleet_container modules run on the hosts.
`ps` asks over the fleet's ssh_config and its open masters, without a playbook run: `ps` is run
many times a day and a playbook round costs seconds (benchmarks/README.md).
"""

from __future__ import annotations

import functools
import importlib.util
import shlex
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType

from gpufleet import paths
from gpufleet.models import Container
from gpufleet.paths import FleetFiles

LIST_TIMEOUT = 60  # seconds for one host's answer (connect timeouts are 10 s a hop)


@functools.cache
def commands() -> ModuleType:
    """The collection's plugins/module_utils/gpufleet_inspect.py (the workload role's module_utils link to
    it): the one builder of runtime command lines and the one reader of `container inspect`, loaded from
    the shipped content."""
    path = paths.content_root() / "plugins" / "module_utils" / "gpufleet_inspect.py"
    spec = importlib.util.spec_from_file_location("gpufleet_inspect", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class HostContainers:
    containers: list[Container] | None  # None: the host could not be asked (``message`` says why)
    message: str = ""

    def find(self, name: str, run_id: str) -> Container | None:
        return next((c for c in self.containers or [] if c.name == name and c.run_id == run_id), None)


def ssh_argv(files: FleetFiles, alias: str, remote: list[str] | None = None, tty: bool = False,
             extra: list[str] | None = None) -> list[str]:
    """ssh to ``alias`` through the fleet's ssh_config (jump chain, keys, masters), running ``remote``."""
    cmd = ["ssh", "-F", str(files.ssh_config), *(["-t"] if tty else []), *(extra or []), alias]
    return cmd + ["--", shlex.join(remote)] if remote else cmd


def _ask(files: FleetFiles, alias: str, runtime: list[str]) -> HostContainers:
    def execute(script: str) -> tuple[int, str, str]:
        try:
            p = subprocess.run(ssh_argv(files, alias, None) + ["--", script], capture_output=True, text=True,
                               stdin=subprocess.DEVNULL, timeout=LIST_TIMEOUT)
        except subprocess.TimeoutExpired:
            return 124, "", f"no answer within {LIST_TIMEOUT}s"
        return p.returncode, p.stdout, p.stderr

    found, error = commands().list_containers(execute, runtime)
    if error is not None:
        return HostContainers(None, error)
    return HostContainers([Container.model_validate(c) for c in found])


def list_containers(files: FleetFiles, runtimes: dict[str, list[str]]) -> dict[str, HostContainers]:
    """Every gpufleet container on each host of ``runtimes`` (alias -> the runtime's command there),
    all hosts asked at once."""
    if not runtimes:
        return {}
    aliases = list(runtimes)
    with ThreadPoolExecutor(min(len(aliases), 32)) as pool:
        return dict(zip(aliases, pool.map(lambda a: _ask(files, a, runtimes[a]), aliases), strict=True))
