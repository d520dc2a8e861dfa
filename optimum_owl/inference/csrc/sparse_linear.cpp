// Sparse linear layer y = x @ W^T (+ bias) for a weight stored as a per-row bitmask plus its packed non-zeros.
//
// Memory layout (built by optimum_owl/inference/format.py):
//   mask    uint8 [out, 8 * wpr], wpr = ceil(in / 64) little-endian 64-bit words per row. Bit b of word w of row r
//           (byte w*8 + b/8, bit b%8, least significant first) is set when W[r, 64*w + b] is stored. Bits at and
//           beyond `in` are zero.
//   values  float32 / bfloat16 / float16 [nnz + 16]: the stored elements of W in row-major order, then 16 zeros so
//           that an unaligned 8-element load at any row's last non-zero stays inside the buffer.
//   offsets int64 [out + 1]: offsets[r] is the index in `values` of row r's first non-zero (prefix sum of popcounts).
//   x       float32 [n, 64 * wpr] contiguous, zero-padded past `in` (the Python side converts and pads).
// Results are float32 [n, out]; accumulation is always in float32.
//
// Decode (few tokens): one pass over each row's mask. For every mask byte, the next 8 packed values are loaded,
// expanded to their lanes with a 256-entry permutation table (vpermps), zeroed where the mask bit is clear, and
// multiplied into up to 4 tokens' accumulators. A weight byte is read once per group of 4 tokens.
// Prefill (many tokens): rows are expanded tile by tile into a small dense float32 buffer and multiplied with
// at::mm (BLAS), so the cost stays that of a dense GEMM plus the expansion.
// Rows are split over torch's intra-op thread pool (at::parallel_for), so torch.set_num_threads applies.
// Only the AVX2 + FMA + F16C path exists; the functions carry target attributes, and the Python loader calls them
// only after checking the CPU flags (and each entry point checks again).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#define OWL_AVX2 __attribute__((target("avx2,fma,f16c,popcnt")))

namespace {

// kPerm[m][lane]: index among the packed values of the value that lands in `lane` (bits of m below lane);
// kLanes[m][lane]: all ones where bit `lane` of m is set.
struct Tables {
  alignas(32) int32_t perm[256][8];
  alignas(32) int32_t lanes[256][8];
  Tables() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int lane = 0; lane < 8; ++lane) {
        bool on = (m >> lane) & 1;
        perm[m][lane] = on ? k : 0;
        lanes[m][lane] = on ? -1 : 0;
        k += on;
      }
    }
  }
};
const Tables kTables;

bool cpu_ok() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c") && __builtin_cpu_supports("popcnt");
  return ok;
}

// Load 8 consecutive stored values as float32.
OWL_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
OWL_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
OWL_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// The 8 weights under mask byte `m`, given the packed values that start at `p`.
template <typename T>
OWL_AVX2 inline __m256 expand(const T* p, unsigned m) {
  __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(kTables.perm[m]));
  __m256 on = _mm256_load_ps(reinterpret_cast<const float*>(kTables.lanes[m]));
  return _mm256_and_ps(_mm256_permutevar8x32_ps(load8(p), idx), on);
}

OWL_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

struct Args {
  const uint64_t* mask;
  const void* values;
  const int64_t* offsets;
  const float* x;
  const float* bias;
  float* y;
  int64_t wpr, n, ldx, out;
};

// NT tokens starting at t0, one row. A accumulators per token hide the FMA latency when NT is small.
template <typename T, int NT>
OWL_AVX2 inline void row_dot(const Args& a, int64_t r, int64_t t0) {
  constexpr int A = NT >= 4 ? 1 : (NT == 1 ? 4 : 2);
  const uint64_t* m = a.mask + r * a.wpr;
  const T* v = static_cast<const T*>(a.values) + a.offsets[r];
  const float* xb = a.x + t0 * a.ldx;
  __m256 acc[NT][A];
  for (int t = 0; t < NT; ++t)
    for (int j = 0; j < A; ++j) acc[t][j] = _mm256_setzero_ps();
  for (int64_t w = 0; w < a.wpr; ++w) {
    const uint64_t bits = m[w];
    if (!bits) continue;
    const float* xw = xb + w * 64;
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) {
      const unsigned byte = static_cast<unsigned>(bits >> (8 * k)) & 0xffu;
      const __m256 e = expand(v, byte);
      v += _mm_popcnt_u32(byte);
      for (int t = 0; t < NT; ++t)
        acc[t][k % A] = _mm256_fmadd_ps(e, _mm256_loadu_ps(xw + t * a.ldx + 8 * k), acc[t][k % A]);
    }
  }
  const float b = a.bias ? a.bias[r] : 0.0f;
  for (int t = 0; t < NT; ++t) {
    __m256 s = acc[t][0];
    for (int j = 1; j < A; ++j) s = _mm256_add_ps(s, acc[t][j]);
    a.y[(t0 + t) * a.out + r] = hsum(s) + b;
  }
}

template <typename T>
OWL_AVX2 void decode_rows(const Args& a, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    int64_t t = 0;
    for (; t + 4 <= a.n; t += 4) row_dot<T, 4>(a, r, t);
    switch (a.n - t) {
      case 3: row_dot<T, 3>(a, r, t); break;
      case 2: row_dot<T, 2>(a, r, t); break;
      case 1: row_dot<T, 1>(a, r, t); break;
      default: break;
    }
  }
}

