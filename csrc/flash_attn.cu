// Flash attention forward (FlashAttention-2 style) on the tensor cores: mma.sync m16n8k16
// with float32 accumulation, operands fed from shared memory by ldmatrix, K/V tiles
// streamed by cp.async, online softmax in registers. Semantics (layouts, varlen, GQA,
// bottom-right causal mask, lse) are those of AttnFwdArgs in llama_fast.h and of
// _attn_fwd_kernel in kernels/flash_attn.py, whose numerics this follows step by step:
//   s = (q . k) * scale * log2(e)            float32 (mma accumulator), then masked to -inf
//   m = running row max of s, p = exp2(s - m) float32; the row sum l adds the float32 p
//   (computed as m = max(m, max(q . k) * c) and p = ex2.approx.ftz(fma(q . k, c, -m)),
//   c = scale * log2(e) > 0: one FFMA and one MUFU.EX2 per score, no FMUL, no exp2f
//   denormal fix-ups; p below 2^-126 becomes 0)
//   acc = acc * exp2(m_old - m) + p(rounded to the dtype) @ v     float32 accumulation
//   out = acc / l rounded to the dtype;  lse = (m + log2(l)) / log2(e)  (natural log)
// Rows that see no key keep m = -inf and l = 0: out = 0, lse = -inf.
//
// Launch shape
// - One block of 4 warps per (query block of 128 rows, batch x query head); each warp owns
//   32 query rows (two m16 tiles), so a row's softmax statistics live in the 4 threads of a
//   quad and never cross warps. Why 32 rows per warp rather than 16 (4 or 8 warps of one
//   m16 tile): every warp reads the whole K and V tile from shared memory by ldmatrix, so
//   shared-memory traffic per mma halves with two m-tiles per warp (each K/V fragment feeds
//   two mma). With 16 rows per warp one ldmatrix.x4 feeds 2 mma, which on A100/H100 makes
//   shared memory, not the tensor cores, the bound. The price is registers: at D=128 a
//   thread holds 128 floats of O and 64 of scores; Q fragments are re-read from shared
//   memory at each k-step instead of kept in registers (as FlashAttention-2 does). ptxas
//   fits this in 255 registers without spills (see the ptx::opaque calls below, empty asm
//   statements that stop the optimiser from hoisting per-step addresses out of the key loop).
// - Key blocks of 64 for both head dims. One K and one V buffer (FlashAttention-2's
//   pipeline): V_j is in flight during S = Q K_j^T and the softmax, K_{j+1} during O += P V_j.
//   Shared memory: Q (128 x D) + K + V (64 x D each) = 64 KB at D=128, 32 KB at D=64, so two
//   blocks (8 warps) fit on an SM of A100 or H100; registers allow two as well.
// - Grid: x = batch x query heads (up to 2^31 - 1; heads of one GQA group are neighbours, so
//   they share K/V in L2), y = query blocks in reverse order, so that the longest causal
//   rows (the last query blocks) start first and the short ones fill the tail. y is capped
//   at 65535 with a grid-stride loop (more than 8M queries of one sequence).
// - Causal: key blocks entirely past the diagonal are never loaded; the mask code runs only
//   on blocks that cross the diagonal or the end of the keys; a warp whose 32 rows see no
//   key of a block skips its math for that block.
//
// Shared memory tiles are rows of D 16-bit elements, i.e. D / 8 chunks of 16 bytes; chunk c
// of row r is stored at chunk position c ^ (r % 8). ldmatrix reads 8 rows at the same
// logical chunk in one phase; with the XOR they land in 8 different 16-byte bank groups,
// so neither ldmatrix nor the cp.async writes conflict.
//
// Alignment: cp.async copies 16 bytes, so the tensors' base pointers must be 16-byte aligned
// and their batch/row/head strides multiples of 8 elements (always true for contiguous or
// fused-QKV Llama tensors). Otherwise a (slow, correct) path loads and stores 16-bit
// elements one by one; the choice is a runtime flag, uniform over the grid.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "common.cuh"
#include "ptx.cuh"

