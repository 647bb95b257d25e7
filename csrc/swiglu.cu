// SwiGLU, y = silu(gate) * up, forward and backward: elementwise over (rows, n) views with
// unit stride along n and one row stride per tensor, so the two halves of a fused gate_up
// projection (row stride 2n) are read in place and the backward can write both gradient
// halves into one (rows, 2n) buffer.
//
// Numerics follow llama_fast/reference.py (eager PyTorch) operation by operation, in
// float32: sigmoid(g) = 1 / (1 + expf(-g)) with an IEEE division (torch's CUDA sigmoid),
// silu = g * sigmoid(g) rounded to the dtype before it multiplies up (or dy). Products are
// written with __fmul_rn & co. so that nvcc cannot contract them into FMAs: the result is
// then the same as torch's, element for element. At large |g| nothing overflows into a
// NaN: g = -100 gives expf(100) = inf, sigmoid = 1 / inf = 0, silu = -0; g = +100 gives
// sigmoid = 1, silu = 100.
//
// Launch shape: a 2-D block of TX x TY threads (at most 256). A thread moves UNROLL packs
// of VEC elements (16 bytes each when the pointers, row strides and n allow it) of each
// tensor per row, all loads issued before any math (forward: 2 packs of gate and of up, 64
// bytes in flight per thread; backward: 1 pack of dy, gate and up, 48 bytes). TX threads
// cover a row's packs: whole warps splitting the row evenly over grid.x blocks, or, for rows
// of fewer than 32 threads' worth, a power of two with TY = 256 / TX rows a block, so narrow
// rows do not leave most of a block idle. grid.y covers the blocks of TY rows, capped at
// 65535 with a grid-stride loop over the rest (128K single-row blocks would need 131072).
// Llama-3-8B, 14336 wide, bf16: 1792 packs a row; forward blocks of 224 x 1 threads, grid
// 4 x 8192 for 8192 tokens; backward 256 x 1, grid 7 x 8192.

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "common.cuh"

namespace llama_fast {
namespace {

constexpr int kSwigluThreads = 256;
// Packs per thread per row, loaded together. The backward reads three tensors (48 bytes in
// flight per thread with one pack each); unrolling it too would take ~92 registers and halve
// the resident threads, for no more bytes in flight per SM.
constexpr int kFwdUnroll = 2;
constexpr int kBwdUnroll = 1;
constexpr int64_t kMaxGridY = 65535;

// sigmoid(g) as torch computes it in float32 (1 / (1 + exp(-g)), IEEE division).
__device__ __forceinline__ float sigmoid_f32(float g) { return __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-g))); }

// Where a thread works: its first pack of the row, and its row inside a block of TY rows.
struct SwigluTile {
  int64_t first_pack;  // pack index (in units of VEC elements) of the thread's first pack
  int64_t packs_per_row;
  int64_t row_blocks;  // ceil(rows / TY)
};

template <int UNROLL>
__device__ __forceinline__ SwigluTile swiglu_tile(int64_t n, int64_t rows, int vec) {
  SwigluTile t;
  t.first_pack = static_cast<int64_t>(blockIdx.x) * (blockDim.x * UNROLL) + threadIdx.x;
  t.packs_per_row = n / vec;
  t.row_blocks = (rows + blockDim.y - 1) / blockDim.y;
  return t;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kSwigluThreads) swiglu_fwd_kernel(SwigluFwdArgs a) {
  constexpr int kUnroll = kFwdUnroll;
  const SwigluTile tile = swiglu_tile<kUnroll>(a.n, a.rows, VEC);
  const T* gate = static_cast<const T*>(a.gate);
  const T* up = static_cast<const T*>(a.up);
  T* y = static_cast<T*>(a.y);
  for (int64_t row_block = blockIdx.y; row_block < tile.row_blocks; row_block += gridDim.y) {
    const int64_t row = row_block * blockDim.y + threadIdx.y;
    if (row >= a.rows) break;  // later row blocks only hold later rows
    const T* g_row = gate + row * a.stride_g;
    const T* u_row = up + row * a.stride_u;
    T* y_row = y + row * a.stride_y;

    float g[kUnroll][VEC], u[kUnroll][VEC];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t pack = tile.first_pack + k * static_cast<int64_t>(blockDim.x);
      if (pack < tile.packs_per_row) {
        load_floats<T, VEC>(g_row + pack * VEC, g[k]);
        load_floats<T, VEC>(u_row + pack * VEC, u[k]);
      }
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t pack = tile.first_pack + k * static_cast<int64_t>(blockDim.x);
      if (pack < tile.packs_per_row) {
        float out[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float silu = round_to<T>(__fmul_rn(g[k][i], sigmoid_f32(g[k][i])));  // rounded as eager
          out[i] = __fmul_rn(silu, u[k][i]);
        }
        store_floats<T, VEC>(y_row + pack * VEC, out);
      }
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kSwigluThreads) swiglu_bwd_kernel(SwigluBwdArgs a) {
  constexpr int kUnroll = kBwdUnroll;
  const SwigluTile tile = swiglu_tile<kUnroll>(a.n, a.rows, VEC);
  const T* dy = static_cast<const T*>(a.dy);
  const T* gate = static_cast<const T*>(a.gate);
  const T* up = static_cast<const T*>(a.up);
  T* dgate = static_cast<T*>(a.dgate);
  T* dup = static_cast<T*>(a.dup);
  for (int64_t row_block = blockIdx.y; row_block < tile.row_blocks; row_block += gridDim.y) {
    const int64_t row = row_block * blockDim.y + threadIdx.y;
    if (row >= a.rows) break;
    const T* dy_row = dy + row * a.stride_dy;
    const T* g_row = gate + row * a.stride_g;
    const T* u_row = up + row * a.stride_u;
    T* dg_row = dgate + row * a.stride_dg;
    T* du_row = dup + row * a.stride_du;

    float d[kUnroll][VEC], g[kUnroll][VEC], u[kUnroll][VEC];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t pack = tile.first_pack + k * static_cast<int64_t>(blockDim.x);
      if (pack < tile.packs_per_row) {
        load_floats<T, VEC>(dy_row + pack * VEC, d[k]);
        load_floats<T, VEC>(g_row + pack * VEC, g[k]);
        load_floats<T, VEC>(u_row + pack * VEC, u[k]);
      }
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t pack = tile.first_pack + k * static_cast<int64_t>(blockDim.x);
      if (pack < tile.packs_per_row) {
        float du[VEC], dg[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float gv = g[k][i];
          const float sig = sigmoid_f32(gv);
          const float silu = round_to<T>(__fmul_rn(gv, sig));
          du[i] = __fmul_rn(d[k][i], silu);
          // ((dy * up) * sig) * (1 + g * (1 - sig)), evaluated in the reference's order.
          const float dsilu_rest = __fadd_rn(1.0f, __fmul_rn(gv, __fsub_rn(1.0f, sig)));
          dg[i] = __fmul_rn(__fmul_rn(__fmul_rn(d[k][i], u[k][i]), sig), dsilu_rest);
        }
        store_floats<T, VEC>(du_row + pack * VEC, du);
        store_floats<T, VEC>(dg_row + pack * VEC, dg);
      }
    }
  }
}

