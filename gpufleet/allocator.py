"""Placement of a run on free blocks: pure functions, no I/O.

A run gets the smallest number of whole blocks whose GPUs satisfy its request, on the host
where it leaves the fewest free blocks (best fit), in an aligned contiguous run of blocks when
possible (a 2-block job on a 4-block host takes 0-1 or 2-3, not 1-2) and on one NUMA node when
that can be avoided. Gang placement (several hosts, all or nothing) uses the same scoring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations

from gpufleet.runconfig import GPUSpec, Range


@dataclass(frozen=True)
class BlockSlot:
    idx: int
    gpus: tuple[int, ...]  # positions in the host's GPU list
    cpus: int
    memory_mib: int
    numa_node: int | None
    free: bool


@dataclass
class HostSlots:
    instance_id: int
    fleet: str
    num: int
    alias: str
    gpus: list[dict]
    blocks: list[BlockSlot]

    @property
    def free_count(self) -> int:
        return sum(b.free for b in self.blocks)


@dataclass(frozen=True)
class Request:
    gpu: GPUSpec | None = None
    cpu: Range | None = None
    memory_gb: Range | None = None
    fleets: tuple[str, ...] | None = None

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


def gpu_matches(gpu: dict, spec: GPUSpec | None) -> bool:
    if spec is None:
        return True
    if spec.vendor and gpu.get("vendor") != spec.vendor:
        return False
    if spec.name:
        model = (gpu.get("model") or "").lower()
        raw = (gpu.get("name") or "").lower()
        if not any(n.lower() == model or n.lower() in raw.split() for n in spec.name):
            return False
    if spec.memory and gpu.get("memory_mib") is not None:
        gb = round(gpu["memory_mib"] / 1024)
        if not spec.memory.contains(gb):
            return False
    return True


def _blocks_needed(host: HostSlots, req: Request, usable: list[BlockSlot]) -> int | None:
    """How many of the host's (uniform) blocks the request needs, or None if it never fits."""
    if not usable:
        return None
    per_gpu = len(usable[0].gpus)
    need = 1
    if req.gpu_min:
        if per_gpu == 0:
            return None
        need = max(need, math.ceil(req.gpu_min / per_gpu))
    if req.cpu and req.cpu.min:
        need = max(need, math.ceil(req.cpu.min / max(usable[0].cpus, 1)))
    if req.memory_gb and req.memory_gb.min:
        need = max(need, math.ceil(req.memory_gb.min * 1024 / max(usable[0].memory_mib, 1)))
    if need > len(usable):
        return None
    return need


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


def place(req: Request, hosts: list[HostSlots]) -> Placement:
    """Choose blocks for ``req``; raise NoCapacity with what is free if nothing fits."""
    best = None
    for host in hosts:
        if req.fleets and host.fleet not in req.fleets:
            continue
        usable = _usable_blocks(host, req)
        need = _blocks_needed(host, req, usable)
        if need is None:
            continue
        chosen = _choose_blocks(host, usable, need)
        if chosen is None:
            continue
        combo, score = chosen
        gpu_hosts_penalty = 1 if req.gpu_min == 0 and any(b.gpus for b in host.blocks) else 0
        host_score = (gpu_hosts_penalty, host.free_count - need, score, host.fleet, host.num)
        if best is None or host_score < best[0]:
            best = (host_score, host, combo)
    if best is None:
        raise NoCapacity(_refusal(req, hosts), [h.alias for h in hosts])
    _, host, combo = best
    blocks = [b for b in host.blocks if b.idx in combo]
    gpus = tuple(sorted(g for b in blocks for g in b.gpus))
    note = ""
    if req.gpu and req.gpu.count.max is not None and len(gpus) > req.gpu.count.max:
        note = f"gets {len(gpus)} GPUs (asked {req.gpu.count}): the host's blocks hold {len(blocks[0].gpus)} each"
    elif req.gpu_min and len(gpus) > req.gpu_min and (req.gpu.count.max is None or req.gpu.count.min ==
                                                       req.gpu.count.max):
        note = f"gets {len(gpus)} GPUs (asked {req.gpu_min})"
    return Placement(host, tuple(combo), gpus, sum(b.cpus for b in blocks), sum(b.memory_mib for b in blocks), note)


def place_gang(req: Request, hosts: list[HostSlots], nodes: int, cluster_fleets: set[str]) -> list[Placement]:
    """Place a run on ``nodes`` hosts of one `placement: cluster` fleet, all or nothing.

    Without a GPU request each node takes a whole host; with one, every host gets the same
    number of blocks. Rank 0 is the first placement returned."""
    if nodes == 1:
        return [place(req, hosts)]
    whole = req.gpu is None and not req.cpu and not req.memory_gb
    reasons = []
    best = None
    fleets = sorted({h.fleet for h in hosts if not req.fleets or h.fleet in req.fleets})
    for fleet in fleets:
        members = [h for h in hosts if h.fleet == fleet]
        if fleet not in cluster_fleets:
            reasons.append(f"fleet {fleet} is not placement: cluster")
            continue
        if len(members) < nodes:
            reasons.append(f"fleet {fleet} has {len(members)} ready instance{'s' if len(members) != 1 else ''}, "
                           f"the task needs {nodes}")
            continue
        options = []
        for h in members:
            usable = list(h.blocks) if whole else _usable_blocks(h, req)
            need = len(usable) if whole else _blocks_needed(h, req, usable)
            if need is None:
                continue
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
    parts = []
    for h in considered:
        usable = _usable_blocks(h, req)
        if req.gpu_min:
            free = sum(len(b.gpus) for b in usable if b.free)
            total = sum(len(b.gpus) for b in usable)
            parts.append(f"{h.alias} {free}/{total} free")
        else:
            parts.append(f"{h.alias} {sum(b.free for b in usable)}/{len(usable)} blocks free")
    what = req.describe() if req.gpu_min else "CPU-only block"
    return f"no instance has {what} free: " + ", ".join(parts)
