// RMSNorm and residual-add + RMSNorm, forward and backward (see llama_fast.h).
//
// Numerics (llama_fast/reference.py, kernels/rms_norm.py): float32 statistics and math,
//   forward:  h = round_x(x + r)                      (stored: the next residual add reads it)
//             rstd = rsqrt(sum(h^2) / n + eps)
//             y = round_y(round_x(h * rstd) * w)      (Hugging Face's LlamaRMSNorm)
//   backward: xhat = h * rstd, g = dy * w
//             dx = round_x(rstd * (g - xhat * mean(g * xhat)) [+ dh])
//             dw_partial[p] = sum over the rows of partial p of dy * round_x(xhat)
// where round_x rounds to the input dtype and round_y to the promotion of the input and
// weight dtypes. mean(g * xhat) is computed as rstd * sum(g * h) / n, so that both row sums
// of the backward come out of one reduction (one round of barriers instead of two).
//
// Launch shape. A row is handled by a group of G threads. Each thread holds CHUNKS vectors
// of VEC elements of the row in registers, VEC * sizeof(x) = 16 bytes (VEC = 1 when the
// pointers, row strides or n do not allow 16-byte accesses); chunk c of lane l covers
// elements (c * G + l) * VEC ... + VEC, so a warp's accesses are contiguous. The forward
// holds 2 vectors a thread (16 bf16 values), the backward 1 (it also keeps dy, dh and the
// weight-gradient sums; more spills under the 64-register cap of 1024-thread blocks). G is
// the fewest threads that hold the row: a power of two up to 32 for short rows (reduced
// with shuffles inside the warp), else a multiple of 32 up to 1024 (reduced through shared
// memory). When G is small several groups share a block, which then has about 256
// (forward) or 512 (backward) threads. bf16: G = n / 16 in the forward (256 threads for
// n = 4096, 1024 for 16384), n / 8 in the backward (1024 for 8192).
// Rows too long for 1024 threads (bf16: forward n > 16384, backward n > 8192) go by tiles:
// a first pass sums, a second re-reads the row (from L2 by then) and writes the output.
//
// Forward grid: a block takes (groups per block) rows at a time, grid-striding past
// 2^31 - 1 blocks. Backward grid: one block per weight-gradient partial (the caller asks
// for about two per SM); partial p owns a contiguous, balanced range of rows, which its
// groups take in turn (group r: rows begin + r, begin + r + groups, ...). Each thread sums
// the weight gradient of its columns in registers, in row order; at the end the groups'
// sums are added in group order through shared memory and written to row p of dw_partial.
// No atomics: the result depends only on the shapes, so the caller's sum over p is
// deterministic. Rows that go by tiles keep that running sum in shared memory (n floats,
// when the device allows them) or else in row p of dw_partial, updated by the one thread
// that owns each column.

#include <algorithm>
#include <climits>
#include <cstring>
#include <type_traits>

#include "common.cuh"

namespace llama_fast {
namespace {

// Vectors of x (16 bytes each) a thread holds: see the launch shape note. The scalar
// fallback holds 4 (each scalar access needs its own address registers). Rows that go by
// tiles hold half as many per tile: the two passes over the tiles would spill otherwise.
__host__ __device__ constexpr int register_chunks(int wide_chunks, int vec) { return vec == 1 ? 4 : wide_chunks; }
__host__ __device__ constexpr int loop_chunks(int wide_chunks, int vec) {
  return register_chunks(wide_chunks, vec) > 1 ? register_chunks(wide_chunks, vec) / 2 : 1;
}
constexpr int kFwdChunks = 2;
constexpr int kBwdChunks = 1;
constexpr int kMaxRowLength = 1 << 30;  // columns are int32 inside a row
constexpr int kMaxThreads = 1024;       // largest group (and block)
constexpr int kFwdBlock = 256;          // forward block size when groups are small
constexpr int kBwdBlock = 512;          // backward block size when groups are small
// Static shared memory of the backward kernel (scratch and combine), for the dynamic
// shared memory a launch can add.
__host__ __device__ constexpr size_t bwd_static_shared_bytes(int vec) {
  return sizeof(float) * (32 * 2 + kBwdBlock * vec);
}

template <typename TX, typename TW>
using Promoted = std::conditional_t<std::is_same_v<TX, TW>, TX, float>;

// Unsigned integer types of 2 to 16 bytes: what Vec moves through memory.
template <int BYTES>
struct Bits;
template <>
struct Bits<2> { using type = unsigned short; };
template <>
struct Bits<4> { using type = uint32_t; };
template <>
struct Bits<8> { using type = uint2; };
template <>
struct Bits<16> { using type = uint4; };

// VEC consecutive elements of T, moved as loads and stores of at most 16 bytes each (with
// a bfloat16 input and a float32 weight, VEC = 8 makes two 16-byte accesses of the weight
// and of y, which need only 16-byte alignment). The elements are held as raw 32-bit words,
// two 16-bit elements to a register, and converted to float32 on use: held as 16-bit
// values, the compiler gives each its own register, which doubles the register footprint.
template <typename T, int VEC>
struct Vec {
  static constexpr int kBytes = VEC * static_cast<int>(sizeof(T));
  static constexpr int kPieceBytes = kBytes > 16 ? 16 : kBytes;
  using Piece = typename Bits<kPieceBytes>::type;
  Piece piece[kBytes / kPieceBytes];

