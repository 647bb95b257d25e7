// Helpers shared by the CUDA kernels: launch checks, the launch itself, dtype dispatch,
// float conversion, vectorised access and reductions. Device code only needs this file
// and llama_fast.h (plus ptx.cuh for the inline PTX of the tensor-core kernels).
//
// The same sources also compile as host C++ for the CPU emulator of the test suite
// (tests/cuda_emulator, -DLLAMA_FAST_EMULATE): hence launch() instead of <<<...>>>,
// dynamic_shared() instead of extern __shared__, and the alignment checks below.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "llama_fast.h"

namespace llama_fast {

// ---------------------------------------------------------------------------------------
// Launch checks. begin_launch makes the tensors' device current (a caller may have another
// one current) and fails clearly when there is no usable GPU; end_launch turns a failed
// launch into an exception naming the kernel.

[[noreturn]] inline void fail(const char* kernel, const std::string& what) {
  throw std::runtime_error(std::string("llama_fast._C: ") + kernel + ": " + what);
}

inline void check_cuda(cudaError_t err, const char* kernel, const char* call) {
  if (err != cudaSuccess) {
    fail(kernel, std::string(call) + " failed: " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
  }
}

inline void begin_launch(const Launch& at, const char* kernel) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    (void)cudaGetLastError();  // clear the sticky-free error so later calls start clean
    fail(kernel, std::string("no usable CUDA device (cudaGetDeviceCount: ") +
                     (err == cudaSuccess ? "0 devices" : cudaGetErrorString(err)) + ")");
  }
  if (at.device < 0 || at.device >= count) {
    fail(kernel, "device index " + std::to_string(at.device) + " out of range (" + std::to_string(count) + " devices)");
  }
  check_cuda(cudaSetDevice(at.device), kernel, "cudaSetDevice");
}

inline void end_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel, "kernel launch"); }

inline cudaStream_t stream_of(const Launch& at) { return static_cast<cudaStream_t>(at.stream); }

// The device's opt-in limit of shared memory per block (static + dynamic), read once per
// device.
inline int shared_memory_optin(int device, const char* name) {
  static std::atomic<int> limits[64];  // 0: not read yet
  int limit = device >= 0 && device < 64 ? limits[device].load(std::memory_order_relaxed) : 0;
  if (limit == 0) {
    check_cuda(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), name,
               "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
    if (device >= 0 && device < 64) limits[device].store(limit, std::memory_order_relaxed);
  }
  return limit;
}

// How far a kernel's dynamic shared memory limit has been raised on each device (the
// attribute belongs to the device's context): one static per kernel instantiation.
struct SharedRaised {
  std::atomic<int> bytes[64];
};

// Lets `kernel` (with `static_bytes` of static shared memory) launch with `bytes` of dynamic
// shared memory past the default 48 KB in all, raising its limit only when this device's
// limit is still below `bytes`, so that later launches make no driver call. A plain host
// call, so it is safe during CUDA-graph capture.
template <typename Kernel>
void allow_dynamic_shared(Kernel kernel, int bytes, int device, SharedRaised& raised, const char* name,
                          int static_bytes = 0) {
  if (bytes + static_bytes <= 48 * 1024) return;
  std::atomic<int>* slot = device >= 0 && device < 64 ? &raised.bytes[device] : nullptr;
  if (slot != nullptr && slot->load(std::memory_order_relaxed) >= bytes) return;
  const int limit = shared_memory_optin(device, name);
  if (bytes + static_bytes > limit) {
    fail(name, "this shape needs " + std::to_string(bytes + static_bytes) +
                   " bytes of shared memory per block; the device allows " + std::to_string(limit));
  }
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), name,
             "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  if (slot != nullptr) {
    int seen = slot->load(std::memory_order_relaxed);
    while (seen < bytes && !slot->compare_exchange_weak(seen, bytes, std::memory_order_relaxed)) {
    }
  }
}

// kernel<<<grid, block, smem_bytes, stream>>>(args...): every kernel is launched through
// here, so that the CPU emulator can run the same sources (host C++ has no <<<>>>). Errors
// are left for end_launch, as with <<<>>>.
template <typename... Params, typename... Args>
inline void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                   Args&&... args) {
#ifdef LLAMA_FAST_EMULATE
  cuda_emu::launch(kernel, grid, block, smem_bytes, stream, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, smem_bytes, stream>>>(std::forward<Args>(args)...);
#endif
}

template <typename... Params, typename... Args>
inline void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, const Launch& at,
                   Args&&... args) {
  launch(kernel, grid, block, smem_bytes, stream_of(at), std::forward<Args>(args)...);
}

