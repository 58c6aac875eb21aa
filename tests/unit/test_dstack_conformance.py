"""dstack conformance: every real dstack configuration of ../shared/fixtures/dstack-configs (unique,
accepted by dstack's own parser) through gpufleet, as `gpufleet apply -f FILE --dry-run` takes it.

Each file goes through (1) the load a user's apply does first (runconfig.parse_run with values=False,
as a dry run: no secret values needed; config.load_fleet for fleets), (2) for a run that loads, the
server's plan (POST /api/runs/plan) against a small fleet in a real state store, served by the real
API (create_app on uvicorn, loopback), and (3) the CLI's own entry point (gpufleet.cli.main, in this
process) with `apply -f FILE --dry-run` against that server, to prove that no traceback reaches the
user and that the CLI refuses exactly what the load refuses. A run is checked where its user would have
it (``_workspace``): a copy in a git repository, deep enough that its relative `repos` and `files`
paths stay inside, with those local paths made (empty), as the dry run packs them.

It reports counts per type (accepted / refused, the refusals by field): printed (pytest -s shows it)
and written as JSON to dstack_conformance.json in pytest's base temporary folder. It asserts that
no file gives a traceback, that each refusal names its field and line with gpufleet's own words
(a dstack field gpufleet does not support, or a reason of that field; never a bare `unknown field`
or pydantic's text), that at least ACCEPTED_AT_LEAST of the real tasks and dev environments are
accepted (issue 14: services follow in their own issue), that every SSH fleet file loads, and that
cloud fleets, volumes and gateways are refused as dstack-only.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import socket
import subprocess
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from gpufleet import cli
from gpufleet.blocks import split
from gpufleet.config import load_fleet
from gpufleet.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, ConfigError, GpufleetError
from gpufleet.models import GPU, HostFacts
from gpufleet.runconfig import parse_run

DSTACK_CONFIGS = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "dstack-configs"
RUN_TYPES = ("task", "dev-environment", "service")
ACCEPTED_AT_LEAST = 0.90  # of the real tasks and dev environments (issue 14), and of the services (issue 16)
TOKEN = "gft_" + "c" * 43
UNSUPPORTED_HINT = "a dstack field that gpufleet does not support"
# pydantic's own wording: a message that reaches the user in it was not written for them
PYDANTIC_TEXT = ("Input should be", "Field required", "validation error", "Extra inputs are not permitted",
                 "Value error,", "type=")
# SSH fleet files that dstack's parser takes but its server refuses, and gpufleet refuses at load
# (field, why): dstack's services/fleets.py "ssh_config and nodes are mutually exclusive"
SSH_FLEETS_DSTACK_REFUSES = {"unit-edge-015": "nodes"}


@dataclass
class Entry:
    id: str
    type: str  # dstack_type of the manifest
    ssh: str  # ssh | cloud | -
    path: Path  # for a run: its copy in a workspace (``_workspace``), where it is checked
    accepted: bool = False
    problems: list = field(default_factory=list)  # ConfigProblem of a refusal
    refusal: str = ""  # a refusal that is not a ConfigError (GpufleetError's text)
    plan: str = ""  # fits | waits | never | forbidden (runs that load)
    exception: str = ""  # anything else: a bug
    cli_code: int | None = None
    cli_out: str = ""

    @property
    def fields(self) -> set[str]:
        """The top-level fields the refusal names."""
        return {re.split(r"[.\[]", p.field)[0] or "(file)" for p in self.problems}


def corpus() -> list[Entry]:
    assert DSTACK_CONFIGS.is_dir(), f"{DSTACK_CONFIGS} is missing (real dstack files, read from shared/)"
    ok = json.loads((DSTACK_CONFIGS / "dstack_results.json").read_text())
    with (DSTACK_CONFIGS / "manifest.tsv").open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [Entry(r["id"], r["dstack_type"], r["ssh"], DSTACK_CONFIGS / r["file"]) for r in rows
            if r["dup_of"] == "-" and ok.get(r["id"], {}).get("ok")]


def _identity_files(entries: list[Entry]) -> set[str]:
    found: set[str] = set()

    def walk(x) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                if k == "identity_file" and isinstance(v, str):
                    found.add(v)
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for e in entries:
        if e.type == "fleet":
            walk(yaml.safe_load(e.path.read_text()))
    return found


def _private_key() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                      serialization.NoEncryption())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fleet(store) -> None:
    """A small fleet: two hosts of 8 H100 (80 GB), one of 8 MI300X, one without GPUs."""
    store.save_fleet("lab", "lab.yml", {"type": "fleet", "placement": "cluster"})
    shapes = [("h100-0", "nvidia", "H100", 81559, 8), ("h100-1", "nvidia", "H100", 81559, 8),
              ("mi300x", "amd", "MI300X", 196592, 8), ("cpu", None, None, 0, 0)]
    for alias, vendor, model, mib, n in shapes:
        gpus = [GPU(index=i, vendor=vendor, model=model, name=f"{vendor} {model}", memory_mib=mib, uuid=f"{alias}-{i}")
                for i in range(n)]
        facts = HostFacts(gpus=gpus, cpu={"count": 64}, memory_mib=512000)
        store.record_instance("lab", alias, alias, 22, "ready", "", f"{n}x{model}", facts,
                              split(gpus, "auto", 64, 512000))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real API (create_app) on uvicorn on loopback, over a real store holding one fleet; the
    CLI pointed at it; HOME with a private key at each identity file the fleet files name."""
    import uvicorn

    from gpufleet.server.api import Context, create_app
    from gpufleet.server.auth import token_hash
    from gpufleet.server.vault import Vault
    from gpufleet.state import Store

    base = tmp_path_factory.mktemp("conformance")
    home = base / "home"
    key = _private_key()
    for name in _identity_files(corpus()):
        path = Path(name.replace("~", str(home), 1))
        if path.is_absolute() and str(path).startswith(str(home)):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(key)
            path.chmod(0o600)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        mp.setenv("GPUFLEET_HOME", str(base / "gpufleet"))
        store = Store(f"sqlite:///{base / 'state.db'}")
        store.bootstrap("admin", token_hash(TOKEN))
        _fleet(store)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        ctx = Context(store=store, seal=Vault(base / "secret.key").seal, kick=lambda: None,
                      launch=lambda run, placements: None, background=lambda work: None,
                      info=lambda: {"url": url}, shutdown=lambda: None)
        httpd = uvicorn.Server(uvicorn.Config(create_app(ctx), host="127.0.0.1", port=port, log_level="warning",
                                              access_log=False, lifespan="off"))
        thread = threading.Thread(target=httpd.run, daemon=True, name="conformance-api")
        thread.start()
        deadline = time.monotonic() + 30
        while not httpd.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the API did not start"
            time.sleep(0.05)
        mp.setenv("GPUFLEET_SERVER", url)
        mp.setenv("GPUFLEET_TOKEN", TOKEN)
        mp.setenv("COLUMNS", "200")
        try:
            yield url
        finally:
            httpd.should_exit = True
            thread.join(timeout=10)


