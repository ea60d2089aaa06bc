"""Real models from PyPI wheels through the cleanup pipeline, plus the loader's own unit tests.

The real-model tests (markers ``slow`` and ``network``) fetch each model into the cache and
skip, naming the reason, only when pip cannot reach the package registry. Each model must
come out valid (onnx checker), numerically equal to float rounding on generated inputs,
strictly smaller in node count, with no pass rolled back, and byte-identical when optimized
twice. The loader tests below them run offline and fast.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest

import onnxopt
from models import real
from onnxopt.verify import compare_outputs, generate_inputs, run_model

PASSES = "default"


@dataclass
class Optimized:
    """A real model, where it is cached, and the pipeline's result on it."""

    name: str
    path: Path
    original: onnx.ModelProto
    result: onnxopt.OptimizeResult

    def summary(self) -> str:
        """Node counts before and after, and what each pass that changed something did."""
        changed = ", ".join(
            f"{r.name}({', '.join(f'{k}={v}' for k, v in sorted(r.counts.items()))})" for r in self.result.report.changed_passes()
        )
        nodes = f"nodes {len(self.original.graph.node)} -> {len(self.result.model.graph.node)}"
        return f"{self.name}: {nodes}; {changed or 'no pass changed anything'}"


@pytest.fixture(scope="module", params=sorted(real.REAL_MODELS))
def optimized(request) -> Optimized:
    name = request.param
    try:
        path = real.fetch(name)
    except real.RegistryUnavailable as exc:
        pytest.skip(f"real model '{name}' not fetched: {exc}")
    original = onnxopt.load(path)
    return Optimized(name, path, original, onnxopt.optimize(original, PASSES))


@pytest.mark.slow
@pytest.mark.network
def test_no_pass_is_rolled_back(optimized):
    rolled = [f"{r.name}: {r.message}" for r in optimized.result.report.passes if r.status == "rolled back"]
    assert not rolled, f"{optimized.name}: {rolled}"


