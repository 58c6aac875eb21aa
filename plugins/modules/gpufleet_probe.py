# Copyright (c) 2026 gpufleet contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
# SPDX-License-Identifier: Apache-2.0
"""gpufleet_probe: what a host offers to a GPU fleet (GPUs, CPUs, memory, disk, container runtime).

Runs on the target host: Python 3.8+, standard library and ansible.module_utils only.
"""

DOCUMENTATION = r"""
---
module: gpufleet_probe
short_description: Report a host's GPUs, CPUs, memory, disk and container runtime for gpufleet
description:
  - Runs the GPU vendors' own tools that are installed (C(nvidia-smi), C(amd-smi), C(hl-smi),
    C(tt-smi)) and reports every GPU found, of every vendor and model, as is.
  - Reads CPUs and their NUMA nodes from C(/sys), memory from C(/proc/meminfo), and the free space
    of the container runtime's storage.
  - Finds a container runtime (podman or docker) that the login user can run, directly or through
    passwordless sudo, and whether it can hand the host's GPUs to containers.
  - Never changes the host. Anything that stops the host from running GPU containers is reported
    in C(problems) with a reason and a fix, not as a module failure; a host without GPUs is valid.
version_added: "0.1.0"
author: gpufleet (@gpufleet)
options:
  runtimes:
    description:
      - Container runtimes to look for, in order of preference. The first one that works is used.
    type: list
    elements: str
    default: [podman, docker]
  runtime_root:
    description:
      - The container storage root to report disk space for, instead of the one the runtime reports.
    type: path
notes:
  - Supports check mode; it only reads.
"""

EXAMPLES = r"""
- name: Probe the host
  gpufleet_probe:

- name: Prefer docker, measure a dedicated storage disk
  gpufleet_probe:
    runtimes: [docker, podman]
    runtime_root: /data/containers

- name: Show the GPUs found
  ansible.builtin.debug:
    msg: "{{ ansible_facts.gpufleet_probe.gpus | map(attribute='model') | list }}"
"""

RETURN = r"""
ansible_facts:
  description: Facts about the host.
  returned: always
  type: dict
  contains:
    gpufleet_probe:
      description: What the host offers.
      returned: always
      type: dict
      contains:
        hostname:
          description: The host's name.
          type: str
          sample: gpu-node-1
        gpus:
          description:
            - Every GPU, by vendor (nvidia, amd, intel, tenstorrent) then the vendor tool's index.
            - Each has index, vendor, name (as the tool prints it), model (short, e.g. H100, MI300X,
              Gaudi3, n300), memory_mib, uuid, bus_id (0000:18:00.0) and numa_node; unknown values are null.
          type: list
          elements: dict
          sample:
            - {index: 0, vendor: nvidia, name: NVIDIA H100 80GB HBM3, model: H100, memory_mib: 81559,
               uuid: GPU-b42dd28e-ffdd-8720-1df0-98bd8cdc05b1, bus_id: "0000:18:00.0", numa_node: 0}
        drivers:
          description: Driver version by vendor.
          type: dict
          sample: {nvidia: 565.57.01}
        cpu:
          description: Number of CPUs, the CPU list of each NUMA node (empty without NUMA information), and the
            architecture in dstack's names (x86 for x86_64, arm for aarch64, else uname's machine).
          type: dict
          sample: {count: 256, numa_nodes: {"0": "0-63,128-191", "1": "64-127,192-255"}, arch: x86}
        memory_mib:
          description: Total memory (MemTotal).
          type: int
          sample: 2063810
        disk:
          description: Size and free space of the file system that holds the runtime's storage root
            (or C(/)); path is the directory measured (the nearest existing one).
          type: dict
          sample: {path: /var/lib/containers/storage, total_mib: 1812345, free_mib: 1500000}
        runtime:
          description:
            - The container runtime used (null name when none is installed), whether the login user can
              use it (usable), whether only through sudo (via_sudo), its version and storage root.
            - gpu_support, for each vendor with GPUs on the host. nvidia is C(cdi) (a CDI spec for
              nvidia.com/gpu exists), C(nvidia-container-toolkit) (toolkit installed, no CDI spec) or null;
              amd (/dev/kfd exists), intel (habana-container-runtime installed) and tenstorrent
              (/dev/tenstorrent exists) are booleans.
            - storage (null when not usable), the runtime's storage driver, the file system under its root (backing_fs),
              whether a container's writable layer can be limited (size_limit, overlay on xfs with project
              quotas) and why not (why_not, e.g. C(overlay on ext4)).
          type: dict
          sample: {name: podman, version: 4.9.3, usable: true, via_sudo: true,
                   root: /var/lib/containers/storage, gpu_support: {nvidia: cdi},
                   storage: {driver: overlay, backing_fs: ext4, size_limit: false, why_not: overlay on ext4}}
        problems:
          description: What stops the host from running GPU containers, each with what, reason and fix.
          type: list
          elements: dict
          sample:
            - {what: container runtime, reason: "user ubuntu cannot run docker and has no passwordless sudo",
               fix: "add ubuntu to the docker group (sudo usermod -aG docker ubuntu) or grant it NOPASSWD sudo"}
"""

