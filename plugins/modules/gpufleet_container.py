# Copyright (c) 2026 gpufleet contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
# SPDX-License-Identifier: Apache-2.0
"""gpufleet_container: start, stop, remove and inspect one workload container (podman or docker).

Runs on the target host: Python 3.8+, standard library and ansible.module_utils only.
The runtime is always run with an argument list, never through a shell.
"""

DOCUMENTATION = r"""
---
module: gpufleet_container
short_description: Start, stop or remove a gpufleet workload's container and report its state
description:
  - Runs one container of a gpufleet workload with podman or docker, stops it, or removes it, and
    always reports the container's state as the runtime's C(inspect) gives it.
  - The runtime is run with an argument list, never through a shell. Every value from the
    configuration is passed inside the option that takes it (C(--env=NAME=VALUE),
    C(--device=X)...), and the argument list ends the options with C(--) before the image, so no
    value can become an option or shell code. The image and the container name are validated.
  - The container carries the label C(gpufleet.run_id). With I(state=started), an existing
    container of the same name and the same run id is left as it is, whatever its state (a task
    that exited stays exited so that its exit code can be read); one with another run id is
    removed and created anew. A container of that name without the label (not made by gpufleet)
    is never replaced (the module fails).
  - An image the host does not have is pulled first; when that fails, the module fails with
    C(pulling IMAGE failed:) and the runtime's reason.
  - When the runtime fails to start the container (image missing, unknown device, OCI runtime
    error), the module fails with the runtime's own error message, and no half-created container
    of that name remains.
  - Unless I(privileged) is true, the container runs with C(--security-opt=no-new-privileges) (no
    process in it can gain privileges through setuid files) and the runtime's default capabilities
    (the module never adds one); with it, C(--privileged), which gives every capability and device (root on the host).
version_added: "0.1.0"
author: gpufleet (@gpufleet)
options:
  state:
    description:
      - C(started) creates and starts the container (see I(run_id) for an existing one).
      - C(stopped) stops it if it runs (C(stop -t) I(stop_timeout)); a missing container is not an error.
      - C(absent) removes it if it exists (stopping it first, as C(stopped) does).
      - With I(run_id) given, C(stopped) and C(absent) act only on a container that carries this
        run id; a container of that name from another run is left alone (with a warning).
    type: str
    choices: [started, stopped, absent]
    default: started
  name:
    description:
      - The container's name. It must match C(^[a-zA-Z0-9][a-zA-Z0-9_.-]*$).
    type: str
    required: true
  run_id:
    description:
      - Identifies the run; stored as the label C(gpufleet.run_id).
      - Without it, I(state=started) uses C(cfg-) and a hash of the container's configuration
        (runtime, image, command, env, labels, devices, gpus, oci_runtime, cpuset_cpus, cpus,
        memory_mib, shm_size_mib, disk_limit_mib, network, ports, privileged, volumes, optional_volumes, workdir,
        user, entrypoint),
        so that a changed configuration replaces the container. Which optional volumes were left out
        does not count.
    type: str
  runtime:
    description: The container runtime to run (found on the PATH).
    type: str
    choices: [podman, docker]
    default: podman
  image:
    description:
      - The image to run. Required with I(state=started). No leading C(-), no white space.
    type: str
  command:
    description:
      - The container's argument vector (after the image), e.g. C(["/bin/sh", "-c", "set -e\necho hi"]).
      - A list; a plain string is refused (it would be split on commas). Empty means the image's default command.
    type: raw
    default: []
  env:
    description:
      - Environment variables, name to value. Values are passed literally (no expansion, no templating
        on the host). Names must not be empty or contain C(=); numbers are turned into strings.
    type: dict
    default: {}
  secret_env:
    description:
      - Environment variables whose values are secret, name to value. The values never appear in
        the module's arguments or results as logged (the option is C(no_log)), nor on the runtime's
        command line, which the host's process list shows. The runtime gets C(--env=NAME) and reads
        the value from its own environment. A name in both O(env) and O(secret_env) is secret.
      - Only the names count when O(run_id) is derived from the configuration, so changing a
        secret's value alone does not recreate the container; give a new O(run_id) for that.
    type: dict
    default: {}
  labels:
    description:
      - Extra container labels. Keys starting with C(gpufleet.run_id) are refused (the module sets it).
    type: dict
    default: {}
  devices:
    description:
      - Devices for the container, each passed as C(--device=X); host device paths (C(/dev/kfd),
        C(/dev/dri/renderD128), C(/dev/nvidia0:/dev/nvidia0)) or CDI names
        (C(nvidia.com/gpu=GPU-8d5d...), C(nvidia.com/gpu=0)).
    type: list
    elements: str
    default: []
  gpus:
    description:
      - docker's C(--gpus) value, e.g. C(all) or C(device=GPU-a,GPU-b) (a C(device=) list with
        commas is quoted for docker's CSV parser). podman before version 6 ignores C(--gpus); give
        podman its GPUs as CDI names in I(devices).
    type: str
  oci_runtime:
    description: The OCI runtime, passed as C(--runtime=X) (e.g. C(habana), C(nvidia)).
    type: str
  cpuset_cpus:
    description: CPUs the container may use (C(--cpuset-cpus)), e.g. C(0-15,32-47).
    type: str
  cpus:
    description: CPU quota in CPUs (C(--cpus)), e.g. C(8) or C(1.5).
    type: float
  memory_mib:
    description: Memory limit in MiB (C(--memory=NNNm)).
    type: int
  shm_size_mib:
    description: The size of the container's C(/dev/shm) in MiB (C(--shm-size=NNNm)); omitted, the runtime's
      default (64 MiB).
    type: int
  disk_limit_mib:
    description:
      - The most the container's writable layer may hold, in MiB (C(--storage-opt=size=NNNm)). The runtime
        refuses it unless its storage can (overlay on xfs with project quotas); gpufleet checks that at
        plan time from the probe's facts.
    type: int
  network:
    description:
      - The network (C(--network)), e.g. C(host) (the host's network) or C(bridge) (a network
        namespace of the container's own, on the runtime's default bridge).
    type: str
    default: host
  ports:
    description:
      - Ports of the container published on the host's loopback address only, each C(PORT) or
        C(HOSTPORT:PORT), passed as C(--publish=127.0.0.1:HOSTPORT:PORT). A C(PORT) alone gets a
        free host port the runtime chooses (C(--publish=127.0.0.1::PORT)), so that containers on one
        host never compete for a port; C(podman port) tells which. Nothing is published on the
        host's other addresses; reach them through an ssh forward to the host's C(127.0.0.1).
      - Refused with I(network=host), where the container's ports are the host's already.
    type: list
    elements: str
    default: []
  privileged:
    description:
      - Run the container with C(--privileged) (every capability and the host's devices, so root on
        the host) instead of C(--security-opt=no-new-privileges) and the default capabilities.
    type: bool
    default: false
  volume_roots:
    description:
      - When given, every volume must be a bind mount of a host path whose real path (symlinks
        resolved on the host) is one of these paths or below one (compared part by part,
        C(/database) is not below C(/data)); any other volume is refused before the container is
        created. An empty list allows no volume; without it, volumes are not checked.
      - Resolving here catches a symlink planted under an allowed path (C(/data/x -> /)); a link
        swapped between this check and the runtime's mount is not caught.
    type: list
    elements: str
  volumes:
    description:
      - Bind mounts or named volumes, each C(src:dst) or C(src:dst:OPTIONS) (e.g. C(ro), C(rw,z)),
        passed as C(--volume=...). I(dst) must be an absolute path.
    type: list
    elements: str
    default: []
  optional_volumes:
    description:
      - Bind mounts of host paths, each C(/host/path:dst) or C(/host/path:dst:OPTIONS) as in
        I(volumes), that the container may start without (dstack's C(optional=true)). One whose
        host path does not exist here (a dangling symlink counts as missing) is left out and named in
        C(skipped_volumes) and a warning; the others are mounted as I(volumes) are.
      - I(volume_roots) applies to them as to I(volumes), present or not.
    type: list
    elements: str
    default: []
  workdir:
    description: The working directory inside the container (C(--workdir)).
    type: str
  upload_dir:
    description:
      - The host folder a run's code upload was unpacked in (the workload role does it); required with
        I(uploads). C(~) is the home of the user the module runs as.
    type: path
  uploads:
    description:
      - Items of the upload bound read-write into the container, each C({src, dst}), C(src) an item's path
        below I(upload_dir) (C(N) or C(N/NAME)), C(dst) an absolute container path. An item that is missing
        or reached through a symlink is refused. I(volume_roots) does not apply (the folder is gpufleet's).
    type: list
    elements: dict
    default: []
  user:
    description:
      - The user the container's process runs as (C(--user)), C(USER) or C(USER:GROUP), each a name or
        a number; omitted, the image's user.
    type: str
  entrypoint:
    description:
      - The program that replaces the image's entrypoint (C(--entrypoint); podman gets it as a JSON
        array of one word, so it is never split). Its arguments are I(command).
    type: str
  registry_auth:
    description:
      - Credentials to pull I(image) from a private registry, C({username, password}) (dstack's
        C(registry_auth)). The option is C(no_log). Given, the image is pulled before the container is
        created (even when the host has it, so that the credentials are checked), with the credentials in
        an auth file made for the pull (mode 0600, in a private temporary directory) and removed right
        after it, and never on the runtime's command line.
    type: dict
  stop_timeout:
    description:
      - Seconds the runtime waits, after the stop signal (SIGTERM unless the image sets another), for
        the container to exit before it kills it (C(stop -t N)). Applies to every stop the module does.
      - C(0) kills it at once. Must not be negative.
    type: int
    default: 10
notes:
  - Supports check mode (it reports what would change and changes nothing) and diff mode.
  - The runtime is run as the user the task runs as; use C(become) for rootful podman or docker.
"""

