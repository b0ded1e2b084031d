"""Changing the clusters file when roles change: a failover, a rejoin.

The clusters file (:mod:`wedefi_dr.postgres.cluster`) says which cluster is production,
and the restore-target policy, PITR's break-glass rule and the monitor read that flag. So
after a promotion the file must say so: the new primary ``production: true``, the old one
``production: false``, ``fenced: true`` and ``replaced_by: <the new primary>`` (where a DSN
naming it now leads, :mod:`wedefi_dr.postgres.primary`); a rejoin clears ``fenced`` again
and keeps ``replaced_by``, since the rejoined standby is still not where the primary is.

The file may be the stack's JSON or a YAML file an operator wrote by hand, with comments,
fields in their own order and clusters this product never touches. A change edits only the
keys it must, through ruamel's round-trip YAML (comments and order kept; JSON stays JSON),
and lands atomically: a temporary file beside it, fsync, rename over the old one, fsync of
the folder, with the old file's mode and owner. When we cannot write it (a read-only
mount, a file owned by someone else), nothing is half-written and the result says exactly
which keys the operator must change by hand.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from wedefi_dr.postgres.cluster import ClusterHandle, ClustersFileInvalid, read_clusters


def _round_trip() -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def _load(path: Path) -> tuple[Any, bool]:
    """The file's document, editable in place, and whether it is JSON."""
    text = path.read_text()
    try:
        return json.loads(text), True
    except ValueError:
        pass
    try:
        return _round_trip().load(text), False
    except Exception as exc:
        raise ClustersFileInvalid(f"clusters file {path}: {exc}") from exc


def _dump(document: Any, as_json: bool) -> str:
    if as_json:
        return json.dumps(document, indent=2) + "\n"
    out = io.StringIO()
    _round_trip().dump(document, out)
    return out.getvalue()


Role = bool | str | None


def _shown(value: Role) -> str:
    """``value`` as the operator would write it in the file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else value


def _changes_needed(document: Any, changes: Mapping[str, Mapping[str, Role]]) -> list[str]:
    """``cluster.key: value`` for every key whose value differs from what is asked (a key
    the file leaves out has the description's default)."""
    needed = []
    for name, fields in changes.items():
        entry = document.get(name) or {}
        for key, value in fields.items():
            if entry.get(key, ClusterHandle.model_fields[key].default) != value:
                needed.append(f"{name}.{key}: {_shown(value)}")
    return needed


def write_atomically(path: Path, text: str) -> None:
    """``text`` replaces ``path`` whole or not at all (temp + fsync + rename + fsync of the
    folder), keeping the file's mode and owner."""
    st = path.stat()
    if not os.access(path, os.W_OK):
        raise PermissionError(13, "not writable by this user", str(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), st.st_mode & 0o7777)
            if os.geteuid() == 0:
                os.fchown(f.fileno(), st.st_uid, st.st_gid)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def set_roles(path: Path, changes: Mapping[str, Mapping[str, Role]]) -> dict[str, Any]:
    """Set the role keys ``changes`` names (``{cluster: {"production": True}}``).

    Every cluster named must be described. A cluster sharing a data directory with one
    set ``production: false`` loses the flag too (:func:`read_clusters` would otherwise
    keep the old files production through their second name). Returns ``written`` (the
    file changed), ``changes`` (``cluster.key: value``, what was or must be set) and, when
    the file could not be written, ``operator_action``: one sentence naming the file and
    the keys to change by hand.
    """
    path = Path(path)
    handles = read_clusters(path)
    missing = sorted(set(changes) - set(handles))
    if missing:
        raise ClustersFileInvalid(f"clusters file {path} does not describe {', '.join(missing)}")
    wanted = {name: dict(fields) for name, fields in changes.items()}
    demoted = {
        handles[n].data_dir.resolve() for n, f in changes.items() if f.get("production") is False
    }
    for name, h in handles.items():
        if name not in wanted and h.data_dir.resolve() in demoted:
            wanted[name] = {"production": False}
    document, as_json = _load(path)
    needed = _changes_needed(document, wanted)
    if not needed:
        return {"path": str(path), "written": False, "changes": [], "operator_action": None}
    for name, fields in wanted.items():
        entry = document[name]
        for key, value in fields.items():
            if value is None:
                entry.pop(key, None)
            elif value or key in entry:
                entry[key] = value
    try:
        write_atomically(path, _dump(document, as_json))
    except OSError as exc:
        return {
            "path": str(path),
            "written": False,
            "changes": needed,
            "operator_action": (
                f"the clusters file {path} could not be written ({exc.strerror or exc}): "
                f"set {', '.join(needed)} in it by hand"
            ),
        }
    after = read_clusters(path)
    wrong = [n for n, f in wanted.items() if any(getattr(after[n], k) != v for k, v in f.items())]
    if wrong:
        raise ClustersFileInvalid(f"clusters file {path}: rewritten but {wrong} did not change")
    return {"path": str(path), "written": True, "changes": needed, "operator_action": None}


def after_failover(path: Path, old_primary: str, new_primary: str) -> dict[str, Any]:
    """The promoted cluster is production; the old primary is fenced, is not, and names the
    cluster that replaced it (what a DSN naming it follows to)."""
    return set_roles(
        path,
        {
            new_primary: {"production": True, "fenced": False, "replaced_by": None},
            old_primary: {"production": False, "fenced": True, "replaced_by": new_primary},
        },
    )


def after_rejoin(path: Path, rejoined: str) -> dict[str, Any]:
    """The rewound old primary is a standby again: not fenced, not production."""
    return set_roles(path, {rejoined: {"production": False, "fenced": False}})