int next_pow2_at_most(int64_t n, int cap) {
  int p = 1;
  while (p < cap && p < n) p *= 2;
  return p;
}

// Block and grid for rows of packs_per_row packs (see the launch shape note at the top).
void swiglu_shape(const char* name, int64_t rows, int64_t n, int vec, int unroll, dim3& grid, dim3& block) {
  const int64_t packs_per_row = n / vec;
  const int64_t thread_packs = ceil_div(packs_per_row, unroll);  // threads a row needs
  int tx;
  if (thread_packs >= 32) {
    // Whole warps, and the row split evenly over its blocks: 896 threads' worth (14336 bf16
    // forward) go as 4 blocks of 224, not 3.5 blocks of 256 with the last half idle.
    const int64_t col_blocks = ceil_div(thread_packs, kSwigluThreads);
    tx = static_cast<int>(ceil_div(ceil_div(thread_packs, col_blocks), 32) * 32);
  } else {
    tx = next_pow2_at_most(thread_packs, 32);  // narrow rows: several rows a block
  }
  const int ty = kSwigluThreads / tx;
  const int64_t col_blocks = ceil_div(packs_per_row, static_cast<int64_t>(tx) * unroll);
  if (col_blocks > INT32_MAX) fail(name, "row of " + std::to_string(n) + " elements is too long for one grid");
  block = dim3(tx, ty);
  grid = dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(std::min(ceil_div(rows, ty), kMaxGridY)));
}

}  // namespace

void swiglu_fwd(const SwigluFwdArgs& a, const Launch& at) {
  constexpr const char* kName = "swiglu_fwd";
  begin_launch(at, kName);
  if (a.rows <= 0 || a.n <= 0) return;
  const int vec = vector_width(dtype_bytes(a.dtype), {a.gate, a.up, a.y},
                               {a.n, stepped(a.stride_g, a.rows), stepped(a.stride_u, a.rows),
                                stepped(a.stride_y, a.rows)});
  dim3 grid, block;
  swiglu_shape(kName, a.rows, a.n, vec, kFwdUnroll, grid, block);
  dispatch_dtype(a.dtype, kName, [&](auto tag) {
    using T = decltype(tag);
    dispatch_vec<T>(vec, [&](auto vec_tag) {
      launch(swiglu_fwd_kernel<T, decltype(vec_tag)::value>, grid, block, 0, at, a);
    });
  });
  end_launch(kName);
}

void swiglu_bwd(const SwigluBwdArgs& a, const Launch& at) {
  constexpr const char* kName = "swiglu_bwd";
  begin_launch(at, kName);
  if (a.rows <= 0 || a.n <= 0) return;
  const int vec = vector_width(dtype_bytes(a.dtype), {a.dy, a.gate, a.up, a.dgate, a.dup},
                               {a.n, stepped(a.stride_dy, a.rows), stepped(a.stride_g, a.rows),
                                stepped(a.stride_u, a.rows), stepped(a.stride_dg, a.rows),
                                stepped(a.stride_du, a.rows)});
  dim3 grid, block;
  swiglu_shape(kName, a.rows, a.n, vec, kBwdUnroll, grid, block);
  dispatch_dtype(a.dtype, kName, [&](auto tag) {
    using T = decltype(tag);
    dispatch_vec<T>(vec, [&](auto vec_tag) {
      launch(swiglu_bwd_kernel<T, decltype(vec_tag)::value>, grid, block, 0, at, a);
    });
  });
  end_launch(kName);
}

}  // namespace llama_fast
