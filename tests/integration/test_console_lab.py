"""The web console in a real browser (Debian's headless Chromium, driven by Playwright) against a
real `gpufleet server` on the lab, compared with what the real CLI says.

Two lab hosts (4 simulated GPUs each, so 4 blocks), one server, projects ml (alice, fleet ml-gpus
on the first host) and cv (dave, fleet cv-gpus on the second). alice starts runs with the CLI; the
console shows them without a reload, with the blocks, queue place and wait reason the CLI shows; a
stop from the console frees the blocks (the CLI says so); dave sees only cv's fleet and runs; a bad
token is refused; user text stays text; a token that stops working leads back to the login page.

Screenshots of every page at 1280 px and 390 px are saved under the test's tmp dir (the path is
printed); with GPUFLEET_CONSOLE_SCREENSHOTS=docs they also replace docs/console/*.png.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import ROOT, start_server, wait_for
from test_authz_lab import Team, fleet_text
from test_teams_lab import User, write_task

from gpufleet.lab import core

pytestmark = pytest.mark.lab
CHROMIUM = "/usr/bin/chromium"
MARKUP = "<b>x</b>"
WIDTHS = {"wide": (1280, 860), "phone": (390, 844)}


@pytest.fixture(scope="module")
def team(lab_factory, tmp_path_factory):
    lab = lab_factory(nodes=2, gpus=4)
    work = tmp_path_factory.mktemp("console")
    (work / "home").mkdir()
    (work / "home" / "server.yml").write_text("metrics_interval: 1\n")  # samples each second
    server = start_server(work / "home")
    with contextlib.ExitStack() as stack:
        stack.callback(server.stop)
        team = Team(server, lab, tag="con", workdir=work)
        stack.callback(team.clean_up)
        team.tokens["admin"] = server.admin_token
        team.issued.append(team.tokens["admin"])
        for p in ("ml", "cv"):
            team.ok("admin", "POST", "/api/projects", {"name": p})
        team.add_user("alice", projects={"ml": "admin"})
        team.add_user("dave", projects={"cv": "member"})
        done = team.apply_fleet("alice", "ml", fleet_text(lab, "ml-gpus", 0))
        assert done["result"]["ok"], done
        done = team.apply_fleet("admin", "cv", fleet_text(lab, "cv-gpus", 1))
        assert done["result"]["ok"], done
        yield team


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing (scripts/setup.sh installs Debian's chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the test extra installs playwright")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    d = tmp_path_factory.mktemp("console-screenshots")
    print(f"\nconsole screenshots: {d}")
    yield d
    if os.environ.get("GPUFLEET_CONSOLE_SCREENSHOTS") == "docs":
        docs = ROOT / "docs" / "console"
        docs.mkdir(parents=True, exist_ok=True)
        for png in sorted(d.glob("*.png")):
            shutil.copy(png, docs / png.name)


class Console:
    """One browser tab of the console, logged in (or not) as one user."""

    def __init__(self, browser, team: Team, shots: Path):
        self.context = browser.new_context(viewport={"width": 1280, "height": 860})
        self.page = self.context.new_page()
        self.team, self.shots, self.errors, self.dialogs = team, shots, [], []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.accept()))  # the Stop button's confirm()
        self.page.set_default_timeout(30_000)

    def login(self, token: str) -> None:
        self.page.goto(self.team.server.url + "/")
        self.page.get_by_label("API token").fill(token)
        self.page.get_by_role("button", name="Log in").click()

    def go(self, hash_: str) -> None:
        self.page.evaluate("h => { location.hash = h; }", hash_)

    def shot(self, name: str) -> None:
        for label, (w, h) in WIDTHS.items():
            self.page.set_viewport_size({"width": w, "height": h})
            self.page.wait_for_timeout(300)
            self.page.screenshot(path=str(self.shots / f"{name}-{label}.png"), full_page=True)
            wide = self.page.evaluate("() => document.documentElement.scrollWidth")
            assert wide <= w, f"the {name} page is {wide} px wide at {w} px (only tables may scroll, in their box)"
        self.page.set_viewport_size({"width": 1280, "height": 860})

    def runs(self) -> dict[str, dict]:
        """The runs page's rows: name -> {status, place, message, user, project}."""
        return self.page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('#runs tr[data-run]')]
            .map(tr => [tr.dataset.run, {status: tr.dataset.status, place: tr.cells[2].textContent,
                                         message: tr.cells[3].textContent, user: tr.cells[4].textContent,
                                         project: tr.cells[5].textContent}]))""")

    def blocks(self) -> dict[str, dict[int, str]]:
        """The fleets page: host -> {block: run holding it ('' when free)}."""
        return self.page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('.host')].map(h =>
            [h.dataset.host, Object.fromEntries([...h.querySelectorAll('.block')]
                .map(b => [b.dataset.block, b.dataset.run]))]))""")

    def gpus(self) -> dict[int, dict]:
        """The fleets page's GPUs (one host shown): index -> {status, text}."""
        return {int(k): v for k, v in self.page.evaluate("""() => Object.fromEntries(
            [...document.querySelectorAll('.gpu[data-gpu]')].map(g => [g.dataset.gpu,
                {status: g.dataset.gpuStatus, text: g.textContent}]))""").items()}

    def close(self) -> None:
        self.context.close()