  __device__ __forceinline__ void to_floats(float (&out)[VEC]) const {
    if constexpr (kBytes == 2) {  // one 16-bit element
      out[0] = to_float<T>(bits_to<T>(piece[0]));
    } else {
      uint32_t w[kBytes / 4];
      memcpy(w, piece, kBytes);
#pragma unroll
      for (int j = 0; j < kBytes / 4; ++j) {
        if constexpr (std::is_same_v<T, float>) {
          out[j] = __uint_as_float(w[j]);
        } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {  // element 2j in the low half
          out[2 * j] = __uint_as_float(w[j] << 16);
          out[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
        } else {
          __half2 pair;
          memcpy(&pair, &w[j], 4);
          const float2 f = __half22float2(pair);
          out[2 * j] = f.x;
          out[2 * j + 1] = f.y;
        }
      }
    }
  }

  // Rounds to nearest even, element by element (as from_float).
  __device__ __forceinline__ void from_floats(const float (&in)[VEC]) {
    if constexpr (kBytes == 2) {
      const T value = from_float<T>(in[0]);
      memcpy(&piece[0], &value, 2);
    } else {
      uint32_t w[kBytes / 4];
#pragma unroll
      for (int j = 0; j < kBytes / 4; ++j) {
        if constexpr (std::is_same_v<T, float>) {
          w[j] = __float_as_uint(in[j]);
        } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
          const __nv_bfloat162 pair = __floats2bfloat162_rn(in[2 * j], in[2 * j + 1]);  // .x: low half
          memcpy(&w[j], &pair, 4);
        } else {
          const __half2 pair = __floats2half2_rn(in[2 * j], in[2 * j + 1]);
          memcpy(&w[j], &pair, 4);
        }
      }
      memcpy(piece, w, kBytes);
    }
  }

 private:
  template <typename U>
  static __device__ __forceinline__ U bits_to(unsigned short b) {
    U value;
    memcpy(&value, &b, 2);
    return value;
  }
};

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_vec(const T* p) {
  check_aligned(p, Vec<T, VEC>::kPieceBytes);
  return *reinterpret_cast<const Vec<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, VEC>& v) {
  check_aligned(p, Vec<T, VEC>::kPieceBytes);
  *reinterpret_cast<Vec<T, VEC>*>(p) = v;
}

// Sums each of v[0..K) over the G threads of this thread's group; every thread of the group
// gets the results (bitwise the same: the butterfly adds the same pairs on both sides).
// G is a power of two up to 32 (groups are aligned slices of a warp) or a multiple of 32
// (whole warps). Every thread of the block must call it: the wide case has barriers.
// scratch: one K-vector per warp.
template <int K>
__device__ __forceinline__ void group_sum(float (&v)[K], int group_threads, float (*scratch)[K]) {
  if (group_threads <= 32) {
    for (int offset = group_threads / 2; offset > 0; offset /= 2) {
#pragma unroll
      for (int k = 0; k < K; ++k) v[k] += __shfl_xor_sync(0xffffffffu, v[k], offset);
    }
    return;
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
  __syncthreads();  // the previous call's readers are done with scratch
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) scratch[warp][k] = v[k];
  }
  __syncthreads();
  const int warps_per_group = group_threads / 32;
  const int first_warp = warp - warp % warps_per_group;
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(lane < warps_per_group ? scratch[first_warp + lane][k] : 0.0f);
}

// The part of a row tile one thread touches: chunk c covers columns col0 + c * stride
// ... + VEC, and exists when that is below limit (0 for a thread whose row is past the end).
struct Slice {
  int col0, stride, limit;
  __device__ __forceinline__ int col(int c) const { return col0 + c * stride; }
  __device__ __forceinline__ bool has(int c) const { return col(c) < limit; }
};

// ---------------------------------------------------------------------------------------
// Forward

// Loads the slice of x (and residual r, when not null) into hv as h = round_x(x + r),
// stores h when there is a residual, and returns this thread's sum of h^2.
template <typename TX, int VEC, int CHUNKS>
__device__ __forceinline__ float load_h(const TX* __restrict__ x, const TX* __restrict__ r, TX* h, Slice s,
                                        Vec<TX, VEC> (&hv)[CHUNKS]) {
  Vec<TX, VEC> rv[CHUNKS];
  // All loads first, so that their latencies overlap.
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    if (s.has(c)) {
      hv[c] = load_vec<TX, VEC>(x + s.col(c));
      if (r != nullptr) rv[c] = load_vec<TX, VEC>(r + s.col(c));
    }
  }
  float sum_sq = 0.0f;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    if (s.has(c)) {
      float hf[VEC];
      hv[c].to_floats(hf);
      if (r != nullptr) {
        float rf[VEC];
        rv[c].to_floats(rf);
#pragma unroll
        for (int i = 0; i < VEC; ++i) hf[i] += rf[i];
        hv[c].from_floats(hf);  // h is rounded to x's dtype before it is normalised
        hv[c].to_floats(hf);
        store_vec<TX, VEC>(h + s.col(c), hv[c]);
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) sum_sq += hf[i] * hf[i];
    }
  }
  return sum_sq;
}

