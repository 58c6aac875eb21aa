"""The local lab: a login node and GPU nodes as network namespaces on this machine.

Each host is a real network namespace (and UTS namespace, so `hostname` differs)
running its own sshd with its own host key. Nodes are wired only to the login
node's bridge, so they are reachable only through it. With ``hops=2`` a gateway
stands in front of the login node (its own namespace, sshd, key and host key): the
login node is then reachable only through the gateway, the nodes only through both. Each node has stand-in GPU
tools first on its PATH, its own podman storage and a local busybox image.
All hosts share this machine's filesystem, users and /etc.
"""

from __future__ import annotations

import functools
import io
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from gpufleet.errors import GpufleetError, UsageError
from gpufleet.lab import VENDORS, gputools
from gpufleet.lab.gputools import GpuSpec, write_standins
from gpufleet.lab.openai_stub import OPENAI_STUB
from gpufleet.lab.router_stub import ROUTER_STUB

LAB_USER = "gpufleet"
LAB_IMAGE = "localhost/gpufleet-lab:latest"
RUN_ROOT = Path("/var/lib/gpufleet-lab")  # readable by the lab user (unlike /root)
SUDOERS = Path("/etc/sudoers.d/gpufleet-lab")
MAX_LABS = 64
MAX_NODES = 256  # nodes of one lab: its network is a /23 (Lab.node_address)
CLUSTER_PREFIX = 23  # the nodes' network's prefix length (room for MAX_NODES)

# (Debian package, binary) the lab needs
REQUIREMENTS = [
    ("iproute2", "ip"), ("util-linux", "nsenter"), ("util-linux", "unshare"),
    ("openssh-server", "/usr/sbin/sshd"), ("openssh-client", "ssh-keygen"), ("openssh-client", "ssh"),
    ("podman", "podman"), ("runc", "runc"), ("busybox-static", "busybox"), ("sudo", "sudo"),
    # podman's bridge network (single-node runs' own network namespace, ports published by CNI's portmap)
    ("containernetworking-plugins", "/usr/lib/cni/bridge"), ("iptables", "/usr/sbin/iptables"),
    ("passwd", "useradd"), ("util-linux", "runuser"),  # runuser: gpu-burn started by hand as the lab's user
]


@dataclass
class LabHost:
    name: str  # namespace name
    role: str  # "gateway", "login" or "node"
    address: str
    hostname: str
    gpus: list[dict] = field(default_factory=list)

    @property
    def netns(self) -> str:
        return self.name


@dataclass
class Lab:
    dir: str
    index: int
    vendor: str
    gpus_per_node: int
    hosts: list[LabHost]
    hops: int = 1  # jump hops in front of the nodes: 1 (the login node) or 2 (a gateway, then the login node)

    @property
    def prefix(self) -> str:
        return f"gfl{self.index}"

    @property
    def run_dir(self) -> Path:
        return RUN_ROOT / str(self.index)

    @property
    def login(self) -> LabHost:
        return next(h for h in self.hosts if h.role == "login")

    @property
    def gateway(self) -> LabHost | None:
        """The host in front of the login node (``hops=2``), else None."""
        return next((h for h in self.hosts if h.role == "gateway"), None)

    @property
    def jump_hosts(self) -> list[LabHost]:
        """The hops to the nodes, in the order ssh goes through them."""
        return ([self.gateway] if self.gateway else []) + [self.login]

    @property
    def nodes(self) -> list[LabHost]:
        return [h for h in self.hosts if h.role == "node"]

    @property
    def cluster_network(self) -> str:
        """The nodes' network (a /23: room for MAX_NODES), reachable only through the login node."""
        return f"198.19.{2 * self.index}.0/{CLUSTER_PREFIX}"

    @property
    def cluster_gateway(self) -> str:
        """The login node's address on the nodes' network (their default route)."""
        return f"198.19.{2 * self.index}.1"

    def node_address(self, i: int) -> str:
        """Node ``i``'s address: .10 to .254 of the network's first /24, then .10 on of its second."""
        return f"198.19.{2 * self.index + i // 245}.{10 + i % 245}"

    @property
    def uplink_address(self) -> str:
        return f"198.18.{self.index}.1"

    @property
    def middle_network(self) -> str:
        """Between the gateway and the login node (``hops=2``): unreachable from this machine."""
        return f"198.18.{128 + self.index}"

    def host_dir(self, host: LabHost) -> Path:
        return self.run_dir / host.name

    def key(self, which: str) -> Path:
        return Path(self.dir) / "keys" / f"{which}_id_ed25519"

    @property
    def fleet_file(self) -> Path:
        return Path(self.dir) / "fleet.yml"

    def host_env(self, host: LabHost) -> dict[str, str]:
        """The environment a login on ``host`` gets (set by its sshd)."""
        d = self.host_dir(host)
        env = {
            "PATH": f"{d}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "CONTAINERS_CONF": str(d / "containers" / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(d / "containers" / "storage.conf"),
        }
        if host.role == "node":  # where the host's gpu-burn registers what it holds
            env[gputools.DRIVER_ENV] = str(gputools.driver_dir(d / "bin"))
        return env


