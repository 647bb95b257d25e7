// pybind11 bindings of llama_fast._C: each function takes keyword arguments (device
// pointers as integers, sizes and strides in elements, dtype codes, the device index and
// the stream handle) and fills the argument struct of csrc/llama_fast.h. Compiled by the
// host compiler alone: no CUDA or torch headers here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>

#include "llama_fast.h"

namespace py = pybind11;
using namespace llama_fast;

namespace {

template <typename T>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

template <size_t N>
void copy_strides(int64_t (&to)[N], const std::array<int64_t, N>& from) {
  for (size_t i = 0; i < N; ++i) to[i] = from[i];
}

DType dtype_of(int code) {
  if (code < 0 || code > 2) throw py::value_error("llama_fast._C: dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  return static_cast<DType>(code);
}

Launch launch_of(int device, std::uintptr_t stream) { return Launch{device, ptr<void>(stream)}; }

using Strides3 = std::array<int64_t, 3>;
using Strides4 = std::array<int64_t, 4>;

}  // namespace

// The module's name: _C, or _C_emu for the CPU emulator of the tests (tests/cuda_emulator).
#ifndef LLAMA_FAST_MODULE_NAME
#define LLAMA_FAST_MODULE_NAME _C
#endif

PYBIND11_MODULE(LLAMA_FAST_MODULE_NAME, m) {
  m.doc() = "llama_fast CUDA kernels (no libtorch): see csrc/llama_fast.h for the arguments";
  auto nogil = py::call_guard<py::gil_scoped_release>();

  // What this build targets, for llama_fast.info() (setup.py defines both).
  m.attr("cuda_archs") = LLAMA_FAST_CUDA_ARCHS;
  m.attr("nvcc_version") = LLAMA_FAST_NVCC_VERSION;

  m.def(
      "rms_norm_fwd",
      [](std::uintptr_t x, std::uintptr_t residual, std::uintptr_t weight, std::uintptr_t y, std::uintptr_t h,
         int64_t rows, int64_t n, int64_t stride_x, int64_t stride_r, int64_t stride_y, int64_t stride_h, float eps,
         int x_dtype, int w_dtype, int device, std::uintptr_t stream) {
        RmsNormFwdArgs a{ptr<const void>(x), ptr<const void>(residual), ptr<const void>(weight), ptr<void>(y),
                         ptr<void>(h), rows, n, stride_x, stride_r, stride_y, stride_h, eps,
                         dtype_of(x_dtype), dtype_of(w_dtype)};
        rms_norm_fwd(a, launch_of(device, stream));
      },
      py::kw_only(), py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("y"), py::arg("h"), py::arg("rows"),
      py::arg("n"), py::arg("stride_x"), py::arg("stride_r"), py::arg("stride_y"), py::arg("stride_h"), py::arg("eps"),
      py::arg("x_dtype"), py::arg("w_dtype"), py::arg("device"), py::arg("stream"), nogil);

  m.def(
      "rms_norm_bwd",
      [](std::uintptr_t dy, std::uintptr_t dh, std::uintptr_t h, std::uintptr_t weight, std::uintptr_t dx,
         std::uintptr_t dw_partial, int64_t rows, int64_t n, int64_t num_partials, int64_t stride_dy,
         int64_t stride_dh, int64_t stride_h, int64_t stride_dx, float eps, int x_dtype, int w_dtype, int device,
         std::uintptr_t stream) {
        RmsNormBwdArgs a{ptr<const void>(dy), ptr<const void>(dh), ptr<const void>(h), ptr<const void>(weight),
                         ptr<void>(dx), ptr<float>(dw_partial), rows, n, num_partials, stride_dy, stride_dh,
                         stride_h, stride_dx, eps, dtype_of(x_dtype), dtype_of(w_dtype)};
        rms_norm_bwd(a, launch_of(device, stream));
      },
      py::kw_only(), py::arg("dy"), py::arg("dh"), py::arg("h"), py::arg("weight"), py::arg("dx"),
      py::arg("dw_partial"), py::arg("rows"), py::arg("n"), py::arg("num_partials"), py::arg("stride_dy"),
      py::arg("stride_dh"), py::arg("stride_h"), py::arg("stride_dx"), py::arg("eps"), py::arg("x_dtype"),
      py::arg("w_dtype"), py::arg("device"), py::arg("stream"), nogil);

  m.def(
      "rope",
      [](std::uintptr_t q, std::uintptr_t k, std::uintptr_t cos, std::uintptr_t sin, std::uintptr_t q_out,
         std::uintptr_t k_out, int64_t batch, int64_t seq_len, int64_t q_heads, int64_t k_heads, int64_t half_dim,
         Strides4 q_stride, Strides4 k_stride, Strides4 qo_stride, Strides4 ko_stride, Strides3 cs_stride,
         bool interleaved, bool inverse, int x_dtype, int cs_dtype, int device, std::uintptr_t stream) {
        RopeArgs a{};
        a.q = ptr<const void>(q);
        a.k = ptr<const void>(k);
        a.cos = ptr<const void>(cos);
        a.sin = ptr<const void>(sin);
        a.q_out = ptr<void>(q_out);
        a.k_out = ptr<void>(k_out);
        a.batch = batch;
        a.seq_len = seq_len;
        a.q_heads = q_heads;
        a.k_heads = k_heads;
        a.half_dim = half_dim;
        copy_strides(a.q_stride, q_stride);
        copy_strides(a.k_stride, k_stride);
        copy_strides(a.qo_stride, qo_stride);
        copy_strides(a.ko_stride, ko_stride);
        copy_strides(a.cs_stride, cs_stride);
        a.interleaved = interleaved;
        a.inverse = inverse;
        a.x_dtype = dtype_of(x_dtype);
        a.cs_dtype = dtype_of(cs_dtype);
        rope(a, launch_of(device, stream));
      },
      py::kw_only(), py::arg("q"), py::arg("k"), py::arg("cos"), py::arg("sin"), py::arg("q_out"), py::arg("k_out"),
      py::arg("batch"), py::arg("seq_len"), py::arg("q_heads"), py::arg("k_heads"), py::arg("half_dim"),
      py::arg("q_stride"), py::arg("k_stride"), py::arg("qo_stride"), py::arg("ko_stride"), py::arg("cs_stride"),
      py::arg("interleaved"), py::arg("inverse"), py::arg("x_dtype"), py::arg("cs_dtype"), py::arg("device"),
      py::arg("stream"), nogil);

  m.def(
      "swiglu_fwd",
      [](std::uintptr_t gate, std::uintptr_t up, std::uintptr_t y, int64_t rows, int64_t n, int64_t stride_g,
         int64_t stride_u, int64_t stride_y, int dtype, int device, std::uintptr_t stream) {
        SwigluFwdArgs a{ptr<const void>(gate), ptr<const void>(up), ptr<void>(y), rows, n,
                        stride_g, stride_u, stride_y, dtype_of(dtype)};
        swiglu_fwd(a, launch_of(device, stream));
      },
      py::kw_only(), py::arg("gate"), py::arg("up"), py::arg("y"), py::arg("rows"), py::arg("n"), py::arg("stride_g"),
      py::arg("stride_u"), py::arg("stride_y"), py::arg("dtype"), py::arg("device"), py::arg("stream"), nogil);

  m.def(
      "swiglu_bwd",
      [](std::uintptr_t dy, std::uintptr_t gate, std::uintptr_t up, std::uintptr_t dgate, std::uintptr_t dup,
         int64_t rows, int64_t n, int64_t stride_dy, int64_t stride_g, int64_t stride_u, int64_t stride_dg,
         int64_t stride_du, int dtype, int device, std::uintptr_t stream) {
        SwigluBwdArgs a{ptr<const void>(dy), ptr<const void>(gate), ptr<const void>(up), ptr<void>(dgate),
                        ptr<void>(dup), rows, n, stride_dy, stride_g, stride_u, stride_dg, stride_du,
                        dtype_of(dtype)};
        swiglu_bwd(a, launch_of(device, stream));
      },
      py::kw_only(), py::arg("dy"), py::arg("gate"), py::arg("up"), py::arg("dgate"), py::arg("dup"), py::arg("rows"),
      py::arg("n"), py::arg("stride_dy"), py::arg("stride_g"), py::arg("stride_u"), py::arg("stride_dg"),
      py::arg("stride_du"), py::arg("dtype"), py::arg("device"), py::arg("stream"), nogil);

  m.def(
      "attn_fwd",
      [](std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t out, std::uintptr_t lse,
         std::uintptr_t cu_q, std::uintptr_t cu_k, int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t seq_q,
         int64_t seq_k, int64_t head_dim, Strides3 q_stride, Strides3 k_stride, Strides3 v_stride,
         Strides3 o_stride, std::array<int64_t, 2> lse_stride, float scale, bool causal, int dtype, int device,
         std::uintptr_t stream) {
        AttnFwdArgs a{};
        a.q = ptr<const void>(q);
        a.k = ptr<const void>(k);
        a.v = ptr<const void>(v);
        a.out = ptr<void>(out);
        a.lse = ptr<float>(lse);
        a.cu_q = ptr<const int32_t>(cu_q);
        a.cu_k = ptr<const int32_t>(cu_k);
        a.batch = batch;
        a.q_heads = q_heads;
        a.kv_heads = kv_heads;
        a.seq_q = seq_q;
        a.seq_k = seq_k;
        a.head_dim = head_dim;
        copy_strides(a.q_stride, q_stride);
        copy_strides(a.k_stride, k_stride);
        copy_strides(a.v_stride, v_stride);
        copy_strides(a.o_stride, o_stride);
        copy_strides(a.lse_stride, lse_stride);
        a.scale = scale;
        a.causal = causal;
        a.dtype = dtype_of(dtype);
        attn_fwd(a, launch_of(device, stream));
      },
      py::kw_only(), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("cu_q"),
      py::arg("cu_k"), py::arg("batch"), py::arg("q_heads"), py::arg("kv_heads"), py::arg("seq_q"), py::arg("seq_k"),
      py::arg("head_dim"), py::arg("q_stride"), py::arg("k_stride"), py::arg("v_stride"), py::arg("o_stride"),
      py::arg("lse_stride"), py::arg("scale"), py::arg("causal"), py::arg("dtype"), py::arg("device"),
      py::arg("stream"), nogil);

  m.def(
      "decode",
      [](std::uintptr_t q, std::uintptr_t k_cache, std::uintptr_t v_cache, std::uintptr_t cache_seqlens,
         std::uintptr_t out, std::uintptr_t o_part, std::uintptr_t lse_part, int64_t batch, int64_t q_len,
         int64_t q_heads, int64_t kv_heads, int64_t seqlen_max, int64_t head_dim, int64_t num_splits,
         Strides3 q_stride, Strides3 k_stride, Strides3 v_stride, Strides3 o_stride, float scale, int dtype,
         int device, std::uintptr_t stream) {
        DecodeArgs a{};
        a.q = ptr<const void>(q);
        a.k_cache = ptr<const void>(k_cache);
        a.v_cache = ptr<const void>(v_cache);
        a.cache_seqlens = ptr<const int32_t>(cache_seqlens);
        a.out = ptr<void>(out);
        a.o_part = ptr<float>(o_part);
        a.lse_part = ptr<float>(lse_part);
        a.batch = batch;
        a.q_len = q_len;
        a.q_heads = q_heads;
        a.kv_heads = kv_heads;
        a.seqlen_max = seqlen_max;
        a.head_dim = head_dim;
        a.num_splits = num_splits;
        copy_strides(a.q_stride, q_stride);
        copy_strides(a.k_stride, k_stride);
        copy_strides(a.v_stride, v_stride);
        copy_strides(a.o_stride, o_stride);
        a.scale = scale;
        a.dtype = dtype_of(dtype);
        decode(a, launch_of(device, stream));
      },
      py::kw_only(), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("cache_seqlens"), py::arg("out"),
      py::arg("o_part"), py::arg("lse_part"), py::arg("batch"), py::arg("q_len"), py::arg("q_heads"),
      py::arg("kv_heads"), py::arg("seqlen_max"), py::arg("head_dim"), py::arg("num_splits"), py::arg("q_stride"),
      py::arg("k_stride"), py::arg("v_stride"), py::arg("o_stride"), py::arg("scale"), py::arg("dtype"),
      py::arg("device"), py::arg("stream"), nogil);
}
