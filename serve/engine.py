"""The public serving API: ``Engine`` serves every role of one bundle on one base model from one paged cache.

    engine = Engine("bundle/", ServeConfig(mode="lrshared"))     # or Engine("bundle/", mode="lrshared")
    out = engine.generate("find the value of k7 .", role="planner", max_new_tokens=8)
    out.text, out.stats.reused_tokens, out.stats.ttft_s, engine.stats()["lowrank_bytes"]

    rid = engine.add_request(ids, role="actor", params=SamplingParams(...))   # continuous batching, streaming
    while engine.has_unfinished():
        for o in engine.step(): print(o.request_id, o.new_text, o.finished)
    engine.abort(rid)

Every method may be called from any thread (one lock); a server runs ``step`` in one loop thread
(``lragent.serve.loop.EngineLoop``) while handlers add and abort requests. While an EngineLoop runs, submit through it:
a ``generate`` call from another thread would step the engine itself and take the loop's outputs.
"""
from __future__ import annotations

import itertools
import random
import secrets
import threading
from pathlib import Path

from lragent.bundle import Bundle, BundleError, base_fingerprint, check_base, load_bundle, read_manifest
from lragent.modes import CacheMode, get_mode

from .config import ServeConfig, ServeError
from .detokenizer import Detokenizer
from .kvmanager import KVManager, build_components
from .lora import RoleAdapters
from .memory import check_cache_fits
from .models import load_config
from .runner import CacheTensors, ModelRunner
from .sampling import SamplingParams, is_greedy
from .scheduler import Scheduler
from .sequence import Completion, RequestOutput, Sequence
from .tokens import NoChatTemplate, load_tokenizer, render_chat


def resolve_base(base_info: dict, root: Path | None, base, candidates=()) -> Path:
    """--base, else the base path recorded in the bundle (absolute, or relative to the bundle), else the first of
    ``candidates`` (directories the caller knows, e.g. the embedded default) whose config fingerprint is the one
    the bundle records."""
    if base is not None:
        return Path(base)
    recorded = (base_info or {}).get("path")
    if recorded:
        for c in [Path(recorded)] + ([root / recorded] if root is not None else []):
            if (c / "config.json").is_file():
                return c
    for c in candidates:
        c = Path(c)
        if (c / "config.json").is_file() and (base_info or {}).get("config_sha256"):
            try:
                check_base(base_info, c)              # config and (when recorded) weights fingerprints
            except BundleError:
                continue
            return c
    raise ServeError(f"the base model recorded in the bundle ({recorded or 'none'}) is not on this machine: "
                     f"pass --base PATH (a local model directory)")


def choose_mode(name: str | None, adapters: RoleAdapters, cfg) -> CacheMode:
    """The cache mode to serve (default: lrshared when the bundle allows it, else nonshared), or a one-line error
    saying why the bundle or model cannot use the one asked for."""
    k_lora_qknorm = cfg.qk_norm and "k_proj" in adapters.targets
    if name is None:
        name = "lrshared" if adapters.shares_cached_a() and not k_lora_qknorm else "nonshared"
    mode = get_mode(name)
    if mode.lowrank and k_lora_qknorm:
        raise ServeError(f"mode {name} cannot serve K-LoRA on {cfg.model_type}: its k_norm before RoPE makes K "
                         f"non-decomposable; use nonshared or fullshared, or a bundle with V-only adapters")
    if mode.needs_shared_a and not adapters.shares_cached_a():
        unshared = [t for t in adapters.cached_targets() if t not in adapters.share_a]
        raise ServeError(f"mode {name} needs shared A on every cached target, but this bundle has per-role A on "
                         f"{unshared}: use baseshared or nonshared, or train with A shared on {unshared}")
    return mode


