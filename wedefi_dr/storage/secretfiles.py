"""Secret files on local disk: created with their final mode, in folders this product owns.

Why not ``/tmp`` names: a predictable path in a shared, world-writable folder can be
created first by another local user, who then owns what we write there (a gpg home with
its ``gpg.conf``, a passfile). Why not write-then-chmod: between the two calls the file is
readable with the umask's mode. So every folder here is checked (a real directory, ours,
mode 0700) or created 0700, and every file is created by ``os.open`` with ``O_EXCL`` and
mode 0600, so it never exists with any other owner or mode.

Standard library only: the archive_command's import chain (gpg via ``encryption``) uses it.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import stat
import tempfile
import threading
from pathlib import Path

from wedefi_dr.errors import InvalidInput

PRODUCT_DIR = ".wedefi-dr"
_lock = threading.Lock()
_runtime: Path | None = None


def owned_private_dir(path: Path, *, os_user: str | None = None) -> Path:
    """``path`` as a directory of ours with mode 0700: created so, or checked to be so.

    A folder that exists but is a symlink, another user's, or open to group/others is
    refused rather than repaired: someone else may already have put files in it.
    ``os_user`` (only as root): the folder belongs to that OS user instead, for what a
    server running as that user must enter (its clusters' homes).
    """
    owner = pwd.getpwnam(os_user) if os_user else pwd.getpwuid(os.geteuid())
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    else:
        if owner.pw_uid != os.geteuid():
            os.chown(path, owner.pw_uid, owner.pw_gid)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise InvalidInput(f"{path} must be a directory of {owner.pw_name}, not a link or a file")
    if info.st_uid != owner.pw_uid:
        raise InvalidInput(
            f"{path} belongs to uid {info.st_uid}, not to {owner.pw_name} ({owner.pw_uid}): "
            "refusing to keep secrets in a folder someone else controls; remove it"
        )
    if info.st_mode & 0o077:
        raise InvalidInput(
            f"{path} has mode {stat.S_IMODE(info.st_mode):o}; it must be 700 (only its owner "
            "may read it): refusing to keep secrets in it"
        )
    return path


def product_home(os_user: str | None = None) -> Path:
    """``.wedefi-dr`` (0700, ours) in the home directory of the user this process runs as
    (or of ``os_user``, owned by that user: see :func:`owned_private_dir`).

    The home comes from the password database, not ``$HOME``: a server started as
    ``postgres`` by root keeps root's ``$HOME``, and its archive_command must not look
    for its folder there.
    """
    entry = pwd.getpwnam(os_user) if os_user else pwd.getpwuid(os.geteuid())
    home = Path(entry.pw_dir)
    if not home.is_dir():
        raise InvalidInput(
            f"the home directory of {entry.pw_name} ({home}) does not exist: it holds "
            f"the product's private folder {PRODUCT_DIR}; create it, owned by that user"
        )
    return owned_private_dir(home / PRODUCT_DIR, os_user=os_user)


def runtime_dir() -> Path:
    """A folder for this process's short-lived secret files (removed at exit).

    Random name (``mkdtemp``, 0700) inside the product home, so a process killed before
    its exit handler leaves its files in a folder only this user can read.
    """
    global _runtime
    with _lock:
        if _runtime is None or not _runtime.is_dir():
            runs = owned_private_dir(product_home() / "run")
            _runtime = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=runs))
            atexit.register(shutil.rmtree, _runtime, True)
        return _runtime


def write_secret_file(folder: Path, name: str, content: str) -> Path:
    """A new file ``folder/name`` holding ``content``, mode 0600 from its first byte."""
    path = folder / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(content)
    return path


def replace_secret_file(folder: Path, name: str, content: str) -> Path:
    """``folder/name`` replaced by a file holding ``content``, mode 0600 from its first byte.

    For secret files rewritten in place (a state file, a passfile): the new content goes to
    a fresh file (:func:`write_secret_file`), then ``os.replace`` swaps it in, so a reader
    sees the old file or the new one, never a half-written one or a moment of a wider mode.
    """
    tmp = write_secret_file(folder, f".{name}.{os.getpid()}-{os.urandom(4).hex()}", content)
    try:
        os.replace(tmp, folder / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return folder / name
