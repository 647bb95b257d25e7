// A CPU emulator of the CUDA execution model, for testing the kernels of csrc/ without a
// GPU (as TRITON_INTERPRET=1 does for the Triton kernels). build.py compiles the very same
// csrc/*.cu sources as host C++ with
//   g++ -x c++ -DLLAMA_FAST_EMULATE -include cuda_emu.h -Itests/cuda_emulator/include
// (the include folder holds cuda_runtime.h & co., which only include this file).
//
// Execution model
// - Blocks of a grid run one after another on one OS thread (launches are serialised by a
//   mutex). The threads of a block run as cooperative fibers (cuda_emu.cpp): a thread runs
//   until it reaches a barrier (__syncthreads, a warp collective) or exits, then the next
//   runnable thread runs. A barrier releases when every participant has arrived; the
//   released threads resume in a shuffled order (LLAMA_FAST_EMULATE_SCHEDULE=forward,
//   reverse or shuffle, the default, seeded per launch), so that a missing barrier shows
//   up as a wrong result instead of being hidden by one fixed interleaving.
// - __shared__ is `static`: with the blocks of a launch run one after another, a function
//   static is exactly block-shared. Dynamic shared memory is a per-launch buffer
//   (dynamic_shared() in common.cuh), filled with 0xff bytes (NaN in every float type) at
//   the start of each block, so a read of memory nobody wrote turns into a NaN.
// - Errors a GPU would report at launch (grid or block dims out of range, more dynamic
//   shared memory than allowed) set the error that cudaGetLastError returns, as on a GPU.
//   Errors a GPU would hit while running (a deadlock: a barrier some threads never reach;
//   __syncthreads reached from two different places; a warp collective with a lane that
//   exited or does not exist; a misaligned vector access; a shared-memory address out of
//   bounds) throw std::runtime_error from the launch, naming the block, thread and site.
// - Exited threads count as arrived at __syncthreads (PTX `exit` semantics), so a kernel
//   whose surplus threads return early before block barriers works, as on a GPU.
// - Warp collectives (shuffles, votes, and the mma/ldmatrix emulation of csrc/ptx.cuh):
//   each lane deposits its operands in a per-warp area; the last lane to arrive computes
//   every lane's result there; then all resume and read their own result.
// - Floating point: IEEE float32 throughout (build.py passes -ffp-contract=off; nvcc may
//   contract a * b + c into an FMA, which the kernels prevent with __fmul_rn where it
//   matters); float <-> half/bfloat16 conversions round to nearest even exactly; rsqrtf is
//   1 / sqrtf (the GPU's is approximate, within 2 ulp).
#pragma once

#ifndef LLAMA_FAST_EMULATE
#error "cuda_emu.h is the CPU emulator of CUDA: compile with -DLLAMA_FAST_EMULATE"
#endif

#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------------------
// Qualifiers.

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static
#define __constant__ static
#define __align__(n) __attribute__((aligned(n)))
#define __grid_constant__

