// The C++ interface of the CUDA backend (llama_fast._C): one plain struct of arguments per
// launch, and the function that launches it. No libtorch, no CUDA headers: the Python side
// (llama_fast/cuda_ops.py) hands over device pointers, sizes, strides in elements, dtypes
// and the CUDA stream of the tensors' device, and bindings.cpp turns those into these
// structs. Validation of shapes and dtypes happens in Python (the op layer and
// cuda_ops.py); these functions check what C++ alone can: that a device exists, that the
// launch succeeded. Every failure throws std::runtime_error naming the kernel.
#pragma once

#include <cstdint>

namespace llama_fast {

// Element types, numbered as llama_fast/cuda_ops.py numbers them.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Where a launch runs: the CUDA device index (made current before the launch) and the
// stream (a cudaStream_t, 0 for the legacy default stream) that torch uses there.
struct Launch {
  int device;
  void* stream;
};

// y = rms_norm(x [+ residual]) * weight, h = x + residual. Rows of n elements with unit
// stride along n and any row stride (in elements). residual/h: null without the add, else
// x_dtype; y: the promotion of (x_dtype, w_dtype) (float32 unless they are equal). The sum
// is rounded to x_dtype before it is normalised, and the normalised value to x_dtype before
// the weight multiplies it (Hugging Face's LlamaRMSNorm); float32 accumulation.
struct RmsNormFwdArgs {
  const void* x;
  const void* residual;
  const void* weight;
  void* y;
  void* h;
  int64_t rows, n;
  int64_t stride_x, stride_r, stride_y, stride_h;
  float eps;
  DType x_dtype, w_dtype;
};
void rms_norm_fwd(const RmsNormFwdArgs& a, const Launch& at);

// Gradients of y = rms_norm(h) * weight: dx = d/dh (+ dh when dh is not null), and partial
// weight gradients: row p of dw_partial (num_partials x n, float32, contiguous) is the sum
// over a fixed, contiguous range of rows, so the caller's sum over p is deterministic. Every
// element of dw_partial is written (rows that get no work write zeros). dy has the
// promotion of (x_dtype, w_dtype); dh, h and dx have x_dtype.
struct RmsNormBwdArgs {
  const void* dy;
  const void* dh;
  const void* h;
  const void* weight;
  void* dx;
  float* dw_partial;
  int64_t rows, n, num_partials;
  int64_t stride_dy, stride_dh, stride_h, stride_dx;
  float eps;
  DType x_dtype, w_dtype;
};
void rms_norm_bwd(const RmsNormBwdArgs& a, const Launch& at);

// Rotary embedding of q (B, S, Hq, D) and k (B, S, Hk, D) into q_out and k_out, strides in
// elements per dimension (b, s, h, d); half_dim = D / 2. cos and sin share strides (b, s, d)
// with b stride 0 for one (S, D/2) table. Non-interleaved (Llama / Hugging Face): pairs
// (i, i + D/2); interleaved (Meta): pairs (2i, 2i + 1). inverse rotates by -angle (the
// backward pass). out1 = x1 * c - x2 * s, out2 = x2 * c + x1 * s, in float32.
struct RopeArgs {
  const void* q;
  const void* k;
  const void* cos;
  const void* sin;
  void* q_out;
  void* k_out;
  int64_t batch, seq_len, q_heads, k_heads, half_dim;
  int64_t q_stride[4], k_stride[4], qo_stride[4], ko_stride[4];
  int64_t cs_stride[3];
  bool interleaved, inverse;
  DType x_dtype, cs_dtype;
};
void rope(const RopeArgs& a, const Launch& at);

// y = silu(gate) * up, silu rounded to dtype before the product (as eager PyTorch). Rows of
// n with unit stride along n, any row stride: gate and up may be the two halves of one
// fused gate_up projection.
struct SwigluFwdArgs {
  const void* gate;
  const void* up;
  void* y;
  int64_t rows, n;
  int64_t stride_g, stride_u, stride_y;
  DType dtype;
};
void swiglu_fwd(const SwigluFwdArgs& a, const Launch& at);

// dup = dy * silu(gate) (silu rounded to dtype), dgate = dy * up * sigmoid(gate) * (1 +
// gate * (1 - sigmoid(gate))); dgate and dup may be halves of one buffer.
struct SwigluBwdArgs {
  const void* dy;
  const void* gate;
  const void* up;
  void* dgate;
  void* dup;
  int64_t rows, n;
  int64_t stride_dy, stride_g, stride_u, stride_dg, stride_du;
  DType dtype;
};
void swiglu_bwd(const SwigluBwdArgs& a, const Launch& at);

// Flash attention forward. Fixed length: q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), out like q.
// Varlen (cu_q and cu_k non-null, int32, batch + 1 offsets): q (Tq, Hq, D), k/v (Tk, Hkv, D),
// sequence b is rows cu[b]..cu[b+1]; seq_q/seq_k are then the longest lengths and batch
// strides are 0. Element (b, row, head, d) of a tensor lives at
//   b * stride[0] + row * stride[1] + head * stride[2] + d
// where row = (varlen ? cu[b] : 0) + position in the sequence; the last dim is contiguous.
// lse (float32): natural-log log-sum-exp of the scaled scores of (b, head, query) at
//   b * lse_stride[0] + head * lse_stride[1] + row          (row as above)
// i.e. (B, Hq, Sq) contiguous, or (Hq, Tq) for varlen: the layout the Triton backward reads.
// GQA: query head h reads kv head h / (q_heads / kv_heads). Causal masks are bottom-right
// aligned: query i sees keys j <= i + len_k - len_q; a query that sees no key gets out = 0
// and lse = -inf. dtype float16 or bfloat16; head_dim 64 or 128 (the Python side routes
// anything else to Triton).
struct AttnFwdArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  const int32_t* cu_q;
  const int32_t* cu_k;
  int64_t batch, q_heads, kv_heads, seq_q, seq_k, head_dim;
  int64_t q_stride[3], k_stride[3], v_stride[3], o_stride[3];
  int64_t lse_stride[2];
  float scale;
  bool causal;
  DType dtype;
};
void attn_fwd(const AttnFwdArgs& a, const Launch& at);

// Decoding attention over a KV cache: q (B, Sq, Hq, D), caches (B, Smax, Hkv, D), out like q,
// strides (b, s, h) in elements, last dim contiguous. cache_seqlens (int32, B) counts the
// valid entries of each cache, clamped to [0, Smax] on the device; the Sq queries are the
// last Sq of them and attend bottom-right causally (query i sees keys j <= n - Sq + i);
// a query that sees no key gets 0. num_splits >= 1 splits the cache length across blocks;
// with more than one split, o_part (rows x num_splits x D) and lse_part (rows x num_splits),
// float32, rows = B * Sq * Hq in (b, s, h) order, hold the partial results that a combine
// kernel merges into out; with one split they are null and out is written directly. No host
// synchronisation and no allocation, so it can be captured in a CUDA graph.
struct DecodeArgs {
  const void* q;
  const void* k_cache;
  const void* v_cache;
  const int32_t* cache_seqlens;
  void* out;
  float* o_part;
  float* lse_part;
  int64_t batch, q_len, q_heads, kv_heads, seqlen_max, head_dim, num_splits;
  int64_t q_stride[3], k_stride[3], v_stride[3], o_stride[3];
  float scale;
  DType dtype;
};
void decode(const DecodeArgs& a, const Launch& at);

}  // namespace llama_fast