def _cli(*argv: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(list(argv))
    finally:
        os.umask(umask)  # main() makes it 077 for the process
    return code, out.getvalue() + err.getvalue()


def _escapes(local: str) -> int:
    """How many folders above the configuration's folder a relative local path reaches."""
    depth = lowest = 0
    for part in Path(local).parts:
        depth += -1 if part == ".." else 0 if part == "." else 1
        lowest = min(lowest, depth)
    return -lowest


def _workspace(e: Entry, base: Path) -> Path:
    """A copy of run file ``e`` as its user would have it: in a git repository (a new one under
    ``base``), in folders deep enough that its relative `repos` and `files` paths stay inside, with
    each local path it names made (an empty file where the name has a suffix or is in ~, else an
    empty folder; paths outside ``base`` and HOME are left alone). The copy's path."""
    try:
        uploads = [u for u in parse_run(e.path.read_text(), str(e.path), values=False).config.uploads if not u.url]
    except GpufleetError:
        uploads = []  # refused at load, before any path is looked at
    relative = [u.local_path for u in uploads if not Path(u.local_path).expanduser().is_absolute()]
    repo = base / e.id / "repo"
    where = repo.joinpath(*[f"d{i}" for i in range(max(map(_escapes, relative), default=0))])
    where.mkdir(parents=True)
    copy = where / e.path.name
    copy.write_text(e.path.read_text())
    subprocess.run(["git", "init", "-q", str(repo)], check=True, capture_output=True)
    home = Path.home()
    for u in uploads:
        local = (where / Path(u.local_path).expanduser()).resolve()
        if local.exists() or not (local.is_relative_to(repo) or local.is_relative_to(home)):
            continue
        if u.kind == "file" and (local.suffix or u.local_path.startswith("~")):
            local.parent.mkdir(parents=True, exist_ok=True)
            local.touch()
        else:
            local.mkdir(parents=True)
    return copy


def _check(e: Entry, url: str, base: Path) -> None:
    if e.type in RUN_TYPES:
        e.path = _workspace(e, base)
    text = e.path.read_text()
    try:
        if e.type in RUN_TYPES:
            req = parse_run(text, str(e.path), values=False)
            e.accepted = True
            r = httpx.post(f"{url}/api/runs/plan", json={"source": str(e.path), "text": text},
                           headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
            if r.status_code == 403:
                e.plan = "forbidden"
            elif r.status_code != 200:
                e.exception = f"plan: HTTP {r.status_code}: {r.text[:300]}"
            else:
                plan = r.json()
                e.plan = "never" if plan["never"] else "fits" if plan["placements"] else "waits"
                assert plan["name"] == req.name
        else:
            load_fleet(e.path)
            e.accepted = True
    except ConfigError as err:
        e.problems = list(err.problems)
    except GpufleetError as err:
        e.refusal = str(err)
    except Exception as err:  # a bug: reported, and the test fails
        e.exception = f"{type(err).__name__}: {err}"
    e.cli_code, e.cli_out = _cli("apply", "-f", str(e.path), "--dry-run")


@pytest.fixture(scope="module")
def report(server, tmp_path_factory) -> list[Entry]:
    entries = corpus()
    base = tmp_path_factory.mktemp("workspaces")
    for e in entries:
        _check(e, server, base)
    kinds = sorted({(e.type, e.ssh) for e in entries}, key=lambda k: (k[0] not in RUN_TYPES, k))
    table: dict = {}
    lines = ["", f"dstack conformance ({DSTACK_CONFIGS}): unique files that dstack accepts",
             f"{'type':<24}{'files':>7}{'accepted':>10}{'refused':>9}{'%':>7}  refusals by field (files)"]
    for kind, ssh in kinds:
        group = [e for e in entries if (e.type, e.ssh) == (kind, ssh)]
        accepted = sum(e.accepted for e in group)
        by_field = Counter(f for e in group if not e.accepted for f in (e.fields or {"(refused)"}))
        plans = Counter(e.plan for e in group if e.plan)
        name = kind + (f" ({ssh})" if ssh != "-" else "")
        table[name] = {"files": len(group), "accepted": accepted, "refused": len(group) - accepted,
                       "refusals_by_field": dict(by_field.most_common()), "plans": dict(plans),
                       "refused_files": {e.id: sorted(e.fields) or [e.refusal[:120]] for e in group if not e.accepted}}
        fields = ", ".join(f"{f} {n}" for f, n in by_field.most_common())
        lines.append(f"{name:<24}{len(group):>7}{accepted:>10}{len(group) - accepted:>9}"
                     f"{100 * accepted / len(group):>6.0f}%  {fields}")
        if plans:
            lines.append(f"{'':<24}plans of the accepted: " + ", ".join(f"{k} {n}" for k, n in plans.most_common()))
    ours = [e for e in entries if e.type in ("task", "dev-environment")]
    share = sum(e.accepted for e in ours) / len(ours)
    lines.append(f"tasks and dev environments accepted: {sum(e.accepted for e in ours)}/{len(ours)} = {share:.1%} "
                 f"(at least {ACCEPTED_AT_LEAST:.0%} wanted)")
    svc = [e for e in entries if e.type == "service"]
    lines.append(f"services accepted: {sum(e.accepted for e in svc)}/{len(svc)} = "
                 f"{sum(e.accepted for e in svc) / len(svc):.1%} (issue 16 wants 90%)")
    out = tmp_path_factory.getbasetemp() / "dstack_conformance.json"
    out.write_text(json.dumps({"types": table, "tasks_and_dev_environments_accepted": share}, indent=2))
    lines.append(f"written to {out}")
    print("\n".join(lines))
    return entries


def test_no_file_gives_a_traceback_and_the_cli_refuses_what_the_load_refuses(report):
    bugs = [(e.id, e.exception) for e in report if e.exception]
    assert bugs == []
    for e in report:
        assert "Traceback" not in e.cli_out and "MarkupError" not in e.cli_out, (e.id, e.cli_out)
        if e.accepted:  # shown the plan (exit 0), or told it can never fit on this fleet (1)
            assert e.cli_code in (EXIT_OK, EXIT_FAILED), (e.id, e.cli_code, e.cli_out)
            if e.cli_code == EXIT_FAILED:
                assert e.plan in ("never", "forbidden"), (e.id, e.cli_out)
        else:  # refused before anything is sent, each problem as FILE:LINE:COLUMN: FIELD: why
            assert e.cli_code == EXIT_USAGE, (e.id, e.cli_code, e.cli_out)
            for p in e.problems:
                assert f"{e.path}:{p.line}:{p.column}: {p.field}: {p.message}" in e.cli_out, (e.id, e.cli_out)


def test_every_refusal_of_a_run_names_its_field_and_line_in_gpufleets_words(report):
    for e in report:
        if e.type not in RUN_TYPES or e.accepted:
            continue
        assert e.problems and not e.refusal, (e.id, e.refusal)
        for p in e.problems:
            where = (e.id, str(p))
            assert p.field and p.line is not None, where
            assert not any(t in p.message for t in PYDANTIC_TEXT), where
            assert not p.message.startswith("unknown field") or "did you mean" in p.message, where
            if UNSUPPORTED_HINT not in p.message:  # else a reason of that field's own: it says more than its name
                assert len(p.message) > 20, where


def test_at_least_90_percent_of_real_tasks_and_dev_environments_are_accepted(report):
    ours = [e for e in report if e.type in ("task", "dev-environment")]
    assert len(ours) > 150
    accepted = sum(e.accepted for e in ours)
    refused = defaultdict(list)
    for e in ours:
        for f in e.fields if not e.accepted else ():
            refused[f].append(e.id)
    assert accepted / len(ours) >= ACCEPTED_AT_LEAST, (
        f"{accepted}/{len(ours)} accepted; refused by field: "
        + ", ".join(f"{f} {len(ids)}" for f, ids in sorted(refused.items(), key=lambda kv: -len(kv[1]))))


# of the real services (issue 16 wants 90%): 81/89 accepted. What is refused: a `dynamo` router (1 file), gRPC workers
# behind an SGLang router (2), gateways, https and TGI's format
SERVICES_ACCEPTED_AT_LEAST = 0.91


def test_most_real_services_are_accepted_and_each_refusal_names_its_field(report):
    """issue 16: dstack's real service files, counted as the tasks are; the rest refused naming the field."""
    services = [e for e in report if e.type == "service"]
    assert len(services) > 80
    accepted = sum(e.accepted for e in services)
    refused = Counter(f for e in services if not e.accepted for f in e.fields)
    assert all(e.fields for e in services if not e.accepted), [e.id for e in services if not e.accepted]
    assert accepted / len(services) >= SERVICES_ACCEPTED_AT_LEAST, (
        f"{accepted}/{len(services)} accepted; refused by field: {refused.most_common()}")


def test_every_ssh_fleet_file_loads(report):
    fleets = [e for e in report if e.type == "fleet" and e.ssh == "ssh"]
    assert len(fleets) >= 20
    for e in fleets:
        if e.id in SSH_FLEETS_DSTACK_REFUSES:
            assert not e.accepted and SSH_FLEETS_DSTACK_REFUSES[e.id] in e.fields, (e.id, e.problems)
        else:
            assert e.accepted, (e.id, [str(p) for p in e.problems], e.refusal)


def test_cloud_fleets_volumes_and_gateways_are_refused_as_dstack_only(report):
    others = [e for e in report if (e.type == "fleet" and e.ssh == "cloud") or e.type in ("volume", "gateway")]
    assert {e.type for e in others} == {"fleet", "volume", "gateway"}
    for e in others:
        assert not e.accepted and e.problems, e.id
        assert any("does not support" in p.message for p in e.problems), (e.id, [str(p) for p in e.problems])
        if e.type != "fleet":
            (p,) = e.problems
            assert p.field == "type" and p.line is not None, (e.id, str(p))
            assert p.message.startswith(f"{e.type}: a dstack configuration type that gpufleet does not support; "), \
                (e.id, str(p))


def test_real_services_with_rate_limits_load_with_them(report):
    """dstack's `rate_limits` (issue 16): every real service file with them loads them (none is refused for
    them); there are 2 such files in the corpus, each accepted."""
    limited = [e for e in report if e.type == "service" and "rate_limits" in (yaml.safe_load(e.path.read_text()) or {})]
    assert len(limited) >= 2
    for e in limited:
        assert "rate_limits" not in e.fields and e.accepted, (e.id, [str(p) for p in e.problems], e.refusal)


def test_every_real_model_service_is_taken_on_its_model_but_dstacks_tgi_format(report):
    """issue 16: a service's `model` (dstack's name shorthand and mapping) is taken; the only one refused
    on it is dstack's `format: tgi`, saying why (TGI serves the OpenAI API itself)."""
    with_model = [e for e in report if e.type == "service" and "model" in (yaml.safe_load(e.path.read_text()) or {})]
    assert len(with_model) >= 50
    for e in with_model:
        model = yaml.safe_load(e.path.read_text())["model"]
        tgi = isinstance(model, dict) and model.get("format") == "tgi"
        assert ("model" in e.fields) == tgi, (e.id, [str(p) for p in e.problems])
        if tgi:
            (p,) = [p for p in e.problems if p.field == "model"]
            assert "`format: tgi` is not supported" in p.message, (e.id, str(p))
        elif e.accepted:
            assert e.plan in ("fits", "never"), (e.id, e.plan)


def test_real_services_with_replica_groups_load_unless_their_router_is_dynamo_or_their_workers_grpc(report):
    """issue 16: dstack's replica groups (`replicas` as a list) load, an SGLang router group with them; refused on
    `replicas`, saying why: a `dynamo` router, and gRPC workers behind the router (gpufleet tells the router of its
    workers over HTTP)."""
    grouped = [e for e in report if e.type == "service"
               and isinstance((yaml.safe_load(e.path.read_text()) or {}).get("replicas"), list)]
    assert len(grouped) >= 9
    routers = 0
    for e in grouped:
        text = e.path.read_text()
        groups = yaml.safe_load(text)["replicas"]
        router = next((g["router"].get("type", "sglang") for g in groups if "router" in g), None)
        grpc = router is not None and ("--grpc-mode" in text or "grpc_server" in text)
        routers += router == "sglang" and not grpc
        assert e.accepted == (router != "dynamo" and not grpc), (e.id, [str(p) for p in e.problems])
        if router == "dynamo":
            assert e.fields == {"replicas"} and any("`dynamo`" in p.message and "not supported" in p.message
                                                    for p in e.problems), (e.id, [str(p) for p in e.problems])
        elif grpc:
            assert e.fields == {"replicas"} and all("a gRPC worker" in p.message and p.field.endswith("commands[0]")
                                                    for p in e.problems), (e.id, [str(p) for p in e.problems])
    assert routers == 5  # the real files with an SGLang router and HTTP workers, each accepted
