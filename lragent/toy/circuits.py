"""Compile the toy task's mechanics into the weights of a tiny Llama (the starting point of the shipped base).

Gradient pretraining from scratch did not find the task's lookup circuit (an induction-style composition) within
this repository's CPU budget (measured, see ``PRETRAIN.json`` "from_scratch"), so ``lragent.toy.pretrain_base``
starts from weights written here, in the standard ``LlamaForCausalLM`` layout, then pretrains the LM head.

The residual stream has named slices (see ``Layout``). Every token embedding carries a large constant ``one``
(16, so RMSNorm scales stay ~1 and positional heads have a bias to rotate) plus a one-hot for structural words or a
16-dim +-1/4 code (pairwise inner products <= 1/2) for keys ``k0..k63`` and values ``0..99``. The ``assistant`` tag
also carries three *skill* flags (lookup, answer, check).

Layer 0 attention, positional heads (RoPE phases on the high-frequency pairs peak at a fixed offset):
    prev1 -> P1C, P1T, P1F, P1SK (code, tag one-hot, flags {of, lookup, answer}, skills of the token 1 back)
    prev2 -> P2C, P2T, P2SK      (2 back: at a db value, the code of its key; at ``lookup``/``answer``, the turn tag)
    prev3 -> P3C, P3F            (3 back: at ``<tag> :``, the last word of the previous turn)
    prev4, prev8 -> P48C         (the key named by the planner, seen from ``answer`` / from the reflector's ``:``)
Layer 1 attention, content heads (low-frequency pairs, ~position independent):
    lookup: query P48C against P2C at db values -> LV (the value of the planner's key)
    user-key: the most recent key that follows ``of`` (recency from a mid-frequency pair) -> UK
Layer 1 MLP: M = LV . P3C (exact bilinear from SiLU(x) - SiLU(-x) = x), the turn-format rules, and the *gated*
    copies OUT = UK (at ``lookup``, gate: lookup skill) and OUT = LV (at ``answer``, gate: answer skill).
Layer 2 MLP: VERD = (M - 3/4), gated by the check skill at ``:`` after an answer turn.
LM head: words from the format rules; keys/values from OUT plus a class bias (and a small fixed prior that breaks
ties); correct/wrong from VERD.

Turns tagged ``planner`` / ``actor`` / ``reflector`` have no skill flags: they get the right form with an uninformed
choice of content. The gates are *soft at the base point* (pre-activation ``beta * skill`` at the gated position:
0 for a role tag, SiLU slope 1/2), so an adapter that raises its role's skill flag gets a useful gradient from the
first step. One gate per skill gives each role's adapter a route of its own; adapters still write into other dims
too, so an adapter may partly open another role's gate (``check_specialise`` reports the cross-role effect).
"""
from __future__ import annotations

import math

from lragent.toy.tokenizer import ROLE_WORDS, vocabulary

