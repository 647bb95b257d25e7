"""Backend "torch": the PyTorch implementations, on any device.

They compute in float32 and round at the same points as the modules they replace (Hugging
Face's LlamaRMSNorm, the unfused residual add, silu(gate) * up), so every backend agrees
with them to within one rounding of the output dtype. Signatures are the registry's: the
Triton launchers in ``llama_fast.kernels`` take and return the same things.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from llama_fast import _alloc

F32 = torch.float32


def _rms_stats(h: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    hf = h.to(F32)
    rstd = torch.rsqrt(hf.square().mean(-1, keepdim=True) + eps)
    return hf * rstd, rstd


def rms_norm_fwd(x, residual, weight, eps):
    """y = rms_norm(x [+ residual]); returns (y, h) where h = x + residual (None without one).

    The sum is rounded to x.dtype before normalising, as the unfused sequence does; the
    normalised value is rounded to the input dtype before the weight multiplies it
    (LlamaRMSNorm); y has the promoted dtype of input and weight.
    """
    h = x if residual is None else x + residual
    xhat, _ = _rms_stats(h, eps)
    out_dtype = torch.promote_types(h.dtype, weight.dtype)
    y = (xhat.to(h.dtype).to(F32) * weight.to(F32)).to(out_dtype)
    return y, (None if residual is None else h)


def rms_norm_bwd(dy, dh, h, weight, eps):
    """Gradients of y = rms_norm(h) * weight: (dh_total, dweight); dh_total includes ``dh``."""
    n = h.shape[-1]
    xhat, rstd = _rms_stats(h, eps)
    g = dy.to(F32) * weight.to(F32)
    dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    if dh is not None:
        dx = dx + dh.to(F32)
    xhat_rounded = xhat.to(h.dtype).to(F32)
    dw = (dy.to(F32) * xhat_rounded).reshape(-1, n).sum(0)
    return dx.to(h.dtype), dw.to(weight.dtype)


def rope_fwd(q, k, cos, sin, interleaved, inverse):
    """Rotate q (B, S, Hq, D) and k (B, S, Hkv, D) by cos/sin ((S, D/2) or (B, S, D/2)).

    ``inverse`` rotates by -angle (the backward pass). Outputs keep the inputs' strides.
    """
    c = cos.to(F32)
    s = sin.to(F32)
    if c.dim() == 2:
        c, s = c[None], s[None]
    c, s = c[:, :, None, :], s[:, :, None, :]
    if inverse:
        s = -s

    def rotate(x):
        xf = x.to(F32)
        if interleaved:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
        else:
            x1, x2 = xf.chunk(2, dim=-1)
        o1 = x1 * c - x2 * s
        o2 = x2 * c + x1 * s
        rotated = torch.stack((o1, o2), dim=-1).flatten(-2) if interleaved else torch.cat((o1, o2), dim=-1)
        return _alloc.empty_like(x).copy_(rotated)

    return rotate(q), rotate(k)


def _silu_parts(gate):
    gf = gate.to(F32)
    sig = torch.sigmoid(gf)
    return gf, sig, gf * sig


def swiglu_fwd(gate, up):
    """silu(gate) * up, with silu(gate) rounded to the input dtype first (as in eager)."""
    _, _, silu = _silu_parts(gate)
    out = silu.to(gate.dtype).to(F32) * up.to(F32)
    return out.to(gate.dtype).contiguous()


def swiglu_bwd(dy, gate, up, dgate, dup):
    """Write d(gate) and d(up) of silu(gate) * up into ``dgate`` and ``dup``."""
    gf, sig, silu = _silu_parts(gate)
    dyf = dy.to(F32)
    dup.copy_(dyf * silu.to(gate.dtype).to(F32))
    dgate.copy_(dyf * up.to(F32) * sig * (1.0 + gf * (1.0 - sig)))


# ---------------------------------------------------------------------------------------
# Attention. Explicit float32 math, one query chunk at a time so memory stays bounded
# (CHUNK_SCORES scores at once), written as the kernels compute it: scores, log-sum-exp,
# then the output; the backward from the saved log-sum-exp, FlashAttention-style.

CHUNK_SCORES = 2**25


def _scores(q, k, i0, sk, sq, causal, scale):
    """Scaled scores (H, C, Sk) of queries i0.. against all keys, -inf where masked.
    Causal masks are aligned bottom-right: query i sees keys j <= i + Sk - Sq."""
    s = torch.einsum("hqd,hkd->hqk", q, k) * scale
    if causal:
        rows = torch.arange(i0, i0 + q.shape[1], device=q.device)[:, None]
        cols = torch.arange(sk, device=q.device)[None, :]
        s = s.masked_fill(cols > rows + (sk - sq), float("-inf"))
    return s


def _probs(s, lse):
    # Rows with no visible key have lse = -inf: their probabilities are 0, not NaN.
    return torch.exp(s - lse[..., None]).nan_to_num(0.0)


def _heads_first(x, repeat=1):
    """(S, H, D) -> float32 (H * repeat, S, D), each head repeated for its query group."""
    return x.to(F32).transpose(0, 1).repeat_interleave(repeat, dim=0)


def _chunks(h, sq, sk):
    step = max(1, CHUNK_SCORES // max(1, h * sk))
    return range(0, sq, step), step


def _attn_one(q, k, v, causal, scale):
    """One sequence: q (Sq, Hq, D), k/v (Sk, Hkv, D) -> out (Sq, Hq, D), lse (Hq, Sq)."""
    sq, hq, _ = q.shape
    sk, hkv, _ = k.shape
    qf, kf, vf = _heads_first(q), _heads_first(k, hq // hkv), _heads_first(v, hq // hkv)
    out = torch.empty(hq, sq, v.shape[-1], dtype=F32, device=q.device)
    lse = torch.empty(hq, sq, dtype=F32, device=q.device)
    starts, step = _chunks(hq, sq, sk)
    for i0 in starts:
        s = _scores(qf[:, i0 : i0 + step], kf, i0, sk, sq, causal, scale)
        lse[:, i0 : i0 + step] = torch.logsumexp(s, dim=-1)
        out[:, i0 : i0 + step] = _probs(s, lse[:, i0 : i0 + step]) @ vf
    return out.transpose(0, 1).to(q.dtype), lse


def _attn_one_bwd(do, q, k, v, o, lse, causal, scale):
    """Gradients of one sequence from the saved output and log-sum-exp."""
    sq, hq, _ = q.shape
    sk, hkv, _ = k.shape
    group = hq // hkv
    qf, kf, vf = _heads_first(q), _heads_first(k, group), _heads_first(v, group)
    dof, of = _heads_first(do), _heads_first(o)
    delta = (dof * of).sum(-1)  # rowsum(dO * O) = rowsum(P * dP)
    dq = torch.empty_like(qf)
    dk = torch.zeros_like(kf)
    dv = torch.zeros_like(vf)
    starts, step = _chunks(hq, sq, sk)
    for i0 in starts:
        rows = slice(i0, i0 + step)
        p = _probs(_scores(qf[:, rows], kf, i0, sk, sq, causal, scale), lse[:, rows])
        dv += p.transpose(1, 2) @ dof[:, rows]
        ds = p * (dof[:, rows] @ vf.transpose(1, 2) - delta[:, rows, None])
        dq[:, rows] = ds @ kf * scale
        dk += ds.transpose(1, 2) @ qf[:, rows] * scale

    def back(x, like):  # (H * group, S, D) -> (S, H, D), summing each query group
        return x.view(hkv, group, *x.shape[1:]).sum(1).transpose(0, 1).to(like.dtype)

    return dq.transpose(0, 1).to(q.dtype), back(dk, k), back(dv, v)


def attn_fwd(q, k, v, causal, scale):
    """q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, Hq, D), lse (B, Hq, Sq) float32."""
    outs = [_attn_one(q[b], k[b], v[b], causal, scale) for b in range(q.shape[0])]
    if not outs:
        return _alloc.empty(q.shape, q.dtype, q.device), torch.empty(0, q.shape[2], q.shape[1], device=q.device)
    return torch.stack([o for o, _ in outs]), torch.stack([lse for _, lse in outs])


def attn_bwd(do, q, k, v, o, lse, causal, scale):
    grads = [_attn_one_bwd(do[b], q[b], k[b], v[b], o[b], lse[b], causal, scale) for b in range(q.shape[0])]
    if not grads:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    return tuple(torch.stack(g) for g in zip(*grads))


def _segments(cu_q, cu_k):
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    return [(slice(bounds_q[i], bounds_q[i + 1]), slice(bounds_k[i], bounds_k[i + 1])) for i in range(len(bounds_q) - 1)]


def attn_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    """Packed q (Tq, Hq, D), k/v (Tk, Hkv, D) -> out (Tq, Hq, D), lse (Hq, Tq)."""
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=F32, device=q.device)
    for rq, rk in _segments(cu_q, cu_k):
        out[rq], lse[:, rq] = _attn_one(q[rq], k[rk], v[rk], causal, scale)
    return out, lse


def attn_varlen_bwd(do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for rq, rk in _segments(cu_q, cu_k):
        dq[rq], dk[rk], dv[rk] = _attn_one_bwd(do[rq], q[rq], k[rk], v[rk], o[rq], lse[:, rq], causal, scale)
    return dq, dk, dv


def decode(q, k_cache, v_cache, cache_seqlens, scale, num_splits):
    """q (B, Sq, Hq, D): the last Sq of each sequence's cache_seqlens[b] valid cache entries,
    attending causally (bottom-right) to them. ``num_splits`` only matters to kernels."""
    lengths = cache_seqlens.clamp(0, k_cache.shape[1]).tolist()
    out = [_attn_one(q[b], k_cache[b, :n], v_cache[b, :n], True, scale)[0] for b, n in enumerate(lengths)]
    return torch.stack(out) if out else _alloc.empty(q.shape, q.dtype, q.device)


# ---------------------------------------------------------------------------------------
# Fused linear cross-entropy. The tokens are walked in chunks: a chunk's logits come from
# one matmul (float32 accumulation, rounded to the input dtype as F.linear rounds them),
# the per-chunk step turns them, in place, into the loss and d loss / d logits (float32
# softmax), and the two gradient matmuls consume that buffer before the next chunk reuses
# it. The Triton backend runs this same loop with its kernel as the per-chunk step.

# Chunk rows: about as many logits as hidden has values (N * H / V tokens), so the chunk
# costs about what hidden costs; but at least MIN_CHUNK_ROWS, because every chunk reads
# the weight twice and the float32 weight-gradient accumulator twice (12 V*H bytes for
# 16-bit weights), which a thinner matmul cannot hide behind its arithmetic on a GPU.
MIN_CHUNK_ROWS = 1024


def linear_ce_chunk_rows(tokens: int, hidden: int, vocab: int) -> int:
    """The default chunk size (tokens per chunk) of the fused linear cross-entropy."""
    rows = 1 << max(0, (-(-tokens * hidden // max(1, vocab)) - 1).bit_length())  # next power of two
    return max(1, min(tokens, max(MIN_CHUNK_ROWS, rows)))


def cross_entropy_chunk(logits, target, scale, ignore_index, label_smoothing, compute_grad):
    """Per-row cross-entropy of ``logits`` (rows, V) against ``target`` (rows,): returns the
    float32 ``(loss, lse)``; with ``compute_grad`` the logits are overwritten with
    ``scale * d loss / d logits`` (``scale``: float32, one element or one per row), zero
    rows for ignored tokens. PyTorch's label smoothing: ``(1 - eps) * nll + eps * mean_v(-log p_v)``.
    A target outside [0, V) that is not ignore_index gives a NaN loss."""
    v = logits.shape[1]
    z = logits.to(F32)  # the logits themselves when they are float32 (a scratch buffer: reused in place)
    ignored = target == ignore_index
    in_range = (target >= 0) & (target < v)
    z_y = z.gather(1, target.clamp(0, v - 1)[:, None])[:, 0]
    z_y = torch.where(in_range | ignored, z_y, float("nan"))
    z_mean = z.sum(1) / v if label_smoothing else None
    # exp(z - max) in place, so the step needs no temporary of the chunk's size; divided by
    # its row sum it is the softmax, the start of the gradient.
    m = z.amax(1)
    p = z.sub_(m[:, None]).exp_()
    s = p.sum(1)
    lse = m + s.log()
    loss = lse - z_y
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - z_mean)
    loss = torch.where(ignored, 0.0, loss)
    if compute_grad:
        row_scale = scale.expand(target.shape) if scale.numel() == 1 else scale
        row_scale = torch.where(ignored, 0.0, row_scale)  # not 0 * inf: "mean" of no tokens scales by inf
        g = p.div_(s[:, None])
        if label_smoothing:
            g.sub_(label_smoothing / v)
        rows = torch.arange(g.shape[0], device=g.device)
        hit = in_range & ~ignored
        g[rows[hit], target[hit]] -= 1.0 - label_smoothing
        g.mul_(row_scale[:, None])
        if g.data_ptr() != logits.data_ptr():
            logits.copy_(g)
    return loss, lse


# The weight gradient of the fused cross-entropy is a sum over chunks of tokens. Summed in
# float32 it is rounded to a 16-bit weight's dtype once, at the end: the error of one
# unfused matmul, at the cost of a float32 (V, H) buffer (V * H * 4 bytes: 2.1 GB at
# V = 128256, H = 4096). Summed in the weight's dtype, each chunk's product is still
# computed in float32 (cuBLAS with beta = 1, and the CPU's 16-bit matmul, add it to the
# 16-bit sum in float32 and round once) but the sum is rounded once per chunk, so its error
# grows with the chunk count, about as sqrt(chunks). Measured on the CPU against float64
# (bf16 inputs; relative Frobenius error of the weight gradient; float32 sum = 1.0x):
#   the op end to end (8192 tokens, H 256, V 2048; 2.14e-3 with the float32 sum):
#     2 chunks 1.14x, 4: 1.37x, 8: 1.75x, 16: 2.33x, 32: 3.19x, 64: 4.41x;
#   the sum alone (random bf16 products, H 256, V 512; 1.66e-3 with the float32 sum):
#     2 chunks 1.22x, 4: 1.58x, 8: 2.13x, 16: 2.9x, 32: 4.1x, 64: 5.7x.
# "auto" therefore sums in the weight's dtype up to WEIGHT_DTYPE_MAX_CHUNKS chunks (the op's
# error within 2x of the float32 sum's; Llama-3-8B's 8192 tokens per step are 8 chunks of the
# default 1024) and in float32 beyond; "float32" and "weight_dtype" force one.
GRAD_ACCUMULATIONS = ("auto", "float32", "weight_dtype")
WEIGHT_DTYPE_MAX_CHUNKS = 8


def weight_grad_accumulator(weight, chunks: int, grad_accumulation: str):
    """The (V, H) buffer the weight gradient is summed in: the weight's dtype for one chunk,
    a float32 weight, "weight_dtype", or "auto" with at most WEIGHT_DTYPE_MAX_CHUNKS chunks;
    float32 otherwise."""
    in_weight_dtype = (chunks <= 1 or weight.dtype == F32 or grad_accumulation == "weight_dtype"
                       or (grad_accumulation == "auto" and chunks <= WEIGHT_DTYPE_MAX_CHUNKS))
    return _alloc.empty(tuple(weight.shape), weight.dtype if in_weight_dtype else F32, weight.device)


def accumulate_weight_grad(acc, a, b, first):
    """``acc (+)= a @ b`` for ``a``, ``b`` in the inputs' dtype and ``acc`` in theirs or float32.
    In the inputs' dtype the product is computed in float32 and added to acc with one rounding
    (cuBLAS's beta = 1; the CPU's 16-bit matmul too)."""
    if acc.dtype == a.dtype:
        torch.mm(a, b, out=acc) if first else acc.addmm_(a, b)
    elif acc.is_cuda and _FLOAT32_OUT_MATMUL[0]:
        # cuBLAS writes / adds into float32 directly (torch >= 2.8): no temporary. Should a
        # build refuse it, the fallback below serves from then on.
        try:
            torch.mm(a, b, out_dtype=F32, out=acc) if first else torch.addmm(acc, a, b, out_dtype=F32, out=acc)
            return
        except (RuntimeError, TypeError):
            _FLOAT32_OUT_MATMUL[0] = False
    if acc.dtype != a.dtype:
        # No float32-output matmul of 16-bit inputs (the CPU): the product of float32 copies,
        # a temporary of acc's size, so the sum is what cuBLAS's float32 output gives.
        product = torch.mm(a.to(F32), b.to(F32))
        acc.copy_(product) if first else acc.add_(product)


_FLOAT32_OUT_MATMUL = [True]


def linear_cross_entropy(hidden, weight, target, bias, ignore_index, label_smoothing, reduction, chunk_size,
                         grads, row_scale, grad_accumulation="auto", chunk_fn=cross_entropy_chunk):
    """Registry entry "linear_cross_entropy" (torch): ``F.cross_entropy(F.linear(hidden,
    weight, bias), target, ...)`` for ``hidden`` (N, H) and ``target`` (N,), chunk by chunk.

    Returns ``(loss, grad_hidden, grad_weight, grad_bias)``. ``loss`` is float32: a scalar
    for "mean" and "sum", per token for "none". ``grads`` says which gradients to compute,
    each scaled by the reduction ("mean": 1 / non-ignored tokens) or, when ``row_scale``
    (float32 (N,)) is given, by one factor per token (the backward of "none"); a gradient
    not asked for comes back empty. Gradients are in their tensors' dtypes; the bias gradient
    is summed over chunks in float32, the weight gradient as ``grad_accumulation`` says
    (``weight_grad_accumulator``).

    Extra memory: one chunk's logits, ``chunk_size * V`` in the input dtype (the per-chunk
    step of this backend adds a float32 copy for 16-bit inputs), plus, for 16-bit weights
    and more than one chunk, the float32 bias sum (V) and, when the weight gradient is summed
    in float32, its float32 sum (V * H)."""
    n, h = hidden.shape
    v = weight.shape[0]
    want_h, want_w, want_b = grads
    want_b = want_b and bias is not None
    chunk = max(1, min(n, chunk_size or linear_ce_chunk_rows(n, h, v)))
    dev = hidden.device
    compute_grad = want_h or want_w or want_b
    scale, losses, gh, gw, gb = linear_ce_outputs(hidden, weight, target, ignore_index, reduction, row_scale,
                                                  (want_h, want_w, want_b), chunk, grad_accumulation)
    buf = _alloc.empty((chunk, v), hidden.dtype, dev) if n else None
    for i0 in range(0, n, chunk):
        x = hidden[i0 : i0 + chunk]
        logits = _chunk_logits(buf, x, weight, bias)
        chunk_scale = scale if scale.numel() == 1 else scale[i0 : i0 + chunk]
        loss, _ = chunk_fn(logits, target[i0 : i0 + chunk], chunk_scale, ignore_index, label_smoothing, compute_grad)
        losses[i0 : i0 + chunk] = loss
        _add_chunk_grads(logits, x, weight, i0, gh, gw, gb, (want_h, want_w, want_b))
    del buf
    return linear_ce_result(losses, scale, gh, gw, gb, weight, bias, reduction, row_scale)


def _chunk_logits(buf, x, weight, bias):
    """The chunk's logits ``x @ weight.T (+ bias)``, written into the reused buffer."""
    logits = buf[: x.shape[0]]
    if bias is None:
        return torch.mm(x, weight.t(), out=logits)
    return torch.addmm(bias, x, weight.t(), out=logits)


