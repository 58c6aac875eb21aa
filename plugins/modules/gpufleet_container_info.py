# Copyright (c) 2026 gpufleet contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
# SPDX-License-Identifier: Apache-2.0
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
from ansible.module_utils.basic import AnsibleModule  # noqa: E402

# One copy of the runtime's command lines and of the inspect parsing, plugins/module_utils/gpufleet_inspect.py;
# the workload role's module_utils/gpufleet_inspect.py links to it (see gpufleet_container).
try:
    from ansible.module_utils import gpufleet_inspect  # noqa: E402
except ImportError:
    from ansible_collections.gpufleet.fleet.plugins.module_utils import gpufleet_inspect  # noqa: E402

# what each item of `containers` holds (RETURN)
CONTAINER_KEYS = ("name", "id", "state", "exit_code", "run_id", "labels", "started_at", "finished_at")


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

    def execute(script):
        # never expand $VARS or ~ (run_command does by default): the script is gpufleet_inspect's own
        return module.run_command(["/bin/sh", "-c", script], expand_user_and_vars=False)

    found, error = gpufleet_inspect.list_containers(execute, [binary])
    if error is not None:
        module.fail_json(msg=error)
    containers = [dict((key, c[key]) for key in CONTAINER_KEYS) for c in found]
    containers = [c for c in containers if c["run_id"] is not None and (not wanted or c["name"] in wanted)]
    module.exit_json(changed=False, containers=sorted(containers, key=lambda c: c["name"]))


if __name__ == "__main__":
    main()
