// Checks the emulation of csrc/ptx.cuh against plain matrix products: one warp loads A
// (16x16, row-major) and B (16x8) from shared memory with ldmatrix in each of the forms the
// kernels use, multiplies with mma.m16n8k16 onto a C, and compares every lane's D fragment
// with a float64 product. ldmatrix's and mma's fragment layouts are separate definitions
// of the PTX ISA; only if both are emulated as the ISA defines them do the products agree.
// Also checks cp.async (zero fill, deferral until the wait). Run by
// tests/test_cuda_emulator.py; prints one line per check and exits non-zero on a failure.
#include <cstdio>
#include <random>
#include <vector>

#include "common.cuh"
#include "ptx.cuh"

using namespace llama_fast;

namespace {

int failures = 0;

void check(bool ok, const char* what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what);
  if (!ok) ++failures;
}

// Shared-memory layout of the test kernel (elements of T).
constexpr int kA = 0;          // A, 16 x 16 row-major
constexpr int kBt = 256;       // B^T, 8 x 16 row-major (B column-major: the .col operand)
constexpr int kBkn = 384;      // B, 16 x 8 row-major (rows k)
constexpr int kB2 = 512;       // B2, 16 x 16 row-major (two n8 tiles, for x4.trans)
constexpr int kSmemElems = 768;

struct Out {
  float d[32][4];    // B from B^T with ldmatrix.x2
  float d1[32][4];   // B from B^T with two ldmatrix.x1
  float dt[32][4];   // B from B (k rows) with ldmatrix.x2.trans
  float d2[32][2][4];  // the two n8 tiles of B2 with one ldmatrix.x4.trans
};

template <typename T>
__global__ void mma_kernel(const uint16_t* a, const uint16_t* bkn, const uint16_t* b2, const float* c, Out* out) {
  uint16_t* s = dynamic_shared<uint16_t>();
  const int lane = threadIdx.x;
  for (int i = lane; i < 256; i += 32) {
    s[kA + i] = a[i];
    s[kB2 + i] = b2[i];
  }
  for (int i = lane; i < 128; i += 32) {
    const int k = i / 8, n = i % 8;
    s[kBkn + i] = bkn[i];
    s[kBt + n * 16 + k] = bkn[i];
  }
  __syncwarp();
  const uint32_t base = ptx::smem_addr(s);
  const int g = lane / 4, t = lane % 4;
  float acc[4];
  auto reset = [&] {
    acc[0] = c[g * 8 + 2 * t];
    acc[1] = c[g * 8 + 2 * t + 1];
    acc[2] = c[(g + 8) * 8 + 2 * t];
    acc[3] = c[(g + 8) * 8 + 2 * t + 1];
  };
  // A: matrices (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7, cols 8-15), (rows 8-15, cols 8-15).
  const int m = lane / 8, r = lane % 8;
  uint32_t fa[4];
  ptx::ldmatrix_x4(fa, base + 2 * (kA + ((m & 1) * 8 + r) * 16 + (m >> 1) * 8));
  // B^T rows are B's columns: matrix 0 = k 0-7, matrix 1 = k 8-15 (lanes 16-31 unused).
  uint32_t fb[2];
  ptx::ldmatrix_x2(fb, base + 2 * (kBt + r * 16 + (m & 1) * 8));
  reset();
  ptx::mma_m16n8k16<T>(acc, fa, fb[0], fb[1]);
  for (int e = 0; e < 4; ++e) out->d[lane][e] = acc[e];

  uint32_t fb0[1], fb1[1];
  ptx::ldmatrix_x1(fb0, base + 2 * (kBt + r * 16));
  ptx::ldmatrix_x1(fb1, base + 2 * (kBt + r * 16 + 8));
  reset();
  ptx::mma_m16n8k16<T>(acc, fa, fb0[0], fb1[0]);
  for (int e = 0; e < 4; ++e) out->d1[lane][e] = acc[e];

  // B stored with rows k: transposed loads; matrix 0 = rows k 0-7, matrix 1 = rows k 8-15.
  uint32_t ft[2];
  ptx::ldmatrix_x2_trans(ft, base + 2 * (kBkn + ((m & 1) * 8 + r) * 8));
  reset();
  ptx::mma_m16n8k16<T>(acc, fa, ft[0], ft[1]);
  for (int e = 0; e < 4; ++e) out->dt[lane][e] = acc[e];

  // B2 (16 x 16, rows k): x4.trans, matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15),
  // (k 8-15, n 8-15): registers 0, 1 are tile 0's b0, b1 and 2, 3 tile 1's.
  uint32_t f4[4];
  ptx::ldmatrix_x4_trans(f4, base + 2 * (kB2 + ((m & 1) * 8 + r) * 16 + (m >> 1) * 8));
  for (int tile = 0; tile < 2; ++tile) {
    acc[0] = acc[1] = acc[2] = acc[3] = 0.0f;
    ptx::mma_m16n8k16<T>(acc, fa, f4[2 * tile], f4[2 * tile + 1]);
    for (int e = 0; e < 4; ++e) out->d2[lane][tile][e] = acc[e];
  }
}