// y = round_y(round_x(h * rstd) * w) over the slice.
template <typename TX, typename TW, typename TY, int VEC, int CHUNKS>
__device__ __forceinline__ void store_y(const Vec<TX, VEC> (&hv)[CHUNKS], const TW* __restrict__ weight,
                                        TY* __restrict__ y, Slice s, float rstd) {
  Vec<TW, VEC> wv[CHUNKS];
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    if (s.has(c)) wv[c] = load_vec<TW, VEC>(weight + s.col(c));
  }
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    if (s.has(c)) {
      float v[VEC], wf[VEC];
      hv[c].to_floats(v);
      wv[c].to_floats(wf);
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[i] *= rstd;
      Vec<TX, VEC> xhat;  // rounded to x's dtype before the weight multiplies it
      xhat.from_floats(v);
      xhat.to_floats(v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[i] *= wf[i];
      Vec<TY, VEC> out;
      out.from_floats(v);
      store_vec<TY, VEC>(y + s.col(c), out);
    }
  }
}

// The rows of this block, G threads to a row. BY_TILES false: the row fits in the group's
// registers (n <= G * CHUNKS * VEC). BY_TILES true: two passes over tiles of G * CHUNKS * VEC
// columns, the second re-reading h (from L2 by then); with a residual it reads the h this
// same thread stored (same column mapping), so its own writes are visible to it.
template <typename TX, typename TW, int VEC, int CHUNKS, bool BY_TILES>
__device__ __forceinline__ void fwd_rows(const RmsNormFwdArgs& a, int G, float (*scratch)[1]) {
  using TY = Promoted<TX, TW>;
  const TW* weight = static_cast<const TW*>(a.weight);
  const bool has_residual = a.residual != nullptr;
  const int groups = blockDim.x / G;
  const int group = threadIdx.x / G, lane = threadIdx.x % G;
  const int n = static_cast<int>(a.n);
  const int tile = G * CHUNKS * VEC;
  const float inv_n = 1.0f / static_cast<float>(n);

  // The loop bound is the same for all threads of the block (group_sum has barriers).
#pragma unroll 1
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * groups; first < a.rows;
       first += static_cast<int64_t>(gridDim.x) * groups) {
    const bool valid = first + group < a.rows;
    const int64_t row = valid ? first + group : 0;
    const TX* x = static_cast<const TX*>(a.x) + row * a.stride_x;
    const TX* r = has_residual ? static_cast<const TX*>(a.residual) + row * a.stride_r : nullptr;
    TX* h = has_residual ? static_cast<TX*>(a.h) + row * a.stride_h : nullptr;
    TY* y = static_cast<TY*>(a.y) + row * a.stride_y;
    const int limit = valid ? n : 0;

    if constexpr (!BY_TILES) {
      const Slice s{lane * VEC, G * VEC, limit};
      Vec<TX, VEC> hv[CHUNKS];
      float sums[1] = {load_h<TX, VEC, CHUNKS>(x, r, h, s, hv)};
      group_sum<1>(sums, G, scratch);
      store_y<TX, TW, TY, VEC, CHUNKS>(hv, weight, y, s, rsqrtf(sums[0] * inv_n + a.eps));
    } else {
      float sums[1] = {0.0f};
#pragma unroll 1  // one tile at a time: unrolling would hoist loads and spill
      for (int t0 = 0; t0 < n; t0 += tile) {
        Vec<TX, VEC> hv[CHUNKS];
        sums[0] += load_h<TX, VEC, CHUNKS>(x, r, h, Slice{t0 + lane * VEC, G * VEC, limit}, hv);
      }
      group_sum<1>(sums, G, scratch);
      const float rstd = rsqrtf(sums[0] * inv_n + a.eps);
      const TX* h_again = has_residual ? h : x;
#pragma unroll 1
      for (int t0 = 0; t0 < n; t0 += tile) {
        const Slice s{t0 + lane * VEC, G * VEC, limit};
        Vec<TX, VEC> hv[CHUNKS];
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c) {
          if (s.has(c)) hv[c] = load_vec<TX, VEC>(h_again + s.col(c));
        }
        store_y<TX, TW, TY, VEC, CHUNKS>(hv, weight, y, s, rstd);
      }
    }
  }
}

