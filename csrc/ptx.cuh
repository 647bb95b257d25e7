// The inline PTX of the kernels, one function per instruction form: cp.async (global ->
// shared, with zero fill), ldmatrix, mma.sync m16n8k16, a 16-byte global store and ex2. Shared
// memory is addressed by 32-bit shared-window addresses (smem_addr), as the instructions
// take them.
//
// Under LLAMA_FAST_EMULATE (the CPU emulator of the tests, tests/cuda_emulator) each
// function is emulated from its definition in the PTX ISA, independently of how the
// kernels use it, so that the emulated tests check the kernels' fragment bookkeeping:
// - mma and ldmatrix are warp collectives: each lane deposits its operands (fragments, row
//   addresses) in a per-warp area; the last lane to arrive assembles the matrices as the
//   ISA lays them out and computes every lane's result (float32 products of 16-bit values
//   are exact; the sums are taken in double and rounded once).
// - cp.async copies are queued per thread and performed when a wait retires their group
//   (cp.async.wait_group / wait_all), so that reading a tile before waiting for it, or
//   without the barrier that publishes it to the other threads, reads stale data (the
//   emulator fills shared memory with NaNs at block start).
// The emulator checks the alignment and shared-memory bounds each instruction requires.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace llama_fast {
namespace ptx {

// Shared-window address of a pointer into (dynamic) shared memory.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

#ifdef LLAMA_FAST_EMULATE
namespace emu {

// ldmatrix: lanes 8i..8i+7 give the addresses of the 8 rows (16 bytes each) of matrix i.
// Lane l receives, in register i, row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1 of
// matrix i (the lower-numbered element in the low 16 bits); with .trans, element
// [2 (l % 4)][l / 4] and [2 (l % 4) + 1][l / 4], i.e. the same of the transposed matrix.
template <int NUM, bool TRANS>
inline void combine_ldmatrix(cuda_emu::WarpArea& area) {
  if (area.mask != 0xffffffffu) cuda_emu::fault("ldmatrix needs all 32 lanes of the warp (.sync.aligned)");
  uint16_t m[NUM][8][8];
  for (int i = 0; i < NUM; ++i) {
    for (int r = 0; r < 8; ++r) {
      uint32_t address;
      std::memcpy(&address, area.in[8 * i + r], 4);
      if (address % 16 != 0) cuda_emu::misaligned("ldmatrix row address", cuda_emu::shared_pointer(address, 1), 16);
      std::memcpy(m[i][r], cuda_emu::shared_pointer(address, 16), 16);
    }
  }
  for (int l = 0; l < 32; ++l) {
    uint32_t regs[4] = {0, 0, 0, 0};
    const int row = l / 4, col = 2 * (l % 4);
    for (int i = 0; i < NUM; ++i) {
      const uint16_t lo = TRANS ? m[i][col][row] : m[i][row][col];
      const uint16_t hi = TRANS ? m[i][col + 1][row] : m[i][row][col + 1];
      regs[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
    std::memcpy(area.out[l], regs, sizeof(regs));
  }
}

template <int NUM, bool TRANS>
inline void ldmatrix(uint32_t* r, uint32_t addr, const char* kind) {
  uint32_t out[4];
  cuda_emu::warp_collective(0xffffffffu, kind, combine_ldmatrix<NUM, TRANS>, &addr, sizeof(addr), out, sizeof(out),
                            __FILE__, __LINE__);
  for (int i = 0; i < NUM; ++i) r[i] = out[i];
}

// mma.m16n8k16, A row-major 16 x 16, B column-major 16 x 8 (K x N), C and D 16 x 8 float32.
// PTX ISA "Matrix fragments for mma.m16n8k16 with floating point type": groupID = lane / 4,
// tid = lane % 4;
//   A: registers a0..a3 hold elements (row, col) = (g, 2t..2t+1), (g + 8, 2t..2t+1),
//      (g, 2t + 8..2t + 9), (g + 8, 2t + 8..2t + 9);
//   B: b0 holds (k, n) = (2t..2t+1, g), b1 holds (2t + 8..2t + 9, g);
//   C, D: c0, c1 = (g, 2t), (g, 2t + 1); c2, c3 = (g + 8, 2t), (g + 8, 2t + 1).
struct MmaIn {
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
};

template <typename T>
inline void combine_mma(cuda_emu::WarpArea& area) {
  if (area.mask != 0xffffffffu) cuda_emu::fault("mma.sync needs all 32 lanes of the warp (.sync.aligned)");
  auto elem = [](uint32_t reg, int half) -> double {
    const uint16_t bits = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xffffu);
    T v;
    std::memcpy(&v, &bits, 2);
    if constexpr (std::is_same_v<T, __half>) {
      return __half2float(v);
    } else {
      return __bfloat162float(v);
    }
  };
  double A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    MmaIn in;
    std::memcpy(&in, area.in[l], sizeof(in));
    const int g = l / 4, t = l % 4;
    for (int h = 0; h < 2; ++h) {
      A[g][2 * t + h] = elem(in.a[0], h);
      A[g + 8][2 * t + h] = elem(in.a[1], h);
      A[g][2 * t + 8 + h] = elem(in.a[2], h);
      A[g + 8][2 * t + 8 + h] = elem(in.a[3], h);
      B[2 * t + h][g] = elem(in.b[0], h);
      B[2 * t + 8 + h][g] = elem(in.b[1], h);
      C[g][2 * t + h] = in.c[h];
      C[g + 8][2 * t + h] = in.c[2 + h];
    }
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    float d[4];
    for (int e = 0; e < 4; ++e) {
      const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
      double sum = C[row][col];
      for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
      d[e] = static_cast<float>(sum);
    }
    std::memcpy(area.out[l], d, sizeof(d));
  }
}

}  // namespace emu
#endif  // LLAMA_FAST_EMULATE

// ---------------------------------------------------------------------------------------
// cp.async: global -> shared without staging in registers (sm_80+). src_bytes < BYTES reads
// only src_bytes bytes and fills the rest of the destination with zeros (0: reads nothing).

// cp.async.cg.shared.global [dst], [src], 16, src_bytes: bypasses L1.
__device__ __forceinline__ void cp_async_cg_16(uint32_t dst, const void* src, int src_bytes) {
#ifdef LLAMA_FAST_EMULATE
  cuda_emu::cp_async(dst, src, 16, src_bytes);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
#endif
}

// cp.async.ca.shared.global [dst], [src], BYTES, src_bytes (BYTES = 4, 8 or 16).
template <int BYTES>
__device__ __forceinline__ void cp_async_ca(uint32_t dst, const void* src, int src_bytes) {
  static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
#ifdef LLAMA_FAST_EMULATE
  cuda_emu::cp_async(dst, src, BYTES, src_bytes);
#else
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst), "l"(src), "n"(BYTES), "r"(src_bytes)
               : "memory");
