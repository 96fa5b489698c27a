"""A fake Ollama API server on 127.0.0.1 for tests: the endpoints model registration uses, and nothing else.

- ``HEAD /api/blobs/sha256:<hex>``: 200 when the blob is stored, else 404;
- ``POST /api/blobs/sha256:<hex>``: stores the body; 400 if its sha256 is not the digest in the path (as Ollama);
- ``POST /api/create``: ``{"model", "files": {name: digest}, "template", "parameters", ...}``; 400 when a
  digest was never uploaded; answers ``{"status": "success"}`` (or a JSON-lines stream when ``stream`` is true);
- ``GET /api/tags``: the created models; ``GET /api/version``.

Every request is recorded (method, path, JSON body or body size) in ``server.requests``. Runs in a thread
with its own event loop: ``with FakeOllama() as srv: ... srv.url``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Recorded:
    method: str
    path: str
    json: Any = None
    body_size: int = 0


@dataclass
class FakeOllama:
    host: str = "127.0.0.1"
    port: int = 0
    version: str = "0.12.6"
    requests: list[Recorded] = field(default_factory=list)
    blobs: dict[str, bytes] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # --- handlers --------------------------------------------------------------------------------------------
    async def _head_blob(self, request: web.Request) -> web.Response:
        digest = request.match_info["digest"]
        self.requests.append(Recorded("HEAD", request.path))
        return web.Response(status=200 if digest in self.blobs else 404)

    async def _post_blob(self, request: web.Request) -> web.Response:
        digest = request.match_info["digest"]
        body = await request.read()
        self.requests.append(Recorded("POST", request.path, body_size=len(body)))
        actual = "sha256:" + hashlib.sha256(body).hexdigest()
        if actual != digest:
            return web.json_response({"error": f"digest mismatch, expected {digest}, got {actual}"}, status=400)
        self.blobs[digest] = body
        return web.Response(status=201)

    async def _create(self, request: web.Request) -> web.StreamResponse:
        doc = await request.json()
        self.requests.append(Recorded("POST", request.path, json=doc))
        missing = [d for d in (doc.get("files") or {}).values() if d not in self.blobs]
        missing += [d for d in (doc.get("adapters") or {}).values() if d not in self.blobs]
        if missing:
            return web.json_response({"error": f"blob not found: {missing[0]}"}, status=400)
        name = doc["model"] if ":" in doc["model"] else f"{doc['model']}:latest"
        size = sum(len(self.blobs[d]) for d in (doc.get("files") or {}).values())
        manifest = json.dumps(doc, sort_keys=True).encode()
        self.models[name] = {"name": name, "model": name, "size": size, "request": doc,
                             "digest": hashlib.sha256(manifest).hexdigest()}
        if doc.get("stream", True):
            resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await resp.prepare(request)
            for status in ("parsing GGUF", "writing manifest", "success"):
                await resp.write(json.dumps({"status": status}).encode() + b"\n")
            await resp.write_eof()
            return resp
        return web.json_response({"status": "success"})

    async def _tags(self, request: web.Request) -> web.Response:
        self.requests.append(Recorded("GET", request.path))
        return web.json_response({"models": [
            {"name": m["name"], "model": m["model"], "size": m["size"], "digest": m["digest"],
             "modified_at": "2026-01-01T00:00:00Z", "details": {"format": "gguf"}} for m in self.models.values()]})

    async def _version(self, request: web.Request) -> web.Response:
        self.requests.append(Recorded("GET", request.path))
        return web.json_response({"version": self.version})

    # --- lifecycle -------------------------------------------------------------------------------------------
    def _app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 31)
        app.router.add_route("HEAD", "/api/blobs/{digest}", self._head_blob)
        app.router.add_post("/api/blobs/{digest}", self._post_blob)
        app.router.add_post("/api/create", self._create)
        app.router.add_get("/api/tags", self._tags)
        app.router.add_get("/api/version", self._version)
        return app

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)

        async def start() -> None:
            self._runner = web.AppRunner(self._app())
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.host, self.port)
            await site.start()
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

        loop.run_until_complete(start())
        self._ready.set()
        loop.run_forever()
        assert self._runner is not None
        loop.run_until_complete(self._runner.cleanup())
        loop.close()

    def start(self) -> FakeOllama:
        self._thread = threading.Thread(target=self._serve, name="fake-ollama", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake Ollama server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> FakeOllama:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


if __name__ == "__main__":  # `python -m tests.fakes.ollama_server`: run one by hand
    import time

    with FakeOllama(port=11434) as srv:
        print(f"fake Ollama at {srv.url}")
        while True:
            time.sleep(3600)
