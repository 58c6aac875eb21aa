"""Launching: what the `workload` role needs to start a run's container on each of its nodes, and
starting or stopping those containers with playbooks/start.yml and stop.yml.

Which blocks a run gets is decided before (allocator, state); what became of its containers is
asked afterwards (runs.refresh, over containers.list_containers).
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Callable

from gpufleet import cluster, devssh, images
from gpufleet.allocator import Placement
from gpufleet.config import stored_fleet
from gpufleet.containers import list_containers
from gpufleet.errors import GpufleetError
from gpufleet.interpolate import InterpolationError, fill, fill_run, group_addresses, run_variables
from gpufleet.models import (
    GPU,
    DevEnvironmentConfig,
    Fleet,
    HostFacts,
    RunConfigType,
    RunRequest,
    ServiceConfig,
    TaskConfig,
    split_env,
)
from gpufleet.models.run import SSHD_PORT, port_pair
from gpufleet.paths import FleetFiles
from gpufleet.runconfig import REGISTRY_PASSWORD
from gpufleet.runner import run_playbook
from gpufleet.state import Store
from gpufleet.upload import host_binds, place_repo, upload_owner

KEEP_ALIVE = "while :; do sleep 3600; done"
STATE_LABEL = "gpufleet.state"  # which state store started the container (Store.identity)


class StartError(GpufleetError):
    """A node's container could not be started; the message names the node and the cause."""


def container_name(run_name: str) -> str:
    return f"gpufleet-{run_name}"


