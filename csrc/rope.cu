// Rotary position embedding of q (B, S, Hq, D) and k (B, S, Hk, D) in one launch, with any
// strides per dimension (so Hugging Face's (B, H, S, D) tensors arrive as transposed views),
// pairs (i, i + D/2) (Llama / Hugging Face) or (2i, 2i + 1) (interleaved, Meta), a cos/sin
// table (S, D/2) shared by the batch (b stride 0) or one per sequence (B, S, D/2), and
// inverse = rotation by -angle (the backward pass).
//
// Numerics follow llama_fast/reference.py: everything in float32, out1 = x1 * c - x2 * s and
// out2 = x2 * c + x1 * s with each product rounded before the sum (__fmul_rn keeps nvcc
// from contracting them into FMAs, which would differ from eager in the last bit), one
// rounding to the dtype of q/k at the store. The inverse negates s, as the reference does.
//
// Work split: one block per token (b, s), grid-stride over tokens on a 1-D grid. A "unit"
// is VEC consecutive pairs (VEC = 16 bytes of x when pointers and strides allow it): for the
// non-interleaved layout one pack of x1 and one of x2 (D/2 apart); for the interleaved one
// two adjacent packs holding the VEC (x1, x2) pairs. threads_per_head threads cover the
// units of one head, and heads_per_step head lanes take heads h, h + heads_per_step, ... of
// the token's q heads followed by its k heads (one index space, so GQA's few k heads fill
// the lanes the q heads leave over), kHeadBatch heads loaded at once. A thread loads the
// cos/sin values of its unit once per token into registers and reuses them for every head
// it rotates. Shapes (bf16, non-interleaved):
//   Llama-3-8B  hd 128, 32 + 8 heads: 8 threads a head, 20 lanes, 160 threads, 2 heads each
//   Llama-3-70B hd 128, 64 + 8 heads: 8 threads a head, 18 lanes, 144 threads, 4 heads each
//   Llama-3.2-1B hd 64, 32 + 8 heads: 4 threads a head, 20 lanes, 80 (96) threads, 2 heads each

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>
#include <type_traits>

#include "common.cuh"