template <typename TX, typename TW, int VEC>
__global__ void __launch_bounds__(kMaxThreads) rms_norm_fwd_kernel(RmsNormFwdArgs a, int group_threads) {
  constexpr int CHUNKS = register_chunks(kFwdChunks, VEC);
  __shared__ float scratch[32][1];
  // Uniform over the grid. Longer rows have G = 1024.
  if (a.n <= static_cast<int64_t>(group_threads) * CHUNKS * VEC) {
    fwd_rows<TX, TW, VEC, CHUNKS, false>(a, group_threads, scratch);
  } else {
    fwd_rows<TX, TW, VEC, loop_chunks(kFwdChunks, VEC), true>(a, group_threads, scratch);
  }
}

// ---------------------------------------------------------------------------------------
// Backward

// Loads the slice of h, dy and (when not null) dh.
template <typename TX, typename TY, int VEC, int CHUNKS>
__device__ __forceinline__ void load_grad_inputs(const TX* __restrict__ h, const TY* __restrict__ dy,
                                                 const TX* __restrict__ dh, Slice s, Vec<TX, VEC> (&hv)[CHUNKS],
                                                 Vec<TY, VEC> (&dyv)[CHUNKS], Vec<TX, VEC> (&dhv)[CHUNKS]) {
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    if (s.has(c)) {
      hv[c] = load_vec<TX, VEC>(h + s.col(c));
      dyv[c] = load_vec<TY, VEC>(dy + s.col(c));
      if (dh != nullptr) dhv[c] = load_vec<TX, VEC>(dh + s.col(c));
    }
  }
}

// Adds this thread's sum(h^2) and sum(g * h), g = dy * w, over the slice to sums.
template <typename TX, typename TW, typename TY, int VEC, int CHUNKS>
__device__ __forceinline__ void add_row_sums(const Vec<TX, VEC> (&hv)[CHUNKS], const Vec<TY, VEC> (&dyv)[CHUNKS],
                                             const TW* __restrict__ weight, Slice s, float (&sums)[2]) {
  Vec<TW, VEC> wv[CHUNKS];
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    if (s.has(c)) wv[c] = load_vec<TW, VEC>(weight + s.col(c));
  }
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    if (s.has(c)) {
      float hf[VEC], dyf[VEC], wf[VEC];
      hv[c].to_floats(hf);
      dyv[c].to_floats(dyf);
      wv[c].to_floats(wf);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        sums[0] += hf[i] * hf[i];
        sums[1] += (dyf[i] * wf[i]) * hf[i];
      }
    }
  }
}

