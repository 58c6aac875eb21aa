"""Environment variables as dstack writes them, for fleets and runs alike."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator

ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

EnvSpec = dict[str, str | int | float | bool | None] | list[str] | None


def _names(v: Any) -> Any:
    names = v.keys() if isinstance(v, dict) else [item.split("=", 1)[0] for item in (v or [])]
    for name in names:
        if not ENV_NAME_RE.match(str(name)):
            raise ValueError(f"{name!r} is not a valid environment variable name")
    return v


# a mapping, or a KEY=VALUE list; a name without a value is a secret
Env = Annotated[EnvSpec, AfterValidator(_names)]


def split_env(env: EnvSpec) -> tuple[dict[str, str], list[str]]:
    """``env`` as dstack writes it (a mapping, or a ``KEY=VALUE`` list) -> (values, secret names).

    A name given without a value (``- HF_TOKEN`` in the list, ``HF_TOKEN:`` with nothing after it
    in the mapping) is a secret: its value is read from the environment of the gpufleet process
    when a run starts, passed to the host without being written to state, logs or artifacts, and
    never shown.
    """
    values: dict[str, str] = {}
    secrets: list[str] = []
    items = env.items() if isinstance(env, dict) else (
        (item.split("=", 1)[0], item.split("=", 1)[1] if "=" in item else None) for item in (env or []))
    for name, value in items:
        if value is None:
            secrets.append(name)
            values.pop(name, None)
        else:
            values[name] = str(value).lower() if isinstance(value, bool) else str(value)
            if name in secrets:
                secrets.remove(name)
    return values, secrets