def container_vars(run: RunRequest, run_id: str, fleet_env: dict[str, str], facts: HostFacts, gpus: list[GPU],
                   cpus: int, memory_mib: int, numa_nodes: set, node_env: dict[str, str] | None = None,
                   prelude: str = "", secrets: dict[str, str] | None = None, state: str | None = None,
                   volume_roots: list[str] | None = None, image: str | None = None) -> dict:
    """Everything the `workload` role needs to start the run's container, per GPU vendor.

    The container is privileged only for `privileged: true` or `docker: true` (else no-new-privileges,
    the runtime's default capabilities); on the host's network for `network: host` and multi-node runs,
    else in a network namespace of its own with its ports published on the host's 127.0.0.1 (where
    `gpufleet attach` forwards to). `volumes` go as strings (/host:/path[:ro]), the optional ones apart:
    the host leaves one out when its path is missing. ``volume_roots``: the host paths the submitter may mount
    (hostpolicy.volume_roots), checked again on the host with symlinks resolved; None: not checked.
    ``image``: the image chosen for the run's fleet (images.choose); None: the run's `image`. With
    `registry_auth`, its username and password (their `${{ secrets.NAME }}` filled) go as a secret."""
    cfg = run.config
    support = facts.runtime.gpu_support
    devices: list[str] = []
    docker_gpus = oci_runtime = None
    extra_env: dict[str, str] = {}
    nvidia = [g for g in gpus if g.vendor == "nvidia"]
    if nvidia:
        ids = [g.uuid or str(g.index) for g in nvidia]
        if support.get("nvidia") == "cdi":
            devices += [f"nvidia.com/gpu={i}" for i in ids]
        else:
            docker_gpus = "device=" + ",".join(ids)
    amd = [g for g in gpus if g.vendor == "amd"]
    if amd:
        devices += ["/dev/kfd"] + [f"/dev/dri/renderD{128 + g.index}" for g in amd]
    intel = [g for g in gpus if g.vendor == "intel"]
    if intel:
        oci_runtime = "habana"
        extra_env["HABANA_VISIBLE_DEVICES"] = ",".join(str(g.index) for g in intel)
    devices += [f"/dev/tenstorrent/{g.index}" for g in gpus if g.vendor == "tenstorrent"]
    indices = [g.index for g in gpus]
    # the run's `${{ ... }}` references (checked at load) filled for this node; an env value that uses
    # a secret is a secret. Only the run's env names without a value are exported as such: the other
    # secrets (`${{ secrets.NAME }}`) reach the container only where a value uses them.
    run_env = cluster.run_env(run.replica_of or run.name, indices)  # a replica: its service
    node = node_env if node_env is not None else cluster.node_env(0, [], len(gpus))
    secret_names = split_env(cfg.env)[1]
    # a task's node runs its group's commands (`groups`), where `${{ groups[I].nodes[J].IP_ADDRESS }}` are the nodes'
    ips = node["GPUFLEET_NODES_IPS"].split("\n") if "GPUFLEET_NODES_IPS" in node else []
    own = cfg.node_commands(int(node["GPUFLEET_NODE_RANK"])) if isinstance(cfg, TaskConfig) else cfg.commands
    addresses = group_addresses(cfg.group_sizes, ips) if isinstance(cfg, TaskConfig) and ips else {}
    try:
        commands, run_values, run_sealed = fill_run(own, cfg.env_dict, secret_names, run.secrets,
                                                    run_variables({**run_env, **node}), addresses)
    except InterpolationError as e:
        raise GpufleetError(f"run {run.name}: {e}") from None
    run_sealed |= {n: run.secrets[n] for n in secret_names if n in run.secrets}
    # fleet env < run env < what gpufleet sets (the node's own settings last); at each layer a value
    # or a secret replaces the one below
    env: dict[str, str] = {}
    secret_env: dict[str, str] = {}
    for layer, secret in ((fleet_env, False), (secrets or {}, True), (run_values, False), (run_sealed, True),
                          (extra_env, False), (run_env, False), (node_env or {}, False)):
        for name, value in layer.items():
            (secret_env if secret else env)[name] = value
            (env if secret else secret_env).pop(name, None)
    if isinstance(cfg, DevEnvironmentConfig):  # its sshd (ssh RUN-NAME), its host key a sealed secret
        prelude, secret_env[devssh.HOST_KEY_ENV] = dev_sshd(run, run_id, prelude)
    entrypoint, command = run_command(cfg, prelude, commands)
    gpu_list = ",".join(map(str, indices))
    # `repos` and `files`, as the CLI uploaded them (a replica's: its service's)
    archive, binds = host_binds(cfg.uploads, run.replica_of or run.name)
    return {
        "workload_name": container_name(run.name),
        "workload_run_id": run_id,
        "workload_image": image or cfg.image,
        "workload_registry_auth": registry_auth(run, {**run_values, **run_sealed}),
        "workload_command": command,
        "workload_env": env,
        "workload_secret_env": secret_env,
        "workload_labels": {"gpufleet.run": run.name, "gpufleet.type": cfg.type, "gpufleet.gpus": gpu_list,
                            **({STATE_LABEL: state} if state else {})},
        "workload_devices": devices,
        "workload_gpus": docker_gpus,
        "workload_oci_runtime": oci_runtime,
        "workload_cpuset_cpus": facts.cpuset(numa_nodes),
        "workload_cpus": float(cpus) if cpus else None,
        "workload_memory_mib": memory_mib or None,
        "workload_shm_size_mib": cfg.resources.shm_size_mib,
        "workload_disk_limit_mib": cfg.resources.disk_limit_mib,
        "workload_network": "host" if cfg.host_network else "bridge",
        "workload_ports": [] if cfg.host_network else published_ports(cfg),
        "workload_privileged": cfg.runs_privileged,
        "workload_volumes": [str(v) for v in cfg.volumes if not v.optional],
        "workload_optional_volumes": [str(v) for v in cfg.volumes if v.optional],
        "workload_volume_roots": None if volume_roots is None else list(volume_roots),
        "workload_workdir": "/" if place_repo(cfg.uploads) else cfg.workdir,  # `if_exists: skip`: the script's cd
        "workload_upload_archive": archive,
        "workload_uploads": binds,
        "workload_upload_owner": upload_owner(cfg.user)[0] if archive else None,
        "workload_upload_group": upload_owner(cfg.user)[1] if archive else None,
        "workload_user": cfg.user,
        "workload_entrypoint": entrypoint,
    }


