#!/usr/bin/env python3
"""The levers of issue 17, measured: cold and warm `gpufleet apply` of one lab fleet by two versions of
gpufleet (a base commit, `git archive`d, and this checkout), each with its own GPUFLEET_HOME (so its own
local server, started by that version), plain `ansible-playbook` with each version's roles, and the two
floors; optionally this checkout under Mitogen's strategy. All in one lab, alternating (the order rotates
each repetition), medians.

  sudo .venv/bin/python benchmarks/levers.py --nodes 16 --base 18addfa --reps 3 [--mitogen /path/to/site]

``--mitogen`` names a folder holding the ``ansible_mitogen`` package (an unpacked mitogen wheel): that
contender runs with ANSIBLE_STRATEGY=mitogen_linear and the strategy plugins from there."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_lab  # noqa: E402
from benchmarks.common import fmt, measure, median  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def export_tree(commit: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


class Tree:
    """One version of gpufleet (its package and its Ansible content), run with its own home."""

    def __init__(self, c: bench_lab.Contenders, label: str, tree: Path, extra_env: dict | None = None):
        self.c, self.label, self.tree = c, label, tree
        self.home = c.d / f"home-{re.sub(r'[^a-z0-9]+', '-', label.lower())}"
        self.env = {**c.env, "GPUFLEET_HOME": str(self.home), "PYTHONPATH": str(tree),
                    "GPUFLEET_CONTENT_DIR": str(tree), **(extra_env or {})}
        self.control = bench_lab.control_dir_of(self.home)

    def apply(self):
        m = measure([sys.executable, "-m", "gpufleet", "apply", "-f", str(self.c.fleet), "-y"], env=self.env)
        m.extra["failed"] = 0 if m.rc == 0 else len(self.c.hosts)
        return m

    def plain_ansible(self):
        env = {k: v for k, v in self.c.env.items() if not k.startswith("ANSIBLE_")}
        env.update(ANSIBLE_ROLES_PATH=str(self.tree / "roles"), ANSIBLE_HOST_KEY_CHECKING="True",
                   ANSIBLE_SSH_CONTROL_PATH_DIR=str(self.c.ansible_cp), ANSIBLE_NOCOLOR="1",
                   ANSIBLE_RETRY_FILES_ENABLED="False")
        m = measure([str(bench_lab.VENV / "ansible-playbook"), "-i", str(self.c.plain_inventory),
                     str(self.c.plain_playbook)], env=env)
        bad = sum(int(u) + int(f) for u, f in re.findall(r"unreachable=(\d+)\s+failed=(\d+)", m.out))
        m.extra["failed"] = bad if "PLAY RECAP" in m.out else len(self.c.hosts)
        return m

    def play(self, *extra: str, skip: bool = True):
        """gpufleet's probe play alone, run as gpufleet runs it (its environment, forks, skipped tags), on the
        inventory this tree's apply wrote: the apply without the CLI, the server and ansible-runner."""
        from gpufleet import probe, runner

        inventory = next((self.home / "fleets").rglob("inventory.yml"))
        env = {**self.env, **runner.ansible_env(min(max(len(self.c.hosts), 5), runner.MAX_FORKS)),
               "ANSIBLE_ROLES_PATH": str(self.tree / "roles")}
        skips = ["--skip-tags", ",".join(probe.PROBE_SKIP_TAGS)] if skip else []
        m = measure([str(bench_lab.VENV / "ansible-playbook"), "-i", str(inventory), *skips, *extra,
                     str(self.tree / "playbooks" / "probe.yml")], env=env)
        bad = sum(int(u) + int(f) for u, f in re.findall(r"unreachable=(\d+)\s+failed=(\d+)", m.out))
        m.extra["failed"] = bad if "PLAY RECAP" in m.out else len(self.c.hosts)
        return m

    def stop_server(self) -> None:
        subprocess.run([sys.executable, "-m", "gpufleet", "server", "stop"], env=self.env, capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--base", default="HEAD", help="the commit to compare this checkout with")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--mitogen", default=None, help="a folder holding ansible_mitogen (an unpacked mitogen wheel)")
    ap.add_argument("--no-ansible", action="store_true", help="leave plain ansible-playbook out")
    ap.add_argument("--plays", action="store_true",
                    help="also gpufleet's probe play alone, and with the Python interpreter given (no discovery)")
    ap.add_argument("--no-base", action="store_true", help="leave the base commit's apply out")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gpufleet-levers-"))
    base = export_tree(args.base, work / "base")
    results: dict = {"cold": {}, "warm": {}}
    trees: list[Tree] = []
    try:
        with bench_lab.lab(args.nodes) as d:
            c = bench_lab.Contenders(d)
            trees = [Tree(c, f"gpufleet@{args.base}", base), Tree(c, "gpufleet (this tree)", ROOT)]
            if args.mitogen:
                plugins = Path(args.mitogen) / "ansible_mitogen" / "plugins" / "strategy"
                trees.append(Tree(c, "gpufleet (this tree) + mitogen_linear", ROOT, {
                    "ANSIBLE_STRATEGY": "mitogen_linear", "ANSIBLE_STRATEGY_PLUGINS": str(plugins),
                    "PYTHONPATH": f"{ROOT}{os.pathsep}{args.mitogen}"}))
            runs = {"minimal floor": lambda: c.run("minimal"), "raw floor": lambda: c.run("raw")}
            for t in trees[1 if args.no_base and not args.plays else 0:]:
                runs[t.label] = t.apply
            if args.plays:
                runs[f"probe play alone @{args.base}"] = lambda: trees[0].play(skip=False)
                runs["probe play alone (this tree)"] = trees[1].play
                runs["probe play alone, interpreter given"] = lambda: trees[1].play(
                    "-e", "ansible_python_interpreter=/usr/bin/python3")
            if not args.no_ansible:
                runs[f"plain ansible, roles @{args.base}"] = trees[0].plain_ansible
                runs["plain ansible, roles of this tree"] = trees[1].plain_ansible
            socket_dirs = [d / "home", c.control, c.inv, c.ansible_cp, Path.home() / ".ansible" / "cp"]
            socket_dirs += [p for t in trees for p in (t.home / "cp", t.control)]

            def cold() -> None:
                bench_lab.close_masters(*socket_dirs)

            names = list(runs)
            for t in trees:  # Mitogen passes StrictHostKeyChecking=yes, which refuses a node never met: a plain
                if "ANSIBLE_STRATEGY" in t.env:  # apply with the same home meets them first, then its server goes
                    plain = {k: v for k, v in t.env.items() if not k.startswith("ANSIBLE_STRATEGY")}
                    subprocess.run([sys.executable, "-m", "gpufleet", "apply", "-f", str(c.fleet), "-y"], env=plain,
                                   capture_output=True)
                    t.stop_server()
            for name in names:  # untimed first contact: known_hosts filled, the fleet recorded, servers up
                cold()
                m = runs[name]()
                print(f"  first contact {name}: {m.wall:.2f}s rc {m.rc}" + (f"\n{m.out[-1500:]}" if m.rc else ""))
            for rep in range(args.reps):
                order = names[rep % len(names):] + names[:rep % len(names)]
                for name in order:
                    for mode in ("cold", "warm"):
                        if mode == "cold":
                            cold()
                        m = runs[name]()
                        r = results[mode].setdefault(name, {"wall": [], "cpu": [], "mem": [], "failed": []})
                        r["wall"].append(m.wall)
                        r["cpu"].append(m.cpu)
                        r["mem"].append(m.peak_mib)
                        r["failed"].append(m.extra["failed"])
                        print(f"  N={args.nodes} rep {rep + 1} {mode:4} {name:45}: {m.wall:6.2f}s wall, "
                              f"{m.cpu:6.2f}s cpu, {m.peak_mib:5.0f} MiB, {m.extra['failed']} failed", flush=True)
            cold()
            for t in trees:
                t.stop_server()
    finally:
        for t in trees:
            t.stop_server()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n| N={args.nodes} | mode | wall s (median) | x minimal floor | x raw floor | controller CPU s | "
          "failed host-runs |\n|---|---|---|---|---|---|---|")
    for mode in ("cold", "warm"):
        low = median(results[mode]["minimal floor"]["wall"])
        raw = median(results[mode]["raw floor"]["wall"])
        for name, r in results[mode].items():
            w = median(r["wall"])
            print(f"| {name} | {mode} | {fmt(w)} | {fmt(w / low)} | {fmt(w / raw)} | {fmt(median(r['cpu']))} | "
                  f"{sum(r['failed'])}/{len(r['failed']) * args.nodes} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
