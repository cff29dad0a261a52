"""What each entry of a data set is, decided before anything opens it: a regular image file of its
class is read; anything else (a FIFO, socket or device, a link into another class or out of the
data folder, a folder already read) is listed as skipped. Opening a FIFO waits for a writer,
forever; a link into another class would give its images this class's label."""
from __future__ import annotations

import logging
import os
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger(__name__)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def link_problem(real: str, class_real: str, base_real: str, classes_real: dict[str, str]) -> Optional[str]:
    """None when a link's target ``real`` lies in its own class folder; else why it is not read."""
    if _inside(real, class_real):
        return None
    into = next((name for name, c in classes_real.items() if _inside(real, c)), None)
    if into is not None:
        return f"a link into the class {into}: not read"
    if _inside(real, base_real):
        return f"a link to {real}, out of its class folder: not read"
    return f"a link to {real}, which leaves the data folder: not read"


def file_problem(path: str) -> Optional[str]:
    """None for a regular file (links followed); else what the entry is, from ``stat`` alone."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        return f"unreadable: {err.strerror}"  # a broken link, or no permission to look
    if stat.S_ISREG(mode):
        return None
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")
    return f"{kind}, not a regular file: not opened"


@dataclass
class Walk:
    """A walk of a data folder's classes: where they really are, the folders read so far, and the
    folders and files it did not read (each with the reason)."""

    base_real: str
    classes_real: dict[str, str]
    seen: set[str]
    folders: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, base: Path, classes: list[str]) -> "Walk":
        real = os.path.realpath(base)  # seen: a link back to the data folder would read every class again
        return cls(real, {c: os.path.realpath(base / c) for c in classes}, {real})


def walk_images(top: Path, walk: Walk, is_image_name: Callable[[str], bool]) -> list[str]:
    """Regular image files under the class folder ``top``, following links within it but never
    into a folder already read (``walk.seen``, shared by all classes), an ancestor (a loop), another
    class or out of the data folder; those, unreadable folders and entries that are not regular
    files (FIFOs, sockets, devices) go to ``walk``, never opened."""
    found: list[str] = []
    top_real = os.path.realpath(top)

    def unreadable(err: OSError) -> None:
        walk.folders.append(f"{err.filename} (unreadable: {err.strerror})")

    for dirpath, dirnames, filenames in os.walk(top, followlinks=True, onerror=unreadable):
        real = os.path.realpath(dirpath)
        why = link_problem(real, top_real, walk.base_real, walk.classes_real)
        if why is None and (real in walk.seen or (real != top_real and os.path.commonpath([real, top_real]) == real)):
            why = f"leads to {real}, already read or an ancestor: a loop"
        if why:
            walk.folders.append(f"{dirpath} ({why})")
            dirnames[:] = []
            continue
        walk.seen.add(real)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        for name in sorted(filter(is_image_name, filenames)):
            path = os.path.join(dirpath, name)
            why = link_problem(os.path.realpath(path), top_real, walk.base_real, walk.classes_real) \
                if os.path.islink(path) else None
            why = why or file_problem(path)
            if why:
                walk.files.append(f"{path} ({why})")
            else:
                found.append(path)
    return found


def image_members(tf: tarfile.TarFile, where: str, is_image_name: Callable[[str], bool]):
    """(members, skipped) of an archive: the members named like images that hold one, files and
    hard links (read as the member they name); the others so named (symbolic links, FIFOs,
    devices) listed with what they are, never read."""
    members, skipped = [], []
    for m in tf.getmembers():
        if not is_image_name(m.name) or m.isdir():
            continue
        if m.isfile() or m.islnk():
            members.append(m)
            continue
        kind = ("a symbolic link" if m.issym() else "a FIFO" if m.isfifo()
                else "a device" if m.ischr() or m.isblk() else "a special member")
        skipped.append(f"{where}:{m.name} ({kind} in the archive: not read)")
    if skipped:
        log.warning("%s: skipped %d member(s) that are not image files (first: %s)", where, len(skipped), skipped[0])
    return members, skipped
