"""One run at a time per output: a lock file beside the output that names its holder.

    with output_lock(out, "ctxext patch"):   # a second run into OUT is refused (exit 2) naming this one's pid
        ...

The lock is ``.<name>.ctxext-lock`` beside OUT (OUT itself may not exist yet: outputs appear by rename). The holder
keeps it open under ``fcntl.flock`` and writes its pid, host, command and start time into it; it deletes it when
done. Stale-lock rule: a holder that died (kill -9, a crash, a reboot) holds nothing, because the kernel drops a
dead process's flock, so the next run takes the lock over; a lock still flocked by a process other than the pid it
names (a child forked by a holder that died) is taken over when that pid is not alive. Locks are re-entrant within
one process (the demo evaluates into its own folder).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ctxext.errors import OutputError
from ctxext.io.atomic import disk_full

log = logging.getLogger(__name__)
LOCK_MARK = ".ctxext-lock"
_HELD: dict[Path, int] = {}  # lock path -> nesting depth in this process


def lock_path(out: str | os.PathLike) -> Path:
    out = Path(out).absolute()
    return out.parent / f".{out.name}{LOCK_MARK}"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _holder(fd: int) -> dict:
    """What the lock file says about its holder (it may still be writing it: retry briefly)."""
    for _ in range(20):
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode(errors="replace")
        try:
            return json.loads(text)
        except ValueError:
            time.sleep(0.01)
    return {}


def _refusal(out: Path, path: Path, holder: dict) -> OutputError:
    who = (
        f"pid {holder.get('pid')} on {holder.get('host')} ({holder.get('command')}, started {holder.get('started')})"
        if holder
        else "a process that is starting"
    )
    return OutputError(
        f"{out} is being written by another ctxext run: {who}. Wait for it to finish or choose another "
        f"output; if no such process is running, delete {path}"
    )


def _acquire(out: Path, path: Path, command: str) -> int:
    for _ in range(10):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise disk_full(err, path) or OutputError(
                f"cannot write {out}: its lock file {path} cannot be created ({err.strerror or err})"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder, inode = _holder(fd), os.fstat(fd).st_ino
            os.close(fd)
            pid = holder.get("pid")
            if isinstance(pid, int) and holder.get("host") == socket.gethostname() and not pid_alive(pid):
                log.warning("taking over the lock of pid %s, which is not running: %s", pid, path)
                with contextlib.suppress(FileNotFoundError):  # its flock lives on in an orphaned child: a new file
                    if os.stat(path).st_ino == inode:  # is a new lock (unless another run replaced it already)
                        path.unlink()
                continue
            raise _refusal(out, path, holder) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder released (deleted) the file between our open and our flock: start again
            os.close(fd)
            continue
        stale = _holder(fd) if os.fstat(fd).st_size else {}
        if stale:
            log.warning(
                "took over the stale lock of pid %s (%s), which is not running", stale.get("pid"), stale.get("command")
            )
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        return fd
    raise OutputError(f"could not lock {out}: {path} keeps changing; is another ctxext run starting?")


@contextmanager
def output_lock(out: str | os.PathLike, command: str) -> Iterator[Path]:
    """Hold the lock of ``out`` for the block; ``OutputError`` when another live run holds it."""
    out = Path(out)
    path = lock_path(out)
    if path in _HELD:
        _HELD[path] += 1
        try:
            yield path
        finally:
            _HELD[path] -= 1
        return
    fd = _acquire(out, path, command)
    _HELD[path] = 1
    try:
        yield path
    finally:
        del _HELD[path]
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                path.unlink()
        except FileNotFoundError:
            pass
        os.close(fd)


def locks_output(command: str, field: str):
    """Decorate a function whose keyword argument ``field`` names its output: the output is locked for the call
    (``output_lock``), so a second run into it is refused, naming this one."""

    def wrap(fn):
        @functools.wraps(fn)
        def locked(**kwargs):
            with output_lock(kwargs[field], command):
                return fn(**kwargs)

        return locked

    return wrap
