"""Writing files and directories safely: temporaries named after their writer, replaced atomically, and
never a path replaced that anybit did not write.

A temporary is created beside its target as `.<target name>.anybit-<pid>-<random>`. A process killed while
writing leaves it behind; the next write to the same target removes every such temporary whose process is
gone, and nothing else.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from anybit.errors import AnybitError

_TEMP = re.compile(r"\.(?P<target>.+)\.anybit-(?P<pid>\d+)-[^/]*")


def temp_prefix(target: Path) -> str:
    """The name prefix of this process's temporaries for `target`."""
    return f".{target.name}.anybit-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def temporary_target(name: str) -> str | None:
    """The target name a temporary of that name was for; None when `name` is not an anybit temporary."""
    match = _TEMP.fullmatch(name)
    return match["target"] if match else None


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove the temporaries for `target` left by anybit processes that no longer run; returns them."""
    removed = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP.fullmatch(entry.name)
        if not match or match["target"] != target.name or _alive(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def make_temp_dir(target: Path) -> Path:
    """A new private temporary directory beside `target` (readable by all once in place)."""
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target), dir=target.parent))
    tmp.chmod(0o755)
    return tmp


def make_temp_file(target: Path, suffix: str = "") -> Path:
    """A new empty temporary file beside `target`."""
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target), suffix=suffix, dir=target.parent)
    os.close(fd)
    return Path(tmp)


def check_writable_dir(directory: Path) -> None:
    """Create `directory` if needed and prove a file can be written there; an AnybitError if not."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = make_temp_file(directory / "write-check")
        probe.unlink()
    except OSError as exc:
        raise AnybitError(f"cannot write to {directory}: {exc.strerror or exc}") from None


def replace_dir(tmp: Path, target: Path) -> None:
    """Put the finished directory `tmp` at `target`, replacing what is there (already checked to be ours)."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=temp_prefix(target), dir=target.parent))
    os.replace(target, old / "old")
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old / "old", target)  # the previous output stays where it was
        old.rmdir()
        raise
    shutil.rmtree(old)
