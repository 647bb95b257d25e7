"""The wrappers of the CUDA extension's kernels (csrc/llama_fast.h describes every argument).

``CudaKernels`` holds one loaded extension module. Each method has the signature of its
``llama_fast.reference`` twin: it allocates the outputs, hands the extension raw pointers,
sizes, strides (in elements), dtype codes, the device index and torch's current stream on
that device (``launch``), and returns tensors. The extension never sees a torch object,
which is why it builds without torch and serves every torch version. Which calls these
kernels do not cover, and where they go instead, is the cuda backend's ``gap`` and the
dispatcher's routing rule (``llama_fast.backends``), not decided here.
"""
from __future__ import annotations

import torch

from llama_fast import _alloc
from llama_fast.kernels._common import as_rows, device_guard, persistent_programs, row_stride
from llama_fast.kernels.flash_decode import choose_num_splits

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
DECODE_BLOCK_N = 64  # keys per step of the decode kernel: splits never outnumber key blocks
RMS_NORM_BWD_PARTIALS_PER_SM = 2  # weight-gradient partial rows (summed afterwards, in order)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    # The kernels read the last dim contiguously; a strided one is copied once.
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def decode_splits(requested: int, device: torch.device, batch: int, kv_heads: int, seqlen_max: int) -> int:
    """``requested`` if > 0, else enough (batch x KV head x split) blocks to keep every SM
    busy; never more splits than key blocks. Shapes only: no host sync, graph-safe."""
    return choose_num_splits(
        requested if requested > 0 else 0, device, batch * kv_heads, seqlen_max, DECODE_BLOCK_N)


