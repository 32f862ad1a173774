"""examples/fastapi_app.py as deployed: ``uvicorn --workers 4``, four real worker processes on
one store, requests spread over them by the kernel.

The server listens on a Unix socket in the test's directory (no port to race for); the test
knows it is up when all four workers have logged their lifespan's startup, and stops it with
SIGTERM as a process manager would. Nothing sleeps: ``GUARD`` only bounds a broken run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest

import walstore

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.guarantee(name="Several writer processes (the default)"),
]
REPO = Path(__file__).resolve().parents[2]
WORKERS = 4
UVICORN = [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app"]
GUARD = 120.0  # seconds: a hang guard, never waited out when the test is right


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the server is its own processes; the client's backend is beside the point


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[Path, Path]]:
    """(socket, store root) of a running ``uvicorn --workers 4``; stopped with SIGTERM."""
    sock, root = tmp_path / "app.sock", tmp_path / "data"
    env = {**os.environ, "WALSTORE_ROOT": str(root), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [*UVICORN, "--uds", str(sock), "--workers", str(WORKERS), "--no-access-log"],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    log: list[str] = []
    up = threading.Event()

    def read_log() -> None:  # drained to the end, so that no worker blocks on its stderr
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line.rstrip("\n"))
            if sum("Application startup complete" in x for x in log) == WORKERS:
                up.set()
        up.set()  # the server is gone: wake the test

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        assert await anyio.to_thread.run_sync(up.wait, GUARD), "\n".join(log)
        assert proc.poll() is None, "uvicorn exited before its workers started:\n" + "\n".join(log)
        yield sock, root
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = await anyio.to_thread.run_sync(proc.wait, GUARD)
        await anyio.to_thread.run_sync(reader.join, GUARD)
    errors = [line for line in log if "Traceback" in line or "ERROR" in line]
    assert not errors, "\n".join(log)
    assert code == 0, "\n".join(log)


def client(sock: Path) -> httpx.AsyncClient:
    """A client that opens a new connection per request, so that requests reach every
    worker (a kept-alive connection stays with one)."""
    limits = httpx.Limits(max_keepalive_connections=0)
    transport = httpx.AsyncHTTPTransport(uds=str(sock), limits=limits)
    return httpx.AsyncClient(transport=transport, base_url="http://app", timeout=GUARD)


async def gather_all(n: int, limit: int, call: object) -> list[httpx.Response]:
    out: list[httpx.Response] = []
    sem = anyio.Semaphore(limit)

    async def one(i: int) -> None:
        async with sem:
            out.append(await call(i))  # type: ignore[operator]

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, i)
    return out


async def test_four_workers_hand_out_every_increment_once(server: tuple[Path, Path]) -> None:
    sock, root = server
    n = 200
    async with client(sock) as c:
        responses = await gather_all(n, 32, lambda i: c.post("/counters/visits/increment"))
    assert [r.status_code for r in responses] == [200] * n
    assert sorted(r.json()["value"] for r in responses) == list(range(1, n + 1))
    workers = {r.json()["worker"] for r in responses}
    assert len(workers) >= 2, f"all {n} requests reached one worker: {workers}"
    assert json.loads((root / "counters/visits.json").read_text()) == {"value": n}


async def test_transfers_through_four_workers_conserve_money(server: tuple[Path, Path]) -> None:
    sock, root = server
    names = "abcd"
    async with client(sock) as c:
        for name in names:
            r = await c.put(f"/accounts/{name}", params={"balance": 100})
            assert r.status_code == 200

        def transfer(i: int) -> object:
            src, dst = names[i % 4], names[(i + 1 + i // 4) % 4]
            body = {"src": src, "dst": dst if dst != src else names[(i + 2) % 4], "amount": 7}
            return c.post("/transfers", json=body)

        responses = await gather_all(120, 32, transfer)
        assert {r.status_code for r in responses} <= {200, 409}  # 409: insufficient funds
        done = sum(r.status_code == 200 for r in responses)
        balances = [(await c.get(f"/accounts/{name}")).json()["balance"] for name in names]
    assert sum(balances) == 400
    assert min(balances) >= 0
    # every transfer that returned 200 is in the ledger, and nothing else is
    assert len(list((root / "ledger").iterdir())) == done
    async with walstore.open(root, readonly=True) as store:
        assert len(await store.list("ledger")) == done
