// Flash-Decoding: attention of a few new query tokens (Sq = 1, or a handful for speculative
// decoding) over a KV cache, split across blocks along the cache length, plus a combine
// kernel that merges the splits. Semantics: llama_fast.h (DecodeArgs) and
// llama_fast/reference.py `decode`; the Triton twin is kernels/flash_decode.py.
//
// Decoding reads the whole cache for very little arithmetic (group * Sq multiply-adds per
// cached value and per product, i.e. a few per byte), so the split kernel is built around
// reading K and V once, with 16-byte loads, and keeping enough bytes in flight:
//
// * One block per (split, kv head, batch): grid (num_splits, kv_heads, min(batch, 65535)),
//   batch looped inside for larger batches. The block owns every query row that reads its
//   kv head: the group's query heads times the Sq tokens (row r = head r / Sq of the group,
//   token r % Sq, as in the Triton kernel), up to 64 rows, so each K/V element is read from
//   memory once per split rather than once per query head.
// * The block walks its key tiles (kBlockN = 64 keys, 32 where a K + V tile would pass
//   32 KiB: head dim 256, or float32 beyond head dim 64) with a two-stage cp.async pipeline
//   into shared memory: tile t+1 is in flight while tile t is computed (32 KiB per tile at
//   head dim 128 in 16-bit types; with 2-3 resident blocks per SM that is far more than the
//   ~25 KiB per SM that H100 needs in flight to stream at full bandwidth). 3 blocks fit an
//   H100 SM at head dim 128 and group * Sq <= 8 (72-74 KiB of shared memory each). Keys
//   past the valid length are zero-filled by cp.async itself, so the stale or never-written
//   part of the cache (possibly NaN) never reaches the arithmetic.
// * Shared-memory tiles are stored in 16-byte chunks, chunk c of key row n at position
//   c ^ (n % 8): the score phase reads one key per lane (32 rows, same chunk) and the
//   P @ V phase one row across the lanes; the XOR swizzle makes both conflict-free.
// * Math on CUDA cores in float32 (tensor cores would need 16-row tiles of which 4-8 rows
//   are real; CUDA cores have ample headroom at a few multiply-adds per byte):
//     scores: lane = key (kBlockN / 32 keys per lane), warps split the rows and, when the
//             rows are few, the head dim (partial scores summed through shared memory);
//             q sits in shared memory in float32, pre-multiplied by scale * log2(e), and is
//             read as broadcast float4s;
//     softmax: each row belongs to one warp, lane = key; online softmax in base 2 with the
//             running max and sum in that warp's registers; P goes to shared memory as
//             float32 (not rounded to the input dtype: closer to the float32 reference);
//     P @ V: lane = a slice of the head dim, warps split the tile's keys (and the rows when
//             the accumulator would pass 64 registers); each warp keeps its own partial
//             accumulator, summed over the warps once at the end of the split.
// * num_splits == 1: the split kernel writes out directly (rounded to the dtype once).
//   num_splits > 1: each split writes its NORMALISED float32 partial output
//   o_part[(row * num_splits + split) * D + d] and its log-sum-exp IN BASE 2 (log2 of the
//   sum of 2^(score * scale * log2 e)) lse_part[row * num_splits + split], -inf (and zeros)
//   for a split that saw no key; rows = B * Sq * Hq in (b, s, h) order. The combine kernel
//   weighs split s by 2^(lse_s - max lse) and writes 0 when every split is empty.
//
// Split assignment: the valid length n = clamp(cache_seqlens[b], 0, Smax) is read on the
// device, and its ceil(n / kBlockN) tiles are dealt out in contiguous runs of
// ceil(tiles / num_splits) over the splits (as the Triton kernel does), so a short sequence
// in a long cache still spreads over every split instead of leaving most of them idle.
// Splits left without tiles still write their (empty) partials. Nothing depends on n on the
// host: grid, shared memory and scratch sizes come from shapes only (CUDA-graph safe).
//
// Supported: float32, float16, bfloat16; any head dim up to 256 (compiled for padded head
// dims 64, 128 and 256; other sizes are zero-padded in shared memory); any strides, with
// copies as wide as pointer and stride alignment allow (16 bytes down to 2, the 2-byte ones
// synchronous);
// group * Sq up to 64 rows (row tiles of 4 to 64, see dispatch_rows; more rows fail with a
// message). Larger row counts cost CUDA-core time in proportion: from ~16 rows on (e.g.
// GQA 8 with 2+ speculative tokens) the kernel turns compute-bound; tensor cores would be
// the next step there.
#include <atomic>
#include <climits>
#include <string>

#include "common.cuh"
#include "ptx.cuh"

