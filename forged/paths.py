"""Where forged keeps runtime files (sockets) and state (models).

Under systemd the unit's RuntimeDirectory= and StateDirectory= decide ($RUNTIME_DIRECTORY,
$STATE_DIRECTORY). Dev runs and tests set $FORGED_RUN_DIR and $FORGED_STATE_DIR. Otherwise root
gets the packaged locations and other users a per-user place.
"""

from __future__ import annotations

import os
from pathlib import Path


def _first_dir(env_var: str) -> Path | None:
    value = os.environ.get(env_var)
    # systemd passes a colon-separated list when several directories are configured.
    return Path(value.split(":")[0]) if value else None


def run_dir() -> Path:
    for var in ("RUNTIME_DIRECTORY", "FORGED_RUN_DIR"):
        found = _first_dir(var)
        if found:
            return found
    if os.geteuid() == 0:
        return Path("/run/forged")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "forged" if xdg else Path(f"/tmp/forged-{os.geteuid()}")


def state_dir() -> Path:
    for var in ("STATE_DIRECTORY", "FORGED_STATE_DIR"):
        found = _first_dir(var)
        if found:
            return found
    if os.geteuid() == 0:
        return Path("/var/lib/forged")
    return Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local/state")) / "forged"