def dev_sshd(run: RunRequest, run_id: str, prelude: str = "") -> tuple[str, str]:
    """A dev environment's ``prelude`` with its sshd's start (devssh.sshd_script) after it, and the
    host key (the one the server made at submission, kept sealed; a new one for a run submitted
    without)."""
    key = run.secrets.get(devssh.HOST_KEY_ENV) or devssh.new_host_key()[0]
    cfg = run.config
    script = devssh.sshd_script(devssh.public_of(key), devssh.sshd_port(cfg.host_network, run_id),
                                loopback=cfg.host_network, required=cfg.ide is not None)
    return (f"{prelude}\n{script}" if prelude else script), key


def on_image(run: RunRequest, chosen: images.Choice, prelude: str = "") -> tuple[RunRequest, str]:
    """The run and its ``prelude`` as they start on the ``chosen`` image: on dstack's own images, as dstack
    runs them, `commands` run with bash (unless `shell` says otherwise) after the Python venv is made
    (unless an `entrypoint` replaces the shell, or there are no commands: the image's own then run)."""
    if chosen.shell and run.config.shell is None:
        run = run.model_copy(update={"config": run.config.model_copy(update={"shell": chosen.shell})})
    shell_lines = run.config.commands or isinstance(run.config, DevEnvironmentConfig)
    if run.config.entrypoint is None and shell_lines and chosen.prelude():
        prelude = "\n".join(p for p in (chosen.prelude(), prelude) if p)
    return run, prelude


def registry_auth(run: RunRequest, env: dict[str, str] | None = None) -> dict[str, str] | None:
    """The run's `registry_auth` as the container module takes it ({username, password}), its
    `${{ secrets.NAME }}` filled from the run's secrets and `${{ env.NAME }}` from ``env`` (the run's env
    as filled for the node, secrets among it); None without one."""
    auth = run.config.registry_auth
    if auth is None:
        return None
    password = run.secrets.get(REGISTRY_PASSWORD, auth.password)
    if password is None:
        raise GpufleetError(f"run {run.name}: registry_auth has no password (its sealed secrets are lost): submit "
                            "it again")
    try:
        return {key: fill(value, {"secrets": run.secrets, "env": env or {}}) for key, value in
                (("username", auth.username), ("password", password))}
    except InterpolationError as e:
        raise GpufleetError(f"run {run.name}: registry_auth: {e}") from None


def run_command(cfg: RunConfigType, prelude: str = "", commands: list[str] | None = None
                ) -> tuple[str | None, list[str]]:
    """The container's entrypoint (None: the image's) and command, as dstack makes them, of
    ``commands`` (the run's `commands` with their `${{ ... }}` filled for the node; default: as written).

    Without `entrypoint`: the run's shell (`shell`, else /bin/sh) runs, with `set -e`, gpufleet's
    ``prelude``, a dev environment's `init`, the `commands`, then (a dev environment) a loop that keeps
    it up. With `entrypoint` (tasks and services): its words replace the image's entrypoint and
    `commands` are its arguments, one each, with no shell in between (dstack's docker-like form); a
    ``prelude`` is then run by /bin/sh first, which execs the entrypoint."""
    commands = list(cfg.commands) if commands is None else commands
    prelude = "\n".join(p for p in (place_repo(cfg.uploads, cfg.workdir), prelude) if p)  # `if_exists: skip`
    if cfg.entrypoint is not None:
        words = shlex.split(cfg.entrypoint) + commands
        if not prelude:
            return words[0], words[1:]
        return "/bin/sh", ["-c", "set -e\n" + prelude + '\nexec "$@"', "gpufleet", *words]
    lines = [prelude] if prelude else []
    if isinstance(cfg, DevEnvironmentConfig):
        lines += cfg.init
    lines += commands
    if isinstance(cfg, DevEnvironmentConfig):
        lines.append(KEEP_ALIVE)
    script = "\n".join(lines)
    return None, ([cfg.shell_path, "-c", "set -e\n" + script] if script else [])


