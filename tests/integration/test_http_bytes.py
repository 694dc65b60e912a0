"""BYTES tensors end to end: KServe v2 (JSON and binary) -> the market -> ONNX Runtime
string tensors on another peer -> back. The executor serves ``tests.models.tiny_text_model``
(text + "!" and a label per string); the door serves nothing, so every job is remote."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trio
from http_swarm import http_swarm
from test_http_v2 import _triton

from peer.http import v2
from tests.models import TEXT_LABELS

TEXTS = ["cat", "héllo wörld", "dog", ""]  # as in triton_client.py


@pytest.mark.timeout(300)
async def test_bytes_tensors_through_the_market_tritonclient_json_and_binary_and_bad_ones(
    tmp_path: Path,
) -> None:
    async with http_swarm(tmp_path, door_models=False, ex_model="text") as door:
        # Metadata of a remote model comes from ads: wait (bounded; each pass is a real
        # DHT lookup) until the executor's ad lists it.
        with trio.fail_after(60):
            for _ in range(300):
                ads = await door.peer.find_ads()
                if any(m.name == "tiny_text" for ad in ads for m in ad.models):
                    break
                await trio.sleep(0.2)
        for mode in ("bytes-json", "bytes-binary"):
            out = await _triton(door.url, "tiny_text", mode, door.token)
            meta = out["metadata"]
            assert [(i["name"], i["datatype"]) for i in meta["inputs"]] == []  # remote model
            assert out["shout"] == [t + "!" for t in TEXTS]
            assert out["label"] == [TEXT_LABELS.get(t, 0) for t in TEXTS]
            assert out["parameters"]["executor"] == door.ex.peer_id
            assert out["parameters"]["local"] is False
            kinds = {o["name"]: o["datatype"] for o in out["output_meta"]}
            assert kinds == {"shout": "BYTES", "label": "INT64"}
            binary = {
                o["name"]: "binary_data_size" in o.get("parameters", {}) for o in out["output_meta"]
            }
            assert binary == {"shout": mode == "bytes-binary", "label": mode == "bytes-binary"}
        async with door.client() as client:
            # Not UTF-8: ONNX string tensors hold text.
            raw = b"\xff\xfe"
            header = (
                b'{"inputs":[{"name":"text","datatype":"BYTES","shape":[1],'
                b'"parameters":{"binary_data_size":%d}}]}' % (4 + len(raw))
            )
            body = header + len(raw).to_bytes(4, "little") + raw
            r = await client.post(
                "/v2/models/tiny_text/infer",
                content=body,
                headers={**door.auth, v2.HEADER_LENGTH: str(len(header))},
            )
            assert r.status_code == 400 and "UTF-8" in r.json()["error"]
            # A length prefix that runs past the tensor's data.
            header = (
                b'{"inputs":[{"name":"text","datatype":"BYTES","shape":[1],'
                b'"parameters":{"binary_data_size":6}}]}'
            )
            body = header + (100).to_bytes(4, "little") + b"ab"
            r = await client.post(
                "/v2/models/tiny_text/infer",
                content=body,
                headers={**door.auth, v2.HEADER_LENGTH: str(len(header))},
            )
            assert r.status_code == 400 and "runs past" in r.json()["error"]
            # And a good one through our own codec, JSON form.
            body, headers = v2.encode_request(
                {"text": np.array(["dog"], dtype=object)}, binary=False
            )
            r = await client.post(
                "/v2/models/tiny_text/infer", content=body, headers={**headers, **door.auth}
            )
            assert r.status_code == 200, r.text
            _, outputs = v2.decode_response(r.content, r.headers.get(v2.HEADER_LENGTH))
            assert outputs["shout"].tolist() == [b"dog!"] and outputs["label"].tolist() == [2]
