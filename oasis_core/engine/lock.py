"""One run per target: an advisory lock held for the whole run, and the run's scratch folder.

Every entry point that runs stages on a target (the pipeline and its single-stage commands,
``oasis compare``, ``oasis sim fakes`` and ``same-field``, ``oasis test``, ``oasis demo``)
holds :func:`target_lock` for as long as it works there. The lock is ``fcntl.flock`` on
``<target>/.oasis.lock``; the holder writes its pid, host, start time and command into the
file, so a second run fails at once with :class:`~oasis_core.contracts.errors.TargetBusy` (exit code
2) naming the holder. The kernel releases the lock when its holder dies, however it dies,
so a lock left by a killed run is simply taken over; the file itself is never deleted
(deleting a lock file another process has open would let two runs hold "the" lock).

The lock is reentrant within a process: a nested :func:`target_lock` on the same target
(``compare`` calling the pipeline's stages...) joins the run already holding it. A function
that learns its target on the way (``sim same-field`` makes one) is decorated with
:func:`holds_targets` and calls :func:`hold` once it knows the path: the lock is then held
until the function returns.

Each run gets a scratch folder of its own, ``<target>/.work/run-<id>/``
(:func:`scratch_dir`), removed when the run ends;
those of dead runs are removed when the next run takes the lock. Nothing is written outside
the target.

Before taking the lock, the target and the folders a run writes in are checked for write
access (:func:`check_writable`): a read-only target fails in one line, before any work.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import logging
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import attrs

from oasis_core.contracts.errors import InputError, TargetBusy

__all__ = [
    "LOCK_NAME",
    "check_writable",
    "held",
    "hold",
    "holds_targets",
    "scratch_dir",
    "target_lock",
]

log = logging.getLogger("oasis")

#: The lock file's name, inside the target.
LOCK_NAME = ".oasis.lock"
#: Prefix of a run's scratch folder under ``<target>/.work/``.
RUN_PREFIX = "run-"


@attrs.define
class _Held:
    """A lock this process holds: its file descriptor, nesting depth and scratch folder."""

    fd: int
    scratch: Path
    depth: int = 1


_HELD: dict[Path, _Held] = {}
_GUARD = threading.RLock()


def _key(path: str | Path) -> Path:
    return Path(path).resolve()


def held(path: str | Path) -> bool:
    """Does this process hold the lock of the target at ``path``?"""
    with _GUARD:
        return _key(path) in _HELD


def scratch_dir(path: str | Path) -> Path:
    """The scratch folder of the run holding the target at ``path`` (this process's).

    Raises
    ------
    RuntimeError
        When this process does not hold the target's lock (a programming error: scratch
        belongs to a run).
    """
    with _GUARD:
        entry = _HELD.get(_key(path))
    if entry is None:
        msg = (
            f"{path}: scratch asked for outside a run; hold "
            "oasis_core.engine.lock.target_lock first"
        )
        raise RuntimeError(msg)
    return entry.scratch


def _writable(path: Path) -> bool:
    """Writable by this process, and not marked read-only (no write bit for anyone): the
    mark is honoured even for root, who would otherwise write through it."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return os.access(path, os.W_OK) and bool(mode & 0o222)


def check_writable(path: str | Path) -> None:
    """Check that a run can write in the target at ``path``: the target folder and those of
    its folders a run writes in (``data/`` is only read, and may be read-only).

    Raises
    ------
    InputError
        ``"<target>: not writable (<what>); ..."``, naming the first folder at fault.
    """
    from oasis_core.engine.tree import WRITTEN_DIRS

    target = Path(path)
    for rel in ("", *WRITTEN_DIRS):
        folder = target / rel if rel else target
        if rel and not folder.is_dir():
            continue
        if not _writable(folder):
            what = "the target folder" if not rel else f"its folder {rel}/"
            raise InputError(
                f"{target}: not writable ({what} is read-only); make it writable "
                "(chmod -R u+w) or run on a writable copy of the target"
            )


def _describe_holder(lock_file: Path) -> str:
    """``pid N on HOST, started T (command)`` from the lock file (retrying briefly: the
    holder writes it just after taking the lock)."""
    fields: dict[str, str] = {}
    for _ in range(20):
        with contextlib.suppress(OSError):
            text = lock_file.read_text(errors="replace")
            fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        if "pid" in fields:
            break
        time.sleep(0.05)
    pid = fields.get("pid", "?")
    host = fields.get("host", "?")
    start = fields.get("start", "?")
    command = fields.get("command", "")
    return f"pid {pid} on {host}, started {start}" + (f" ({command})" if command else "")


def _command() -> str:
    argv = [Path(sys.argv[0]).name if sys.argv else "python", *sys.argv[1:]]
    if argv[0] in ("cli.py", "__main__.py"):
        argv[0] = "oasis"
    return " ".join(argv).replace("\n", " ")[:200]


