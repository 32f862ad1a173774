"""Test doubles for walstore users and for walstore's own tests.

``MemoryFileSystem`` is a simulated file system (LevelDB's memenv plus its
``fault_injection_test``) that a store can be opened on with ``walstore.open(root, fs=...)``.
It can

* stop the process at the Nth file-system call (``crash_at``): that call and every later one
  raise ``SimulatedCrash``, as if the process had died there;
* simulate a power cut (``reboot(power_loss=rng)``): every write not made durable by an fsync
  is kept, dropped, torn, zero-filled or garbled at random, and every directory change
  (create, rename, unlink) not made durable by an fsync of that directory is kept or lost at
  random, each rename atomically;
* raise chosen errors at chosen calls (``fault``), including short writes.

The durability model is POSIX's, stricter than ext4's: ``fsync`` of a file makes its content
durable, not its name; ``fsync_dir`` of a directory makes the entries of that directory
durable (a rename is durable once either of its directories is synced).
"""

from ._memory_disk import Fault as Fault
from ._memory_disk import ShortWrite, SimulatedCrash
from ._memory_fs import MemoryFileSystem

__all__ = ["MemoryFileSystem", "ShortWrite", "SimulatedCrash"]

# They name the module they are used from, as walstore's errors do (``walstore/__init__.py``).
for _cls in (MemoryFileSystem, ShortWrite, SimulatedCrash):
    _cls.__module__ = __name__
del _cls
