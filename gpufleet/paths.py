"""Where gpufleet keeps its files: the state directory, each fleet's files, and the shipped Ansible content."""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gpufleet.errors import GpufleetError


def home() -> Path:
    """The state directory: $GPUFLEET_HOME, else ~/.gpufleet. Created 0700."""
    path = Path(os.environ.get("GPUFLEET_HOME") or Path.home() / ".gpufleet").expanduser().absolute()
    ensure_private_dir(path)
    return path


def ensure_private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def read_private_file(path: Path, what: str, remake: str, limit: int, exposed: str = "") -> bytes | None:
    """The bytes of a private file (at most ``limit`` + 1 of them), None if it does not exist. One
    other users may open, or not a plain file, is an error saying what to do: ``remake`` (how to get
    a good one), ``exposed`` (what to do besides chmod when others could read it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise GpufleetError(f"cannot read the {what} file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise GpufleetError(f"the {what} file {path} is not a regular file: {remake}")
        if st.st_mode & 0o077:
            raise GpufleetError(f"the {what} file {path} is open to other users (mode "
                                f"{stat.S_IMODE(st.st_mode):04o}): run chmod 600 {path}{exposed}")
        return os.read(fd, limit + 1)
    finally:
        os.close(fd)


def replace_private_file(path: Path, text: str, what: str) -> None:
    """Write ``text`` to ``path``, 0600 whatever the umask, atomically: in full under another name,
    then renamed over the old file (a reader sees the old file or the new one, never half of one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        raise GpufleetError(f"cannot write the {what} file {path}: {e.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)


def content_root() -> Path:
    """The folder holding playbooks/, roles/ and inventory_templates/: $GPUFLEET_CONTENT_DIR, else the
    copy an installed wheel carries in the package (gpufleet/_content, see setup.py), else the top level
    of the checkout this package runs from (an editable install)."""
    env = os.environ.get("GPUFLEET_CONTENT_DIR")
    if env:
        return Path(env)
    packaged = importlib.resources.files("gpufleet") / "_content"
    if packaged.is_dir():  # a wheel is installed unpacked: a real folder that ansible-playbook can read
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent


def playbook(name: str) -> Path:
    return content_root() / "playbooks" / f"{name}.yml"


def control_dir() -> Path:
    """Where ssh's multiplexing sockets go. A socket path must fit in 108 bytes: this folder, a
    9-character folder per fleet, %C's 40 characters and the 17 ssh adds while it creates the
    socket. So a state directory with a long path gets a short folder under /tmp instead."""
    path = home() / "cp"
    if len(str(path)) > 40:
        digest = hashlib.sha1(str(home()).encode()).hexdigest()[:10]
        path = Path(tempfile.gettempdir()) / f"gpufleet-{os.getuid()}-{digest}"
        path.mkdir(mode=0o700, exist_ok=True)
        st = path.lstat()
        if st.st_uid != os.getuid() or not stat.S_ISDIR(st.st_mode):
            raise PermissionError(f"{path} is not a folder owned by this user; remove it")
    return ensure_private_dir(path)


@dataclass(frozen=True)
class FleetFiles:
    """The one owner of a fleet's folder layout: the generated inventory, ssh_config and known_hosts,
    and the folder of its multiplexed ssh connections."""

    name: str
    dir: Path

    @classmethod
    def of(cls, name: str) -> FleetFiles:
        """The fleet's files in the state directory (nothing is created)."""
        return cls(name, home() / "fleets" / name)

    @property
    def inventory(self) -> Path:
        return self.dir / "inventory.yml"

    @property
    def ssh_config(self) -> Path:
        return self.dir / "ssh_config"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def control_dir(self) -> Path:
        """Each fleet multiplexes its own connections: a master opened with another fleet's key or
        known_hosts is never reused for this one. Short (a hash) so socket paths fit in 108 bytes."""
        digest = hashlib.sha1(self.name.encode()).hexdigest()[:8]
        return ensure_private_dir(control_dir() / digest)

    def create(self) -> None:
        """Make the folder (private) and an empty known_hosts."""
        if self.dir.parent == home() / "fleets":
            ensure_private_dir(self.dir.parent)
        ensure_private_dir(self.dir)
        if not self.known_hosts.exists():
            self.known_hosts.touch(mode=0o600)

    def require(self) -> FleetFiles:
        """These files, or an error saying how to make them."""
        if not self.inventory.exists():
            raise GpufleetError(f"fleet {self.name} has no inventory: re-apply it (gpufleet apply -f FLEET.yml)")
        return self
