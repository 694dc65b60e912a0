"""OpenAI-style /v1/embeddings with the openai SDK against the packaged MiniLM (via the market)."""

from __future__ import annotations

import base64
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import trio
from market_swarm import FakeHardware, config

from bootstrap.node import open_bootstrap
from edge_models.registry import Registry
from edge_models.runtime import ModelRuntime
from edge_models.text import minilm_tokenizer, sentence_embeddings
from peer.node import open_peer

TEXTS = ["Edge devices can run neural networks locally.", "The cat sat on the mat."]


@pytest.mark.timeout(300)
async def test_openai_sdk_embeddings_float_and_base64(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "ex" / "models")
    entry = registry.add_packaged("minilm")
    with ModelRuntime(registry, p50_runs=1) as runtime:
        async with AsyncExitStack() as stack:
            boot = await stack.enter_async_context(open_bootstrap(config(tmp_path, "boot")))
            joined = (boot.listen_addrs[0],)
            ex = await stack.enter_async_context(
                open_peer(
                    config(tmp_path, "ex", bootstrap=joined, price=0.5),
                    hardware=FakeHardware(),
                    runtime=runtime,
                )
            )
            # The door runs no models (an executor never bids on its own requests): the
            # name "minilm" is found in the executor's ad.
            door = await stack.enter_async_context(
                open_peer(
                    config(tmp_path, "door", bootstrap=joined, http="127.0.0.1:0", bid_window=0.3),
                    hardware=FakeHardware(),
                )
            )
            assert door.http is not None
            url, token = door.http.url, door.http.token
            inputs = minilm_tokenizer().encode(TEXTS)
            expected = sentence_embeddings(runtime.run(entry.cid, inputs), inputs)

            def call(encoding: str, key: str = token, text: str | list[str] = TEXTS) -> object:
                client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
                kw = {} if encoding == "default" else {"encoding_format": encoding}
                return client.embeddings.create(model="minilm", input=text, **kw)

            with trio.fail_after(90):
                for encoding in ("default", "float", "base64"):
                    response = await trio.to_thread.run_sync(call, encoding)
                    vectors = [d.embedding for d in response.data]
                    if isinstance(vectors[0], str):  # base64 asked explicitly: given back as is
                        vectors = [np.frombuffer(base64.b64decode(v), "<f4") for v in vectors]
                    got = np.array(vectors, dtype=np.float32)
                    assert got.shape == (2, 384)
                    np.testing.assert_allclose(got, expected, atol=1e-5)
                    assert [d.index for d in response.data] == [0, 1]
                    tokens = int(inputs["attention_mask"].sum())
                    assert response.usage.prompt_tokens == tokens
                    assert response.usage.total_tokens == tokens
                one = await trio.to_thread.run_sync(lambda: call("float", text=TEXTS[1]))
                np.testing.assert_allclose(one.data[0].embedding, expected[1], atol=1e-5)
                with pytest.raises(openai.AuthenticationError):
                    await trio.to_thread.run_sync(lambda: call("float", key="wrong"))
                # By cid, raw HTTP: the receipt and executor ride along.
                async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=60) as http:
                    r = await http.post(
                        "/v1/embeddings",
                        json={"model": entry.cid, "input": TEXTS[0]},
                        headers={"Authorization": f"Bearer {token}"},
                    )
                    assert r.status_code == 200, r.text
                    assert r.json()["edgeswarm"]["executor"] == ex.peer_id
                    assert len(r.json()["edgeswarm"]["receipt_id"]) == 64
                    for bad in (
                        {"model": "minilm", "input": []},
                        {"model": "minilm", "input": [1, 2]},
                        {"model": "minilm", "input": "x", "encoding_format": "int8"},
                        {"input": "x"},
                    ):
                        r = await http.post(
                            "/v1/embeddings", json=bad, headers={"Authorization": f"Bearer {token}"}
                        )
                        assert r.status_code == 400, (bad, r.text)
                        assert r.json()["error"]["type"] == "invalid_request_error"
                    r = await http.post(
                        "/v1/embeddings",
                        json={"model": "no_such_model", "input": "x"},
                        headers={"Authorization": f"Bearer {token}"},
                    )
                    assert r.status_code == 404
