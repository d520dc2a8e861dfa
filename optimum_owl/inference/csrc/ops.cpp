// The kernel's C entry points (sparse_linear.cpp) registered as torch operators, so that a graph compiled by
// torch.compile (inductor, its C++ wrapper included) calls the kernel directly instead of breaking around a ctypes call:
//
//   owl::sparse_decode(Tensor x, Tensor mask, Tensor values, Tensor offsets, Tensor? bias) -> Tensor
//       x @ W^T + bias for x [..., in] (contiguous float32 / bfloat16 / float16; in = the weight's in_features or its
//       padded width 64 * wpr), bias float32 [out] or None; the result is [..., out] in x's dtype (owl_decode).
//   owl::sparse_expand(Tensor mask, Tensor values, Tensor offsets, int r0, int r1, ScalarType dtype) -> Tensor
//       rows [r0, r1) of W, dense, as a new [r1 - r0, 64 * wpr] tensor of `dtype` (float32, or the values' own 16-bit
//       dtype) (owl_expand).
//   owl::sparse_decode_q8(Tensor x, Tensor mask, Tensor codes, Tensor offsets, Tensor scales, int group_words,
//                         Tensor? bias) -> Tensor
//   owl::sparse_expand_q8(Tensor mask, Tensor codes, Tensor offsets, Tensor scales, int group_words, int r0, int r1,
//                         ScalarType dtype) -> Tensor
//       the same for int8 codes with float32 scales (`group_words` 64-bit mask words per scale group, 0: one scale
//       per row; owl_decode_q8 / owl_expand_q8, csrc/sparse_linear_q8.h); expand gives float32 or bfloat16.
//
// Compiled into the same library as the kernel (kernel.py `_build`), so the operators exist once the kernel has
// loaded. Their fake (shape) implementations are registered from Python (optimum_owl/inference/ops.py).
// Only torch/library.h and the Tensor headers: about 5 s more CPU time in the first build, beside the kernel's.

#include <torch/library.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <vector>

extern "C" {
int owl_decode(const void* x, int xdtype, int64_t n, int64_t in, const uint8_t* mask, int64_t out, int64_t wpr,
               const void* values, int dtype, const int64_t* offsets, const float* bias, void* y);
int owl_expand(const uint8_t* mask, int64_t r0, int64_t r1, int64_t wpr, const void* values, int dtype,
               const int64_t* offsets, void* tile, int tile_dtype);
int owl_decode_q8(const void* x, int xdtype, int64_t n, int64_t in, const uint8_t* mask, int64_t out, int64_t wpr,
                  const int8_t* codes, const int64_t* offsets, const float* scales, int64_t group_words,
                  const float* bias, void* y);
int owl_expand_q8(const uint8_t* mask, int64_t r0, int64_t r1, int64_t wpr, const int8_t* codes,
                  const int64_t* offsets, const float* scales, int64_t group_words, void* tile, int tile_dtype);
}

namespace {

// The kernel's dtype codes (format.py DTYPE_CODES): 0 float32, 1 bfloat16, 2 float16; -1 for anything else.
int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: return -1;
  }
}

const char* error_text(int rc) {  // kernel.py `_ERRORS`
  switch (rc) {
    case 1: return "unsupported value dtype";
    case 2: return "this CPU lacks AVX2/FMA/F16C/POPCNT";
    case 3: return "activations of an unsupported dtype or width";
    case 4: return "out of memory or a thread-pool failure";
    case 5: return "AVX-512 asked for on a CPU without AVX-512F (or an unknown instruction set)";
    default: return "unknown error";
  }
}

void check_weight(const at::Tensor& mask, const at::Tensor& values, const at::Tensor& offsets) {
  TORCH_CHECK(mask.device().is_cpu() && values.device().is_cpu() && offsets.device().is_cpu(),
              "owl::sparse ops: the weight's buffers must be on the CPU");
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.dim() == 2 && mask.is_contiguous() && mask.size(1) % 8 == 0,
              "owl::sparse ops: mask must be contiguous uint8 [out, 8 * words per row]");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.is_contiguous() && offsets.numel() == mask.size(0) + 1,
              "owl::sparse ops: offsets must be contiguous int64 [out + 1]");
  TORCH_CHECK(dtype_code(values.scalar_type()) >= 0 && values.is_contiguous(),
              "owl::sparse ops: values must be contiguous float32 / bfloat16 / float16, got ", values.scalar_type(),
              values.scalar_type() == at::kChar ? " (int8 codes: use owl::sparse_decode_q8 / sparse_expand_q8)" : "");
}