# Ansible wants the imports after DOCUMENTATION, EXAMPLES and RETURN.
import glob  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pwd  # noqa: E402
import socket  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

# The parsers live once, in the collection's plugins/module_utils/gpufleet_gpus.py; the gpu_probe role's
# module_utils/gpufleet_gpus.py links to it (used from a roles path). Both imports are optional to
# Ansible's module packer (inside try), so each way of running packs the copy it can find.
try:
    from ansible.module_utils.gpufleet_gpus import probe_gpus, problem, shorten  # noqa: E402
except ImportError:
    from ansible_collections.gpufleet.fleet.plugins.module_utils.gpufleet_gpus import (  # noqa: E402
        probe_gpus,
        problem,
        shorten,
    )

INFO_FORMAT = {"podman": "json", "docker": "{{json .}}"}  # `docker info --format json` needs docker >= 23
CDI_DIRS = ("/etc/cdi", "/var/run/cdi")
NODE_DIR = "/sys/devices/system/node"
MEMINFO = "/proc/meminfo"
CDI_GENERATE = "`sudo nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`"


# --------------------------------------------------------------------------- CPUs, memory, disk

def cpu_facts(node_dir=NODE_DIR):
    nodes = {}
    for path in glob.glob(os.path.join(node_dir, "node[0-9]*", "cpulist")):
        try:
            with open(path) as f:
                nodes[os.path.basename(os.path.dirname(path))[4:]] = f.read().strip()
        except OSError:
            continue
    return {"count": os.cpu_count() or 0, "numa_nodes": dict(sorted(nodes.items(), key=lambda kv: int(kv[0]))),
            "arch": cpu_arch(os.uname().machine)}


# uname's machine names of dstack's two CPU architectures (gpuhunt's CPUArchitecture)
ARCHS = {"x86_64": "x86", "amd64": "x86", "i386": "x86", "i686": "x86", "aarch64": "arm", "arm64": "arm"}


def cpu_arch(machine):
    """dstack's name of a CPU architecture (x86, arm) from uname's machine; another machine as it is."""
    machine = (machine or "").lower()
    return ARCHS.get(machine, machine or None)


def memory_mib(meminfo=MEMINFO):
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return 0