#endif
}

// cp.async.commit_group: closes this thread's group of copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#ifdef LLAMA_FAST_EMULATE
  cuda_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// cp.async.wait_group N: waits until at most N of this thread's committed groups are pending.
template <int N>
__device__ __forceinline__ void cp_async_wait_group() {
#ifdef LLAMA_FAST_EMULATE
  cuda_emu::cp_async_wait_group(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// cp.async.wait_all: commits, then waits for every copy of this thread.
__device__ __forceinline__ void cp_async_wait_all() {
#ifdef LLAMA_FAST_EMULATE
  cuda_emu::cp_async_wait_all();
#else
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// ---------------------------------------------------------------------------------------
// ldmatrix.sync.aligned.m8n8.{x1,x2,x4}[.trans].shared.b16: 1, 2 or 4 8x8 matrices of 16-bit
// elements from shared memory. Lanes 8i..8i+7 give the row addresses (16-byte aligned) of
// matrix i; register i of lane l receives matrix i's row l / 4, elements 2 (l % 4) and +1
// (with .trans: column l / 4, rows 2 (l % 4) and +1), the first in the low half.

__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], uint32_t addr) {
#ifdef LLAMA_FAST_EMULATE
  emu::ldmatrix<1, false>(r, addr, "ldmatrix.x1");
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(addr) : "memory");
#endif
}

