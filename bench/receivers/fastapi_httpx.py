"""The receiver the vendor's Python example leads to: FastAPI, verify with
hmac.compare_digest over the raw body, forward with a shared
httpx.AsyncClient."""

import base64
import hashlib
import hmac
import os

import httpx
from fastapi import FastAPI, Request, Response

SECRET = os.environ["BENCH_SECRET"].encode()
TARGET = os.environ["BENCH_TARGET"]

app = FastAPI()
client = httpx.AsyncClient(limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))


@app.post("/results")
async def results(request: Request) -> Response:
    body = await request.body()
    signature = request.headers.get("x-hub-signature-256", "")
    expected = base64.b64encode(hmac.new(SECRET, body, hashlib.sha256).digest()).decode()
    if not hmac.compare_digest(expected, signature):
        return Response(status_code=401)
    forwarded = await client.post(
        TARGET,
        content=body,
        headers={"content-type": "application/json", "x-hub-signature-256": signature},
    )
    return Response(status_code=200 if forwarded.is_success else 502)
