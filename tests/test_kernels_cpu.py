"""The CPU fast path's dense attention (fused split, masked fallback, matmul) and its per-request workspace, held to
float64 references."""
import pytest
import torch

from lragent.kernels import cpu_native, cpu_sdpa
from lragent.kernels import flash_lora_attention_paged_ref
from lragent.kernels.cpu import Plan, paged_attention_cpu
from lragent.kernels.cpu_workspace import Workspace
from support.kernels import make_paged, to_float64


def dense_ref(q, k, v, scale):
    """softmax(q k^T scale, causal bottom-right) v in float64; q [sq, H, D], k/v [H_kv, n, D]."""
    sq, h, d = q.shape
    n_kv, n = k.shape[:2]
    kk = k.double().repeat_interleave(h // n_kv, 0)
    vv = v.double().repeat_interleave(h // n_kv, 0)
    s = torch.einsum("qhd,hkd->hqk", q.double(), kk) * scale
    s = s.masked_fill(torch.ones(sq, n, dtype=torch.bool).triu(n - sq + 1), float("-inf"))
    return torch.einsum("hqk,hkd->qhd", torch.softmax(s, -1), vv)


@pytest.mark.parametrize("sq,n", [(1, 40), (5, 30), (20, 20), (20, 57), (9, 300), (64, 64), (33, 1000)])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (8, 1)])
@pytest.mark.parametrize("fused", [True, False])
def test_attend_matches_float64(sq, n, heads, fused, monkeypatch):
    if not fused:
        monkeypatch.setattr(cpu_sdpa, "_FLASH", None)     # the public masked-SDPA fallback
    elif not cpu_sdpa.flash_available():
        pytest.skip("this PyTorch build has no CPU flash op")
    g = torch.Generator().manual_seed(sq * 1000 + n)
    h, h_kv = heads
    q = torch.randn(sq, h, 32, generator=g)
    kv = torch.randn(n, 2, h_kv, 32, generator=g)
    k, v = kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)          # strided views, as the engine passes them
    out = cpu_sdpa.attend(q, k, v, 32 ** -0.5)
    assert (out.double() - dense_ref(q, k, v, 32 ** -0.5)).abs().max().item() <= 2e-5


def test_attend_split_path_is_taken():
    """Chunks longer than DECODE_MAX_Q with a prefix run the fused split (else the test above would not cover it)."""
    if not cpu_sdpa.flash_available():
        pytest.skip("this PyTorch build has no CPU flash op")
    calls = []
    real = cpu_sdpa._FLASH
    cpu_sdpa._FLASH = lambda *a, **kw: calls.append(kw.get("is_causal", False)) or real(*a, **kw)
    try:
        cpu_sdpa.attend(torch.randn(12, 4, 16), torch.randn(2, 50, 16), torch.randn(2, 50, 16), 0.25)
    finally:
        cpu_sdpa._FLASH = real
    assert calls == [True, False]                         # diagonal (causal), then the maskless prefix


@pytest.fixture(params=["native", "torch"])
def expansion(request, monkeypatch):
    """Each test using it runs with the native expansion kernel and with torch ops only."""
    if request.param == "native" and not cpu_native.available():
        pytest.skip(f"native kernel unavailable: {cpu_native.unavailable_reason()}")
    if request.param == "torch":
        monkeypatch.setattr(cpu_native, "available", lambda: False)
    return request.param


