"""The one bounded file reader for everything the configuration names: the config file,
CURVE key files and the web config.

A plain `open().read()` of `/dev/zero` or `/dev/urandom` eats all memory, a FIFO blocks
for ever and a 50 MiB file takes seconds to parse. So: open without blocking, refuse what
is not a regular file, and never read more than `limit` bytes.
"""

from __future__ import annotations

import errno
import os
import stat

CONFIG_MAX_BYTES = 4 * 1024 * 1024  # a 1,000-socket config is ~150 KB
KEY_MAX_BYTES = 64 * 1024  # a ZPL certificate is ~300 bytes
WEB_CONFIG_MAX_BYTES = 1024 * 1024  # a few users and file names


class FileProblem(Exception):
    """Why a file cannot be read, without naming it: the caller decides whether the name
    may be shown (a secret key pasted in place of a path must not be)."""


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _size(count: int) -> str:
    if count % (1024 * 1024) == 0:
        return f"{count // (1024 * 1024)} MiB"
    return f"{count // 1024} KiB" if count % 1024 == 0 else f"{count} bytes"


def read_limited(path: str, limit: int) -> bytes:
    """The bytes of the regular file `path`, at most `limit` of them; FileProblem otherwise."""
    if "\0" in path:
        raise FileProblem("the path contains a NUL byte")
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOCTTY: a terminal
        # device must not become our controlling terminal. Both are refused below anyway.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as err:
        raise FileProblem(_reason(err)) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileProblem(f"{_kind(info.st_mode)}, not a regular file")
        if info.st_size > limit:
            raise FileProblem(f"larger than {_size(limit)} ({info.st_size} bytes)")
        chunks: list[bytes] = []
        total = 0
        # st_size can lie (procfs says 0, a file can grow while read): bound the reads.
        while True:
            chunk = os.read(fd, min(65536, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise FileProblem(f"larger than {_size(limit)}")
        return b"".join(chunks)
    except OSError as err:
        raise FileProblem(_reason(err)) from None
    finally:
        os.close(fd)


def _reason(err: OSError) -> str:
    return err.strerror or errno.errorcode.get(err.errno or 0, "") or "cannot open"
