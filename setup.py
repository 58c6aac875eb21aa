"""What pyproject.toml cannot declare: the version, read from galaxy.yml (the one place it is stated),
and the Ansible content, copied from the repository's top level into the wheel as gpufleet/_content/
(gpufleet.paths.content_root() finds it there; an editable install uses the checkout's folders)."""

import re
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CONTENT = ["playbooks", "roles", "plugins", "inventory_templates"]


def galaxy_version() -> str:
    match = re.search(r"^version:\s*['\"]?([0-9][0-9A-Za-z.+-]*)['\"]?\s*$", (ROOT / "galaxy.yml").read_text(), re.M)
    if not match:
        raise RuntimeError("galaxy.yml has no `version:` line")
    return match.group(1)


def _ignore(folder: str, names: list[str]) -> set[str]:
    # playbooks/roles links to ../roles (gpufleet sets ANSIBLE_ROLES_PATH to _content/roles instead)
    skip = {"__pycache__"} | ({"roles"} if Path(folder).name == "playbooks" else set())
    return {n for n in names if n in skip or n.endswith((".pyc", ".pyo"))}


class BuildPyWithContent(build_py):
    def run(self):
        super().run()
        if self.editable_mode:  # the checkout's own folders are used in place
            return
        target = Path(self.build_lib) / "gpufleet" / "_content"
        shutil.rmtree(target, ignore_errors=True)
        for name in CONTENT:
            # symlinks=False: the roles' library/ and module_utils/ link to plugins/; the wheel gets copies
            shutil.copytree(ROOT / name, target / name, symlinks=False, ignore=_ignore)


setup(version=galaxy_version(), cmdclass={"build_py": BuildPyWithContent})