// Stores dx over the slice and returns the row's weight-gradient terms dy * round_x(xhat)
// in dw_row (zeros for chunks outside the row).
template <typename TX, typename TW, typename TY, int VEC, int CHUNKS>
__device__ __forceinline__ void store_dx(const Vec<TX, VEC> (&hv)[CHUNKS], const Vec<TY, VEC> (&dyv)[CHUNKS],
                                         const Vec<TX, VEC> (&dhv)[CHUNKS], bool has_dh,
                                         const TW* __restrict__ weight, TX* __restrict__ dx, Slice s, float rstd,
                                         float mean_gx, float (&dw_row)[CHUNKS][VEC]) {
  Vec<TW, VEC> wv[CHUNKS];
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    if (s.has(c)) wv[c] = load_vec<TW, VEC>(weight + s.col(c));
  }
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) dw_row[c][i] = 0.0f;
    if (s.has(c)) {
      float xhat[VEC], dyf[VEC], wf[VEC], d[VEC];
      hv[c].to_floats(xhat);
      dyv[c].to_floats(dyf);
      wv[c].to_floats(wf);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        xhat[i] *= rstd;
        d[i] = rstd * (dyf[i] * wf[i] - xhat[i] * mean_gx);
      }
      if (has_dh) {
        float dhf[VEC];
        dhv[c].to_floats(dhf);
#pragma unroll
        for (int i = 0; i < VEC; ++i) d[i] += dhf[i];
      }
      Vec<TX, VEC> packed;
      packed.from_floats(d);
      store_vec<TX, VEC>(dx + s.col(c), packed);
      packed.from_floats(xhat);  // the forward multiplied w by xhat rounded to x's dtype
      packed.to_floats(xhat);
#pragma unroll
      for (int i = 0; i < VEC; ++i) dw_row[c][i] = dyf[i] * xhat[i];
    }
  }
}

// Rows [begin, begin + count) into dx, and their weight-gradient sum into dw (row part of
// dw_partial), with the whole row in the registers of a group of G threads
// (n <= G * CHUNKS * VEC). The groups of the block take the rows in turn; each thread sums
// its columns in registers, in row order, and at the end the groups' sums are added in
// group order through shared memory.
template <typename TX, typename TW, int VEC, int CHUNKS>
__device__ __forceinline__ void bwd_rows_in_registers(const RmsNormBwdArgs& a, int G, int64_t begin, int64_t count,
                                                      float* dw, float (*scratch)[2], float* combine) {
  using TY = Promoted<TX, TW>;
  const TW* weight = static_cast<const TW*>(a.weight);
  const bool has_dh = a.dh != nullptr;
  const int groups = blockDim.x / G;
  const int group = threadIdx.x / G, lane = threadIdx.x % G;
  const int n = static_cast<int>(a.n);
  const float inv_n = 1.0f / static_cast<float>(n);

  float acc[CHUNKS][VEC];
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[c][i] = 0.0f;
  }
  const int64_t steps = (count + groups - 1) / groups;  // the same for the whole block
#pragma unroll 1
  for (int64_t step = 0; step < steps; ++step) {
    const int64_t local = step * groups + group;
    const bool valid = local < count;
    const int64_t row = begin + (valid ? local : 0);
    const Slice s{lane * VEC, G * VEC, valid ? n : 0};
    Vec<TX, VEC> hv[CHUNKS], dhv[CHUNKS];
    Vec<TY, VEC> dyv[CHUNKS];
    // dh is needed only after the reduction; loading it now overlaps its latency.
    load_grad_inputs<TX, TY, VEC, CHUNKS>(static_cast<const TX*>(a.h) + row * a.stride_h,
                                          static_cast<const TY*>(a.dy) + row * a.stride_dy,
                                          has_dh ? static_cast<const TX*>(a.dh) + row * a.stride_dh : nullptr, s,
                                          hv, dyv, dhv);
    float sums[2] = {0.0f, 0.0f};
    add_row_sums<TX, TW, TY, VEC, CHUNKS>(hv, dyv, weight, s, sums);
    group_sum<2>(sums, G, scratch);
    const float rstd = rsqrtf(sums[0] * inv_n + a.eps);
    const float mean_gx = sums[1] * rstd * inv_n;  // mean(g * xhat)
    float dw_row[CHUNKS][VEC];
    store_dx<TX, TW, TY, VEC, CHUNKS>(hv, dyv, dhv, has_dh, weight, static_cast<TX*>(a.dx) + row * a.stride_dx, s,
                                      rstd, mean_gx, dw_row);
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[c][i] += dw_row[c][i];
    }
  }

  // Every element of the partial row is written (zeros for an empty range).
  const Slice all{lane * VEC, G * VEC, n};
  if (groups == 1) {
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      if (all.has(c)) {
        Vec<float, VEC> out;
        out.from_floats(acc[c]);
        store_vec<float, VEC>(dw + all.col(c), out);
      }
    }
    return;
  }
  // Chunk by chunk: each thread parks its VEC sums at [group][lane], then thread j adds
  // column j of the chunk over the groups, in group order.
  const int chunk_cols = G * VEC;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    __syncthreads();  // the previous chunk's (or partial's) readers are done