__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], uint32_t addr) {
#ifdef LLAMA_FAST_EMULATE
  emu::ldmatrix<2, false>(r, addr, "ldmatrix.x2");
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr) : "memory");
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
#ifdef LLAMA_FAST_EMULATE
  emu::ldmatrix<4, false>(r, addr, "ldmatrix.x4");
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
#endif
}

__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], uint32_t addr) {
#ifdef LLAMA_FAST_EMULATE
  emu::ldmatrix<2, true>(r, addr, "ldmatrix.x2.trans");
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr)
               : "memory");
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
#ifdef LLAMA_FAST_EMULATE
  emu::ldmatrix<4, true>(r, addr, "ldmatrix.x4.trans");
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
#endif
}

// ---------------------------------------------------------------------------------------
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32, accumulating in place:
// acc (16x8 float32, C/D fragment) += a (16x16, A fragment) * b (16x8, B fragment b0, b1).
// T (__nv_bfloat16 or __half) is the operand type.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0,
                                                             uint32_t b1) {
#ifdef LLAMA_FAST_EMULATE
  const emu::MmaIn in{{a[0], a[1], a[2], a[3]}, {b0, b1}, {acc[0], acc[1], acc[2], acc[3]}};
  cuda_emu::warp_collective(0xffffffffu, "mma.m16n8k16.bf16", emu::combine_mma<__nv_bfloat16>, &in, sizeof(in), acc,
                            sizeof(acc), __FILE__, __LINE__);
#else
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0,
                                                      uint32_t b1) {
#ifdef LLAMA_FAST_EMULATE
  const emu::MmaIn in{{a[0], a[1], a[2], a[3]}, {b0, b1}, {acc[0], acc[1], acc[2], acc[3]}};
  cuda_emu::warp_collective(0xffffffffu, "mma.m16n8k16.f16", emu::combine_mma<__half>, &in, sizeof(in), acc,
                            sizeof(acc), __FILE__, __LINE__);
#else
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// ---------------------------------------------------------------------------------------
// st.global.v4.b32: one 16-byte store (ptr 16-byte aligned). nvcc splits a plain uint4
// store into four 4-byte STG when the other side of a branch stores the same registers
// piecewise (the attention epilogue's unaligned path); the asm keeps it one instruction.
__device__ __forceinline__ void st_global_16(void* ptr, const uint4& v) {
#ifdef LLAMA_FAST_EMULATE
  *static_cast<uint4*>(ptr) = v;  // a misaligned pointer throws (-fsanitize=alignment)
#else
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(ptr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
#endif
}

// ---------------------------------------------------------------------------------------
// 2^x on the SFU with denormals flushed to zero: ex2.approx.ftz.f32 is one MUFU.EX2, where
// exp2f adds a range check and two scaling FMULs around it so that results below 2^-126
// come out as denormals. The softmax never needs those: its arguments are <= 0 and a
// probability below 2^-126 is 0 to the precision of a 16-bit P (FlashAttention-2 does the
// same). The emulator computes exp2f and flushes a denormal result to 0.
__device__ __forceinline__ float ex2_ftz(float x) {
#ifdef LLAMA_FAST_EMULATE
  const float y = exp2f(x);
  return y < 1.17549435e-38f ? 0.0f : y;  // FLT_MIN: flush denormals (y >= 0)
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#endif
}

// ---------------------------------------------------------------------------------------
// Optimisation barrier: no instruction, but the compiler must assume x changed here (it
// keeps loop-invariant address arithmetic from being hoisted into extra registers). A
// no-op for the emulator.
__device__ __forceinline__ void opaque([[maybe_unused]] uint32_t& x) {
#ifndef LLAMA_FAST_EMULATE
  asm volatile("" : "+r"(x));
#endif
}

__device__ __forceinline__ void opaque([[maybe_unused]] int64_t& x) {
#ifndef LLAMA_FAST_EMULATE
  asm volatile("" : "+l"(x));
#endif
}

}  // namespace ptx
}  // namespace llama_fast
