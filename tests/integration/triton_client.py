"""Run the stock tritonclient[http] against an edgeswarm peer (in its own process: gevent).

    python triton_client.py HOST:PORT MODEL json|binary TOKEN

Prints one JSON line: liveness, readiness, metadata, the outputs of z = x + y
for a few inputs, the response parameters, and what a request without the
token gets.
"""

import json
import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def main(url: str, model: str, mode: str, token: str) -> None:
    binary = mode == "binary"
    client = httpclient.InferenceServerClient(url=url, connection_timeout=60, network_timeout=120)
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
