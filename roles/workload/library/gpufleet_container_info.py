"""gpufleet_container_info: list the gpufleet workload containers on a host (podman or docker).

Runs on the target host: Python 3.8+, standard library and ansible.module_utils only. Read only.
"""

DOCUMENTATION = r"""
---
module: gpufleet_container_info
short_description: List gpufleet workload containers and their states and exit codes
description:
  - Lists every container that carries the label C(gpufleet.run_id) (all gpufleet workload
    containers, running or not), with C(<runtime> ps -a --filter label=gpufleet.run_id), then reads
    each one's state and exit code with C(<runtime> container inspect).
  - Never changes the host.
version_added: "0.1.0"
author: gpufleet (@gpufleet)
options:
  runtime:
    description: The container runtime to ask (found on the PATH).
    type: str
    choices: [podman, docker]
    default: podman
  names:
    description: Only these containers (exact names). Empty lists them all.
    type: list
    elements: str
    default: []
notes:
  - Supports check mode; it only reads.
  - The runtime is run as the user the task runs as; use C(become) for rootful podman or docker.
"""

EXAMPLES = r"""
- name: List the host's gpufleet containers
  gpufleet_container_info:
  become: true
  register: info

- name: One job's exit code
  gpufleet_container_info:
    runtime: docker
    names: [job-7f3a]
  register: info

- ansible.builtin.debug:
    msg: "{{ info.containers | map(attribute='exit_code') | list }}"
"""

RETURN = r"""
containers:
  description: The gpufleet containers, sorted by name.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: The container's name.
      type: str
      sample: job-7f3a
    id:
      description: The container's id.
      type: str
    state:
      description:
        - C(running), C(exited) or C(created); other runtime states (C(paused), C(restarting),
          C(removing), C(dead)) as the runtime names them. podman's C(stopped) is reported as
          C(exited), C(configured) and C(initialized) as C(created).
      type: str
      sample: exited
    exit_code:
      description: The exit code once it has exited (C(exited), C(dead)), else null.
      type: int
      sample: 3
    run_id:
      description: Its C(gpufleet.run_id) label.
      type: str
      sample: 7f3a0c
    labels:
      description: All its labels.
      type: dict
      sample: {gpufleet.run_id: 7f3a0c}
    started_at:
      description: When it started (the runtime's timestamp), null if never.
      type: str
      sample: "2025-05-01T10:00:00.123456789Z"
    finished_at:
      description: When it exited, null if it has not.
      type: str
      sample: "2025-05-01T10:07:12.5Z"
"""

# Ansible wants the imports after DOCUMENTATION, EXAMPLES and RETURN.
import json  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

# One copy of the inspect parsing, in the role's module_utils; from the gpufleet.fleet collection
# the same file is plugins/module_utils/gpufleet_inspect.py (see gpufleet_container).
try:
    from ansible.module_utils import gpufleet_inspect  # noqa: E402
except ImportError:
    from ansible_collections.gpufleet.fleet.plugins.module_utils import gpufleet_inspect  # noqa: E402

RUN_ID_LABEL = gpufleet_inspect.RUN_ID_LABEL

PS_FORMAT = {"podman": "json", "docker": "{{json .}}"}  # podman: one JSON list; docker: one object a line
# what each item of `containers` holds (RETURN)
CONTAINER_KEYS = ("name", "id", "state", "exit_code", "run_id", "labels", "started_at", "finished_at")


# --------------------------------------------------------------------------- inspect (module_utils/gpufleet_inspect.py)

def container_from_inspect(data):
    full = gpufleet_inspect.container_from_inspect(data)
    return dict((key, full[key]) for key in CONTAINER_KEYS)


def parse_ps(text):
    """[(id, [names])] from `podman ps --format json` (a list) or docker's `--format '{{json .}}'` (lines)."""
    text = text.strip()
    if not text:
        return []
    if text.startswith("["):
        items = json.loads(text)
    else:
        items = [json.loads(line) for line in text.splitlines() if line.strip()]
    out = []
    for item in items or []:
        ident = item.get("Id") or item.get("ID")
        names = item.get("Names") or []
        if isinstance(names, str):  # docker: "a,b"
            names = [n for n in names.split(",") if n]
        if ident:
            out.append((ident, [n.lstrip("/") for n in names]))
    return out


def main():
    module = AnsibleModule(
        argument_spec=dict(
            runtime=dict(type="str", choices=["podman", "docker"], default="podman"),
            names=dict(type="list", elements="str", default=[]),
        ),
        supports_check_mode=True,
    )
    runtime = module.params["runtime"]
    wanted = set(module.params["names"] or [])
    binary = module.get_bin_path(runtime, required=True)

    rc, out, err = module.run_command([binary, "ps", "--all", "--no-trunc", "--filter", "label=" + RUN_ID_LABEL,
                                       "--format", PS_FORMAT[runtime]], expand_user_and_vars=False)
    if rc != 0:
        module.fail_json(msg=f"{runtime} ps failed: {(err or out).strip()}", rc=rc)
    try:
        listed = parse_ps(out)
    except ValueError:
        module.fail_json(msg=f"cannot read the output of {runtime} ps: {out[:500]}")
    ids = [ident for ident, names in listed if not wanted or wanted & set(names)]

    def inspect(idents):
        rc, out, err = module.run_command([binary, "container", "inspect"] + idents, expand_user_and_vars=False)
        if rc != 0:
            return None
        try:
            return json.loads(out) or []
        except ValueError:
            module.fail_json(msg=f"cannot read the output of {runtime} container inspect: {out[:500]}")

    found = inspect(ids) if ids else []
    if found is None:  # one of them went away in between: ask one by one, skip the missing ones
        found = []
        for ident in ids:
            found += inspect([ident]) or []
    containers = [container_from_inspect(data) for data in found]
    containers = [c for c in containers if c["run_id"] is not None and (not wanted or c["name"] in wanted)]
    module.exit_json(changed=False, containers=sorted(containers, key=lambda c: c["name"]))


if __name__ == "__main__":
    main()