template <typename T>
uint16_t bits_of(float x) {
  T v = from_float<T>(x);
  uint16_t b;
  std::memcpy(&b, &v, 2);
  return b;
}
template <typename T>
double value_of(uint16_t b) {
  T v;
  std::memcpy(&v, &b, 2);
  return to_float<T>(v);
}

template <typename T>
void test_mma(const char* name) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  std::vector<uint16_t> a(256), bkn(128), b2(256);
  std::vector<float> c(128);
  for (auto& x : a) x = bits_of<T>(normal(rng));
  for (auto& x : bkn) x = bits_of<T>(normal(rng));
  for (auto& x : b2) x = bits_of<T>(normal(rng));
  for (auto& x : c) x = normal(rng);
  Out out;
  std::memset(&out, 0xff, sizeof(out));
  cudaFuncSetAttribute(mma_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemElems * 2);
  launch(mma_kernel<T>, 1, 32, kSmemElems * 2, cudaStream_t{}, a.data(), bkn.data(), b2.data(), c.data(), &out);
  check(cudaGetLastError() == cudaSuccess, "launch");

  bool ok[4] = {true, true, true, true};
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int e = 0; e < 4; ++e) {
      const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
      double want = c[row * 8 + col];
      for (int k = 0; k < 16; ++k) want += value_of<T>(a[row * 16 + k]) * value_of<T>(bkn[k * 8 + col]);
      const double tol = 1e-5 * (1 + std::fabs(want));
      ok[0] = ok[0] && std::fabs(out.d[lane][e] - want) <= tol;
      ok[1] = ok[1] && std::fabs(out.d1[lane][e] - want) <= tol;
      ok[2] = ok[2] && std::fabs(out.dt[lane][e] - want) <= tol;
      for (int tile = 0; tile < 2; ++tile) {
        double want2 = 0;
        for (int k = 0; k < 16; ++k) want2 += value_of<T>(a[row * 16 + k]) * value_of<T>(b2[k * 16 + tile * 8 + col]);
        ok[3] = ok[3] && std::fabs(out.d2[lane][tile][e] - want2) <= 1e-5 * (1 + std::fabs(want2));
      }
    }
  }
  std::string n(name);
  check(ok[0], (n + ": mma(ldmatrix.x4 A, ldmatrix.x2 B^T) + C == A B + C").c_str());
  check(ok[1], (n + ": mma(ldmatrix.x4 A, 2 x ldmatrix.x1 B^T) + C == A B + C").c_str());
  check(ok[2], (n + ": mma(ldmatrix.x4 A, ldmatrix.x2.trans B) + C == A B + C").c_str());
  check(ok[3], (n + ": mma(ldmatrix.x4 A, ldmatrix.x4.trans B2) == A B2, both n8 tiles").c_str());
}

// cp.async: 16-byte copies with and without zero fill, 4- and 8-byte copies; the data lands
// at the wait, not before.
__global__ void cp_async_kernel(const float* src, float* out, int* landed_early) {
  float* s = dynamic_shared<float>();
  const int lane = threadIdx.x;
  const uint32_t base = ptx::smem_addr(s);
  if (lane == 0) {
    ptx::cp_async_cg_16(base, src, 16);           // s[0..4) = src[0..4)
    ptx::cp_async_cg_16(base + 16, src + 4, 8);   // s[4..6) = src[4..6), s[6..8) = 0
    ptx::cp_async_cg_16(base + 32, src + 8, 0);   // s[8..12) = 0
    ptx::cp_async_ca<8>(base + 48, src + 12, 8);  // s[12..14)
    ptx::cp_async_ca<4>(base + 56, src + 14, 4);  // s[14]
    ptx::cp_async_commit();
    ptx::cp_async_ca<4>(base + 60, src + 15, 4);  // s[15], second group
    ptx::cp_async_commit();
    *landed_early = !std::isnan(s[0]);  // shared memory starts as NaN: not landed yet
    ptx::cp_async_wait_group<1>();      // the first group only
    landed_early[1] = !std::isnan(s[15]);
    ptx::cp_async_wait_all();
  }
  __syncwarp();
  if (lane < 16) out[lane] = s[lane];
}

void test_cp_async() {
  float src[16], out[16];
  int early[2] = {-1, -1};
  for (int i = 0; i < 16; ++i) src[i] = static_cast<float>(i + 1);
  launch(cp_async_kernel, 1, 32, 256, cudaStream_t{}, static_cast<const float*>(src), static_cast<float*>(out),
         static_cast<int*>(early));
  const float want[16] = {1, 2, 3, 4, 5, 6, 0, 0, 0, 0, 0, 0, 13, 14, 15, 16};
  bool ok = true;
  for (int i = 0; i < 16; ++i) ok = ok && out[i] == want[i];
  check(ok, "cp.async: copies, partial and full zero fill, 4/8/16-byte forms");
  check(early[0] == 0 && early[1] == 0, "cp.async: nothing lands before the wait that retires its group");
}

}  // namespace

int main() {
  test_mma<__nv_bfloat16>("bf16");
  test_mma<__half>("f16");
  test_cp_async();
  std::printf("%d failure(s)\n", failures);
  return failures ? 1 : 0;
}