EXAMPLES = r"""
- name: Run a job on two NVIDIA GPUs (CDI) with podman
  gpufleet_container:
    name: job-7f3a
    run_id: 7f3a0c
    image: docker.io/library/python:3.12-slim
    command: ["/bin/sh", "-c", "set -e\nnvidia-smi -L\npython train.py"]
    env:
      HF_TOKEN: "{{ hf_token }}"
    devices:
      - nvidia.com/gpu=GPU-b42dd28e-ffdd-8720-1df0-98bd8cdc05b1
      - nvidia.com/gpu=GPU-5c0a8f2e-1111-2222-3333-444455556666
    cpuset_cpus: 0-15
    memory_mib: 65536
  become: true

- name: An AMD job with docker
  gpufleet_container:
    runtime: docker
    name: job-amd
    run_id: r42
    image: rocm/pytorch:latest
    devices: [/dev/kfd, /dev/dri/renderD128]

- name: Stop it (the container and its exit code remain)
  gpufleet_container:
    name: job-7f3a
    run_id: 7f3a0c
    state: stopped
  register: job

- name: Remove it
  gpufleet_container:
    name: job-7f3a
    state: absent
"""

RETURN = r"""
container:
  description: The container as the runtime's C(inspect) reports it after the task (before it, in check mode).
  returned: always
  type: dict
  contains:
    name:
      description: The container's name.
      type: str
      sample: job-7f3a
    id:
      description: The container's id; null when it is missing.
      type: str
      sample: 3f1c5e0d...
    state:
      description:
        - C(running), C(exited), C(created) or C(missing); other runtime states (C(paused),
          C(restarting), C(removing), C(dead)) as the runtime names them. podman's C(stopped) is
          reported as C(exited), C(configured) and C(initialized) as C(created).
      type: str
      sample: running
    exit_code:
      description: The exit code once the container has exited (C(exited), C(dead)), else null.
      type: int
      sample: 3
    started_at:
      description: When it started (the runtime's timestamp), null if never.
      type: str
      sample: "2025-05-01T10:00:00.123456789Z"
    finished_at:
      description: When it exited, null if it has not.
      type: str
      sample: "2025-05-01T10:07:12.5Z"
    error:
      description: The runtime's error for the container (State.Error), null if none.
      type: str
      sample: null
    run_id:
      description: Its C(gpufleet.run_id) label, null if none.
      type: str
      sample: 7f3a0c
    image:
      description: The image it was created from, as given.
      type: str
      sample: localhost/gpufleet-lab:latest
actions:
  description: What was done (or would be done, in check mode), in order.
  returned: always
  type: list
  elements: str
  sample: [remove, create]
skipped_volumes:
  description: The I(optional_volumes) left out because their host path is missing on this host.
  returned: with state=started
  type: list
  elements: str
  sample: ["/data/cache:/cache"]
stderr:
  description: The runtime's full standard error, when it failed to start the container.
  returned: failure
  type: str
"""

