"""Run the stock tritonclient[http] against an edgeswarm peer (in its own process: gevent).

    python triton_client.py HOST:PORT MODEL json|binary TOKEN
    python triton_client.py HOST:PORT MODEL bytes-json|bytes-binary TOKEN

Prints one JSON line: liveness, readiness, metadata, the outputs of z = x + y
for a few inputs, the response parameters, and what a request without the
token gets. The ``bytes-*`` modes send a BYTES tensor ``text`` to a string model
(tests.models.tiny_text_model) and print its ``shout`` (BYTES) and ``label``.
"""

import json
import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

TEXTS = ["cat", "héllo wörld", "dog", ""]


def text_job(
    client: httpclient.InferenceServerClient, model: str, binary: bool, token: str
) -> dict:
    out: dict = {"metadata": client.get_model_metadata(model)}
    text = np.array([t.encode() for t in TEXTS], dtype=np.object_)
    inp = httpclient.InferInput("text", [len(TEXTS)], "BYTES")
    inp.set_data_from_numpy(text, binary_data=binary)
    outputs = [
        httpclient.InferRequestedOutput("shout", binary_data=binary),
        httpclient.InferRequestedOutput("label", binary_data=binary),
    ]
    result = client.infer(
        model, [inp], outputs=outputs, headers={"Authorization": f"Bearer {token}"}
    )
    shout = result.as_numpy("shout")
    out["shout"] = [v.decode() if isinstance(v, bytes) else str(v) for v in shout.reshape(-1)]
    out["label"] = result.as_numpy("label").tolist()
    out["parameters"] = result.get_response().get("parameters", {})
    out["output_meta"] = result.get_response()["outputs"]
    return out


def main(url: str, model: str, mode: str, token: str) -> None:
    binary = mode.endswith("binary")
    client = httpclient.InferenceServerClient(url=url, connection_timeout=60, network_timeout=120)
    if mode.startswith("bytes-"):
        print(json.dumps(text_job(client, model, binary, token), default=str))
        return
    out: dict = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "metadata": client.get_model_metadata(model),
        "server": client.get_server_metadata(),
    }
    x = np.arange(6, dtype=np.float32)
    y = np.full(6, 0.5, dtype=np.float32)
    inputs = [httpclient.InferInput("x", [6], "FP32"), httpclient.InferInput("y", [6], "FP32")]
    inputs[0].set_data_from_numpy(x, binary_data=binary)
    inputs[1].set_data_from_numpy(y, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput("z", binary_data=binary)]
    headers = {"Authorization": f"Bearer {token}"}
    result = client.infer(model, inputs, outputs=outputs, headers=headers)
    response = result.get_response()
    out["z"] = result.as_numpy("z").tolist()
    out["z_dtype"] = str(result.as_numpy("z").dtype)
    out["parameters"] = response.get("parameters", {})
    out["output_meta"] = response["outputs"]
    # No outputs requested: tritonclient then asks for every output in binary.
    result = client.infer(model, inputs, headers=headers)
    out["z_default"] = result.as_numpy("z").tolist()
    try:
        client.infer(model, inputs, outputs=outputs)
        out["no_token"] = "accepted"
    except InferenceServerException as exc:
        out["no_token"] = str(exc)
    try:
        client.infer("no_such_model", inputs, outputs=outputs, headers=headers)
        out["unknown"] = "accepted"
    except InferenceServerException as exc:
        out["unknown"] = str(exc)
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main(*sys.argv[1:5])
