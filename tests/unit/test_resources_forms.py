"""Every form of dstack's `resources` (dstack's src/dstack/_internal/core/models/resources.py, read at
511c318c8): what dstack reads it as, what gpufleet's model holds, and where the allocator places it on
a few small synthetic hosts. Then every `resources:` block of the real dstack files in
../shared/fixtures/dstack-configs.

dstack's rules, from its code: `Range._parse` reads a single value as min = max (exact) and `a..b` as
a range; `Memory.parse` reads a number as GB, `MB`/`GB`/`TB` in any case, spaces dropped; `CPUSpec.parse`
splits `:` parts into a count (has `..` or is digits) and an architecture (x86, arm); `GPUSpec.parse`
splits `:` parts into a vendor, else a name (starts with a letter), else a memory (has a letter), else
a count; `count` defaults to 1.. (DEFAULT_GPU_COUNT); `compute_capability` is a minimum; `DiskSpec`
is a size, a range or {size}.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from gpufleet.allocator import BlockSlot, HostSlots, HostTraits, NoCapacity, Request, place
from gpufleet.models import GPU, Range
from gpufleet.models.run import ResourcesSpec

DSTACK_CONFIGS = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "dstack-configs"


EXT4 = HostTraits(arch="x86", disk_gb=500, runtime="podman", disk_why_not="overlay on ext4")
XFS = HostTraits(arch="x86", disk_gb=1000, runtime="podman", disk_limit=True)


def _host(num: int, alias: str, n: int, model: str | None, mib: int, vendor: str = "nvidia",
          blocks: int | None = None, traits: HostTraits = EXT4) -> HostSlots:
    """``n`` GPUs, one per block (or ``blocks`` GPU-less blocks); every block 8 CPUs and 64000 MiB; x86
    CPUs and 500 GB of container storage that cannot limit a container's disk (``traits``)."""
    gpus = [GPU(index=g, vendor=vendor, model=model, name=f"{vendor} {model}", memory_mib=mib) for g in range(n)]
    slots = [BlockSlot(b, (b,) if n else (), 8, 64000, 0, True) for b in range(n or blocks or 1)]
    return HostSlots(num, "f", num, alias, gpus, slots, traits=traits)


HOSTS = [
    _host(0, "h100", 8, "H100", 81559),  # 80 GB each (81559 MiB, rounded to whole GB as dstack does)
    _host(1, "a100", 8, "A100", 40960),  # 40 GB each
    _host(2, "rtx", 4, "RTX4090", 24564),  # 24 GB each
    _host(3, "mi300x", 8, "MI300X", 196592, vendor="amd"),  # 192 GB each
    _host(4, "cpu", 0, None, 0, blocks=4, traits=XFS),  # no GPUs: 4 blocks of 8 CPUs, 62.5 GB; 1000 GB on xfs
]

