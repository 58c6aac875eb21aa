"""Which image a run gets on a fleet: its `image`, else one of the configured default images (see
gpufleet.models.images), chosen by its `python` and `nvcc` the way dstack's are.

``choose`` is the one place this is decided. The queue asks it for each fleet a run may go to (a
fleet with no image that fits is no place for the run, and a run that no fleet has an image for
is refused at plan and submit, saying what is configured); launch asks it once for the fleet the
run was placed on, and the `workload` role runs that image.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from gpufleet.errors import GpufleetError
from gpufleet.models import RunConfigType
from gpufleet.models.images import IMAGE_LIST, PYTHON_VERSIONS, ImageSpec

# dstack's defaults (its settings.py and version.py at 511c318c8): DSTACK_DOCKER_BASE_IMAGE,
# docker_base_image, docker_base_image_ubuntu_version; `-devel-` for nvcc; DSTACK_DIND_IMAGE for `docker: true`
# written in full (docker.io/...): Docker reads a short name as Docker Hub's, but podman refuses one unless
# the host's registries.conf has unqualified-search registries (Debian's has none)
DSTACK_BASE_IMAGE = "docker.io/dstackai/base"
DSTACK_BASE_VERSION = "0.15"
DSTACK_UBUNTU = "24.04"
DSTACK_DIND_IMAGE = "docker.io/dstackai/dind"
DSTACK_VENV_DIR = "/dstack/venv"


def dstack_image(nvcc: bool) -> str:
    return f"{DSTACK_BASE_IMAGE}:{DSTACK_BASE_VERSION}-{'devel' if nvcc else 'base'}-ubuntu{DSTACK_UBUNTU}"


def default_python() -> str:
    """dstack's default `python`: the server's own Python version (here: this process's), when dstack takes it."""
    mine = f"{sys.version_info.major}.{sys.version_info.minor}"
    return mine if mine in PYTHON_VERSIONS else "3.12"


@dataclass(frozen=True)
class Choice:
    """The image a run gets. ``venv_python``: on dstack's base images, the Python that `uv venv` makes
    at start (as dstack does; None: none made). ``shell``: the shell `commands` run with when the run
    names none (dstack runs them with bash on its own images); None: the run's. ``setup``: what dstack
    runs first on that image."""

    image: str
    venv_python: str | None = None
    shell: str | None = None
    setup: tuple[str, ...] = ()  # lines run before the run's own (dstack's dind: start-dockerd)

    def prelude(self) -> str:
        """The shell lines run before the run's commands: ``setup``, and those that make dstack's Python
        venv (at DSTACK_VENV_DIR) and activate it; '' when there are none."""
        if self.venv_python is None:
            return "\n".join(self.setup)
        return "\n".join([*self.setup,
            f"export DSTACK_VENV_DIR={DSTACK_VENV_DIR}",
            'if [ "$(id -u)" = 0 ]; then _s=; else _s=sudo; fi',
            '$_s rm -rf "$DSTACK_VENV_DIR" && $_s mkdir -p "$DSTACK_VENV_DIR" && '
            '$_s chown "$(id -u):$(id -g)" "$DSTACK_VENV_DIR"',
            f'uv venv -q --prompt dstack -p {self.venv_python} --seed "$DSTACK_VENV_DIR"',
            '. "$DSTACK_VENV_DIR/bin/activate"',
        ])


class NoImage(GpufleetError):
    """No configured image fits the run's `python` / `nvcc` on a fleet."""


_server_images: list[ImageSpec] | None = None


def set_server_images(items: Sequence[ImageSpec] | None) -> None:
    """The server's `images` (its settings), for every fleet without its own; None: dstack's."""
    global _server_images
    _server_images = None if items is None else list(items)


def server_images() -> list[ImageSpec] | None:
    return _server_images


def _describe(item: ImageSpec) -> str:
    tags = [t for t in (item.python, "nvcc" if item.nvcc else "") if t]
    return f"{item.image} ({', '.join(tags)})" if tags else item.image


def choose(cfg: RunConfigType, fleet_images: Sequence[ImageSpec] | None, server: Sequence[ImageSpec] | None,
           fleet: str) -> Choice:
    """The image of run ``cfg`` on ``fleet`` (whose `images` are ``fleet_images``; the server's are
    ``server``). Raise NoImage, saying what is configured, when no configured image fits."""
    if cfg.image is not None:
        return Choice(cfg.image)
    if cfg.docker:  # dstack's image for `docker: true` (it takes no python/nvcc), its daemon started first
        return Choice(DSTACK_DIND_IMAGE, shell="bash", setup=("start-dockerd",))
    configured, where = (fleet_images, f"fleet {fleet}'s `images`") if fleet_images else \
        (server, "the server's `images` (server.yml)")
    if not configured:
        return Choice(dstack_image(bool(cfg.nvcc)), venv_python=cfg.python or default_python(), shell="bash")
    fits = [i for i in configured if (not cfg.nvcc or i.nvcc) and (cfg.python is None or i.python == cfg.python)]
    if not fits:
        asked = [f"python: {cfg.python}"] if cfg.python else []
        asked += ["nvcc: true"] if cfg.nvcc else []
        what = " with nvcc" if cfg.nvcc else ""
        what = f"for Python {cfg.python}{what}" if cfg.python else what.strip()
        raise NoImage(f"{', '.join(asked)}: no image {what} on fleet {fleet} (configured: "
                      f"{', '.join(_describe(i) for i in configured)}); add one to {where}")
    return Choice(next((i for i in fits if i.default), fits[0]).image)


def fleet_images(config: dict | None) -> list[ImageSpec] | None:
    """A fleet's `images`, from its config as stored at apply time."""
    items = (config or {}).get("images")
    return None if not items else IMAGE_LIST.validate_python(items)


def for_fleet(store, cfg: RunConfigType, fleet: str) -> Choice:
    """``choose`` on a fleet of ``store`` with this server's images."""
    return choose(cfg, fleet_images(store.fleet_config(fleet)), server_images(), fleet)


def usable(cfg: RunConfigType, fleets: Iterable[str], configured: Mapping[str, Sequence[ImageSpec] | None]
           ) -> tuple[list[str], str]:
    """Of ``fleets`` (each with its `images` in ``configured``), those where the run has an image; and
    why none, when none has."""
    ok, why = [], []
    for f in fleets:
        try:
            choose(cfg, configured.get(f), server_images(), f)
            ok.append(f)
        except NoImage as e:
            why.append(str(e))
    return ok, ("" if ok else "; ".join(why))
