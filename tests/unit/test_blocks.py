from __future__ import annotations

import pytest

from gpufleet.blocks import BlocksError, describe_resources, split
from gpufleet.models import GPU


def gpus(n: int, model: str = "H100", numa=lambda i: i // 4, mem: int = 81559) -> list[GPU]:
    return [GPU(index=i, vendor="nvidia", model=model, memory_mib=mem, numa_node=numa(i)) for i in range(n)]


def test_auto_is_one_block_per_gpu_and_one_for_cpu_hosts() -> None:
    assert [b.gpus for b in split(gpus(8), "auto", 64, 8000)] == [(i,) for i in range(8)]
    cpu = split([], "auto", 4, 1000)
    assert len(cpu) == 1 and cpu[0].gpus == () and cpu[0].cpus == 4


def test_blocks_must_divide_gpu_count() -> None:
    with pytest.raises(BlocksError, match="8 GPUs cannot be split into 3 blocks"):
        split(gpus(8), 3, 64, 8000)
    with pytest.raises(BlocksError, match="no GPUs"):
        split([], 2, 4, 1000)


def test_blocks_do_not_straddle_numa_nodes() -> None:
    # GPUs interleaved across two NUMA nodes: 0,2,4,6 on node 0
    layout = split(gpus(8, numa=lambda i: i % 2), 2, 64, 8000)
    assert [b.gpus for b in layout] == [(0, 2, 4, 6), (1, 3, 5, 7)]
    assert [b.numa_node for b in layout] == [0, 1]
    assert all(b.cpus == 32 and b.memory_mib == 4000 for b in layout)


def test_mixed_models_are_kept_apart() -> None:
    host = gpus(4, "H100") + [g.model_copy(update={"model": "L40S"}) for g in gpus(4)]
    layout = split(host, 2, 8, 800)
    assert [{host[i].model for i in b.gpus} for b in layout] == [{"H100"}, {"L40S"}]
    assert describe_resources(host, 8, 800) == "4xH100 (80GB), 4xL40S (80GB)"


def test_describe_cpu_host() -> None:
    assert describe_resources([], 2, 24 * 1024) == "cpu=2 mem=24GB"