// ---------------------------------------------------------------------------------------
// Vector types.

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) int2 {
  int x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------
// The emulator's state and services (cuda_emu.cpp).

namespace cuda_emu {

// Where the current emulated thread is; updated at every switch between threads.
extern uint3 g_thread_idx, g_block_idx;
extern dim3 g_block_dim, g_grid_dim;

inline const uint3& thread_idx() { return g_thread_idx; }
inline const uint3& block_idx() { return g_block_idx; }
inline const dim3& block_dim() { return g_block_dim; }
inline const dim3& grid_dim() { return g_grid_dim; }

// Throws std::runtime_error("cuda emulator: <what> (block (x,y,z), thread (x,y,z))").
[[noreturn]] void fault(const std::string& what);

// Block-wide barrier; file/line name the call site (for the divergence check and the
// deadlock report).
void sync_block(const char* file, int line);

// Warp collectives. Every lane of `mask` (which must include the caller) deposits up to
// kSlotBytes of input; when the last one arrives, combine(area, mask) runs once and writes
// every participating lane's output; then each caller gets its own output back. `kind`
// identifies the collective: lanes that meet at different kinds are a fault.
constexpr int kSlotBytes = 64;
struct WarpArea {
  unsigned char in[32][kSlotBytes];
  unsigned char out[32][kSlotBytes];
  unsigned mask;       // participating lanes
  unsigned lanes;      // lanes that exist in this warp (the last warp of a block may be partial)
};
using Combine = void (*)(WarpArea& area);
void warp_collective(unsigned mask, const char* kind, Combine combine, const void* in, size_t in_bytes, void* out,
                     size_t out_bytes, const char* file, int line);
unsigned lane_id();

// Dynamic shared memory of the running block, and the 32-bit "shared window" addresses of
// PTX (cvta.to.shared): byte offset kSharedBase + i is byte i of the dynamic buffer.
constexpr uint32_t kSharedBase = 0x400;
unsigned char* dynamic_shared_base();
size_t dynamic_shared_size();
uint32_t shared_address(const void* p);                     // faults outside the buffer
unsigned char* shared_pointer(uint32_t address, size_t bytes);  // faults outside the buffer

// cp.async, deferred: queued per thread, performed (src_size bytes copied, the rest of
// cp_size zero-filled) when a wait retires its group.
void cp_async(uint32_t dst, const void* src, int cp_size, int src_size);
void cp_async_commit();
void cp_async_wait_group(int pending);  // wait until at most `pending` committed groups remain
void cp_async_wait_all();

// Launch errors (cudaGetLastError).
void set_last_error(int err, const std::string& detail);

// Runs a grid: entry(ctx) once per emulated thread. kernel identifies the function (for its
// dynamic shared-memory limit, set by cudaFuncSetAttribute).
void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes, void (*entry)(void*), void* ctx);

void set_max_dynamic_shared(const void* kernel, int bytes);

[[noreturn]] void misaligned(const char* what, const void* p, size_t align);

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::thread_idx())
#define blockIdx (::cuda_emu::block_idx())
#define blockDim (::cuda_emu::block_dim())
#define gridDim (::cuda_emu::grid_dim())

// ---------------------------------------------------------------------------------------
// Runtime API: the subset the sources call.

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
};
typedef cudaError_t cudaError;
struct CUstream_st;
typedef CUstream_st* cudaStream_t;

enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxBlockDimX = 2,
  cudaDevAttrMaxBlockDimY = 3,
  cudaDevAttrMaxBlockDimZ = 4,
  cudaDevAttrMaxGridDimX = 5,
  cudaDevAttrMaxGridDimY = 6,
  cudaDevAttrMaxGridDimZ = 7,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxRegistersPerMultiprocessor = 82,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
struct cudaDeviceProp {
  char name[256];
  size_t totalGlobalMem;
  size_t sharedMemPerBlock;
  size_t sharedMemPerBlockOptin;
  size_t sharedMemPerMultiprocessor;
  int regsPerBlock;
  int warpSize;
  int maxThreadsPerBlock;
  int maxThreadsDim[3];
  int maxGridSize[3];
  int major, minor;
  int multiProcessorCount;
};

const char* cudaGetErrorName(cudaError_t err);
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device);
cudaError_t cudaFuncSetAttribute_impl(const void* kernel, cudaFuncAttribute attr, int value);
template <typename T>
inline cudaError_t cudaFuncSetAttribute(T* kernel, cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute_impl(reinterpret_cast<const void*>(kernel), attr, value);
}

// ---------------------------------------------------------------------------------------
// Launch: cuda_emu::launch(kernel, grid, block, smem, stream, args...) is what
// `kernel<<<grid, block, smem, stream>>>(args...)` does (common.cuh's launch() calls it).
// The arguments are copied into the kernel's parameter types once, as the launch copies
// them into parameter space; each emulated thread calls the kernel on that copy.

namespace cuda_emu {

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t /*stream*/,
            Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel launched with the wrong number of arguments");
  using Tuple = std::tuple<std::decay_t<Params>...>;
  struct Ctx {
    void (*kernel)(Params...);
    Tuple params;
  };
  Ctx ctx{kernel, Tuple(std::forward<Args>(args)...)};
  run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem_bytes,
           [](void* c) {
             Ctx* x = static_cast<Ctx*>(c);
             std::apply(x->kernel, x->params);
           },
           &ctx);
}

}  // namespace cuda_emu