def _acquire(target: Path, command: str | None) -> _Held:
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(
            f"{target}: cannot create the target folder ({err.strerror}); check the path"
        ) from err
    check_writable(target)
    lock_file = target / LOCK_NAME
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as err:
        raise InputError(
            f"{target}: not writable (cannot open {LOCK_NAME}: {err.strerror}); make it "
            "writable (chmod -R u+w) or run on a writable copy of the target"
        ) from err
    try:
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory lock to take
            fcntl = None  # type: ignore[assignment]
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    # a filesystem without locks (some network mounts): run, but say so
                    log.warning(
                        "%s: cannot lock %s (%s); another run on this target would not be stopped",
                        target,
                        LOCK_NAME,
                        err.strerror or err,
                    )
                    return _start(target, fd, command)
                holder = _describe_holder(lock_file)
                raise TargetBusy(
                    f"{target}: another OASIS run holds this target ({holder}); wait for it "
                    "to finish or stop it, then run again"
                ) from None
        return _start(target, fd, command)
    except BaseException:
        os.close(fd)  # closing releases the lock
        raise


def _start(target: Path, fd: int, command: str | None) -> _Held:
    """Record the holder in the lock file; name the run's scratch folder and remove those
    of dead runs."""
    host = socket.gethostname()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    info = (
        f"pid={os.getpid()}\nhost={host}\nstart={started}\n"
        f"command={command if command is not None else _command()}\n"
    )
    os.ftruncate(fd, 0)
    os.pwrite(fd, info.encode(), 0)
    os.fsync(fd)
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{host}-{os.getpid()}"
    scratch = target / ".work" / f"{RUN_PREFIX}{run_id}"
    _remove_stale_scratch(target, keep=scratch)
    return _Held(fd=fd, scratch=scratch)


def _remove_stale_scratch(target: Path, *, keep: Path) -> None:
    """Remove the scratch folders of earlier runs (all dead: this run holds the lock)."""
    work = target / ".work"
    if not work.is_dir():
        return
    for folder in work.glob(f"{RUN_PREFIX}*"):
        if folder != keep and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)


def _release(entry: _Held) -> None:
    shutil.rmtree(entry.scratch, ignore_errors=True)
    with contextlib.suppress(OSError):  # only when empty (a partial download may wait there)
        entry.scratch.parent.rmdir()
    try:
        with contextlib.suppress(OSError):
            os.ftruncate(entry.fd, 0)
    finally:
        os.close(entry.fd)


@contextlib.contextmanager
def target_lock(path: str | Path, *, command: str | None = None) -> Iterator[Path]:
    """Hold the lock of the target at ``path`` for the body; yield the run's scratch folder.

    Reentrant within a process: an inner call on the same target joins the outer one.

    Parameters
    ----------
    path : str or Path
        The target folder (created when missing).
    command : str, optional
        What the holder is doing, written in the lock file (default: the command line).

    Raises
    ------
    TargetBusy
        Another process holds the lock; the message names its pid, host and start time.
    InputError
        The target (or a folder a run writes in) is not writable.

    Examples
    --------
    >>> with target_lock(target.path) as scratch:  # doctest: +SKIP
    ...     run_stages(ctx)
    """
    key = _key(path)
    with _GUARD:
        entry = _HELD.get(key)
        if entry is not None:
            entry.depth += 1
        else:
            entry = _acquire(key, command)
            _HELD[key] = entry
    try:
        yield entry.scratch
    finally:
        with _GUARD:
            entry.depth -= 1
            if entry.depth == 0:
                del _HELD[key]
                _release(entry)


F = TypeVar("F", bound=Callable[..., Any])
_CALL: contextvars.ContextVar[contextlib.ExitStack | None] = contextvars.ContextVar(
    "oasis_lock_call", default=None
)


def holds_targets(function: F) -> F:
    """Decorator: the locks :func:`hold` takes during a call of ``function`` are held until
    the call returns (or raises)."""

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        with contextlib.ExitStack() as stack:
            token = _CALL.set(stack)
            try:
                return function(*args, **kwargs)
            finally:
                _CALL.reset(token)

    return call  # type: ignore[return-value]


def hold(path: str | Path, *, command: str | None = None) -> Path:
    """Take the lock of the target at ``path`` (:func:`target_lock`) until the call of the
    enclosing :func:`holds_targets` function ends; return the run's scratch folder.

    Raises
    ------
    TargetBusy, InputError
        As :func:`target_lock`.
    RuntimeError
        Outside a :func:`holds_targets` function.
    """
    stack = _CALL.get()
    if stack is None:
        raise RuntimeError("oasis_core.engine.lock.hold: call it inside a @holds_targets function")
    return stack.enter_context(target_lock(path, command=command))