namespace llama_fast {
namespace {

// Threads per block at most. 160 = 8 threads a head x 20 heads, all of Llama-3-8B's q and k
// heads in one round of kHeadBatch; it also keeps ptxas from squeezing the widest variants
// into 80 registers with spills, as it does when allowed 256 threads.
constexpr int kRopeMaxThreads = 160;

struct RopeLaunch {
  RopeArgs a;
  int threads_per_head;  // threads that share one head's units
  int heads_per_step;    // head lanes: heads rotated at once by the block
};

// VEC contiguous elements of T as floats, loaded (stored) in packs of at most 16 bytes and
// at most CHUNK elements: the alignment the launcher checked.
template <typename T, int VEC, int CHUNK>
__device__ __forceinline__ void load_span(const T* p, float (&out)[VEC]) {
  constexpr int kPack = CHUNK < 16 / static_cast<int>(sizeof(T)) ? CHUNK : 16 / static_cast<int>(sizeof(T));
#pragma unroll
  for (int c = 0; c < VEC / kPack; ++c) {
    float part[kPack];
    load_floats<T, kPack>(p + c * kPack, part);
#pragma unroll
    for (int i = 0; i < kPack; ++i) out[c * kPack + i] = part[i];
  }
}

template <typename T, int VEC, int CHUNK>
__device__ __forceinline__ void store_span(T* p, const float (&in)[VEC]) {
  constexpr int kPack = CHUNK < 16 / static_cast<int>(sizeof(T)) ? CHUNK : 16 / static_cast<int>(sizeof(T));
#pragma unroll
  for (int c = 0; c < VEC / kPack; ++c) {
    float part[kPack];
#pragma unroll
    for (int i = 0; i < kPack; ++i) part[i] = in[c * kPack + i];
    store_floats<T, kPack>(p + c * kPack, part);
  }
}

// One unit of one head: the VEC pairs starting at pair0, x1 and x2 of each pair. x and out
// point at d = 0 of the head. VEC > 1 only when every d stride is 1 (the launcher checks),
// so the packs are contiguous; the scalar unit honours any d stride.
template <typename T, int VEC, bool INTERLEAVED>
__device__ __forceinline__ void load_unit(const T* x, int64_t pair0, int64_t half_dim, int64_t stride_d,
                                          float (&x1)[VEC], float (&x2)[VEC]) {
  if constexpr (VEC == 1) {
    x1[0] = to_float<T>(x[(INTERLEAVED ? 2 * pair0 : pair0) * stride_d]);
    x2[0] = to_float<T>(x[(INTERLEAVED ? 2 * pair0 + 1 : pair0 + half_dim) * stride_d]);
  } else if constexpr (INTERLEAVED) {
    // Two packs of VEC elements (the launcher only guarantees VEC-element alignment).
    float both[2 * VEC];
    load_span<T, 2 * VEC, VEC>(x + 2 * pair0, both);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      x1[i] = both[2 * i];
      x2[i] = both[2 * i + 1];
    }
  } else {
    load_floats<T, VEC>(x + pair0, x1);
    load_floats<T, VEC>(x + half_dim + pair0, x2);
  }
}

template <typename T, int VEC, bool INTERLEAVED>
__device__ __forceinline__ void store_unit(T* out, int64_t pair0, int64_t half_dim, int64_t stride_d,
                                           const float (&o1)[VEC], const float (&o2)[VEC]) {
  if constexpr (VEC == 1) {
    out[(INTERLEAVED ? 2 * pair0 : pair0) * stride_d] = from_float<T>(o1[0]);
    out[(INTERLEAVED ? 2 * pair0 + 1 : pair0 + half_dim) * stride_d] = from_float<T>(o2[0]);
  } else if constexpr (INTERLEAVED) {
    float both[2 * VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      both[2 * i] = o1[i];
      both[2 * i + 1] = o2[i];
    }
    store_span<T, 2 * VEC, VEC>(out + 2 * pair0, both);
  } else {
    store_floats<T, VEC>(out + pair0, o1);
    store_floats<T, VEC>(out + half_dim + pair0, o2);
  }
}

// Heads a thread loads together before rotating and storing any of them: 2 x 32 bytes of
// bf16 in flight per thread instead of 32. (Without it the loads of the next head could not
// be issued before the stores of the previous one, which might alias as far as nvcc knows.)
constexpr int kHeadBatch = 2;

// T: element type of q/k (and outputs); CS: of cos/sin; VEC pairs per unit.
template <typename T, typename CS, int VEC, bool INTERLEAVED>
__global__ void __launch_bounds__(kRopeMaxThreads) rope_kernel(RopeLaunch p) {
  const RopeArgs& a = p.a;
  const int head_lane = threadIdx.x / p.threads_per_head;
  const int unit_lane = threadIdx.x % p.threads_per_head;
  if (head_lane >= p.heads_per_step) return;  // round-up threads of the block; no barriers follow

  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  T* q_out = static_cast<T*>(a.q_out);
  T* k_out = static_cast<T*>(a.k_out);
  const CS* cos_table = static_cast<const CS*>(a.cos);
  const CS* sin_table = static_cast<const CS*>(a.sin);
  const int64_t tokens = a.batch * a.seq_len;
  // Head and unit counts fit in 32 bits (the launcher checks); offsets built from them do not.
  const int q_heads = static_cast<int>(a.q_heads);
  const int heads = static_cast<int>(a.q_heads + a.k_heads);
  const int units = static_cast<int>(a.half_dim / VEC);

  for (int64_t token = blockIdx.x; token < tokens; token += gridDim.x) {
    const int64_t b = token / a.seq_len;
    const int64_t s = token - b * a.seq_len;
    // This token's head 0 in each tensor (int64 offsets: b * stride passes 2^31 for large
    // batches of long sequences).
    const T* q_token = q + (b * a.q_stride[0] + s * a.q_stride[1]);
    const T* k_token = k + (b * a.k_stride[0] + s * a.k_stride[1]);
    T* qo_token = q_out + (b * a.qo_stride[0] + s * a.qo_stride[1]);
    T* ko_token = k_out + (b * a.ko_stride[0] + s * a.ko_stride[1]);
    const int64_t cs_at = b * a.cs_stride[0] + s * a.cs_stride[1];

    for (int unit = unit_lane; unit < units; unit += p.threads_per_head) {
      const int64_t pair0 = static_cast<int64_t>(unit) * VEC;
      float c[VEC], sn[VEC];
      if constexpr (VEC == 1) {
        c[0] = to_float<CS>(cos_table[cs_at + pair0 * a.cs_stride[2]]);
        sn[0] = to_float<CS>(sin_table[cs_at + pair0 * a.cs_stride[2]]);
      } else {
        load_span<CS, VEC, VEC>(cos_table + cs_at + pair0, c);
        load_span<CS, VEC, VEC>(sin_table + cs_at + pair0, sn);
      }
      if (a.inverse) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) sn[i] = -sn[i];
      }

      // Heads h0 + j * heads_per_step, j < kHeadBatch: q heads first, then k heads.
      for (int h0 = head_lane; h0 < heads; h0 += kHeadBatch * p.heads_per_step) {
        float x1[kHeadBatch][VEC], x2[kHeadBatch][VEC];
#pragma unroll
        for (int j = 0; j < kHeadBatch; ++j) {
          const int h = h0 + j * p.heads_per_step;
          if (h < heads) {
            const bool is_q = h < q_heads;
            const T* x = is_q ? q_token + h * a.q_stride[2] : k_token + (h - q_heads) * a.k_stride[2];
            load_unit<T, VEC, INTERLEAVED>(x, pair0, a.half_dim, is_q ? a.q_stride[3] : a.k_stride[3], x1[j], x2[j]);
          }
        }
#pragma unroll
        for (int j = 0; j < kHeadBatch; ++j) {
          const int h = h0 + j * p.heads_per_step;
          if (h < heads) {
            float o1[VEC], o2[VEC];
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
              o1[i] = __fsub_rn(__fmul_rn(x1[j][i], c[i]), __fmul_rn(x2[j][i], sn[i]));
              o2[i] = __fadd_rn(__fmul_rn(x2[j][i], c[i]), __fmul_rn(x1[j][i], sn[i]));
            }
            const bool is_q = h < q_heads;
            T* out = is_q ? qo_token + h * a.qo_stride[2] : ko_token + (h - q_heads) * a.ko_stride[2];
            store_unit<T, VEC, INTERLEAVED>(out, pair0, a.half_dim, is_q ? a.qo_stride[3] : a.ko_stride[3], o1, o2);
          }
        }
      }
    }
  }
}

