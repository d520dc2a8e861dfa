// Test build only: the AVX-512 intrinsics that optimum_owl/inference/csrc/sparse_linear.cpp uses, written in plain
// C++ from their documented semantics (Intel Intrinsics Guide), so that the AVX-512 decode path can be compiled and
// checked bit for bit against the AVX2 path on a CPU without AVX-512. Force-included before the kernel source
// (`-include`, tests/test_inference.py); defines OWL_AVX512_EMULATED, which makes the kernel compile its AVX-512
// functions for AVX2 and report AVX-512 as available. Each emulated function works lane by lane on GCC's vector types.
#pragma once
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#define OWL_AVX512_EMULATED 1

// 64-byte vectors passed by value without AVX-512: GCC warns that the ABI differs from an AVX-512 build (irrelevant:
// everything here is inlined into one translation unit)
#pragma GCC diagnostic ignored "-Wpsabi"
// the same target as the kernel's AVX2 functions, into which these are inlined
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,popcnt")

namespace owl_emu {

template <typename To, typename From>
inline To bits(const From& v) {
  static_assert(sizeof(To) == sizeof(From), "same size");
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}

inline __m512 setzero_ps() {
  __m512 r;
  for (int i = 0; i < 16; ++i) r[i] = 0.0f;
  return r;
}
inline __m512 loadu_ps(const void* p) {
  __m512 r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
// lane i = a[i] * b[i] + c[i], rounded once
inline __m512 fmadd_ps(__m512 a, __m512 b, __m512 c) {
  __m512 r;
  for (int i = 0; i < 16; ++i) r[i] = std::fma(a[i], b[i], c[i]);
  return r;
}
// lanes whose bit of k is set take the next element of the source in order; the others are zero
inline __m512 maskz_expandloadu_ps(__mmask16 k, const void* p) {
  const float* f = static_cast<const float*>(p);
  __m512 r;
  for (int i = 0, j = 0; i < 16; ++i) r[i] = (k >> i) & 1 ? f[j++] : 0.0f;
  return r;
}
inline __m512 maskz_expand_ps(__mmask16 k, __m512 a) {
  __m512 r;
  for (int i = 0, j = 0; i < 16; ++i) r[i] = (k >> i) & 1 ? a[j++] : 0.0f;
  return r;
}
// 16 unsigned 16-bit integers zero-extended to 32 bits
inline __m512i cvtepu16_epi32(__m256i a) {
  uint16_t in[16];
  uint32_t out[16];
  std::memcpy(in, &a, sizeof(in));
  for (int i = 0; i < 16; ++i) out[i] = in[i];
  return bits<__m512i>(out);
}
inline __m512i slli_epi32(__m512i a, unsigned int n) {
  uint32_t v[16];
  std::memcpy(v, &a, sizeof(v));
  for (int i = 0; i < 16; ++i) v[i] = n > 31 ? 0 : v[i] << n;
  return bits<__m512i>(v);
}
inline __m512 castsi512_ps(__m512i a) { return bits<__m512>(a); }
inline __m512d castps_pd(__m512 a) { return bits<__m512d>(a); }
// 16 halves to float32 (exact) with the CPU's F16C conversion, 8 at a time
inline __m512 cvtph_ps(__m256i a) {
  const __m256 lo = _mm256_cvtph_ps(_mm256_castsi256_si128(a));
  const __m256 hi = _mm256_cvtph_ps(_mm256_extracti128_si256(a, 1));
  __m512 r;
  for (int i = 0; i < 8; ++i) {
    r[i] = lo[i];
    r[i + 8] = hi[i];
  }
  return r;
}
inline __m256 castps512_ps256(__m512 a) {
  __m256 r;
  for (int i = 0; i < 8; ++i) r[i] = a[i];
  return r;
}
inline __m256d extractf64x4_pd(__m512d a, int imm) {
  __m256d r;
  for (int i = 0; i < 4; ++i) r[i] = a[4 * (imm & 1) + i];
  return r;
}

// int8 values (csrc/sparse_linear_q8.h): VBMI2 byte expand, VBMI byte permute, int32 -> float32, set1, add
inline __m512i load_si512(const void* p) {
  __m512i r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
inline __m512i maskz_expandloadu_epi8(__mmask64 k, const void* p) {
  const int8_t* src = static_cast<const int8_t*>(p);
  int8_t out[64];
  for (int i = 0, j = 0; i < 64; ++i) out[i] = (k >> i) & 1 ? src[j++] : 0;
  return bits<__m512i>(out);
}
// lane i = a[idx[i] & 63] where bit i of k is set, else 0
inline __m512i maskz_permutexvar_epi8(__mmask64 k, __m512i idx, __m512i a) {
  uint8_t in[64], ix[64], out[64];
  std::memcpy(in, &a, 64);
  std::memcpy(ix, &idx, 64);
  for (int i = 0; i < 64; ++i) out[i] = (k >> i) & 1 ? in[ix[i] & 63] : 0;
  return bits<__m512i>(out);
}
// 16 int32 -> float32, rounded to nearest even (the default rounding mode, as vcvtdq2ps)
inline __m512 cvtepi32_ps(__m512i a) {
  int32_t in[16];
  std::memcpy(in, &a, sizeof(in));
  __m512 r;
  for (int i = 0; i < 16; ++i) r[i] = static_cast<float>(in[i]);
  return r;
}
inline __m512 set1_ps(float v) {
  __m512 r;
  for (int i = 0; i < 16; ++i) r[i] = v;
  return r;
}
inline __m512 add_ps(__m512 a, __m512 b) {
  __m512 r;
  for (int i = 0; i < 16; ++i) r[i] = a[i] + b[i];
  return r;
}

}  // namespace owl_emu

#pragma GCC pop_options

#define _mm512_setzero_ps owl_emu::setzero_ps
#define _mm512_loadu_ps owl_emu::loadu_ps
#define _mm512_fmadd_ps owl_emu::fmadd_ps
#define _mm512_maskz_expandloadu_ps owl_emu::maskz_expandloadu_ps
#define _mm512_maskz_expand_ps owl_emu::maskz_expand_ps
#define _mm512_cvtepu16_epi32 owl_emu::cvtepu16_epi32
#define _mm512_slli_epi32 owl_emu::slli_epi32
#define _mm512_castsi512_ps owl_emu::castsi512_ps
#define _mm512_castps_pd owl_emu::castps_pd
#define _mm512_cvtph_ps owl_emu::cvtph_ps
#define _mm512_castps512_ps256 owl_emu::castps512_ps256
#define _mm512_extractf64x4_pd owl_emu::extractf64x4_pd
#define _mm512_load_si512 owl_emu::load_si512
#define _mm512_maskz_expandloadu_epi8 owl_emu::maskz_expandloadu_epi8
#define _mm512_maskz_permutexvar_epi8 owl_emu::maskz_permutexvar_epi8
#define _mm512_cvtepi32_ps owl_emu::cvtepi32_ps
#define _mm512_set1_ps owl_emu::set1_ps
#define _mm512_add_ps owl_emu::add_ps
