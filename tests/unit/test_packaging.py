"""pyproject.toml as a build backend reads it: a checkout builds with the oldest setuptools it says it takes."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text(encoding="utf-8"))
# The first setuptools that reads `license` as an SPDX expression (PEP 639); older ones refuse the whole file.
SPDX_LICENSE_SETUPTOOLS = (77, 0, 3)


def test_the_setuptools_floor_reads_the_license_as_written() -> None:
    (requirement,) = [r for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    floor = re.fullmatch(r"setuptools>=([0-9.]+)", requirement)
    assert floor, requirement
    assert isinstance(PYPROJECT["project"]["license"], str)  # an expression, not a {text = ...} table
    assert tuple(int(part) for part in floor.group(1).split(".")) >= SPDX_LICENSE_SETUPTOOLS, requirement
