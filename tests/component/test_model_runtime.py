"""ModelRuntime on tiny graphs: same results as onnxruntime, typed errors, limits, cache."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_models.errors import (
    EdgeModelError,
    ExecutionFailed,
    InvalidInput,
    ModelNotFound,
    Timeout,
)
from edge_models.registry import Registry
from edge_models.runtime import (
    CPU,
    SESSION_OVERHEAD_BYTES,
    ModelRuntime,
    canonical_provider,
    provider_order,
)
from edge_models.spec import ModelEntry
from protocols import codec
from protocols.tensor import decode_tensors, encode_tensors
from tests import models

WAIT = 10.0  # upper bound for event waits; never reached when things work


def _direct(registry: Registry, ref: str, inputs: dict[str, Any]) -> list[Any]:
    session = ort.InferenceSession(str(registry.path_of(registry.get(ref).cid)), providers=[CPU])
    return session.run(None, inputs)


# ------------------------------------------------------------ providers


def test_provider_order() -> None:
    everything = ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]
    assert provider_order(everything) == (
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        CPU,
    )
    assert provider_order(everything, ["cuda"]) == ("CUDAExecutionProvider", CPU)
    assert provider_order(everything, ["CPUExecutionProvider"]) == (CPU,)
    assert provider_order(["AzureExecutionProvider", CPU]) == (CPU,)
    # CPU always works, even when not reported or not allowed.
    assert provider_order([], ["CUDA"]) == (CPU,)
    assert provider_order(["CoreMLExecutionProvider", "DmlExecutionProvider"]) == (
        "CoreMLExecutionProvider",
        "DmlExecutionProvider",
        CPU,
    )


def test_canonical_provider_names() -> None:
    assert canonical_provider("cuda") == "CUDAExecutionProvider"
    assert canonical_provider("TensorRT") == "TensorrtExecutionProvider"
    assert canonical_provider("trt") == "TensorrtExecutionProvider"
    assert canonical_provider("CPUExecutionProvider") == CPU
    assert canonical_provider("MysteryExecutionProvider") == "MysteryExecutionProvider"


def test_runtime_uses_an_available_provider(registry: Registry) -> None:
    with ModelRuntime(registry) as rt:
        assert rt.providers[-1] == CPU
        assert set(rt.providers) <= set(ort.get_available_providers()) | {CPU}


# -------------------------------------------------------------- results


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 8), st.integers(0, 2**31 - 1))
def test_results_equal_direct_onnxruntime(tmp_path_factory: Any, batch: int, seed: int) -> None:
    root = tmp_path_factory.mktemp("rt")
    registry = Registry(root / "models")
    registry.add_file(models.tiny_matmul_model(root / "mm.onnx"), "mm")
    x = np.random.default_rng(seed).standard_normal((batch, 4)).astype(np.float32)
    with ModelRuntime(registry, p50_runs=0) as rt:
        out = rt.run("mm", {"x": x})
    (expected,) = _direct(registry, "mm", {"x": x})
    assert list(out) == ["y"]
    assert out["y"].dtype == np.float32
    np.testing.assert_array_equal(out["y"], expected)


def test_every_dtype_runs(registry: Registry, src: Path, runtime: ModelRuntime) -> None:
    registry.add_file(models.all_dtypes_model(src / "dt.onnx"), "dtypes")
    rng = np.random.default_rng(1)
    inputs = {
        f"in_{e.dtype}": (rng.random(5) * 100).astype(e.dtype)
        for e in registry.get("dtypes").inputs
    }
    out = runtime.run("dtypes", inputs)
    for name, array in inputs.items():
        got = out["out_" + name.removeprefix("in_")]
        assert got.dtype == array.dtype
        np.testing.assert_array_equal(got, array)


def test_decoded_wire_tensors_run_directly(add_model: ModelEntry, runtime: ModelRuntime) -> None:
    x = np.arange(4, dtype=np.float32)
    wire = codec.encode(encode_tensors({"x": x, "y": x * 2}))
    inputs = decode_tensors(codec.decode(wire, max_size=1 << 20))  # read-only views
    np.testing.assert_array_equal(runtime.run(add_model.cid, inputs)["z"], x * 3)


def test_load_warms_up_and_caches(add_model: ModelEntry, runtime: ModelRuntime) -> None:
    loaded = runtime.load("add")
    assert loaded.provider in runtime.providers
    assert loaded.load_p50_ms is not None and loaded.load_p50_ms >= 0
    assert loaded.p50_ms == loaded.load_p50_ms
    assert runtime.load(add_model.cid[:8]) is loaded
    runtime.run("add", {"x": np.ones(2, np.float32), "y": np.ones(2, np.float32)})
    assert loaded.runs == 1
    d = loaded.to_dict()
    assert d["cid"] == add_model.cid and d["provider"] == loaded.provider
    assert [m.cid for m in runtime.loaded()] == [add_model.cid]


def test_load_on_a_pinned_provider(add_model: ModelEntry, runtime: ModelRuntime) -> None:
    assert runtime.load("add", provider="cpu").provider == CPU
    with pytest.raises(ExecutionFailed, match="not available or not allowed"):
        runtime.load("add", provider="MysteryExecutionProvider")


# ----------------------------------------------------------------- errors


def test_model_not_found(runtime: ModelRuntime) -> None:
    with pytest.raises(ModelNotFound, match="no model matches 'ghost'"):
        runtime.run("ghost", {})


def test_invalid_input_is_checked_before_running(
    add_model: ModelEntry, runtime: ModelRuntime
) -> None:
    with pytest.raises(InvalidInput, match="dimension 'n' is 2 in input 'x' but 3"):
        runtime.run("add", {"x": np.ones(2, np.float32), "y": np.ones(3, np.float32)})
    assert runtime.loaded() == []  # nothing was even loaded


def test_execution_failed(registry: Registry, src: Path, runtime: ModelRuntime) -> None:
    registry.add_file(models.tiny_reshape_model(src / "r.onnx"), "reshape")
    ok = runtime.run("reshape", {"x": np.ones(6, np.float32), "shape": np.array([2, 3])})
    assert ok["y"].shape == (2, 3)
    with pytest.raises(ExecutionFailed, match=r"model 'reshape' \(\w{12}\) failed on CPU"):
        runtime.run("reshape", {"x": np.ones(6, np.float32), "shape": np.array([4, 4])})


def test_timeout_stops_a_long_run(registry: Registry, src: Path, runtime: ModelRuntime) -> None:
    registry.add_file(models.slow_loop_model(src / "loop.onnx"), "loop")
    x = np.ones(4, np.float32)
    with pytest.raises(Timeout, match=r"longer than its timeout of 0\.2 s"):
        runtime.run("loop", {"x": x, "iters": np.array(10**12)}, timeout=0.2)
    # The session is still fine afterwards.
    np.testing.assert_allclose(runtime.run("loop", {"x": x, "iters": np.array(3)})["y"], x)


def test_all_errors_share_the_base(runtime: ModelRuntime) -> None:
    for cls in (ModelNotFound, InvalidInput, ExecutionFailed, Timeout):
        assert issubclass(cls, EdgeModelError)


# ---------------------------------------------------------- concurrency


class GatedSession:
    """Wraps a real session: each run reports entry and waits for the gate."""

    def __init__(self, real: ort.InferenceSession) -> None:
        self.real = real
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0

    def run(self, names: Any, feeds: Any, options: Any = None) -> Any:
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            self.entered.release()
            assert self.gate.wait(WAIT)
            return self.real.run(names, feeds, options)
        finally:
            with self.lock:
                self.active -= 1


def test_concurrent_executions_respect_the_limit(add_model: ModelEntry, registry: Registry) -> None:
    with ModelRuntime(registry, max_concurrent=2, p50_runs=0) as rt:
        loaded = rt.load("add")
        gated = GatedSession(loaded.session)
        loaded.session = gated  # type: ignore[assignment]
        one = np.ones(3, np.float32)
        results: list[np.ndarray] = []
        errors: list[BaseException] = []

        def job() -> None:
            try:
                results.append(rt.run("add", {"x": one, "y": one})["z"])
            except BaseException as exc:
                errors.append(exc)

        holders = [threading.Thread(target=job) for _ in range(2)]
        for t in holders:
            t.start()
        assert gated.entered.acquire(timeout=WAIT) and gated.entered.acquire(timeout=WAIT)
        # Both slots are taken: a third run cannot get one within its timeout.
        with pytest.raises(Timeout, match=r"no execution slot free within 0.05 s \(2 runs"):
            rt.run("add", {"x": one, "y": one}, timeout=0.05)
        more = [threading.Thread(target=job) for _ in range(6)]
        for t in more:
            t.start()
        gated.gate.set()
        for t in holders + more:
            t.join(WAIT)
        assert errors == []
        assert len(results) == 8 and all((r == 2).all() for r in results)
        assert gated.max_active == 2


def test_threads_share_sessions_safely(registry: Registry, src: Path) -> None:
    registry.add_file(models.tiny_matmul_model(src / "mm.onnx"), "mm")
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((i + 1, 4)).astype(np.float32) for i in range(16)]
    expected = [_direct(registry, "mm", {"x": x})[0] for x in xs]
    got: dict[int, np.ndarray] = {}
    with ModelRuntime(registry, max_concurrent=4, p50_runs=0) as rt:

        def job(i: int) -> None:
            got[i] = rt.run("mm", {"x": xs[i]})["y"]

        threads = [threading.Thread(target=job, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
    for i in range(16):
        np.testing.assert_array_equal(got[i], expected[i])


# ----------------------------------------------------------------- cache


def test_cache_evicts_least_recently_used_under_budget(registry: Registry, src: Path) -> None:
    entries = [
        registry.add_file(models.tiny_padded_model(src / f"p{i}.onnx", 50_000, seed=i), f"p{i}")
        for i in range(3)
    ]
    size = max(e.size for e in entries) + SESSION_OVERHEAD_BYTES
    budget = 2 * size + size // 2  # room for two sessions, not three
    one = np.ones(1, np.float32)
    with ModelRuntime(registry, cache_bytes=budget, memory_factor=1.0, p50_runs=0) as rt:
        rt.load("p0")
        rt.load("p1")
        rt.run("p0", {"x": one, "y": one})  # p0 is now the most recently used
        rt.load("p2")
        assert {m.entry.name for m in rt.loaded()} == {"p0", "p2"}
        assert rt.cached_bytes() <= budget
        rt.run("p1", {"x": one, "y": one})  # reloads p1, evicting p0
        assert [m.entry.name for m in rt.loaded()] == ["p2", "p1"]
        assert rt.cached_bytes() <= budget
        assert rt.evict("p1") == 1
        assert [m.entry.name for m in rt.loaded()] == ["p2"]


def test_model_larger_than_the_budget(registry: Registry, src: Path) -> None:
    registry.add_file(models.tiny_padded_model(src / "p.onnx", 10_000), "p")
    with (
        ModelRuntime(registry, cache_bytes=1000) as rt,
        pytest.raises(ExecutionFailed, match="more than the whole cache budget of 1000 bytes"),
    ):
        rt.load("p")


def test_close_stops_the_watchdog(add_model: ModelEntry, registry: Registry) -> None:
    rt = ModelRuntime(registry, p50_runs=0)
    rt.run("add", {"x": np.ones(1, np.float32), "y": np.ones(1, np.float32)})
    assert any(t.name == "edge-models-watchdog" for t in threading.enumerate())
    rt.close()
    assert not any(t.name == "edge-models-watchdog" for t in threading.enumerate())
    with pytest.raises(ExecutionFailed, match="closed"):
        rt.run("add", {"x": np.ones(1, np.float32), "y": np.ones(1, np.float32)})


def test_removed_model_is_not_run(add_model: ModelEntry, registry: Registry) -> None:
    with ModelRuntime(registry, p50_runs=0) as rt:
        rt.load("add")
        registry.remove("add")
        rt.evict(add_model.cid)
        with pytest.raises(ModelNotFound):
            rt.run("add", {"x": np.ones(1, np.float32), "y": np.ones(1, np.float32)})


def test_no_time_left(add_model: ModelEntry, runtime: ModelRuntime) -> None:
    with pytest.raises(Timeout, match="no time left"):
        runtime.run("add", {"x": np.ones(1, np.float32), "y": np.ones(1, np.float32)}, timeout=0)
