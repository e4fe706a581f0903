"""The public serving API: ``Engine`` serves every role of one bundle on one base model from one paged cache.

    engine = Engine("bundle/", mode="lrshared")              # base: --base, else the path recorded in the bundle
    out = engine.generate("find the value of k7 .", role="planner", max_new_tokens=8)
    out.text, out.stats.reused_tokens, out.stats.ttft_s, engine.stats()["lowrank_bytes"]

    rid = engine.add_request(ids, role="actor", params=SamplingParams(...))   # continuous batching
    while engine.has_unfinished(): done = engine.step()
"""
from __future__ import annotations

from pathlib import Path

import torch

from lragent.bundle import Bundle, BundleError, base_fingerprint, load_bundle, read_manifest

from .cache import PrefixCache
from .config import ModelConfig, ServeError
from .kvmanager import Component, KVManager
from .lora import RoleAdapters
from .model import CacheTensors, ModelRunner
from .sampling import SamplingParams
from .scheduler import Scheduler
from .sequence import Completion, Sequence

MODES = ("nonshared", "fullshared", "baseshared", "lrshared")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ServeError(f"unknown dtype {dtype!r}: use float32, float16 or bfloat16")
    return DTYPES[dtype]


def resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ServeError(f"device {device!r} asked for but CUDA is not available here: use --device cpu")
    return dev


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
    want = (base_info or {}).get("config_sha256")
    for c in candidates:
        c = Path(c)
        if (c / "config.json").is_file() and base_fingerprint(c) == want:
            return c
    raise ServeError(f"the base model recorded in the bundle ({recorded or 'none'}) is not on this machine: "
                     f"pass --base PATH (a local model directory)")


def choose_mode(mode: str | None, adapters: RoleAdapters, cfg: ModelConfig) -> str:
    k_lora_qknorm = cfg.qk_norm and "k_proj" in adapters.targets
    if mode is None:
        return "lrshared" if adapters.shares_cached_a() and not k_lora_qknorm else "nonshared"
    if mode not in MODES:
        raise ServeError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    if mode in ("baseshared", "lrshared") and k_lora_qknorm:
        raise ServeError(f"mode {mode} cannot serve K-LoRA on {cfg.model_type}: its k_norm before RoPE makes K "
                         f"non-decomposable; use nonshared or fullshared, or a bundle with V-only adapters")
    if mode == "lrshared" and not adapters.shares_cached_a():
        unshared = [t for t in adapters.cached_targets() if t not in adapters.share_a]
        raise ServeError(f"mode lrshared needs shared A on every cached target, but this bundle has per-role A on "
                         f"{unshared}: use baseshared or nonshared, or train with A shared on {unshared}")
    return mode