R = Range
N = None  # the placement: refused (NoCapacity)
# (resources as YAML, what dstack reads it as, gpufleet's model: {field: value} or the refusal,
#  placement: (host, GPUs, a part of the note) or N)
ROWS = [
    # ---- cpu (CPUSpec)
    ("cpu: 8", "exactly 8 CPUs", {"cpu": R(8, 8)}, ("cpu", 0, "")),
    ("cpu: 12", "exactly 12 CPUs", {"cpu": R(12, 12)}, ("cpu", 0, "gets 16 CPUs (asked 12)")),
    ("cpu: '4..'", "4 CPUs or more", {"cpu": R(4, None)}, ("cpu", 0, "")),
    ("cpu: '..64'", "at most 64 CPUs", {"cpu": R(None, 64)}, ("cpu", 0, "")),
    ("cpu: {min: 1, max: 2}", "1 to 2 CPUs (the {min, max} mapping)", {"cpu": R(1, 2)},
     ("cpu", 0, "gets 8 CPUs (asked 1..2)")),
    ("cpu: {min: 4}", "4 CPUs or more", {"cpu": R(4, None)}, ("cpu", 0, "")),
    ("cpu: {count: '4..8'}", "4 to 8 CPUs, any architecture", {"cpu": R(4, 8)}, ("cpu", 0, "")),
    ("cpu: {count: {min: 2, max: 8}}", "2 to 8 CPUs", {"cpu": R(2, 8)}, ("cpu", 0, "")),
    # an architecture: only hosts whose probe reported it (every host here is x86)
    ("cpu: 'x86:2'", "x86, exactly 2 CPUs", {"cpu_arch": "x86", "cpu_count": R(2, 2)},
     ("cpu", 0, "gets 8 CPUs (asked 2)")),
    ("cpu: '2..:ARM'", "arm, 2 CPUs or more", {"cpu_arch": "arm", "cpu_count": R(2, None)}, N),
    ("cpu: 'arm:4..8'", "arm, 4 to 8 CPUs", {"cpu_arch": "arm", "cpu_count": R(4, 8)}, N),
    ("cpu: x86", "x86, 2.. CPUs (DEFAULT_CPU_COUNT)", {"cpu_arch": "x86", "cpu_count": R(2, None)}, ("cpu", 0, "")),
    ("cpu: {arch: arm, count: {min: 1, max: 2}}", "arm, 1 to 2 CPUs", {"cpu_arch": "arm", "cpu_count": R(1, 2)}, N),
    ("cpu: {arch: x86}", "x86, 2.. CPUs", {"cpu_arch": "x86", "cpu_count": R(2, None)}, ("cpu", 0, "")),
    ("cpu: {arch: X86, count: 16}", "x86, exactly 16", {"cpu_arch": "x86", "cpu_count": R(16, 16)}, ("cpu", 0, "")),
    ("cpu: {arch: mips}", "refused: Invalid CPU architecture", "is not a CPU architecture", N),
    ("cpu: 'mips:2'", "refused: Invalid CPU architecture", "neither a CPU count nor an architecture", N),
    ("cpu: '8:8'", "refused: CPU spec count conflict", "gives the count twice", N),
    ("cpu: '4..2'", "refused: Invalid range order", "is empty", N),
    ("cpu: '..'", "refused: Invalid empty range", "must be a number or a range", N),
    # ---- memory (Range[Memory])
    ("memory: 32GB", "exactly 32 GB", {"memory": R(32, 32)}, ("cpu", 0, "gets 62 GB of memory (asked 32 GB)")),
    ("memory: 64", "exactly 64 GB (a number is GB)", {"memory": R(64, 64)},
     ("cpu", 0, "gets 125 GB of memory (asked 64 GB)")),
    ("memory: 200GB..", "200 GB or more", {"memory": R(200, None)}, ("cpu", 0, "")),
    ("memory: 16 Gb", "exactly 16 GB (any case, spaces dropped)", {"memory": R(16, 16)}, ("cpu", 0, "gets 62 GB")),
    ("memory: 1024MB..", "1 GB or more", {"memory": R(1, None)}, ("cpu", 0, "")),
    ("memory: '1 TB '", "exactly 1024 GB", {"memory": R(1024, 1024)}, N),
    ("memory: 512..1 TB", "512 to 1024 GB (512 is GB)", {"memory": R(512, 1024)}, N),
    ("memory: {min: 512MB, max: 1TB}", "0.5 to 1024 GB", {"memory": R(0.5, 1024)}, ("cpu", 0, "")),
    ("memory: 64GB..32GB", "refused: Invalid range order", "is empty", N),
    ("memory: lots", "refused: not a size", "is not a size", N),
    # ---- gpu (GPUSpec): counts
    ("gpu: 1", "exactly 1 GPU, any", {"gpu.count": R(1, 1)}, ("rtx", 1, "")),
    ("gpu: 2", "exactly 2 GPUs", {"gpu.count": R(2, 2)}, ("rtx", 2, "")),
    ("gpu: '1..8'", "1 to 8 GPUs", {"gpu.count": R(1, 8)}, ("rtx", 1, "")),
    ("gpu: '2..'", "2 GPUs or more", {"gpu.count": R(2, None)}, ("rtx", 2, "")),
    ("gpu: '..2'", "0 to 2 GPUs: none is fine", {"gpu.count": R(None, 2)}, ("cpu", 0, "")),
    ("gpu: 0", "no GPU", {"gpu.count": R(0, 0)}, ("cpu", 0, "")),
    ("gpu: {count: {min: 1, max: 3}}", "1 to 3 GPUs", {"gpu.count": R(1, 3)}, ("rtx", 1, "")),
    # ---- gpu: names and vendors
    ("gpu: H100", "H100, 1.. (DEFAULT_GPU_COUNT)", {"gpu.name": ["H100"], "gpu.count": R(1, None)}, ("h100", 1, "")),
    ("gpu: H100:4", "4 H100", {"gpu.name": ["H100"], "gpu.count": R(4, 4)}, ("h100", 4, "")),
    ("gpu: '8:H200'", "8 H200 (parts in any order)", {"gpu.name": ["H200"], "gpu.count": R(8, 8)}, N),
    ("gpu: A100,H100:2", "2 of A100 or H100", {"gpu.name": ["A100", "H100"], "gpu.count": R(2, 2)},
     ("h100", 2, "")),
    ("gpu: {name: [H100, H200], count: 1..8}", "H100 or H200, 1 to 8", {"gpu.name": ["H100", "H200"]},
     ("h100", 1, "")),
    ("gpu: {name: A100, count: {min: 1, max: 3}}", "A100, 1 to 3", {"gpu.name": ["A100"], "gpu.count": R(1, 3)},
     ("a100", 1, "")),
    ("gpu: {name: tpu-v5p}", "v5p (the deprecated tpu- prefix dropped)", {"gpu.name": ["v5p"]}, N),
    ("gpu: amd:2", "2 AMD GPUs", {"gpu.vendor": "amd", "gpu.count": R(2, 2)}, ("mi300x", 2, "")),
    ("gpu: MI300X:AMD", "MI300X, vendor amd", {"gpu.vendor": "amd", "gpu.name": ["MI300X"]}, ("mi300x", 1, "")),
    ("gpu: Nvidia", "any NVIDIA GPU, 1..", {"gpu.vendor": "nvidia", "gpu.count": R(1, None)}, ("rtx", 1, "")),
    ("gpu: {vendor: NVIDIA}", "any NVIDIA GPU, 1..", {"gpu.vendor": "nvidia"}, ("rtx", 1, "")),
    ("gpu: nvidia:B200:8", "8 NVIDIA B200", {"gpu.vendor": "nvidia", "gpu.name": ["B200"]}, N),
    ("gpu: tpu:v5p-1024", "Google TPU v5p-1024", {"gpu.vendor": "google", "gpu.name": ["v5p-1024"]}, N),
    ("gpu: tt:1", "1 Tenstorrent", {"gpu.vendor": "tenstorrent"}, N),
    ("gpu: tt-galaxy-wh:32", "32 of the model tt-galaxy-wh", {"gpu.name": ["tt-galaxy-wh"]}, N),
    ("gpu: intel:8", "8 Intel accelerators", {"gpu.vendor": "intel"}, N),
    ("gpu: gaudi2:8", "8 of the model gaudi2", {"gpu.name": ["gaudi2"], "gpu.vendor": None}, N),
    # ---- gpu: memory per GPU (a single size is exact)
    ("gpu: 24GB", "1.. GPUs of exactly 24 GB", {"gpu.memory": R(24, 24), "gpu.count": R(1, None)}, ("rtx", 1, "")),
    ("gpu: 80GB:8", "8 GPUs of exactly 80 GB", {"gpu.memory": R(80, 80)}, ("h100", 8, "")),
    ("gpu: 48GB", "1.. GPUs of exactly 48 GB", {"gpu.memory": R(48, 48)}, N),
    ("gpu: 24GB..", "24 GB or more each", {"gpu.memory": R(24, None)}, ("rtx", 1, "")),
    ("gpu: 40GB..", "40 GB or more each", {"gpu.memory": R(40, None)}, ("h100", 1, "")),
    ("gpu: 16GB..32", "16 to 32 GB each (32 is GB)", {"gpu.memory": R(16, 32), "gpu.name": None}, ("rtx", 1, "")),
    ("gpu: 16GB..24GB", "16 to 24 GB each", {"gpu.memory": R(16, 24)}, ("rtx", 1, "")),
    ("gpu: 24GB:1..2", "1 to 2 GPUs of exactly 24 GB", {"gpu.memory": R(24, 24), "gpu.count": R(1, 2)},
     ("rtx", 1, "")),
    ("gpu: A100:40GB", "A100 40 GB, 1..", {"gpu.name": ["A100"], "gpu.memory": R(40, 40)}, ("a100", 1, "")),
    ("gpu: A100:80GB:8", "8 A100 80 GB", {"gpu.memory": R(80, 80)}, N),
    ("gpu: A100:40GB:2", "2 A100 40 GB", {"gpu.count": R(2, 2)}, ("a100", 2, "")),
    ("gpu: 40GB..80GB:4", "4 GPUs of 40 to 80 GB", {"gpu.memory": R(40, 80)}, ("h100", 4, "")),
    ("gpu: nvidia:4:16GB", "4 NVIDIA GPUs of exactly 16 GB", {"gpu.memory": R(16, 16), "gpu.vendor": "nvidia"}, N),
    ("gpu: {memory: 24GB.., count: 1..}", "24 GB or more, 1..", {"gpu.memory": R(24, None)}, ("rtx", 1, "")),
    ("gpu: {count: 2, memory: {min: 40GB, max: 80GB}}", "2 GPUs of 40 to 80 GB", {"gpu.memory": R(40, 80)},
     ("h100", 2, "")),
    # ---- gpu: total memory (all the run's GPUs)
    ("gpu: {name: H100, total_memory: 160GB}", "H100s of exactly 160 GB together",
     {"gpu.total_memory": R(160, 160)}, ("h100", 2, "")),
    ("gpu: {name: H100, total_memory: 100GB}", "H100s of exactly 100 GB together",
     {"gpu.total_memory": R(100, 100)}, ("h100", 2, "gets 160 GB of GPU memory in total (asked 100 GB)")),
    ("gpu: {total_memory: 160GB..}", "GPUs of 160 GB or more together", {"gpu.total_memory": R(160, None)},
     ("a100", 4, "")),
    ("gpu: {name: RTX4090, total_memory: {min: 200GB}}", "more than the host's 4 x 24 GB",
     {"gpu.total_memory": R(200, None)}, N),
    # ---- gpu: compute capability (a minimum in dstack): refused, the probe does not report it
    ("gpu: {compute_capability: 7.5}", "compute capability 7.5 or more", "cannot check a GPU's compute capability", N),
    ("gpu: {name: H100, compute_capability: '9.0'}", "H100, 9.0 or more", "compute capability", N),
    ("gpu: {compute_capability: [8, 0]}", "8.0 or more", "compute capability", N),
    # ---- gpu: refusals dstack makes too
    ("gpu: nvidia:amd", "refused: GPU spec vendor conflict", "gives the vendor twice", N),
    ("gpu: '2:4'", "refused: GPU spec count conflict", "gives the count twice", N),
    ("gpu: 24GB:80GB", "refused: GPU spec memory conflict", "gives the memory twice", N),
    ("gpu: A100:H100", "refused: GPU spec name conflict", "the model was already given", N),
    ("gpu: H100::2", "refused: GPU spec contains empty token", "has an empty part", N),
    ("gpu: 'A100,:2'", "refused: GPU name can not be empty", "empty model name", N),
    ("gpu: {name: H100, cores: 4}", "refused: extra field", "Extra inputs are not permitted", N),
    # ---- shm_size (the launch's: the container's /dev/shm) and disk: the minimum against the host's
    # container storage, the maximum (a single size is one) the container's limit, only where it can be
    ("shm_size: 16GB", "16 GB", {"shm_size": "16GB", "shm_size_mib": 16384}, ("cpu", 0, "")),
    ("shm_size: 16", "16 GB (a number is GB)", {"shm_size": "16GB"}, ("cpu", 0, "")),
    ("shm_size: 512MB", "512 MB", {"shm_size_mib": 512}, ("cpu", 0, "")),
    ("shm_size: big", "refused: not a size", "is not a size", N),
    ("disk: 100GB..", "100 GB or more", {"disk": R(100, None), "disk_limit_mib": None}, ("cpu", 0, "")),
    ("disk: 600GB..", "600 GB or more: only the 1000 GB host", {"disk": R(600, None)}, ("cpu", 0, "")),
    ("disk: 150Gb", "exactly 150 GB: limited to 150 GB, on the host that can", {"disk": R(150, 150),
                                                                               "disk_limit_mib": 153600},
     ("cpu", 0, "")),
    ("disk: {size: 2TB..}", "2048 GB or more ({size}): no host has it", {"disk": R(2048, None)}, N),
    ("disk: ..200GB", "at most 200 GB: a limit", {"disk": R(None, 200)}, ("cpu", 0, "")),
    ("disk: 200GB..100GB", "refused: Invalid range order", "is empty", N),
    # ---- together
    ("{gpu: 'H100:2', cpu: 16, memory: 100GB..}", "2 H100, exactly 16 CPUs, 100 GB or more",
     {"gpu.count": R(2, 2), "cpu": R(16, 16), "memory": R(100, None)}, ("h100", 2, "")),
]


