"""Run `ansible-test sanity` on the gpufleet.fleet collection, offline except for the package index.

    .venv/bin/python scripts/sanity.py [--home DIR] [--work DIR] [ansible-test sanity options]

Builds the collection from this checkout, installs it into <work>/collections/ansible_collections/gpufleet/fleet
and runs `ansible-test sanity --python 3.11` there (on this machine: no containers), with HOME pointed at <home>.
ansible-test keeps its per-test virtual environments and its pip bootstrap script under ~/.ansible/test, so
a fresh <home> (the default: a temporary folder, removed afterwards) is a cold run that nothing left on the
machine can help; pass the same --home again for a warm one.

ansible-test bootstraps pip in each virtual environment with a get-pip.py it downloads from a host that is
not a package index; it takes the script from its cache when there is one. This writes a stand-in there
(GET_PIP_STANDIN) that bootstraps pip with ensurepip and then installs the requested pip from the index.
The tools run from the virtualenv next to sys.executable. Exit status: ansible-test's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PYTHON = "3.11"

# Run by ansible-test as get-pip.py (through runpy, as __main__) in a new virtual environment, with the
# arguments for `pip install`: `--disable-pip-version-check pip==<version> --no-setuptools --no-wheel`.
GET_PIP_STANDIN = '''\
"""Stand-in for get-pip.py, written by gpufleet's scripts/sanity.py: pip from ensurepip, then the
requested pip from the package index (pip's own configuration, /etc/pip.conf included, applies)."""
import ensurepip
import importlib.metadata
import os
import subprocess
import sys

NOT_PIP = ("--no-setuptools", "--no-wheel")  # get-pip.py's own options; pip does not know them


def installed(name):
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def main():
    args = sys.argv[1:]
    environ = dict(os.environ)
    # ensurepip sets PIP_CONFIG_FILE=/dev/null and drops every PIP_* variable in this process
    ensurepip.bootstrap()
    os.environ.clear()
    os.environ.update(environ)
    pip = [sys.executable, "-m", "pip"]
    subprocess.check_call(pip + ["install"] + [a for a in args if a not in NOT_PIP])
    unwanted = [name for name, option in (("setuptools", "--no-setuptools"), ("wheel", "--no-wheel"))
                if option in args and installed(name)]
    if unwanted:
        subprocess.check_call(pip + ["uninstall", "--yes", "--quiet"] + unwanted)


main()
'''


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        sys.exit(f"sanity: {name} is not installed next to {sys.executable}: pip install -e '.[test]'")
    return str(path)


def pip_version() -> str:
    """The pip version ansible-test bootstraps (the name of its cached get-pip script depends on it)."""
    from ansible_test._internal.python_requirements import get_venv_packages

    return get_venv_packages(types.SimpleNamespace(version=PYTHON))["pip"]


def environment(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH") and not k.startswith(("ANSIBLE_", "PIP_"))}
    env.update(HOME=str(home), PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]), ANSIBLE_NOCOLOR="1",
               NO_COLOR="1")
    return env


def install_collection(work: Path, env: dict[str, str]) -> Path:
    """Build the collection from the checkout and install it; return its folder."""
    dist, collections = work / "dist", work / "collections"
    shutil.rmtree(dist, ignore_errors=True)
    shutil.rmtree(collections, ignore_errors=True)
    subprocess.run([tool("ansible-galaxy"), "collection", "build", "--output-path", str(dist), str(ROOT)],
                   env=env, cwd=work, check=True, stdout=subprocess.DEVNULL)
    (artifact,) = dist.glob("gpufleet-fleet-*.tar.gz")
    subprocess.run([tool("ansible-galaxy"), "collection", "install", "-p", str(collections), str(artifact)],
                   env=env, cwd=work, check=True, stdout=subprocess.DEVNULL)
    return collections / "ansible_collections" / "gpufleet" / "fleet"


def sanity(home: Path, work: Path, options: list[str]) -> int:
    env = environment(home)
    cache = home / ".ansible" / "test" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / f"get_pip_{pip_version().replace('.', '_')}.py").write_text(GET_PIP_STANDIN)
    collection = install_collection(work, env)
    argv = [tool("ansible-test"), "sanity", "--python", PYTHON, "--color", "no", *options]
    print("sanity:", " ".join(argv), f"(in {collection}, HOME={home})", flush=True)
    return subprocess.run(argv, env=env, cwd=collection).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, help="HOME for ansible-test (default: a temporary folder)")
    parser.add_argument("--work", type=Path, help="where to build and install the collection (default: temporary)")
    args, options = parser.parse_known_args()
    with tempfile.TemporaryDirectory(prefix="gpufleet-sanity-") as tmp:
        home = (args.home or Path(tmp) / "home").resolve()
        work = (args.work or Path(tmp) / "work").resolve()
        work.mkdir(parents=True, exist_ok=True)
        return sanity(home, work, options)


if __name__ == "__main__":
    sys.exit(main())