# Ansible wants the imports after DOCUMENTATION, EXAMPLES and RETURN.
import base64  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

# One copy of the inspect parsing, in the collection's plugins/module_utils/gpufleet_inspect.py; the
# workload role's module_utils/gpufleet_inspect.py links to it (used from a roles path). Both imports
# are optional to Ansible's module packer (inside try), so each way of running packs only the copy it
# can find.
try:
    from ansible.module_utils import gpufleet_inspect  # noqa: E402
except ImportError:
    from ansible_collections.gpufleet.fleet.plugins.module_utils import gpufleet_inspect  # noqa: E402

RUN_ID_LABEL = gpufleet_inspect.RUN_ID_LABEL

NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(:[A-Za-z0-9_][A-Za-z0-9_.-]*)?$")
RUNNING_STATES = ("running", "paused", "restarting", "stopping")
VOLUME_OPTIONS = {"ro", "rw", "z", "Z", "shared", "slave", "private", "rshared", "rslave", "rprivate",
                  "nocopy", "U", "O", "exec", "noexec", "suid", "nosuid", "dev", "nodev", "copy",
                  "bind", "rbind"}
# what `container` holds (RETURN)
CONTAINER_KEYS = ("name", "id", "state", "exit_code", "started_at", "finished_at", "error", "run_id", "image")