namespace llama_fast {
namespace {

constexpr const char* kAttnFwdName = "attn_fwd";

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kMTiles = 2;                 // m16 tiles of query rows per warp
constexpr int kWarpRows = kMTiles * 16;    // 32 query rows per warp
constexpr int kBlockM = kWarps * kWarpRows;  // 128 query rows per block
constexpr int kBlockN = 64;                // keys per K/V tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr int64_t kMaxGridY = 65535;

// Q tile, one K tile, one V tile (16-bit elements).
template <int D>
constexpr size_t smem_bytes() {
  return static_cast<size_t>(kBlockM + 2 * kBlockN) * D * 2;
}

struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  const int32_t* cu_q;  // null: fixed length
  const int32_t* cu_k;
  int64_t q_stride[3], k_stride[3], v_stride[3], o_stride[3];
  int64_t lse_stride[2];
  int q_heads, group;  // group = q_heads / kv_heads
  int seq_q, seq_k;    // lengths (fixed) or longest lengths (varlen)
  int num_m_blocks;    // ceil(seq_q / kBlockM)
  float qk_scale;      // scale * log2(e)
  bool aligned;        // 16-byte cp.async / vector stores allowed
};

// ---------------------------------------------------------------------------------------
// PTX (ptx.cuh, which the CPU emulator of the tests also implements).

using ptx::cp_async_commit;
using ptx::ldmatrix_x4;
using ptx::ldmatrix_x4_trans;
using ptx::smem_addr;

// 16 bytes global -> shared, bypassing L1. valid == false reads nothing and writes zeros.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  ptx::cp_async_cg_16(dst, src, valid ? 16 : 0);
}

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  ptx::cp_async_wait_group<N>();
}

// c (16x8, float32) += a (16x16, row-major) * b (16x8, column-major).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  ptx::mma_m16n8k16<T>(c, a, b0, b1);
}

// Two floats rounded to T (nearest even) in one register, lo in the low 16 bits: the
// element order of mma operands and of memory.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(lo))) |
         (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(hi))) << 16);
}

// ---------------------------------------------------------------------------------------
// Shared memory tiles.

