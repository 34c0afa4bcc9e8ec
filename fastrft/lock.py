"""Locks that keep two processes from writing one run directory (or one study cache) at once.

A lock is an advisory ``flock`` on a file that exists only while it is held: ``<dir>/run.lock`` for a
run directory, ``<cache>.lock`` beside a shared cache. The operating system drops an ``flock`` when its
process dies, however it dies (``kill -9`` included), so a lock can never outlive its holder; the file
a killed holder leaves behind is taken over by the next process, never obeyed. Whoever holds a lock
removes its file before releasing it, and whoever acquires one checks that the file it locked is still
the one at the path (a lock on a removed file locks nothing), so no leftover ``*.lock`` files remain.

A run directory's lock holds a line saying who holds it (process id, host, command, start time), which
the refusal of a second process quotes. Inside one process, taking a directory's lock again (a second
``Trainer`` on the same directory, as in a notebook that rebuilds it) shares the lock already held.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from fastrft.errors import ConfigError

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks; one writer at a time is then the user's to ensure
    fcntl = None

RUN_LOCK = "run.lock"

#: Directory locks this process holds: resolved path -> [open lock file, holders].
_HELD: dict[str, list] = {}


def _acquire(path: Path, blocking: bool):
    """The open lock file at ``path``, locked exclusively; None when another process holds it (and
    ``blocking`` is False)."""
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(path, "a+", encoding="utf-8")
        except FileNotFoundError:  # the directory went away between the two (a holder removed it): again
            continue
        if fcntl is None:
            return f
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            f.close()
            return None
        except OSError as e:  # a file system without flock (some network mounts): run unlocked, and say so
            print(f"fastrft: warning: cannot lock {path} ({e.strerror}); a second process on this directory "
                  "would not be refused", file=sys.stderr)
            return f
        try:  # the holder before us may have removed the file between our open and our lock: retry
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                return f
        except FileNotFoundError:
            pass
        f.close()


def _release(path: Path, f) -> None:
    try:
        path.unlink()  # while still locked: nobody can have locked the file we remove
    except FileNotFoundError:
        pass
    f.close()


@contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock for ``path`` (the sibling ``<name>.lock``), waiting for it if need be.

    For the caches a study's runs share, which are read-modify-write: two runs that read, add their entry
    and write at the same time would each drop the other's entry. The lock is on a sibling file because
    the cache itself is replaced by every write, and a lock on a replaced file locks nothing."""
    lock = Path(path).with_name(Path(path).name + ".lock")
    f = _acquire(lock, blocking=True)
    try:
        yield
    finally:
        _release(lock, f)


def _same_file(path: Path, f) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
    except (OSError, ValueError):
        return False


def holder(run_dir: str | Path) -> str:
    """Who holds ``run_dir``'s lock, as its lock file says (for messages)."""
    try:
        info = json.loads((Path(run_dir) / RUN_LOCK).read_text(encoding="utf-8"))
        return (f"process {info['pid']} on {info['host']} ({info['command']}, started "
                f"{info['started']})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


class RunLock:
    """The lock of one run directory, held from :func:`hold` until :meth:`release` (or process exit)."""

    def __init__(self, key: str, path: Path, created: bool = False, file=None):
        self._key, self.path, self.released = key, path, False
        self._created = created  # the directory was made for this run: removed on release if still empty
        self._file = file  # the lock file this handle shares (None: unlocked, a read-only directory)

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        entry = _HELD.get(self._key)
        if entry is None or entry[0] is not self._file:  # unlocked, or a lock since replaced: not ours to drop
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[self._key]
            _release(self.path, entry[0])
            if self._created:
                try:
                    self.path.parent.rmdir()  # a run that failed to start leaves no empty directory behind
                except OSError:
                    pass

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def hold(run_dir: str | Path, what: str, flag: str = "out (--out)", read_only: bool = False) -> RunLock:
    """Lock ``run_dir`` (created if missing) for this process, or refuse with one line naming the process
    that holds it. ``what``: what this process does there, for a later refusal's message. ``read_only``:
    the caller only reads (export), so a directory it cannot write runs unlocked, with a warning."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{flag} {run_dir}: cannot create it ({e.strerror}); choose a writable directory") from None
    key = str(run_dir.resolve())
    path = Path(key) / RUN_LOCK  # absolute: a later chdir must not make release remove another run's lock
    entry = _HELD.get(key)
    if entry is not None and _same_file(path, entry[0]):
        entry[1] += 1
        return RunLock(key, path, file=entry[0])
    if entry is not None:  # the directory was removed or replaced under a Trainer of this process: lock anew
        del _HELD[key]
        entry[0].close()
    try:
        f = _acquire(path, blocking=False)
    except OSError as e:
        if not read_only:
            raise ConfigError(f"{flag} {run_dir}: cannot write its lock file ({e.strerror}); choose a writable "
                              "directory") from None
        print(f"fastrft: warning: {run_dir} is not writable ({e.strerror}); reading it without its lock",
              file=sys.stderr)
        return RunLock(key, path)
    if f is None:
        raise ConfigError(f"{flag} {run_dir} is in use by {holder(run_dir)}; two processes writing one run "
                          "directory would corrupt it, so this one wrote nothing. Wait for that one to finish (or "
                          "stop it), then rerun; or choose another directory")
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": what,
                        "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    f.flush()
    _HELD[key] = [f, 1]
    return RunLock(key, path, created, file=f)


def command_line() -> str:
    """This process's command line, shortened, for the lock file."""
    text = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"
    return text if len(text) <= 120 else text[:117] + "..."