// Pairs per unit: the widest VEC such that every x pack (q, k and outputs, both layouts) and
// every cos/sin pack is aligned. The cos/sin rows are read in packs of min(VEC, 16 bytes of
// cos/sin), so they only limit VEC when they allow less than a full 16-byte pack.
int rope_vector_width(const RopeArgs& a) {
  const bool has_q = a.q_heads > 0, has_k = a.k_heads > 0;
  // Vector packs are contiguous along d: every d stride must be 1.
  if ((has_q && (a.q_stride[3] != 1 || a.qo_stride[3] != 1)) || (has_k && (a.k_stride[3] != 1 || a.ko_stride[3] != 1)) ||
      a.cs_stride[2] != 1) {
    return 1;
  }
  const int64_t qs0 = has_q ? stepped(a.q_stride[0], a.batch) : 0, qs1 = has_q ? stepped(a.q_stride[1], a.seq_len) : 0,
                qs2 = has_q ? stepped(a.q_stride[2], a.q_heads) : 0;
  const int64_t qos0 = has_q ? stepped(a.qo_stride[0], a.batch) : 0,
                qos1 = has_q ? stepped(a.qo_stride[1], a.seq_len) : 0,
                qos2 = has_q ? stepped(a.qo_stride[2], a.q_heads) : 0;
  const int64_t ks0 = has_k ? stepped(a.k_stride[0], a.batch) : 0, ks1 = has_k ? stepped(a.k_stride[1], a.seq_len) : 0,
                ks2 = has_k ? stepped(a.k_stride[2], a.k_heads) : 0;
  const int64_t kos0 = has_k ? stepped(a.ko_stride[0], a.batch) : 0,
                kos1 = has_k ? stepped(a.ko_stride[1], a.seq_len) : 0,
                kos2 = has_k ? stepped(a.ko_stride[2], a.k_heads) : 0;
  int vec = vector_width(dtype_bytes(a.x_dtype),
                         {has_q ? a.q : nullptr, has_q ? a.q_out : nullptr, has_k ? a.k : nullptr,
                          has_k ? a.k_out : nullptr},
                         {a.half_dim, qs0, qs1, qs2, qos0, qos1, qos2, ks0, ks1, ks2, kos0, kos1, kos2});
  const int cs_bytes = dtype_bytes(a.cs_dtype);
  const int cs_vec = vector_width(cs_bytes, {a.cos, a.sin},
                                  {a.half_dim, stepped(a.cs_stride[0], a.batch), stepped(a.cs_stride[1], a.seq_len)});
  if (cs_vec < 16 / cs_bytes && cs_vec < vec) vec = cs_vec;
  return vec;
}

}  // namespace

