"""Files: frame names, checksums, atomic writes, the output checks, text and tables.

Every output is written through :func:`atomic_write` (a temporary file in the same
directory, then :func:`os.replace`), so a crash never leaves a half-written file under a
final name.

Outputs
-------
:func:`check_outputs` is called by every command that writes to paths the user names,
before any work: no output may be an input or another output (the same path after
resolving links, or the same file through a hard link), and each output's folder must
exist and be writable.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from oasis_core.contracts.errors import InputError

__all__ = [
    "FITS_SUFFIXES",
    "atomic_write",
    "check_outputs",
    "file_key",
    "frame_name",
    "is_fits_name",
    "sha256",
    "write_table",
    "write_text",
]

log = logging.getLogger("oasis")


FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.fz", ".fit.fz", ".fz", ".fits.gz", ".fit.gz")


def is_fits_name(path: Path) -> bool:
    """True when ``path``'s name ends with a FITS suffix (``.fits``, ``.fit``, ``.fz``...)."""
    name = path.name.lower()
    return any(name.endswith(s) for s in FITS_SUFFIXES)


def frame_name(path: Path) -> str:
    """The frame's short name: the file name without its FITS suffixes."""
    name = path.name
    for suffix in sorted(FITS_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def file_key(path: Path) -> tuple[str, int, int, int, int, int]:
    """What says a file is still the one read before: its path, device, inode, size,
    modification *and* status-change times. An edit that keeps the size and restores the
    modification time (``cp -p``, ``rsync -t``, ``touch -r``) still changes the
    status-change time, which no user can set; an atomic rewrite changes the inode."""
    st = Path(path).stat()
    return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with contextlib.suppress(FileNotFoundError):  # mkstemp's 0600: as a normal file
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _identity(path: Path) -> tuple[str, tuple[int, int] | None]:
    """``path`` resolved (links followed) and its ``(st_dev, st_ino)`` when it exists."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return real, None
    return real, (st.st_dev, st.st_ino)


def check_outputs(
    *,
    inputs: Iterable[Path | None],
    outputs: Mapping[str, Path | None] | Iterable[Path | None],
) -> None:
    """Refuse, before any work, output paths that would destroy data or cannot be written.

    Parameters
    ----------
    inputs : iterable of Path
        The files the command reads (``None`` entries are ignored).
    outputs : mapping or iterable of Path
        The files the command writes, optionally by what the user calls them
        (``{"output": p, "--noise": q}``); ``None`` entries are ignored.

    Raises
    ------
    InputError
        When an output is an input or another output (the same path once links are
        resolved, or the same file through a hard link), is a folder, or its folder is
        missing, not a folder or not writable. The message names the path.

    Examples
    --------
    >>> check_outputs(inputs=[Path("sci.fits")], outputs={"output": Path("sci.fits")})
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    oasis_core.contracts.errors.InputError: sci.fits: the output is one of the inputs ...
    """
    labelled = (
        list(outputs.items()) if isinstance(outputs, Mapping) else [("output", p) for p in outputs]
    )
    seen: list[tuple[str, Path, str, tuple[int, int] | None]] = [
        ("input", Path(p), *_identity(Path(p))) for p in inputs if p is not None
    ]
    for label, out in labelled:
        if out is None:
            continue
        out = Path(out)
        real, inode = _identity(out)
        for kind, other, other_real, other_inode in seen:
            same_file = inode is not None and inode == other_inode
            if real == other_real or same_file:
                how = " through a hard link" if real != other_real else ""
                if kind == "input":
                    raise InputError(
                        f"{out}: the {label} is one of the inputs ({other}){how}; writing "
                        "it would destroy that input: choose another path"
                    )
                raise InputError(
                    f"{out}: the {label} is also the {kind} ({other}){how}; one would "
                    "overwrite the other: choose another path"
                )
        if os.path.isdir(real):
            raise InputError(f"{out}: the {label} is a folder; give a file name")
        folder = Path(real).parent
        if not folder.exists():
            raise InputError(
                f"{out}: the folder {folder} of the {label} does not exist; create it first"
            )
        if not folder.is_dir():
            raise InputError(
                f"{out}: {folder} is not a folder; choose another path for the {label}"
            )
        try:  # the only test that holds for root, read-only mounts and ACLs alike
            fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".check", dir=folder)
        except OSError as err:
            raise InputError(
                f"{out}: cannot write the {label} in {folder} ({err.strerror or err}); "
                "choose a writable folder"
            ) from err
        os.close(fd)
        os.unlink(probe)
        seen.append((label, out, real, inode))


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def write_table(table: Any, path: Path, *, fmt: str | None = None) -> None:
    """Write an astropy Table atomically (ECSV by default, by suffix otherwise).

    In ECSV, the columns that have no description yet and are named in the catalog
    schema (:data:`oasis_core.engine.sources.CATALOG_COLUMNS`) get its unit and description
    (``table`` itself is not changed), so every catalog carries them whoever built it.
    """
    path = Path(path)
    if fmt is None:
        fmt = "ascii.ecsv" if path.suffix == ".ecsv" else "ascii.fixed_width_two_line"
    if fmt == "ascii.ecsv":
        from oasis_core.engine.sources import describe_columns

        table = describe_columns(table.copy(copy_data=False), missing_only=True)
    with atomic_write(path) as tmp:
        if len(table) == 0 and fmt.startswith("ascii.fixed_width"):
            # astropy cannot size the columns of an empty fixed-width table
            tmp.write_text(" ".join(table.colnames) + "\n")
        else:
            table.write(tmp, format=fmt, overwrite=True)