// ---------------------------------------------------------------------------------------
// Barriers and warp collectives.

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  cuda_emu::sync_block(file, line);
}

inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  cuda_emu::warp_collective(mask, "__syncwarp", [](cuda_emu::WarpArea&) {}, nullptr, 0, nullptr, 0, file, line);
}

inline void __threadfence() {}
inline void __threadfence_block() {}

namespace cuda_emu {

// Shuffles: each lane deposits (value, source lane); the source is its own lane when the
// shuffle keeps the caller's value (out of its width segment).
struct ShflIn {
  unsigned char value[16];
  int src;
};
void combine_shfl(WarpArea& area);

template <typename T>
T shfl(unsigned mask, T var, int src, const char* kind, const char* file, int line) {
  static_assert(sizeof(T) <= 16 && std::is_trivially_copyable_v<T>, "shuffle of an unsupported type");
  ShflIn in;
  std::memcpy(in.value, &var, sizeof(T));
  in.src = src;
  unsigned char out[16];
  warp_collective(mask, kind, combine_shfl, &in, sizeof(in), out, sizeof(out), file, line);
  T result;
  std::memcpy(&result, out, sizeof(T));
  return result;
}

inline int check_width(int width) {
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) fault("shuffle width must be a power of two up to 32");
  return width;
}

void combine_vote(WarpArea& area);  // out = ballot of the lanes' predicates (int in[0..4))

}  // namespace cuda_emu

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  const int w = cuda_emu::check_width(width);
  const int lane = static_cast<int>(cuda_emu::lane_id());
  return cuda_emu::shfl(mask, var, (lane / w) * w + (src_lane % w), "__shfl_sync", file, line);
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32, const char* file = __builtin_FILE(),
                         int line = __builtin_LINE()) {
  const int w = cuda_emu::check_width(width);
  const int lane = static_cast<int>(cuda_emu::lane_id());
  int src = lane ^ lane_mask;
  if (src >= (lane / w + 1) * w || src > 31) src = lane;  // a later segment: keep our own value
  return cuda_emu::shfl(mask, var, src, "__shfl_xor_sync", file, line);
}

template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                          int line = __builtin_LINE()) {
  const int w = cuda_emu::check_width(width);
  const int lane = static_cast<int>(cuda_emu::lane_id());
  const int src = (lane % w) + static_cast<int>(delta) < w ? lane + static_cast<int>(delta) : lane;
  return cuda_emu::shfl(mask, var, src, "__shfl_down_sync", file, line);
}

template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  const int w = cuda_emu::check_width(width);
  const int lane = static_cast<int>(cuda_emu::lane_id());
  const int src = (lane % w) >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane;
  return cuda_emu::shfl(mask, var, src, "__shfl_up_sync", file, line);
}

inline unsigned __ballot_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  const int in = predicate != 0;
  unsigned out = 0;
  cuda_emu::warp_collective(mask, "__ballot_sync", cuda_emu::combine_vote, &in, sizeof(in), &out, sizeof(out), file,
                            line);
  return out;
}
inline int __any_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return __ballot_sync(mask, predicate, file, line) != 0;
}
inline int __all_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return __ballot_sync(mask, predicate, file, line) == mask;
}

// ---------------------------------------------------------------------------------------
// Atomics: the emulated threads of a block never run at the same time, so a plain
// read-modify-write is atomic.

template <typename T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
inline T atomicMax(T* p, T v) {
  const T old = *p;
  *p = old < v ? v : old;
  return old;
}
template <typename T>
inline T atomicMin(T* p, T v) {
  const T old = *p;
  *p = v < old ? v : old;
  return old;
}
template <typename T>
inline T atomicExch(T* p, T v) {
  const T old = *p;
  *p = v;
  return old;
}
template <typename T>
inline T atomicCAS(T* p, T compare, T v) {
  const T old = *p;
  if (old == compare) *p = v;
  return old;
}

// ---------------------------------------------------------------------------------------
// 16-bit floats: storage types with exact round-to-nearest-even conversions.

