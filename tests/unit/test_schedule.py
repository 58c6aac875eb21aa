"""dstack's `schedule` (cron, UTC): the cron expressions as dstack reads them (APScheduler 3's
from_crontab: 0 is Monday, every field must match), the scheduler's rule (a scheduled run is not
eligible before its time), and the queue on a real store: a scheduled run waits for its time,
starts then, waits for the next time after it ends, until a user stops it."""

# ruff: noqa: F811 (the fixtures imported from fakeapi are the tests' arguments)
from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from fakeapi import api, gf, server, write  # noqa: F401 (pytest fixtures)
from test_scheduler import gpus, host, run

from gpufleet import queue
from gpufleet.allocator import Request, place
from gpufleet.blocks import split
from gpufleet.errors import ConfigError, GpufleetError
from gpufleet.models import GPU, GPUSpec, HostFacts, RunStatus
from gpufleet.models.cron import next_start, parse_cron, utc_text
from gpufleet.models.run import ScheduleSpec
from gpufleet.runconfig import load_run, parse_run
from gpufleet.scheduler import Waiting, decide
from gpufleet.state import Store

DSTACK_CONFIGS = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "dstack-configs"


def at(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()


def nxt(cron: str, now: str) -> str:
    return utc_text(next_start([cron], at(now)))


# ------------------------------------------------------------------ cron, as dstack reads it

NOW = "2026-12-03 11:20:30"  # a Thursday
CRONS = [
    # dstack's docs' examples
    ("15 23 * * *", "2026-12-03 23:15 UTC"),  # every day at 23:15
    ("0 8 * * mon-fri", "2026-12-04 08:00 UTC"),  # 8:00 Monday to Friday
    ("0 * * * *", "2026-12-03 12:00 UTC"),
    ("15,45 10 * * *", "2026-12-04 10:15 UTC"),
    ("0 1-3 * * *", "2026-12-04 01:00 UTC"),
    ("*/10 8-10 * * *", "2026-12-04 08:00 UTC"),
    ("* * * * *", "2026-12-03 11:21 UTC"),  # the next whole minute
    ("*/7 * * * *", "2026-12-03 11:21 UTC"),  # 0, 7, 14, 21 ...
    ("5/15 * * * *", "2026-12-03 11:35 UTC"),  # N/S: 5, 20, 35, 50
    ("10-40/10 11 * * *", "2026-12-03 11:30 UTC"),
    # day of week: 0 is Monday (dstack's docs; APScheduler 3), names in any case
    ("0 9 * * 0", "2026-12-07 09:00 UTC"),  # Monday
    ("0 9 * * 6", "2026-12-06 09:00 UTC"),  # Sunday
    ("0 9 * * SUN", "2026-12-06 09:00 UTC"),
    ("0 9 * * sat,sun", "2026-12-05 09:00 UTC"),
    ("0 9 * * 3", "2026-12-10 09:00 UTC"),  # Thursday: 9:00 today is past
    # months by number and name; the last day of the month
    ("0 0 1 jan *", "2027-01-01 00:00 UTC"),
    ("0 0 1 Mar-May *", "2027-03-01 00:00 UTC"),
    ("30 6 last * *", "2026-12-31 06:30 UTC"),
    ("0 0 last feb *", "2027-02-28 00:00 UTC"),
    # day of month AND day of week (APScheduler's rule, not POSIX's "either")
    ("0 0 1 * 0", "2027-02-01 00:00 UTC"),  # the 1st that is a Monday
    ("0 0 29 2 *", "2028-02-29 00:00 UTC"),
    ("0 0 13 * fri", "2027-08-13 00:00 UTC"),
]


@pytest.mark.parametrize("cron,expected", CRONS)
def test_next_start_as_dstack_computes_it(cron, expected):
    assert nxt(cron, NOW) == expected


def test_now_on_the_minute_is_that_minute_and_a_list_takes_the_earliest():
    assert nxt("15 23 * * *", "2026-12-03 23:15:00") == "2026-12-03 23:15 UTC"
    assert utc_text(next_start(["15 23 * * *", "0 12 * * *"], at(NOW))) == "2026-12-03 12:00 UTC"
    assert next_start(["* * * * *"], at("2026-12-03 11:20:00")) == at("2026-12-03 11:20:00")
    assert next_start(["* * * * *"], at("2026-12-03 11:20:00") + 0.001) == at("2026-12-03 11:21:00")


@pytest.mark.parametrize("cron,message", [
    ("* * * *", "has 4 fields; a cron expression has 5"),
    ("0 0 * * * *", "has 6 fields"),
    ("@daily", "cron nicknames are not taken"),
    ("* * * * 7", "day of week 7 is out of range 0-6 (0 is Monday, as in dstack; Sunday is 6 or sun)"),
    ("60 * * * *", "minute 60 is out of range 0-59"),
    ("0 24 * * *", "hour 24 is out of range 0-23"),
    ("0 0 0 * *", "day of month 0 is out of range 1-31"),
    ("0 0 * 13 *", "month 13 is out of range 1-12"),
    ("*/0 * * * *", "a step must be 1 or more"),
    ("*/60 * * * *", "the step /60 is larger than the span"),
    ("30-10 * * * *", "the range '30-10' runs backwards"),
    ("0 0 * * fri-mon", "the range 'fri-mon' runs backwards"),
    ("0 8 * * mon-fri/2", "names take no step or suffix (dstack would ignore '/2')"),
    ("0 0 * * monday", "'monday' is not one of mon, tue"),
    ("0 0 ? * *", "'?' is not a cron value"),
    ("0 0 L * *", "'L' is not a cron value"),
    ("0 0 * * 5#2", "'5#2' is not a cron value"),
    ("0 0 1,,2 * *", "has an empty item"),
    ("0 0 30 2 *", "never fires"),
    ("0 0 31 apr,jun *", "never fires"),
])
def test_cron_refusals_say_which_field_and_why(cron, message):
    with pytest.raises(ValueError) as e:
        parse_cron(cron)
    assert message in str(e.value), str(e.value)


def test_every_schedule_of_real_dstack_files_is_read():
    assert DSTACK_CONFIGS.is_dir(), f"{DSTACK_CONFIGS} is missing (real dstack files, read from shared/)"
    seen = set()
    for path in sorted((DSTACK_CONFIGS / "corpus").rglob("*.yml")):
        data = yaml.safe_load(path.read_text())
        if isinstance(data, dict) and "schedule" in data:
            seen.update(ScheduleSpec.model_validate(data["schedule"]).cron)
    assert seen == {"15 23 * * *", "0 8 * * mon-fri"}


# ------------------------------------------------------------------ the run configuration

def _load(tmp_path: Path, text: str):
    path = tmp_path / "run.yml"
    path.write_text(text)
    return load_run(path), path


@pytest.mark.parametrize("kind", ["task", "service", "dev-environment"])
def test_schedule_in_dstacks_two_forms(tmp_path, kind):
    port = "port: 8000\n" if kind == "service" else ""
    one, _ = _load(tmp_path, f"type: {kind}\nimage: busybox\n{port}schedule:\n  cron: '15 23 * * *'\n")
    assert one.config.schedule.cron == ["15 23 * * *"]
    two, _ = _load(tmp_path, f"type: {kind}\nimage: busybox\n{port}schedule:\n  cron: ['0 8 * * mon-fri', "
                             f"'0 20 * * sat,sun']\n")
    assert two.config.schedule.cron == ["0 8 * * mon-fri", "0 20 * * sat,sun"]
    assert two.config.schedule.next_start(at(NOW)) == at("2026-12-04 08:00:00")
    assert two.config.model_dump(mode="json")["schedule"] == {"cron": ["0 8 * * mon-fri", "0 20 * * sat,sun"]}


@pytest.mark.parametrize("body,where,message", [
    ("schedule:\n  cron: '0 8 * * mon-fri/2'\n", "4:9: schedule.cron", "day of week: 'mon-fri/2': names take no "
                                                                      "step"),
    ("schedule:\n  cron:\n    - '15 23 * * *'\n    - 5\n", "6:7: schedule.cron[1]", "must be a cron expression in "
                                                                                 "quotes"),
    ("schedule:\n  cron: []\n", "4:9: schedule.cron", "needs at least one cron expression"),
    ("schedule: '15 23 * * *'\n", "3:11: schedule", ""),
    ("schedule:\n  cron: '15 23 * * *'\n  timezone: CET\n", "5:3: schedule.timezone", "unknown field"),
])
def test_a_bad_schedule_is_refused_with_its_line(tmp_path, body, where, message):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, f"type: task\nimage: busybox\n{body}")
    text = "\n".join(map(str, e.value.problems))
    assert f"run.yml:{where}: {message}" in text, text


