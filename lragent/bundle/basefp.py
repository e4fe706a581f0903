"""Identifying a base model by its weights, cheaply: :func:`weights_fingerprint` and :func:`check_base`.

``config.json`` alone does not identify a base model (two checkpoints of one architecture share it). The weights
fingerprint is a sha256 over, for every weight file of the directory (``*.safetensors``; ``*.bin`` only when there is
no safetensors file; bytes are hashed, never unpickled), its name, size and safetensors header, plus its tensor data:
all of it for files up to :data:`FULL_BYTES`, else :data:`SAMPLES` evenly spaced chunks of :data:`CHUNK` bytes and the
last chunk. That reads a few MiB of a multi-GiB model; results are cached in memory by (path, size, mtime, inode).
A safetensors file whose header is damaged or whose size does not match the header (a truncated copy) is refused.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from .format import BundleError, base_fingerprint

FULL_BYTES = 64 << 20
CHUNK = 64 << 10
SAMPLES = 64
FP_VERSION = "w1"
_cache: dict[tuple, str] = {}


def weight_files(base_dir: str | Path) -> list[Path]:
    """The weight files that :func:`weights_fingerprint` covers, sorted by name."""
    base = Path(base_dir)
    files = sorted(p for p in base.glob("*.safetensors") if p.is_file())
    return files or sorted(p for p in base.glob("*.bin") if p.is_file())


def _safetensors_header(path: Path, f, size: int) -> bytes:
    """The header bytes of a safetensors file; BundleError when it is damaged or the file is truncated."""
    bad = f"base model weight file {path} is damaged or truncated"
    if size < 8:
        raise BundleError(f"{bad} ({size} bytes): copy the model again")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > min(size - 8, 100 << 20):
        raise BundleError(f"{bad} (header length {n} > file size {size}): copy the model again")
    raw = f.read(n)
    try:
        header = json.loads(raw)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        raise BundleError(f"{bad} (unreadable header): copy the model again") from None
    need = 8 + n + max(ends, default=0)
    if size != need:
        raise BundleError(f"{bad} ({size} bytes, its header describes {need}): copy the model again")
    return raw


def _file_digest(path: Path) -> str:
    st = path.stat()
    key = (str(path.absolute()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
    if key in _cache:
        return _cache[key]
    h = hashlib.sha256(f"{path.name}:{st.st_size};".encode())
    with open(path, "rb") as f:
        start = 0
        if path.suffix == ".safetensors":
            header = _safetensors_header(path, f, st.st_size)
            h.update(header)
            start = 8 + len(header)
        data = st.st_size - start
        if data <= FULL_BYTES:
            f.seek(start)
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            offsets = [start + (data - CHUNK) * i // (SAMPLES - 1) for i in range(SAMPLES)]
            for off in offsets:
                f.seek(off)
                h.update(f.read(CHUNK))
    _cache[key] = digest = h.hexdigest()
    return digest


def weights_fingerprint(base_dir: str | Path) -> str:
    """``w1:<sha256>`` over the base model's weight files (see the module docstring). Raises BundleError (one line)
    when a weight file is unreadable, damaged or truncated."""
    base = Path(base_dir)
    h = hashlib.sha256(FP_VERSION.encode())
    try:
        for p in weight_files(base):
            h.update(f"{p.name}={_file_digest(p)};".encode())
    except OSError as e:
        raise BundleError(f"base model {base}: cannot read {e.filename or 'a weight file'} ({e.strerror})") from None
    return f"{FP_VERSION}:{h.hexdigest()}"


def base_info(base_dir: str | Path, name: str | None = None) -> dict:
    """What bundles and runs record about their base: name, path, config sha256 and weights fingerprint."""
    base = Path(base_dir).absolute()
    return {"name": name or base.name, "path": str(base), "config_sha256": base_fingerprint(base),
            "weights_fingerprint": weights_fingerprint(base)}


def check_base(base_info: dict, base_dir: str | Path, *, against: str = "the bundle") -> None:
    """Raise one BundleError line unless ``base_dir`` is the base that ``base_info`` (a bundle manifest's or
    run.json's ``base``) records: its config.json sha256 and, when recorded (newer bundles and runs), its weights
    fingerprint must match. Records without a config sha256 are accepted unchecked (nothing to compare).
    ``against`` names the record in the message ("the bundle", "the run")."""
    info = base_info if isinstance(base_info, dict) else {}
    want = info.get("config_sha256")
    if want is None:
        return
    got = base_fingerprint(base_dir)
    if got != want:
        raise BundleError(f"base model {base_dir} does not match {against} (config.json sha256 {got[:12]} != "
                          f"{str(want)[:12]}): pass the base model the adapters were trained on")
    want_w = info.get("weights_fingerprint")
    if want_w is None:
        return
    got_w = weights_fingerprint(base_dir)
    if got_w != want_w:
        short = lambda fp: str(fp).split(":")[-1][:12]  # noqa: E731
        raise BundleError(f"base model {base_dir} does not match {against}: same config.json, different weights "
                          f"(weights fingerprint {short(got_w)} != {short(want_w)}): pass the base model the "
                          f"adapters were trained on")
