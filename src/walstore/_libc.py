"""The Linux calls Python's ``os`` module lacks, through ctypes: ``renameat2`` (for
``RENAME_EXCHANGE``), ``syncfs`` (where it reports write-back errors, 5.8+) and ``openat2``
(``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS``, 5.6+). Each is None where it is missing."""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Any

from ._fs import symlink_on_path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        uname = os.uname()
        found = tuple(int(p) for p in uname.release.split("-")[0].split(".")[:2])
    except (AttributeError, ValueError):
        return False
    return uname.sysname == "Linux" and found >= (major, minor)


def _libc_function(name: str, *argtypes: Any) -> Any:
    """``name`` from the C library, taking ``argtypes`` and returning an int, setting errno;
    None where there is no such function (not glibc, not Linux)."""
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn


_renameat2: Any = _libc_function(
    "renameat2", ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint
)


# syncfs(2) reports write-back errors (through the super block's errseq) only since Linux 5.8;
# before, it could return 0 after losing data, so it is not used there.
_syncfs: Any = _libc_function("syncfs", ctypes.c_int) if _kernel_at_least(5, 8) else None


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_SYS_OPENAT2 = 437  # the same number on every Linux architecture (new syscalls are unified)

# No O_NOFOLLOW: with O_DIRECTORY it reports a symlink as ENOTDIR; RESOLVE_NO_SYMLINKS says ELOOP.
_HOW = _OpenHow(
    os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, 0, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS
)
_HOW_ADDRESS = ctypes.addressof(_HOW)  # module-level: lives as long as the calls using it
_HOW_SIZE = ctypes.sizeof(_HOW)


def _find_openat2() -> Any:
    """libc's ``syscall`` if the kernel has openat2 (Linux 5.6+), else None."""
    if not _kernel_at_least(5, 6):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_long
    # syscall(2) is variadic; these are the types openat2 takes, all passed in registers.
    fn.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
    return fn


_openat2: Any = _find_openat2()


def _openat2_dir(rootfd: int, rel: str, path: str) -> int:
    """openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS) of the directory ``rel``: the kernel
    walks it in one call, refusing a symlink anywhere (ELOOP) and any way out (EXDEV)."""
    name = os.fsencode(rel)
    for _ in range(8):
        fd = int(_openat2(_SYS_OPENAT2, rootfd, name, _HOW_ADDRESS, _HOW_SIZE))
        if fd >= 0:
            return fd
        code = ctypes.get_errno()
        if code in (errno.EAGAIN, errno.EINTR):
            continue  # a concurrent rename the kernel could not rule out: try again
        if code == errno.ELOOP:
            raise symlink_on_path(path)
        raise OSError(code, os.strerror(code), path)
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), path)