# ------------------------------------------------------------------- inspect (plugins/module_utils/gpufleet_inspect.py)

def missing_container(name):
    return {"name": name, "id": None, "state": "missing", "exit_code": None, "started_at": None,
            "finished_at": None, "error": None, "run_id": None, "image": None}


def container_from_inspect(data):
    full = gpufleet_inspect.container_from_inspect(data)
    return dict((key, full[key]) for key in CONTAINER_KEYS)


def is_missing_error(text):
    text = text.lower()
    return "no such container" in text or "no such object" in text or "no container with name" in text


# --------------------------------------------------------------------------- arguments

def _stringify(module, what, mapping):
    """{str: str} from a dict option; numbers become strings, anything else is refused."""
    out = {}
    for key, value in (mapping or {}).items():
        key = str(key)
        if not key or "=" in key or "\0" in key:
            module.fail_json(msg=f"{what}: invalid name {key!r} (empty, or contains '=')")
        if isinstance(value, bool) or value is None or isinstance(value, (dict, list)):
            shown = type(value).__name__ if what == "secret_env" else repr(value)
            module.fail_json(msg=f"{what}: the value of {key} must be a string (got {shown}); quote it (with "
                             "ansible-core 2.19, !unsafe on a quoted scalar drops the quotes: tag the whole mapping, "
                             "!unsafe {...})")
        value = str(value)
        if "\0" in value:
            module.fail_json(msg=f"{what}: the value of {key} contains a NUL character")
        out[key] = value
    return out


def _docker_gpus(value):
    """docker reads --gpus as CSV: `device=a,b` must be quoted to stay one field."""
    if value.startswith("device=") and "," in value and '"' not in value:
        return f'"{value}"'
    return value


