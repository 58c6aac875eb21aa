# Copyright (c) 2026 gpufleet contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
# SPDX-License-Identifier: Apache-2.0
"""What gpufleet_container, gpufleet_container_info and gpufleet itself share: the runtime's command
lines, and reading `podman|docker container inspect`.

Runs on the target host inside those modules: standard library only, Python 3.8 syntax.
The modules import it as ``ansible_collections.gpufleet.fleet.plugins.module_utils.gpufleet_inspect``
when they run from the gpufleet.fleet collection, and as ``ansible.module_utils.gpufleet_inspect``
when the workload role is used from a roles path (its ``module_utils/gpufleet_inspect.py`` is a link
to this file).
"""

import json
import os
import shlex

RUN_ID_LABEL = "gpufleet.run_id"
ZERO_TIMES = ("", "0001-01-01T00:00:00Z")
# runtime states -> what we report
STATE_MAP = {"stopped": "exited", "configured": "created", "initialized": "created"}


def timestamp(value):
    """The runtime's timestamp, or None for its "never" values (empty, year 1)."""
    if not value or value in ZERO_TIMES or str(value).startswith("0001-01-01"):
        return None
    return str(value)


def container_from_inspect(data):
    """Our container dict from one object of `podman|docker container inspect`: name, id, state,
    exit_code, started_at, finished_at, error, run_id, image, labels (each module reports the keys
    its RETURN documents).

    The two runtimes name a few fields differently (docker: "/name", "Id"; podman: "ImageName",
    a plain string State on very old versions); podman's own state names are mapped to docker's.
    """
    state = data.get("State") or {}
    if isinstance(state, str):  # very old podman
        state = {"Status": state}
    status = str(state.get("Status") or "").lower() or ("running" if state.get("Running") else "unknown")
    status = STATE_MAP.get(status, status)
    config = data.get("Config") or {}
    labels = config.get("Labels") or data.get("Labels") or {}
    exit_code = state.get("ExitCode")
    return {
        "name": str(data.get("Name") or "").lstrip("/"),  # docker: "/name"
        "id": data.get("Id") or data.get("ID"),
        "state": status,
        "exit_code": int(exit_code) if status in ("exited", "dead") and exit_code is not None else None,
        "started_at": timestamp(state.get("StartedAt")),
        "finished_at": timestamp(state.get("FinishedAt")) if status in ("exited", "dead") else None,
        "error": state.get("Error") or None,
        "run_id": labels.get(RUN_ID_LABEL),
        "image": data.get("ImageName") or config.get("Image") or data.get("Image"),
        "labels": dict(labels),
    }


# --------------------------------------------------------------------------- commands
# The one builder of runtime command lines, for the modules (on the host) and for gpufleet's own
# ssh fast path (ps, logs, attach). ``runtime`` is the argument vector that runs the runtime on the
# host: ["podman"], ["docker"] or ["sudo", "-n", "podman"].

# Only the fields container_from_inspect reads, never Config.Env (a run's secrets stay on its host).
# The same Go template works for podman and docker; one JSON object a line.
INSPECT_FORMAT = ('{"Name":{{json .Name}},"Id":{{json .ID}},"State":{{json .State}},'
                  '"Config":{"Labels":{{json .Config.Labels}},"Image":{{json .Config.Image}}}}')
PS_FAILED = 3  # the exit code of list_script when `ps` itself failed
LIST_ATTEMPTS = 3
STOP_TIMEOUT = 10


def _join(argv):
    return " ".join(shlex.quote(a) for a in argv)


def list_script(runtime):
    """A shell line printing every gpufleet container (running or not) as one JSON object a line."""
    rt = _join(runtime)
    label = _join(["label=" + RUN_ID_LABEL])
    return (f'ids=$({rt} ps --all --quiet --no-trunc --filter {label}) || exit {PS_FAILED}; [ -z "$ids" ] || '
            f'{rt} container inspect --format {_join([INSPECT_FORMAT])} $ids')


def list_containers(execute, runtime):
    """Every gpufleet container on a host, sorted by name: (containers, None), or (None, why not).

    ``execute(script)`` runs a shell line on the host and returns (rc, stdout, stderr): the module
    runs it with /bin/sh, gpufleet over ssh (rc 255: ssh itself failed). A container that goes away
    between ps and inspect makes the runtime say "no such ...": the listing is asked again."""
    name = os.path.basename(runtime[-1])
    for _attempt in range(LIST_ATTEMPTS):
        rc, out, err = execute(list_script(runtime))
        if rc == 0:
            try:
                found = [container_from_inspect(json.loads(line)) for line in out.splitlines() if line.strip()]
            except ValueError:
                return None, f"cannot read what {name} container inspect printed"
            return sorted((c for c in found if c["run_id"] is not None), key=lambda c: c["name"]), None
        if rc != 255 and "no such" in err.lower():
            continue
        break
    lines = [line for line in err.splitlines() if line.strip()]
    reason = lines[-1].strip() if lines else f"exit code {rc}"
    if rc == PS_FAILED:
        reason = f"{name} ps failed: {reason}"
    return None, reason


def inspect_argv(runtime, name):
    return list(runtime) + ["container", "inspect", name]


def stop_argv(runtime, name, timeout=STOP_TIMEOUT):
    return list(runtime) + ["stop", "-t", str(timeout), name]


def remove_argv(runtime, name):
    return list(runtime) + ["rm", "-f", name]


def logs_argv(runtime, name, follow=False):
    return list(runtime) + ["logs"] + (["-f"] if follow else []) + [name]


def port_argv(runtime, name, port):
    """The runtime's command that prints where container port ``port`` (TCP) is published on the host."""
    return list(runtime) + ["port", name, f"{int(port)}/tcp"]


def published_port(text):
    """The host port in `port`'s answer (`127.0.0.1:41234`, one line per address), or None."""
    for line in text.splitlines():
        parts = line.strip().rsplit(":", 1)
        if len(parts) == 2 and parts[0] and parts[1].isdigit():
            return int(parts[1])
    return None


def exec_argv(runtime, name, command):
    return list(runtime) + ["exec", "-it", name] + list(command)