def rope_tables(n, d, g):
    """cos/sin [n, d] of HF RoPE layout (halves repeat) at random angles."""
    ang = torch.rand(n, d // 2, generator=g, dtype=torch.float64) * 6.3
    return tuple(torch.cat([f(ang)] * 2, 1) for f in (torch.cos, torch.sin))


@pytest.fixture
def native_threads(monkeypatch):
    """Skips without the native kernels; returns a setter of how many threads they split rows (or KV heads) over,
    with a small enough minimum that the test shapes do split."""
    if not cpu_native.available():
        pytest.skip(f"native kernel unavailable: {cpu_native.unavailable_reason()}")
    monkeypatch.setattr(cpu_native, "MIN_ROWS_PER_THREAD", 8)
    return lambda threads: monkeypatch.setattr(torch, "get_num_threads", lambda: threads)


@pytest.mark.parametrize("h_kv,d,q,rope", [(4, 64, 16, True), (2, 128, 5, True), (3, 48, 8, True),
                                           (1, 20, 3, True), (4, 64, 16, False), (2, 40, 7, False)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("through_p,group", [(False, 0), (True, 2), (True, 4)])
def test_native_expand_rows_matches_float64(h_kv, d, q, rope, threads, through_p, group, native_threads):
    """out[t] = src[tok[t]] + RoPE_t(l_t Q) for head dims with and without a vector remainder (48, 20, 40),
    out a strided row view, rows split over threads; l_t = lk[t] of a strided column slice, or (``through_p``)
    the row lk[lk_tok[t]] of a wider low-rank table times P, read in place, with the decode scores of a query
    against the new rows in the same pass (into a column slice of a wider buffer), ``group`` query heads per KV head
    (4: the blocked score path where the vector width allows)."""
    native_threads(threads)
    g = torch.Generator().manual_seed(h_kv * d + q)
    n, w = 300, h_kv * d
    src = torch.randn(500, w, generator=g)
    tok = torch.randperm(500, generator=g)[:n]
    lk = torch.randn(n, q + 4, generator=g)[:, 2:2 + q]                  # row stride q + 4
    qm = torch.randn(q, w, generator=g)
    out = torch.full((n, w + 8), float("nan"))[:, :w]                   # row stride w + 8
    cos, sin = rope_tables(n, d, g)
    rope_args = (cos.float(), sin.float(), d) if rope else (None, None, d)
    if through_p:
        table = torch.randn(700, 3 * q + 2, generator=g)[:, 1:1 + 3 * q]  # a shared rank 3q, strided rows
        lk_tok = torch.randperm(700, generator=g)[:n]
        p = torch.randn(3 * q, q, generator=g)
        query = torch.randn(group * h_kv, d, generator=g)
        scores = torch.full((group * h_kv, n + 10), float("nan"))
        cpu_native.expand_rows(src, tok, table, qm, out, *rope_args, lk_tok=lk_tok, p=p, query=query,
                               scores=scores[:, 10:], scale=0.3)
        lk = table[lk_tok].double() @ p.double()
    else:
        cpu_native.expand_rows(src, tok, lk, qm, out, *rope_args)
    x = (lk.double() @ qm.double()).view(n, h_kv, d)
    if rope:
        c, s_ = cos[:, None], sin[:, None]
        x = x * c + torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1) * s_
    ref = src.double()[tok] + x.view(n, w)
    assert (out.double() - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    if through_p:
        want = torch.einsum("hd,nhd->hn", query.double(), ref.view(n, h_kv, d).repeat_interleave(group, 1)) * 0.3
        assert (scores[:, 10:].double() - want).abs().max().item() <= 1e-4 * want.abs().max().item()
        assert scores[:, :10].isnan().all()
        alone = torch.full((group * h_kv, n), float("nan"))                 # scores only, no rows stored
        assert cpu_native.expand_rows(src, tok, table, qm, None, *rope_args, lk_tok=lk_tok, p=p, query=query,
                                      scores=alone, scale=0.3) is None
        assert (alone.double() - want).abs().max().item() <= 1e-4 * want.abs().max().item()


@pytest.mark.parametrize("h_kv,d", [(4, 64), (2, 128), (3, 48), (1, 20)])
def test_native_expand_rows_half_rope_table(h_kv, d, native_threads):
    """cos/sin rows of D/2 entries (both halves share their angles, as HF RoPE tables do) give exactly what the
    full [n, D] rows give, rows and scores."""
    native_threads(1)
    g = torch.Generator().manual_seed(d)
    n, w, q = 70, h_kv * d, 8
    src, lk, qm = torch.randn(n, w, generator=g), torch.randn(n, q, generator=g), torch.randn(q, w, generator=g)
    tok = torch.arange(n)
    cos, sin = (t.float() for t in rope_tables(n, d, g))
    query = torch.randn(4 * h_kv, d, generator=g)
    outs = []
    for c, s_ in ((cos, sin), (cos[:, :d // 2].contiguous(), sin[:, :d // 2].contiguous())):
        out, scores = torch.empty(n, w), torch.empty(4 * h_kv, n)
        cpu_native.expand_rows(src, tok, lk, qm, out, c, s_, d, query=query, scores=scores, scale=0.5)
        outs.append((out, scores))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("h_kv,d,n", [(4, 64, 301), (2, 128, 64), (3, 48, 37), (1, 20, 9), (2, 40, 50)])
def test_native_expand_rows_streamed_rows_equal_cached_stores(h_kv, d, n, native_threads):
    """``stream=True`` (non-temporal stores, from registers or a row buffer, where the rows are aligned; plain stores
    otherwise) writes exactly the rows and scores plain stores write, into contiguous rows and into an unaligned
    strided view, and touches nothing outside the rows."""
    native_threads(2)
    g = torch.Generator().manual_seed(n + d)
    w, q = h_kv * d, 16
    src, lk, qm = torch.randn(n + 5, w, generator=g), torch.randn(n, q, generator=g), torch.randn(q, w, generator=g)
    tok = torch.randperm(n + 5, generator=g)[:n]
    cos, sin = (t.float()[:, :d // 2].contiguous() for t in rope_tables(n, d, g))
    query = torch.randn(4 * h_kv, d, generator=g)
    got = []
    for stream in (False, True):
        for strided in (False, True):     # rows 1..n of a contiguous buffer; rows of stride w + 3, 1 float in
            buf = torch.full((n + 2, w + 3) if strided else (n + 2, w), float("nan"))
            out = buf[1:n + 1, 1:1 + w] if strided else buf[1:n + 1]
            scores = torch.empty(4 * h_kv, n)
            cpu_native.expand_rows(src, tok, lk, qm, out, cos, sin, d, query=query, scores=scores, scale=0.5,
                                   stream=stream)
            got.append((out.clone(), scores))
            out.fill_(float("nan"))
            assert buf.isnan().all()                  # nothing written outside the rows
    for out, scores in got[1:]:
        assert torch.equal(out, got[0][0]) and torch.equal(scores, got[0][1])


@pytest.mark.parametrize("h,h_kv,d,r", [(16, 4, 64, 48), (8, 2, 128, 16), (6, 2, 40, 5), (3, 1, 20, 0),
                                        (12, 4, 32, 0), (5, 5, 48, 12), (16, 4, 64, 16), (8, 1, 80, 32),
                                        (8, 2, 72, 16)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("indexed", [True, False])
def test_native_decode_attention_matches_float64(h, h_kv, d, r, threads, indexed, native_threads):
    """One query over n cache rows read in place (by index, or rows 0..n-1 of strided views), P L_v alongside
    (L_v rows by their own index):
    groups of 4, 3, 1 query heads per KV head, head dims with and without a vector remainder (40, 20), r not a
    multiple of 8, KV heads split over threads; P L_v inside the P V loop (4 query heads per KV head, r 16 or 32:
    head dims 64, 128, 80 = 64 + 16, 72 = 64 + 8) or beside it; with B_v, the value term (P L_v) B_v added in."""
    native_threads(threads)
    g = torch.Generator().manual_seed(h * d + r)
    n, w = 333, h_kv * d
    q = torch.randn(h, d, generator=g)
    kv = torch.randn(2, 500, w + 8, generator=g)[..., 4:4 + w] * 3         # rows of stride w + 8
    tok = torch.randperm(500, generator=g)[:n] if indexed else None
    lv_all = torch.randn(600, r + 3, generator=g)[:, 1:1 + r]                 # rows of stride r + 3
    lv_tok = torch.randperm(600, generator=g)[:n] if indexed else None
    lv = (lv_all[lv_tok] if indexed else lv_all[:n]) if r else None
    o, pl = cpu_native.decode_attention(q, kv[0], kv[1], n, d ** -0.5, tok, tok, lv_all if r else None,
                                        lv_tok if r else None)
    rows = tok if indexed else torch.arange(n)
    k, v = (t.double()[rows].view(n, h_kv, d).transpose(0, 1) for t in kv)
    ref = dense_ref(q[None], k, v, d ** -0.5)[0]
    assert (o.double() - ref).abs().max().item() <= 2e-5
    if r:
        s = torch.einsum("hd,hnd->hn", q.double(), k.repeat_interleave(h // h_kv, 0)) * d ** -0.5
        pl_ref = torch.softmax(s, -1) @ lv.double()
        assert (pl.double() - pl_ref).abs().max().item() <= 2e-5
        # the value term added in the kernel: B_v a strided view (a block of rows of a taller B, as a block basis)
        bv = torch.randn(h_kv, r + 4, d, generator=g)[:, 2:2 + r]
        o2, _ = cpu_native.decode_attention(q, kv[0], kv[1], n, d ** -0.5, tok, tok, lv_all, lv_tok, bv=bv)
        term = torch.einsum("hr,hrd->hd", pl_ref, bv.double().repeat_interleave(h // h_kv, 0))
        assert (o2.double() - (ref + term)).abs().max().item() <= 2e-5
    else:
        assert pl is None


def test_native_kernel_off_or_unbuildable(monkeypatch, tmp_path):
    """LRAGENT_NATIVE=0, or a compiler that fails, leaves the kernel unavailable with the reason (callers then use
    torch ops); a working build is found again afterwards."""
    monkeypatch.setenv("LRAGENT_CACHE_DIR", str(tmp_path))
    try:
        cpu_native.reset()
        monkeypatch.setenv("LRAGENT_NATIVE", "0")
        assert not cpu_native.available() and cpu_native.unavailable_reason() == "LRAGENT_NATIVE=0"
        cpu_native.reset()
        monkeypatch.delenv("LRAGENT_NATIVE")
        monkeypatch.setenv("CC", "false")
        assert not cpu_native.available() and "false" in cpu_native.unavailable_reason()
        assert not list(tmp_path.iterdir())                              # nothing half-written left
    finally:
        cpu_native.reset()
        monkeypatch.undo()


def steps_of(total, chunks):
    """(start, end) query ranges of a sequence of ``total`` tokens run as prefill chunks then decode steps."""
    out, pos = [], 0
    for c in chunks:
        out.append((pos, pos + c))
        pos += c
    while pos < total:
        out.append((pos, pos + 1))
        pos += 1
    return out


@pytest.mark.parametrize("key_lora", [True, False])
def test_workspace_steps_match_reference(key_lora, expansion):
    """A request run as prefill chunks then decode steps, with a workspace of K' that fills as it goes (and one
    that starts after a reused prefix: a chunk, or a 1-token hand-off), equals the float64 reference at every step
    (values read from
    the cache: V' for a chunk, P V + (P L_v) B_v for a decode step); the workspace is bounded and freed, and holds
    nothing when the keys carry no LoRA (base K is read in place)."""
    n_total, h, h_kv, d, r = 70, 4, 2, 32, 8
    p = make_paged([n_total], [n_total], h, h_kv, d, r, key_lora=key_lora, block_size=8, seed=3)
    q_all = p.pop("q")
    ws = Workspace(num_layers=2, n_kv=h_kv, head_dim=d, max_tokens=700)
    runs = ((7, steps_of(n_total, [16, 24])),
            (8, [(40, 50)] + steps_of(n_total, [50])[1:]),     # a chunk after 40 reused positions never expanded
            (9, [(60, 61)] + steps_of(n_total, [61])[1:]))     # a 1-token hand-off after 60 of them
    for req, steps in runs:
        for start, end in steps:
            q = q_all[start:end]
            kw = dict(p, seq_lens=torch.tensor([end], dtype=torch.int32),
                      cu_seqlens_q=torch.tensor([0, end - start], dtype=torch.int32))
            ref = flash_lora_attention_paged_ref(q.double(), **to_float64(kw))
            plain = paged_attention_cpu(q, **kw)
            plan = Plan(kw["block_table"], kw["seq_lens"], kw["cu_seqlens_q"], kw["agent_ids"],
                        kw.get("lr_block_table"), 8, kw.get("cos"), kw.get("sin"), h_kv, req_ids=[req])
            for layer in (0, 1):
                out = paged_attention_cpu(q, **kw, plan=plan, workspace=ws, layer=layer)
                assert (out.double() - ref).abs().max().item() <= 3e-5
                assert (out - plain).abs().max().item() <= 3e-5
            if key_lora:
                assert ws.filled(req, 1) == end
        assert ws.tokens >= n_total if key_lora else ws.tokens == 0
    assert ws.tokens <= 700
    if not key_lora:
        return
    for req in (7, 8, 9):
        ws.release(req)
    assert ws.running_bytes == 0 and ws.bytes > 0                     # back in the arena
    ws.trim()
    assert ws.tokens == 0 and ws.bytes == 0


def test_workspace_bound_and_arena():
    """Nothing past the bound is held (a request that does not fit gets none); released rows are reused by the next
    request at the same offset (no new memory touched); a request grows in place when the rows after it are free,
    else moves with its rows; trim frees the arena only when nothing runs."""
    ws = Workspace(num_layers=1, n_kv=1, head_dim=4, max_tokens=1000)
    assert ws.bytes == 0 and ws.reserve(1, 100)
    assert ws.reqs[1][:2] == [0, 356] and ws.tokens == 356          # room for its decode: n + 256
    assert not ws.reserve(2, 700) and 2 not in ws.reqs and ws.tokens == 356      # 644 rows left
    ws.release(1)
    assert ws.tokens == 0 and ws.bytes == 356 * ws.row_bytes          # touched rows stay mapped
    assert ws.reserve(3, 40) and ws.reqs[3][0] == 0 and ws.bytes == 356 * ws.row_bytes    # same rows again
    assert ws.reserve(3, 400) and ws.reqs[3][:2] == [0, 592]          # grown in place, doubling
    assert ws.reserve(4, 8) and ws.reqs[4][:2] == [592, 264]
    ws.release(3)
    ws.release(4)
    assert ws.reserve(5, 20) and ws.reqs[5][:2] == [0, 276]
    ws.mark(5, 0, 20)
    ws.rows(5, 0, 0, 20).copy_(torch.arange(80.0).view(20, 1, 4))
    assert ws.reserve(6, 8) and ws.reqs[6][0] == 276                  # right after 5: 5 must move to grow
    assert ws.reserve(5, 300) and ws.reqs[5][:2] == [540, 300]        # no room for 2x: exactly n
    assert torch.equal(ws.rows(5, 0, 0, 20), torch.arange(80.0).view(20, 1, 4))   # its rows moved with it
    assert ws.tokens <= 1000
    ws.trim()
    assert ws.kv is not None                                          # requests still run
    ws.release(5)
    ws.release(6)
    assert ws.free == [[0, 1000]]                                     # ranges merged back
    ws.trim()
    assert ws.kv is None and ws.bytes == 0


def test_low_rank_b_is_factored_and_exact(expansion):
    """B of rank <= r/2 (each role's B in an exact shared basis of several roles) is applied as (L P) Q, with the
    reference's output."""
    from lragent.kernels.cpu import factor, prepare_b
    h, h_kv, d, r = 4, 2, 32, 8
    p = make_paged([40], [12], h, h_kv, d, r, key_lora=True, block_size=8, seed=5)
    g = torch.Generator().manual_seed(0)
    for name in ("b_k", "b_v"):
        n_ag = p[name].shape[0]
        low = torch.randn(n_ag, r, 3, generator=g) @ torch.randn(n_ag, 3, h_kv * d, generator=g) * 0.2
        p[name] = low.view(n_ag, r, h_kv, d).permute(0, 2, 1, 3).contiguous()
    prep = prepare_b(p["b_k"], p["b_v"])
    assert all(pq[0] is not None and pq[0].shape[1] == 3 for pq in prep["k_f"] + prep["v_f"])
    assert factor(torch.randn(8, 64, generator=g))[0] is None          # full rank stays one matmul
    ref = flash_lora_attention_paged_ref(**to_float64(p))
    out = paged_attention_cpu(**p)
    assert (out.double() - ref).abs().max().item() <= 3e-5
