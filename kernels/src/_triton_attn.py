"""Triton kernels for Flash-LoRA-Attention (dense, paged/varlen, split-K decode).

One program owns BLOCK_M query rows of one sequence ``b`` and one KV head ``kvh``. The rows pack the G = H / H_kv
query heads that share the KV head (GQA/MQA): row ``m`` is query token ``m // G`` of head ``kvh * G + m % G``. For
each KV tile of BLOCK_N keys the program computes, with exp2-based online softmax (scores pre-scaled by
``scale * log2(e)``):

    K'   = K_base + RoPE(L_k B_k)              (optional; L_k B_k expanded in registers, HF rotate_half convention:
                                              RoPE(x) = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1],
                                              and rotate_half(L B) = L rotate_half(B), so B_k is rotated once)
    S    = Q K'^T * scale * log2(e)            (causal mask bottom-right: query i sees keys j <= Sk - Sq + i)
    m'   = max(m, rowmax S);  a = 2^(m - m');  P = 2^(S - m')
    l    = a l + rowsum P
    acc  = a acc + P V_base                    (D wide)
    accL = a accL + P L_v                      (r wide: the second accumulator, same rescale a)

and at the end O = (acc + accL B_v) / l: B_v is applied once per output tile (per split in split-K decode, where
each split also returns its log2-sum-exp; the combine is unchanged because the LoRA term is linear in P).

Dense tensors are addressed as one "block" per sequence (PAGED=False); paged caches go through a block table
(PAGED=True, block size PAGE / LR_PAGE for the base and low-rank caches). Query/output rows are either dense
([B, H, Sq, D] via strides, VARLEN=False) or varlen-packed ([total_q, H, D] with cu_seqlens, VARLEN=True).
The last dimension of every tensor must be contiguous.
"""
import triton
import triton.language as tl


