// Planted bugs the CPU emulator must catch rather than run through or hang on: each case
// launches a small broken kernel and checks the error (an exception from the launch, or
// cudaGetLastError for launch-configuration errors, as on a GPU). Also checks that legal
// patterns (early exit before a barrier, partial-mask shuffles) run. Run by
// tests/test_cuda_emulator.py; prints one line per case and exits non-zero on a failure.
#include <cstdio>
#include <functional>
#include <string>

#include "common.cuh"
#include "ptx.cuh"

using namespace llama_fast;

namespace {

int failures = 0;

void check(bool ok, const std::string& what, const std::string& detail = "") {
  std::printf("%s %s%s%s\n", ok ? "ok  " : "FAIL", what.c_str(), detail.empty() ? "" : ": ", detail.c_str());
  if (!ok) ++failures;
}

// Runs body; passes when it throws a runtime_error whose message contains `needle`.
void expect_fault(const std::string& what, const char* needle, const std::function<void()>& body) {
  try {
    body();
  } catch (const std::runtime_error& e) {
    const std::string msg = e.what();
    check(msg.find(needle) != std::string::npos, what, msg);
    return;
  }
  check(false, what, "no error");
}

void expect_ok(const std::string& what, const std::function<void()>& body) {
  try {
    body();
    check(cudaGetLastError() == cudaSuccess, what);
  } catch (const std::runtime_error& e) {
    check(false, what, e.what());
  }
}

// __syncthreads in a branch that splits the block.
__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
    out[0] = 1;
  } else {
    __syncthreads();
  }
}

// Half of warp 0 waits in a shuffle for the other half, which waits at __syncthreads with
// everyone else: nobody can move.
__global__ void deadlock(float* out) {
  float x = static_cast<float>(threadIdx.x);
  if (threadIdx.x < 16) x = __shfl_xor_sync(0xffffffffu, x, 1);
  __syncthreads();
  out[threadIdx.x] = x;
}

// A lane leaves while the rest of its warp shuffles with it.
__global__ void exited_lane(float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// Shuffle in a block of 48 threads: warp 1 has 16 lanes, the full mask names 16 that do not exist.
__global__ void missing_lanes(float* out) { out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 1); }

// Legal: surplus threads exit before the barrier (exited threads count as arrived).
__global__ void early_exit(int* out, int active) {
  __shared__ int total;
  if (static_cast<int>(threadIdx.x) >= active) return;
  if (threadIdx.x == 0) total = 0;
  __syncthreads();
  atomicAdd(&total, 1);
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = total;
}

// Legal: each half warp shuffles within itself.
__global__ void half_warps(float* out) {
  const unsigned mask = threadIdx.x < 16 ? 0x0000ffffu : 0xffff0000u;
  out[threadIdx.x] = __shfl_xor_sync(mask, static_cast<float>(threadIdx.x), 1, 16);
}

// Missing barrier between writing and reading shared memory: thread i reads its
// neighbour's slot. Caught by the shuffled schedule (some reader runs before its writer).
__global__ void missing_barrier(float* out) {
  __shared__ float slot[64];
  slot[threadIdx.x] = static_cast<float>(threadIdx.x);
  out[threadIdx.x] = slot[(threadIdx.x + 1) % 64];
}

// A 16-byte vector load from an address that is only 4-byte aligned.
__global__ void misaligned_load(const float* in, float* out) {
  float v[4];
  load_floats<float, 4>(in + 1, v);
  out[0] = v[0];
}

// A uint4 (16-byte) load through a pointer that is only 8-byte aligned (UBSan's alignment
// check, see cuda_emu.cpp).
__global__ void misaligned_uint4(const float* in, float* out) {
  const uint4 v = *reinterpret_cast<const uint4*>(in + 2);
  out[0] = __uint_as_float(v.x);
}

// ldmatrix row addresses past the end of dynamic shared memory.
__global__ void ldmatrix_out_of_bounds(uint32_t* out) {
  uint32_t r[4];
  const uint32_t base = ptx::smem_addr(dynamic_shared<uint16_t>());
  ptx::ldmatrix_x4(r, base + threadIdx.x * 16);  // needs 512 bytes, the launch gives 256
  out[threadIdx.x] = r[0];
}

// Reads a cp.async destination before the wait.
__global__ void read_before_wait(const float* src, float* out) {
  float* s = dynamic_shared<float>();
  ptx::cp_async_cg_16(ptx::smem_addr(s + 4 * threadIdx.x), src + 4 * threadIdx.x, 16);
  ptx::cp_async_commit();
  out[threadIdx.x] = s[4 * threadIdx.x];  // bug: no wait_group / barrier
  ptx::cp_async_wait_group<0>();
}

