"""A FastAPI app whose endpoints change JSON documents transactionally.

The lifespan opens the store once for the app (recovering it after a crash) and closes it on
shutdown; every endpoint that changes several files does it in one ``store.atomic`` call, so
concurrent requests never lose an update and a crash never leaves half a change.

Run it from a clone of walstore, with as many worker processes as you like: each worker
opens the store itself (in the lifespan, after uvicorn started it), and their commits take
turns under the store's commit lock::

    pip install -e . fastapi uvicorn
    WALSTORE_ROOT=/tmp/app-data uvicorn examples.fastapi_app:app --workers 4
    curl -X POST localhost:8000/counters/visits/increment
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel

import walstore


class Transfer(BaseModel):
    src: str
    dst: str
    amount: int


class InsufficientFunds(Exception):
    """Raised inside a transaction: the transaction rolls back, nothing changes."""


def store_of(request: Request) -> walstore.Store:
    store: walstore.Store = request.app.state.store
    return store


async def increment(tx: walstore.Transaction, name: str) -> int:
    path = f"counters/{name}.json"
    doc = await tx.read_json(path) if await tx.exists(path) else {"value": 0}
    doc["value"] += 1
    await tx.write_json(path, doc)
    return int(doc["value"])


async def transfer(tx: walstore.Transaction, t: Transfer) -> dict[str, int]:
    src = await tx.read_json(f"accounts/{t.src}.json")
    dst = await tx.read_json(f"accounts/{t.dst}.json")
    if src["balance"] < t.amount:
        raise InsufficientFunds(f"{t.src} has {src['balance']}, needs {t.amount}")
    src["balance"] -= t.amount
    dst["balance"] += t.amount
    await tx.write_json(f"accounts/{t.src}.json", src)
    await tx.write_json(f"accounts/{t.dst}.json", dst)
    n = len(await tx.list("ledger")) if await tx.exists("ledger") else 0
    await tx.write_json(f"ledger/{n:08d}.json", t.model_dump())  # the ledger changes with them
    return {t.src: src["balance"], t.dst: dst["balance"]}


def create_app(root: str | os.PathLike[str]) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with walstore.open(root) as store:
            app.state.store = store
            yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/accounts/{name}")
    async def get_account(name: str, request: Request) -> Any:
        try:
            return await store_of(request).read_json(f"accounts/{name}.json")
        except FileNotFoundError:
            raise HTTPException(404, f"no account {name}") from None
        except walstore.InvalidPathError as exc:
            raise HTTPException(400, str(exc)) from None

    @app.put("/accounts/{name}")
    async def put_account(name: str, balance: int, request: Request) -> Any:
        doc = {"name": name, "balance": balance}
        await store_of(request).write_json(f"accounts/{name}.json", doc)
        return doc

    @app.post("/transfers")
    async def post_transfer(t: Transfer, request: Request) -> Any:
        try:
            return await store_of(request).atomic(transfer, t)
        except FileNotFoundError:
            raise HTTPException(404, "no such account") from None
        except InsufficientFunds as exc:
            raise HTTPException(409, str(exc)) from None

    @app.post("/counters/{name}/increment")
    async def post_increment(name: str, request: Request) -> Any:
        value = await store_of(request).atomic(increment, name)
        return {"value": value, "worker": os.getpid()}  # which worker process answered

    return app


app = create_app(os.environ.get("WALSTORE_ROOT", "data"))