namespace llama_fast {

// Key block size of the split kernel, for the caller: it keeps num_splits <=
// ceil(seqlen_max / kDecodeBlockN), since more splits than key blocks only add empty splits.
// (Tiles are 64 keys at head dims <= 128 in 16-bit types; head dim 256 and float32 beyond
// head dim 64 use 32-key tiles, which only makes splits finer, never emptier.)
constexpr int kDecodeBlockN = 64;

namespace {

constexpr const char* kSplitKernelName = "flash_decode";
constexpr const char* kCombineKernelName = "flash_decode_combine";
constexpr float kLog2e = 1.4426950408889634f;
constexpr int kMaxRows = 64;
constexpr int kMaxHeadDim = 256;

// Compile-time shape of one split-kernel instantiation.
template <typename T, int HEAD_DIM_PAD, int ROWS_PAD>
struct DecodeShape {
  static constexpr int kElemBytes = static_cast<int>(sizeof(T));
  // Keys per tile: kDecodeBlockN while a K + V tile stays within 32 KiB, else 32.
  static constexpr int kBlockN = 2 * kDecodeBlockN * HEAD_DIM_PAD * kElemBytes <= 32768 ? kDecodeBlockN : 32;
  static constexpr int kKeysPerLane = kBlockN / 32;
  static constexpr int kChunk = 16 / kElemBytes;  // elements per 16-byte shared-memory chunk
  static constexpr int kChunksPerRow = HEAD_DIM_PAD / kChunk;
  // 8 warps only where 4 would need more than 64 accumulator registers per thread.
  static constexpr int kWarps = ROWS_PAD * HEAD_DIM_PAD > 8192 ? 8 : 4;
  static constexpr int kThreads = 32 * kWarps;

  // Scores: warps split the rows into groups of >= 4 (fewer rows: split the head dim).
  static constexpr int kQkRowSplit = ROWS_PAD / 4 < kWarps ? ROWS_PAD / 4 : kWarps;
  static constexpr int kQkDimSplit = kWarps / kQkRowSplit;
  static constexpr int kQkRowsPerWarp = ROWS_PAD / kQkRowSplit;
  static constexpr int kQkChunksPerWarp = kChunksPerRow / kQkDimSplit;
  // Unroll the chunk loop only while its body is small (compile time, registers).
  static constexpr int kQkUnroll = kQkRowsPerWarp * kKeysPerLane * kChunk <= 64 ? 4 : 1;

  // Softmax: row r belongs to warp r % kWarps.
  static constexpr int kSmRowsPerWarp = ROWS_PAD / kWarps;

  // P @ V: lane owns kDimsPerLane consecutive dims; warps split keys, and rows when the
  // accumulator (rows x dims per thread) would pass 64 floats.
  static constexpr int kDimsPerLane = HEAD_DIM_PAD / 32;
  static constexpr int kPvRowGroups = ROWS_PAD * kDimsPerLane > 64 ? ROWS_PAD * kDimsPerLane / 64 : 1;
  static constexpr int kPvKeyGroups = kWarps / kPvRowGroups;
  static constexpr int kPvRowsPerThread = ROWS_PAD / kPvRowGroups;
  static constexpr int kPvKeysPerWarp = kBlockN / kPvKeyGroups;
  static constexpr int kPvUnroll = kPvRowsPerThread * kDimsPerLane <= 16 ? 4 : kPvRowsPerThread * kDimsPerLane <= 32 ? 2 : 1;

  // Shared memory, in bytes from the start: [stage][K | V][kBlockN][HEAD_DIM_PAD] of T,
  // then float32 q [ROWS_PAD][HEAD_DIM_PAD], partial scores [kQkDimSplit][ROWS_PAD][kBlockN],
  // probabilities [kBlockN][kPStride] (transposed so P @ V reads 4 rows per float4; from
  // 16 rows on, the stride padding spreads the softmax's column writes over 8 banks; at 8
  // rows the 1 KiB it would cost is what keeps 3 blocks per SM at head dim 128), per-row alpha,
  // 1/l, lse and query position. At the end of a split the K/V area holds the warps'
  // partial accumulators [kPvKeyGroups][ROWS_PAD][HEAD_DIM_PAD].
  static constexpr int kStages = 2;
  static constexpr int kTileElems = kBlockN * HEAD_DIM_PAD;
  static constexpr int kStageElems = 2 * kTileElems;
  static constexpr int kPStride = ROWS_PAD + (ROWS_PAD >= 16 ? 4 : 0);
  static constexpr int kKvBytes = kStages * kStageElems * kElemBytes;
  static constexpr int kQFloats = ROWS_PAD * HEAD_DIM_PAD;
  static constexpr int kSPartFloats = kQkDimSplit * ROWS_PAD * kBlockN;
  static constexpr int kPFloats = kBlockN * kPStride;
  static constexpr int kSmemBytes = kKvBytes + 4 * (kQFloats + kSPartFloats + kPFloats + 4 * ROWS_PAD);
  // Blocks per SM that H100's shared memory holds (228 KiB, 1 KiB reserved per block), at
  // most 3: the register budget ptxas gets (65536 / (threads * blocks)).
  static constexpr int kSmemBlocks = 228 * 1024 / (kSmemBytes + 1024);
  static constexpr int kMinBlocks = kSmemBlocks < 1 ? 1 : kSmemBlocks > 3 ? 3 : kSmemBlocks;

