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


def _umask():
    try:  # Linux: read it without setting it (os.umask would change it for other threads meanwhile)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path):
    """The replaced file's permissions, or a new file's (0666 less the umask): some writers
    (safetensors) create files readable by their owner only, which colleagues on a shared
    filesystem could then not read."""
    try:
        return Path(path).stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` to write; on success it replaces `path`, on an
    exception it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        os.chmod(tmp, _mode_for(path))
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