class CudaKernels:
    """The kernels of one extension module on tensors of ``device_type`` (CUDA)."""

    def __init__(self, ext, device_type: str = "cuda") -> None:
        self.ext = ext
        self.device_type = device_type

    def launch(self, t: torch.Tensor) -> dict:
        """The device index and torch's current stream there, as the extension takes them."""
        index = t.device.index if t.device.index is not None else torch.cuda.current_device()
        return {"device": index, "stream": torch.cuda.current_stream(index).cuda_stream}

    def check_device(self, op: str, **tensors) -> None:
        """All tensors on one device of this backend's type: the kernels dereference every pointer there."""
        first = None
        for name, t in tensors.items():
            if t is None:
                continue
            if t.device.type != self.device_type:
                raise ValueError(f"{op}: {name} must be a {self.device_type.upper()} tensor for the cuda backend, got {t.device}")
            if first is None:
                first = (name, t.device)
            elif t.device != first[1]:
                raise ValueError(f"{op}: {name} is on {t.device} but {first[0]} is on {first[1]}: all must share one device")

    # --- RMSNorm

    def rms_norm_fwd(self, x, residual, weight, eps):
        self.check_device("rms_norm", x=x, residual=residual, weight=weight)
        shape, n = x.shape, x.shape[-1]
        x2 = as_rows(x)
        r2 = as_rows(residual) if residual is not None else None
        rows = x2.shape[0]
        y = _alloc.empty((rows, n), torch.promote_types(x.dtype, weight.dtype), x.device)
        h = _alloc.empty((rows, n), x.dtype, x.device) if residual is not None else None
        weight = weight.contiguous()
        if rows and n:
            with device_guard(x.device):
                self.ext.rms_norm_fwd(
                    x=_ptr(x2), residual=_ptr(r2), weight=_ptr(weight), y=_ptr(y), h=_ptr(h), rows=rows, n=n,
                    stride_x=row_stride(x2), stride_r=row_stride(r2) if r2 is not None else 0, stride_y=n, stride_h=n,
                    eps=float(eps), x_dtype=DTYPE_CODE[x.dtype], w_dtype=DTYPE_CODE[weight.dtype], **self.launch(x),
                )
        return y.view(shape), (None if h is None else h.view(shape))

    def rms_norm_bwd(self, dy, dh, h, weight, eps):
        self.check_device("rms_norm backward", dy=dy, dh=dh, h=h, weight=weight)
        shape, n = h.shape, h.shape[-1]
        h2, dy2 = as_rows(h), as_rows(dy)
        dh2 = as_rows(dh) if dh is not None else None
        rows = h2.shape[0]
        dx = _alloc.empty((rows, n), h.dtype, h.device)
        if rows == 0 or n == 0:
            return dx.view(shape), torch.zeros_like(weight)
        partials = persistent_programs(h.device, rows, RMS_NORM_BWD_PARTIALS_PER_SM)
        dw_partial = _alloc.empty((partials, n), torch.float32, h.device)
        weight = weight.contiguous()
        with device_guard(h.device):
            self.ext.rms_norm_bwd(
                dy=_ptr(dy2), dh=_ptr(dh2), h=_ptr(h2), weight=_ptr(weight), dx=_ptr(dx), dw_partial=_ptr(dw_partial),
                rows=rows, n=n, num_partials=partials, stride_dy=row_stride(dy2),
                stride_dh=row_stride(dh2) if dh2 is not None else 0, stride_h=row_stride(h2), stride_dx=n,
                eps=float(eps), x_dtype=DTYPE_CODE[h.dtype], w_dtype=DTYPE_CODE[weight.dtype], **self.launch(h),
            )
        return dx.view(shape), dw_partial.sum(0).to(weight.dtype)


    # --- RoPE and SwiGLU

    def rope_fwd(self, q, k, cos, sin, interleaved, inverse):
        self.check_device("apply_rope", q=q, k=k, cos=cos, sin=sin)
        batch, seq_len, q_heads, head_dim = q.shape
        q_out, k_out = _alloc.empty_like(q), _alloc.empty_like(k)
        if batch * seq_len == 0 or head_dim == 0:
            return q_out, k_out
        if cos.dtype not in (q.dtype, torch.float32):  # the kernel reads tables in q's dtype or float32
            cos, sin = cos.float(), sin.float()
        if sin.stride() != cos.stride():  # one set of table strides serves both
            cos, sin = cos.contiguous(), sin.contiguous()
        cs_stride = (0, *cos.stride()) if cos.dim() == 2 else cos.stride()
        with device_guard(q.device):
            self.ext.rope(
                q=_ptr(q), k=_ptr(k), cos=_ptr(cos), sin=_ptr(sin), q_out=_ptr(q_out), k_out=_ptr(k_out),
                batch=batch, seq_len=seq_len, q_heads=q_heads, k_heads=k.shape[2], half_dim=head_dim // 2,
                q_stride=q.stride(), k_stride=k.stride(), qo_stride=q_out.stride(), ko_stride=k_out.stride(),
                cs_stride=cs_stride, interleaved=bool(interleaved), inverse=bool(inverse),
                x_dtype=DTYPE_CODE[q.dtype], cs_dtype=DTYPE_CODE[cos.dtype], **self.launch(q),
            )
        return q_out, k_out

    def swiglu_fwd(self, gate, up):
        self.check_device("swiglu", gate=gate, up=up)
        shape, n = gate.shape, gate.shape[-1]
        y = _alloc.empty(shape, gate.dtype, gate.device)
        if y.numel() == 0:
            return y
        g2, u2 = as_rows(gate), as_rows(up)
        with device_guard(gate.device):
            self.ext.swiglu_fwd(
                gate=_ptr(g2), up=_ptr(u2), y=_ptr(y), rows=g2.shape[0], n=n, stride_g=row_stride(g2),
                stride_u=row_stride(u2), stride_y=n, dtype=DTYPE_CODE[gate.dtype], **self.launch(gate),
            )
        return y

    def swiglu_bwd(self, dy, gate, up, dgate, dup):
        """Writes into ``dgate``/``dup``: views that flatten to (rows, N) without a copy."""
        self.check_device("swiglu backward", dy=dy, gate=gate, up=up, dgate=dgate, dup=dup)
        n = gate.shape[-1]
        if gate.numel() == 0:
            return
        dy2, g2, u2 = as_rows(dy), as_rows(gate), as_rows(up)
        dg2, du2 = dgate.view(-1, n), dup.view(-1, n)
        with device_guard(gate.device):
            self.ext.swiglu_bwd(
                dy=_ptr(dy2), gate=_ptr(g2), up=_ptr(u2), dgate=_ptr(dg2), dup=_ptr(du2), rows=g2.shape[0], n=n,
                stride_dy=row_stride(dy2), stride_g=row_stride(g2), stride_u=row_stride(u2),
                stride_dg=row_stride(dg2), stride_du=row_stride(du2), dtype=DTYPE_CODE[gate.dtype], **self.launch(gate),
            )


    # --- Attention

    def _attn_forward(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        self.check_device("flash_attn", q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
        q, k, v = (_unit_last(t) for t in (q, k, v))
        varlen = cu_q is not None
        out = _alloc.empty(q.shape, q.dtype, q.device)
        if varlen:
            batch, seq_q, seq_k = cu_q.shape[0] - 1, max_q, max_k
            lse = _alloc.empty((q.shape[1], q.shape[0]), torch.float32, q.device)
            lse_stride = (0, lse.stride(0))
            strides = lambda t: (0, t.stride(0), t.stride(1))  # noqa: E731
        else:
            batch, seq_q, seq_k = q.shape[0], q.shape[1], k.shape[1]
            lse = _alloc.empty((batch, q.shape[2], seq_q), torch.float32, q.device)
            lse_stride = (lse.stride(0), lse.stride(1))
            strides = lambda t: t.stride()[:3]  # noqa: E731
        q_heads, kv_heads = q.shape[-2], k.shape[-2]
        if batch * q_heads * seq_q == 0 or q.numel() == 0:
            return out, lse
        with device_guard(q.device):
            self.ext.attn_fwd(
                q=_ptr(q), k=_ptr(k), v=_ptr(v), out=_ptr(out), lse=_ptr(lse), cu_q=_ptr(cu_q), cu_k=_ptr(cu_k),
                batch=batch, q_heads=q_heads, kv_heads=kv_heads, seq_q=seq_q, seq_k=seq_k, head_dim=q.shape[-1],
                q_stride=strides(q), k_stride=strides(k), v_stride=strides(v), o_stride=strides(out),
                lse_stride=lse_stride, scale=float(scale), causal=bool(causal), dtype=DTYPE_CODE[q.dtype], **self.launch(q),
            )
        return out, lse

    def attn_fwd(self, q, k, v, causal, scale):
        # The forward writes lse in the layout the Triton backward reads (csrc/llama_fast.h),
        # which is where the dispatcher routes this backend's attention backward.
        return self._attn_forward(q, k, v, None, None, 0, 0, causal, scale)

    def attn_varlen_fwd(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        return self._attn_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)

    def decode(self, q, k_cache, v_cache, cache_seqlens, scale, num_splits):
        self.check_device("flash_decode", q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens)
        batch, q_len, q_heads, head_dim = q.shape
        seqlen_max, kv_heads = k_cache.shape[1], k_cache.shape[2]
        out = _alloc.empty(q.shape, q.dtype, q.device)
        if out.numel() == 0:
            return out
        q, k_cache, v_cache = (_unit_last(t) for t in (q, k_cache, v_cache))
        cache_seqlens = cache_seqlens.contiguous()
        splits = decode_splits(num_splits, q.device, batch, kv_heads, seqlen_max)
        rows = batch * q_len * q_heads
        o_part = lse_part = None
        if splits > 1:
            o_part = _alloc.empty((rows, splits, head_dim), torch.float32, q.device)
            lse_part = _alloc.empty((rows, splits), torch.float32, q.device)
        with device_guard(q.device):
            self.ext.decode(
                q=_ptr(q), k_cache=_ptr(k_cache), v_cache=_ptr(v_cache), cache_seqlens=_ptr(cache_seqlens),
                out=_ptr(out), o_part=_ptr(o_part), lse_part=_ptr(lse_part), batch=batch, q_len=q_len,
                q_heads=q_heads, kv_heads=kv_heads, seqlen_max=seqlen_max, head_dim=head_dim, num_splits=splits,
                q_stride=q.stride()[:3], k_stride=k_cache.stride()[:3], v_stride=v_cache.stride()[:3],
                o_stride=out.stride()[:3], scale=float(scale), dtype=DTYPE_CODE[q.dtype], **self.launch(q),
            )
        return out