  static_assert(ROWS_PAD >= 4 && ROWS_PAD <= kMaxRows, "rows per block");
  static_assert(kKeysPerLane >= 1 && kBlockN % 32 == 0, "keys per lane");
  static_assert(kChunksPerRow >= 8, "the XOR swizzle permutes 8 chunks (128 bytes) per row");
  static_assert(kQkRowSplit * kQkDimSplit == kWarps && kChunksPerRow % kQkDimSplit == 0, "score split");
  static_assert(kSmRowsPerWarp >= 1, "softmax rows");
  static_assert(kPvRowGroups * kPvKeyGroups == kWarps && kPvRowsPerThread % 4 == 0, "P @ V split");
  static_assert(kPvRowsPerThread * kDimsPerLane <= 64, "accumulator registers");
  static_assert(kBlockN % kPvKeyGroups == 0, "keys per P @ V warp");
  static_assert(kPvKeyGroups * ROWS_PAD * HEAD_DIM_PAD * 4 <= kKvBytes, "accumulator scratch fits the K/V area");
};

struct DecodeParams {
  const void* q;
  const void* k;
  const void* v;
  const int32_t* seqlens;
  void* out;
  float* o_part;
  float* lse_part;
  int batch, q_len, q_heads, kv_heads, group, rows, head_dim, num_splits, seqlen_max;
  int copy_bytes;  // bytes per K/V global->shared copy: 16, 8, 4 or 2
  int64_t q_stride[3], k_stride[3], v_stride[3], o_stride[3];
  float qk_scale;  // scale * log2(e): scores in base-2 units
};

// ---------------------------------------------------------------------------------------
// Global -> shared copies: cp.async (ptx.cuh) for 4, 8 and 16 bytes, a plain store for 2.
// valid == false fills the destination with zeros without reading the source.

template <int BYTES>
__device__ __forceinline__ void copy_to_shared(void* dst, const void* src, bool valid) {
  if constexpr (BYTES >= 4) {
    const uint32_t dst_addr = ptx::smem_addr(dst);
    const int src_bytes = valid ? BYTES : 0;
    if constexpr (BYTES == 16) {
      ptx::cp_async_cg_16(dst_addr, src, src_bytes);
    } else {
      ptx::cp_async_ca<BYTES>(dst_addr, src, src_bytes);
    }
  } else {
    static_assert(BYTES == 2, "copy size");
    *static_cast<uint16_t*>(dst) = valid ? *static_cast<const uint16_t*>(src) : static_cast<uint16_t>(0);
  }
}

__device__ __forceinline__ void copy_commit() { ptx::cp_async_commit(); }

__device__ __forceinline__ void copy_wait_all() { ptx::cp_async_wait_all(); }

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// Element offset of (key row, logical 16-byte chunk) in a swizzled tile.
template <int HEAD_DIM_PAD, int CHUNK>
__device__ __forceinline__ int tile_offset(int key, int chunk) {
  return key * HEAD_DIM_PAD + ((chunk ^ (key & 7)) * CHUNK);
}

// Copies keys [key0, key0 + kBlockN) of one (batch, kv head) slice of the K and V caches
// into a shared-memory stage; keys >= n become zeros. Fast path: full 16-byte chunks of an
// unpadded head dim (compile-time trip counts); otherwise units of copy_bytes over the
// head_dim real elements (the padding columns were zeroed once per split).
template <typename T, int HEAD_DIM_PAD, int ROWS_PAD>
__device__ __forceinline__ void load_tile(T* stage, const T* k_base, const T* v_base, int64_t k_row_stride,
                                          int64_t v_row_stride, int key0, int n, const DecodeParams& p) {
  using S = DecodeShape<T, HEAD_DIM_PAD, ROWS_PAD>;
  T* k_tile = stage;
  T* v_tile = stage + S::kTileElems;
  if (p.head_dim == HEAD_DIM_PAD && p.copy_bytes == 16) {
    constexpr int kUnits = S::kBlockN * S::kChunksPerRow;
    static_assert(kUnits % S::kThreads == 0, "whole copy rounds");
    // Each thread keeps one chunk column and steps down the keys kKeysPerRound at a time.
    static_assert(S::kThreads % S::kChunksPerRow == 0, "a thread keeps its chunk column");
    constexpr int kKeysPerRound = S::kThreads / S::kChunksPerRow;
    const int chunk = threadIdx.x % S::kChunksPerRow, key_first = threadIdx.x / S::kChunksPerRow;
    const T* k_src = k_base + (key0 + key_first) * k_row_stride + chunk * S::kChunk;
    const T* v_src = v_base + (key0 + key_first) * v_row_stride + chunk * S::kChunk;
#pragma unroll
    for (int round = 0; round < kUnits / S::kThreads; ++round) {
      const int key = key_first + round * kKeysPerRound;
      const bool valid = key0 + key < n;  // else zero-filled; the source is not read
      const int dst = tile_offset<HEAD_DIM_PAD, S::kChunk>(key, chunk);
      copy_to_shared<16>(k_tile + dst, valid ? k_src : k_base, valid);
      copy_to_shared<16>(v_tile + dst, valid ? v_src : v_base, valid);
      k_src += kKeysPerRound * k_row_stride;
      v_src += kKeysPerRound * v_row_stride;
    }
    return;
  }
  const int vec = p.copy_bytes / S::kElemBytes;
  const int units_per_row = p.head_dim / vec;
  const int units = S::kBlockN * units_per_row;
  for (int i = threadIdx.x; i < units; i += S::kThreads) {
    const int key = i / units_per_row;
    const int d = (i - key * units_per_row) * vec;
    const int j = key0 + key;
    const bool valid = j < n;
    const int dst = tile_offset<HEAD_DIM_PAD, S::kChunk>(key, d / S::kChunk) + d % S::kChunk;
    const T* k_src = k_base + (valid ? j * k_row_stride + d : 0);
    const T* v_src = v_base + (valid ? j * v_row_stride + d : 0);
    switch (p.copy_bytes) {
      case 16:
        copy_to_shared<16>(k_tile + dst, k_src, valid);
        copy_to_shared<16>(v_tile + dst, v_src, valid);
        break;
      case 8:
        copy_to_shared<8>(k_tile + dst, k_src, valid);
        copy_to_shared<8>(v_tile + dst, v_src, valid);
        break;
      case 4:
        copy_to_shared<4>(k_tile + dst, k_src, valid);
        copy_to_shared<4>(v_tile + dst, v_src, valid);
        break;
      default:
        if constexpr (sizeof(T) == 2) {
          copy_to_shared<2>(k_tile + dst, k_src, valid);
          copy_to_shared<2>(v_tile + dst, v_src, valid);
        }
        break;
    }
  }
}

// One (split, kv head, batch) of the split kernel.
template <typename T, int HEAD_DIM_PAD, int ROWS_PAD>
__device__ __forceinline__ void decode_split_one(const DecodeParams& p, int b, unsigned char* smem) {
  using S = DecodeShape<T, HEAD_DIM_PAD, ROWS_PAD>;
  constexpr int kN = S::kBlockN;
  constexpr int kChunk = S::kChunk;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int split = blockIdx.x, kv_head = blockIdx.y;

  T* kv_s = reinterpret_cast<T*>(smem);
  float* q_s = reinterpret_cast<float*>(smem + S::kKvBytes);
  float* s_part = q_s + S::kQFloats;
  float* p_s = s_part + S::kSPartFloats;
  float* alpha_s = p_s + S::kPFloats;
  float* inv_l_s = alpha_s + ROWS_PAD;
  float* lse_s = inv_l_s + ROWS_PAD;
  int* q_pos_s = reinterpret_cast<int*>(lse_s + ROWS_PAD);

  // The valid length, clamped on the device, and this split's run of tiles.
  const int n = min(max(p.seqlens[b], 0), p.seqlen_max);
  const int n_tiles = (n + kN - 1) / kN;
  const int per_split = (n_tiles + p.num_splits - 1) / p.num_splits;
  const int tile_lo = min(split * per_split, n_tiles);  // <= n_tiles + num_splits: no overflow
  const int tile_hi = min(tile_lo + per_split, n_tiles);

  const T* k_base = static_cast<const T*>(p.k) + b * p.k_stride[0] + kv_head * p.k_stride[2];
  const T* v_base = static_cast<const T*>(p.v) + b * p.v_stride[0] + kv_head * p.v_stride[2];

  // Zero the padding columns of both stages (never written by the copies): padded K
  // columns meet zero q columns, and 0 * garbage could be NaN.
  if (p.head_dim < HEAD_DIM_PAD) {
    const int pad = HEAD_DIM_PAD - p.head_dim;
    for (int i = tid; i < S::kStages * 2 * kN * pad; i += S::kThreads) {
      const int row = i / pad, d = p.head_dim + (i - row * pad);
      kv_s[tile_offset<HEAD_DIM_PAD, kChunk>(row, d / kChunk) + d % kChunk] = from_float<T>(0.0f);
    }
  }
  // Prefetch the first tile while q is staged.
  if (tile_lo < tile_hi) {
    load_tile<T, HEAD_DIM_PAD, ROWS_PAD>(kv_s, k_base, v_base, p.k_stride[1], p.v_stride[1], tile_lo * kN, n, p);
  }
  copy_commit();

  // q rows of this kv head, scaled into base-2 score units; padding rows/columns are 0.
  for (int i = tid; i < S::kQFloats; i += S::kThreads) {
    const int r = i / HEAD_DIM_PAD, d = i % HEAD_DIM_PAD;
    float x = 0.0f;
    if (r < p.rows && d < p.head_dim) {
      const int g = r / p.q_len, t = r - g * p.q_len;
      const int64_t head = static_cast<int64_t>(kv_head) * p.group + g;
      x = to_float<T>(static_cast<const T*>(p.q)[b * p.q_stride[0] + t * p.q_stride[1] + head * p.q_stride[2] + d]) *
          p.qk_scale;
    }
    q_s[i] = x;
  }
  // Row r (token t) sees keys j <= n - q_len + t; padding rows see nothing.
  for (int r = tid; r < ROWS_PAD; r += S::kThreads) {
    q_pos_s[r] = r < p.rows ? n - p.q_len + r % p.q_len : -1;
  }

  // Per-thread state. Softmax: rows warp + i * kWarps (running max, and this lane's share
  // of the running sum). P @ V: rows pv_row0.., dims lane * kDimsPerLane.., keys of the
  // warp's key group.
  float m_run[S::kSmRowsPerWarp], l_run[S::kSmRowsPerWarp];
#pragma unroll
  for (int i = 0; i < S::kSmRowsPerWarp; ++i) {
    m_run[i] = -INFINITY;
    l_run[i] = 0.0f;
  }
  const int pv_key_group = warp % S::kPvKeyGroups;
  const int pv_row0 = (warp / S::kPvKeyGroups) * S::kPvRowsPerThread;
  const int pv_dim0 = lane * S::kDimsPerLane;
  float acc[S::kPvRowsPerThread][S::kDimsPerLane];
#pragma unroll
  for (int r = 0; r < S::kPvRowsPerThread; ++r) {
#pragma unroll
    for (int e = 0; e < S::kDimsPerLane; ++e) acc[r][e] = 0.0f;
  }

  for (int tile = tile_lo; tile < tile_hi; ++tile) {
    const T* k_tile = kv_s + ((tile - tile_lo) & 1) * S::kStageElems;
    const T* v_tile = k_tile + S::kTileElems;
    const int key0 = tile * kN;
    copy_wait_all();
    // Tile visible to all; every thread is done with the previous tile (its stage, scores,
    // probabilities and alphas), so the other stage can be refilled.
    __syncthreads();
    if (tile + 1 < tile_hi) {
      load_tile<T, HEAD_DIM_PAD, ROWS_PAD>(kv_s + ((tile + 1 - tile_lo) & 1) * S::kStageElems, k_base, v_base,
                                           p.k_stride[1], p.v_stride[1], key0 + kN, n, p);
    }
    copy_commit();

    // Scores (partial over this warp's slice of the head dim): lane = key.
    {
      const int qk_dim_part = warp % S::kQkDimSplit;
      const int qk_row0 = (warp / S::kQkDimSplit) * S::kQkRowsPerWarp;
      float s[S::kQkRowsPerWarp][S::kKeysPerLane];
#pragma unroll
      for (int r = 0; r < S::kQkRowsPerWarp; ++r) {
#pragma unroll
        for (int k = 0; k < S::kKeysPerLane; ++k) s[r][k] = 0.0f;
      }
#pragma unroll S::kQkUnroll
      for (int cc = 0; cc < S::kQkChunksPerWarp; ++cc) {
        const int chunk = qk_dim_part * S::kQkChunksPerWarp + cc;
        float kf[S::kKeysPerLane][kChunk];
#pragma unroll
        for (int k = 0; k < S::kKeysPerLane; ++k) {
          const int key = lane + 32 * k;
          const Pack<T, kChunk> pack =
              *reinterpret_cast<const Pack<T, kChunk>*>(k_tile + tile_offset<HEAD_DIM_PAD, kChunk>(key, chunk));
#pragma unroll
          for (int e = 0; e < kChunk; ++e) kf[k][e] = to_float<T>(pack.v[e]);
        }
#pragma unroll
        for (int r = 0; r < S::kQkRowsPerWarp; ++r) {
          const float4* qv = reinterpret_cast<const float4*>(q_s + (qk_row0 + r) * HEAD_DIM_PAD + chunk * kChunk);
#pragma unroll
          for (int f = 0; f < kChunk / 4; ++f) {
            const float4 q4 = qv[f];  // same address across the warp: a broadcast
#pragma unroll
            for (int k = 0; k < S::kKeysPerLane; ++k) {
              s[r][k] = fmaf(q4.x, kf[k][4 * f + 0], s[r][k]);
              s[r][k] = fmaf(q4.y, kf[k][4 * f + 1], s[r][k]);
              s[r][k] = fmaf(q4.z, kf[k][4 * f + 2], s[r][k]);
              s[r][k] = fmaf(q4.w, kf[k][4 * f + 3], s[r][k]);
            }
          }
        }
      }
#pragma unroll
      for (int r = 0; r < S::kQkRowsPerWarp; ++r) {
#pragma unroll
        for (int k = 0; k < S::kKeysPerLane; ++k) {
          s_part[(qk_dim_part * ROWS_PAD + qk_row0 + r) * kN + lane + 32 * k] = s[r][k];
        }
      }
    }
    __syncthreads();

    // Online softmax (base 2) of the rows this warp owns: lane = key.
#pragma unroll
    for (int i = 0; i < S::kSmRowsPerWarp; ++i) {
      const int row = warp + i * S::kWarps;
      const int q_pos = q_pos_s[row];
      float sv[S::kKeysPerLane];
      float tile_max = -INFINITY;
#pragma unroll
      for (int k = 0; k < S::kKeysPerLane; ++k) {
        const int key = lane + 32 * k;
        float x = 0.0f;
#pragma unroll
        for (int part = 0; part < S::kQkDimSplit; ++part) x += s_part[(part * ROWS_PAD + row) * kN + key];
        // j <= q_pos <= n - 1 also keeps keys past the valid length out.
        sv[k] = key0 + key <= q_pos ? x : -INFINITY;
        tile_max = fmaxf(tile_max, sv[k]);
      }
      const float m_new = fmaxf(m_run[i], warp_max(tile_max));
      // A row with no visible key so far keeps m = -inf; exponentiate against 0 then (every
      // p and alpha is 2^-inf = 0) instead of computing -inf - -inf = NaN.
      const float m_ref = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = exp2f(m_run[i] - m_ref);
      float p_sum = 0.0f;
#pragma unroll
      for (int k = 0; k < S::kKeysPerLane; ++k) {
        const float prob = exp2f(sv[k] - m_ref);
        p_s[(lane + 32 * k) * S::kPStride + row] = prob;
        p_sum += prob;
      }
      l_run[i] = l_run[i] * alpha + p_sum;
      m_run[i] = m_new;
      if (lane == 0) alpha_s[row] = alpha;
    }
    __syncthreads();

    // acc = acc * alpha + P @ V over this warp's keys: lane = dims.
#pragma unroll
    for (int r = 0; r < S::kPvRowsPerThread; ++r) {
      const float alpha = alpha_s[pv_row0 + r];
#pragma unroll
      for (int e = 0; e < S::kDimsPerLane; ++e) acc[r][e] *= alpha;
    }
    constexpr int kSub = S::kDimsPerLane < kChunk ? S::kDimsPerLane : kChunk;  // elements per smem load
#pragma unroll S::kPvUnroll
    for (int kk = 0; kk < S::kPvKeysPerWarp; ++kk) {
      const int key = pv_key_group * S::kPvKeysPerWarp + kk;
      float vf[S::kDimsPerLane];
#pragma unroll
      for (int sub = 0; sub < S::kDimsPerLane / kSub; ++sub) {
        const int d = pv_dim0 + sub * kSub;
        const Pack<T, kSub> pack = *reinterpret_cast<const Pack<T, kSub>*>(
            v_tile + tile_offset<HEAD_DIM_PAD, kChunk>(key, d / kChunk) + d % kChunk);
#pragma unroll
        for (int e = 0; e < kSub; ++e) vf[sub * kSub + e] = to_float<T>(pack.v[e]);
      }
      const float4* prob4 = reinterpret_cast<const float4*>(p_s + key * S::kPStride + pv_row0);
#pragma unroll
      for (int r4 = 0; r4 < S::kPvRowsPerThread / 4; ++r4) {
        const float4 pr = prob4[r4];  // broadcast
        const float prob[4] = {pr.x, pr.y, pr.z, pr.w};
#pragma unroll
        for (int rr = 0; rr < 4; ++rr) {
#pragma unroll
          for (int e = 0; e < S::kDimsPerLane; ++e) acc[4 * r4 + rr][e] = fmaf(prob[rr], vf[e], acc[4 * r4 + rr][e]);
        }
      }
    }
  }

  // Row totals: 1/l and the base-2 log-sum-exp (rows without a visible key: 0 and -inf).
#pragma unroll
  for (int i = 0; i < S::kSmRowsPerWarp; ++i) {
    const int row = warp + i * S::kWarps;
    const float l = warp_sum(l_run[i]);
    if (lane == 0) {
      inv_l_s[row] = l > 0.0f ? 1.0f / l : 0.0f;
      lse_s[row] = l > 0.0f ? m_run[i] + log2f(l) : -INFINITY;
    }
  }
  // Every thread is past its last P @ V (and no copy is in flight: the last tile issued
  // none), so the K/V area can take the partial accumulators.
  __syncthreads();
  float* acc_s = reinterpret_cast<float*>(kv_s);  // [kPvKeyGroups][ROWS_PAD][HEAD_DIM_PAD]
#pragma unroll
  for (int r = 0; r < S::kPvRowsPerThread; ++r) {
    float* dst = acc_s + (pv_key_group * ROWS_PAD + pv_row0 + r) * HEAD_DIM_PAD + pv_dim0;
    if constexpr (S::kDimsPerLane % 4 == 0) {
#pragma unroll
      for (int e = 0; e < S::kDimsPerLane; e += 4) {
        *reinterpret_cast<float4*>(dst + e) = make_float4(acc[r][e], acc[r][e + 1], acc[r][e + 2], acc[r][e + 3]);
      }
    } else {
#pragma unroll
      for (int e = 0; e < S::kDimsPerLane; e += 2) *reinterpret_cast<float2*>(dst + e) = make_float2(acc[r][e], acc[r][e + 1]);
    }
  }
  __syncthreads();

  // Sum the key groups, normalise, write: out (one split) or this split's partial.
  const bool direct = p.num_splits == 1;
  for (int i = tid; i < p.rows * p.head_dim; i += S::kThreads) {
    const int r = i / p.head_dim, d = i - r * p.head_dim;
    float x = 0.0f;
#pragma unroll
    for (int kg = 0; kg < S::kPvKeyGroups; ++kg) x += acc_s[(kg * ROWS_PAD + r) * HEAD_DIM_PAD + d];
    x *= inv_l_s[r];
    const int g = r / p.q_len, t = r - g * p.q_len;
    const int64_t head = static_cast<int64_t>(kv_head) * p.group + g;
    if (direct) {
      static_cast<T*>(p.out)[b * p.o_stride[0] + t * p.o_stride[1] + head * p.o_stride[2] + d] = from_float<T>(x);
    } else {
      const int64_t row_id = (static_cast<int64_t>(b) * p.q_len + t) * p.q_heads + head;
      p.o_part[(row_id * p.num_splits + split) * p.head_dim + d] = x;
    }
  }
  if (!direct) {
    for (int r = tid; r < p.rows; r += S::kThreads) {
      const int g = r / p.q_len, t = r - g * p.q_len;
      const int64_t head = static_cast<int64_t>(kv_head) * p.group + g;
      const int64_t row_id = (static_cast<int64_t>(b) * p.q_len + t) * p.q_heads + head;
      p.lse_part[row_id * p.num_splits + split] = lse_s[r];
    }
  }
}

template <typename T, int HEAD_DIM_PAD, int ROWS_PAD>
__global__ void __launch_bounds__(DecodeShape<T, HEAD_DIM_PAD, ROWS_PAD>::kThreads,
                                  DecodeShape<T, HEAD_DIM_PAD, ROWS_PAD>::kMinBlocks)
    decode_split_kernel(const DecodeParams p) {
  unsigned char* smem = dynamic_shared<unsigned char>();
  for (int b = blockIdx.z; b < p.batch; b += gridDim.z) {
    decode_split_one<T, HEAD_DIM_PAD, ROWS_PAD>(p, b, smem);
    __syncthreads();  // the next batch entry reuses all of shared memory
  }
}

// ---------------------------------------------------------------------------------------
// Combine: one warp per output row (b, s, h), lane = head-dim columns d, d + 32, ...
// Split s weighs 2^(lse_s - max lse); its partial output is already normalised.

constexpr int kCombineWarps = 4;
constexpr int kCombineDimsPerLane = kMaxHeadDim / 32;

struct CombineParams {
  const float* o_part;
  const float* lse_part;
  void* out;
  int64_t rows;
  int q_len, q_heads, head_dim, num_splits;
  int64_t o_stride[3];
};

template <typename T>
__global__ void __launch_bounds__(32 * kCombineWarps) decode_combine_kernel(const CombineParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kCombineWarps + threadIdx.x / 32;
  if (row >= p.rows) return;  // no block-wide synchronisation below
  const int splits = p.num_splits;
  const float* lse = p.lse_part + row * splits;
  const float* o = p.o_part + row * splits * p.head_dim;

  float m = -INFINITY;
  for (int s = lane; s < splits; s += 32) m = fmaxf(m, lse[s]);
  m = warp_max(m);

  float acc[kCombineDimsPerLane];
#pragma unroll
  for (int i = 0; i < kCombineDimsPerLane; ++i) acc[i] = 0.0f;
  float w_sum = 0.0f;
  if (m != -INFINITY) {  // else every split is empty: the row outputs 0
    // Branch-free and unrolled so several splits' loads are in flight at once; an empty
    // split weighs 0 and its partial output holds zeros.
#pragma unroll 4
    for (int s = 0; s < splits; ++s) {
      const float w = exp2f(lse[s] - m);
      w_sum += w;
#pragma unroll
      for (int i = 0; i < kCombineDimsPerLane; ++i) {
        const int d = lane + 32 * i;
        if (d < p.head_dim) acc[i] = fmaf(w, o[static_cast<int64_t>(s) * p.head_dim + d], acc[i]);
      }
    }
  }
  const float inv = w_sum > 0.0f ? 1.0f / w_sum : 0.0f;
  const int64_t head = row % p.q_heads, bt = row / p.q_heads;
  const int64_t t = bt % p.q_len, b = bt / p.q_len;
  T* out = static_cast<T*>(p.out) + b * p.o_stride[0] + t * p.o_stride[1] + head * p.o_stride[2];
#pragma unroll
  for (int i = 0; i < kCombineDimsPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < p.head_dim) out[d] = from_float<T>(acc[i] * inv);
  }
}

// ---------------------------------------------------------------------------------------
// Host side.

template <typename T, int HEAD_DIM_PAD, int ROWS_PAD>
void launch_split(const DecodeParams& p, const Launch& at) {
  using S = DecodeShape<T, HEAD_DIM_PAD, ROWS_PAD>;
  static SharedRaised smem_raised;
  auto kernel = decode_split_kernel<T, HEAD_DIM_PAD, ROWS_PAD>;
  allow_dynamic_shared(kernel, S::kSmemBytes, at.device, smem_raised, kSplitKernelName);
  const dim3 grid(static_cast<unsigned>(p.num_splits), static_cast<unsigned>(p.kv_heads),
                  static_cast<unsigned>(p.batch < 65535 ? p.batch : 65535));
  launch(kernel, grid, S::kThreads, S::kSmemBytes, at, p);
  end_launch(kSplitKernelName);
}

// The row tiles compiled, a compile-time budget (each instantiation costs ~1 s of nvcc per
// architecture): 16-bit types at head dim 128 get 4, 8, 16, 32 and 64 rows (Llama-3 GQA 4
// and 8 at Sq 1, speculative decoding), at head dim 64 4, 8, 16 and 64, at 256 8 and 64;
// float32, a correctness path, gets the 64-row tile (and 16 at head dim 256). A smaller
// tile is never needed for correctness: padding rows are computed and dropped.
template <typename T, int HEAD_DIM_PAD>
void dispatch_rows(const DecodeParams& p, const Launch& at) {
  if constexpr (sizeof(T) == 2 && HEAD_DIM_PAD <= 128) {
    if (p.rows <= 4) return launch_split<T, HEAD_DIM_PAD, 4>(p, at);
  }
  if constexpr (sizeof(T) == 2) {
    if (p.rows <= 8) return launch_split<T, HEAD_DIM_PAD, 8>(p, at);
  }
  if constexpr (sizeof(T) == 2 && HEAD_DIM_PAD <= 128) {
    if (p.rows <= 16) return launch_split<T, HEAD_DIM_PAD, 16>(p, at);
  }
  if constexpr (sizeof(T) == 2 && HEAD_DIM_PAD == 128) {
    if (p.rows <= 32) return launch_split<T, HEAD_DIM_PAD, 32>(p, at);
  }
  if constexpr (sizeof(T) == 4 && HEAD_DIM_PAD == 256) {
    // The 64-row float32 tile needs 210 KiB of shared memory (more than A100's 163 KiB).
    if (p.rows <= 16) return launch_split<T, HEAD_DIM_PAD, 16>(p, at);
  }
  return launch_split<T, HEAD_DIM_PAD, 64>(p, at);
}

}  // namespace