# ------------------------------------------------------------------ the scheduler: not eligible before its time

def test_a_scheduled_run_is_not_eligible_before_its_time():
    early = Waiting("nightly", gpus(8), 50.0, not_before=100.0)
    d = decide([early, run("other", 2, t=60)], [host(0)], [], now=99.0)
    assert [s.run.run_id for s in d.starts] == ["other"] and not d.reservations and not d.refused
    d = decide([early], [host(0)], [], now=100.0)
    assert [s.run.run_id for s in d.starts] == ["nightly"]


def test_before_its_time_it_is_neither_head_nor_refused_nor_held():
    never = Waiting("huge", gpus(16), 0.0, not_before=100.0)  # more GPUs than any host: refused only once due
    head = Waiting("big", gpus(8), 0.0, not_before=100.0)
    d = decide([never, head, run("small", 2, t=5)], [host(0, busy={0, 1})], [], now=50.0)
    assert [s.run.run_id for s in d.starts] == ["small"] and not d.reservations and not d.refused and not d.held
    d = decide([never, head], [host(0, busy={0, 1})], [], now=100.0)
    assert [r.run_id for r in d.refused] == ["huge"] and [r.run_id for r in d.reservations] == ["big"]


# ------------------------------------------------------------------ the queue on a real store

RUN = ("type: task\nname: nightly\nimage: busybox\ncommands: [echo hi]\nenv: [HF_TOKEN]\nresources: {gpu: 2}\n"
       "schedule:\n  cron: '* * * * *'\n")