#pragma unroll
    for (int i = 0; i < VEC; ++i) combine[threadIdx.x * VEC + i] = acc[c][i];
    __syncthreads();
    for (int j = threadIdx.x; j < chunk_cols; j += blockDim.x) {
      const int col = c * chunk_cols + j;
      if (col < n) {
        float total = 0.0f;
#pragma unroll 4
        for (int g = 0; g < groups; ++g) total += combine[g * chunk_cols + j];
        dw[col] = total;
      }
    }
  }
}

// The same for rows longer than a group's registers hold (then G = 1024, one group per
// block): two passes over tiles of G * CHUNKS * VEC columns, the second re-reading h and dy
// (from L2 by then). The running weight-gradient sum of the partial lives in `running`: n
// floats of dynamic shared memory when the launch could reserve them, else dw itself. The
// one thread that owns a column updates it for every row, so its own program order keeps
// the sum race-free and in row order; no barrier is needed either when the thread copies
// its own columns from shared memory to dw at the end.
template <typename TX, typename TW, int VEC, int CHUNKS>
__device__ __forceinline__ void bwd_rows_by_tiles(const RmsNormBwdArgs& a, int G, int64_t begin, int64_t count,
                                                  float* dw, float* running, float (*scratch)[2]) {
  using TY = Promoted<TX, TW>;
  const TW* weight = static_cast<const TW*>(a.weight);
  const bool has_dh = a.dh != nullptr;
  const int lane = threadIdx.x;
  const int n = static_cast<int>(a.n);
  const int tile = G * CHUNKS * VEC;
  const float inv_n = 1.0f / static_cast<float>(n);

#pragma unroll 1
  for (int64_t step = 0; step < count; ++step) {
    const int64_t row = begin + step;
    const TX* h = static_cast<const TX*>(a.h) + row * a.stride_h;
    const TY* dy = static_cast<const TY*>(a.dy) + row * a.stride_dy;
    const TX* dh = has_dh ? static_cast<const TX*>(a.dh) + row * a.stride_dh : nullptr;
    TX* dx = static_cast<TX*>(a.dx) + row * a.stride_dx;
    float sums[2] = {0.0f, 0.0f};
#pragma unroll 1  // one tile at a time: unrolling would hoist loads and spill
    for (int t0 = 0; t0 < n; t0 += tile) {
      const Slice s{t0 + lane * VEC, G * VEC, n};
      Vec<TX, VEC> hv[CHUNKS], dhv[CHUNKS];
      Vec<TY, VEC> dyv[CHUNKS];
      load_grad_inputs<TX, TY, VEC, CHUNKS>(h, dy, nullptr, s, hv, dyv, dhv);
      add_row_sums<TX, TW, TY, VEC, CHUNKS>(hv, dyv, weight, s, sums);
    }
    group_sum<2>(sums, G, scratch);
    const float rstd = rsqrtf(sums[0] * inv_n + a.eps);
    const float mean_gx = sums[1] * rstd * inv_n;
#pragma unroll 1
    for (int t0 = 0; t0 < n; t0 += tile) {
      const Slice s{t0 + lane * VEC, G * VEC, n};
      Vec<TX, VEC> hv[CHUNKS], dhv[CHUNKS];
      Vec<TY, VEC> dyv[CHUNKS];
      load_grad_inputs<TX, TY, VEC, CHUNKS>(h, dy, dh, s, hv, dyv, dhv);
      float dw_row[CHUNKS][VEC];
      store_dx<TX, TW, TY, VEC, CHUNKS>(hv, dyv, dhv, has_dh, weight, dx, s, rstd, mean_gx, dw_row);
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c) {
        if (s.has(c)) {
          if (step > 0) {
            float before[VEC];
            load_vec<float, VEC>(running + s.col(c)).to_floats(before);
#pragma unroll
            for (int i = 0; i < VEC; ++i) dw_row[c][i] += before[i];
          }
          Vec<float, VEC> out;
          out.from_floats(dw_row[c]);
          store_vec<float, VEC>(running + s.col(c), out);
        }
      }
    }
  }
  if (count == 0) {  // every element of the partial row is written
    for (int col = threadIdx.x; col < n; col += blockDim.x) dw[col] = 0.0f;
  } else if (running != dw) {
#pragma unroll 1
    for (int col = lane * VEC; col < n; col += G * VEC) {
      store_vec<float, VEC>(dw + col, load_vec<float, VEC>(running + col));
    }
  }
}