@triton.jit
def _kv_tile(acc, acc_lr, m_i, l_i, qa, qb, bk1, bk2, start_n, q_pos, hi,
             k_base, v_base, s_kb, s_kt, s_vb, s_vt, bt_row,
             lrv_base, s_lvb, s_lvt, lrk_base, s_lkb, s_lkt, lbt_row, cos_ptr, sin_ptr, s_cs, qk_scale,
             R: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, R_PAD: tl.constexpr,
             BLOCK_N: tl.constexpr, PAGE: tl.constexpr, LR_PAGE: tl.constexpr, PAGED: tl.constexpr,
             HAS_LR_V: tl.constexpr, HAS_LR_K: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
             DOT_PREC: tl.constexpr):
    """Fold keys [start_n, start_n + BLOCK_N) into the running state. MASKED tiles check j < hi and causality.

    Without key LoRA ``qa`` is the whole query tile. With key LoRA, ``qa``/``qb`` are its two head-dim halves and
    ``bk1``/``bk2`` the halves of B_k: with U = L_k B_k = [U1, U2] the rotated term is
    RoPE(U) = [U1 c1 - U2 s1, U2 c2 + U1 s2] (c, s: halves of the cos/sin rows), so S = qa K1'^T + qb K2'^T.
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    r_ok = offs_r < R
    n_ok = offs_n < hi
    if PAGED:
        phys = tl.load(bt_row + offs_n // PAGE, mask=n_ok, other=0).to(tl.int64)
        k_row = k_base + (phys * s_kb + (offs_n % PAGE) * s_kt)[:, None]
        v_row = v_base + (phys * s_vb + (offs_n % PAGE) * s_vt)[:, None]
    else:
        k_row = k_base + (offs_n.to(tl.int64) * s_kt)[:, None]
        v_row = v_base + (offs_n.to(tl.int64) * s_vt)[:, None]
    if HAS_LR_V or HAS_LR_K:
        if PAGED:
            lphys = tl.load(lbt_row + offs_n // LR_PAGE, mask=n_ok, other=0).to(tl.int64)
            l_off = lphys * s_lvb + (offs_n % LR_PAGE) * s_lvt
            lk_off = lphys * s_lkb + (offs_n % LR_PAGE) * s_lkt
        else:
            l_off = offs_n.to(tl.int64) * s_lvt
            lk_off = offs_n.to(tl.int64) * s_lkt
        nr_mask = n_ok[:, None] & r_ok[None, :] if MASKED else r_ok[None, :]
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    nd_mask = n_ok[:, None] & d_ok[None, :] if MASKED else d_ok[None, :]
    if HAS_LR_K:
        HALF: tl.constexpr = HEAD_DIM // 2
        offs_h = tl.arange(0, BLOCK_D // 2)
        h_ok = offs_h < HALF
        nh_mask = n_ok[:, None] & h_ok[None, :] if MASKED else h_ok[None, :]
        lk = tl.load(lrk_base + lk_off[:, None] + offs_r[None, :], mask=nr_mask, other=0.0)
        u1 = tl.dot(lk, bk1, input_precision=DOT_PREC)
        u2 = tl.dot(lk, bk2, input_precision=DOT_PREC)
        cs_row = (offs_n * s_cs)[:, None] + offs_h[None, :]
        k1 = tl.load(k_row + offs_h[None, :], mask=nh_mask, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + cs_row, mask=nh_mask, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + cs_row, mask=nh_mask, other=0.0).to(tl.float32)
        k1 = (k1 + u1 * c - u2 * s).to(qa.dtype)
        k2 = tl.load(k_row + HALF + offs_h[None, :], mask=nh_mask, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + HALF + cs_row, mask=nh_mask, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + HALF + cs_row, mask=nh_mask, other=0.0).to(tl.float32)
        k2 = (k2 + u2 * c + u1 * s).to(qa.dtype)
        qk = tl.dot(qa, tl.trans(k1), input_precision=DOT_PREC)
        qk = tl.dot(qb, tl.trans(k2), qk, input_precision=DOT_PREC) * qk_scale
    else:
        k = tl.load(k_row + offs_d[None, :], mask=nd_mask, other=0.0)
        qk = tl.dot(qa, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if MASKED:
        keep = n_ok[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= q_pos[:, None])
        qk = tl.where(keep, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_sub = m_new
    if MASKED:  # a row that has seen no key yet keeps m = -inf; subtract 0 so that P = 0 instead of NaN
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_sub)
    p = tl.math.exp2(qk - m_sub[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_row + offs_d[None, :], mask=nd_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    if HAS_LR_V:
        lv = tl.load(lrv_base + l_off[:, None] + offs_r[None, :], mask=nr_mask, other=0.0)
        acc_lr = acc_lr * alpha[:, None] + tl.dot(p.to(lv.dtype), lv, input_precision=DOT_PREC)
    return acc, acc_lr, m_new, l_i


@triton.jit
def flash_lora_fwd_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, lrv_ptr, bv_ptr, lrk_ptr, bk_ptr, cos_ptr, sin_ptr,
        aid_ptr, bt_ptr, lbt_ptr, cuq_ptr, seqlen_ptr, part_o_ptr, part_lse_ptr,
        s_qb, s_qt, s_qh, s_ob, s_ot, s_oh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
        s_lvb, s_lvt, s_lkb, s_lkt, s_bvn, s_bvh, s_bvr, s_bkn, s_bkh, s_bkr, s_cs, s_bt, s_lbt,
        Sq, Sk, H_KV, qk_scale, split_len, NUM_SPLITS, MQ_BUCKET, SK_BUCKET,
        R: tl.constexpr, G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, R_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, LR_PAGE: tl.constexpr,
        PAGED: tl.constexpr, VARLEN: tl.constexpr, SPLIT: tl.constexpr, HAS_LR_V: tl.constexpr,
        HAS_LR_K: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr):
    """Grid (m-blocks, B * H_kv, splits). SPLIT=False writes O; SPLIT=True writes per-split O and log2-sum-exp.

    MQ_BUCKET / SK_BUCKET are unused in the body: they only key the autotuner on the size class of the problem.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // H_KV
    kvh = pid_bh % H_KV
    if VARLEN:  # index tensors may be int32 or int64; positions are int32 inside
        q_start = tl.load(cuq_ptr + b).to(tl.int32)
        q_len = tl.load(cuq_ptr + b + 1).to(tl.int32) - q_start
        seq_len = tl.load(seqlen_ptr + b).to(tl.int32)
    else:
        q_start = 0
        q_len = Sq
        seq_len = Sk
    m0 = pid_m * BLOCK_M
    if m0 < q_len * G:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_r = tl.arange(0, R_PAD)
        d_ok = offs_d < HEAD_DIM
        tok = offs_m // G
        head = kvh * G + offs_m % G
        row_ok = tok < q_len
        q_pos = seq_len - q_len + tok
        q_row = q_ptr + (b.to(tl.int64) * s_qb + (q_start + tok).to(tl.int64) * s_qt + head * s_qh)[:, None]

        if PAGED:
            k_base = k_ptr + kvh * s_kh
            v_base = v_ptr + kvh * s_vh
            lrv_base = lrv_ptr
            lrk_base = lrk_ptr
        else:
            k_base = k_ptr + b.to(tl.int64) * s_kb + kvh * s_kh
            v_base = v_ptr + b.to(tl.int64) * s_vb + kvh * s_vh
            lrv_base = lrv_ptr + b.to(tl.int64) * s_lvb
            lrk_base = lrk_ptr + b.to(tl.int64) * s_lkb
        bt_row = bt_ptr + b.to(tl.int64) * s_bt
        lbt_row = lbt_ptr + b.to(tl.int64) * s_lbt
        if HAS_LR_V or HAS_LR_K:
            aid = tl.load(aid_ptr + b).to(tl.int64)
        else:
            aid = 0
        if HAS_LR_K:  # query and B_k split in head-dim halves (see _kv_tile); B_k stays in registers
            HALF: tl.constexpr = HEAD_DIM // 2
            offs_h = tl.arange(0, BLOCK_D // 2)
            h_ok = offs_h < HALF
            qa = tl.load(q_row + offs_h[None, :], mask=row_ok[:, None] & h_ok[None, :], other=0.0)
            qb = tl.load(q_row + HALF + offs_h[None, :], mask=row_ok[:, None] & h_ok[None, :], other=0.0)
            bk_row = bk_ptr + aid * s_bkn + kvh * s_bkh + offs_r[:, None] * s_bkr
            rh_mask = (offs_r < R)[:, None] & h_ok[None, :]
            bk1 = tl.load(bk_row + offs_h[None, :], mask=rh_mask, other=0.0).to(qa.dtype)
            bk2 = tl.load(bk_row + HALF + offs_h[None, :], mask=rh_mask, other=0.0).to(qa.dtype)
        else:
            qa = tl.load(q_row + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            qb = qa
            bk1 = qa
            bk2 = qa

        # Key range of this program: [lo, hi); keys below `full` are visible to every row (no mask needed).
        hi = seq_len
        full = seq_len
        if CAUSAL:
            last_tok = tl.minimum((m0 + BLOCK_M - 1) // G, q_len - 1)
            hi = tl.minimum(seq_len, seq_len - q_len + last_tok + 1)
            full = seq_len - q_len + m0 // G + 1
        lo = 0
        if SPLIT:
            lo = split * split_len
            hi = tl.minimum(hi, lo + split_len)
        full = tl.minimum(full, hi)
        mid = lo + tl.maximum(full - lo, 0) // BLOCK_N * BLOCK_N

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        acc_lr = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
        for start_n in range(lo, mid, BLOCK_N):
            acc, acc_lr, m_i, l_i = _kv_tile(
                acc, acc_lr, m_i, l_i, qa, qb, bk1, bk2, start_n, q_pos, hi, k_base, v_base, s_kb, s_kt, s_vb, s_vt,
                bt_row, lrv_base, s_lvb, s_lvt, lrk_base, s_lkb, s_lkt, lbt_row, cos_ptr, sin_ptr, s_cs,
                qk_scale, R, HEAD_DIM, BLOCK_D, R_PAD, BLOCK_N, PAGE, LR_PAGE, PAGED, HAS_LR_V, HAS_LR_K,
                False, CAUSAL, DOT_PREC)
        for start_n in range(mid, hi, BLOCK_N):
            acc, acc_lr, m_i, l_i = _kv_tile(
                acc, acc_lr, m_i, l_i, qa, qb, bk1, bk2, start_n, q_pos, hi, k_base, v_base, s_kb, s_kt, s_vb, s_vt,
                bt_row, lrv_base, s_lvb, s_lvt, lrk_base, s_lkb, s_lkt, lbt_row, cos_ptr, sin_ptr, s_cs,
                qk_scale, R, HEAD_DIM, BLOCK_D, R_PAD, BLOCK_N, PAGE, LR_PAGE, PAGED, HAS_LR_V, HAS_LR_K,
                True, CAUSAL, DOT_PREC)

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        if HAS_LR_V:  # O += (P L_v / l) B_v, once per output tile; 16-bit operands (like P V) for 16-bit inputs
            bv_off = aid * s_bvn + kvh * s_bvh + offs_r[:, None] * s_bvr + offs_d[None, :]
            bv = tl.load(bv_ptr + bv_off, mask=(offs_r < R)[:, None] & d_ok[None, :], other=0.0)
            pl = acc_lr / l_safe[:, None]
            out += tl.dot(pl.to(qa.dtype), bv.to(qa.dtype), input_precision=DOT_PREC)
        if SPLIT:
            part = ((pid_m * tl.num_programs(1) + pid_bh) * NUM_SPLITS + split).to(tl.int64) * BLOCK_M
            rows = part + tl.arange(0, BLOCK_M)
            tl.store(part_o_ptr + rows[:, None] * BLOCK_D + offs_d[None, :], out)
            tl.store(part_lse_ptr + rows, tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe)))
        else:
            o_off = b.to(tl.int64) * s_ob + (q_start + tok).to(tl.int64) * s_ot + head * s_oh
            tl.store(o_ptr + o_off[:, None] + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def flash_lora_combine_kernel(
        o_ptr, part_o_ptr, part_lse_ptr, cuq_ptr, s_ob, s_ot, s_oh, Sq, H_KV, NUM_SPLITS,
        G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        VARLEN: tl.constexpr):
    """O = sum_s 2^(lse_s - lse_max) O_s / sum_s 2^(lse_s - lse_max) over the splits of one output tile."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_KV
    kvh = pid_bh % H_KV
    if VARLEN:
        q_start = tl.load(cuq_ptr + b).to(tl.int32)
        q_len = tl.load(cuq_ptr + b + 1).to(tl.int32) - q_start
    else:
        q_start = 0
        q_len = Sq
    m0 = pid_m * BLOCK_M
    if m0 < q_len * G:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        base = (pid_m * tl.num_programs(1) + pid_bh).to(tl.int64) * NUM_SPLITS * BLOCK_M + tl.arange(0, BLOCK_M)
        lse_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        for s in range(0, NUM_SPLITS):
            lse_max = tl.maximum(lse_max, tl.load(part_lse_ptr + base + s * BLOCK_M))
        lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
        den = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for s in range(0, NUM_SPLITS):
            w = tl.math.exp2(tl.load(part_lse_ptr + base + s * BLOCK_M) - lse_max)
            o_s = tl.load(part_o_ptr + (base + s * BLOCK_M)[:, None] * BLOCK_D + offs_d[None, :])
            acc += w[:, None] * o_s
            den += w
        out = acc / tl.where(den == 0.0, 1.0, den)[:, None]
        tok = offs_m // G
        head = kvh * G + offs_m % G
        o_off = b.to(tl.int64) * s_ob + (q_start + tok).to(tl.int64) * s_ot + head * s_oh
        tl.store(o_ptr + o_off[:, None] + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=(tok < q_len)[:, None] & (offs_d < HEAD_DIM)[None, :])
