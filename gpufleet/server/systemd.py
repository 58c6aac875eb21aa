"""A systemd service unit that runs `gpufleet server` as a machine's shared control plane.

The unit is hardened only as far as the server's work allows: it runs ansible-playbook and ssh (and
through them podman or docker on the hosts), writes only its state directory and the user's home
(Ansible's ~/.ansible), and needs no new privileges. Paths are quoted the way systemd unquotes
them, so a state directory with spaces, quotes or a % works.
"""

from __future__ import annotations

import re
from pathlib import Path

from gpufleet.errors import UsageError

UNIT_NAME = "gpufleet-server.service"
STOP_TIMEOUT = 60  # seconds for the server to finish the container starts and stops in flight
# what systemd's User= accepts without surprises (a name or a numeric id, no specifiers)
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\$?")


def unit(exe: str, home: Path, user: str, config: Path | None = None) -> str:
    """The unit's text: ``exe`` (the gpufleet command, an absolute path) runs ``server`` as ``user``
    with the state directory ``home`` (and ``--config config`` when given)."""
    if not Path(exe).is_absolute():
        raise UsageError(f"the gpufleet command must be given by its absolute path in a systemd unit, not {exe!r}")
    if not _USER.fullmatch(user):
        raise UsageError(f"{user!r} is not a user name systemd accepts")
    command = [_quote(exe), "server"]  # the program's path is taken as is: no $ expansion there
    if config is not None:
        command += ["--config", _arg_quote(str(config.absolute()))]
    return "\n".join([
        "[Unit]",
        "Description=gpufleet control plane (gpufleet server)",
        "Wants=network-online.target",
        # ordered after a PostgreSQL on this machine when there is one; it is not pulled in
        "After=network-online.target postgresql.service",
        "",
        "[Service]",
        "Type=simple",
        f"User={user}",
        f"Environment={_quote('GPUFLEET_HOME=' + str(home.absolute()))}",
        f"ExecStart={' '.join(command)}",
        "Restart=on-failure",
        "RestartSec=2",
        "KillSignal=SIGTERM",
        # SIGTERM to the server only: it stops its loops and lets its ansible-playbook children end;
        # what is left when it has exited (or after the timeout) is killed
        "KillMode=mixed",
        f"TimeoutStopSec={STOP_TIMEOUT}",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ProtectSystem=full",
        "UMask=0077",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])


def _quote(value: str) -> str:
    """One word as systemd reads it: in double quotes, with backslash escapes, % doubled (specifiers)."""
    if any(ord(c) < 0x20 or c == "\x7f" for c in value):
        raise UsageError(f"{value!r} holds a control character (a newline?), which a systemd unit cannot carry")
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{escaped}"'


def _arg_quote(value: str) -> str:
    """An argument in ExecStart=, where $ also starts a variable and must be doubled."""
    return _quote(value).replace("$", "$$")
