"""More than one request at a time: ``tier3 serve --replicas N`` (ServerPool) and the router spreading its calls.

A llama-cpp-python server answers one request at a time. Real servers on the tiny model's GGUF: the router's
student client, given every replica's URL (``TIER3_STUDENT_BASE_URL``, comma-separated), sends concurrent calls to
the least busy one, so each server answers some; when one server is gone, its calls go to the other.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from streams.client.router import RouterSettings, StudentClient
from trainer.close_loop import parity
from trainer.close_loop.serve import ServedModel, ServerPool

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python (the `serve` extra, also in `dev`) is not installed")

ALIAS = "replica:v1"


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerPool]:
    from trainer.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("replicas")
    adapter = parity.untrained_adapter(build_tiny_model(root / "tiny-model"), root / "run")
    gguf = parity.export_gguf(adapter, root / "export", ("f16",))["f16"]
    with ServerPool([ServedModel(ALIAS, gguf, "run", 1)], replicas=2, threads=2,
                    log_path=root / "serve.log") as p:
        yield p


def _requests(srv_log: Path) -> int:
    return srv_log.read_text(errors="replace").count("POST /v1/chat/completions")


def test_the_pool_is_two_servers_sharing_the_threads(pool: ServerPool) -> None:
    assert len(pool.servers) == 2 and pool.running()
    assert [s.threads for s in pool.servers] == [1, 1]
    assert len(set(pool.base_urls)) == 2 and pool.base_url == ",".join(pool.base_urls)


def test_concurrent_router_calls_are_spread_over_the_replicas(pool: ServerPool) -> None:
    before = [_requests(s.log_path) for s in pool.servers if s.log_path is not None]
    client = StudentClient(RouterSettings(tier3_student_base_url=pool.base_url, tier3_student_max_tokens=8))
    assert client.endpoints == pool.base_urls
    msgs = [{"role": "user", "content": f"question {i}"} for i in range(6)]

    async def main() -> list[str]:
        try:
            return await asyncio.gather(*(client.complete(ALIAS, [m]) for m in msgs))
        finally:
            await client.aclose()

    answers = asyncio.run(main())
    assert len(answers) == 6
    after = [_requests(s.log_path) for s in pool.servers if s.log_path is not None]
    served = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(served) == 6 and all(n >= 2 for n in served), served  # both answered, none took everything


def test_a_replica_that_is_down_is_skipped(pool: ServerPool) -> None:
    dead = "http://127.0.0.1:9/v1"  # nothing listens there
    client = StudentClient(RouterSettings(tier3_student_base_url=f"{dead},{pool.base_urls[0]}",
                                          tier3_student_max_tokens=4, tier3_student_timeout_s=5))

    async def main() -> list[str]:
        try:
            return [await client.complete(ALIAS, [{"role": "user", "content": f"q{i}"}]) for i in range(3)]
        finally:
            await client.aclose()

    assert len(asyncio.run(main())) == 3