// The block's dynamic shared memory (the launch's smem_bytes), 128-byte aligned.
template <typename T>
__device__ __forceinline__ T* dynamic_shared() {
#ifdef LLAMA_FAST_EMULATE
  return reinterpret_cast<T*>(cuda_emu::dynamic_shared_base());
#else
  extern __shared__ __align__(128) unsigned char llama_fast_dynamic_smem[];
  return reinterpret_cast<T*>(llama_fast_dynamic_smem);
#endif
}

// A GPU traps on a misaligned vector access; the emulator checks (nothing on the GPU).
__device__ __forceinline__ void check_aligned([[maybe_unused]] const void* p, [[maybe_unused]] size_t bytes) {
#ifdef LLAMA_FAST_EMULATE
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) cuda_emu::misaligned("vector access", p, bytes);
#endif
}

// ---------------------------------------------------------------------------------------
// Element types.

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round to nearest even, as torch's .to(dtype) does.
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// x rounded to T and back: the roundings the eager modules make in the middle of an op.
template <typename T>
__device__ __forceinline__ float round_to(float x) { return to_float<T>(from_float<T>(x)); }

// Calls body.template operator()<T>() with T the C++ type of dtype:
//   dispatch_dtype(a.dtype, "rope", [&](auto tag) { using T = decltype(tag); ... });
template <typename Body>
inline void dispatch_dtype(DType dtype, const char* kernel, Body&& body) {
  switch (dtype) {
    case DType::kFloat32: body(float{}); return;
    case DType::kFloat16: body(__half{}); return;
    case DType::kBFloat16: body(__nv_bfloat16{}); return;
  }
  fail(kernel, "unknown dtype code " + std::to_string(static_cast<int>(dtype)));
}

// The dtype torch.promote_types gives for two of ours.
inline DType promote(DType a, DType b) { return a == b ? a : DType::kFloat32; }

// ---------------------------------------------------------------------------------------
// Vectorised access: VEC elements of T in one load or store of VEC * sizeof(T) bytes.

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[VEC]) {
  check_aligned(p, sizeof(Pack<T, VEC>));
  const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_float<T>(pack.v[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[VEC]) {
  check_aligned(p, sizeof(Pack<T, VEC>));
  Pack<T, VEC> pack;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pack.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pack;
}

// Widest vector (in elements, a power of two up to 16 bytes / elem_bytes) such that every
// pointer is aligned to it and every row stride and the row length are multiples of it:
// then every access of the kernel is aligned. Null pointers are ignored.
inline int vector_width(int elem_bytes, std::initializer_list<const void*> ptrs,
                        std::initializer_list<int64_t> counts) {
  int vec = 16 / elem_bytes;
  while (vec > 1) {
    bool ok = true;
    for (const void* p : ptrs) ok = ok && (p == nullptr || reinterpret_cast<uintptr_t>(p) % (vec * elem_bytes) == 0);
    for (int64_t c : counts) ok = ok && (c % vec == 0);
    if (ok) break;
    vec /= 2;
  }
  return vec;
}

// ---------------------------------------------------------------------------------------
// Reductions.

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Sum over all threads of the block; every thread gets the result. scratch: 32 floats of
// shared memory. blockDim.x must be a multiple of 32.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  x = warp_sum(x);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < warps ? scratch[lane] : 0.0f;
  return warp_sum(x);
}

inline int dtype_bytes(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// A stride along a dimension of size 1 is never stepped and may be anything (torch reports
// all sorts there): leave it out of alignment checks.
inline int64_t stepped(int64_t stride, int64_t size) { return size > 1 ? stride : 0; }

// Calls body(std::integral_constant<int, vec>) for vec in {8, 4, 2, 1}, instantiating only
// the widths a 16-byte pack of T allows.
template <typename T, typename Body>
void dispatch_vec(int vec, Body&& body) {
  constexpr int kMax = 16 / static_cast<int>(sizeof(T));
  if constexpr (kMax >= 8) {
    if (vec == 8) return body(std::integral_constant<int, 8>{});
  }
  if (vec == 4) return body(std::integral_constant<int, 4>{});
  if (vec == 2) return body(std::integral_constant<int, 2>{});
  body(std::integral_constant<int, 1>{});
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace llama_fast
