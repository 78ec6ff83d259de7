"""Cheap checks of the systemd units on the host: syntax (systemd-analyze verify) and exposure."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"
MAX_EXPOSURE = 2.0


def _analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze is missing (package systemd)", pytrace=False)
    return tool


def test_units_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point it at this tree's forged (same arguments).
    forged = Path(sys.executable).with_name("forged")
    assert forged.exists(), forged
    for unit in ("forged.service", "forged.socket"):
        text = (UNITS / unit).read_text().replace("/usr/bin/forged ", f"{forged} ")
        (tmp_path / unit).write_text(text)
    result = subprocess.run([_analyze(), "verify", "--recursive-errors=no", "--man=no",
                             str(tmp_path / "forged.socket"), str(tmp_path / "forged.service")],
                            capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_service_exposure() -> None:
    result = subprocess.run([_analyze(), "security", "--offline=yes", "--no-pager", str(UNITS / "forged.service")],
                            capture_output=True, text=True)
    match = re.search(r"Overall exposure level for forged\.service: ([\d.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_debian_units_are_the_systemd_ones() -> None:
    for unit in ("forged.service", "forged.socket"):
        assert (REPO / "debian" / unit).resolve() == (UNITS / unit).resolve()
