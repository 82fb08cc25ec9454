"""Files replaced whole or not at all.

A file is written under a temporary name beside its final path (same folder, so the same
filesystem and an atomic rename), flushed to disk, and only then renamed over the final
path. A crash, a full disk or an exception during the write leaves a previous file at that
path exactly as it was and no partial file under the final name; the temporary one is
removed when the failure is an exception (a SIGKILL can leave one, named `.NAME.*.tmp`).
"""
import contextlib
import os
import secrets
from pathlib import Path


def temporary_sibling(path):
    """A fresh hidden name beside `path` (unique per process and call: two writers never share one)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _fsync(path, directory=False):
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    except OSError:  # some filesystems refuse to open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` to write; on success it replaces `path`, on an
    exception it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        _fsync(tmp)  # the data on disk before the name points at it (a power loss after the rename)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent, directory=True)


def write_text(path, text):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return Path(path)
