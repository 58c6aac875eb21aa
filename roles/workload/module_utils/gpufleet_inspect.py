"""What gpufleet_container and gpufleet_container_info share: reading `podman|docker container inspect`.

Runs on the target host inside those modules: standard library only, Python 3.8 syntax.
The modules import it as ``ansible.module_utils.gpufleet_inspect`` when the role is used from a
roles path, and as ``ansible_collections.gpufleet.fleet.plugins.module_utils.gpufleet_inspect``
(a link to this file) when they run from the gpufleet.fleet collection.
"""

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