// Partial p of the weight gradient takes a contiguous, balanced run of rows: the first
// rows % num_partials partials one row more than the others.
template <typename TX, typename TW, int VEC, int CHUNKS, bool BY_TILES>
__device__ __forceinline__ void bwd_partials(const RmsNormBwdArgs& a, int G, float (*scratch)[2], float* combine,
                                             float* shared_running) {
  const int64_t rows_per_partial = a.rows / a.num_partials, extra_rows = a.rows % a.num_partials;
#pragma unroll 1
  for (int64_t part = blockIdx.x; part < a.num_partials; part += gridDim.x) {
    const int64_t begin = part * rows_per_partial + (part < extra_rows ? part : extra_rows);
    const int64_t count = rows_per_partial + (part < extra_rows ? 1 : 0);
    float* dw = a.dw_partial + part * a.n;
    if constexpr (BY_TILES) {
      bwd_rows_by_tiles<TX, TW, VEC, CHUNKS>(a, G, begin, count, dw, shared_running ? shared_running : dw, scratch);
    } else {
      bwd_rows_in_registers<TX, TW, VEC, CHUNKS>(a, G, begin, count, dw, scratch, combine);
    }
  }
}

template <typename TX, typename TW, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    rms_norm_bwd_kernel(RmsNormBwdArgs a, int group_threads, bool running_in_shared) {
  constexpr int CHUNKS = register_chunks(kBwdChunks, VEC);
  __shared__ float scratch[32][2];
  // The groups' weight-gradient sums of one chunk, added in group order at the end. Only
  // used with several groups, i.e. blocks of at most kBwdBlock threads.
  __shared__ float combine[kBwdBlock * VEC];
  static_assert(sizeof(scratch) + sizeof(combine) == bwd_static_shared_bytes(VEC), "see bwd_static_shared_bytes");

  // Uniform over the grid; each path has its own loop over partials, so that the compiler
  // hoists only that path's invariants out of it.
  if (a.n <= static_cast<int64_t>(group_threads) * CHUNKS * VEC) {
    bwd_partials<TX, TW, VEC, CHUNKS, false>(a, group_threads, scratch, combine, nullptr);
  } else {
    // Rows by tiles: the partial's running weight-gradient sum (n floats) when it fits.
    float* shared_running = running_in_shared ? dynamic_shared<float>() : nullptr;
    bwd_partials<TX, TW, VEC, loop_chunks(kBwdChunks, VEC), true>(a, group_threads, scratch, combine, shared_running);
  }
}

// ---------------------------------------------------------------------------------------
// Host side

// Threads per row (see the launch shape note at the top).
int group_threads_for(int64_t n, int elems_per_thread) {
  const int64_t needed = ceil_div(n, elems_per_thread);
  if (needed <= 32) {
    int g = 1;
    while (g < needed) g *= 2;
    return g;
  }
  if (needed <= kMaxThreads) return static_cast<int>(ceil_div(needed, 32) * 32);
  return kMaxThreads;
}

// Whether Vec<T, VEC> accesses at p + (multiples of VEC elements) are aligned; null is fine.
template <typename T, int VEC>
bool vec_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % Vec<T, VEC>::kPieceBytes == 0;
}


template <typename TX, typename TW, int VEC>
void launch_fwd_vec(const RmsNormFwdArgs& a, const Launch& at, const char* name) {
  const int group_threads = group_threads_for(a.n, register_chunks(kFwdChunks, VEC) * VEC);
  const int groups = std::max(1, kFwdBlock / group_threads);
  const int64_t blocks = std::min<int64_t>(ceil_div(a.rows, groups), INT_MAX);  // the kernel grid-strides
  launch(rms_norm_fwd_kernel<TX, TW, VEC>, dim3(static_cast<unsigned>(blocks)), dim3(group_threads * groups), 0, at, a,
         group_threads);
  end_launch(name);
}

template <typename TX, typename TW>
void launch_fwd(const RmsNormFwdArgs& a, const Launch& at, const char* name) {
  using TY = Promoted<TX, TW>;
  constexpr int kVec = 16 / static_cast<int>(sizeof(TX));
  const bool wide = vector_width(static_cast<int>(sizeof(TX)), {a.x, a.residual, a.h},
                                 {a.n, stepped(a.stride_x, a.rows), stepped(a.residual ? a.stride_r : 0, a.rows),
                                  stepped(a.residual ? a.stride_h : 0, a.rows), stepped(a.stride_y, a.rows)}) == kVec &&
                    vec_aligned<TY, kVec>(a.y) && vec_aligned<TW, kVec>(a.weight);
  if (wide) {
    launch_fwd_vec<TX, TW, kVec>(a, at, name);
  } else {
    launch_fwd_vec<TX, TW, 1>(a, at, name);
  }
}

