"""Which tests a run includes: the default profile, and the slow tier CI adds.

The default profile runs every family at its usual size but leaves out the few tests that
take most of a run's time (each a minute or more on 2 cores, together half the suite). Those
run with ``WALSTORE_SLOW=1`` (CI sets it) or ``WALSTORE_SOAK=1``, or when named on the
command line (``pytest tests/property/test_model.py``); otherwise they are skipped with a
reason, so ``-ra`` lists them. Each guarantee the README names keeps a test in the default
profile: the slow tier runs the same checks longer or on real processes and devices.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# nodeid prefix -> why it is slow. A prefix that matches no test of its file is an error.
SLOW = {
    "tests/property/test_model.py": "model-based crash/power-loss, 150 Hypothesis runs",
    "tests/crash/test_power_loss.py::test_power_loss_at_every_call": (
        "~100,000 power-loss images over every crash point of 39 shapes"
    ),
    "tests/crash/test_crash_points.py::test_crash_at_every_operation[fifty-files]": (
        "a crash at each call of 50-file transactions; ten-files sweeps the same calls"
    ),
    "tests/torture/test_sigkill.py::test_sigkill_torture": "64 tasks SIGKILLed 20 times",
    "tests/powercut/": "real power cuts of ext4 and XFS loop devices",
    "tests/fuzz/test_reader_fuzz.py": "150,000 mutated journals and a Hypothesis search",
    "tests/fuzz/test_atheris.py": "150,000 coverage-guided inputs",
    "tests/fuzz/test_recovery_fuzz.py": "5,000 mutated journals recovered",
    "tests/fulldisk/test_full_disk.py::test_fill_the_disk_through_the_store[xfs-4k-shared]": (
        "an XFS disk filled with 4 KiB values twice (ext4's runs by default)"
    ),
    "tests/fulldisk/test_full_disk.py::test_fill_the_disk_through_the_store[xfs-4k-exclusive]": (
        "the same, the store opened exclusive"
    ),
}
ENABLED = bool(os.environ.get("WALSTORE_SLOW") or os.environ.get("WALSTORE_SOAK"))


def _named(config: pytest.Config) -> list[str]:
    """The files and tests named on the command line, as nodeid prefixes."""
    root = Path(config.rootpath)
    named = []
    for arg in config.args:
        path, sep, rest = arg.partition("::")
        p = Path(path).resolve()
        if p.is_file() and p.is_relative_to(root):
            named.append(p.relative_to(root).as_posix() + sep + rest)
    return named


@pytest.hookimpl(tryfirst=True)  # before -k/-m deselect: the stale-entry check sees all
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    named = _named(config)
    files = {item.nodeid.split("::", 1)[0] for item in items}
    for prefix in SLOW:
        file = prefix.split("::", 1)[0]
        if file in files and not any(item.nodeid.startswith(prefix) for item in items):
            raise pytest.UsageError(f"tests/profile.py: SLOW names {prefix!r}, no such test")
    for item in items:
        why = next((w for p, w in SLOW.items() if item.nodeid.startswith(p)), None)
        if why is None:
            continue
        item.add_marker(pytest.mark.slow)
        if not ENABLED and not any(item.nodeid.startswith(n) for n in named):
            item.add_marker(pytest.mark.skip(reason=f"slow tier ({why}): WALSTORE_SLOW=1"))
