# Copyright (c) 2026 gpufleet contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
# SPDX-License-Identifier: Apache-2.0
"""gpufleet.fleet.fleet: a gpufleet fleet file as an Ansible inventory source.

Everything about fleets (the schema, its validation, the connection plan, the generated ssh_config
and inventory, the state store) lives in the gpufleet Python package; this plugin only calls it and
hands the result to Ansible. It needs gpufleet importable in the Python that runs Ansible.
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
name: fleet
short_description: A gpufleet fleet file (dstack's SSH-fleet schema) as an inventory
version_added: "1.0.0"
author: gpufleet (@gpufleet)
description:
  - Reads a gpufleet fleet file with the gpufleet Python package (the same validation and error
    messages as C(gpufleet apply)), writes the fleet's C(ssh_config) and C(known_hosts) into
    gpufleet's state folder (C($GPUFLEET_HOME/fleets/NAME), default C(~/.gpufleet)), exactly as
    C(gpufleet inventory -f FILE) does, and returns the fleet's hosts.
  - Every host carries the connection settings of the generated inventory (C(ansible_ssh_common_args)
    C(-F <ssh_config>), with the jump hosts, keys and multiplexing; host-key checking on, with
    C(StrictHostKeyChecking accept-new) and the fleet's own C(known_hosts)) and gpufleet's variables
    (C(gpufleet_fleet), C(gpufleet_hostname), C(gpufleet_port), C(gpufleet_blocks), ...).
  - "Groups: C(fleet_NAME) for the fleet (NAME with characters other than letters, digits and C(_)
    replaced by C(_)). When the fleet has been applied (C(gpufleet apply)), also one group per GPU
    vendor (C(gpu_vendor_nvidia), C(gpu_vendor_amd), C(gpu_vendor_intel), C(gpu_vendor_tenstorrent))
    and per GPU model (C(gpu_model_h100), C(gpu_model_mi300x), ...) from the probe results in
    gpufleet's state database, and each host's container runtime (C(gpufleet_runtime),
    C(gpufleet_runtime_become)). Without that state, only the fleet group."
  - "A fleet file is an inventory source when it holds C(plugin: gpufleet.fleet.fleet) (the default
    C(auto) inventory plugin then hands it to this one), or when this plugin is enabled by name
    and the file is a fleet (C(type: fleet))."
requirements:
  - The gpufleet Python package, importable by the Python that runs Ansible (C(pip install gpufleet)
    in the same environment as ansible-core).
options:
  plugin:
    description: The name of this plugin; a fleet file that holds it is read by this plugin.
    type: str
    required: false
    choices: [gpufleet.fleet.fleet]
notes:
  - "Enable it (ansible.cfg): C([inventory] enable_plugins = gpufleet.fleet.fleet, auto, host_list, yaml, ini),
    or the environment: C(ANSIBLE_INVENTORY_ENABLED=gpufleet.fleet.fleet,auto,host_list,yaml,ini).
    With the default list (which has C(auto)), a fleet file with C(plugin: gpufleet.fleet.fleet) works as is."
  - The state database is the one gpufleet uses (C($GPUFLEET_DATABASE_URL), else
    C($GPUFLEET_HOME/state.db)); the plugin only reads it, and does not create it.
"""

EXAMPLES = r"""
# fleet.yml -- a gpufleet fleet file is the inventory source; `plugin:` is the only line to add
# ansible-inventory -i fleet.yml --graph
plugin: gpufleet.fleet.fleet
type: fleet
name: my-fleet
ssh_config:
  user: ubuntu
  identity_file: ~/.ssh/node_id_ed25519
  proxy_jump:
    hostname: 12.34.56.78
    identity_file: ~/.ssh/login_id_ed25519
  hosts:
    - 10.0.0.11
    - 10.0.0.12
blocks: auto

# then, e.g.: ansible-playbook -i fleet.yml gpufleet.fleet.probe --limit gpu_model_h100
"""

import sys  # noqa: E402

from ansible.errors import AnsibleParserError  # noqa: E402
from ansible.parsing.dataloader import DataLoader  # noqa: E402
from ansible.plugins.inventory import BaseInventoryPlugin  # noqa: E402

try:
    from gpufleet.config import load_fleet
    from gpufleet.errors import GpufleetError
    from gpufleet.inventory import group_name, write_fleet_files
except ImportError as e:
    GPUFLEET_IMPORT_ERROR = e
else:
    GPUFLEET_IMPORT_ERROR = None

NAME = "gpufleet.fleet.fleet"


class InventoryModule(BaseInventoryPlugin):
    NAME = NAME

    def verify_file(self, path):
        """A YAML fleet file (type: fleet) that names no other inventory plugin."""
        if not super().verify_file(path) or not path.endswith((".yml", ".yaml")):
            return False
        try:  # the auto plugin asks before parse() has given this plugin a loader
            data = (self.loader or DataLoader()).load_from_file(path, cache="none")
        except Exception:  # not YAML: not ours (gpufleet reports the details when it is ours)
            return False
        if not isinstance(data, dict):
            return False
        return data.get("plugin") == NAME or ("plugin" not in data and data.get("type") == "fleet")

    def parse(self, inventory, loader, path, cache=True):
        super().parse(inventory, loader, path, cache)
        if GPUFLEET_IMPORT_ERROR is not None:
            raise AnsibleParserError(
                f"the {NAME} inventory plugin needs the gpufleet Python package, and the Python that "
                f"runs Ansible ({sys.executable}) cannot import it ({GPUFLEET_IMPORT_ERROR}); install "
                "gpufleet into that environment (pip install gpufleet), or run Ansible from gpufleet's "
                "virtualenv")
        try:
            fleet = load_fleet(path)
            instances = self._applied_instances(fleet.name)
            files = write_fleet_files(fleet, facts={i.alias: i.facts for i in instances if i.facts})
        except GpufleetError as e:  # a ConfigError reads file:line:column: field: reason, one a line
            raise AnsibleParserError(str(e)) from None
        generated = self.loader.load_from_file(str(files.inventory), cache="none")
        group = group_name(fleet.name)
        section = ((generated.get("all") or {}).get("children") or {}).get(group) or {}
        self.inventory.add_group(group)
        for key, value in (section.get("vars") or {}).items():
            self.inventory.set_variable(group, key, value)
        hosts = section.get("hosts") or {}
        for alias, host_vars in hosts.items():
            self.inventory.add_host(alias, group=group)
            for key, value in (host_vars or {}).items():
                self.inventory.set_variable(alias, key, value)
        for instance in instances:
            if instance.alias not in hosts:  # in the state, no longer in the file
                continue
            for gpu in instance.facts.gpus if instance.facts else []:
                for kind in ("vendor", "model"):
                    if getattr(gpu, kind):
                        gpu_group = self.inventory.add_group(self._sanitize_group_name(
                            f"gpu_{kind}_{getattr(gpu, kind)}".lower()))
                        self.inventory.add_child(gpu_group, instance.alias)

    def _applied_instances(self, fleet_name):
        """The fleet's instances as `gpufleet apply` recorded them; [] when it was never applied here."""
        from gpufleet.state import existing_store

        try:
            store = existing_store()
            view = store.fleet(fleet_name) if store else None
        except GpufleetError as e:
            self.display.warning(f"{NAME}: gpufleet's state is not readable, so the inventory has no GPU "
                                 f"groups: {e}")
            return []
        return view.instances if view else []