void rope(const RopeArgs& a, const Launch& at) {
  constexpr const char* kName = "rope";
  begin_launch(at, kName);
  if (a.x_dtype != a.cs_dtype && a.cs_dtype != DType::kFloat32) {
    fail(kName, "cos/sin must have the dtype of q/k or float32 (got dtype codes " +
                    std::to_string(static_cast<int>(a.cs_dtype)) + " for cos/sin, " +
                    std::to_string(static_cast<int>(a.x_dtype)) + " for q/k)");
  }
  const int64_t tokens = a.batch * a.seq_len;
  const int64_t heads = a.q_heads + a.k_heads;
  if (tokens <= 0 || heads <= 0 || a.half_dim <= 0) return;

  if (heads > (int64_t{1} << 24) || a.half_dim > (int64_t{1} << 30)) {  // the kernel counts them in int
    fail(kName, "too many heads (" + std::to_string(heads) + ") or too large a head dim (" +
                    std::to_string(2 * a.half_dim) + ")");
  }

  const int vec = rope_vector_width(a);
  const int64_t units = a.half_dim / vec;
  RopeLaunch p{a, 0, 0};
  p.threads_per_head = static_cast<int>(std::min<int64_t>(units, kRopeMaxThreads));
  // As many head lanes as fit, then as few as take the same number of rounds of kHeadBatch
  // heads each (72 heads in 20 lanes take 2 rounds; so do they in 18 lanes, with no idle
  // lanes in the last round).
  const int64_t max_lanes = std::min<int64_t>(heads, kRopeMaxThreads / p.threads_per_head);
  const int64_t rounds = ceil_div(heads, max_lanes * kHeadBatch);
  p.heads_per_step = static_cast<int>(ceil_div(heads, rounds * kHeadBatch));
  const int threads = static_cast<int>(ceil_div(static_cast<int64_t>(p.threads_per_head) * p.heads_per_step, 32) * 32);
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(tokens, INT_MAX));

  dispatch_dtype(a.x_dtype, kName, [&](auto x_tag) {
    using T = decltype(x_tag);
    auto launch_for_tables = [&](auto cs_tag) {
      using CS = decltype(cs_tag);
      dispatch_vec<T>(vec, [&](auto vec_tag) {
        constexpr int kVec = decltype(vec_tag)::value;
        if (a.interleaved) {
          launch(rope_kernel<T, CS, kVec, true>, blocks, threads, 0, at, p);
        } else {
          launch(rope_kernel<T, CS, kVec, false>, blocks, threads, 0, at, p);
        }
      });
    };
    if (a.cs_dtype == a.x_dtype) {
      launch_for_tables(T{});
    } else {
      launch_for_tables(float{});  // cos/sin in float32 (checked above)
    }
  });
  end_launch(kName);
}

}  // namespace llama_fast