struct __half {
  unsigned short __x;
};
struct __nv_bfloat16 {
  unsigned short __x;
};
struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
typedef __half half;
typedef __half2 half2;
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

namespace cuda_emu {

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// float -> binary16, round to nearest even; NaN -> 0x7fff (as cvt.rn.f16.f32).
inline unsigned short f32_to_f16(float f) {
  const uint32_t x = f32_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return 0x7fffu;
  if (ax == 0x7f800000u) return static_cast<unsigned short>(sign | 0x7c00u);
  const int e = static_cast<int>(ax >> 23);  // biased float exponent
  if (e >= 143) return static_cast<unsigned short>(sign | 0x7c00u);  // >= 2^16: overflow
  if (e >= 113) {                                                   // a normal half
    uint32_t h = (static_cast<uint32_t>(e - 112) << 10) | ((ax >> 13) & 0x3ffu);
    const uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // carries into the exponent / inf
    return static_cast<unsigned short>(sign | h);
  }
  if (e < 102) return static_cast<unsigned short>(sign);  // below 2^-25: rounds to zero
  // A subnormal half: units of 2^-24. value = m * 2^(e - 150), m with its implicit bit.
  const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
  const int shift = 126 - e;  // 14 .. 24
  uint32_t h = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u), half_unit = 1u << (shift - 1);
  if (rem > half_unit || (rem == half_unit && (h & 1u))) ++h;
  return static_cast<unsigned short>(sign | h);
}

inline float f16_to_f32(unsigned short h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1fu) return bits_f32(sign | 0x7f800000u | (m << 13));
  if (e != 0) return bits_f32(sign | ((e + 112) << 23) | (m << 13));
  const float mag = static_cast<float>(m) * 5.9604644775390625e-08f;  // m * 2^-24, exact
  return sign ? -mag : mag;
}

// float -> bfloat16, round to nearest even; NaN -> 0x7fff (as cvt.rn.bf16.f32).
inline unsigned short f32_to_bf16(float f) {
  const uint32_t x = f32_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
  return static_cast<unsigned short>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
inline float bf16_to_f32(unsigned short b) { return bits_f32(static_cast<uint32_t>(b) << 16); }

}  // namespace cuda_emu

inline __half __float2half_rn(float f) { return __half{cuda_emu::f32_to_f16(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __half2float(__half h) { return cuda_emu::f16_to_f32(h.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{cuda_emu::f32_to_bf16(f)}; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return cuda_emu::bf16_to_f32(b.__x); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
inline __half2 __float2half2_rn(float f) { return {__float2half_rn(f), __float2half_rn(f)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline __nv_bfloat162 __float2bfloat162_rn(float f) { return {__float2bfloat16_rn(f), __float2bfloat16_rn(f)}; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 b) { return {__bfloat162float(b.x), __bfloat162float(b.y)}; }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 b) { return b.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 b) { return b.y; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }

// ---------------------------------------------------------------------------------------
// Device math and bit casts: IEEE float32 (see the note at the top).

inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, 4);
  return i;
}
inline float __uint_as_float(unsigned u) { return cuda_emu::bits_f32(u); }
inline unsigned __float_as_uint(float f) { return cuda_emu::f32_bits(f); }

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float a) { return 1.0f / sqrtf(a); }
inline float __frsqrt_rn(float a) { return 1.0f / sqrtf(a); }
inline float __expf(float a) { return expf(a); }
inline float __exp2f(float a) { return exp2f(a); }
inline float __logf(float a) { return logf(a); }
inline float __log2f(float a) { return log2f(a); }
inline float __powf(float a, float b) { return powf(a, b); }
inline float __saturatef(float a) { return a < 0.0f ? 0.0f : (a > 1.0f ? 1.0f : (a == a ? a : 0.0f)); }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// CUDA's global min/max overloads (integers and floats, mixed types promoted).
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}

// Address-space conversion: the generic pointer of dynamic shared memory -> its 32-bit
// shared-window address (see kSharedBase), and back.
inline size_t __cvta_generic_to_shared(const void* p) { return cuda_emu::shared_address(p); }
inline void* __cvta_shared_to_generic(size_t address) {
  return cuda_emu::shared_pointer(static_cast<uint32_t>(address), 1);
}