def validate(module):
    p = module.params
    if not NAME_RE.match(p["name"]):
        module.fail_json(msg=f"name: {p['name']!r} is not a valid container name (it must match {NAME_RE.pattern})")
    if p["stop_timeout"] < 0:
        module.fail_json(msg=f"stop_timeout must be 0 or more seconds (got {p['stop_timeout']})")
    if p["state"] != "started":
        return None
    image = p["image"]
    if not image:
        module.fail_json(msg="image is required with state=started")
    if image.startswith("-") or re.search(r"\s", image) or "\0" in image:
        module.fail_json(msg=f"image: {image!r} is not a valid image reference (no leading '-', no white space)")
    command = p["command"]
    if command is None:
        command = []
    if not isinstance(command, list):
        module.fail_json(msg=f"command must be a list (the container's argument vector), not {type(command).__name__}")
    for i, item in enumerate(command):
        if not isinstance(item, str):
            module.fail_json(msg=f"command: item {i} is {item!r} ({type(item).__name__}), not a string. (With "
                             "ansible-core 2.19, a scalar tagged !unsafe loses its quotes: !unsafe \"true\" loads as a "
                             "boolean. Tag the whole list instead: !unsafe [\"true\"].)")
    if any("\0" in a for a in command):
        module.fail_json(msg="command: an item contains a NUL character")
    secret_env = _stringify(module, "secret_env", p["secret_env"])
    env = {k: v for k, v in _stringify(module, "env", p["env"]).items() if k not in secret_env}
    labels = _stringify(module, "labels", p["labels"])
    if any(k.startswith(RUN_ID_LABEL) for k in labels):
        module.fail_json(msg=f"labels: {RUN_ID_LABEL} is set by the module (use run_id)")
    for device in p["devices"] or []:
        if not device or "\0" in device:
            module.fail_json(msg=f"devices: invalid device {device!r}")
    for key in ("volumes", "optional_volumes"):
        for volume in p[key] or []:
            parts = volume.split(":")
            if len(parts) not in (2, 3) or not parts[0] or not parts[1].startswith("/") or "\0" in volume or (
                    len(parts) == 3 and not set(parts[2].split(",")) <= VOLUME_OPTIONS):
                module.fail_json(msg="{}: {!r} is not src:dst or src:dst:OPTIONS (dst an absolute path; options "
                                 "among {})".format(key, volume, ", ".join(sorted(VOLUME_OPTIONS))))
            if key == "optional_volumes" and not parts[0].startswith("/"):
                module.fail_json(msg=f"optional_volumes: {volume!r}: only a host path can be optional")
    _check_volume_roots(module, (p["volumes"] or []) + (p["optional_volumes"] or []), p["volume_roots"])
    mounts, skipped = list(p["volumes"] or []), []
    for volume in p["optional_volumes"] or []:
        (mounts if os.path.exists(volume.split(":", 1)[0]) else skipped).append(volume)
    mounts += _upload_mounts(module, p.get("upload_dir"), p.get("uploads") or [])
    ports = _ports(module, p["ports"] or [])
    if ports and p["network"] == "host":
        module.fail_json(msg="ports: a container on the host's network (network=host) publishes nothing")
    for key in ("network", "oci_runtime", "cpuset_cpus", "gpus", "workdir", "user", "entrypoint"):
        value = p[key]
        if value is not None and ("\0" in value or (key not in ("workdir", "entrypoint") and re.search(r"\s", value))):
            module.fail_json(msg=f"{key}: invalid value {value!r}")
    if p["user"] is not None and not USER_RE.match(p["user"]):
        module.fail_json(msg=f"user: {p['user']!r} is not USER or USER:GROUP (a name or a number each)")
    if p["entrypoint"] is not None and not p["entrypoint"]:
        module.fail_json(msg="entrypoint: empty (omit it to keep the image's)")
    if p["cpus"] is not None and p["cpus"] <= 0:
        module.fail_json(msg="cpus must be > 0")
    if p["memory_mib"] is not None and p["memory_mib"] <= 0:
        module.fail_json(msg="memory_mib must be > 0")
    for key in ("shm_size_mib", "disk_limit_mib"):
        if p[key] is not None and p[key] <= 0:
            module.fail_json(msg=f"{key} must be > 0")
    return {"image": image, "command": list(command), "env": env, "labels": labels, "secret_env": secret_env,
            "ports": ports, "mounts": mounts, "skipped_volumes": skipped,
            "registry_auth": _registry_auth(module, p.get("registry_auth"))}


def _registry_auth(module, auth):
    """{username, password} (both non-empty strings), or None; the values are never shown."""
    if auth is None:
        return None
    fine = all(isinstance(v, str) and v and "\0" not in v for v in auth.values())
    if set(auth) != {"username", "password"} or not fine:
        module.fail_json(msg="registry_auth must be {username, password}, each a non-empty string")
    if ":" in auth["username"]:
        module.fail_json(msg="registry_auth: the username cannot contain ':'")
    return {"username": auth["username"], "password": auth["password"]}


def _upload_mounts(module, base, uploads):
    """The `--volume` values of a run's uploaded items: each SRC below upload_dir at DST, read-write."""
    if not uploads:
        return []
    base = base or ""
    if not os.path.isabs(base):
        module.fail_json(msg=f"upload_dir: {base!r}: an absolute path is required with uploads")
    base = os.path.realpath(base)
    out = []
    for item in uploads:
        src, dst = item.get("src"), item.get("dst")
        if not isinstance(src, str) or not re.match(r"^[0-9]+(/[^/:,\0]+)?$", src) or src.endswith(("/.", "/..")):
            module.fail_json(msg=f"uploads: {src!r} is not an item of the upload (N or N/NAME)")
        if not isinstance(dst, str) or not dst.startswith("/") or dst == "/" or re.search(r"[:,\0]", dst) or \
                ".." in dst.split("/"):
            module.fail_json(msg=f"uploads: {dst!r} is not an absolute container path (no ':', ',' or '..')")
        path = os.path.join(base, src)
        bad = os.path.islink(path) or not os.path.exists(path) or os.path.realpath(path) != path
        if not getattr(module, "check_mode", False) and bad:
            module.fail_json(msg=f"uploads: {src} is missing from {base}, or is reached through a symlink")
        out.append(f"{path}:{dst}")
    return out