__global__ void noop(int*) {}

}  // namespace

int main() {
  static int ints[1024];
  static float floats[1024];
  alignas(16) static float src[1024];
  for (int i = 0; i < 1024; ++i) src[i] = 1.0f;
  const cudaStream_t s{};

  expect_fault("__syncthreads in divergent code", "divergent",
               [&] { launch(divergent_barrier, 1, 64, 0, s, ints); });
  expect_fault("deadlock between a warp shuffle and __syncthreads", "deadlock",
               [&] { launch(deadlock, 1, 64, 0, s, floats); });
  expect_fault("shuffle with an exited lane", "exited", [&] { launch(exited_lane, 1, 32, 0, s, floats); });
  expect_fault("full-mask shuffle in a partial warp", "does not have",
               [&] { launch(missing_lanes, 1, 48, 0, s, floats); });
  expect_fault("misaligned 16-byte vector load", "misaligned",
               [&] { launch(misaligned_load, 1, 1, 0, s, static_cast<const float*>(src), floats); });
  expect_fault("misaligned uint4 load", "misaligned access",
               [&] { launch(misaligned_uint4, 1, 1, 0, s, static_cast<const float*>(src), floats); });
  expect_fault("ldmatrix outside dynamic shared memory", "out of bounds", [&] {
    launch(ldmatrix_out_of_bounds, 1, 32, 256, s, reinterpret_cast<uint32_t*>(ints));
  });

  expect_ok("surplus threads exit before __syncthreads (legal)", [&] {
    launch(early_exit, 3, 128, 0, s, ints, 40);
    if (ints[0] != 40 || ints[2] != 40) throw std::runtime_error("wrong count");
  });
  expect_ok("half-warp shuffles with disjoint masks (legal)", [&] {
    launch(half_warps, 1, 32, 0, s, floats);
    if (floats[0] != 1.0f || floats[17] != 16.0f) throw std::runtime_error("wrong value");
  });

  {
    for (int i = 0; i < 64; ++i) floats[i] = -1.0f;
    launch(missing_barrier, 1, 64, 0, s, floats);
    int stale = 0;
    for (int i = 0; i < 64; ++i) stale += floats[i] != static_cast<float>((i + 1) % 64);
    check(stale > 0, "a missing __syncthreads shows in the results (shuffled schedule)",
          std::to_string(stale) + " of 64 reads saw stale data");
  }
  {
    launch(read_before_wait, 1, 32, 512, s, static_cast<const float*>(src), floats);
    int nan = 0;
    for (int i = 0; i < 32; ++i) nan += std::isnan(floats[i]);
    check(nan == 32, "reading a cp.async destination before the wait reads stale (NaN) data");
  }

  // Launch configuration errors: reported by cudaGetLastError, as on a GPU.
  launch(noop, dim3(1, 65536), 32, 0, s, ints);
  check(cudaGetLastError() == cudaErrorInvalidConfiguration, "grid y of 65536");
  launch(noop, dim3(1u << 31), 32, 0, s, ints);
  check(cudaGetLastError() == cudaErrorInvalidConfiguration, "grid x of 2^31");
  launch(noop, 1, 1025, 0, s, ints);
  check(cudaGetLastError() == cudaErrorInvalidConfiguration, "block of 1025 threads");
  launch(noop, 0, 32, 0, s, ints);
  check(cudaGetLastError() == cudaErrorInvalidConfiguration, "empty grid");
  launch(noop, 1, 32, 48 * 1024 + 16, s, ints);
  check(cudaGetLastError() == cudaErrorInvalidValue, "dynamic shared memory above 48 KB without the attribute");
  check(cudaFuncSetAttribute(noop, cudaFuncAttributeMaxDynamicSharedMemorySize, 100 * 1024) == cudaSuccess &&
            (launch(noop, 1, 32, 100 * 1024, s, ints), cudaGetLastError() == cudaSuccess),
        "dynamic shared memory up to the limit set with cudaFuncSetAttribute");
  check(cudaFuncSetAttribute(noop, cudaFuncAttributeMaxDynamicSharedMemorySize, 228 * 1024) == cudaErrorInvalidValue,
        "cudaFuncSetAttribute above the H100's 227 KB");
  cudaGetLastError();

  std::printf("%d failure(s)\n", failures);
  return failures ? 1 : 0;
}