def disk_facts(path):
    """Total and free space of the file system holding ``path`` (or its nearest existing parent)."""
    path = os.path.abspath(path or "/")
    while True:
        try:
            st = os.statvfs(path)
            return {"path": path, "total_mib": st.f_blocks * st.f_frsize // (1 << 20),
                    "free_mib": st.f_bavail * st.f_frsize // (1 << 20)}
        except OSError:
            if path == os.path.dirname(path):
                return {"path": path, "total_mib": 0, "free_mib": 0}
            path = os.path.dirname(path)


# --------------------------------------------------------------------------- container runtime

MOUNTINFO = "/proc/self/mountinfo"
# the file system names under the runtime's storage: /proc's (ext4, xfs) or the runtime's (extfs)
_FS_NAMES = {"extfs": "ext4"}


def mount_of(path, mountinfo=MOUNTINFO):
    """(file system type, mount and super options) of the mount that holds ``path``, or (None, set())."""
    path = os.path.abspath(path or "/")
    best = None
    try:
        with open(mountinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return None, set()
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 6 or len(tail) < 3:
            continue
        point = fields[4].replace("\\040", " ")
        if path == point or path.startswith(point.rstrip("/") + "/"):
            if best is None or len(point) >= len(best[0]):
                best = (point, tail[0], set(fields[5].split(",")) | set(tail[2].split(",")))
    return (best[1], best[2]) if best else (None, set())


def storage_facts(name, info, root, mountinfo=MOUNTINFO):
    """The runtime's storage: driver, the file system under it, and whether a container's writable layer
    can be limited (--storage-opt size=): overlay on xfs mounted with project quotas."""
    driver = status = None
    if isinstance(info, dict):
        if name == "docker":
            driver = info.get("Driver")
            status = dict(p for p in info.get("DriverStatus") or [] if isinstance(p, list) and len(p) == 2)
        else:
            store = info.get("store") or {}
            driver, status = store.get("graphDriverName"), store.get("graphStatus")
    fs, options = mount_of(root, mountinfo) if root else (None, set())
    backing = (status or {}).get("Backing Filesystem") if isinstance(status, dict) else None
    if driver in ("overlay", "overlay2") and backing:
        fs = _FS_NAMES.get(backing, backing) if fs in (None, "overlay") else fs
    quota = bool(options & {"prjquota", "pquota"})
    limit = driver in ("overlay", "overlay2") and fs == "xfs" and quota
    why_not = None
    if not limit:
        why_not = f"{driver or 'unknown storage'} on {fs or 'an unknown file system'}" + \
            (" without project quotas" if fs == "xfs" else "")
    return {"driver": driver, "backing_fs": fs, "size_limit": limit, "why_not": why_not}


def parse_runtime_info(name, text):
    """(version, storage root, info) from `podman info --format json` / `docker info --format '{{json .}}'`.

    None when the output is not a working runtime's info (docker prints a JSON with empty server
    fields and ServerErrors when it cannot reach its daemon).
    """
    try:
        info = json.loads(text)
    except ValueError:
        return None
    if not isinstance(info, dict):
        return None
    if name == "docker":
        if info.get("ServerErrors") or not info.get("ServerVersion"):
            return None
        return info.get("ServerVersion"), info.get("DockerRootDir") or None, info
    version = (info.get("version") or {}).get("Version")
    root = (info.get("store") or {}).get("graphRoot")
    if not version and not root:
        return None
    return version, root, info


# podman's cheap check (issue 17): `podman version` opens the runtime as `podman info` does (storage, OCI
# runtime: it fails the same ways) in ~40 ms, where `podman info` takes ~200 ms (it asks the package manager
# for conmon's and the OCI runtime's versions). At debug level podman logs the storage it opened; the probe
# reads the graph driver and root from those lines, and falls back to `podman info` when it finds them not.
PODMAN_QUICK = ["--log-level=debug", "version", "--format", "{{.Client.Version}}"]
_LOGGED = {"driver": "Using graph driver ", "root": "Using graph root "}


def parse_podman_quick(out, err):
    """(version, storage root, info) from PODMAN_QUICK's output, with info holding only what the probe
    reads of `podman info` (the store's driver, and its backing file system when podman logged it);
    None when the output lacks any of them."""
    version = out.strip().splitlines()[-1].strip() if out.strip() else None
    found = {}
    backing = None
    for line in err.splitlines():
        msg = line.split('msg="', 1)[1].rsplit('"', 1)[0].replace('\\"', '"') if 'msg="' in line else line
        for key, prefix in _LOGGED.items():
            at = msg.find(prefix)  # logrus's logfmt (msg="..."), or its terminal form (DEBU[0000] ...)
            if at >= 0 and key not in found:
                found[key] = msg[at + len(prefix):].strip()
        if "backingFs=" in msg and backing is None:
            backing = msg.split("backingFs=", 1)[1].split(",")[0].strip() or None
    if not version or not found.get("driver") or not found.get("root"):
        return None
    status = {"Backing Filesystem": backing} if backing else {}
    return version, found["root"], {"store": {"graphDriverName": found["driver"], "graphStatus": status,
                                              "graphRoot": found["root"]}, "version": {"Version": version}}


def _try_runtime(run, name, prefix, path):
    """(rc, out, err, parsed) of asking runtime ``name`` at ``path`` (run with ``prefix``: [] or sudo -n)
    whether it works: podman's cheap check first, then `info` when that told too little."""
    if name == "podman":
        rc, out, err = run(prefix + [path] + PODMAN_QUICK)
        parsed = parse_podman_quick(out, err) if rc == 0 else None
        if parsed is not None or rc not in (0, 127):  # it ran and failed: `info` would fail the same way
            said = [line for line in err.splitlines() if "level=debug" not in line and not line.startswith("DEBU[")]
            return rc, out, "\n".join(said), parsed
    rc, out, err = run(prefix + [path, "info", "--format", INFO_FORMAT.get(name, "json")])
    return rc, out, err, parse_runtime_info(name, out) if rc == 0 else None


def _client_version(run, path):
    """`podman version 4.3.1` / `Docker version 28.2.2, build e6534b4` -> "4.3.1" / "28.2.2"."""
    rc, out = run([path, "--version"])[:2]
    words = out.replace(",", " ").split()
    if rc == 0 and "version" in words and words.index("version") + 1 < len(words):
        return words[words.index("version") + 1]
    return None


def _cannot_run_problem(name, user, is_root, direct_err, sudo_err, sudo_refused):
    """A human reason (and fix) for a runtime that is installed but that the user cannot run."""
    detail = shorten(sudo_err if sudo_err and not sudo_refused else direct_err, 200)
    # a user without access to the socket gets "permission denied": this one means no daemon at all
    if name == "docker" and "Cannot connect to the Docker daemon" in direct_err + sudo_err:
        return problem("container runtime", f"docker is installed but its daemon is not running ({detail})",
                       "start it: `sudo systemctl enable --now docker`")
    if is_root or not sudo_refused:
        how = "" if is_root else " even with sudo"
        return problem("container runtime", f"`{name} info` fails{how}: {detail}",
                       f"check the {name} installation on the host (`sudo {name} info`)")
    if name == "docker":
        fix = f"add {user} to the docker group (`sudo usermod -aG docker {user}`) or grant {user} NOPASSWD sudo"
    else:
        fix = (f"grant {user} NOPASSWD sudo (a sudoers line `{user} ALL=(ALL) NOPASSWD: ALL`), or set up "
               f"rootless podman for {user} (subuid/subgid ranges)")
    return problem("container runtime", f"user {user} cannot run {name} and has no passwordless sudo ({detail})",
                   fix)


def detect_runtime(run, which, names, user, is_root):
    """(runtime dict without gpu_support, runtime info dict or None, problems)."""
    installed = [(name, which(name)) for name in names if which(name)]
    if not installed:
        return ({"name": None, "version": None, "usable": False, "via_sudo": False, "root": None}, None,
                [problem("container runtime", f"no container runtime (looked for {', '.join(names)})",
                         "install podman or docker (or set container_runtime_install: true)")])
    sudo = None if is_root else which("sudo")
    failures = []
    for name, path in installed:
        rc, out, direct_err, parsed = _try_runtime(run, name, [], path)
        via_sudo, sudo_err, sudo_refused = False, "", not sudo
        if parsed is None and sudo:
            rc, out, sudo_err, parsed = _try_runtime(run, name, [sudo, "-n"], path)
            via_sudo = parsed is not None
            # sudo's own refusals ("sudo: a password is required", "... is not in the sudoers file")
            sudo_refused = parsed is None and sudo_err.lstrip().startswith("sudo:")
        if parsed is not None:
            version, root, info = parsed
            return ({"name": name, "version": version, "usable": True, "via_sudo": via_sudo, "root": root},
                    info, [])
        failures.append((name, path, _cannot_run_problem(name, user, is_root, direct_err or out, sudo_err,
                                                         sudo_refused)))
    name, path = failures[0][:2]
    runtime = {"name": name, "version": _client_version(run, path), "usable": False, "via_sudo": False,
               "root": None}
    return runtime, None, [failure[2] for failure in failures]


def _cdi_has_nvidia(cdi_dirs):
    for directory in cdi_dirs:
        for path in sorted(glob.glob(os.path.join(directory, "*"))):
            if not path.endswith((".yaml", ".yml", ".json")):
                continue
            try:
                with open(path) as f:
                    if "nvidia.com/gpu" in f.read():
                        return True
            except (OSError, UnicodeDecodeError):
                continue
    return False


def gpu_support(vendors, runtime, info, which, exists=os.path.exists, cdi_dirs=CDI_DIRS):
    """({vendor: support} for the vendors present, problems)."""
    support, problems = {}, []
    name = runtime.get("name")
    if "nvidia" in vendors:
        if _cdi_has_nvidia(cdi_dirs):
            support["nvidia"] = "cdi"
        elif which("nvidia-container-runtime") or which("nvidia-ctk"):
            support["nvidia"] = "nvidia-container-toolkit"
            if name == "podman":
                problems.append(problem(
                    "nvidia GPUs", "podman gives containers GPUs through CDI, and no CDI spec for nvidia.com/gpu "
                    f"was found in {' or '.join(cdi_dirs)}",
                    f"generate one: {CDI_GENERATE}"))
            elif name == "docker" and info is not None and "nvidia" not in (info.get("Runtimes") or {}):
                problems.append(problem(
                    "nvidia GPUs", "docker has no nvidia runtime configured and no CDI spec for nvidia.com/gpu exists",
                    "`sudo nvidia-ctk runtime configure --runtime=docker && sudo systemctl restart docker`, or "
                    + CDI_GENERATE))
        else:
            support["nvidia"] = None
            problems.append(problem(
                "nvidia GPUs", "no NVIDIA container support: neither a CDI spec for nvidia.com/gpu nor the "
                "NVIDIA Container Toolkit was found",
                f"install nvidia-container-toolkit and run {CDI_GENERATE}"))
    checks = (
        ("amd", exists("/dev/kfd"), "/dev/kfd is missing: the amdgpu kernel driver (ROCm) is not loaded",
         "install amdgpu-dkms from ROCm and load it (`sudo modprobe amdgpu`)"),
        ("intel", bool(which("habana-container-runtime")), "habana-container-runtime is not installed",
         f"install habanalabs-container-runtime and configure it for {name or 'the container runtime'}"),
        ("tenstorrent", exists("/dev/tenstorrent"), "/dev/tenstorrent is missing: tt-kmd is not loaded",
         "install tt-kmd (https://github.com/tenstorrent/tt-kmd) and load it (`sudo modprobe tenstorrent`)"),
    )
    for vendor, ok, reason, fix in checks:
        if vendor in vendors:
            support[vendor] = ok
            if not ok:
                problems.append(problem(f"{vendor} GPUs", reason, fix))
    return support, problems


# --------------------------------------------------------------------------- module

def probe_host(run, which, runtimes, runtime_root=None):
    """All the facts of ``gpufleet_probe``; ``run``/``which`` as for probe_gpus()."""
    gpu_facts = probe_gpus(run, which)
    user = pwd.getpwuid(os.geteuid()).pw_name
    runtime, info, runtime_problems = detect_runtime(run, which, runtimes, user, os.geteuid() == 0)
    if runtime_root:
        runtime["root"] = runtime_root
    vendors = set(gpu["vendor"] for gpu in gpu_facts["gpus"])
    runtime["gpu_support"], support_problems = gpu_support(vendors, runtime, info, which)
    runtime["storage"] = storage_facts(runtime["name"], info, runtime["root"]) if runtime["usable"] else None
    return {
        "hostname": socket.gethostname(),
        "gpus": gpu_facts["gpus"],
        "drivers": gpu_facts["drivers"],
        "cpu": cpu_facts(),
        "memory_mib": memory_mib(),
        "disk": disk_facts(runtime["root"] or "/"),
        "runtime": runtime,
        "problems": gpu_facts["problems"] + runtime_problems + support_problems,
    }


def main():
    module = AnsibleModule(
        argument_spec=dict(
            runtimes=dict(type="list", elements="str", default=["podman", "docker"]),
            runtime_root=dict(type="path"),
        ),
        supports_check_mode=True,
    )

    def run(argv):
        try:
            return module.run_command(argv, handle_exceptions=False)
        except OSError as e:
            return 127, "", str(e)

    facts = probe_host(run, module.get_bin_path, module.params["runtimes"], module.params["runtime_root"])
    module.exit_json(changed=False, ansible_facts={"gpufleet_probe": facts})


if __name__ == "__main__":
    main()