def default_dir() -> Path:
    from gpufleet import paths

    return paths.home() / "lab"


def _run(cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise GpufleetError(f"lab: `{' '.join(cmd)}` failed: {(p.stderr or p.stdout).strip()}")
    return p


def preflight() -> None:
    if os.geteuid() != 0:
        raise UsageError("the lab needs root (it creates network namespaces, a user and sshd daemons): "
                         "run `sudo gpufleet lab up`")
    missing = sorted({pkg for pkg, binary in REQUIREMENTS
                      if not (os.path.exists(binary) if binary.startswith("/") else shutil.which(binary))})
    if missing:
        raise UsageError("the lab needs packages that are not installed: " + ", ".join(missing) +
                         f"\ninstall them with: apt-get update && apt-get install -y {' '.join(missing)}")


def _existing_netns() -> set[str]:
    p = _run(["ip", "netns", "list"], check=False)
    return {line.split()[0] for line in p.stdout.splitlines() if line.strip()}


def load(dir: Path) -> Lab | None:
    state = Path(dir) / "lab.json"
    if not state.exists():
        return None
    data = json.loads(state.read_text())
    data["hosts"] = [LabHost(**h) for h in data["hosts"]]
    return Lab(**data)


def _save(lab: Lab) -> None:
    path = Path(lab.dir) / "lab.json"
    path.write_text(json.dumps(asdict(lab), indent=2) + "\n")
    os.chmod(path, 0o600)


def is_up(lab: Lab) -> bool:
    netns = _existing_netns()
    return all(h.netns in netns and _sshd_pid(lab, h) for h in lab.hosts)


def _sshd_pid(lab: Lab, host: LabHost) -> int | None:
    try:
        pid = int((lab.host_dir(host) / "sshd.pid").read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def node_specs(vendor: str, gpus: int, node: int) -> list[GpuSpec]:
    """What GPUs lab node ``node`` gets. `mixed` rotates through vendors and a two-model node."""
    if vendor == "none" or gpus == 0:
        return []
    if vendor == "mixed":
        kinds = ["nvidia", "amd", "nvidia-mixed", "gaudi", "tenstorrent", "none"]
        vendor = kinds[node % len(kinds)]
        if vendor == "nvidia-mixed":
            half = max(gpus // 2, 1)
            return [GpuSpec("nvidia", "H100", half), GpuSpec("nvidia", "L40S", max(gpus - half, 1))]
        return node_specs(vendor, gpus, node)
    model = {"nvidia": ("nvidia", "H100"), "amd": ("amd", "MI300X"), "gaudi": ("intel", "Gaudi2"),
             "tenstorrent": ("tenstorrent", "n300")}[vendor]
    return [GpuSpec(model[0], model[1], gpus)]


def _world_readable(fn):
    """Run ``fn`` with umask 022: the lab's hosts read what it writes (CDI spec, stand-in tools,
    hosts, sshd_config) as the plain lab user, whatever umask the caller runs with (the CLI's is
    077). Files that hold keys are made 0600 explicitly."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        old = os.umask(0o022)
        try:
            return fn(*args, **kwargs)
        finally:
            os.umask(old)
    return wrapper


@_world_readable
def up(dir: Path, nodes: int = 2, gpus: int = 8, vendor: str = "nvidia", hops: int = 1, log=print) -> Lab:
    if vendor not in VENDORS:
        raise UsageError(f"--vendor must be one of {', '.join(VENDORS)}")
    if not 1 <= nodes <= MAX_NODES:
        raise UsageError(f"--nodes must be between 1 and {MAX_NODES}")
    if not 0 <= gpus <= 16:
        raise UsageError("--gpus must be between 0 and 16")
    if hops not in (1, 2):
        raise UsageError("--hops must be 1 (a login node) or 2 (a gateway, then a login node)")
    preflight()  # the arguments first: a wrong one is said as such, wherever this runs
    dir = Path(dir).absolute()
    existing = load(dir)
    if existing is not None:
        if is_up(existing) and existing.hops == hops:
            log(f"lab in {dir} is already up ({len(existing.nodes)} nodes); fleet: {existing.fleet_file}")
            return existing
        log(f"lab in {dir} has {existing.hops} hop(s), not {hops}; tearing it down first" if is_up(existing)
            else f"lab in {dir} is half up; tearing it down first")
        down(dir, log=lambda *_: None)
    dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(dir, 0o700)
    taken = {n[3:].split("-")[0] for n in _existing_netns() if n.startswith("gfl")}
    taken |= {p.name for p in RUN_ROOT.iterdir()} if RUN_ROOT.exists() else set()
    index = next((i for i in range(MAX_LABS) if str(i) not in taken), None)
    if index is None:
        raise GpufleetError(f"lab: {MAX_LABS} labs are up already; take one down first")
    lab = Lab(dir=str(dir), index=index, vendor=vendor, gpus_per_node=gpus, hosts=[], hops=hops)
    login_address = f"{lab.middle_network}.2" if hops == 2 else f"198.18.{index}.2"
    lab.hosts.append(LabHost(f"{lab.prefix}-login", "login", login_address, "login"))
    for i in range(nodes):
        lab.hosts.append(LabHost(f"{lab.prefix}-n{i}", "node", lab.node_address(i), f"node-{i}"))
    if hops == 2:  # last, so that nodes keep their numbers (node_index below)
        lab.hosts.append(LabHost(f"{lab.prefix}-gw", "gateway", f"198.18.{index}.2", "gateway"))
    _save(lab)  # saved first, so `down` can clean up whatever part of `up` ran
    try:
        log(f"creating lab {index}: {'gateway + ' if hops == 2 else ''}login node + {nodes} nodes "
            f"({vendor}, {gpus} GPUs each)")
        _ensure_user()
        _ensure_overlay_targets()
        _make_keys(lab)
        _make_network(lab)
        rootfs = _make_rootfs(lab)
        for i, host in enumerate(lab.hosts):
            _make_host(lab, host, i - 1)
        _save(lab)
        log("importing the busybox image into each node's podman storage")
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda h: _import_image(lab, h, rootfs), lab.nodes))
        for host in lab.hosts:
            _start_sshd(lab, host)
        _write_fleet(lab)
    except BaseException:
        down(dir, log=lambda *_: None)
        raise
    log(f"lab is up: {f'gateway {lab.gateway.address}, ' if lab.gateway else ''}"
        f"login node {lab.login.address}, nodes {', '.join(h.address for h in lab.nodes)}")
    log(f"fleet file: {lab.fleet_file}")
    return lab


def _ensure_user() -> None:
    if _run(["id", "-u", LAB_USER], check=False).returncode != 0:
        _run(["useradd", "--create-home", "--home-dir", f"/home/{LAB_USER}", "--shell", "/bin/sh", LAB_USER])
    # useradd leaves the account locked ('!'); sshd without PAM refuses locked accounts
    _run(["usermod", "-p", "*", LAB_USER])
    text = (f"# written by `gpufleet lab up`; removed by `gpufleet lab down`\n"
            f"Defaults:{LAB_USER} env_keep += \"CONTAINERS_CONF CONTAINERS_STORAGE_CONF {gputools.DRIVER_ENV}\"\n"
            f"{LAB_USER} ALL=(ALL) NOPASSWD: ALL\n")
    tmp = SUDOERS.with_name(".gpufleet-lab.tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o440)
    _run(["visudo", "-c", "-q", "-f", str(tmp)]) if shutil.which("visudo") else None
    os.replace(tmp, SUDOERS)


def _make_keys(lab: Lab) -> None:
    keys = Path(lab.dir) / "keys"
    keys.mkdir(exist_ok=True, mode=0o700)
    for which in ("gateway", "login", "node") if lab.hops == 2 else ("login", "node"):
        key = lab.key(which)
        if not key.exists():
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"gpufleet-lab-{which}", "-f", str(key)])
        os.chmod(key, 0o600)


def _make_network(lab: Lab) -> None:
    p = lab.prefix
    login = lab.login.netns
    first = lab.jump_hosts[0]  # the hop this machine reaches: the gateway, else the login node
    for h in lab.hosts:
        _run(["ip", "netns", "add", h.netns])
        _run(["ip", "-n", h.netns, "link", "set", "lo", "up"])
    # uplink: this machine <-> the first hop
    _run(["ip", "link", "add", f"{p}-up", "type", "veth", "peer", "name", f"{p}-upl"])
    _run(["ip", "link", "set", f"{p}-upl", "netns", first.netns, "name", "eth0"])
    _run(["ip", "addr", "add", f"{lab.uplink_address}/24", "dev", f"{p}-up"])
    _run(["ip", "link", "set", f"{p}-up", "up"])
    _run(["ip", "-n", first.netns, "addr", "add", f"{first.address}/24", "dev", "eth0"])
    _run(["ip", "-n", first.netns, "link", "set", "eth0", "up"])
    if lab.gateway:  # gateway <-> login node, a network this machine has no route to
        gw, mid = lab.gateway.netns, lab.middle_network
        _run(["ip", "link", "add", f"{p}-gwa", "type", "veth", "peer", "name", f"{p}-gwb"])
        _run(["ip", "link", "set", f"{p}-gwa", "netns", gw, "name", "eth1"])
        _run(["ip", "link", "set", f"{p}-gwb", "netns", login, "name", "eth0"])
        _run(["ip", "-n", gw, "addr", "add", f"{mid}.1/24", "dev", "eth1"])
        _run(["ip", "-n", gw, "link", "set", "eth1", "up"])
        _run(["ip", "-n", login, "addr", "add", f"{lab.login.address}/24", "dev", "eth0"])
        _run(["ip", "-n", login, "link", "set", "eth0", "up"])
        _run(["ip", "route", "replace", "unreachable", f"{mid}.0/24"])
    # the cluster network is reachable only through the login node; from here it is unreachable
    # (never routed out of this machine)
    _run(["ip", "route", "replace", "unreachable", lab.cluster_network])
    # cluster network: a bridge inside the login node, one veth per node
    _run(["ip", "-n", login, "link", "add", "br0", "type", "bridge"])
    _run(["ip", "-n", login, "addr", "add", f"{lab.cluster_gateway}/{CLUSTER_PREFIX}", "dev", "br0"])
    _run(["ip", "-n", login, "link", "set", "br0", "up"])
    for i, node in enumerate(lab.nodes):
        a, b = f"{p}n{i}a", f"{p}n{i}b"
        _run(["ip", "link", "add", a, "type", "veth", "peer", "name", b])
        _run(["ip", "link", "set", a, "netns", login])
        _run(["ip", "-n", login, "link", "set", a, "master", "br0", "up"])
        _run(["ip", "link", "set", b, "netns", node.netns, "name", "eth0"])
        _run(["ip", "-n", node.netns, "addr", "add", f"{node.address}/{CLUSTER_PREFIX}", "dev", "eth0"])
        _run(["ip", "-n", node.netns, "link", "set", "eth0", "up"])
        _run(["ip", "-n", node.netns, "route", "add", "default", "via", lab.cluster_gateway])


def _make_rootfs(lab: Lab) -> Path:
    """A busybox root filesystem as a tar, for `podman import`."""
    lab.run_dir.mkdir(parents=True, exist_ok=True)
    tar_path = lab.run_dir / "busybox-rootfs.tar"
    busybox = shutil.which("busybox")
    applets = _run([busybox, "--list"]).stdout.split()

    def add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.mode = tarfile.DIRTYPE, mode
        tar.addfile(info)

    with tarfile.open(tar_path, "w") as tar:
        for d in ("bin", "dev", "etc", "proc", "sys", "tmp", "root", "var", "run", "usr", "usr/bin"):
            add_dir(tar, d, 0o1777 if d == "tmp" else 0o755)
        tar.add(busybox, "bin/busybox")
        for applet in applets:
            if applet == "busybox":
                continue
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
        for name, text, mode in (("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", 0o644),
                                 ("etc/group", "root:x:0:\n", 0o644),
                                 ("usr/bin/gpu-burn", gputools.GPU_BURN, 0o755),  # a workload that makes GPUs busy
                                 ("usr/bin/openai-stub", OPENAI_STUB, 0o755),  # a model server (OpenAI's API)
                                 ("usr/bin/router-stub", ROUTER_STUB, 0o755)):  # SGLang's router, for its workers
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return tar_path


def _make_host(lab: Lab, host: LabHost, node_index: int) -> None:
    d = lab.host_dir(host)
    (d / "bin").mkdir(parents=True, exist_ok=True)
    for parent in [RUN_ROOT, lab.run_dir, d, d / "bin"]:
        os.chmod(parent, 0o755)
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", host.hostname, "-f", str(d / "ssh_host_ed25519_key")])
    key = lab.key(host.role)
    (d / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
    os.chmod(d / "authorized_keys", 0o644)
    env = lab.host_env(host)
    sftp = next((p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server")
                 if os.path.exists(p)), "internal-sftp")
    (d / "sshd_config").write_text("\n".join([
        f"# lab host {host.hostname} ({host.name}), written by `gpufleet lab up`",
        f"ListenAddress {host.address}:22",
        f"HostKey {d}/ssh_host_ed25519_key",
        f"PidFile {d}/sshd.pid",
        f"AuthorizedKeysFile {d}/authorized_keys",
        "UsePAM no", "StrictModes no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PermitRootLogin no", f"AllowUsers {LAB_USER}", "AllowTcpForwarding yes", "PrintMotd no",
        "SetEnv " + " ".join(f"{k}={v}" for k, v in env.items()),
        f"Subsystem sftp {sftp}", "",
    ]))
    names = "".join(f"{h.address}\t{h.hostname}\n" for h in lab.hosts)
    (d / "hosts").write_text(f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{names}")
    (d / "resolv.conf").write_text("# lab host: no DNS server\nnameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    if host.role == "node":
        host.gpus = write_standins(d / "bin", node_specs(lab.vendor, lab.gpus_per_node, node_index),
                                   host_index=lab.index * 1000 + node_index)
        _make_devices(d, host.gpus)
        conf = d / "containers"
        conf.mkdir(exist_ok=True)
        (conf / "containers.conf").write_text(
            "[containers]\n"
            'default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{d}/run/events.log"\n'
            f'tmp_dir = "{d}/run/libpod"\n'
            f'static_dir = "{d}/storage/libpod"\n'
            f'volume_path = "{d}/storage/volumes"\n')
        (conf / "storage.conf").write_text(
            "[storage]\n"
            'driver = "vfs"\n'
            f'runroot = "{d}/run/storage"\n'
            f'graphroot = "{d}/storage"\n')
        for sub in ("run", "storage"):
            (d / sub).mkdir(exist_ok=True, mode=0o700)


# Paths that each host sees its own version of (bind mounts in its mount namespace). They must
# exist on this machine to be mounted over; the lab creates the missing ones and removes them at the end.
HOST_OVERLAYS = {"/etc/cdi": "dir", "/dev/dri": "dir", "/dev/tenstorrent": "dir", "/dev/kfd": "chr"}
CREATED_LIST = Path("/var/lib/gpufleet-lab.created")


def _ensure_overlay_targets() -> None:
    created = set(CREATED_LIST.read_text().split()) if CREATED_LIST.exists() else set()
    for path, kind in HOST_OVERLAYS.items():
        if os.path.lexists(path):
            continue
        if kind == "dir":
            os.makedirs(path, mode=0o755)
        else:
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        created.add(path)
    CREATED_LIST.write_text("\n".join(sorted(created)) + "\n")


def _remove_overlay_targets() -> None:
    if not CREATED_LIST.exists():
        return
    for path in CREATED_LIST.read_text().split():
        try:
            os.rmdir(path) if os.path.isdir(path) else os.unlink(path)
        except OSError:
            pass
    CREATED_LIST.unlink()


def _make_devices(d: Path, gpus: list[dict]) -> None:
    """Device nodes for the host's simulated GPUs (char 1,3: reads like /dev/null), and a CDI spec for
    its NVIDIA GPUs naming each by index and UUID, as `nvidia-ctk cdi generate` does."""
    dev = d / "dev"
    for sub in ("cdi", "dev/dri", "dev/tenstorrent"):
        (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d / sub, 0o755)

    def node(path: Path) -> str:
        if not path.exists():
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        return str(path)

    node(dev / "kfd")
    nvidia = [g for g in gpus if g["vendor"] == "nvidia"]
    devices = []
    for g in nvidia:
        edits = {"deviceNodes": [{"path": f"/dev/nvidia{g['index']}", "hostPath": node(dev / f"nvidia{g['index']}")}]}
        devices += [{"name": str(g["index"]), "containerEdits": edits}, {"name": g["uuid"], "containerEdits": edits}]
    for g in [g for g in gpus if g["vendor"] == "amd"]:
        node(dev / "dri" / f"renderD{128 + g['index']}")
    for g in [g for g in gpus if g["vendor"] == "tenstorrent"]:
        node(dev / "tenstorrent" / str(g["index"]))
    spec = d / "cdi" / "nvidia.json"
    if nvidia:
        common = [{"path": p, "hostPath": node(dev / p.rsplit("/", 1)[1])}
                  for p in ("/dev/nvidiactl", "/dev/nvidia-uvm")]
        devices.append({"name": "all", "containerEdits": {"deviceNodes": [
            e for d_ in devices if d_["name"].isdigit() for e in d_["containerEdits"]["deviceNodes"]]}})
        # the driver's state goes into every container given a GPU, as nvidia-ctk's specs mount the
        # driver's files (read-only): gpu-burn registers what it holds in holders/ (writable), and the
        # host's nvidia-smi reads it there
        driver = gputools.driver_dir(d / "bin")
        mounts = [{"hostPath": str(driver), "containerPath": gputools.CONTAINER_DRIVER_DIR,
                   "options": ["ro", "nosuid", "nodev", "bind"]},
                  {"hostPath": str(driver / "holders"), "containerPath": f"{gputools.CONTAINER_DRIVER_DIR}/holders",
                   "options": ["rw", "nosuid", "nodev", "noexec", "bind"]}]
        spec.write_text(json.dumps({"cdiVersion": "0.5.0", "kind": "nvidia.com/gpu", "devices": devices,
                                    "containerEdits": {"deviceNodes": common, "mounts": mounts}},
                                   indent=2) + "\n")
    else:
        spec.unlink(missing_ok=True)


def _host_mounts(lab: Lab, host: LabHost) -> list[tuple[str, str]]:
    d = lab.host_dir(host)
    mounts = [(str(d / "hosts"), "/etc/hosts"), (str(d / "resolv.conf"), "/etc/resolv.conf")]
    if host.role == "node":
        mounts += [(str(d / "cdi"), "/etc/cdi"), (str(d / "dev" / "dri"), "/dev/dri"),
                   (str(d / "dev" / "tenstorrent"), "/dev/tenstorrent"),
                   # podman's network namespaces of its containers: the host's own, gone with it
                   (str(d / "netns"), "/run/netns")]
        if any(g["vendor"] == "amd" for g in host.gpus):
            mounts.append((str(d / "dev" / "kfd"), "/dev/kfd"))
    return mounts


def _import_image(lab: Lab, host: LabHost, rootfs: Path) -> None:
    env = {**os.environ, **lab.host_env(host)}
    _run(["podman", "import", "--quiet", str(rootfs), LAB_IMAGE], env=env)


def _anchor(lab: Lab, host: LabHost) -> int:
    """The process that holds ``host``'s namespaces (made now if there is none): its own UTS
    namespace (its hostname) and mount namespace (its /etc/hosts and resolv.conf: without them sudo
    waits for DNS that is not there), in the host's network namespace. It outlives the host's sshd,
    as a real host's mounts outlive a restart of its sshd: podman's network namespaces of running
    containers are mounts in it (/run/netns/...), and a host whose sshd came back in a new mount
    namespace could no longer list its containers."""
    d = lab.host_dir(host)
    pid_file = d / "anchor.pid"
    try:
        pid = int(pid_file.read_text())
        if Path(f"/proc/{pid}/comm").read_text().strip() == "sleep":
            return pid
    except (OSError, ValueError):
        pass
    mounts = _host_mounts(lab, host)
    for src, _ in mounts:
        if src.endswith("/netns"):
            os.makedirs(src, exist_ok=True)
    binds = "".join(f"mount --bind {shlex.quote(src)} {shlex.quote(dst)} && " for src, dst in mounts)
    script = f'mount --make-rprivate / && {binds}hostname "$1" && exec sleep infinity'
    # the network namespace first (its name is under /run/netns, which the host then gets its own of)
    proc = subprocess.Popen(["nsenter", f"--net=/var/run/netns/{host.netns}", "--",
                             "unshare", "--uts", "--mount", "--propagation", "private", "--", "sh", "-c", script,
                             "sh", host.hostname],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    for _ in range(200):  # nsenter, unshare and sh each exec the next: the pid ends as the sleep
        try:
            if Path(f"/proc/{proc.pid}/comm").read_text().strip() == "sleep":
                pid_file.write_text(str(proc.pid))
                return proc.pid
        except OSError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.025)
    raise GpufleetError(f"lab: the namespaces of {host.hostname} could not be made")


def _start_sshd(lab: Lab, host: LabHost) -> None:
    d = lab.host_dir(host)
    os.makedirs("/run/sshd", exist_ok=True)
    anchor = _anchor(lab, host)
    _run(["nsenter", f"--target={anchor}", "--mount", "--uts", "--net", "--",
          "/usr/sbin/sshd", "-f", str(d / "sshd_config"), "-E", str(d / "sshd.log")])
    for _ in range(100):
        if _sshd_pid(lab, host):
            return
        time.sleep(0.05)
    raise GpufleetError(f"lab: sshd on {host.hostname} did not start: see {d / 'sshd.log'}")


def host_exec(lab: Lab, host: LabHost, cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """Run ``cmd`` as root inside ``host`` (its network, mount and UTS namespaces)."""
    pid = _sshd_pid(lab, host)
    if pid is None:
        raise GpufleetError(f"lab: {host.hostname} is not running")
    env = {**os.environ, **lab.host_env(host)}
    return _run(["nsenter", f"--target={pid}", "--net", "--mount", "--uts", "--"] + cmd, env=env, **kw)


def node(lab: Lab, number: int) -> LabHost:
    """Lab node ``number`` (node-N, counted from 0)."""
    nodes = lab.nodes
    if not 0 <= number < len(nodes):
        raise UsageError(f"the lab has nodes 0 to {len(nodes) - 1}, not {number}")
    return nodes[number]


@_world_readable
def fault(lab: Lab, host: LabHost, gpu: int, kind: str | None) -> None:
    """Make GPU ``gpu`` (the vendor tool's index) of lab node ``host`` report a simulated hardware
    fault in nvidia-smi's health fields (gputools.FAULT_KINDS), or clear it (``kind=None``)."""
    try:
        gputools.set_fault(lab.host_dir(host) / "bin", gpu, kind)
    except ValueError as e:
        raise UsageError(f"lab: {host.hostname}: {e}") from None
    except OSError as e:
        raise GpufleetError(f"lab: {host.hostname}: cannot mark the GPU ({e.strerror}): the lab's files are root's; "
                            "run it with sudo") from None


@dataclass
class GpuBurn:
    """A gpu-burn started by hand on a lab host, outside gpufleet (as a stray job)."""
    process: subprocess.Popen
    token: str
    pid: int  # the gpu-burn's PID (the host's: lab hosts share this machine's PID namespace)

    def stop(self, timeout: float = 10) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _descends(pid: int, ancestor: int) -> bool:
    for _ in range(8):
        if pid == ancestor:
            return True
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
        pid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
    return False


def start_gpu_burn(lab: Lab, host: LabHost, *args: str, timeout: float = 10) -> GpuBurn:
    """Start ``gpu-burn ARGS`` on lab node ``host`` as the lab's plain user, in the host's namespaces
    with the environment a login there gets, as a person would by hand; return once it holds its
    GPUs (it has registered with the host's GPU driver directory)."""
    anchor = _sshd_pid(lab, host)
    if anchor is None:
        raise GpufleetError(f"lab: {host.hostname} is not running")
    env = lab.host_env(host)
    holders = Path(env[gputools.DRIVER_ENV]) / "holders"
    before = set(os.listdir(holders))
    cmd = ["nsenter", f"--target={anchor}", "--net", "--mount", "--uts", "--",
           "runuser", "-u", LAB_USER, "--", "env", "-i", f"HOME=/home/{LAB_USER}", f"USER={LAB_USER}",
           *(f"{k}={v}" for k, v in env.items()), "gpu-burn", *args]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for token in set(os.listdir(holders)) - before:
            if token.startswith(gputools.HOLDER_PREFIX):  # on the host, the $$ it recorded is the host's PID
                record = (holders / token).read_text().splitlines()
                pid = int(next(x for x in record if x.startswith("pid "))[4:])
                if _descends(pid, proc.pid):  # not one that something else started meanwhile
                    return GpuBurn(proc, token, pid)
        if proc.poll() is not None:
            raise GpufleetError(f"lab: gpu-burn on {host.hostname} exited {proc.returncode}: {proc.stdout.read()}")
        time.sleep(0.05)
    GpuBurn(proc, "", 0).stop()
    raise GpufleetError(f"lab: gpu-burn on {host.hostname} did not register in {timeout:.0f}s")


def _proxy_jump(lab: Lab) -> dict | list[dict]:
    """dstack's one ``proxy_jump`` mapping for one hop; gpufleet's list of hops, in order, for two."""
    hops = [{"hostname": h.address, "user": LAB_USER, "identity_file": str(lab.key(h.role))} for h in lab.jump_hosts]
    return hops[0] if len(hops) == 1 else hops


def _write_fleet(lab: Lab) -> None:
    fleet = {
        "type": "fleet",
        "name": fleet_name(lab),
        "ssh_config": {
            "user": LAB_USER,
            "identity_file": str(lab.key("node")),
            "proxy_jump": _proxy_jump(lab),
            "hosts": [h.address for h in lab.nodes],
        },
        "blocks": "auto",
        "placement": "cluster",
    }
    header = "# The local lab's fleet, written by `gpufleet lab up`. Apply it with:\n" \
             f"#   gpufleet apply -f {lab.fleet_file}\n"
    lab.fleet_file.write_text(header + yaml.safe_dump(fleet, sort_keys=False))


def stop_sshd(lab: Lab, host: LabHost) -> None:
    """Stop one host's sshd and every ssh session on it, as a host going down would
    (tests use this to take a host down; `start_sshd` brings it back)."""
    pid = _sshd_pid(lab, host)
    if pid:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not _sshd_pid(lab, host):
                break
            time.sleep(0.05)
    if host.netns in _existing_netns():
        for other in _run(["ip", "netns", "pids", host.netns], check=False).stdout.split():
            try:
                if Path(f"/proc/{other}/comm").read_text().strip() == "sshd":
                    os.kill(int(other), signal.SIGKILL)
            except (OSError, ValueError):
                pass


@_world_readable
def start_sshd(lab: Lab, host: LabHost) -> None:
    if not _sshd_pid(lab, host):
        _start_sshd(lab, host)


@_world_readable
def rotate_host_key(lab: Lab, host: LabHost) -> None:
    """Give ``host`` a new host key, as a reinstalled (or impersonated) server would have."""
    d = lab.host_dir(host)
    stop_sshd(lab, host)
    for f in ("ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"):
        (d / f).unlink(missing_ok=True)
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", host.hostname, "-f", str(d / "ssh_host_ed25519_key")])
    _start_sshd(lab, host)


def fleet_name(lab: Lab) -> str:
    return "lab" if lab.index == 0 else f"lab{lab.index}"


def _forget_host_keys(lab: Lab) -> None:
    """The next lab on these addresses has new host keys: drop this lab's keys from its fleet's
    known_hosts, so that re-applying the lab fleet is not refused as a changed key."""
    from gpufleet.paths import FleetFiles

    known_hosts = FleetFiles.of(fleet_name(lab)).known_hosts
    if known_hosts.exists():
        for host in lab.hosts:
            _run(["ssh-keygen", "-R", host.address, "-f", str(known_hosts)], check=False)
        Path(f"{known_hosts}.old").unlink(missing_ok=True)


def down(dir: Path, log=print) -> bool:
    """Remove every namespace, process and file the lab in ``dir`` made. Harmless when nothing is up."""
    dir = Path(dir).absolute()
    lab = load(dir)
    if lab is None:
        log(f"no lab in {dir}: nothing to do")
        return False
    netns = _existing_netns()
    for host in lab.nodes:
        if _sshd_pid(lab, host):
            host_exec(lab, host, ["podman", "rm", "--all", "--force", "--time", "0"], check=False, timeout=120)
    for host in lab.hosts:
        stop_sshd(lab, host)
        if host.netns in netns:
            for pid in _run(["ip", "netns", "pids", host.netns], check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _run(["ip", "netns", "del", host.netns], check=False)
    _run(["ip", "link", "del", f"{lab.prefix}-up"], check=False)
    _run(["ip", "route", "del", "unreachable", lab.cluster_network], check=False)
    if lab.hops == 2:
        _run(["ip", "route", "del", "unreachable", f"{lab.middle_network}.0/24"], check=False)
    if lab.run_dir.exists():
        # podman may leave read-only or immutable-looking files; make them writable first
        subprocess.run(["chmod", "-R", "u+w", str(lab.run_dir)], capture_output=True)
        shutil.rmtree(lab.run_dir, ignore_errors=True)
    _forget_host_keys(lab)
    for name in ("lab.json", "fleet.yml"):
        (dir / name).unlink(missing_ok=True)
    shutil.rmtree(dir / "keys", ignore_errors=True)
    try:
        dir.rmdir()
    except OSError:
        pass
    if RUN_ROOT.exists() and not any(RUN_ROOT.iterdir()):
        RUN_ROOT.rmdir()
        _remove_overlay_targets()
        SUDOERS.unlink(missing_ok=True)
        _run(["userdel", "--remove", LAB_USER], check=False)
    log(f"lab {lab.index} in {dir} is down")
    return True
