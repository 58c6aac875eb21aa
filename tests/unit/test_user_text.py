"""Text from users, hosts and the server is printed as written, never read as rich markup (issue 14):
a run named `[/x]`, a key path `[/bold]key`, a host `[fd00::1]`, a server's message with `[red]` in it.

Once such text crashed the printer (rich.errors.MarkupError, a traceback, exit 1) or lost a part of
it (`[fd00::1]:22 is listed twice` shown as `:22 is listed twice`). Each path here runs the real CLI
(gpufleet.cli.main, in this process) and checks the exit code, the literal text, and no traceback:
config errors, GpufleetError messages, the server's error messages, and the tables of plans, ps and
events filled from a real HTTP server on loopback that answers what the test says (fakeapi.py).
"""

# ruff: noqa: F811 (the fixtures imported from fakeapi are the tests' arguments)
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from fakeapi import Api, api, gf, server, write  # noqa: F401 (pytest fixtures)

from gpufleet.config import load_fleet
from gpufleet.errors import EXIT_DENIED, EXIT_FAILED, EXIT_OK, EXIT_USAGE

MARKUP = ["[/x]", "[/bold]", "[red]", "[bold red]x[/]", "[link=file:///etc]y[/link]", r"\[z]", "[fd00::1]"]


# ------------------------------------------------------------------ config errors (nothing asked of the server)

def test_a_run_name_that_looks_like_markup(gf, api: Api, tmp_path: Path) -> None:
    path = write(tmp_path, "t.yml", 'type: task\nname: "[/x]"\nimage: busybox\ncommands: [echo]\n')
    code, out, err = gf("apply", "-f", str(path), "-y")
    assert code == EXIT_USAGE
    assert f"{path}:2:7: name: '[/x]' must be lowercase" in err
    assert api.asked == []


def test_a_key_path_that_looks_like_markup(gf, tmp_path: Path) -> None:
    path = write(tmp_path, "f.yml", 'type: fleet\nssh_config:\n  user: u\n  identity_file: "[/bold]key"\n'
                                    '  hosts: [a]\n')
    code, out, err = gf("apply", "-f", str(path), "--dry-run")
    assert code == EXIT_USAGE
    assert f"{path}:4:18: ssh_config.identity_file: identity file {tmp_path}/[/bold]key does not exist" in err


def test_an_ipv6_host_in_brackets_is_shown_whole(gf, tmp_path: Path) -> None:
    path = write(tmp_path, "h.yml", 'type: fleet\nssh_config:\n  user: u\n  hosts: ["[fd00::1]", "[fd00::1]"]\n')
    code, out, err = gf("apply", "-f", str(path), "--dry-run")
    assert code == EXIT_USAGE
    assert "ssh_config.hosts[1]: [fd00::1]:22 is listed twice (first as hosts[0])" in err


@pytest.mark.parametrize("text", MARKUP)
def test_markup_in_any_config_value_or_key_is_shown_as_written(gf, tmp_path: Path, text: str) -> None:
    value = json.dumps(text)
    path = write(tmp_path, "r.yml", f"type: task\nimage: {value}\n{value}: 1\nresources:\n  gpu: {value}\n")
    code, out, err = gf("apply", "-f", str(path), "-y")
    assert code == EXIT_USAGE
    assert f"image: {text!r} is not an image reference" in err
    assert f"unknown field {text!r}" in err
    assert f"resources.gpu: GPU spec {text!r}" in err


def test_a_file_name_that_looks_like_markup(gf, tmp_path: Path) -> None:
    missing = tmp_path / "[/x]" / "[red]run.yml"
    code, out, err = gf("apply", "-f", str(missing), "-y")
    assert code == EXIT_USAGE
    assert f"{missing}: no such file" in err


# ------------------------------------------------------------------ messages from the server

@pytest.mark.parametrize("status,answer,code", [
    (400, {"detail": "fleet [/x] has [bold]no[/bold] host [fd00::1]", "exit_code": 2}, EXIT_USAGE),
    (404, {"detail": "fleet [/x] has [bold]no[/bold] host [fd00::1]", "exit_code": 1}, EXIT_FAILED),
    (403, {"detail": "fleet [/x] has [bold]no[/bold] host [fd00::1]", "exit_code": 3}, EXIT_DENIED),
    (500, "fleet [/x] has [bold]no[/bold] host [fd00::1]", EXIT_FAILED),
])
def test_a_server_error_message_is_shown_as_written(gf, api: Api, tmp_path: Path, status, answer, code) -> None:
    api.routes["POST", "/api/runs/plan"] = (status, answer)
    path = write(tmp_path, "ok.yml", "type: task\nimage: busybox\ncommands: [echo]\n")
    got, out, err = gf("apply", "-f", str(path), "-y")
    assert got == code, (out, err)
    assert "fleet [/x] has [bold]no[/bold] host [fd00::1]" in err