// Element offset of chunk `chunk` (8 elements) of row `row` in a swizzled tile of D columns.
template <int D>
__device__ __forceinline__ int swizzled(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// Byte offset of chunk `chunk01` (0 or 1) of `row`, i.e. swizzled<D>(row, chunk01) * 2. The
// chunk 2 s further (the k16 step s of an ldmatrix walk along a row) is at this offset
// ^ (s * 32): chunk01 + 2 s = chunk01 ^ 2 s, the swizzle is a XOR, and the row's own
// offset is a multiple of 2 D bytes, above every bit the XOR touches (s * 32 < 2 D). Rows
// 16 further are 16 * 2 D bytes further. So each ldmatrix address costs one XOR and an
// immediate offset instead of a register per (row group, step).
template <int D>
__device__ __forceinline__ uint32_t swizzled_bytes(int row, int chunk01) {
  return static_cast<uint32_t>(row * (2 * D) + (((chunk01 ^ row) & 7) << 4));
}

// Rows [0, ROWS) of a tile into shared memory; rows >= valid_rows (the sequence's end) are
// zero-filled, so that padded queries score 0 and padded values contribute 0 * 0, never a
// NaN from stale shared memory. src points at row 0, which is always a real row. A thread
// copies one chunk column: rows first_row + i * kRowsPerPass; kRowsPerPass is a multiple of
// 8, so all its rows share one swizzle and its shared addresses differ by constants.
template <int ROWS, int D>
__device__ __forceinline__ void load_tile(uint16_t* tile, const uint16_t* src, int64_t row_stride, int valid_rows,
                                          bool aligned) {
  constexpr int kChunks = D / 8;
  constexpr int kRowsPerPass = kThreads / kChunks;
  static_assert(kThreads % kChunks == 0 && kRowsPerPass % 8 == 0 && ROWS % kRowsPerPass == 0,
                "a tile must split into whole passes of the block, 8-row aligned");
  const int first_row = static_cast<int>(threadIdx.x) / kChunks, chunk = static_cast<int>(threadIdx.x) % kChunks;
  uint16_t* to = tile + swizzled<D>(first_row, chunk);
  const uint16_t* from = src + first_row * row_stride + chunk * 8;
  int64_t pass_stride = kRowsPerPass * row_stride;
  ptx::opaque(pass_stride);  // keeps i * pass_stride from being hoisted out of the key loop
#pragma unroll
  for (int i = 0; i < ROWS / kRowsPerPass; ++i) {
    const bool valid = first_row + i * kRowsPerPass < valid_rows;
    const uint16_t* g = valid ? from + i * pass_stride : src;
    uint16_t* sm = to + i * kRowsPerPass * D;
    if (aligned) {
      cp_async_16(smem_addr(sm), g, valid);
    } else {
      uint32_t w[4] = {0u, 0u, 0u, 0u};
      if (valid) {
#pragma unroll
        for (int e = 0; e < 4; ++e) w[e] = g[2 * e] | (static_cast<uint32_t>(g[2 * e + 1]) << 16);
      }
      *reinterpret_cast<uint4*>(sm) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

// ---------------------------------------------------------------------------------------
// The kernel.

struct SeqView {  // one (batch, head) pair's rows, each pointer at the sequence's row 0
  const uint16_t* q;
  const uint16_t* k;
  const uint16_t* v;
  uint16_t* out;
  float* lse;
  int q_len, k_len;
};

// One query block [m0, m0 + kBlockM) of one (sequence, head); m0 < q_len.
//
// Pipeline (one K and one V buffer, as FlashAttention-2): the V tile of key block j is in
// flight while S = Q K_j^T and the softmax run, and K_{j+1} while O += P V_j runs. Each
// thread only ever has one cp.async group outstanding, so every wait is wait_group 0; the
// __syncthreads after it publishes the tile to all warps and, at the same time, tells the
// thread that every warp is done with the buffer it is about to refill.
template <typename T, int D, bool CAUSAL>
__device__ __forceinline__ void attn_fwd_block(const FwdParams& p, const SeqView& s, int m0, uint16_t* q_smem,
                                               uint16_t* k_smem, uint16_t* v_smem) {
  constexpr int kChunks = D / 8;
  constexpr int kKSteps = D / 16;       // k16 steps of Q.K^T
  constexpr int kNTiles = kBlockN / 8;  // n8 tiles of a score row block
  constexpr int kPSteps = kBlockN / 16; // k16 steps of P.V
  constexpr int kDTiles = D / 8;        // n8 tiles of O

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int quad_row = lane >> 2;       // mma C fragment: rows quad_row and quad_row + 8
  const int quad_col = (lane & 3) * 2;  //   columns quad_col and quad_col + 1 of each n8 tile
  const int ld_matrix = lane >> 3;      // ldmatrix: which 8x8 matrix this lane addresses
  const int ld_row = lane & 7;          //   and which of its rows
  const int64_t q_rs = p.q_stride[1], k_rs = p.k_stride[1], v_rs = p.v_stride[1], o_rs = p.o_stride[1];
  const int q_len = s.q_len, k_len = s.k_len;
  const int diff = k_len - q_len;  // bottom-right alignment: row i sees keys j <= i + diff
  const int warp_row0 = m0 + warp * kWarpRows;
  // This lane's ldmatrix row addresses at k-step 0 (see swizzled_bytes). Q (A operand):
  // matrices 0 rows 0-7 / cols 0-7, 1 rows 8-15 / cols 0-7, 2 rows 0-7 / cols 8-15, 3 rows
  // 8-15 / cols 8-15 = registers a0..a3. K (B operand of S, 16 d x 8 keys, column-major =
  // K rows as stored, no transpose): 0 keys 0-7 / d 0-7, 1 keys 0-7 / d 8-15 (b0, b1 of key
  // tile 2np), 2 keys 8-15 / d 0-7, 3 keys 8-15 / d 8-15 (key tile 2np + 1). V (B operand
  // of P V, 16 keys x 8 d, column-major, while V rows are stored row-major: transposed
  // ldmatrix): 0 keys 0-7 / d 0-7, 1 keys 8-15 / d 0-7 (b0, b1 of d tile 2dp), 2 keys 0-7 /
  // d 8-15, 3 keys 8-15 / d 8-15 (d tile 2dp + 1).
  uint32_t q_lane = swizzled_bytes<D>(warp * kWarpRows + ld_row + (ld_matrix & 1) * 8, ld_matrix >> 1);
  uint32_t k_lane = swizzled_bytes<D>(ld_row + (ld_matrix >> 1) * 8, ld_matrix & 1);
  uint32_t v_lane = swizzled_bytes<D>(ld_row + (ld_matrix & 1) * 8, ld_matrix >> 1);
  const uint32_t q_base = smem_addr(q_smem), k_base = smem_addr(k_smem), v_base = smem_addr(v_smem);
  constexpr uint32_t kRows16 = 16 * 2 * D;  // bytes of 16 tile rows

  __syncthreads();  // the previous query block of this thread block may still read shared memory

  // Keys [0, kv_end) are seen by some row of the block (rows past q_len do not count).
  int kv_end = k_len;
  if (CAUSAL) kv_end = min(max(min(m0 + kBlockM, q_len) + diff, 0), k_len);
  const int n_blocks = (kv_end + kBlockN - 1) / kBlockN;

  load_tile<kBlockM, D>(q_smem, s.q + m0 * q_rs, q_rs, q_len - m0, p.aligned);
  if (n_blocks > 0) load_tile<kBlockN, D>(k_smem, s.k, k_rs, k_len, p.aligned);
  cp_async_commit();

  float o_acc[kMTiles][kDTiles][4];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int t = 0; t < kDTiles; ++t) o_acc[mt][t][0] = o_acc[mt][t][1] = o_acc[mt][t][2] = o_acc[mt][t][3] = 0.0f;
  }
  // Row statistics of rows (mt, r): warp_row0 + mt * 16 + quad_row + r * 8.
  float row_max[kMTiles][2];  // log2 domain; -inf while the row has seen nothing
  float row_sum[kMTiles][2];  // this thread's share; the quad sums it at the end
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.0f;
  }

  for (int j = 0; j < n_blocks; ++j) {
    const int n0 = j * kBlockN;
    // Opaque to the optimiser: otherwise it hoists every (step, operand) address out of the
    // loop into ~24 registers, and D=128 spills.
    ptx::opaque(q_lane);
    ptx::opaque(k_lane);
    ptx::opaque(v_lane);
    cp_async_wait<0>();  // K_j (and Q) landed for this thread's part...
    __syncthreads();     // ... and for everyone's; every warp is done with V_{j-1}
    load_tile<kBlockN, D>(v_smem, s.v + n0 * v_rs, v_rs, k_len - n0, p.aligned);
    cp_async_commit();

    // Causal: a warp whose last row sees no key of this block has nothing to add.
    const bool active = !CAUSAL || n0 <= warp_row0 + kWarpRows - 1 + diff;
    // P = softmax numerators, rounded to T, already in the A-operand layout of P V: for
    // k-step kc, registers a0..a3 = (row r, keys 2c, 2c+1 of key tile 2kc), (row r + 8,
    // same keys), (row r, key tile 2kc + 1), (row r + 8, key tile 2kc + 1).
    uint32_t p_frag[kMTiles][kPSteps][4];
    if (active) {
      // S = Q K^T.
      float score[kMTiles][kNTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int t = 0; t < kNTiles; ++t) score[mt][t][0] = score[mt][t][1] = score[mt][t][2] = score[mt][t][3] = 0.0f;
      }
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
        const uint32_t q_addr = q_base + (q_lane ^ (kk << 5)), k_addr = k_base + (k_lane ^ (kk << 5));
        uint32_t q_frag[kMTiles][4];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) ldmatrix_x4(q_frag[mt], q_addr + mt * kRows16);
#pragma unroll
        for (int np = 0; np < kNTiles / 2; ++np) {
          uint32_t b[4];
          ldmatrix_x4(b, k_addr + np * kRows16);
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            mma_16816<T>(score[mt][2 * np], q_frag[mt], b[0], b[1]);
            mma_16816<T>(score[mt][2 * np + 1], q_frag[mt], b[2], b[3]);
          }
        }
      }

      // Mask keys past the end and, causally, past the diagonal (only on the blocks where
      // either can happen for this warp's rows). The scores stay unscaled: the scale
      // (> 0, the launcher checks) enters the row max once per row and each score through
      // the one FFMA of its exponent below.
      const bool need_mask = n0 + kBlockN > k_len || (CAUSAL && n0 + kBlockN - 1 > warp_row0 + diff);
      if (need_mask) {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            // Row (mt, r) sees keys < limit; as an offset from this thread's first key
            // (n0 + quad_col), key column t * 8 + c is visible iff it is below `limit`.
            const int row = warp_row0 + mt * 16 + quad_row + r * 8;
            int limit = CAUSAL ? min(k_len, row + diff + 1) : k_len;
            limit -= n0 + quad_col;
#pragma unroll
            for (int t = 0; t < kNTiles; ++t) {
#pragma unroll
              for (int c = 0; c < 2; ++c) {
                if (t * 8 + c >= limit) score[mt][t][2 * r + c] = -INFINITY;
              }
            }
          }
        }
      }

      // Online softmax, per row (e >> 1 picks r): the 4 threads of a quad hold the row.
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float block_max = -INFINITY;
#pragma unroll
          for (int t = 0; t < kNTiles; ++t) {
            block_max = fmaxf(block_max, fmaxf(score[mt][t][2 * r], score[mt][t][2 * r + 1]));
          }
          block_max = fmaxf(block_max, __shfl_xor_sync(0xffffffffu, block_max, 1));
          block_max = fmaxf(block_max, __shfl_xor_sync(0xffffffffu, block_max, 2));
          const float new_max = fmaxf(row_max[mt][r], block_max * p.qk_scale);
          const float ref = new_max == -INFINITY ? 0.0f : new_max;  // nothing visible yet: p = 0, not NaN
          const float alpha = ptx::ex2_ftz(row_max[mt][r] - ref);
          row_max[mt][r] = new_max;
          float sum = 0.0f;