// The activations' kernel dtype code after checking them against a weight of `wpr` words per row.
int check_x(const at::Tensor& x, int64_t wpr, const char* op) {
  const int code = dtype_code(x.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && code >= 0 && x.dim() >= 1 && x.is_contiguous(), op,
              ": x must be a contiguous CPU float32 / bfloat16 / float16 tensor, got ", x.scalar_type());
  const int64_t in = x.size(-1);
  TORCH_CHECK(in > 64 * (wpr - 1) && in <= 64 * wpr, op, ": x has ", in, " features; the weight takes ",
              64 * (wpr - 1) + 1, " to ", 64 * wpr);
  return code;
}

// bias as the kernel reads it: float32 [out] or nullptr.
const float* bias_ptr(const std::optional<at::Tensor>& bias, int64_t out, const char* op) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
              bias->numel() == out, op, ": bias must be contiguous float32 [out] on the CPU");
  return bias->data_ptr<float>();
}

// [..., out] in x's dtype.
at::Tensor output_like(const at::Tensor& x, int64_t out) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  return at::empty(shape, x.options());
}

at::Tensor sparse_decode(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& values,
                         const at::Tensor& offsets, const std::optional<at::Tensor>& bias) {
  check_weight(mask, values, offsets);
  const int64_t out = mask.size(0), wpr = mask.size(1) / 8;
  const int xcode = check_x(x, wpr, "owl::sparse_decode");
  const float* b = bias_ptr(bias, out, "owl::sparse_decode");
  at::Tensor y = output_like(x, out);
  const int64_t in = x.size(-1), n = x.numel() / in;
  const int rc = owl_decode(x.data_ptr(), xcode, n, in, mask.data_ptr<uint8_t>(), out, wpr, values.data_ptr(),
                            dtype_code(values.scalar_type()), offsets.data_ptr<int64_t>(), b, y.data_ptr());
  TORCH_CHECK(rc == 0, "owl kernel: owl_decode failed: ", error_text(rc), " (code ", rc, ")");
  return y;
}

at::Tensor sparse_expand(const at::Tensor& mask, const at::Tensor& values, const at::Tensor& offsets, int64_t r0,
                         int64_t r1, at::ScalarType dtype) {
  check_weight(mask, values, offsets);
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= mask.size(0), "owl::sparse_expand: rows [", r0, ", ", r1,
              ") are not inside [0, ", mask.size(0), "]");
  TORCH_CHECK(dtype == at::kFloat || dtype == values.scalar_type(),
              "owl::sparse_expand: dtype must be float32 or the values' dtype");
  const int64_t wpr = mask.size(1) / 8;
  at::Tensor tile = at::empty({r1 - r0, 64 * wpr}, values.options().dtype(dtype));
  const int rc = owl_expand(mask.data_ptr<uint8_t>(), r0, r1, wpr, values.data_ptr(), dtype_code(values.scalar_type()),
                            offsets.data_ptr<int64_t>(), tile.data_ptr(), dtype_code(dtype));
  TORCH_CHECK(rc == 0, "owl kernel: owl_expand failed: ", error_text(rc), " (code ", rc, ")");
  return tile;
}

