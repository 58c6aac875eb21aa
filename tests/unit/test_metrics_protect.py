"""What the leader does with samples beyond storing them: withhold faulty GPUs and GPUs used outside
gpufleet, and stop a run that breaks its utilization_policy (a real SQLite store)."""

from pathlib import Path

from gpufleet.allocator import Request, place
from gpufleet.blocks import split
from gpufleet.metrics.protect import describe, idle_runs, withheld_of, withhold
from gpufleet.models import GPU, GPUSpec, HostFacts, RunStatus
from gpufleet.models.metrics import GpuProcess, GpuSample, HostSample
from gpufleet.state import Store


def store_with_host(tmp_path: Path, n: int = 2) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    gpus = [GPU(index=i, vendor="nvidia", model="H100", memory_mib=81559, uuid=f"GPU-{i}") for i in range(n)]
    store.save_fleet("f", "f.yml", {"type": "fleet"})
    store.record_instance("f", "x", "x", 22, "ready", "", f"{n}xH100", HostFacts(gpus=gpus, cpu={"count": 8},
                                                                                    memory_mib=64000),
                          split(gpus, "auto", 8, 64000))
    return store


def sample(gpus: list[GpuSample], processes: list[GpuProcess] = (), error: str = "") -> HostSample:
    return HostSample(fleet="f", alias="x", at=1000.0, gpus=gpus, processes=list(processes), error=error)


def outside_of(s: HostSample) -> dict[int, list[GpuProcess]]:
    out: dict[int, list[GpuProcess]] = {}
    for p in s.processes:
        if p.container is None:
            out.setdefault(p.gpu_index, []).append(p)
    return out


def test_faulty_before_outside_and_a_stable_reason():
    stray = GpuProcess(vendor="nvidia", gpu_index=1, pid=4242, name="/usr/bin/python3", memory_mib=30000)
    s = sample([GpuSample(index=0, vendor="nvidia", faults=["2 uncorrected ECC errors", "retired pages pending"]),
                GpuSample(index=1, vendor="nvidia")], [stray])
    assert withheld_of(s, outside_of(s)) == {
        ("nvidia", 0): ("unhealthy", "2 uncorrected ECC errors; retired pages pending"),
        ("nvidia", 1): ("outside", "pid 4242 (/usr/bin/python3) in no gpufleet run")}
    many = [GpuProcess(vendor="nvidia", gpu_index=1, pid=p) for p in range(5)]
    assert describe(many) == "pid 0, pid 1, pid 2 and 2 more in no gpufleet run"


def test_withhold_follows_the_samples_and_an_unread_host_keeps_its_state(tmp_path):
    store = store_with_host(tmp_path)
    stray = GpuProcess(vendor="nvidia", gpu_index=1, pid=4242, name="burn")
    withhold(store, [sample([GpuSample(index=0, vendor="nvidia"), GpuSample(index=1, vendor="nvidia")], [stray])],
             outside_of)
    assert list(store.withheld()[("f", "x")]) == [("nvidia", 1)]
    withhold(store, [sample([], error="x: no answer within 20s")], outside_of)
    assert list(store.withheld()[("f", "x")]) == [("nvidia", 1)]
    withhold(store, [sample([GpuSample(index=0, vendor="nvidia"), GpuSample(index=1, vendor="nvidia")])], outside_of)
    assert store.withheld() == {}


def test_an_idle_run_is_stopped_naming_the_gpu(tmp_path):
    store = store_with_host(tmp_path, n=3)
    spec = {"type": "task", "utilization_policy": {"min_gpu_utilization": 10, "time_window": 600.0}}
    req = Request(gpu=GPUSpec.model_validate(1))
    for name in ("idle", "busy", "plain"):
        store.allocate(name, name, "task", spec if name != "plain" else {"type": "task"}, f"c-{name}",
                       lambda hosts: place(req, hosts))
        store.set_run_status(name, RunStatus.RUNNING)
    now = float(int(store.run("idle").started_at) + 700)
    times = range(int(now) - 700, int(now) + 1, 10)
    points = {"idle": {("x", 0): [(t, 3.0) for t in times]},
              "busy": {("x", 1): [(t, 3.0 if t < now - 100 else 90.0) for t in times]}}
    asked = []

    def series(run: str, since: float):
        asked.append((run, since))
        return points.get(run, {})

    assert idle_runs(store, series, min(r.started_at for r in store.runs()) + 599) == []  # not a window yet
    assert asked == []
    work = idle_runs(store, series, now)
    assert len(work) == 1
    assert sorted(asked) == [("busy", now - 660), ("idle", now - 660)]  # never the run without a policy
    assert store.run("idle").status == RunStatus.STOPPING
    assert store.run("busy").status == RunStatus.RUNNING
    message = [e.message for e in store.events(run="idle") if "utilization_policy" in e.message]
    assert message and "GPU 0 on x stayed below 10% for 10m (at most 3% in 61 samples)" in message[0]
