"""Crash-safe file writing: nothing written to disk is ever left half-written.

Every writer goes through :func:`atomic_open`: the content goes to a temporary file
``.<name>.<random>.tmp`` in the destination folder, is flushed and fsynced, and is then
``os.replace``-d onto the destination (atomic on POSIX), after which the folder is fsynced. On any
error the temporary file is removed and the destination keeps its previous content; a process
killed mid-write leaves only a stale ``.tmp`` file.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

import torch

__all__ = ["atomic_open", "atomic_save", "atomic_write_text", "atomic_write_json", "atomic_copy", "dataclass_from_dict"]


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    with contextlib.suppress(OSError):
        os.fsync(fd)
    os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary sibling of ``path`` for writing; on a clean exit it replaces ``path``.

    Example:
        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     with atomic_open(os.path.join(d, "a.txt"), "w") as fh:
        ...         _ = fh.write("hello")
        ...     print(open(os.path.join(d, "a.txt")).read(), os.listdir(d))
        hello ['a.txt']
    """
    if "w" not in mode:
        raise ValueError(f"atomic_open writes whole files: mode must contain 'w', got {mode!r}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with contextlib.suppress(OSError):  # mkstemp makes 0600 files; give the usual permissions
            os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_open`.

    Example:
        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     atomic_save({"a": 1}, os.path.join(d, "x.pt"))
        ...     print(torch.load(os.path.join(d, "x.pt"))["a"], os.listdir(d))
        1 ['x.pt']
    """
    with atomic_open(path, "wb") as fh:
        torch.save(obj, fh)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w") as fh:
        fh.write(text)


def atomic_write_json(path: str, obj: Any, **kwargs: Any) -> None:
    """``json.dump`` to ``path`` atomically (``indent=2`` unless given)."""
    kwargs.setdefault("indent", 2)
    atomic_write_text(path, json.dumps(obj, **kwargs))


def atomic_copy(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` atomically."""
    with open(src, "rb") as fin, atomic_open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout)


def dataclass_from_dict(cls: type, values: dict, what: str = "settings") -> Any:
    """``cls(**values)`` for a dataclass ``cls``, rejecting unknown keys by name (a config read from disk).

    Example:
        >>> import dataclasses
        >>> @dataclasses.dataclass
        ... class Config:
        ...     steps: int = 10
        >>> dataclass_from_dict(Config, {"steps": 5})
        Config(steps=5)
        >>> dataclass_from_dict(Config, {"step": 5}, "demo settings")
        Traceback (most recent call last):
        ...
        ValueError: unknown demo settings ['step']; known: ['steps']
    """
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; known: {sorted(known)}")
    return cls(**values)