def cli_blocks(user: User) -> dict[str, dict[int, str]]:
    """What the CLI says of the same: `fleet list --json` (each host's blocks) and `ps --json` (who
    holds which)."""
    fleets = json.loads(user("fleet", "list", "--json", check=0).stdout)
    held = {}
    for r in json.loads(user("ps", "--json", check=0).stdout):
        if r["status"] in ("starting", "running", "stopping"):
            for b in r["blocks"]:
                held[(r["host"], b)] = r["name"]
    return {i["alias"]: {str(b): held.get((i["alias"], b), "") for b in range(i["blocks"]["total"])}
            for f in fleets for i in f["instances"]}


def test_the_console_shows_what_the_cli_shows_and_stops_runs(team, browser, shots, tmp_path):
    alice = User(team, "alice", tmp_path / "alice")
    dave_cli = User(team, "dave", tmp_path / "dave")
    a, b, d = "held-con", "waits-con", "elsewhere-con"

    # a bad token is refused, with the server's reason, and nothing but the login form shows
    bad = Console(browser, team, shots)
    bad.login("gft_" + "x" * 43)
    error = bad.page.locator("#login-error")
    wait_for("the refusal", lambda: "bad token" in error.text_content(), timeout=15)
    assert bad.page.locator("#top").is_hidden() and bad.page.locator("#fleets").count() == 0
    assert bad.page.evaluate("() => sessionStorage.getItem('gpufleet.token')") is None
    bad.shot("login")
    bad.close()

    con = Console(browser, team, shots)
    con.login(team.tokens["alice"])
    con.page.wait_for_selector("#fleets .host")
    assert "alice" in con.page.locator("#who").text_content()
    # by keyboard: the first Tab is the skip link, then the pages' links; Enter follows one
    con.page.keyboard.press("Tab")
    assert con.page.evaluate("() => document.activeElement.textContent") == "Skip to content"
    con.page.keyboard.press("Tab")
    con.page.keyboard.press("Tab")
    assert con.page.evaluate("() => document.activeElement.textContent") == "Runs and queue"
    con.page.keyboard.press("Enter")
    con.page.wait_for_selector("#runs")
    con.go("#/runs")
    con.page.wait_for_selector("#runs")
    con.page.evaluate("() => { window.notReloaded = true; }")

    # runs started from the CLI appear without a reload: one holding a block, one waiting for all four
    p = alice("apply", "-f", str(write_task(tmp_path, a, [f"echo '{MARKUP}'", "gpu-burn --seconds 300 --percent 70"])),
              "-y", "-d", check=0)
    assert f"{a} is" in p.stdout, p.stdout + p.stderr
    wait_for(f"{a} running in the console", lambda: con.runs().get(a, {}).get("status") == "running", timeout=180)
    big = tmp_path / f"{b}.yml"
    big.write_text(write_task(tmp_path, b, ["sleep 300"]).read_text().replace("gpu: 1", "gpu: 4"))
    p = alice("apply", "-f", str(big), "-y", "-d", check=0)
    assert p.returncode == 0, p.stdout + p.stderr
    wait_for(f"{b} waiting in the console", lambda: con.runs().get(b, {}).get("status") == "pending", timeout=60)
    assert con.page.evaluate("() => window.notReloaded") is True

    # its place and why it waits are the server's, as the CLI shows them
    ps = {r["name"]: r for r in json.loads(alice("ps", "--json", check=0).stdout)}
    row = wait_for("the same place and reason", lambda: (r := con.runs()[b])["message"] == ps[b]["message"] and r)
    assert ps[b]["status"] == "pending" and ps[b]["message"] and row["place"] == f"#{ps[b]['position']}"
    assert (row["user"], row["project"]) == ("alice", "ml")

    # dave (project cv) sees his run, and none of ml's; alice does not see his
    team.ok("dave", "POST", "/api/runs", {"source": f"{team.workdir}/{d}.yml", "project": "cv",
                                          "text": write_task(tmp_path, d, ["sleep 300"]).read_text()})
    other = Console(browser, team, shots)
    other.login(team.tokens["dave"])
    other.page.wait_for_selector("#fleets")
    other.go("#/runs")
    wait_for("dave's run in his console", lambda: d in other.runs(), timeout=30)
    assert set(other.runs()) == {d} == {r["name"] for r in json.loads(dave_cli("ps", "--json", check=0).stdout)}
    other.go("#/fleets")
    other.page.wait_for_selector("#fleets .host")
    assert other.page.evaluate("() => [...document.querySelectorAll('.host')].map(h => h.dataset.fleet)") == [
        "cv-gpus"]  # ml's fleet is not his project's
    other.close()
    assert d not in con.runs()

    # the fleets page: each host's blocks, and which run holds which, as the CLI says; the run's GPU
    # busy at its gpu-burn's 70 %, one held by a gpu-burn started by hand on the host, one faulty
    con.go("#/fleets")
    con.page.wait_for_selector(f'#fleets .block[data-run="{a}"]')
    expected = cli_blocks(alice)
    wait_for("the console's blocks to be the CLI's", lambda: con.blocks() == expected, timeout=15)
    [host] = expected.values()  # alice sees ml-gpus only
    assert list(host.values()).count(a) == 1 and len(host) == 4
    held = alice.runs()[a]
    [mine] = [g["index"] for g in held["gpus"]]
    node = team.lab.nodes[0]
    stray, sick = [i for i in range(4) if i != mine][:2]
    by_hand = core.start_gpu_burn(team.lab, node, "--gpus", str(stray), "--seconds", "300")
    core.fault(team.lab, node, sick, "ecc")
    try:
        gpus = wait_for("the GPUs' states in the console", lambda: (g := con.gpus())[mine]["status"] == "busy" and
                        "70%" in g[mine]["text"] and g[stray]["status"] == "outside" and
                        g[sick]["status"] == "unhealthy" and g, timeout=60)
        assert f"pid {by_hand.pid}" in gpus[stray]["text"] and "unhealthy" in gpus[sick]["text"]
        metrics = json.loads(alice("metrics", a, "--json", check=0).stdout)
        assert [(x["index"], x["utilization"]) for x in metrics["latest"]] == [(mine, 70)]
        con.shot("fleets")
    finally:
        by_hand.stop()
        core.fault(team.lab, node, sick, None)
    con.go("#/runs")
    con.page.wait_for_selector(f'#runs tr[data-run="{b}"]')
    con.shot("runs")

    # the run's page: its spec and logs, where user text (markup) shows as text
    con.go(f"#/runs/{a}")
    logs = con.page.locator("#run-logs")
    wait_for("the run's logs", lambda: MARKUP in logs.text_content(), timeout=60)
    assert MARKUP in con.page.locator("#run-spec").text_content()
    assert con.page.locator("main b").count() == 0  # never parsed as HTML
    wait_for("its events", lambda: con.page.locator("#run-events tbody tr").count() > 0, timeout=15)
    chart = con.page.locator(f'#run-charts figure[data-gpu="{held["host"]}/{mine}"] svg')
    wait_for("its GPU's chart", lambda: chart.count() == 1 and "Utilization 70%" in chart.get_attribute("aria-label"),
             timeout=30)
    con.shot("run")
    con.go("#/events")
    con.page.wait_for_selector("#events tbody tr")
    con.page.get_by_label("Run").fill(a)
    rows = con.page.locator("#events tbody tr")
    assert rows.count() > 0 and all(r == a for r in rows.evaluate_all("rs => rs.map(r => r.cells[2].textContent)"))
    con.page.get_by_label("Run").fill("")
    con.shot("events")

    # stop both from the console: the waiting one is cancelled, the running one's block is freed
    con.go("#/runs")
    for name in (b, a):
        button = con.page.locator(f'#runs button[data-stop="{name}"]')
        button.focus()
        con.page.keyboard.press("Enter")  # by keyboard: a real button
        wait_for(f"{name} stopped (the CLI)", lambda n=name: alice.runs()[n]["status"] == "stopped", timeout=120)
    assert con.dialogs == [f"Stop run {b}?", f"Stop run {a}?"]
    fleets = json.loads(alice("fleet", "list", "--json", check=0).stdout)
    assert [i["blocks"]["busy"] for f in fleets for i in f["instances"]] == [0]
    con.go("#/fleets")
    wait_for("the console's blocks free", lambda: con.blocks() == cli_blocks(alice) and
             all(not r for host in con.blocks().values() for r in host.values()), timeout=30)
    assert con.page.evaluate("() => document.activeElement !== null")
    assert con.errors == [], con.errors

    # a token that stops working sends the console back to the login page, with the reason
    team.ok("admin", "POST", "/api/users/alice/token")
    con.page.wait_for_selector("#login-error:not(:empty)", timeout=30_000)
    assert "token" in con.page.locator("#login-error").text_content()
    con.close()