def _get(spec: ResourcesSpec, dotted: str):
    value = spec
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("text,dstack,model,placed", ROWS, ids=[r[0] for r in ROWS])
def test_every_form_of_dstack_resources(text: str, dstack: str, model, placed) -> None:
    data = yaml.safe_load(text if text.startswith("{") else text)
    if isinstance(model, str):  # refused at load, saying why
        with pytest.raises(ValueError, match=None) as e:
            ResourcesSpec.model_validate(data)
        assert model in str(e.value), f"{text} ({dstack}): {e.value}"
        return
    spec = ResourcesSpec.model_validate(data)
    got = {field: _get(spec, field) for field in model}
    assert got == model, f"{text} ({dstack})"
    # read back as the server stores it (model_dump(mode="json")): the same
    assert ResourcesSpec.model_validate(spec.model_dump(mode="json")) == spec
    req = Request(gpu=spec.gpu, cpu=spec.cpu_count, memory_gb=spec.memory, arch=spec.cpu_arch, disk=spec.disk)
    if placed is None:
        with pytest.raises(NoCapacity):
            place(req, HOSTS)
        return
    alias, gpus, note = placed
    p = place(req, HOSTS)
    assert (p.host.alias, len(p.gpus)) == (alias, gpus), f"{text} ({dstack}): {p}"
    assert note in p.note if note else p.note == "", f"{text}: note {p.note!r}"


