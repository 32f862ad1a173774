"""examples/fastapi_app.py through httpx's ASGI transport, lifespan included (asgi-lifespan:
httpx's ASGITransport does not send lifespan events), with concurrent requests."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager

import walstore
from tests.examples.conftest import load_example

pytestmark = pytest.mark.anyio
app_module = load_example("fastapi_app")


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = app_module.create_app(tmp_path / "data")
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
            yield c
    with pytest.raises(walstore.StoreClosedError):  # the lifespan closed the store
        app.state.store.transaction()


async def gather(*calls: Any) -> list[httpx.Response]:
    out: list[httpx.Response] = []

    async def one(call: Any) -> None:
        out.append(await call)

    async with anyio.create_task_group() as tg:
        for call in calls:
            tg.start_soon(one, call)
    return out


async def test_50_concurrent_increments_end_exact(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    responses = await gather(*(client.post("/counters/visits/increment") for _ in range(50)))
    assert all(r.status_code == 200 for r in responses)
    # every request saw its own increment: the values handed out are exactly 1..50
    assert sorted(r.json()["value"] for r in responses) == list(range(1, 51))
    assert json.loads((tmp_path / "data/counters/visits.json").read_text()) == {"value": 50}


async def test_concurrent_transfers_conserve_money(client: httpx.AsyncClient) -> None:
    for name in "abcd":
        assert (await client.put(f"/accounts/{name}", params={"balance": 100})).status_code == 200
    pairs = [("abcd"[i % 4], "abcd"[(i + 1) % 4]) for i in range(40)]
    responses = await gather(
        *(client.post("/transfers", json={"src": s, "dst": d, "amount": 30}) for s, d in pairs)
    )
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 409} and codes.count(200) >= 4
    balances = [(await client.get(f"/accounts/{n}")).json()["balance"] for n in "abcd"]
    assert sum(balances) == 400 and min(balances) >= 0


async def test_a_refused_transfer_changes_nothing(client: httpx.AsyncClient) -> None:
    await client.put("/accounts/a", params={"balance": 5})
    await client.put("/accounts/b", params={"balance": 0})
    r = await client.post("/transfers", json={"src": "a", "dst": "b", "amount": 10})
    assert r.status_code == 409 and "needs 10" in r.json()["detail"]
    assert (await client.get("/accounts/a")).json()["balance"] == 5
    assert (await client.get("/accounts/b")).json()["balance"] == 0
    assert (await client.get("/accounts/zed")).status_code == 404
    r = await client.post("/transfers", json={"src": "a", "dst": "zed", "amount": 1})
    assert r.status_code == 404
