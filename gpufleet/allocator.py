"""Placement of a run on free blocks: pure functions, no I/O.

A run gets the smallest number of whole blocks whose GPUs satisfy its request, on the host
where it leaves the fewest free blocks (best fit), in an aligned contiguous run of blocks when
possible (a 2-block job on a 4-block host takes 0-1 or 2-3, not 1-2) and on one NUMA node when
that can be avoided. Gang placement (several hosts, all or nothing) uses the same scoring.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import combinations

from gpufleet.models import GPU, GPUSpec, Range


@dataclass(frozen=True)
class BlockSlot:
    idx: int
    gpus: tuple[int, ...]  # positions in the host's GPU list
    cpus: int
    memory_mib: int
    numa_node: int | None
    free: bool


@dataclass(frozen=True)
class HostTraits:
    """What a host is, beyond its blocks, that a run may ask for (from its probe's facts): its CPU
    architecture (dstack's names: x86, arm), the size in GB of its container storage (the file system of
    the runtime's storage root), its runtime, and whether that storage can limit a container's writable
    layer (``disk_why_not``: why not, e.g. `overlay on ext4`). None: not reported by the probe."""

    arch: str | None = None
    disk_gb: float | None = None
    runtime: str | None = None
    disk_limit: bool = False
    disk_why_not: str | None = None

    @classmethod
    def of(cls, probe: dict) -> HostTraits:
        """From a host's probe facts as the state keeps them (a dict; old ones lack the newer facts)."""
        runtime = probe.get("runtime") or {}
        storage = runtime.get("storage") or {}
        total = (probe.get("disk") or {}).get("total_mib")
        return cls(arch=(probe.get("cpu") or {}).get("arch"), disk_gb=None if not total else total / 1024,
                   runtime=runtime.get("name"), disk_limit=bool(storage.get("size_limit")),
                   disk_why_not=storage.get("why_not") if storage else None)


_REPROBE = "apply its fleet again to probe it"


def _gb(r: Range) -> str:
    """A GB range as dstack writes it: `100GB`, `100GB..`, `..200GB`, `100GB..200GB`."""
    def f(v: float | None) -> str:
        return "" if v is None else f"{v:g}GB"
    return f(r.min) if r.min == r.max else f"{f(r.min)}..{f(r.max)}"


def host_refusal(host: HostSlots, req: Request) -> str | None:
    """Why ``host`` can never take ``req`` whatever its free blocks (`ALIAS: why`), or None: the CPU
    architecture asked for (a host whose probe did not report one is not matched), the minimum of
    `disk` against the host's container storage, and a maximum of `disk` (the container's limit)
    where the host's storage cannot limit a container's disk."""
    t = host.traits or HostTraits()
    if req.arch is not None:
        if t.arch is None:
            return f"{host.alias}: its CPU architecture is not known ({_REPROBE}); the run asks for {req.arch}"
        if t.arch != req.arch:
            return f"{host.alias}: its CPUs are {t.arch}, the run asks for {req.arch}"
    if req.disk is not None and req.disk.min:
        if t.disk_gb is None:
            return f"{host.alias}: the size of its container storage is not known ({_REPROBE})"
        if t.disk_gb < req.disk.min:
            return (f"{host.alias}: resources.disk: {_gb(req.disk)}: its container storage is {t.disk_gb:.0f}GB, "
                    f"less than {req.disk.min:g}GB")
    if req.disk is not None and req.disk.max is not None and not t.disk_limit:
        why = t.disk_why_not or f"its storage was not reported: {_REPROBE}"
        return (f"resources.disk: {_gb(req.disk)}: {t.runtime or 'the runtime'} on {host.alias} cannot limit a "
                f"container's disk ({why}); remove it or use a host with xfs project quotas")
    return None


@dataclass
class HostSlots:
    instance_id: int
    fleet: str
    num: int
    alias: str
    gpus: list[GPU]
    blocks: list[BlockSlot]
    # hosts with equal ``shape`` have the same GPU models and block layout (the state store sets it),
    # so which of their blocks suit a request is worked out once per shape; None: per host
    shape: object = None
    traits: HostTraits | None = None  # None: nothing known (see host_refusal); part of ``shape`` when set

    @property
    def free_count(self) -> int:
        return sum(b.free for b in self.blocks)


class HostIndex:
    """Hosts grouped by all that the choice of blocks depends on: fleet, shape (GPU models and block
    layout) and which blocks are free. Every host of a group scores the same, and ties go to the
    lowest ``num``, so a placement looks at one host per group: its cost grows with the number of
    distinct groups (a few per fleet in practice), not with the number of hosts. The state store
    keeps one up to date host by host (``put``/``remove``); a plain list of hosts is indexed on the
    fly. Hosts without a ``shape`` get a group of their own."""

    def __init__(self, hosts: list[HostSlots] | tuple = ()):
        self._hosts: dict[int, HostSlots] = {}
        self._key: dict[int, tuple] = {}
        self._groups: dict[tuple, list[tuple[int, int]]] = {}  # key -> [(num, instance_id)], sorted
        for host in hosts:
            self.put(host)

    def put(self, host: HostSlots) -> None:
        self.remove(host.instance_id)
        shape = host.shape if host.shape is not None else ("host", host.instance_id)
        key = (host.fleet, shape, tuple(b.free for b in host.blocks))
        self._hosts[host.instance_id] = host
        self._key[host.instance_id] = key
        bisect.insort(self._groups.setdefault(key, []), (host.num, host.instance_id))

    def remove(self, instance_id: int) -> None:
        key = self._key.pop(instance_id, None)
        if key is None:
            return
        host = self._hosts.pop(instance_id)
        members = self._groups[key]
        del members[bisect.bisect_left(members, (host.num, instance_id))]
        if not members:
            del self._groups[key]

    def copy(self) -> HostIndex:
        """An index of the same hosts that can be changed without changing this one (hosts are
        shared, never changed in place: a change is a ``put`` of a new HostSlots)."""
        other = HostIndex.__new__(HostIndex)
        other._hosts = dict(self._hosts)
        other._key = dict(self._key)
        other._groups = {key: list(members) for key, members in self._groups.items()}
        return other

    def get(self, instance_id: int) -> HostSlots | None:
        return self._hosts.get(instance_id)

    def groups(self) -> Iterator[tuple[HostSlots, int]]:
        """Each group's lowest-numbered host and how many hosts the group has."""
        for members in self._groups.values():
            yield self._hosts[members[0][1]], len(members)

    def leaders(self) -> Iterator[HostSlots]:
        """The lowest-numbered host of each group."""
        for members in self._groups.values():
            yield self._hosts[members[0][1]]

    def hosts(self) -> list[HostSlots]:
        return sorted(self._hosts.values(), key=lambda h: (h.fleet, h.num))

    def __len__(self) -> int:
        return len(self._hosts)


def _as_index(hosts: HostIndex | list[HostSlots]) -> HostIndex:
    return hosts if isinstance(hosts, HostIndex) else HostIndex(hosts)


def _as_list(hosts: HostIndex | list[HostSlots]) -> list[HostSlots]:
    return hosts.hosts() if isinstance(hosts, HostIndex) else hosts


@dataclass(frozen=True)
class Request:
    gpu: GPUSpec | None = None
    cpu: Range | None = None
    memory_gb: Range | None = None
    fleets: tuple[str, ...] | None = None
    arch: str | None = None  # a CPU architecture (x86, arm): only hosts that have it
    disk: Range | None = None  # GB: its min against the host's storage, its max a limit (host_refusal)
    # instance ids of hosts to place it on only when no other host fits (a service's replica: the hosts of
    # its service's other replicas, so that replicas spread over hosts)
    spread: frozenset[int] = frozenset()
    spread_group: str = ""  # runs of one group placed in one pass spread among themselves too (scheduler)
    spread_only: bool = False  # never on a host of ``spread`` (a router service's replicas: one per host)

    @property
    def gpu_min(self) -> int:
        if self.gpu is None:
            return 0
        return int(self.gpu.count.min or 0)

    def describe(self) -> str:
        return self.gpu.describe() if self.gpu and self.gpu_min else "CPU-only"


@dataclass(frozen=True)
class Placement:
    host: HostSlots
    blocks: tuple[int, ...]
    gpus: tuple[int, ...]  # positions in the host's GPU list
    cpus: int
    memory_mib: int
    note: str = ""


@dataclass
class NoCapacity(Exception):
    message: str
    hosts: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return self.message


def gpu_gb(gpu: GPU) -> int | None:
    """A GPU's memory in whole GB, as dstack compares it (gpuhunt rounds a GPU's reported memory to
    whole GiB): an H100's 81559 MiB is 80 GB. None when the probe could not read it."""
    return None if gpu.memory_mib is None else round(gpu.memory_mib / 1024)


def gpu_matches(gpu: GPU, spec: GPUSpec | None) -> bool:
    """dstack's GPU filters: vendor, model names (the model or a word of the vendor tool's name), memory
    per GPU within spec.memory (`24GB` is exactly 24 GB, `24GB..` at least). A memory asked of a GPU
    whose memory is unknown does not match (it cannot be checked)."""
    if spec is None:
        return True
    if spec.vendor and gpu.vendor != spec.vendor:
        return False
    if spec.name:
        model = (gpu.model or "").lower()
        raw = (gpu.name or "").lower()
        if not any(n.lower() == model or n.lower() in raw.split() for n in spec.name):
            return False
    if spec.memory:
        gb = gpu_gb(gpu)
        if gb is None or not spec.memory.contains(gb):
            return False
    return True


def _block_gpu_gb(host: HostSlots, block: BlockSlot) -> int | None:
    sizes = [gpu_gb(host.gpus[g]) for g in block.gpus]
    return None if None in sizes else sum(sizes)


def _blocks_needed(host: HostSlots, req: Request, usable: list[BlockSlot]) -> int | None:
    """How many of the host's (uniform) blocks the request needs, or None if it never fits: the fewest
    that meet every minimum (GPUs, GPU memory in total, CPUs, memory). A maximum does not add blocks;
    what the blocks give beyond it is said in the placement's note (see _beyond)."""
    if not usable:
        return None
    per_gpu = len(usable[0].gpus)
    need = 1
    if req.gpu_min:
        if per_gpu == 0:
            return None
        need = max(need, math.ceil(req.gpu_min / per_gpu))
        total = req.gpu.total_memory
        if total is not None and total.min:
            per_block = _block_gpu_gb(host, usable[0])
            if not per_block:
                return None
            need = max(need, math.ceil(total.min / per_block))
    if req.cpu and req.cpu.min:
        need = max(need, math.ceil(req.cpu.min / max(usable[0].cpus, 1)))
    if req.memory_gb and req.memory_gb.min:
        need = max(need, math.ceil(req.memory_gb.min * 1024 / max(usable[0].memory_mib, 1)))
    if need > len(usable):
        return None
    return need


def _beyond(host: HostSlots, req: Request, blocks: list[BlockSlot]) -> list[str]:
    """What ``blocks`` give beyond a maximum of the request (dstack's `2`, `64GB`, `..8` are maximums
    too: exact values): gpufleet gives whole blocks, and says so."""
    out = []
    gpus = sum(len(b.gpus) for b in blocks)
    if req.gpu and req.gpu.count.max is not None and gpus > req.gpu.count.max:
        out.append(f"gets {gpus} GPUs (asked {req.gpu.count}): the host's blocks hold {len(blocks[0].gpus)} each")
    if req.gpu and req.gpu_min and req.gpu.total_memory and req.gpu.total_memory.max is not None:
        total = sum(_block_gpu_gb(host, b) or 0 for b in blocks)
        if total > req.gpu.total_memory.max:
            out.append(f"gets {total} GB of GPU memory in total (asked {req.gpu.total_memory} GB)")
    cpus = sum(b.cpus for b in blocks)
    if req.cpu and req.cpu.max is not None and cpus > req.cpu.max:
        out.append(f"gets {cpus} CPUs (asked {req.cpu})")
    gb = sum(b.memory_mib for b in blocks) / 1024
    if req.memory_gb and req.memory_gb.max is not None and gb > req.memory_gb.max:
        out.append(f"gets {gb:.0f} GB of memory (asked {req.memory_gb} GB)")
    return out


def _usable_blocks(host: HostSlots, req: Request) -> list[BlockSlot]:
    if req.gpu_min == 0:
        return list(host.blocks)
    return [b for b in host.blocks if b.gpus and all(gpu_matches(host.gpus[g], req.gpu) for g in b.gpus)]


def _choose_blocks(host: HostSlots, usable: list[BlockSlot], need: int) -> tuple[tuple[int, ...], tuple] | None:
    """Best set of ``need`` free blocks on the host, with its score (lower is better)."""
    free = [b for b in usable if b.free]
    if len(free) < need:
        return None
    by_idx = {b.idx: b for b in free}
    best = None
    if len(free) <= 16 or need == 1:
        candidates = combinations(sorted(by_idx), need)
    else:  # large hosts: contiguous windows only
        ids = sorted(by_idx)
        candidates = (tuple(ids[i:i + need]) for i in range(len(ids) - need + 1))
    all_idx = [b.idx for b in host.blocks]
    for combo in candidates:
        numas = {by_idx[i].numa_node for i in combo}
        contiguous = combo[-1] - combo[0] == need - 1
        aligned = contiguous and (all_idx.index(combo[0]) % need == 0)
        left = set(by_idx) - set(combo)
        runs = _free_runs(all_idx, left)
        score = (len(numas), 0 if aligned else 1, 0 if contiguous else 1, runs, combo)
        if best is None or score < best[1]:
            best = (combo, score)
    return best


def _free_runs(all_idx: list[int], free: set[int]) -> int:
    runs, inside = 0, False
    for i in all_idx:
        if i in free and not inside:
            runs += 1
        inside = i in free
    return runs


def place(req: Request, hosts: HostIndex | list[HostSlots]) -> Placement:
    """Choose blocks for ``req``; raise NoCapacity with what is free if nothing fits."""
    index = _as_index(hosts)
    # One host per group of the index stands for all hosts that would score the same. A score
    # starts with (penalty, beyond a maximum, free blocks left): cheap to compute. After keeping CPU-only
    # runs off GPU hosts, a host whose blocks meet the request's maximums (dstack matches only those)
    # comes before one whose blocks give more. Candidates are visited in that order
    # and the block choice (the costly part) is made only while it can still win.
    candidates = []
    by_shape: dict = {}
    # spreading tells hosts of one group apart: every host is looked at
    for host in index.leaders() if not req.spread else index.hosts():
        if req.fleets and host.fleet not in req.fleets:
            continue
        if host_refusal(host, req):
            continue
        if req.spread_only and host.instance_id in req.spread:
            continue
        known = by_shape.get(host.shape) if host.shape is not None else None
        if known is None:
            usable = _usable_blocks(host, req)
            need = _blocks_needed(host, req, usable)
            ids = {id(b) for b in usable}
            positions = None if len(usable) == len(host.blocks) else \
                [i for i, b in enumerate(host.blocks) if id(b) in ids]
            beyond = 1 if need is not None and _beyond(host, req, usable[:need]) else 0
            known = (positions, need, beyond, 1 if req.gpu_min == 0 and any(b.gpus for b in host.blocks) else 0)
            if host.shape is not None:
                by_shape[host.shape] = known
        positions, need, beyond, gpu_hosts_penalty = known
        if need is None:
            continue
        free = host.free_count
        if free < need:
            continue
        if positions is not None and sum(host.blocks[i].free for i in positions) < need:
            continue
        crowded = 1 if host.instance_id in req.spread else 0
        candidates.append(((gpu_hosts_penalty, crowded, beyond, free - need), len(candidates), host, positions, need))
    candidates.sort(key=lambda c: (c[0], c[1]))
    best = None
    for head, _, host, positions, need in candidates:
        if best is not None and head > best[0][:len(head)]:
            break
        usable = host.blocks if positions is None else [host.blocks[i] for i in positions]
        chosen = _choose_blocks(host, usable, need)
        if chosen is None:
            continue
        combo, score = chosen
        host_score = head + (score, host.fleet, host.num)
        if best is None or host_score < best[0]:
            best = (host_score, host, combo)
    if best is None:
        every = index.hosts()
        raise NoCapacity(_refusal(req, every), [h.alias for h in every])
    _, host, combo = best
    blocks = [b for b in host.blocks if b.idx in combo]
    gpus = tuple(sorted(g for b in blocks for g in b.gpus))
    notes = _beyond(host, req, blocks)
    if not notes and req.gpu_min and len(gpus) > req.gpu_min and req.gpu.count.max is None and \
            not (req.gpu.total_memory and req.gpu.total_memory.min):  # total_memory asked for them
        notes = [f"gets {len(gpus)} GPUs (asked {req.gpu_min})"]
    note = "; ".join(notes)
    return Placement(host, tuple(combo), gpus, sum(b.cpus for b in blocks), sum(b.memory_mib for b in blocks), note)


def place_gang(req: Request, hosts: HostIndex | list[HostSlots], nodes: int,
               cluster_fleets: set[str]) -> list[Placement]:
    """Place a run on ``nodes`` hosts of one `placement: cluster` fleet, all or nothing.

    Without a GPU request each node takes a whole host; with one, every host gets the same
    number of blocks. Rank 0 is the first placement returned."""
    if nodes == 1:
        return [place(req, hosts)]
    hosts = _as_list(hosts)
    whole = req.gpu is None and not req.cpu and not req.memory_gb
    reasons = []
    best = None
    fleets = sorted({h.fleet for h in hosts if not req.fleets or h.fleet in req.fleets})
    for fleet in fleets:
        members = [h for h in hosts if h.fleet == fleet]
        if fleet not in cluster_fleets:
            reasons.append(f"fleet {fleet} is not placement: cluster")
            continue
        refusals = [why for h in members if (why := host_refusal(h, req))]
        if refusals:
            members = [h for h in members if not host_refusal(h, req)]
            reasons.extend(refusals)
        if len(members) < nodes:
            reasons.append(f"fleet {fleet} has {len(members)} ready instance{'s' if len(members) != 1 else ''}"
                           f"{' that can take it' if refusals else ''}, "
                           f"the task needs {nodes}")
            continue
        options = []
        by_shape: dict = {}  # as in place(): which blocks suit the request is worked out once per shape
        for h in members:
            known = by_shape.get(h.shape) if h.shape is not None else None
            if known is None:
                usable = list(h.blocks) if whole else _usable_blocks(h, req)
                need = len(usable) if whole else _blocks_needed(h, req, usable)
                ids = {id(b) for b in usable}
                known = ([i for i, b in enumerate(h.blocks) if id(b) in ids], need)
                if h.shape is not None:
                    by_shape[h.shape] = known
            positions, need = known
            if need is None or sum(h.blocks[i].free for i in positions) < need:
                continue
            usable = [h.blocks[i] for i in positions]
            chosen = _choose_blocks(h, usable, need)
            if chosen is None:
                continue
            options.append(((h.free_count - need, chosen[1], h.num), h, chosen[0], need))
        by_need: dict[int, list] = {}
        for option in options:
            by_need.setdefault(option[3], []).append(option)
        fits = [sorted(group)[:nodes] for group in by_need.values() if len(group) >= nodes]
        if not fits:
            free = ", ".join(f"{h.alias} {h.free_count}/{len(h.blocks)} blocks free" for h in members)
            what = "a whole free host" if whole else req.describe() + " free"
            reasons.append(f"fleet {fleet}: fewer than {nodes} instances have {what} ({free})")
            continue
        chosen_group = min(fits, key=lambda g: sum(o[0][0] for o in g))
        score = sum(o[0][0] for o in chosen_group)
        if best is None or score < best[0]:
            best = (score, sorted(chosen_group, key=lambda o: o[1].num))
    if best is None:
        detail = "; ".join(reasons) or "no ready instance"
        raise NoCapacity(f"cannot place {nodes} nodes: {detail}", [h.alias for h in hosts])
    out = []
    for _, host, combo, _need in best[1]:
        blocks = [b for b in host.blocks if b.idx in combo]
        gpus = tuple(sorted(g for b in blocks for g in b.gpus))
        out.append(Placement(host, tuple(combo), gpus, sum(b.cpus for b in blocks), sum(b.memory_mib for b in blocks)))
    return out


def _refusal(req: Request, hosts: list[HostSlots]) -> str:
    considered = [h for h in hosts if not req.fleets or h.fleet in req.fleets]
    if not considered:
        where = f" in fleets {', '.join(req.fleets)}" if req.fleets else ""
        return f"no ready instance{where} to run on (apply a fleet first: gpufleet apply -f FLEET.yml)"
    refused = [why for h in considered if (why := host_refusal(h, req))]
    if len(refused) == len(considered):
        return "no host can take it: " + "; ".join(refused)
    parts = []
    for h in considered:
        if host_refusal(h, req):
            continue
        usable = _usable_blocks(h, req)
        if req.gpu_min:
            free = sum(len(b.gpus) for b in usable if b.free)
            total = sum(len(b.gpus) for b in usable)
            parts.append(f"{h.alias} {free}/{total} free")
        else:
            parts.append(f"{h.alias} {sum(b.free for b in usable)}/{len(usable)} blocks free")
    what = req.describe() if req.gpu_min else "CPU-only block"
    taken = [h.alias for h in considered if req.spread_only and h.instance_id in req.spread]
    if taken:  # its service's replicas use the host's network: one per host
        refused.append(f"{', '.join(taken)} run(s) another replica of its service (a service with a router runs one "
                       "replica per host, on the host's network)")
    return f"no instance has {what} free: " + ", ".join(parts) + "".join(f"; {why}" for why in refused)
