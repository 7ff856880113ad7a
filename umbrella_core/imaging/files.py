"""Opening an image file: regular files only, and why a path cannot be opened.

Part of :mod:`umbrella_core.imaging`; :mod:`.header` re-exports both names.
:func:`~umbrella_core.imaging.header.read_nifti_header` opens every image
through :func:`open_regular` first, so a FIFO or a device is refused before a
byte is read. Each refusal is one line naming the file and saying what to do
about it.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

from umbrella_core.errors import DataError
from umbrella_core.imaging.formats import folder_message

__all__ = ["open_regular", "missing_file_message"]

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def missing_file_message(path: str | os.PathLike[str]) -> str:
    """Why ``path`` cannot be opened, naming it and saying what to do.

    A folder on the way that the user may not enter (``chmod 000``) makes a
    file look absent to ``stat``; the message then names that folder instead
    of claiming the file does not exist.
    """
    name = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(name))
    while folder and not os.path.isdir(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    if os.path.isdir(folder) and not os.access(folder, os.R_OK | os.X_OK):
        return (
            f"{name}: cannot be read: permission denied on the folder {folder}; "
            "make it readable (chmod a+rx) or run as a user who can read it"
        )
    link = _broken_link_message(name)
    if link:
        return link
    if os.path.exists(name) and not os.access(name, os.R_OK):
        return f"{name}: cannot be read: permission denied; make it readable (chmod a+r)"
    if os.path.exists(name) and not os.path.isfile(name):
        try:  # opens without blocking, and says what the file is
            open_regular(name).close()
        except DataError as error:
            return str(error)
    return (
        f"{name}: file not found{_sibling_hint(name)}; check the path (relative paths are "
        "relative to the manifest's folder) or remove the record"
    )


def _broken_link_message(name: str) -> str:
    """What is wrong when ``name``, or a folder on its way, is a symlink leading nowhere."""
    try:
        os.stat(name)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return (
                f"{name}: is a symbolic link that loops (it, or a link on its way, leads back "
                "to itself); point the link at the real file or give the file's own path"
            )
        if error.errno == errno.ENOENT and os.path.islink(name):
            target = os.readlink(name)
            return (
                f"{name}: is a symbolic link to {target}, which does not exist; fix the "
                "link or give the file's own path"
            )
    return ""


def _sibling_hint(name: str) -> str:
    """`` (there is X)`` when the same name with the other NIfTI suffix exists."""
    for suffix, other in ((".nii.gz", ".nii"), (".nii", ".nii.gz")):
        if name.lower().endswith(suffix):
            sibling = name[: -len(suffix)] + other
            if os.path.isfile(sibling):
                return f" (there is {os.path.basename(sibling)}: is that the one?)"
            break
    return ""


def open_regular(name: str) -> Any:
    """``name`` opened for binary reading, refused unless it is a regular file.

    Opened without blocking and checked on the open descriptor, so a FIFO is
    refused rather than waited on, and a file swapped after a check is still seen.
    """
    try:
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except (FileNotFoundError, PermissionError, NotADirectoryError):
        raise DataError(missing_file_message(name)) from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise DataError(missing_file_message(name)) from None
        raise DataError(f"{name}: cannot be opened ({error.strerror or error})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = next((what for test, what in _KINDS if test(mode)), "not a regular file")
        if kind == "a folder":
            raise DataError(folder_message(name))
        raise DataError(
            f"{name}: is {kind}, not a regular file; give the path of a NIfTI file "
            "(.nii or .nii.gz)"
        )
    return os.fdopen(fd, "rb")
