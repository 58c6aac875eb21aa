"""Default images: what a run without `image` runs on (dstack's `python` and `nvcc` choose among them).

dstack (its jobs/configurators/base.py, read at 511c318c8) runs a run without `image` on its own base
image, `dstackai/base:<version>-base-ubuntu<version>` (the `-devel-` variant, with CUDA's nvcc, for
`nvcc: true`), and makes the `python` asked for (default: the dstack server's own Python) with
`uv venv` in it at start. gpufleet's hosts may have no registry access, so the images are
configurable: a list of `ImageSpec` in a fleet file (`images:`) or in the server's settings
(`images:` in server.yml). The fleet's list wins over the server's; with neither, dstack's own
images and its `uv venv` (see DSTACK_IMAGES), so that a dstack user's file means what it means in dstack.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, StrictBool, TypeAdapter, field_validator

from gpufleet.models.core import CoreModel

# dstack's PythonVersion (core/models/configurations.py)
PYTHON_VERSIONS = ("3.9", "3.10", "3.11", "3.12", "3.13", "3.14")
IMAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]*$")


def python_version(value: Any) -> str | None:
    """dstack's reading of `python`: a string or a number of PYTHON_VERSIONS; YAML's 3.10 is the float
    3.1, read as 3.10 (as dstack does)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"must be a Python version ({', '.join(PYTHON_VERSIONS)}), not {str(value).lower()}")
    if isinstance(value, float):
        value = "3.10" if value == 3.1 else str(value)
    if not isinstance(value, str) or value not in PYTHON_VERSIONS:
        raise ValueError(f"{value!r} is not a Python version dstack takes ({', '.join(PYTHON_VERSIONS)}; quote "
                         "it: \"3.10\")")
    return value


def image_reference(value: str) -> str:
    if not IMAGE_RE.match(value) or len(value) > 255:
        raise ValueError(f"{value!r} is not an image reference (no leading '-', spaces or shell characters)")
    return value


PythonVersion = Annotated[str | None, BeforeValidator(python_version)]


class ImageSpec(CoreModel):
    """One image a run without `image` may get (gpufleet's extension: a fleet's or the server's `images`)."""

    image: str = Field(description="The image reference, e.g. registry.local/py312:1 or localhost/base:1 "
                                   "(an image already on the hosts needs no registry).")
    python: PythonVersion = Field(
        None, description="The Python version it has (3.9 to 3.14): a run with `python: \"3.12\"` gets an "
                          "image with that version. Omitted: it serves no run that asks for a version.")
    nvcc: StrictBool = Field(
        False, description="It has CUDA's compiler (a -devel image): a run with `nvcc: true` gets only such an image.")
    default: StrictBool = Field(
        False, description="The image of a run that asks for no `python` (among those that fit its `nvcc`); "
                           "at most one per list. None marked: the first that fits.")

    @field_validator("image")
    @classmethod
    def _image(cls, v: str) -> str:
        return image_reference(v)


def _one_default(items: list[ImageSpec]) -> list[ImageSpec]:
    marked = [i.image for i in items if i.default]
    if len(marked) > 1:
        raise ValueError(f"only one image can be the default (marked: {', '.join(marked)})")
    return items


def _list(value: Any) -> Any:
    if isinstance(value, list) and not value:
        raise ValueError("cannot be empty (omit it to use the server's images, or dstack's)")
    return value


ImageList = Annotated[list[ImageSpec], BeforeValidator(_list), AfterValidator(_one_default)]
IMAGE_LIST = TypeAdapter(list[ImageSpec])