template <typename TX, typename TW, int VEC>
void launch_bwd_vec(const RmsNormBwdArgs& a, const Launch& at, const char* name) {
  const auto kernel = rms_norm_bwd_kernel<TX, TW, VEC>;
  const int group_threads = group_threads_for(a.n, register_chunks(kBwdChunks, VEC) * VEC);
  const int groups = std::max(1, kBwdBlock / group_threads);
  const int64_t blocks = std::min<int64_t>(a.num_partials, INT_MAX);  // the kernel grid-strides
  // Rows by tiles keep the running weight-gradient sum in shared memory when the device lets
  // a block have n more floats of it (bf16: n up to ~53K on H100, ~37K on A100); else in
  // dw_partial.
  size_t dynamic_bytes = 0;
  if (a.n > static_cast<int64_t>(group_threads) * register_chunks(kBwdChunks, VEC) * VEC) {
    const int64_t bytes = a.n * static_cast<int64_t>(sizeof(float));
    constexpr int kStatic = static_cast<int>(bwd_static_shared_bytes(VEC));
    if (bytes + kStatic <= shared_memory_optin(at.device, name)) {
      dynamic_bytes = static_cast<size_t>(bytes);
      static SharedRaised raised;
      allow_dynamic_shared(kernel, static_cast<int>(bytes), at.device, raised, name, kStatic);
    }
  }
  launch(kernel, dim3(static_cast<unsigned>(blocks)), dim3(group_threads * groups), dynamic_bytes, at, a, group_threads,
         dynamic_bytes > 0);
  end_launch(name);
}

template <typename TX, typename TW>
void launch_bwd(const RmsNormBwdArgs& a, const Launch& at, const char* name) {
  using TY = Promoted<TX, TW>;
  constexpr int kVec = 16 / static_cast<int>(sizeof(TX));
  const bool wide = vector_width(static_cast<int>(sizeof(TX)), {a.h, a.dh, a.dx},
                                 {a.n, stepped(a.stride_h, a.rows), stepped(a.dh ? a.stride_dh : 0, a.rows),
                                  stepped(a.stride_dx, a.rows), stepped(a.stride_dy, a.rows)}) == kVec &&
                    vec_aligned<TY, kVec>(a.dy) && vec_aligned<TW, kVec>(a.weight) &&
                    vec_aligned<float, kVec>(a.dw_partial);
  if (wide) {
    launch_bwd_vec<TX, TW, kVec>(a, at, name);
  } else {
    launch_bwd_vec<TX, TW, 1>(a, at, name);
  }
}

}  // namespace

void rms_norm_fwd(const RmsNormFwdArgs& a, const Launch& at) {
  constexpr const char* kName = "rms_norm_fwd";
  begin_launch(at, kName);
  if (a.rows <= 0 || a.n <= 0) return;
  if (a.n > kMaxRowLength) fail(kName, "rows of " + std::to_string(a.n) + " elements are too long");
  dispatch_dtype(a.x_dtype, kName, [&](auto x_tag) {
    dispatch_dtype(a.w_dtype, kName, [&](auto w_tag) { launch_fwd<decltype(x_tag), decltype(w_tag)>(a, at, kName); });
  });
}

void rms_norm_bwd(const RmsNormBwdArgs& a, const Launch& at) {
  constexpr const char* kName = "rms_norm_bwd";
  begin_launch(at, kName);
  if (a.n <= 0) return;  // dw_partial has no elements; dx none either
  if (a.n > kMaxRowLength) fail(kName, "rows of " + std::to_string(a.n) + " elements are too long");
  if (a.num_partials <= 0) fail(kName, "num_partials must be at least 1, got " + std::to_string(a.num_partials));
  // rows == 0 still launches: every partial row of dw_partial gets its zeros.
  dispatch_dtype(a.x_dtype, kName, [&](auto x_tag) {
    dispatch_dtype(a.w_dtype, kName, [&](auto w_tag) { launch_bwd<decltype(x_tag), decltype(w_tag)>(a, at, kName); });
  });
}

}  // namespace llama_fast
