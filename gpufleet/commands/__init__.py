"""The commands of the CLI, one module each (as pip's _internal/commands): each ``register``s its
parser and a ``run(args, console) -> exit code``. Imports of the heavy parts happen inside ``run``,
so `gpufleet --help` and a bad argument stay fast."""

from __future__ import annotations

from gpufleet.commands import (
    apply,
    attach,
    events,
    fleet,
    inventory,
    lab,
    login,
    logout,
    logs,
    metrics,
    project,
    ps,
    quota,
    server,
    stop,
    usage,
    user,
    whoami,
)

COMMANDS = (apply, ps, logs, stop, attach, events, fleet, inventory, login, logout, whoami, user, project, quota,
            usage, metrics, server, lab)


def register_all(sub) -> None:
    for command in COMMANDS:
        command.register(sub)