void decode(const DecodeArgs& a, const Launch& at) {
  begin_launch(at, kSplitKernelName);
  if (a.batch <= 0 || a.q_len <= 0 || a.q_heads <= 0 || a.head_dim <= 0) return;  // empty output

  if (a.kv_heads <= 0 || a.q_heads % a.kv_heads != 0) {
    fail(kSplitKernelName, "q_heads (" + std::to_string(a.q_heads) + ") must be a multiple of kv_heads (" +
                               std::to_string(a.kv_heads) + ")");
  }
  const int64_t group = a.q_heads / a.kv_heads;
  const int64_t rows = group * a.q_len;
  if (rows > kMaxRows) {
    fail(kSplitKernelName, "(q_heads / kv_heads) * q_len = " + std::to_string(rows) + " rows per kv head; at most " +
                               std::to_string(kMaxRows) + " are supported");
  }
  if (a.head_dim > kMaxHeadDim) {
    fail(kSplitKernelName, "head_dim " + std::to_string(a.head_dim) + " > " + std::to_string(kMaxHeadDim));
  }
  if (a.num_splits < 1 || a.num_splits > INT_MAX) {
    fail(kSplitKernelName, "num_splits " + std::to_string(a.num_splits) + " out of range");
  }
  if (a.num_splits > 1 && (a.o_part == nullptr || a.lse_part == nullptr)) {
    fail(kSplitKernelName, "num_splits > 1 needs o_part and lse_part");
  }
  if (a.kv_heads > 65535) fail(kSplitKernelName, "kv_heads " + std::to_string(a.kv_heads) + " > 65535");
  if (a.seqlen_max < 0 || a.seqlen_max > INT_MAX - 2 * kDecodeBlockN || a.batch > INT_MAX ||
      a.q_heads > INT_MAX) {
    fail(kSplitKernelName, "sizes out of range");
  }

  DecodeParams p{};
  p.q = a.q;
  p.k = a.k_cache;
  p.v = a.v_cache;
  p.seqlens = a.cache_seqlens;
  p.out = a.out;
  p.o_part = a.num_splits > 1 ? a.o_part : nullptr;
  p.lse_part = a.num_splits > 1 ? a.lse_part : nullptr;
  p.batch = static_cast<int>(a.batch);
  p.q_len = static_cast<int>(a.q_len);
  p.q_heads = static_cast<int>(a.q_heads);
  p.kv_heads = static_cast<int>(a.kv_heads);
  p.group = static_cast<int>(group);
  p.rows = static_cast<int>(rows);
  p.head_dim = static_cast<int>(a.head_dim);
  p.num_splits = static_cast<int>(a.num_splits);
  p.seqlen_max = static_cast<int>(a.seqlen_max);
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = a.q_stride[i];
    p.k_stride[i] = a.k_stride[i];
    p.v_stride[i] = a.v_stride[i];
    p.o_stride[i] = a.o_stride[i];
  }
  p.qk_scale = a.scale * kLog2e;

  dispatch_dtype(a.dtype, kSplitKernelName, [&](auto tag) {
    using T = decltype(tag);
    constexpr int elem = static_cast<int>(sizeof(T));
    // Widest copy that every K/V row start is aligned to (16 bytes for contiguous caches).
    p.copy_bytes = elem * vector_width(elem, {a.k_cache, a.v_cache},
                                       {a.k_stride[0], a.k_stride[1], a.k_stride[2], a.v_stride[0], a.v_stride[1],
                                        a.v_stride[2], a.head_dim});
    if (a.head_dim <= 64) {
      dispatch_rows<T, 64>(p, at);
    } else if (a.head_dim <= 128) {
      dispatch_rows<T, 128>(p, at);
    } else {
      dispatch_rows<T, 256>(p, at);
    }
    if (a.num_splits > 1) {
      CombineParams c{};
      c.o_part = a.o_part;
      c.lse_part = a.lse_part;
      c.out = a.out;
      c.rows = a.batch * a.q_len * a.q_heads;
      c.q_len = p.q_len;
      c.q_heads = p.q_heads;
      c.head_dim = p.head_dim;
      c.num_splits = p.num_splits;
      for (int i = 0; i < 3; ++i) c.o_stride[i] = a.o_stride[i];
      const int64_t blocks = ceil_div(c.rows, kCombineWarps);
      launch(decode_combine_kernel<T>, static_cast<unsigned>(blocks), 32 * kCombineWarps, 0, at, c);
      end_launch(kCombineKernelName);
    }
  });
}

}  // namespace llama_fast
