"""`forgectl model install` never writes a model file in place (forged serves it mmap'd: SIGBUS)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from forged.ctl.model import install_file


def test_install_over_an_existing_file_leaves_the_old_one_intact_and_renames_the_new_one_in(tmp_path: Path) -> None:
    dest = tmp_path / "models"
    dest.mkdir()
    target = dest / "m.gguf"
    old_bytes = b"GGUF" + b"old " * 50_000
    target.write_bytes(old_bytes)
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF" + b"new " * 60_000)
    with target.open("rb") as served:  # what a running forged has open and mapped
        before = os.fstat(served.fileno())
        assert install_file(source, dest, force=True) == target
        after = os.fstat(served.fileno())
        # The served file was unlinked, not rewritten: same size, same mtime, same bytes.
        assert after.st_nlink == 0
        assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
        served.seek(0)
        assert served.read() == old_bytes
    assert target.read_bytes() == source.read_bytes()
    assert target.stat().st_ino != before.st_ino
    assert [p.name for p in dest.iterdir()] == ["m.gguf"]  # no temp file left


def test_two_installs_at_once_do_not_share_a_temp_file(tmp_path: Path) -> None:
    dest = tmp_path / "models"
    sources = []
    for i in range(2):
        (tmp_path / str(i)).mkdir()
        sources.append(tmp_path / str(i) / "m.gguf")
        sources[-1].write_bytes(b"GGUF" + bytes([65 + i]) * 20_000_000)
    errors: list[BaseException] = []

    def install(source: Path) -> None:
        try:
            install_file(source, dest, force=True)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=install, args=(s,)) for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    # One of the two, whole: never a mix of both, never cut short.
    assert (dest / "m.gguf").read_bytes() in {s.read_bytes() for s in sources}
    assert [p.name for p in dest.iterdir()] == ["m.gguf"]