// Expand rows [r0, r1) into a dense float32 tile with row stride 64 * wpr.
template <typename T>
OWL_AVX2 void expand_rows(const Args& a, int64_t r0, int64_t r1, int64_t tile_r0, float* tile) {
  const int64_t ld = 64 * a.wpr;
  for (int64_t r = r0; r < r1; ++r) {
    const uint64_t* m = a.mask + r * a.wpr;
    const T* v = static_cast<const T*>(a.values) + a.offsets[r];
    float* dst = tile + (r - tile_r0) * ld;
    for (int64_t w = 0; w < a.wpr; ++w) {
      const uint64_t bits = m[w];
      float* d = dst + 64 * w;
      if (!bits) {
        std::memset(d, 0, 64 * sizeof(float));
        continue;
      }
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k) {
        const unsigned byte = static_cast<unsigned>(bits >> (8 * k)) & 0xffu;
        _mm256_storeu_ps(d + 8 * k, expand(v, byte));
        v += _mm_popcnt_u32(byte);
      }
    }
  }
}

void check_inputs(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& values, const at::Tensor& offsets,
                  const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(cpu_ok(), "owl_sparse: this CPU lacks AVX2/FMA/F16C/POPCNT; use the pure-PyTorch path");
  TORCH_CHECK(x.device().is_cpu() && mask.device().is_cpu() && values.device().is_cpu(), "owl_sparse: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "owl_sparse: x must be [n, 64*wpr] float32");
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.dim() == 2 && mask.is_contiguous() && mask.size(1) % 8 == 0,
              "owl_sparse: mask must be contiguous uint8 [out, 8*wpr]");
  TORCH_CHECK(x.size(1) == mask.size(1) * 8, "owl_sparse: x width ", x.size(1), " != 64 * words per row ", mask.size(1) * 8);
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.is_contiguous() && offsets.numel() == mask.size(0) + 1,
              "owl_sparse: offsets must be int64 [out + 1]");
  TORCH_CHECK(values.is_contiguous() && values.dim() == 1, "owl_sparse: values must be 1-D contiguous");
  const int64_t nnz = offsets.data_ptr<int64_t>()[mask.size(0)];
  TORCH_CHECK(values.numel() >= nnz + 16, "owl_sparse: values need 16 padding elements after the ", nnz, " non-zeros");
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == mask.size(0),
                "owl_sparse: bias must be float32 [out]");
}

Args make_args(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& values, const at::Tensor& offsets,
               const c10::optional<at::Tensor>& bias, at::Tensor& y) {
  Args a;
  a.mask = reinterpret_cast<const uint64_t*>(mask.data_ptr<uint8_t>());
  a.values = values.data_ptr();
  a.offsets = offsets.data_ptr<int64_t>();
  a.x = x.data_ptr<float>();
  a.bias = (bias.has_value() && bias->defined()) ? bias->data_ptr<float>() : nullptr;
  a.y = y.data_ptr<float>();
  a.wpr = mask.size(1) / 8;
  a.n = x.size(0);
  a.ldx = x.size(1);
  a.out = mask.size(0);
  return a;
}

template <typename F>
void by_dtype(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "owl_sparse: values must be float32, bfloat16 or float16, got ", t);
  }
}

at::Tensor sparse_decode(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& values, const at::Tensor& offsets,
                         const c10::optional<at::Tensor>& bias) {
  check_inputs(x, mask, values, offsets, bias);
  at::Tensor y = at::empty({x.size(0), mask.size(0)}, x.options());
  const Args a = make_args(x, mask, values, offsets, bias, y);
  by_dtype(values.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, a.out, 16, [&](int64_t r0, int64_t r1) { decode_rows<T>(a, r0, r1); });
  });
  return y;
}

at::Tensor sparse_prefill(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& values,
                          const at::Tensor& offsets, const c10::optional<at::Tensor>& bias, int64_t in_features,
                          int64_t tile_rows) {
  check_inputs(x, mask, values, offsets, bias);
  TORCH_CHECK(tile_rows > 0 && in_features > 0 && in_features <= x.size(1), "owl_sparse: bad tile_rows / in_features");
  at::Tensor y = at::empty({x.size(0), mask.size(0)}, x.options());
  const Args a = make_args(x, mask, values, offsets, bias, y);
  const int64_t rows = std::min<int64_t>(tile_rows, a.out);
  at::Tensor tile = at::empty({rows, x.size(1)}, x.options());
  at::Tensor xs = x.narrow(1, 0, in_features);
  by_dtype(values.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    for (int64_t r0 = 0; r0 < a.out; r0 += rows) {
      const int64_t r1 = std::min(a.out, r0 + rows);
      float* t = tile.data_ptr<float>();
      at::parallel_for(r0, r1, 8, [&](int64_t b, int64_t e) { expand_rows<T>(a, b, e, r0, t); });
      at::Tensor w = tile.narrow(0, 0, r1 - r0).narrow(1, 0, in_features);
      at::Tensor dst = y.narrow(1, r0, r1 - r0);
      at::mm_out(dst, xs, w.t());
    }
  });
  if (a.bias) y.add_(*bias);
  return y;
}

bool cpu_supported() { return cpu_ok(); }

}  // namespace

TORCH_LIBRARY(owl_sparse, m) {
  m.def("decode(Tensor x, Tensor mask, Tensor values, Tensor offsets, Tensor? bias) -> Tensor", &sparse_decode);
  m.def("prefill(Tensor x, Tensor mask, Tensor values, Tensor offsets, Tensor? bias, int in_features, int tile_rows) -> Tensor",
        &sparse_prefill);
  m.def("cpu_supported() -> bool", &cpu_supported);
}