def _ports(module, items):
    """HOSTPORT:PORT (or :PORT, a host port the runtime picks) from `HOSTPORT:PORT` or `PORT` items
    (each a number from 1 to 65535)."""
    out = []
    for item in items:
        parts = str(item).split(":")
        if len(parts) not in (1, 2) or not all(x.isdigit() and 1 <= int(x) <= 65535 for x in parts):
            module.fail_json(msg=f"ports: {item!r} is not PORT or HOSTPORT:PORT (numbers from 1 to 65535)")
        out.append(f"{int(parts[0])}:{int(parts[-1])}" if len(parts) == 2 else f":{int(parts[0])}")
    return out


def _under(path, root):
    return root == "/" or path == root or path.startswith(root.rstrip("/") + "/")


def _check_volume_roots(module, volumes, roots):
    """With volume_roots given: each volume's host path, resolved on this host, is below one of them."""
    if roots is None:
        return
    real_roots = [os.path.realpath(r) for r in roots if r.startswith("/")]
    for volume in volumes:
        source = volume.split(":", 1)[0]
        if not source.startswith("/"):
            module.fail_json(msg=f"volumes: {volume!r}: only host paths may be mounted here (volume_roots is set)")
        real = os.path.realpath(source)
        if not any(_under(real, root) for root in real_roots):
            allowed = ", ".join(roots) if roots else "none"
            shown = source if real == source else f"{source} (really {real})"
            module.fail_json(msg=f"volumes: {shown} is not below a host path this container may mount ({allowed})")


def config_run_id(p, spec):
    # what was asked, not which optional volumes this host has now (mounts, skipped_volumes)
    data = dict((k, v) for k, v in spec.items() if k not in ("mounts", "skipped_volumes", "registry_auth"))
    data["secret_env"] = sorted(spec["secret_env"])  # names only: no digest of a secret leaves the host
    # privileged is hashed even when false: a container made before no-new-privileges was the default
    # gets another id, so it is replaced; the options added later only when set, so that the id of a
    # container made before them stays the same
    for key in ("runtime", "devices", "gpus", "oci_runtime", "cpuset_cpus", "cpus", "memory_mib", "network",
                "privileged", "volumes", "workdir"):
        data[key] = p[key]
    for key in ("optional_volumes", "user", "entrypoint", "shm_size_mib", "disk_limit_mib"):
        if p[key]:
            data[key] = p[key]
    if p.get("uploads"):
        data["uploads"] = p["uploads"]
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode("utf-8")).hexdigest()
    return "cfg-" + digest[:16]


def run_argv(binary, p, spec, run_id):
    """`<runtime> run -d --name=NAME ... -- IMAGE [command...]`: every value inside its own option."""
    argv = [binary, "run", "--detach", "--name=" + p["name"], f"--label={RUN_ID_LABEL}={run_id}"]
    for key in sorted(spec["labels"]):
        argv.append(f"--label={key}={spec['labels'][key]}")
    for key in sorted(spec["env"]):
        argv.append(f"--env={key}={spec['env'][key]}")
    for key in sorted(spec["secret_env"]):
        argv.append(f"--env={key}")  # the value comes from the runtime's environment (run_command's environ_update)
    for device in p["devices"] or []:
        argv.append("--device=" + device)
    if p["gpus"]:
        argv.append("--gpus=" + (_docker_gpus(p["gpus"]) if p["runtime"] == "docker" else p["gpus"]))
    if p["oci_runtime"]:
        argv.append("--runtime=" + p["oci_runtime"])
    if p["cpuset_cpus"]:
        argv.append("--cpuset-cpus=" + p["cpuset_cpus"])
    if p["cpus"] is not None:
        argv.append(f"--cpus={p['cpus']:g}")
    if p["memory_mib"] is not None:
        argv.append(f"--memory={p['memory_mib']}m")
    if p["shm_size_mib"] is not None:
        argv.append(f"--shm-size={p['shm_size_mib']}m")
    if p["disk_limit_mib"] is not None:
        argv.append(f"--storage-opt=size={p['disk_limit_mib']}m")
    if p["privileged"]:
        argv.append("--privileged")
    else:
        argv.append("--security-opt=no-new-privileges")
    if p["network"]:
        argv.append("--network=" + p["network"])
    for port in spec["ports"]:
        argv.append("--publish=127.0.0.1:" + port)
    for volume in spec["mounts"]:
        argv.append("--volume=" + volume)
    if p["workdir"]:
        argv.append("--workdir=" + p["workdir"])
    if p["user"]:
        argv.append("--user=" + p["user"])
    if p["entrypoint"] is not None:
        # podman reads a JSON array as the whole entrypoint, and might read a plain string as one
        argv.append("--entrypoint=" + (json.dumps([p["entrypoint"]]) if p["runtime"] == "podman" else p["entrypoint"]))
    return argv + ["--", spec["image"]] + spec["command"]