def _passes_full_check(model: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError:
        return False
    except onnx.shape_inference.InferenceError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.network
def test_result_passes_the_checker_at_the_original_level(optimized):
    onnx.checker.check_model(optimized.result.model)
    if _passes_full_check(optimized.original):
        onnx.checker.check_model(optimized.result.model, full_check=True)


@pytest.mark.slow
@pytest.mark.network
def test_outputs_equal_to_float_rounding(optimized):
    feeds, _ = generate_inputs(optimized.original, real.REAL_MODELS[optimized.name].input_shapes)
    reference, candidate = run_model(optimized.original, feeds), run_model(optimized.result.model, feeds)
    assert list(candidate) == list(reference), "output names or order changed"
    comparison = compare_outputs(reference, candidate, "fp32")
    assert comparison.passed, f"{optimized.name}: {comparison.summary()} {comparison.failures()}"


@pytest.mark.slow
@pytest.mark.network
def test_node_count_shrinks(optimized):
    print(optimized.summary())
    shrank = len(optimized.result.model.graph.node) < len(optimized.original.graph.node)
    assert shrank, optimized.summary()


@pytest.mark.slow
@pytest.mark.network
def test_optimizing_twice_gives_identical_bytes(optimized):
    again = onnxopt.optimize(optimized.original, PASSES)
    assert again.model.SerializeToString(deterministic=True) == optimized.result.model.SerializeToString(deterministic=True)


_OPTIMIZE_TO_STDOUT = (
    "import sys, onnxopt; sys.stdout.buffer.write(onnxopt.optimize(sys.argv[1], sys.argv[2]).model.SerializeToString(deterministic=True))"
)


@pytest.mark.slow
@pytest.mark.network
def test_identical_bytes_under_another_hash_seed(optimized):
    """Set iteration order changes with PYTHONHASHSEED; the output must not."""
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    done = subprocess.run(
        [sys.executable, "-c", _OPTIMIZE_TO_STDOUT, str(optimized.path), PASSES], env=env, capture_output=True, timeout=300
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert done.stdout == optimized.result.model.SerializeToString(deterministic=True)


# ---------------------------------------------------------------- the loader, offline


def _fake_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    return path


def _fake_spec(member: str, data: bytes, requirement: str = "fake-wheel==1.0") -> real.RealModel:
    return real.RealModel(requirement, member, hashlib.sha256(data).hexdigest())


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


def test_cache_location_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path))
    assert real.cache_dir() == tmp_path / "models"
    monkeypatch.delenv("ONNXOPT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert real.cache_dir() == tmp_path / "xdg" / "onnxopt" / "models"


def test_registry_lists_the_four_models_with_pinned_hashes():
    assert sorted(real.REAL_MODELS) == ["magika", "ppocr_cls", "ppocr_det", "ppocr_rec"]
    for spec in real.REAL_MODELS.values():
        assert "==" in spec.requirement and len(spec.sha256) == 64 and spec.input_shapes
        assert real.check_member_name(spec.member) == spec.member


@pytest.mark.parametrize("member", ["../evil.onnx", "/abs/model.onnx", "a/../../b.onnx", "C:\\model.onnx", "a\\..\\b.onnx", "model.py", ""])
def test_unsafe_or_non_onnx_member_names_are_refused(member):
    with pytest.raises(real.RealModelError, match="refusing wheel member"):
        real.check_member_name(member)


def test_extract_writes_only_the_member_atomically(tmp_path):
    data = b"\x08\x07onnx bytes"
    wheel = _fake_wheel(tmp_path / "w.whl", {"pkg/m.onnx": data, "pkg/__init__.py": b"import os"})
    target = tmp_path / "out" / "m.onnx"
    assert real.extract_member(wheel, _fake_spec("pkg/m.onnx", data), target) == target
    assert target.read_bytes() == data
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.onnx"]


def test_extract_rejects_a_hash_mismatch_and_leaves_nothing(tmp_path):
    wheel = _fake_wheel(tmp_path / "w.whl", {"pkg/m.onnx": b"tampered"})
    target = tmp_path / "out" / "m.onnx"
    with pytest.raises(real.RealModelError, match="SHA-256"):
        real.extract_member(wheel, _fake_spec("pkg/m.onnx", b"original"), target)
    assert list(target.parent.iterdir()) == []


def test_extract_reports_a_missing_member_and_a_broken_wheel(tmp_path):
    wheel = _fake_wheel(tmp_path / "w.whl", {"pkg/other.onnx": b"x"})
    with pytest.raises(real.RealModelError, match="no member 'pkg/m.onnx'"):
        real.extract_member(wheel, _fake_spec("pkg/m.onnx", b"x"), tmp_path / "m.onnx")
    broken = tmp_path / "broken.whl"
    broken.write_bytes(b"not a zip")
    with pytest.raises(real.RealModelError, match="not a readable wheel"):
        real.extract_member(broken, _fake_spec("pkg/m.onnx", b"x"), tmp_path / "m.onnx")


@pytest.mark.parametrize(
    "output",
    [
        "WARNING: Retrying (Retry(total=0)) after connection broken by 'NewConnectionError(...: [Errno 111] Connection refused')'",
        "ERROR: Could not install: HTTPSConnectionPool(host='pypi.org'): Max retries exceeded (Temporary failure in name resolution)",
        "WARNING: Retrying ... ProxyError('Cannot connect to proxy.')",
        "ERROR: HTTP error 503 while getting https://files.pythonhosted.org/x.whl",
    ],
)
def test_network_failures_mean_registry_unavailable(output):
    assert isinstance(real.classify_pip_failure("magika==1.0.3", output), real.RegistryUnavailable)


@pytest.mark.parametrize(
    "output",
    [
        "ERROR: Could not find a version that satisfies the requirement magika==9 (from versions: 0.1.0, 1.0.3)",
        "ERROR: No matching distribution found for magika==1.0.3",
        "ERROR: THESE PACKAGES DO NOT MATCH THE HASHES FROM THE REQUIREMENTS FILE.",
        "WARNING: Retrying after connection broken by 'ReadTimeoutError'\nERROR: Could not find a version that satisfies"
        " the requirement magika==9 (from versions: 1.0.2, 1.0.3)",
        "",
    ],
)
def test_other_pip_failures_are_errors_not_skips(output):
    error = real.classify_pip_failure("magika==1.0.3", output)
    assert isinstance(error, real.RealModelError) and not isinstance(error, real.RegistryUnavailable)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_fetch_without_a_reachable_registry_raises_registry_unavailable(cache, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{_closed_port()}/simple")
    monkeypatch.setenv("PIP_TRUSTED_HOST", "127.0.0.1")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(real.RegistryUnavailable, match="cannot reach the package registry"):
        real.fetch("ppocr_cls")
    assert not real.cached_path("ppocr_cls").exists() and real.available() == []


def test_a_package_missing_from_a_reachable_index_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "index").mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "index").as_uri())
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    spec = real.RealModel("onnxopt-no-such-package==1.0", "pkg/m.onnx", "0" * 64)
    with pytest.raises(real.RealModelError, match="onnxopt-no-such-package") as info:
        real.download_wheel(spec, tmp_path / "dl")
    assert not isinstance(info.value, real.RegistryUnavailable)