def published_ports(cfg: RunConfigType) -> list[str]:
    """The container ports `gpufleet attach` forwards to (a service's `port`, then `ports`; of `8080:8000`
    and `*:8000` the 8000), to publish on the host's 127.0.0.1, each on a host port the runtime picks (two runs on
    one host may both listen on 8000); `gpufleet attach` asks the runtime which."""
    ports = [str(p) for p in cfg.ports]
    if isinstance(cfg, ServiceConfig):
        ports.insert(0, str(cfg.port))
    if isinstance(cfg, DevEnvironmentConfig):
        ports.append(str(SSHD_PORT))  # its sshd, reached through the server's tunnel (ssh RUN-NAME)
    return list(dict.fromkeys(str(port_pair(p)[1]) for p in ports))


def applied_fleet(store: Store, name: str) -> Fleet:
    """The fleet as it was applied (its config is not validated against the disk again)."""
    state = store.fleet(name)
    config = store.fleet_config(name)
    if state is None or config is None:
        raise GpufleetError(f"no fleet named {name!r} (see gpufleet fleet list)")
    return stored_fleet(name, state.source, config)


def fleet_config_env(store: Store, fleet: str, given: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """The fleet's env for its workloads: (values, secrets); the secrets' values are ``given`` (taken
    from the environment of `gpufleet apply` of the fleet, kept sealed by the server). Read from the
    config stored at apply time, not validated again."""
    values, names = split_env((store.fleet_config(fleet) or {}).get("env"))
    missing = [n for n in names if n not in given]
    if missing:
        raise GpufleetError(f"fleet {fleet}: secret {', '.join(missing)} has no value: export it and apply the "
                            "fleet again (gpufleet apply -f FLEET.yml)")
    return values, {n: given[n] for n in names}


def start_nodes(store: Store, run: RunRequest, run_id: str, placements: list[Placement], started: list[str],
                fleet_secrets: dict[str, str], volume_roots: list[str] | None = None,
                before_node: Callable[[], None] | None = None) -> None:
    """Start the run's container on each node, rank 0 first; ``started`` collects the hosts tried.
    ``volume_roots``: see container_vars. ``before_node``: called before each node is started (it
    raises to start no further one: a stop began).
    Raise StartError (or another GpufleetError: a missing secret, an unknown cluster address) on
    the first node that fails."""
    fleet_name = placements[0].host.fleet
    values, secrets = fleet_config_env(store, fleet_name, fleet_secrets)
    facts = store.fleet(fleet_name).facts()
    chosen = images.for_fleet(store, run.config, fleet_name)  # once, for every node (NoImage: not started)
    gpus_per_node = len(placements[0].gpus)
    ips = node_addresses(store, fleet_name, [p.host.alias for p in placements]) if len(placements) > 1 else []
    prelude = cluster.hostfile_script(ips, gpus_per_node) if ips else ""
    run, prelude = on_image(run, chosen, prelude)
    files = FleetFiles.of(fleet_name).require()
    order = getattr(run.config, "startup_order", None)
    stages = start_stages(order, len(placements))
    for stage_num, stage in enumerate(stages):
        for rank in stage:
            p = placements[rank]
            host = p.host
            numa = {b.numa_node for b in host.blocks if b.idx in p.blocks}
            variables = container_vars(run, run_id, values, facts[host.alias], [host.gpus[g] for g in p.gpus],
                                       p.cpus, p.memory_mib, numa, cluster.node_env(rank, ips, gpus_per_node),
                                       prelude, secrets, state=store.identity, volume_roots=volume_roots,
                                       image=chosen.image)
            if before_node is not None:
                before_node()
            started.append(host.alias)
            result = run_playbook("start", files.inventory, limit=[host.alias], unsafe_vars=variables)
            if result.canceled:
                raise KeyboardInterrupt
            outcome = result.hosts.get(host.alias)
            if outcome is None or outcome.status.bad:
                prefix = f"node {rank} ({host.alias}): " if len(placements) > 1 else f"{host.alias}: "
                raise StartError(prefix + (outcome.message if outcome else "no result from the start playbook"))
        if stage_num < len(stages) - 1:
            _require_running(store, fleet_name, files, run, run_id, placements, stage, order)


def start_stages(order: str | None, nodes: int) -> list[list[int]]:
    """The ranks to start, in stages: each stage's containers must be running before the next stage
    starts (dstack's `startup_order`; rank 0 is the master). `any` (or none): one stage, rank 0 first."""
    ranks = list(range(nodes))
    if nodes < 2 or order in (None, "any"):
        return [ranks]
    if order == "master-first":
        return [[0], ranks[1:]]
    if order == "workers-first":
        return [ranks[1:], [0]]
    raise ValueError(f"unknown startup_order {order!r}")


def _require_running(store: Store, fleet_name: str, files: FleetFiles, run: RunRequest, run_id: str,
                     placements: list[Placement], stage: list[int], order: str) -> None:
    """The containers of ``stage`` (ranks) must be running before the next stage starts: raise StartError
    naming the first node whose container has exited (or cannot be seen) by now."""
    state = store.fleet(fleet_name)
    aliases = [placements[rank].host.alias for rank in stage]
    answers = list_containers(files, {a: state.runtime_argv(a) for a in dict.fromkeys(aliases)})
    name = container_name(run.name)
    waiting = "the other nodes" if order == "master-first" else "the master (node 0)"
    for rank, alias in zip(stage, aliases, strict=True):
        a = answers.get(alias)
        if a is None or a.containers is None:
            raise StartError(f"node {rank} ({alias}): cannot check that its container runs before {waiting} "
                             f"start (startup_order: {order}): {a.message if a else 'no answer'}")
        c = a.find(name, run_id)
        if c is None or c.ended:
            what = "is gone" if c is None else f"exited with code {c.exit_code}"
            raise StartError(f"node {rank} ({alias}): its container {what} before {waiting} started "
                             f"(startup_order: {order})")


def node_addresses(store: Store, fleet_name: str, aliases: list[str]) -> list[str]:
    fleet = applied_fleet(store, fleet_name)
    targets = {t.alias: t for t in fleet.targets}
    outcomes = cluster.probe_addresses(FleetFiles.of(fleet_name).require().inventory, aliases,
                                       {a: targets[a].hostname for a in aliases})
    return [cluster.choose_address(a, outcomes.get(a), targets[a].internal_ip, fleet.network) for a in aliases]


def stop_containers(fleet: str, container: str, run_id: str, aliases: list[str], remove: bool = False,
                    timeout: float | None = None) -> None:
    """Stop (or remove) the container ``container`` of run ``run_id`` on ``aliases`` of ``fleet``;
    raise with each host that failed.

    ``timeout``: seconds the container has after SIGTERM before the runtime kills it (`stop -t N`,
    rounded up to whole seconds); None: the workload role's default (10). A finite number >= 0: a run's
    `stop_duration: off` (math.inf) is for the caller to bound."""
    if timeout is not None and not (math.isfinite(timeout) and timeout >= 0):
        raise ValueError(f"stop timeout must be a finite number of seconds >= 0, not {timeout!r}")
    if not aliases:
        return
    variables = {"workload_name": container, "workload_run_id": run_id}
    if remove:
        variables["workload_state"] = "absent"
    if timeout is not None:
        variables["workload_stop_timeout"] = math.ceil(timeout)
    result = run_playbook("stop", FleetFiles.of(fleet).require().inventory, limit=aliases, unsafe_vars=variables)
    outcomes = [(a, result.hosts.get(a)) for a in aliases]
    bad = [f"{a}: {o.message if o else 'no result'}" for a, o in outcomes if o is None or o.status.bad]
    if bad:
        raise GpufleetError("; ".join(bad))