#pragma unroll
          for (int t = 0; t < kNTiles; ++t) {
            score[mt][t][2 * r] = ptx::ex2_ftz(fmaf(score[mt][t][2 * r], p.qk_scale, -ref));
            score[mt][t][2 * r + 1] = ptx::ex2_ftz(fmaf(score[mt][t][2 * r + 1], p.qk_scale, -ref));
            sum += score[mt][t][2 * r] + score[mt][t][2 * r + 1];
          }
          row_sum[mt][r] = row_sum[mt][r] * alpha + sum;
#pragma unroll
          for (int t = 0; t < kDTiles; ++t) {
            o_acc[mt][t][2 * r] *= alpha;
            o_acc[mt][t][2 * r + 1] *= alpha;
          }
        }
#pragma unroll
        for (int kc = 0; kc < kPSteps; ++kc) {
          p_frag[mt][kc][0] = pack2<T>(score[mt][2 * kc][0], score[mt][2 * kc][1]);
          p_frag[mt][kc][1] = pack2<T>(score[mt][2 * kc][2], score[mt][2 * kc][3]);
          p_frag[mt][kc][2] = pack2<T>(score[mt][2 * kc + 1][0], score[mt][2 * kc + 1][1]);
          p_frag[mt][kc][3] = pack2<T>(score[mt][2 * kc + 1][2], score[mt][2 * kc + 1][3]);
        }
      }
    }

    cp_async_wait<0>();  // V_j landed for this thread's part...
    __syncthreads();     // ... and for everyone's; every warp is done with K_j
    if (j + 1 < n_blocks) {
      load_tile<kBlockN, D>(k_smem, s.k + (n0 + kBlockN) * k_rs, k_rs, k_len - n0 - kBlockN, p.aligned);
    }
    cp_async_commit();

    if (active) {
      // O += P V.
#pragma unroll
      for (int dp = 0; dp < kDTiles / 2; ++dp) {
        const uint32_t v_addr = v_base + (v_lane ^ (dp << 5));
#pragma unroll
        for (int kc = 0; kc < kPSteps; ++kc) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, v_addr + kc * kRows16);
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            mma_16816<T>(o_acc[mt][2 * dp], p_frag[mt][kc], b[0], b[1]);
            mma_16816<T>(o_acc[mt][2 * dp + 1], p_frag[mt][kc], b[2], b[3]);
          }
        }
      }
    }
  }
  cp_async_wait<0>();  // with no key block, Q's copy may still be in flight
  __syncthreads();     // Q's shared memory is reused below

  // Epilogue: out = acc / l rounded to T, through the warp's own rows of Q's shared memory
  // (which only this warp read) so that the global stores are whole 16-byte chunks of a row.
  uint16_t* o_stage = q_smem + warp * kWarpRows * D;  // swizzled as a kWarpRows-row tile
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = row_sum[mt][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const bool seen = l > 0.0f;
      const float divisor = seen ? l : 1.0f;  // a row that saw nothing has acc = 0: out = 0
      const int row = mt * 16 + quad_row + r * 8;
      if ((lane & 3) == 0 && warp_row0 + row < q_len) {
        s.lse[warp_row0 + row] = seen ? (row_max[mt][r] + log2f(l)) / kLog2e : -INFINITY;
      }
#pragma unroll
      for (int t = 0; t < kDTiles; ++t) {
        *reinterpret_cast<uint32_t*>(o_stage + swizzled<D>(row, t) + quad_col) =
            pack2<T>(o_acc[mt][t][2 * r] / divisor, o_acc[mt][t][2 * r + 1] / divisor);
      }
    }
  }
  __syncwarp();