def test_rows_cover_every_field_of_dstack_resources() -> None:
    written = " ".join(r[0] for r in ROWS)
    for field in ("cpu:", "arch:", "count:", "min:", "max:", "memory:", "gpu:", "name:", "vendor:",
                  "total_memory:", "compute_capability:", "shm_size:", "disk:", "size:"):
        assert field in written, field


def test_gpu_memory_is_exact_or_a_range_as_in_dstack() -> None:
    """`gpu: 24GB` was `24GB..` here before: now exactly 24 GB, so a 24 GB and an 80 GB host differ."""
    spec = ResourcesSpec.model_validate({"gpu": "24GB"})
    with pytest.raises(NoCapacity):
        place(Request(gpu=spec.gpu), [HOSTS[0], HOSTS[1]])
    assert place(Request(gpu=spec.gpu), HOSTS).host.alias == "rtx"
    unknown = _host(9, "unknown-memory", 2, "H100", 0)
    unknown.gpus[:] = [g.model_copy(update={"memory_mib": None}) for g in unknown.gpus]
    with pytest.raises(NoCapacity):  # a memory that cannot be checked does not match
        place(Request(gpu=ResourcesSpec.model_validate({"gpu": "80GB"}).gpu), [unknown])


def test_a_host_within_the_maximum_comes_first() -> None:
    """`gpu: 2` (exactly 2): dstack matches only an offer of 2 GPUs; gpufleet prefers the host whose
    blocks give exactly 2, and gives a bigger block (saying so) only when no host can."""
    pairs = _host(0, "pairs", 0, None, 0)
    pairs = HostSlots(0, "f", 0, "pairs", [GPU(index=g, vendor="nvidia", model="H100", memory_mib=81559)
                                           for g in range(8)],
                      [BlockSlot(b, (2 * b, 2 * b + 1), 16, 128000, 0, True) for b in range(4)])
    quads = HostSlots(1, "f", 1, "quads", pairs.gpus,
                      [BlockSlot(b, tuple(range(4 * b, 4 * b + 4)), 32, 256000, 0, b != 0) for b in range(2)])
    req = Request(gpu=ResourcesSpec.model_validate({"gpu": "H100:2"}).gpu)
    p = place(req, [quads, pairs])
    assert (p.host.alias, len(p.gpus), p.note) == ("pairs", 2, "")
    p = place(req, [quads])
    assert len(p.gpus) == 4 and "gets 4 GPUs (asked 2)" in p.note