def error_message(stderr):
    """The runtime's own error: from its last `Error...` line on (podman prints pull retries before it)."""
    lines = [line for line in stderr.strip().splitlines()
             if not line.startswith("Run '") and "--help' for more information" not in line]
    start = None
    for i, line in enumerate(lines):
        if line.startswith(("Error", "docker: Error", "error")):
            start = i
    text = "\n".join(lines[start:] if start is not None else lines).strip()
    return text or stderr.strip()


# --------------------------------------------------------------------------- pulling

def registry_of(image):
    """The registry an image reference is pulled from (its first part when that names a host, else Docker Hub)."""
    first, slash, _rest = image.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


def _auth_file(directory, runtime, image, auth):
    """Write the credentials for ``image``'s registry into ``directory`` (private, the caller removes
    it) as the runtime reads them: (extra argv for the pull, extra environment)."""
    registry = registry_of(image)
    if runtime == "docker" and registry == "docker.io":
        registry = "https://index.docker.io/v1/"
    token = base64.b64encode(f"{auth['username']}:{auth['password']}".encode()).decode("ascii")
    path = os.path.join(directory, "config.json" if runtime == "docker" else "auth.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"auths": {registry: {"auth": token}}}, f)
    if runtime == "docker":
        return [], {"DOCKER_CONFIG": directory}
    return ["--authfile=" + path], {}


def pull(module, runtime, image, auth):
    """Pull ``image`` when the host lacks it, or always with ``auth`` (credentials only in a 0600 file
    removed after the pull). None when done; else (why, rc): the image and the runtime's reason."""
    binary = runtime.binary
    if auth is None:
        exists = [binary, "image", "exists", image] if module.params["runtime"] == "podman" \
            else [binary, "image", "inspect", "--format", "{{.Id}}", image]
        if runtime.run(exists)[0] == 0:
            return None
    directory = tempfile.mkdtemp(prefix="gpufleet-pull-")  # 0700
    try:
        argv, environ = _auth_file(directory, module.params["runtime"], image, auth) if auth else ([], {})
        rc, out, err = module.run_command([binary, "pull", "--quiet"] + argv + ["--", image],
                                          expand_user_and_vars=False, environ_update=environ)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if rc == 0:
        return None
    reason = error_message(err or out)
    for prefix in ("Error: ", "Error response from daemon: ", "error: "):
        reason = reason[len(prefix):] if reason.startswith(prefix) else reason
    return f"pulling {image} failed: {reason}", rc


# --------------------------------------------------------------------------- module

class Runtime:
    def __init__(self, module):
        self.module = module
        self.binary = module.get_bin_path(module.params["runtime"], required=True)

    def run(self, argv):
        # never expand $VARS or ~ in the arguments (run_command does by default): values are literal
        return self.module.run_command(argv, expand_user_and_vars=False)

    def inspect(self, name):
        rc, out, err = self.run(gpufleet_inspect.inspect_argv([self.binary], name))
        if rc != 0:
            if is_missing_error(err + out):
                return missing_container(name)
            runtime = self.module.params["runtime"]
            self.module.fail_json(msg=f"{runtime} container inspect {name} failed: {(err or out).strip()}", rc=rc)
        try:
            data = json.loads(out)
        except ValueError:
            runtime = self.module.params["runtime"]
            self.module.fail_json(msg=f"cannot read the output of {runtime} container inspect: {out[:500]}")
        if isinstance(data, list):
            data = data[0] if data else None
        if not data:
            return missing_container(name)
        return container_from_inspect(data)

    def stop(self, name):
        rc, out, err = self.run(gpufleet_inspect.stop_argv([self.binary], name, self.module.params["stop_timeout"]))
        if rc != 0 and self.inspect(name)["state"] in RUNNING_STATES:
            self.module.fail_json(msg=error_message(err or out), stderr=err, rc=rc)

    def remove(self, name):
        rc, out, err = self.run(gpufleet_inspect.remove_argv([self.binary], name))
        if rc != 0 and self.inspect(name)["state"] != "missing":
            self.module.fail_json(msg=error_message(err or out), stderr=err, rc=rc)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", choices=["started", "stopped", "absent"], default="started"),
            name=dict(type="str", required=True),
            run_id=dict(type="str"),
            runtime=dict(type="str", choices=["podman", "docker"], default="podman"),
            image=dict(type="str"),
            command=dict(type="raw", default=[]),
            env=dict(type="dict", default={}),
            secret_env=dict(type="dict", default={}, no_log=True),
            labels=dict(type="dict", default={}),
            devices=dict(type="list", elements="str", default=[]),
            gpus=dict(type="str"),
            oci_runtime=dict(type="str"),
            cpuset_cpus=dict(type="str"),
            cpus=dict(type="float"),
            memory_mib=dict(type="int"),
            shm_size_mib=dict(type="int"),
            disk_limit_mib=dict(type="int"),
            network=dict(type="str", default="host"),
            ports=dict(type="list", elements="str", default=[]),
            privileged=dict(type="bool", default=False),
            volume_roots=dict(type="list", elements="str"),
            volumes=dict(type="list", elements="str", default=[]),
            optional_volumes=dict(type="list", elements="str", default=[]),
            workdir=dict(type="str"),
            upload_dir=dict(type="path"),
            uploads=dict(type="list", elements="dict", default=[]),
            user=dict(type="str"),
            entrypoint=dict(type="str"),
            stop_timeout=dict(type="int", default=gpufleet_inspect.STOP_TIMEOUT),
            registry_auth=dict(type="dict", no_log=True),
        ),
        required_if=[("state", "started", ("image",))],
        supports_check_mode=True,
    )
    p = module.params
    spec = validate(module)
    runtime = Runtime(module)
    name, state = p["name"], p["state"]
    before = runtime.inspect(name)
    actions = []
    warnings = []
    if p["gpus"] and p["runtime"] == "podman":
        warnings.append("podman before version 6 ignores --gpus: give podman GPUs as CDI names in devices")

    if state == "started":
        run_id = p["run_id"] or config_run_id(p, spec)
        if before["state"] != "missing" and before["run_id"] is None:
            module.fail_json(msg=f"a container named {name} exists that gpufleet did not create (it has no "
                             f"{RUN_ID_LABEL} label): remove it or choose another name", container=before)
        if before["state"] != "missing" and before["run_id"] == run_id:
            pass  # this run's container: leave it as it is (running or exited)
        else:
            if before["state"] != "missing":
                actions += (["stop"] if before["state"] in RUNNING_STATES else []) + ["remove"]
            actions.append("create")
    else:
        run_id = p["run_id"]
        foreign = before["state"] != "missing" and run_id is not None and before["run_id"] != run_id
        if foreign:
            warnings.append(f"container {name} belongs to run {before['run_id']}, not {run_id}: left alone")
        elif before["state"] in RUNNING_STATES:
            actions.append("stop")
        if state == "absent" and before["state"] != "missing" and not foreign:
            actions.append("remove")

    result = {"changed": bool(actions), "actions": actions}
    if state == "started":
        result["skipped_volumes"] = spec["skipped_volumes"]
        if "create" in actions:
            warnings += [f"optional volume {v}: {v.split(':', 1)[0]} does not exist on this host: left out"
                         for v in spec["skipped_volumes"]]
    if module._diff:
        after_state = {"started": "running", "stopped": "exited", "absent": "missing"}[state] if actions \
            else before["state"]
        result["diff"] = {"before": {"state": before["state"], "run_id": before["run_id"]},
                          "after": {"state": after_state,
                                    "run_id": run_id if "create" in actions else before["run_id"]}}
    for warning in warnings:
        module.warn(warning)
    if module.check_mode or not actions:
        module.exit_json(container=before, **result)

    for i, action in enumerate(actions):
        if action == "stop":
            runtime.stop(name)
        elif action == "remove":
            runtime.remove(name)
        elif action == "create":
            result["changed"] = i > 0  # until it succeeds, only what was done before counts
            failed = pull(module, runtime, spec["image"], spec["registry_auth"])
            if failed:  # the reason is the whole of it (no stderr: podman's retries would repeat it)
                module.fail_json(msg=failed[0], rc=failed[1], container=runtime.inspect(name), **result)
            argv = run_argv(runtime.binary, p, spec, run_id)
            rc, out, err = module.run_command(argv, expand_user_and_vars=False, environ_update=spec["secret_env"])
            if rc != 0:
                # a failed start can leave the container created: remove it if it is this run's
                left = runtime.inspect(name)
                if left["state"] != "missing" and left["run_id"] == run_id:
                    runtime.run(gpufleet_inspect.remove_argv([runtime.binary], name))
                    left = runtime.inspect(name)
                module.fail_json(msg=error_message(err or out), stderr=err, rc=rc, container=left, **result)
            result["changed"] = True
    module.exit_json(container=runtime.inspect(name), **result)


if __name__ == "__main__":
    main()
