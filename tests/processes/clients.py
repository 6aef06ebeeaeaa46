"""Clients of relays behind a load balancer, in a process of their own (so that what they time is not slowed by
the test's interpreter): `python -m tests.processes.clients SPEC` reads a JSON spec and prints one JSON line.

Request i goes to `bases[i % len(bases)]` with the Idempotency-Key `request-i`; when its relay dies under it, the
same request goes to `fallback`, as a load balancer would send a client's retry. A 503 is retried there too, after
its Retry-After, twice at most, as the OpenAI SDKs do. Printed: for each request, when its answer arrived, its
status, the first image's URL, and whether it was retried."""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import time
from typing import Any

import httpx


async def main(spec: dict[str, Any]) -> list[dict[str, Any]]:
    bases: list[str] = spec["bases"]
    results: list[dict[str, Any]] = [{} for _ in range(spec["count"])]
    tls = ssl.create_default_context()  # made once: loading the CA store per client costs ~17 ms of CPU

    async def one(i: int) -> None:
        # A client (and a connection pool) of its own, as separate users have: one pool of hundreds of connections
        # spends seconds of CPU on its own bookkeeping, which would be counted as the relay's lateness.
        async with httpx.AsyncClient(timeout=spec.get("timeout", 60), verify=tls) as client:
            await ask(i, client)

    async def ask(i: int, client: httpx.AsyncClient) -> None:
        try:
            await ask_once(i, client)
        except httpx.TransportError as exc:  # no answer even on the retry: printed as such
            results[i] = {"at": time.time(), "status": None, "url": None, "retried": True, "error": repr(exc)}

    async def ask_once(i: int, client: httpx.AsyncClient) -> None:
        body = {"model": spec.get("model", "mj-fast"), "prompt": f"{spec['prompt']} number {i}", "n": 1}
        headers = {"authorization": f"Bearer {spec['key']}", "idempotency-key": f"request-{i}"}
        retried = False
        try:
            reply = await client.post(bases[i % len(bases)] + "/v1/images/generations", json=body, headers=headers)
        except httpx.TransportError:
            retried = True
            reply = await client.post(spec["fallback"] + "/v1/images/generations", json=body, headers=headers)
        for _ in range(2):
            if reply.status_code != 503:
                break
            retried = True
            await asyncio.sleep(float(reply.headers.get("retry-after", "1")))
            reply = await client.post(spec["fallback"] + "/v1/images/generations", json=body, headers=headers)
        at = time.time()
        url = reply.json()["data"][0]["url"] if reply.status_code == 200 else None
        results[i] = {"at": at, "status": reply.status_code, "url": url, "retried": retried}

    await asyncio.gather(*(one(i) for i in range(spec["count"])))
    return results


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(json.loads(sys.argv[1])))))