# ------------------------------------------------------------------ the real files

def _real_resources() -> list[tuple[str, object]]:
    results = json.loads((DSTACK_CONFIGS / "dstack_results.json").read_text())
    out = []
    with open(DSTACK_CONFIGS / "manifest.tsv") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if row["dup_of"] != "-" or not results[row["id"]]["ok"] or \
                    row["dstack_type"] not in ("task", "service", "dev-environment"):
                continue  # dstack's own parser accepts it, unique, a run (fleets have no resources here)
            data = yaml.safe_load((DSTACK_CONFIGS / row["file"]).read_text())
            if isinstance(data, dict) and "resources" in data:
                out.append((row["id"], data["resources"]))
    return out


def test_every_resources_block_of_the_real_dstack_files_parses() -> None:
    """Every `resources:` of the real run files dstack accepts parses (those naming a CPU architecture too)."""
    assert DSTACK_CONFIGS.is_dir(), f"{DSTACK_CONFIGS} is missing (real dstack files, read from shared/)"
    blocks = _real_resources()
    archs = 0
    for _ident, resources in blocks:
        spec = ResourcesSpec.model_validate(resources)
        archs += spec.cpu_arch is not None
    assert (len(blocks), archs) == (190, 4)


def _traits_host(alias: str, traits: HostTraits | None) -> HostSlots:
    return HostSlots(0, "f", 0, alias, [], [BlockSlot(0, (), 8, 64000, 0, True)], traits=traits)