def test_config_problems_the_server_found_are_shown_as_written(gf, api: Api, tmp_path: Path) -> None:
    problem = {"file": "[/x].yml", "line": 3, "column": 1, "field": "[red]", "message": "[/bold] is [fd00::1]"}
    api.routes["POST", "/api/runs/plan"] = (400, {"detail": "bad", "problems": [problem], "exit_code": 2})
    path = write(tmp_path, "ok.yml", "type: task\nimage: busybox\ncommands: [echo]\n")
    code, out, err = gf("apply", "-f", str(path), "-y")
    assert code == EXIT_USAGE
    assert "[/x].yml:3:1: [red]: [/bold] is [fd00::1]" in err


def test_a_plan_that_can_never_fit_is_shown_as_written(gf, api: Api, tmp_path: Path) -> None:
    api.routes["POST", "/api/runs/plan"] = (200, {"never": "no fleet has [/x] GPUs", "placements": [], "waits": ""})
    path = write(tmp_path, "ok.yml", "type: task\nimage: busybox\ncommands: [echo]\n")
    code, out, err = gf("apply", "-f", str(path), "-y")
    assert code == EXIT_FAILED
    assert "no fleet has [/x] GPUs; not queued" in err


# ------------------------------------------------------------------ tables

def test_a_run_plan_table_shows_names_as_written(gf, api: Api, tmp_path: Path) -> None:
    placement = {"fleet": "[/f]", "num": 0, "alias": "[bold]a[/bold]", "blocks": [0], "gpus": ["[red]H100"],
                 "cpus": 4, "memory_mib": 8192, "note": "[/n] note"}
    api.routes["POST", "/api/runs/plan"] = (200, {"never": "", "placements": [placement], "waits": ""})
    path = write(tmp_path, "ok.yml", "type: task\nimage: busybox\ncommands: [echo]\n")
    code, out, err = gf("apply", "-f", str(path), "--dry-run")
    assert code == EXIT_OK, err
    assert "[/f]" in out and "0 ([bold]a[/bold])" in out and "[red]H100" in out and "ok [/n] note" in out


def test_a_fleet_plan_table_shows_a_bracketed_address_whole(gf, api: Api, tmp_path: Path) -> None:
    path = write(tmp_path, "h.yml", 'type: fleet\nname: v6\nssh_config:\n  user: u\n  hosts: ["[fd00::1]"]\n')
    alias = load_fleet(path).targets[0].alias
    api.routes["POST", "/api/fleets/plan"] = (200, {"add": [alias], "reprobe": [], "remove": ["[/gone]"],
                                                    "busy_removals": []})
    code, out, err = gf("apply", "-f", str(path), "--dry-run")
    assert code == EXIT_OK, err
    assert "[fd00::1]:22" in out and "[/gone]" in out and "--dry-run: nothing was changed" in out


def _run(name: str, message: str) -> dict:
    now = time.time()
    return {"name": name, "run_id": "r1", "type": "task", "fleet": "[/f]", "instance_id": 1, "alias": "[/a]",
            "status": "failed", "message": message, "exit_code": None, "spec": {}, "container": "c",
            "created_at": now, "updated_at": now, "instance_num": 0, "project": "[/p]", "user": "[red]u"}


def test_ps_shows_names_and_messages_as_written(gf, api: Api) -> None:
    api.routes["GET", "/api/runs"] = (200, [_run("[/x]", "host [fd00::1] said [bold]no"),
                                            {**_run("ok", "fine"), "project": "p", "user": "u"}])
    code, out, err = gf("ps", "-a")
    assert code == EXIT_OK, err
    for text in ("[/x]", "[/f]", "failed: host [fd00::1] said [bold]no", "[/p]", "[red]u"):
        assert text in out, out


def test_events_show_messages_as_written(gf, api: Api) -> None:
    now = time.time()
    api.routes["GET", "/api/events"] = (200, [
        {"id": 1, "ts": now, "kind": "[/k]", "message": "[bold]m[/bold] on [fd00::1]", "run": "[/x]",
         "host": "[/h]", "project": "[/p]", "actor": "[red]a"},
        {"id": 2, "ts": now, "kind": "k", "message": "m", "project": "p", "actor": "a"}])
    code, out, err = gf("events")
    assert code == EXIT_OK, err
    for text in ("[/k]", "[bold]m[/bold] on [fd00::1]", "[/x]", "[/h]", "[/p]", "[red]a"):
        assert text in out, out