#pragma unroll
  for (int i = 0; i < kWarpRows * kChunks / 32; ++i) {
    const int idx = i * 32 + lane;
    const int row = idx / kChunks, chunk = idx % kChunks;
    const int q_row = warp_row0 + row;
    if (q_row < q_len) {
      const uint4 val = *reinterpret_cast<const uint4*>(o_stage + swizzled<D>(row, chunk));
      uint16_t* to = s.out + q_row * o_rs + chunk * 8;
      if (p.aligned) {
        ptx::st_global_16(to, val);
      } else {
        const uint32_t w[4] = {val.x, val.y, val.z, val.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          to[2 * e] = static_cast<uint16_t>(w[e] & 0xffffu);
          to[2 * e + 1] = static_cast<uint16_t>(w[e] >> 16);
        }
      }
    }
  }
}

template <typename T, int D, bool CAUSAL>
__global__ void __launch_bounds__(kThreads, 2) attn_fwd_kernel(const FwdParams p) {
  unsigned char* smem = dynamic_shared<unsigned char>();
  uint16_t* q_smem = reinterpret_cast<uint16_t*>(smem);
  uint16_t* k_smem = q_smem + kBlockM * D;
  uint16_t* v_smem = k_smem + kBlockN * D;

  const int bh = blockIdx.x;
  const int b = bh / p.q_heads, h = bh % p.q_heads, kv_h = h / p.group;
  int64_t q_start = 0, k_start = 0;
  SeqView s;
  s.q_len = p.seq_q;
  s.k_len = p.seq_k;
  if (p.cu_q != nullptr) {
    q_start = p.cu_q[b];
    k_start = p.cu_k[b];
    s.q_len = static_cast<int>(p.cu_q[b + 1] - q_start);
    s.k_len = static_cast<int>(p.cu_k[b + 1] - k_start);
  }
  const int64_t b64 = b;
  s.q = static_cast<const uint16_t*>(p.q) + b64 * p.q_stride[0] + q_start * p.q_stride[1] + h * p.q_stride[2];
  s.k = static_cast<const uint16_t*>(p.k) + b64 * p.k_stride[0] + k_start * p.k_stride[1] + kv_h * p.k_stride[2];
  s.v = static_cast<const uint16_t*>(p.v) + b64 * p.v_stride[0] + k_start * p.v_stride[1] + kv_h * p.v_stride[2];
  s.out = static_cast<uint16_t*>(p.out) + b64 * p.o_stride[0] + q_start * p.o_stride[1] + h * p.o_stride[2];
  s.lse = p.lse + b64 * p.lse_stride[0] + h * p.lse_stride[1] + q_start;

  for (int y = blockIdx.y; y < p.num_m_blocks; y += gridDim.y) {
    const int m0 = (p.num_m_blocks - 1 - y) * kBlockM;  // last query block first
    if (m0 >= s.q_len) continue;  // a shorter sequence of a varlen batch
    attn_fwd_block<T, D, CAUSAL>(p, s, m0, q_smem, k_smem, v_smem);
  }
}