class Engine:
    def __init__(self, bundle, base=None, *, mode: str | None = None, dtype="float32", device="cpu",
                 num_blocks: int | None = None, block_size: int = 16, cache_tokens: int = 8192,
                 max_batch_tokens: int = 512, max_num_seqs: int = 64, attention: str = "auto", base_candidates=()):
        from transformers import AutoTokenizer

        if isinstance(bundle, Bundle):
            self.bundle = bundle
            self.base_dir = resolve_base(bundle.base, bundle.root, base, base_candidates)
            if (bundle.base or {}).get("config_sha256") not in (None, base_fingerprint(self.base_dir)):
                raise BundleError(f"base model {self.base_dir} does not match the bundle (config.json sha256)")
        else:
            root = Path(bundle).absolute()
            self.base_dir = resolve_base(read_manifest(root).get("base") or {}, root, base, base_candidates)
            self.bundle = load_bundle(root, base_dir=self.base_dir)
        if block_size < 1 or (num_blocks is not None and num_blocks < 1) or max_batch_tokens < 1:
            raise ServeError("block_size, num_blocks and max_batch_tokens must be positive")
        self.dtype, self.device = resolve_dtype(dtype), resolve_device(device)
        self.cfg = ModelConfig.from_dir(self.base_dir)
        self.adapters = RoleAdapters(self.bundle, self.cfg, dtype=self.dtype, device=self.device)
        self.mode = choose_mode(mode, self.adapters, self.cfg)
        self.roles = list(self.adapters.roles)
        self.lowrank = self.mode in ("baseshared", "lrshared")
        self.runner = ModelRunner(self.base_dir, self.cfg, self.adapters, lowrank=self.lowrank, dtype=self.dtype,
                                  device=self.device, attention=attention)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.base_dir))
        self.block_size = block_size
        self.num_blocks = num_blocks or max(1, -(-cache_tokens // block_size))
        self._build_cache()
        eos = set(self.cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = sorted(eos)
        self.scheduler = Scheduler(self.runner, self.kv, self.cache, self.tokenizer, self.eos_ids,
                                   kv_comp=0, lr_comp=self._lr_comp, max_batch_tokens=max_batch_tokens,
                                   max_num_seqs=max_num_seqs)
        self._done: dict[int, Completion] = {}

    # -- cache layout -------------------------------------------------------------------------------------------
    def _build_cache(self) -> None:
        a, n_roles = self.adapters, len(self.roles)
        lr_targets = a.cached_targets() if self.lowrank else []
        n_lr = self.num_blocks * (n_roles if self.mode == "baseshared" else 1)
        self.cache = CacheTensors(self.cfg, self.num_blocks, self.block_size, num_lr_blocks=n_lr if lr_targets else 0,
                                  rank=a.rank, lr_targets=lr_targets, dtype=self.dtype, device=self.device)
        fp = (self.bundle.base or {}).get("config_sha256") or base_fingerprint(self.base_dir)
        c = self.cache
        if self.mode == "nonshared":
            ns = {r: ("nonshared", fp, r, a.role_hash[r]) for r in self.roles}
            comps = [Component("kv", PrefixCache(self.num_blocks, self.block_size, [c.k, c.v]),
                               lambda s: ns[s.role], {"base": c.kv_block_bytes})]
        elif self.mode == "fullshared":
            key = ("fullshared", fp, a.family)
            comps = [Component("kv", PrefixCache(self.num_blocks, self.block_size, [c.k, c.v]),
                               lambda s: key, {"base": c.kv_block_bytes})]
        elif self.mode == "lrshared":
            key = ("lrshared", fp, a.family)
            comps = [Component("kv", PrefixCache(self.num_blocks, self.block_size, [c.k, c.v, *c.lr_tensors()]),
                               lambda s: key, {"base": c.kv_block_bytes, "lowrank": c.lr_block_bytes})]
        else:
            key = ("baseshared", fp, a.family)
            ns = {r: ("baseshared-lr", fp, a.family, r, a.role_hash[r]) for r in self.roles}
            comps = [Component("kv", PrefixCache(self.num_blocks, self.block_size, [c.k, c.v]),
                               lambda s: key, {"base": c.kv_block_bytes})]
            if lr_targets:
                comps.append(Component("lr", PrefixCache(n_lr, self.block_size, c.lr_tensors()),
                                       lambda s: ns[s.role], {"lowrank": c.lr_block_bytes}))
        self.kv = KVManager(comps, self.block_size)
        self._lr_comp = None if not lr_targets else (1 if self.mode == "baseshared" else 0)

    # -- requests -----------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text).input_ids)

    def render(self, messages: list[dict], role: str) -> list[int]:
        """Token ids of the transcript rendered by the tokenizer's chat template, prompting ``role`` to speak."""
        self.role_index(role)
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                      role=role)
        except Exception as e:
            raise ServeError(f"the tokenizer's chat template failed on this transcript: {e}") from None
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def role_index(self, role: str) -> int:
        if role not in self.adapters.index:
            raise ServeError(f"unknown role {role!r}: this bundle has roles {', '.join(self.roles)}")
        return self.adapters.index[role]

    def add_request(self, prompt, role: str, params: SamplingParams | None = None, **sampling) -> int:
        """Queue one request (text or token ids) for ``role``; returns its id. Run it with :meth:`step`."""
        idx = self.role_index(role)
        params = params or SamplingParams(**sampling)
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ServeError("empty prompt: give at least one token")
        if min(ids) < 0 or max(ids) >= self.cfg.vocab_size:
            raise ServeError(f"prompt has token ids outside the vocabulary [0, {self.cfg.vocab_size})")
        seq = Sequence(ids, role, idx, params)
        if seq.max_tokens > self.cfg.max_position_embeddings:
            raise ServeError(f"request needs {seq.max_tokens} positions (prompt + max_new_tokens) but the model's "
                             f"max_position_embeddings is {self.cfg.max_position_embeddings}: shorten it")
        window = self.cfg.sliding_window
        if window and seq.max_tokens > window:
            raise ServeError(f"request needs {seq.max_tokens} positions but the model's sliding window is {window}; "
                             f"sliding-window attention is not implemented: shorten the prompt")
        self.scheduler.add(seq)
        return seq.id

    def step(self) -> list[Completion]:
        """One engine step (admit, one batched forward, sample); the completions that finished in it."""
        done = [s.completion() for s in self.scheduler.step()]
        for c in done:
            self._done[c.request_id] = c
        return done

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def run_until_done(self) -> dict[int, Completion]:
        while self.has_unfinished():
            self.step()
        done, self._done = self._done, {}
        return done

    def generate_batch(self, prompts: list, roles: list[str], params=None) -> list[Completion]:
        """Run several requests concurrently (continuous batching); completions in input order."""
        if isinstance(params, SamplingParams) or params is None:
            params = [params or SamplingParams()] * len(prompts)
        if not (len(prompts) == len(roles) == len(params)):
            raise ServeError("generate_batch needs as many roles and params as prompts")
        ids = [self.add_request(p, r, sp) for p, r, sp in zip(prompts, roles, params)]
        done = self.run_until_done()
        return [done[i] for i in ids]

    def generate(self, prompt, role: str, params: SamplingParams | None = None, **sampling) -> Completion:
        return self.generate_batch([prompt], [role], params or SamplingParams(**sampling))[0]

    # -- cache and stats ----------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Cache bytes by component (base K/V, low-rank L, free, capacity) and the layout."""
        c, a = self.cfg, self.adapters
        m = len(a.cached_targets()) if self.lowrank else 0
        elem = self.cache.k.element_size()
        out = self.kv.stats()
        out.update(mode=self.mode, block_size=self.block_size, num_blocks=self.num_blocks, roles=len(self.roles),
                   rank=a.rank, lowrank_targets=a.cached_targets() if self.lowrank else [],
                   bytes_per_token_base=2 * c.d_kv * elem * c.num_layers,
                   bytes_per_token_lowrank=m * a.rank * elem * c.num_layers, steps=self.scheduler.steps)
        return out

    def clear_cache(self) -> None:
        """Drop every cached prefix (requests in flight keep theirs)."""
        self.kv.clear()

    def warmup(self) -> None:
        """One short request on a throwaway prompt (first-call overheads), then an empty cache."""
        ids = [self.cfg.bos_token_id or 0] * 2
        self.generate(ids, self.roles[0], max_new_tokens=2, ignore_eos=True)
        self.clear_cache()