def test_pip_past_its_time_box_is_registry_unavailable(tmp_path):
    with pytest.raises(real.RegistryUnavailable, match="did not finish"):
        real.download_wheel(real.REAL_MODELS["magika"], tmp_path, timeout=0.01)


def test_pip_command_is_binary_only_without_dependencies_and_pins_the_platform(tmp_path):
    command = real.pip_command(real.REAL_MODELS["magika"], tmp_path)
    for flag in ("download", "--no-deps", "--no-cache-dir", "--only-binary=:all:", "--timeout"):
        assert flag in command
    assert command[command.index("--platform") + 1] == "manylinux_2_28_x86_64" and command[-1] == "magika==1.0.3"


@pytest.fixture
def fake_registry(cache, tmp_path, monkeypatch) -> dict:
    """Two models in one fake wheel; download_wheel is replaced by a counting fake."""
    members = {"pkg/a.onnx": b"model a", "pkg/b.onnx": b"model b"}
    wheel = _fake_wheel(tmp_path / "fake.whl", members)
    specs = {"a": _fake_spec("pkg/a.onnx", members["pkg/a.onnx"]), "b": _fake_spec("pkg/b.onnx", members["pkg/b.onnx"])}
    monkeypatch.setattr(real, "REAL_MODELS", specs)
    calls: list[str] = []

    def download(spec: real.RealModel, dest: Path, **_: object) -> Path:
        calls.append(spec.requirement)
        time.sleep(0.05)
        return wheel

    monkeypatch.setattr(real, "download_wheel", download)
    return {"calls": calls, "members": members}


def test_fetch_extracts_every_model_of_the_wheel_once_then_uses_the_cache(fake_registry):
    path = real.fetch("a")
    assert path.read_bytes() == b"model a" and real.available() == ["a", "b"]
    assert real.fetch("b").read_bytes() == b"model b" and real.fetch("a") == path
    assert fake_registry["calls"] == ["fake-wheel==1.0"]


def test_concurrent_fetches_download_once(fake_registry):
    paths: list[Path] = []
    threads = [threading.Thread(target=lambda: paths.append(real.fetch("a"))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(paths) == 4 and len(set(paths)) == 1 and paths[0].read_bytes() == b"model a"
    assert fake_registry["calls"] == ["fake-wheel==1.0"]


def test_unknown_model_name_is_a_key_error(cache):
    with pytest.raises(KeyError, match="unknown real model 'nope'"):
        real.fetch("nope")


def test_main_fetch_and_list(fake_registry, capsys):
    assert real.main(["fetch", "all"]) == 0
    assert "a: " in capsys.readouterr().out
    assert real.main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "not cached" not in listing and "fake-wheel==1.0" in listing


def test_main_fetch_reports_errors_with_exit_status_1(cache, monkeypatch, capsys):
    def unavailable(spec: real.RealModel, dest: Path, **_: object) -> Path:
        raise real.RegistryUnavailable("offline")

    monkeypatch.setattr(real, "download_wheel", unavailable)
    assert real.main(["fetch", "ppocr_cls"]) == 1
    assert "ppocr_cls: error: offline" in capsys.readouterr().err