def _add_chunk_grads(dlogits, x, weight, i0, gh, gw, gb, grads) -> None:
    """The chunk's share of the gradients from its logits' gradient: its rows of the hidden
    states' (written), the weight's and the bias's (summed over the chunks)."""
    want_h, want_w, want_b = grads
    if want_h:
        torch.mm(dlogits, weight, out=gh[i0 : i0 + x.shape[0]])
    if want_w:
        accumulate_weight_grad(gw, dlogits.t(), x, first=i0 == 0)
    if want_b:
        gb += dlogits.sum(0, dtype=F32)


def linear_ce_outputs(hidden, weight, target, ignore_index, reduction, row_scale, grads, chunk, grad_accumulation):
    """What a chunked linear cross-entropy pass fills: ``(scale, losses, grad_hidden,
    grad_weight, grad_bias)``. ``scale`` is each token's loss weight (``row_scale``, or
    1 / non-ignored tokens for "mean", else 1; a tensor, so no device sync); the gradients
    not asked for in ``grads`` are empty; the bias gradient is a float32 sum, the weight's
    as ``weight_grad_accumulator`` says for ``chunk``-row chunks."""
    n, h = hidden.shape
    want_h, want_w, want_b = grads
    dev = hidden.device
    if row_scale is not None:
        scale = row_scale.to(F32)
    elif reduction == "mean":
        scale = 1.0 / (target != ignore_index).sum().to(F32)
    else:
        scale = torch.ones((), dtype=F32, device=dev)
    losses = _alloc.empty((n,), F32, dev)
    gh = _alloc.empty((n, h), hidden.dtype, dev) if want_h else hidden.new_empty(0)
    gw = weight_grad_accumulator(weight, -(-n // chunk), grad_accumulation) if want_w else weight.new_empty(0)
    gb = torch.zeros(weight.shape[0], dtype=F32, device=dev) if want_b else hidden.new_empty(0)
    return scale, losses, gh, gw, gb


def linear_ce_result(losses, scale, gh, gw, gb, weight, bias, reduction, row_scale):
    """``(loss, grad_hidden, grad_weight, grad_bias)`` from a pass's sums: the gradients in
    their parameters' dtypes, the loss per token ("none", or the backward's ``row_scale``
    pass) or reduced."""
    if gw.dtype != weight.dtype:
        gw = gw.to(weight.dtype)
    if bias is not None and gb.dtype != bias.dtype:
        gb = gb.to(bias.dtype)
    if reduction == "none" or row_scale is not None:
        return losses, gh, gw, gb
    total = losses.sum()
    return (total * scale if reduction == "mean" else total), gh, gw, gb


# The vocabulary-parallel fused cross-entropy (llama_fast.ops._cross_entropy_vocab_parallel):
# each rank holds rows [offset, offset + V_local) of the weight. Per chunk, a statistics step
# reads the shard's logits once; the ranks combine the statistics (two all-reduces); a
# gradient step turns the logits into their gradient given the global log-sum-exp. The
# steps are the backend's (``chunk_fn``: the Triton kernels, or the two below).


def vocab_shard_stats(logits, target, offset, label_smoothing):
    """Per-row statistics of a vocabulary shard's logits (rows, V_local), V_local >= 1:
    float32 (4, rows) holding the shard's max m, the sum of exp(z - m), the target's logit
    (0 when ``target - offset`` is outside the shard) and, with label smoothing, the sum of
    the logits (else 0)."""
    z = logits.to(F32)
    v = z.shape[1]
    local = target - offset
    here = (local >= 0) & (local < v)
    m = z.amax(1)
    z_y = torch.where(here, z.gather(1, local.clamp(0, v - 1)[:, None])[:, 0], 0.0)
    total = z.sum(1) if label_smoothing else torch.zeros_like(m)
    s = (z - m[:, None]).exp_().sum(1)
    return torch.stack([m, s, z_y, total])


def vocab_shard_grad(logits, target, lse, scale, offset, vocab, ignore_index, label_smoothing):
    """Overwrites a shard's logits (rows, V_local) with ``scale * (exp(z - lse) - eps / vocab
    - (1 - eps) * onehot(target - offset))``, ``lse`` the float32 log-sum-exp over the whole
    vocabulary; zero rows for ignored tokens. ``scale``: float32, one element or one per row."""
    z = logits.to(F32)
    v = z.shape[1]
    g = z.sub_(lse[:, None]).exp_()
    if label_smoothing:
        g.sub_(label_smoothing / vocab)
    ignored = target == ignore_index
    local = target - offset
    hit = (local >= 0) & (local < v) & ~ignored
    rows = torch.arange(g.shape[0], device=g.device)
    g[rows[hit], local[hit]] -= 1.0 - label_smoothing
    row_scale = torch.where(ignored, 0.0, scale.expand(target.shape))  # not 0 * inf: "mean" of no tokens
    g.mul_(row_scale[:, None])
    if g.data_ptr() != logits.data_ptr():
        logits.copy_(g)


def linear_cross_entropy_vocab_shard(hidden, weight, target, bias, offset, vocab, group, ignore_index,
                                     label_smoothing, reduction, chunk_size, grads, row_scale,
                                     grad_accumulation="auto", chunk_fn=(vocab_shard_stats, vocab_shard_grad)):
    """Registry entry "linear_cross_entropy_vocab_shard": ``linear_cross_entropy`` for this
    rank's vocabulary shard ``weight`` (V_local, H) (and ``bias``), rows [offset, offset +
    V_local) of a ``vocab``-row weight, with the ranks of process group ``group``; every
    rank passes every token. Returns ``(loss, grad_hidden, grad_weight, grad_bias)``: the
    loss over the whole vocabulary (the same on every rank), this rank's partial sum of the
    hidden states' gradient, its shard's weight and bias gradients. Two all-reduces per
    chunk: the max (MAX), then the rescaled sum of exps, the target's logit and the sum of
    the logits (SUM, stacked)."""
    stats_fn, grad_fn = chunk_fn
    n, h = hidden.shape
    v_local = weight.shape[0]
    want_h, want_w, want_b = grads
    want_b = want_b and bias is not None
    compute_grad = want_h or want_w or want_b
    chunk = max(1, min(n, chunk_size or linear_ce_chunk_rows(n, h, max(1, v_local))))
    dev = hidden.device
    scale, losses, gh, gw, gb = linear_ce_outputs(hidden, weight, target, ignore_index, reduction, row_scale,
                                                  (want_h, want_w, want_b), chunk, grad_accumulation)
    buf = _alloc.empty((chunk, v_local), hidden.dtype, dev) if n else None
    for i0 in range(0, n, chunk):
        x, y = hidden[i0:i0 + chunk], target[i0:i0 + chunk]
        logits = _chunk_logits(buf, x, weight, bias)
        if v_local:
            m_local, s, z_y, z_sum = stats_fn(logits, y, offset, label_smoothing)
        else:  # an empty shard (V < ranks): it adds nothing
            m_local = torch.full((x.shape[0],), float("-inf"), dtype=F32, device=dev)
            s = z_y = z_sum = torch.zeros_like(m_local)
        m = m_local.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        # Each shard's sum was relative to its own max: rescaled to the global one.
        stats = torch.stack([s * torch.exp(m_local - m), z_y, z_sum])
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
        s, z_y, z_sum = stats
        lse = m + s.log()
        ignored = y == ignore_index
        z_y = torch.where((y >= 0) & (y < vocab) | ignored, z_y, float("nan"))
        loss = lse - z_y
        if label_smoothing:
            loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - z_sum / vocab)
        losses[i0:i0 + chunk] = torch.where(ignored, 0.0, loss)
        if not compute_grad:
            continue
        if v_local:
            chunk_scale = scale if scale.numel() == 1 else scale[i0:i0 + chunk]
            grad_fn(logits, y, lse, chunk_scale, offset, vocab, ignore_index, label_smoothing)
        _add_chunk_grads(logits, x, weight, i0, gh, gw, gb, (want_h, want_w, want_b))
    del buf
    return linear_ce_result(losses, scale, gh, gw, gb, weight, bias, reduction, row_scale)


# Backend "torch": every op of the dispatcher, by its name (the other backends implement
# some or all of these, with the same signatures).
IMPLEMENTATIONS = {
    "rms_norm_fwd": rms_norm_fwd, "rms_norm_bwd": rms_norm_bwd,
    "rope_fwd": rope_fwd,
    "swiglu_fwd": swiglu_fwd, "swiglu_bwd": swiglu_bwd,
    "attn_fwd": attn_fwd, "attn_bwd": attn_bwd, "attn_varlen_fwd": attn_varlen_fwd, "attn_varlen_bwd": attn_varlen_bwd,
    "decode": decode,
    "linear_cross_entropy": linear_cross_entropy, "linear_cross_entropy_vocab_shard": linear_cross_entropy_vocab_shard,
}