def _seal(values: dict[str, str]) -> str:
    return "sealed:" + json.dumps(values)


@pytest.fixture()
def store(tmp_path) -> Store:
    s = Store(f"sqlite:///{tmp_path / 'state.db'}")
    s.save_fleet("f", "f.yml", {"type": "fleet"})
    gs = [GPU(index=i, vendor="nvidia", model="H100", memory_mib=81559, uuid=f"GPU-{i}") for i in range(2)]
    s.record_instance("f", "a", "a", 22, "ready", "", "2xH100", HostFacts(gpus=gs, cpu={"count": 8}, memory_mib=64000),
                      split(gs, "auto", 8, 64000))
    return s


def _hog(store: Store) -> None:
    """Another run holds both GPUs."""
    store.allocate("hog", "h1", "task", {"type": "task", "image": "busybox"}, "gpufleet-hog",
                   lambda index: place(Request(gpu=GPUSpec.model_validate(2)), index))


def _submit(store: Store, text: str = RUN, **kw):
    req = parse_run(text, "nightly.yml", secrets={"HF_TOKEN": "hf-s3cret"})
    return queue.submit(store, req, _seal, **kw)


def _schedule(store: Store, now: float) -> list[str]:
    launched = []
    queue.schedule(store, lambda r, placements: launched.append(r.name), now=now)
    return launched


def test_a_scheduled_run_waits_for_its_time_runs_then_waits_for_the_next(store, tmp_path):
    run_, placements = _submit(store)
    assert placements is None and run_.status == RunStatus.PENDING and run_.next_at is not None
    assert run_.message == f"scheduled: next {utc_text(run_.next_at)}"
    assert run_.next_at % 60 == 0 and 0 < run_.next_at - run_.created_at <= 60
    first_id = run_.run_id
    assert _schedule(store, run_.next_at - 1) == []  # not before its time, though it fits
    assert store.run("nightly").message.startswith("scheduled: next ")
    assert queue.positions(store.pending(), run_.next_at - 1) == {}  # no place in the queue before then
    assert _schedule(store, run_.next_at) == ["nightly"]  # on time
    assert store.run("nightly").status == RunStatus.STARTING
    store.set_run_status("nightly", RunStatus.RUNNING)
    assert store.sealed(run="nightly") is not None  # kept for its next start
    # it ends: it waits for the next time, its blocks free, its container to be replaced (a new run id)
    assert store.finish_run("nightly", RunStatus.DONE, 0)
    again = store.run("nightly")
    assert again.status == RunStatus.PENDING and again.run_id != first_id and again.next_at > run_.next_at
    assert again.message == f"scheduled: next {utc_text(again.next_at)}" and not again.nodes
    assert store.slots_snapshot().hosts()[0].blocks[0].free and store.sealed(run="nightly") is not None
    assert [e.kind for e in store.events(run="nightly")][-2:] == ["done", "scheduled"]
    # kept across a server's restart (another Store on the same database)
    assert Store(store.url).run("nightly").next_at == again.next_at
    # a failure, and a stop by its max_duration (not a user's), also wait for the next time
    assert _schedule(store, again.next_at) == ["nightly"]
    assert store.finish_run("nightly", RunStatus.FAILED, 3, "exited with code 3")
    assert store.run("nightly").status == RunStatus.PENDING
    assert _schedule(store, store.run("nightly").next_at) == ["nightly"]
    assert store.begin_stop("nightly", "stopped by its max_duration (1m)")
    assert store.finish_run("nightly", RunStatus.STOPPED, None, "stopped by its max_duration (1m)")
    assert store.run("nightly").status == RunStatus.PENDING
    # a user's stop of the waiting run ends it for good
    stopped, work = queue.stop(store, "nightly", by="alice")
    assert work is None and stopped.status == RunStatus.STOPPED and stopped.next_at is None
    assert store.sealed(run="nightly") is None and _schedule(store, again.next_at + 3600) == []