// Cheap checks of int8 weight buffers (the thorough ones, with messages naming the fix, are kernel_int8.py's).
void check_q8(const at::Tensor& mask, const at::Tensor& codes, const at::Tensor& offsets, const at::Tensor& scales,
              int64_t group_words, const char* op) {
  TORCH_CHECK(mask.device().is_cpu() && codes.device().is_cpu() && offsets.device().is_cpu() &&
              scales.device().is_cpu(), op, ": the weight's buffers must be on the CPU");
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.dim() == 2 && mask.is_contiguous() && mask.size(1) % 8 == 0 &&
              mask.size(1) > 0, op, ": mask must be contiguous uint8 [out, 8 * words per row]");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.is_contiguous() && offsets.numel() == mask.size(0) + 1,
              op, ": offsets must be contiguous int64 [out + 1]");
  TORCH_CHECK(codes.scalar_type() == at::kChar && codes.is_contiguous(), op, ": codes must be contiguous int8");
  TORCH_CHECK(codes.numel() >= offsets.data_ptr<int64_t>()[mask.size(0)] + 64, op,
              ": codes must hold the stored codes then 64 bytes of padding");
  const int64_t wpr = mask.size(1) / 8;
  const int64_t groups = group_words > 0 ? (wpr + group_words - 1) / group_words : 1;
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == mask.size(0) * groups,
              op, ": scales must be contiguous float32 [out * ", groups, "]");
}

at::Tensor sparse_decode_q8(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& codes,
                            const at::Tensor& offsets, const at::Tensor& scales, int64_t group_words,
                            const std::optional<at::Tensor>& bias) {
  check_q8(mask, codes, offsets, scales, group_words, "owl::sparse_decode_q8");
  const int64_t out = mask.size(0), wpr = mask.size(1) / 8;
  const int xcode = check_x(x, wpr, "owl::sparse_decode_q8");
  const float* b = bias_ptr(bias, out, "owl::sparse_decode_q8");
  at::Tensor y = output_like(x, out);
  const int64_t in = x.size(-1), n = x.numel() / in;
  const int rc = owl_decode_q8(x.data_ptr(), xcode, n, in, mask.data_ptr<uint8_t>(), out, wpr,
                               codes.data_ptr<int8_t>(), offsets.data_ptr<int64_t>(), scales.data_ptr<float>(),
                               group_words, b, y.data_ptr());
  TORCH_CHECK(rc == 0, "owl kernel: owl_decode_q8 failed: ", error_text(rc), " (code ", rc, ")");
  return y;
}

at::Tensor sparse_expand_q8(const at::Tensor& mask, const at::Tensor& codes, const at::Tensor& offsets,
                            const at::Tensor& scales, int64_t group_words, int64_t r0, int64_t r1,
                            at::ScalarType dtype) {
  check_q8(mask, codes, offsets, scales, group_words, "owl::sparse_expand_q8");
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= mask.size(0), "owl::sparse_expand_q8: rows [", r0, ", ", r1,
              ") are not inside [0, ", mask.size(0), "]");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "owl::sparse_expand_q8: dtype must be float32 or bfloat16");
  const int64_t wpr = mask.size(1) / 8;
  at::Tensor tile = at::empty({r1 - r0, 64 * wpr}, scales.options().dtype(dtype));
  const int rc = owl_expand_q8(mask.data_ptr<uint8_t>(), r0, r1, wpr, codes.data_ptr<int8_t>(),
                               offsets.data_ptr<int64_t>(), scales.data_ptr<float>(), group_words, tile.data_ptr(),
                               dtype == at::kBFloat16 ? 1 : 0);
  TORCH_CHECK(rc == 0, "owl kernel: owl_expand_q8 failed: ", error_text(rc), " (code ", rc, ")");
  return tile;
}

}  // namespace

TORCH_LIBRARY(owl, m) {
  m.def("sparse_decode(Tensor x, Tensor mask, Tensor values, Tensor offsets, Tensor? bias) -> Tensor");
  m.def("sparse_expand(Tensor mask, Tensor values, Tensor offsets, int r0, int r1, ScalarType dtype) -> Tensor");
  m.def("sparse_decode_q8(Tensor x, Tensor mask, Tensor codes, Tensor offsets, Tensor scales, int group_words, "
        "Tensor? bias) -> Tensor");
  m.def("sparse_expand_q8(Tensor mask, Tensor codes, Tensor offsets, Tensor scales, int group_words, int r0, int r1, "
        "ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(owl, CPU, m) {
  m.impl("sparse_decode", &sparse_decode);
  m.impl("sparse_expand", &sparse_expand);
  m.impl("sparse_decode_q8", &sparse_decode_q8);
  m.impl("sparse_expand_q8", &sparse_expand_q8);
}