CONFIG = dict(
    hidden_size=256,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    rope_theta=1e7,
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
    hidden_act="silu",
    initializer_range=0.02,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

CODE_DIM = 16
SKILLS = ("lookup", "answer", "check")   # one gate per skill, so that each role's adapter opens only its own
ONE = 16.0               # the constant component of every embedding
POS_PAIRS = range(0, 6)  # RoPE pairs used by positional heads (highest frequencies)
REC_PAIR = 6             # RoPE pair used for recency
FLAG_PAIR = 7            # RoPE pair carrying flags in layer-1 keys
CODE_PAIRS = range(8, 16)  # lowest frequencies: content matching (16 dims)

# Logit scales.
K_FORM = 20.0    # format words
K_CLASS = 20.0   # class bias (any key after ``lookup``, any value after ``answer``)
G_COPY = 20.0    # code readout (target code . OUT); other codes get <= half
G_VERD = 20.0    # verdict
PRIOR = 0.3      # scale of the fixed uninformed prior over keys / values / verdicts


def _is_key(w: str) -> bool:
    return w.startswith("k") and w[1:].isdigit()


class Layout:
    """Named slices of the residual stream."""

    def __init__(self, vocab: list[str]):
        self.vocab = vocab
        self.struct = [w for w in vocab if not (_is_key(w) or w.isdigit())]
        self.tags = list(ROLE_WORDS)
        self._next = 0
        self.S = {w: self._take(1).start for w in self.struct}
        for name in ("one", "f_key", "f_val"):
            setattr(self, name, self._take(1).start)
        self.SK = self._take(len(SKILLS))     # skill flags, carried by the ``assistant`` tag
        self.C = self._take(CODE_DIM)
        self.P1C, self.P1T, self.P1F = self._take(CODE_DIM), self._take(len(self.tags)), self._take(3)
        self.P1SK = self._take(len(SKILLS))
        self.P2C, self.P2T, self.P2SK = self._take(CODE_DIM), self._take(len(self.tags)), self._take(len(SKILLS))
        self.P3C, self.P3F = self._take(CODE_DIM), self._take(2)
        self.P48C = self._take(CODE_DIM)
        self.LV, self.UK = self._take(CODE_DIM), self._take(CODE_DIM)
        self.M, self.LOOK, self.ANS, self.VCLS, self.EOS = (self._take(1).start for _ in range(5))
        self.OUT = self._take(CODE_DIM)
        self.VERD = self._take(1).start
        self.used = self._next

    def format_columns(self) -> list[int]:
        """Residual dims that carry token/turn structure (no key/value codes): what the LM head may read for the
        transcript format without creating a path from a key/value code to the output."""
        cols = list(self.S.values()) + [self.one, self.f_key, self.f_val] + list(self.SK)
        cols += list(self.P1T) + list(self.P1F) + list(self.P2T) + list(self.P3F) + list(self.P1SK) + list(self.P2SK)
        return cols + [self.LOOK, self.ANS, self.VCLS, self.EOS]

    def _take(self, n: int) -> range:
        r = range(self._next, self._next + n)
        self._next += n
        return r


def make_codes(n: int, dim: int = CODE_DIM, seed: int = 0):
    """``n`` +-1/sqrt(dim) codes with pairwise inner products <= 1/2 (greedy, seeded)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    codes: list = []
    while len(codes) < n:
        v = torch.randint(0, 2, (dim,), generator=g).double() * 2 - 1
        if all(float(v @ c) <= dim / 2 for c in codes):
            codes.append(v)
    return torch.stack(codes) / math.sqrt(dim)


def rope_thetas(cfg: dict):
    import torch
    hd = cfg["head_dim"]
    return cfg["rope_theta"] ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)


def peak_amplitudes(offset: int, thetas, max_delta: int, steps: int = 1500):
    """Nonnegative weights (sum 1) over ``POS_PAIRS`` maximising min_{delta != offset} of
    sum_j A_j (1 - cos((delta - offset) theta_j)), i.e. the score margin of a head peaked at ``offset``."""
    import torch
    th = thetas[list(POS_PAIRS)]
    deltas = torch.tensor([d for d in range(max_delta) if d != offset], dtype=torch.float64)
    gain = 1 - torch.cos((deltas[:, None] - offset) * th[None, :])
    w = torch.zeros(len(th), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.05)
    for _ in range(steps):
        m = gain @ torch.softmax(w, 0)
        loss = 0.002 * torch.logsumexp(-m / 0.002, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    a = torch.softmax(w.detach(), 0)
    return a, float((gain @ a).min())


def compile_state_dict(cfg: dict | None = None, seed: int = 0) -> tuple[dict, dict]:
    """Weights (name -> fp32 tensor) of a ``LlamaForCausalLM`` implementing the circuits above, and a report."""
    import torch
    cfg = dict(CONFIG if cfg is None else cfg)
    vocab = vocabulary()
    V, D, HD, NH, NKV = len(vocab), cfg["hidden_size"], cfg["head_dim"], cfg["num_attention_heads"], \
        cfg["num_key_value_heads"]
    half, group, I = HD // 2, NH // NKV, cfg["intermediate_size"]
    lay = Layout(vocab)
    assert lay.used <= D, (lay.used, D)
    idx = {w: i for i, w in enumerate(vocab)}
    keys = [w for w in vocab if _is_key(w)]
    values = [w for w in vocab if w.isdigit()]
    codes = make_codes(len(keys) + len(values), seed=seed)
    code = {w: codes[i] for i, w in enumerate(keys + values)}
    th = rope_thetas(cfg)
    scale = HD ** -0.5
    f64 = dict(dtype=torch.float64)
    sd: dict[str, torch.Tensor] = {}
    report: dict = {"layout_dims_used": lay.used}

    # ---- embeddings
    E = torch.zeros(V, D, **f64)
    E[:, lay.one] = ONE
    for w, i in idx.items():
        if w in lay.S:
            E[i, lay.S[w]] = 1.0
            if w == "assistant":
                E[i, list(lay.SK)] = 1.0
        else:
            E[i, lay.f_key if _is_key(w) else lay.f_val] = 1.0
            E[i, list(lay.C)] = code[w]
    sd["model.embed_tokens.weight"] = E
    one_in = ONE  # the constant as seen after RMSNorm (weights 1, rms ~ 1)

    def zeros_layer(l: int):
        p = f"model.layers.{l}."
        sd[p + "self_attn.q_proj.weight"] = torch.zeros(NH * HD, D, **f64)
        sd[p + "self_attn.k_proj.weight"] = torch.zeros(NKV * HD, D, **f64)
        sd[p + "self_attn.v_proj.weight"] = torch.zeros(NKV * HD, D, **f64)
        sd[p + "self_attn.o_proj.weight"] = torch.zeros(D, NH * HD, **f64)
        sd[p + "mlp.gate_proj.weight"] = torch.zeros(I, D, **f64)
        sd[p + "mlp.up_proj.weight"] = torch.zeros(I, D, **f64)
        sd[p + "mlp.down_proj.weight"] = torch.zeros(D, I, **f64)
        sd[p + "input_layernorm.weight"] = torch.ones(D, **f64)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(D, **f64)
        return p

    # ---- layer 0: positional heads
    p = zeros_layer(0)
    Wq, Wk, Wv, Wo = (sd[p + f"self_attn.{n}_proj.weight"] for n in "qkvo")
    kappa = 4.0                                 # key component on each positional pair
    flags0 = ["of", "lookup", "answer"]
    for g in range(NKV):
        kb = g * HD
        for j in POS_PAIRS:
            Wk[kb + j, lay.one] = kappa / one_in
        # value: [code (16) | tag one-hot (7) | of, lookup, answer | key, value]
        for m, c in enumerate(lay.C):
            Wv[kb + m, c] = 1.0
        for t, tag in enumerate(lay.tags):
            Wv[kb + CODE_DIM + t, lay.S[tag]] = 1.0
        for f, w in enumerate(flags0):
            Wv[kb + CODE_DIM + len(lay.tags) + f, lay.S[w]] = 1.0
        Wv[kb + CODE_DIM + len(lay.tags) + 3, lay.f_key] = 1.0
        Wv[kb + CODE_DIM + len(lay.tags) + 4, lay.f_val] = 1.0
        for k, r in enumerate(lay.SK):
            Wv[kb + CODE_DIM + len(lay.tags) + 5 + k, r] = 1.0
    vC = list(range(CODE_DIM))
    vT = list(range(CODE_DIM, CODE_DIM + len(lay.tags)))
    vF = list(range(CODE_DIM + len(lay.tags), CODE_DIM + len(lay.tags) + 3))
    vKV = [CODE_DIM + len(lay.tags) + 3, CODE_DIM + len(lay.tags) + 4]
    vSK = [CODE_DIM + len(lay.tags) + 5 + k for k in range(len(SKILLS))]
    assert vSK[-1] < HD
    # (head, offset, [(value dims, residual slice)])
    heads0 = [(0, 1, [(vC, lay.P1C), (vT, lay.P1T), (vF, lay.P1F), (vSK, lay.P1SK)]),
              (1, 2, [(vC, lay.P2C), (vT, lay.P2T), (vSK, lay.P2SK)]),
              (2, 3, [(vC, lay.P3C), (vKV, lay.P3F)]),
              (3, 4, [(vC, lay.P48C)]),
              (group, 8, [(vC, lay.P48C)])]
    margin_target = 15.0                        # logits between the peak and any other offset
    report["positional"] = {}
    for h, off, writes in heads0:
        amp, margin = peak_amplitudes(off, th, cfg["max_position_embeddings"])
        R = margin_target / (margin * kappa * scale)
        qb = h * HD
        for a, j in zip(amp, POS_PAIRS):
            Wq[qb + j, lay.one] = R * a * math.cos(-off * th[j]) / one_in
            Wq[qb + half + j, lay.one] = R * a * math.sin(-off * th[j]) / one_in
        for vdims, res in writes:
            for vd, r in zip(vdims, res):
                Wo[r, qb + vd] = 1.0
        report["positional"][f"prev{off}"] = {"head": h, "margin": round(margin, 4), "R": round(R, 1)}

    # ---- layer 1: content heads (group 0): lookup and user-key
    p = zeros_layer(1)
    Wq, Wk, Wv, Wo = (sd[p + f"self_attn.{n}_proj.weight"] for n in "qkvo")
    s_code, s_flag, kap_r = 4.0, 4.0, 4.0
    for m, j in enumerate(CODE_PAIRS):          # key side: P2C on the code pairs
        Wk[j, lay.P2C[2 * m]] = s_code
        Wk[half + j, lay.P2C[2 * m + 1]] = s_code
    Wk[FLAG_PAIR, lay.f_val] = s_flag            # real part: is a value
    Wk[half + FLAG_PAIR, lay.P1F[0]] = s_flag    # imaginary part: follows "of"
    Wk[REC_PAIR, lay.one] = kap_r / one_in       # recency carrier
    for m, c in enumerate(lay.C):
        Wv[m, c] = 1.0
    # lookup head (0): alpha * P48C . P2C + lam * is_value
    alpha = 24.0 / (0.5 * s_code * scale)        # match vs other codes: >= 24 logits
    lam = 0.5 * alpha * s_code / s_flag
    for m, j in enumerate(CODE_PAIRS):
        Wq[j, lay.P48C[2 * m]] = alpha
        Wq[half + j, lay.P48C[2 * m + 1]] = alpha
    Wq[FLAG_PAIR, lay.one] = lam / one_in
    for m, r in enumerate(lay.LV):
        Wo[r, m] = 1.0
    # user-key head (1): mu * follows_of - R sin(delta theta)
    hb = HD
    gap = 18                                      # a later user key is >= 18 tokens more recent
    R = 12.0 / (kap_r * scale * th[REC_PAIR] * gap)
    mu = (R * kap_r + 12.0 / scale) / (s_flag * math.cos(cfg["max_position_embeddings"] * th[FLAG_PAIR]))
    Wq[hb + half + FLAG_PAIR, lay.one] = mu / one_in
    Wq[hb + half + REC_PAIR, lay.one] = R / one_in
    for m, r in enumerate(lay.UK):
        Wo[r, hb + m] = 1.0
    report["content"] = {"alpha": round(alpha, 2), "lambda": round(lam, 2), "uk_R": round(float(R), 1),
                         "uk_mu": round(float(mu), 1)}

    # ---- layer 1 MLP
    G, U, Dn = (sd[p + f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
    u = 0
    c_bil = 4.0
    for m in range(CODE_DIM):                    # M = LV . P3C = sum_m [SiLU(c x) - SiLU(-c x)] y / c
        for sign in (1.0, -1.0):
            G[u, lay.LV[m]] = sign * c_bil
            U[u, lay.P3C[m]] = 1.0
            Dn[lay.M, u] = sign / c_bil
            u += 1
    beta = 12.0
    act_on = beta * 0.5 / (1 + math.exp(-beta * 0.5))      # SiLU(beta / 2)
    role_tags = ["assistant", "planner", "actor", "reflector"]

    def colon_role_gate(unit):                   # on at "<role or assistant> :"
        G[unit, lay.S[":"]] = beta
        for t in role_tags:
            G[unit, lay.P1T[lay.tags.index(t)]] = beta
        G[unit, lay.one] = -1.5 * beta / one_in

    colon_role_gate(u); U[u, lay.one] = 1 / one_in; U[u, lay.P3F[0]] = -1; U[u, lay.P3F[1]] = -1
    Dn[lay.LOOK, u] = 1 / act_on; u += 1
    colon_role_gate(u); U[u, lay.P3F[0]] = 1; Dn[lay.ANS, u] = 1 / act_on; u += 1
    colon_role_gate(u); U[u, lay.P3F[1]] = 1; Dn[lay.VCLS, u] = 1 / act_on; u += 1
    for cur, prev in ((lay.f_key, lay.P1F[1]), (lay.f_val, lay.P1F[2])):   # "</s>" after "lookup kX" / "answer V"
        G[u, cur] = beta; G[u, prev] = beta; G[u, lay.one] = -1.5 * beta / one_in
        U[u, lay.one] = 1 / one_in; Dn[lay.EOS, u] = 1 / act_on; u += 1
    # Skill gates: pre-activation beta_g * (skill + OFF * (conditions - n_conditions)): beta_g * skill where the
    # skill applies (soft at skill = 0, SiLU slope 1/2), <= -OFF * beta_g elsewhere, so that the gradient there is
    # negligible (Adam would amplify a small one: one role's adapter would open another role's gate).
    beta_g, OFF = 8.0, 5.0
    on_g = beta_g / (1 + math.exp(-beta_g))                  # SiLU(beta_g)
    for word, src in (("lookup", lay.UK), ("answer", lay.LV)):
        skill = lay.P2SK[SKILLS.index(word)]
        for m in range(CODE_DIM):
            G[u, skill] = beta_g
            G[u, lay.S[word]] = OFF * beta_g
            G[u, lay.one] = -OFF * beta_g / one_in
            U[u, src[m]] = 1.0
            Dn[lay.OUT[m], u] = 1 / on_g
            u += 1
    assert u <= I, (u, I)
    report["mlp1_units"] = u

    # ---- layer 2: MLP only (verdict)
    p = zeros_layer(2)
    G, U, Dn = (sd[p + f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
    G[0, lay.P1SK[SKILLS.index("check")]] = beta_g
    G[0, lay.S[":"]] = OFF * beta_g
    G[0, lay.P3F[1]] = OFF * beta_g
    G[0, lay.one] = -2 * OFF * beta_g / one_in
    U[0, lay.M] = 1.0
    U[0, lay.one] = -0.75 / one_in
    Dn[lay.VERD, 0] = 1 / on_g

    # ---- head
    sd["model.norm.weight"] = torch.ones(D, **f64)
    H = torch.zeros(V, D, **f64)
    H[idx["lookup"], lay.LOOK] = K_FORM
    H[idx["answer"], lay.ANS] = K_FORM
    # Uninformed defaults: a small fixed prior breaks ties (so greedy decoding of a role turn is deterministic and
    # not swayed by numerical leaks of the gates), far below the informed margins.
    g = torch.Generator().manual_seed(seed + 1)
    prior_k = PRIOR * torch.randn(len(keys), generator=g, dtype=torch.float64)
    prior_v = PRIOR * torch.randn(len(values), generator=g, dtype=torch.float64)
    H[idx["correct"], lay.VCLS] = K_FORM + PRIOR
    H[idx["wrong"], lay.VCLS] = K_FORM - PRIOR
    H[idx["correct"], lay.VERD] = G_VERD * 2
    H[idx["wrong"], lay.VERD] = -G_VERD * 2
    H[idx["</s>"], lay.EOS] = K_FORM
    H[idx["</s>"], lay.S["correct"]] = K_FORM
    H[idx["</s>"], lay.S["wrong"]] = K_FORM
    for i, w in enumerate(keys):
        H[idx[w], lay.S["lookup"]] = K_CLASS + prior_k[i]
        H[idx[w], list(lay.OUT)] = G_COPY * code[w]
    for i, w in enumerate(values):
        H[idx[w], lay.S["answer"]] = K_CLASS + prior_v[i]
        H[idx[w], list(lay.OUT)] = G_COPY * code[w]
    sd["lm_head.weight"] = H
    return {k: v.float().contiguous() for k, v in sd.items()}, report


def build_compiled_model(seed: int = 0):
    """A ``LlamaForCausalLM`` (fp32) with the compiled weights, and the compile report."""
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=len(vocabulary()), **CONFIG)
    model = transformers.LlamaForCausalLM(cfg)
    sd, report = compile_state_dict(CONFIG, seed)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model.eval(), report