class Engine:
    def __init__(self, bundle, config: ServeConfig | None = None, *, base=None, base_candidates=(), **overrides):
        config = (config or ServeConfig()).replace(**overrides) if overrides else (config or ServeConfig())
        self.config = config
        if isinstance(bundle, Bundle):
            self.bundle = bundle
            self.base_dir = resolve_base(bundle.base, bundle.root, base, base_candidates)
            check_base(bundle.base, self.base_dir)
        else:
            root = Path(bundle).absolute()
            self.base_dir = resolve_base(read_manifest(root).get("base") or {}, root, base, base_candidates)
            self.bundle = load_bundle(root, base_dir=self.base_dir)
        self.dtype, self.device = config.torch_dtype(), config.torch_device()
        self.cfg = load_config(self.base_dir)
        self.tokenizer = load_tokenizer(self.base_dir)
        self.adapters = RoleAdapters(self.bundle, self.cfg, dtype=self.dtype, device=self.device)
        self.mode_row = choose_mode(config.mode, self.adapters, self.cfg)
        self.mode, self.lowrank = self.mode_row.name, self.mode_row.lowrank
        self.roles = list(self.adapters.roles)
        self.block_size, self.num_blocks = config.block_size, config.num_blocks
        self._build_cache()
        self.runner = ModelRunner(self.base_dir, self.cfg, self.adapters, lowrank=self.lowrank, dtype=self.dtype,
                                  device=self.device, attention=config.attention, block_size=self.block_size,
                                  writer=self.mode_row.writer, workspace_tokens=config.workspace_rows)
        eos = set(self.cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = sorted(eos)
        self.scheduler = Scheduler(self.runner, self.kv, self.cache, self.eos_ids, lr_comp=self._lr_comp,
                                   max_batch_tokens=config.max_batch_tokens, max_num_seqs=config.max_num_seqs)
        self._lock = threading.RLock()
        self._ids = itertools.count()
        self._rng = random.Random(config.seed if config.seed is not None else secrets.randbits(63))
        self._seqs: dict[int, Sequence] = {}           # requests in flight
        self._collect: dict[int, Completion | None] = {}   # requests of generate() calls -> their completions

    # -- cache layout -------------------------------------------------------------------------------------------
    def _build_cache(self) -> None:
        a, mode = self.adapters, self.mode_row
        lr_targets = a.cached_targets() if mode.lowrank else []
        n_lr = self.num_blocks * (len(self.roles) if mode.lowrank_per_role else 1) if lr_targets else 0
        check_cache_fits(self.cfg, self.num_blocks, self.block_size, n_lr, len(lr_targets) * a.rank, self.dtype,
                         self.device)
        self.cache = CacheTensors(self.cfg, self.num_blocks, self.block_size, num_lr_blocks=n_lr, rank=a.rank,
                                  lr_targets=lr_targets, dtype=self.dtype, device=self.device)
        info = self.bundle.base or {}        # cache keys carry the base: config and weights fingerprints
        fp = f"{info.get('config_sha256') or base_fingerprint(self.base_dir)}/{info.get('weights_fingerprint', '')}"
        comps = build_components(mode, self.cache, self.num_blocks, self.block_size, base_fp=fp, family=a.family)
        self.kv = KVManager(comps, self.block_size)
        self._lr_comp = None if not lr_targets else next(i for i, c in enumerate(comps) if "lowrank" in c.block_bytes)

    # -- prompts ------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text).input_ids)

    def render(self, messages: list[dict], role: str) -> list[int]:
        """Token ids of the transcript rendered by the tokenizer's chat template, prompting ``role`` to speak
        (:class:`NoChatTemplate` when the tokenizer has none)."""
        self.role_index(role)
        return render_chat(self.tokenizer, messages, role)

    def role_index(self, role: str) -> int:
        if role not in self.adapters.index:
            raise ServeError(f"unknown role {role!r}: this bundle has roles {', '.join(self.roles)}")
        return self.adapters.index[role]

    def _sequence(self, prompt, role: str, params: SamplingParams | None) -> Sequence:
        idx = self.role_index(role)
        params = params or SamplingParams()
        if isinstance(prompt, str):
            ids = self.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise ServeError("prompt must be text or a list of integer token ids")
        if not ids:
            raise ServeError("empty prompt: give at least one token")
        if min(ids) < 0 or max(ids) >= self.cfg.vocab_size:
            raise ServeError(f"prompt has token ids outside the vocabulary [0, {self.cfg.vocab_size})")
        n = len(ids) + params.max_new_tokens
        if n > self.cfg.max_position_embeddings:
            raise ServeError(f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                             f"model's context of {self.cfg.max_position_embeddings} positions: shorten it")
        window = self.cfg.sliding_window
        if window and n - 1 > window:
            raise ServeError(f"request needs {n - 1} positions but the model's sliding window is {window}; "
                             f"sliding-window attention is not implemented: shorten the prompt")
        gen = None
        if not is_greedy(params):
            import torch
            gen = torch.Generator().manual_seed(params.seed if params.seed is not None else self._rng.getrandbits(63))
        seq = Sequence(next(self._ids), ids, role, idx, params, gen)
        seq.adapter_hash = self.adapters.role_hash[role]
        seq.detok = Detokenizer(self.tokenizer, params.stop)
        self.kv.check_fits(seq)
        return seq

    # -- requests -----------------------------------------------------------------------------------------------
    def add_request(self, prompt, role: str, params: SamplingParams | None = None, **sampling) -> int:
        """Queue one request (text or token ids) for ``role``; returns its id. Run it with :meth:`step`."""
        seq = self.make_request(prompt, role, params or SamplingParams(**sampling))
        self.enqueue(seq)
        return seq.id

    def make_request(self, prompt, role: str, params: SamplingParams):
        """A checked request, not yet queued (bad input raises ServeError here); needs no engine lock, so a server
        can call it from its event loop while the engine steps."""
        return self._sequence(prompt, role, params)

    def enqueue(self, seq) -> None:
        """Queue a request made by :meth:`make_request`."""
        with self._lock:
            self._seqs[seq.id] = seq
            self.scheduler.add(seq)

    def step(self) -> list[RequestOutput]:
        """One engine step (admit, one batched forward, sample): per request that advanced, its new tokens and
        text, and its completion if it finished."""
        with self._lock:
            return [self._output(s) for s in self.scheduler.step()]

    def _output(self, seq: Sequence) -> RequestOutput:
        ids = seq.output_ids[seq.emitted_ids:]
        lps = seq.logprobs[seq.emitted_ids:]
        if seq.finished and seq.finish_reason == "eos" and not seq.params.ignore_eos:
            ids, lps = (ids[:-1], lps[:-1]) if ids and ids[-1] in self.eos_ids else (ids, lps)
        text = seq.text if seq.finished else seq.detok.text[:seq.detok.safe_length()]
        new_text = text[len(seq.emitted_text):] if text.startswith(seq.emitted_text) else ""
        seq.emitted_ids, seq.emitted_text = len(seq.output_ids), seq.emitted_text + new_text
        done = None
        if seq.finished:
            if not seq.emitted_text == seq.text:       # cannot happen with a consistent detokenizer; keep the stream's
                seq.text = seq.emitted_text
            done = seq.completion()
            self._seqs.pop(seq.id, None)
            if seq.id in self._collect:
                self._collect[seq.id] = done
        return RequestOutput(seq.id, seq.role, ids, new_text, seq.finished, done, lps)

    def abort(self, request_id: int) -> Completion | None:
        """Stop a request and free its blocks; its completion (finish_reason "abort"), or None if it is not in
        flight."""
        with self._lock:
            seq = self._seqs.pop(request_id, None)
            if seq is None:
                return None
            self.scheduler.abort(seq)
            seq.text = seq.emitted_text
            done = seq.completion()
            if request_id in self._collect:
                self._collect[request_id] = done
            return done

    def has_unfinished(self) -> bool:
        with self._lock:
            return self.scheduler.has_unfinished()

    def generate_batch(self, prompts: list, roles: list[str], params=None) -> list[Completion]:
        """Run several requests concurrently (continuous batching); completions in input order. Every request is
        checked before any is queued. Safe to call from several threads at once."""
        if isinstance(params, SamplingParams) or params is None:
            params = [params or SamplingParams()] * len(prompts)
        if not (len(prompts) == len(roles) == len(params)):
            raise ServeError("generate_batch needs as many roles and params as prompts")
        with self._lock:
            seqs = [self._sequence(p, r, sp) for p, r, sp in zip(prompts, roles, params)]
            for s in seqs:
                self._seqs[s.id] = s
                self._collect[s.id] = None
                self.scheduler.add(s)
        ids = [s.id for s in seqs]
        while True:                      # every step makes progress (the scheduler never spins: see its step())
            with self._lock:
                if all(self._collect[i] is not None for i in ids):
                    return [self._collect.pop(i) for i in ids]
                self.step()

    def generate(self, prompt, role: str, params: SamplingParams | None = None, **sampling) -> Completion:
        return self.generate_batch([prompt], [role], params or SamplingParams(**sampling))[0]

    # -- roles at run time --------------------------------------------------------------------------------------
    def add_base_role(self, name: str) -> None:
        """Serve the base model itself (no adapter) under ``name``: a zero adapter, exact to the base."""
        with self._lock:
            if name in self.adapters.index:
                raise ServeError(f"model name {name!r} is already taken by a role")
            self.adapters.add_role(name)
            self.runner.refresh_adapters()

    def load_role(self, name: str, bundle_dir, source: str | None = None) -> None:
        """Add role ``source`` (default: ``name``, or the bundle's only role) of another bundle as ``name``. Only a
        bundle of the same base model (fingerprint) and the same A family, modules, rank and scaling can join
        the shared cache; anything else is a one-line error and nothing changes."""
        if not isinstance(name, str) or not 0 < len(name) <= 64 or not all(c.isalnum() or c in "_.-" for c in name):
            raise ServeError(f"adapter name {name!r}: use 1-64 letters, digits, '_', '.', '-'")
        other = load_bundle(Path(bundle_dir), base_dir=self.base_dir)
        mine = self.bundle
        if other.a_family_hash is None or other.a_family_hash != mine.a_family_hash:
            raise ServeError(f"bundle {bundle_dir} has another A family ({str(other.a_family_hash)[:12]} != "
                             f"{str(mine.a_family_hash)[:12]}): its roles cannot share this engine's cache")
        if sorted(other.modules) != sorted(mine.modules) or other.rank != mine.rank or \
                other.scaling != mine.scaling or sorted(other.share_a) != sorted(mine.share_a):
            raise ServeError(f"bundle {bundle_dir} has other LoRA modules, rank, scaling or shared targets than the "
                             f"served bundle")
        if source is None:
            source = name if name in other.roles else (other.roles[0] if len(other.roles) == 1 else None)
        if source not in other.roles:
            raise ServeError(f"bundle {bundle_dir} has roles {', '.join(other.roles)}: say which one to load")
        with self._lock:
            if name in self.adapters.index:
                raise ServeError(f"a role named {name!r} is already loaded: unload it first")
            busy = set(self.adapters.index.values()) | {s.role_idx for s in self._seqs.values()}
            free = [i for i in range(len(self.adapters.roles)) if i not in busy]   # unloaded and drained slots
            self.adapters.add_role(name, other, source, slot=free[0] if free else None)
            self.runner.refresh_adapters()
            self.roles.append(name)

    def unload_role(self, name: str) -> None:
        """Stop accepting requests for ``name``; requests in flight finish with its adapter."""
        with self._lock:
            if name not in self.adapters.index:
                raise ServeError(f"no role named {name!r} is loaded")
            del self.adapters.index[name]
            if name in self.roles:
                self.roles.remove(name)

    # -- cache and stats ----------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Cache bytes by component (base K/V, low-rank L, free, capacity), the layout, and the scheduler counts."""
        c, a = self.cfg, self.adapters
        m = len(a.cached_targets()) if self.lowrank else 0
        elem = self.cache.k.element_size()
        with self._lock:
            out = self.kv.stats()
            ws_held, ws_running = self.runner.backend.workspace_bytes()
            out.update(mode=self.mode, block_size=self.block_size, num_blocks=self.num_blocks, roles=len(self.roles),
                       rank=a.rank, lowrank_targets=a.cached_targets() if self.lowrank else [],
                       bytes_per_token_base=2 * c.d_kv * elem * c.num_layers,
                       bytes_per_token_lowrank=m * a.rank * elem * c.num_layers, steps=self.scheduler.steps,
                       workspace_bytes=ws_held, workspace_running_bytes=ws_running,
                       running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                       preemptions=self.scheduler.preemptions)
        return out

    def clear_cache(self) -> None:
        """Drop every cached prefix and the attention backend's workspace arena (requests in flight keep theirs)."""
        with self._lock:
            self.kv.clear()
            self.runner.backend.trim()

    def warmup(self) -> None:
        """One short request on a throwaway prompt (first-call overheads), then an empty cache."""
        ids = [self.cfg.bos_token_id or 0] * 2
        self.generate(ids, self.roles[0], max_new_tokens=2, ignore_eos=True)
        self.clear_cache()


__all__ = ["Engine", "NoChatTemplate", "choose_mode", "resolve_base"]
