"""SIGKILL torture: one child process, 64 tasks committing multi-file transactions (see
workload.py), SIGKILLed after a random number of acknowledged transactions, then reopened
and checked: every acknowledged step present byte for byte, no task more than one step past
its last ACK, each task's files agreeing, the bank summing to exactly the steps found,
nothing else in the tree, a journal that parses, an empty staging directory. Repeated on the
same store, alternating Durability.FULL and OFF (both survive a process crash)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import anyio

import walstore
from tests.support import tally
from tests.torture import workload

SOAK = 10 if os.environ.get("WALSTORE_SOAK") else 1
KILLS = 20 * SOAK
TASKS = 64
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TALLY = tally("SIGKILLs")


def spawn(root: str, tasks: int, durability: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.torture.workload", root, str(tasks), durability],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )


def wait_for_acks(child: subprocess.Popen[str], count: int, acked: dict[int, int]) -> int:
    """Read the child's lines until it is READY and has acknowledged ``count`` more steps;
    returns how many it acknowledged (fewer only if it died)."""
    assert child.stdout is not None
    seen = 0
    ready = False
    for line in child.stdout:
        workload.parse_acks(iter([line]), acked)
        ready = ready or line.startswith("READY")
        seen += line.startswith("ACK ")
        if ready and seen >= count:
            break
    return seen


def kill_and_drain(child: subprocess.Popen[str], acked: dict[int, int]) -> str:
    """SIGKILL the child, then read what it printed before dying (ACKs the kill overtook
    still count); returns its stderr.

    Reads through the text wrappers, not ``communicate()``: ``communicate`` reads the raw
    pipes and drops the lines ``wait_for_acks``'s iteration had already buffered, and a
    lost ACK looks like a commit the store made up ("step 22 found, last ACK was 20", a
    false alarm from XFS's power cuts in CI)."""
    assert child.stdout is not None and child.stderr is not None
    child.send_signal(signal.SIGKILL)
    out = child.stdout.read()  # the child is dead: both pipes reach EOF, neither can block
    err = child.stderr.read()
    child.wait()
    child.stdout.close()
    child.stderr.close()
    workload.parse_acks(iter(out.splitlines()), acked)
    return err


def test_sigkill_torture(tmp_path: Path) -> None:
    root = os.path.join(str(tmp_path), "store")
    anyio.run(workload.setup, root)
    rng = random.Random(20240605)
    acked: dict[int, int] = {}
    total_acks = 0
    unacked = 0  # commits found whose ACK the kill overtook
    for k in range(KILLS):
        durability = ("full", "off")[k % 2]
        target = rng.choice([0, 1, rng.randint(2, 40), rng.randint(40, 300)])
        child = spawn(root, TASKS, durability)
        try:
            got = wait_for_acks(child, target, acked)
        finally:
            err = kill_and_drain(child, acked)
        assert child.returncode == -signal.SIGKILL, f"child died on its own:\n{err[-3000:]}"
        assert got >= target
        total_acks += got
        steps, problems = workload.check(root, acked, TASKS)
        unacked += sum(1 for i, n in steps.items() if n > acked.get(i, 0))
        TALLY.cases += 1
        TALLY.violations += [f"kill {k} ({durability}, {got} ACKs): {p}" for p in problems]
        assert not problems, problems[:10]
        acked = {i: n for i, n in steps.items() if n}  # found steps are durable from here on
    print(f"SIGKILL torture: {KILLS} kills, {total_acks} ACKs, {unacked} unacknowledged commits")
    # the kills landed amid work: many ACKs, most tasks committed something
    assert total_acks >= KILLS * 20
    assert sum(1 for n in acked.values() if n) >= TASKS // 2


def test_the_checker_sees_loss_and_half_transactions(tmp_path: Path) -> None:
    """The checker is not vacuous: a step missing, a task's files disagreeing, or a stray
    file are each reported."""
    root = str(tmp_path / "store")
    anyio.run(workload.setup, root)

    async def steps() -> None:
        async with walstore.open(root, inline_threshold=workload.INLINE) as store:
            for i in range(3):
                for _ in range(i + 1):
                    await store.atomic(workload.step, i)

    anyio.run(steps)
    acked = {0: 1, 1: 2, 2: 3}
    assert workload.check(root, acked, 3)[1] == []
    assert workload.check(root, {**acked, 1: 3}, 3)[1]  # an ACKed step lost
    with open(os.path.join(root, "t02", "c.txt"), "w") as fh:
        fh.write("2\n")  # c.txt at step 2, the rest at 3: half a transaction
    assert workload.check(root, {**acked, 2: 2}, 3)[1]
    with open(os.path.join(root, "t02", "c.txt"), "w") as fh:
        fh.write("3\n")
    os.mkdir(os.path.join(root, "stray"))
    with open(os.path.join(root, "stray", "x"), "w") as fh:
        fh.write("x")
    assert workload.check(root, acked, 3)[1]


def test_the_drain_keeps_every_line_the_child_printed() -> None:
    """ACKs that ``wait_for_acks`` read ahead into its buffer still count after the kill.
    The child prints READY and 200 ACKs in one write, so the first read buffers them all,
    then says DONE on stderr and waits to be killed. (``communicate()`` kept 3 of them;
    that false alarm failed a CI run.)"""
    code = (
        "import sys, time\n"
        "sys.stdout.write('READY\\n' + ''.join(f'ACK 0 {n}\\n' for n in range(1, 201)))\n"
        "sys.stdout.flush()\n"
        "print('DONE', file=sys.stderr, flush=True)\n"
        "time.sleep(600)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    assert child.stderr is not None
    acked: dict[int, int] = {}
    try:
        assert wait_for_acks(child, 3, acked) == 3
        assert acked == {0: 3}
        assert child.stderr.readline() == "DONE\n"  # everything is written, none of it lost
    finally:
        kill_and_drain(child, acked)
    assert acked == {0: 200}
