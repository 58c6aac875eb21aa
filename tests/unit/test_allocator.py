"""Placement: smallest number of whole blocks, best fit, aligned runs, NUMA, clear refusals."""

from __future__ import annotations

import pytest

from gpufleet.allocator import BlockSlot, HostSlots, NoCapacity, Request, place
from gpufleet.models import GPU, GPUSpec


def host(num: int, n: int = 8, per: int = 1, busy: set[int] = frozenset(), model: str = "H100",
         numa=lambda g: g // 4, vendor: str = "nvidia", mem: int = 81559) -> HostSlots:
    gpus = [GPU(index=g, vendor=vendor, model=model, name=f"NVIDIA {model}", memory_mib=mem, numa_node=numa(g))
            for g in range(n)]
    blocks = []
    for b in range(max(n // per, 1) if n else 1):
        members = tuple(range(b * per, (b + 1) * per)) if n else ()
        nodes = {numa(g) for g in members}
        blocks.append(BlockSlot(b, members, 8, 64000, nodes.pop() if len(nodes) == 1 else None, b not in busy))
    return HostSlots(num, "f", num, f"node-{num}", gpus, blocks)


def req(spec) -> Request:
    return Request(gpu=GPUSpec.model_validate(spec))


def test_best_fit_prefers_the_host_left_with_fewest_free_blocks():
    p = place(req("H100:4"), [host(0), host(1, busy={0, 1})])
    assert p.host.alias == "node-1" and p.gpus == (4, 5, 6, 7)


def test_aligned_contiguous_blocks():
    p = place(req(2), [host(0, n=4)])
    assert p.blocks == (0, 1)
    p = place(req(2), [host(0, n=4, busy={0})])
    assert p.blocks == (2, 3)  # not 1-2: keeps 0..1 vs 2..3 halves whole


def test_blocks_do_not_straddle_numa_when_avoidable():
    # free: 3 (numa 0), 4, 5 (numa 1): a 2-GPU job takes 4-5, not 3-4
    p = place(req(2), [host(0, busy={0, 1, 2, 6, 7})])
    assert p.blocks == (4, 5)


def test_whole_blocks_and_the_note_when_more_than_asked():
    p = place(req(2), [host(0, n=8, per=4)])
    assert len(p.gpus) == 4 and "gets 4 GPUs" in p.note


def test_model_vendor_and_memory_filters():
    hosts = [host(0, model="L40S", mem=46068), host(1, model="MI300X", vendor="amd", mem=196592)]
    assert place(req("amd:2"), hosts).host.alias == "node-1"
    assert place(req("L40S:1"), hosts).host.alias == "node-0"
    assert place(req("100GB..:1"), hosts).host.alias == "node-1"
    with pytest.raises(NoCapacity):
        place(req("H100:1"), hosts)


def test_refusal_shows_what_is_free():
    with pytest.raises(NoCapacity) as e:
        place(req("H100:4"), [host(0, busy={0, 1, 2, 3, 4, 5}), host(1, busy=set(range(8)))])
    assert str(e.value) == "no instance has 4 H100 free: node-0 2/8 free, node-1 0/8 free"


def test_cpu_only_runs_prefer_hosts_without_gpus():
    p = place(Request(), [host(0), host(1, n=0)])
    assert p.host.alias == "node-1" and p.gpus == ()


def test_fleets_filter():
    h = host(0)
    with pytest.raises(NoCapacity, match="no ready instance in fleets other"):
        place(Request(gpu=GPUSpec.model_validate(1), fleets=("other",)), [h])


def _shaped(h: HostSlots, fleet: str) -> HostSlots:
    shape = (tuple((g.vendor, g.model, g.memory_mib) for g in h.gpus),
             tuple((b.idx, b.gpus, b.numa_node) for b in h.blocks))
    return HostSlots(h.instance_id, fleet, h.num, h.alias, h.gpus, h.blocks, shape)


def test_grouped_placement_chooses_exactly_as_host_by_host():
    """HostIndex looks at one host per (fleet, shape, free blocks): on random states it must pick
    the same host and blocks as scoring every host on its own (hosts without a shape)."""
    import random

    from gpufleet.allocator import HostIndex

    rng = random.Random(11)
    specs = [1, 2, 3, 4, 8, "H100:2", "A100:1", "2..4", "H100:80GB:4"]
    for _ in range(300):
        hosts = []
        for num in range(rng.randint(1, 12)):
            n, per = rng.choice([(8, 1), (8, 2), (4, 1), (8, 4)])
            model = rng.choice(["H100", "H100", "A100"])
            busy = {b for b in range(n // per) if rng.random() < 0.4}
            hosts.append(host(num, n=n, per=per, busy=busy, model=model))
        fleets = [rng.choice(["f", "g"]) for _ in hosts]
        pairs = list(zip(hosts, fleets, strict=True))
        plain = [HostSlots(h.instance_id, f, h.num, h.alias, h.gpus, h.blocks) for h, f in pairs]
        index = HostIndex([_shaped(h, f) for h, f in pairs])
        r = req(rng.choice(specs))
        try:
            want = place(r, plain)
        except NoCapacity as e:
            with pytest.raises(NoCapacity) as got:
                place(r, index)
            assert str(got.value) == str(e)
            continue
        got = place(r, index)
        assert (got.host.instance_id, got.blocks, got.gpus, got.note) == \
            (want.host.instance_id, want.blocks, want.gpus, want.note)


def test_index_follows_put_and_remove():
    from gpufleet.allocator import HostIndex

    index = HostIndex([_shaped(host(n), "f") for n in range(4)])
    assert place(req(8), index).host.num == 0  # ties go to the lowest num
    index.put(_shaped(host(0, busy={0}), "f"))
    assert place(req(8), index).host.num == 1
    assert place(req(1), index).host.num == 0  # best fit: the host already in use
    index.remove(0)
    index.remove(1)
    assert len(index) == 2 and place(req(1), index).host.num == 2


def test_index_copy_is_independent_and_groups_count_members():
    from gpufleet.allocator import HostIndex
    a, b = _shaped(host(0), "f"), _shaped(host(1), "f")
    index = HostIndex([a, b])
    assert [(h.num, n) for h, n in index.groups()] == [(0, 2)]
    other = index.copy()
    other.put(_shaped(host(1, busy={0}), "f"))
    assert sorted(n for _, n in other.groups()) == [1, 1] and [(h.num, n) for h, n in index.groups()] == [(0, 2)]
    assert index.get(1) is b and other.get(1) is not b and index.get(7) is None
