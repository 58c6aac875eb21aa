"""Where gpufleet keeps its files: the state directory and the shipped Ansible content."""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import stat
import tempfile
from pathlib import Path


def home() -> Path:
    """The state directory: $GPUFLEET_HOME, else ~/.gpufleet. Created 0700."""
    path = Path(os.environ.get("GPUFLEET_HOME") or Path.home() / ".gpufleet").expanduser().absolute()
    ensure_private_dir(path)
    return path


def ensure_private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


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


def fleet_dir(name: str) -> Path:
    return ensure_private_dir(ensure_private_dir(home() / "fleets") / name)


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