def test_a_users_stop_of_a_running_scheduled_run_is_final(store):
    run_, _ = _submit(store)
    assert _schedule(store, run_.next_at) == ["nightly"]
    store.set_run_status("nightly", RunStatus.RUNNING)
    assert store.begin_stop("nightly", "stopped by alice", final=True)  # what queue.stop does
    assert store.finish_run("nightly", RunStatus.STOPPED, None, "stopped by alice")
    assert store.run("nightly").status == RunStatus.STOPPED and store.sealed(run="nightly") is None


def test_retry_false_starts_at_its_time_or_fails_until_the_next(store):
    _hog(store)
    run_, _ = _submit(store, RUN + "retry: false\n")
    assert _schedule(store, run_.next_at) == []
    after = store.run("nightly")
    assert after.status == RunStatus.PENDING and after.next_at > run_.next_at
    failed = [e for e in store.events(run="nightly") if e.kind == "failed"]
    assert failed and failed[0].message.startswith("not started at its scheduled time (retry: false): waiting for")


def test_the_retry_window_of_a_scheduled_run_counts_from_its_time(store):
    _hog(store)
    run_, _ = _submit(store, RUN + "retry: {duration: 10m}\n")
    assert queue.enforce_limits(store, now=run_.next_at + 599) == []
    assert queue.enforce_limits(store, now=run_.next_at + 601) == ["nightly"]
    after = store.run("nightly")
    assert after.status == RunStatus.PENDING and after.next_at >= run_.next_at  # the next time, not the end


def test_no_queue_and_a_schedule_are_refused_together(store):
    with pytest.raises(GpufleetError, match="--no-queue starts a run now or not at all; this one has a `schedule`"):
        _submit(store, no_queue=True)
    assert store.run("nightly") is None




def test_the_pass_says_when_the_next_scheduled_run_is_due(store):
    run_, _ = _submit(store)
    assert queue.schedule(store, lambda r, p: None, now=run_.next_at - 30) == run_.next_at  # the loop wakes then
    assert queue.schedule(store, lambda r, p: None, now=run_.next_at) is None  # started: nothing else due


# ------------------------------------------------------------------ the CLI (against a real HTTP server on loopback)

PLAN = {"never": "", "waits": "", "placements": [
    {"fleet": "lab", "num": 1, "alias": "node-1", "blocks": [0, 1], "gpus": ["H100", "H100"], "cpus": 16,
     "memory_mib": 65536, "note": ""}]}


def test_apply_of_a_scheduled_run_says_when_it_starts_and_does_not_wait_for_it(gf, api, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "x")
    path = write(tmp_path, "nightly.yml", RUN.replace("'* * * * *'", "['15 23 * * *', '0 8 * * mon-fri']"))
    api.routes["POST", "/api/runs/plan"] = (200, PLAN)
    code, out, err = gf("apply", "-f", str(path), "--dry-run")
    assert code == 0, (out, err)
    assert "nightly is scheduled (15 23 * * *, 0 8 * * mon-fri, UTC): it waits until " in out
    assert " UTC, starts then and at each time after, until gpufleet stop nightly" in out
    assert "--dry-run: nothing was submitted" in out
    next_at = at("2026-12-03 23:15:00")
    api.routes["POST", "/api/runs"] = (201, {
        "name": "nightly", "run_id": "r1", "type": "task", "fleet": None, "instance_id": None, "alias": None,
        "status": "pending", "message": f"scheduled: next {utc_text(next_at)}", "spec": {}, "container": "gpufleet-x",
        "created_at": next_at - 3600, "updated_at": next_at - 3600, "next_at": next_at})
    code, out, err = gf("apply", "-f", str(path), "-y")  # attached, yet back at once
    assert code == 0, (out, err)
    assert "nightly is scheduled: next 2026-12-03 23:15 UTC" in out
    assert [p for m, p, _ in api.asked if m == "GET"] == []  # it did not poll for a start hours away