template <typename T, int D, bool CAUSAL>
void launch_attn_fwd(const FwdParams& p, dim3 grid, const Launch& at) {
  auto kernel = attn_fwd_kernel<T, D, CAUSAL>;
  constexpr size_t kSmem = smem_bytes<D>();
  static SharedRaised smem_raised;
  allow_dynamic_shared(kernel, static_cast<int>(kSmem), at.device, smem_raised, kAttnFwdName);
  launch(kernel, grid, kThreads, kSmem, at, p);
}

template <typename T>
void launch_for_dtype(const FwdParams& p, int64_t head_dim, bool causal, dim3 grid, const Launch& at) {
  if (head_dim == 64) {
    causal ? launch_attn_fwd<T, 64, true>(p, grid, at) : launch_attn_fwd<T, 64, false>(p, grid, at);
  } else {
    causal ? launch_attn_fwd<T, 128, true>(p, grid, at) : launch_attn_fwd<T, 128, false>(p, grid, at);
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

void attn_fwd(const AttnFwdArgs& a, const Launch& at) {
  begin_launch(at, kAttnFwdName);
  if (a.dtype != DType::kFloat16 && a.dtype != DType::kBFloat16) {
    fail(kAttnFwdName, "dtype code " + std::to_string(static_cast<int>(a.dtype)) +
                           " is not supported (float16 and bfloat16 only; float32 goes to Triton)");
  }
  if (a.head_dim != 64 && a.head_dim != 128) {
    fail(kAttnFwdName, "head_dim " + std::to_string(a.head_dim) + " is not supported (64 or 128 only)");
  }
  if ((a.cu_q == nullptr) != (a.cu_k == nullptr)) fail(kAttnFwdName, "cu_q and cu_k must both be given or both be null");
  if (a.batch < 0 || a.q_heads < 0 || a.seq_q < 0 || a.seq_k < 0) fail(kAttnFwdName, "negative size");
  if (a.batch == 0 || a.q_heads == 0 || a.seq_q == 0) return;  // no query rows: nothing to write
  if (a.kv_heads <= 0 || a.q_heads % a.kv_heads != 0) {
    fail(kAttnFwdName, "q_heads (" + std::to_string(a.q_heads) + ") must be a multiple of kv_heads (" +
                           std::to_string(a.kv_heads) + ")");
  }
  // Row indices inside a sequence are int32 on the device (with room for a block's overshoot).
  constexpr int64_t kMaxLen = std::numeric_limits<int32_t>::max() - 2 * kBlockM;
  if (a.seq_q > kMaxLen || a.seq_k > kMaxLen) fail(kAttnFwdName, "sequence longer than 2^31 - 257 rows");
  if (a.batch * a.q_heads > std::numeric_limits<int32_t>::max()) fail(kAttnFwdName, "batch x q_heads exceeds 2^31 - 1");
  // The row max is taken on unscaled scores, which needs a positive scale.
  if (!(a.scale > 0.0f)) fail(kAttnFwdName, "softmax scale must be positive, got " + std::to_string(a.scale));

  FwdParams p{};
  p.q = a.q;
  p.k = a.k;
  p.v = a.v;
  p.out = a.out;
  p.lse = a.lse;
  p.cu_q = a.cu_q;
  p.cu_k = a.cu_k;
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = a.q_stride[i];
    p.k_stride[i] = a.k_stride[i];
    p.v_stride[i] = a.v_stride[i];
    p.o_stride[i] = a.o_stride[i];
  }
  // 16-byte copies need every row start 16-byte aligned. A stride only matters along a
  // dimension with more than one index (torch gives size-1 dims arbitrary strides).
  const bool varlen = a.cu_q != nullptr;
  const int64_t q_extent[3] = {varlen ? 1 : a.batch, varlen || a.seq_q > 1 ? 2 : 1, a.q_heads};
  const int64_t k_extent[3] = {varlen ? 1 : a.batch, varlen || a.seq_k > 1 ? 2 : 1, a.kv_heads};
  bool strides_ok = true;
  for (int i = 0; i < 3; ++i) {
    strides_ok = strides_ok && (q_extent[i] <= 1 || (a.q_stride[i] % 8 == 0 && a.o_stride[i] % 8 == 0));
    strides_ok = strides_ok && (k_extent[i] <= 1 || (a.k_stride[i] % 8 == 0 && a.v_stride[i] % 8 == 0));
  }
  p.lse_stride[0] = a.lse_stride[0];
  p.lse_stride[1] = a.lse_stride[1];
  p.q_heads = static_cast<int>(a.q_heads);
  p.group = static_cast<int>(a.q_heads / a.kv_heads);
  p.seq_q = static_cast<int>(a.seq_q);
  p.seq_k = static_cast<int>(a.seq_k);
  p.num_m_blocks = static_cast<int>(ceil_div(a.seq_q, kBlockM));
  p.qk_scale = static_cast<float>(static_cast<double>(a.scale) * 1.4426950408889634);  // as Triton's scale * LOG2E
  p.aligned = strides_ok && aligned16(a.q) && aligned16(a.k) && aligned16(a.v) && aligned16(a.out);

  const dim3 grid(static_cast<unsigned>(a.batch * a.q_heads),
                  static_cast<unsigned>(std::min<int64_t>(p.num_m_blocks, kMaxGridY)));
  if (a.dtype == DType::kBFloat16) {
    launch_for_dtype<__nv_bfloat16>(p, a.head_dim, a.causal, grid, at);
  } else {
    launch_for_dtype<__half>(p, a.head_dim, a.causal, grid, at);
  }
  end_launch(kAttnFwdName);
}

}  // namespace llama_fast
