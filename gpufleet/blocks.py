"""Slice a host into blocks: each block owns a fixed set of GPUs and a share of CPU and memory."""

from __future__ import annotations

from dataclasses import dataclass

from gpufleet.models import GPU


class BlocksError(ValueError):
    """The host cannot be split as asked; the message says why."""


@dataclass(frozen=True)
class Block:
    index: int
    gpus: tuple[int, ...]  # positions in the host's probed GPU list
    cpus: int
    memory_mib: int
    numa_node: int | None  # set when all of the block's GPUs are on one NUMA node


def block_count(spec: int | str, gpu_count: int) -> int:
    if spec == "auto":
        return max(gpu_count, 1)
    return int(spec)


def split(gpus: list[GPU], spec: int | str, cpus: int, memory_mib: int) -> list[Block]:
    """Split a host with ``gpus`` (its probed GPUs) into blocks.

    GPUs are grouped so that a block holds one model and, where a split exists that
    allows it, GPUs of one NUMA node. CPU and memory are divided evenly.
    """
    n = block_count(spec, len(gpus))
    if gpus:
        if len(gpus) % n:
            raise BlocksError(f"{len(gpus)} GPUs cannot be split into {n} blocks "
                              f"(blocks must divide the GPU count, or be auto)")
    elif n > 1:
        raise BlocksError(f"the host has no GPUs, so it cannot be split into {n} blocks (use blocks: 1 or auto)")
    per_block = len(gpus) // n if gpus else 0
    order = sorted(range(len(gpus)), key=lambda i: _grouping_key(gpus[i]))
    groups = _groups(order, gpus, per_block)
    blocks = []
    for b, members in enumerate(groups):
        numas = {gpus[i].numa_node for i in members}
        numa = numas.pop() if len(numas) == 1 else None
        blocks.append(Block(b, tuple(sorted(members)), max(cpus // n, 1) if cpus else 0, memory_mib // n, numa))
    return blocks


def _grouping_key(gpu: GPU) -> tuple:
    numa = gpu.numa_node
    return (gpu.vendor or "", gpu.model or "", numa if numa is not None else 1 << 30, gpu.index)


def _groups(order: list[int], gpus: list[GPU], size: int) -> list[tuple[int, ...]]:
    """Chunk GPUs into blocks of ``size``: whole chunks from each (model, NUMA) group first,
    then the leftovers of all groups, in order, so at most the leftovers straddle."""
    if size == 0:
        return [()]
    by_group: dict[tuple, list[int]] = {}
    for i in order:
        key = _grouping_key(gpus[i])[:3]
        by_group.setdefault(key, []).append(i)
    blocks: list[tuple[int, ...]] = []
    rest: list[int] = []
    for members in by_group.values():
        whole = len(members) - len(members) % size
        blocks += [tuple(members[k:k + size]) for k in range(0, whole, size)]
        rest += members[whole:]
    blocks += [tuple(rest[k:k + size]) for k in range(0, len(rest), size)]
    return blocks


def describe_resources(gpus: list[GPU], cpus: int, memory_mib: int) -> str:
    """`8xH100 (80GB)`, `4xH100 (80GB), 4xL40S (45GB)`, or `cpu=2 mem=23GB` for a host without GPUs."""
    if not gpus:
        return f"cpu={cpus} mem={round(memory_mib / 1024)}GB"
    counts: dict[tuple[str, int | None], int] = {}
    for g in gpus:
        key = (g.model or g.name or "GPU", g.memory_mib)
        counts[key] = counts.get(key, 0) + 1
    parts = []
    for (model, mem), count in counts.items():
        parts.append(f"{count}x{model}" + (f" ({round(mem / 1024)}GB)" if mem else ""))
    return ", ".join(parts)