def test_a_cpu_architecture_places_only_on_hosts_that_have_it() -> None:
    arm = HostTraits(arch="arm", disk_gb=100)
    spec = ResourcesSpec.model_validate({"cpu": "2..:arm"})
    req = Request(cpu=spec.cpu_count, arch=spec.cpu_arch)
    assert place(req, [_traits_host("graviton", arm), HOSTS[4]]).host.alias == "graviton"
    with pytest.raises(NoCapacity) as e:
        place(req, [HOSTS[4], _traits_host("old", None)])
    assert str(e.value) == ("no host can take it: old: its CPU architecture is not known (apply its fleet again "
                            "to probe it); the run asks for arm; cpu: its CPUs are x86, the run asks for arm")


def test_disk_reasons_name_the_host() -> None:
    spec = ResourcesSpec.model_validate({"disk": "100GB"})
    req = Request(disk=spec.disk)
    with pytest.raises(NoCapacity) as e:
        place(req, [_traits_host("198.19.0.10", EXT4)])
    assert str(e.value) == ("no host can take it: resources.disk: 100GB: podman on 198.19.0.10 cannot limit a "
                            "container's disk (overlay on ext4); remove it or use a host with xfs project quotas")
    with pytest.raises(NoCapacity) as e:
        place(Request(disk=ResourcesSpec.model_validate({"disk": "800GB.."}).disk), [_traits_host("small", EXT4)])
    assert "small: resources.disk: 800GB..: its container storage is 500GB, less than 800GB" in str(e.value)
    with pytest.raises(NoCapacity) as e:
        place(req, [_traits_host("old", None)])
    assert "old: the size of its container storage is not known" in str(e.value)


def test_host_traits_from_probe_facts() -> None:
    probe = {"cpu": {"count": 8, "arch": "arm"}, "disk": {"total_mib": 512000},
             "runtime": {"name": "podman", "storage": {"driver": "overlay", "backing_fs": "ext4",
                                                       "size_limit": False, "why_not": "overlay on ext4"}}}
    assert HostTraits.of(probe) == HostTraits("arm", 500.0, "podman", False, "overlay on ext4")
    assert HostTraits.of({"cpu": {"count": 8}}) == HostTraits()  # probed before these facts
