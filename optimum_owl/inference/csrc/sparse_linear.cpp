// Sparse linear layer y = x @ W^T (+ bias) for a weight stored as a per-row bitmask plus its packed non-zeros.
//
// Memory layout (built by optimum_owl/inference/format.py):
//   mask    uint8 [out, 8 * wpr], wpr = ceil(in / 64) little-endian 64-bit words per row. Bit b of word w of row r
//           (byte w*8 + b/8, bit b%8, least significant first) is set when W[r, 64*w + b] is stored. Bits at and
//           beyond `in` are zero.
//   values  float32 / bfloat16 / float16 [nnz + 16]: the stored elements of W in row-major order, then 16 zeros so
//           that an unaligned 8-element (AVX2) or 16-element (AVX-512, 16-bit values) load at or after any row's last
//           non-zero stays inside the buffer.
//   offsets int64 [out + 1]: offsets[r] is the index in `values` of row r's first non-zero (prefix sum of popcounts).
//   x       float32 [n, 64 * wpr] contiguous, zero-padded past `in`. `owl_decode` also takes the caller's
//           activations as they are (contiguous [n, in] float32 / bfloat16 / float16) and converts and pads them
//           into such a buffer itself when they are not already in that form (bfloat16 models: no torch ops per call).
// Results are [n, out] float32, or the activations' bfloat16 / float16 (rounded to nearest even, as torch's `.to()`
// rounds); accumulation is always in float32.
//
// Decode (few tokens): one pass over each row's mask. For every mask byte, the next 8 packed values are expanded to
// the byte's 8 lanes and multiplied into up to 4 tokens' accumulators (a weight byte is read once per group of 4
// tokens). Expansion, per value type (all table-driven, 256 entries indexed by the mask byte, kept in L1/L2):
//   float32: vpermps with a lane-index table, then vblendvps zeroes the lanes whose bit is clear (sign bit of the index);
//   bfloat16: the 16 bytes of 8 values are broadcast to both 128-bit halves and one vpshufb places each value's two
//             bytes in the high half of its float32 lane and zeroes everything else: expansion, zeroing and the
//             bf16 -> fp32 conversion in one shuffle;
//   float16: vpshufb expands the 8 halves inside 16 bytes (zero halves where the bit is clear), then vcvtph2ps.
// Each 64-bit mask word also prefetches the values ~2 KiB ahead: the stream is read once, hardware prefetch alone
// leaves the core waiting on memory (measured: +10-35% weight GB/s at 2 threads for float32 in a standalone test).
// Prefill (many tokens): `owl_expand` expands a tile of rows into a small dense float32 buffer (or, for bf16 values on
// CPUs with native bf16 dot products, a bf16 one) that the Python side multiplies with torch.mm (BLAS / oneDNN), so
// the cost stays that of a dense GEMM plus the expansion.
// Rows are split over torch's intra-op thread pool (at::parallel_for), so torch.set_num_threads applies. Decode
// hands out rows in chunks from a shared counter instead of one fixed half per thread: a worker that wakes up late
// (tens of microseconds when the pool went to sleep between calls) no longer leaves the other thread waiting at the
// barrier (on the 0.95B model's layers it measured equal to the fixed split within the machine's noise; kept
// because it cannot be slower by more than one chunk). Each row is still summed by one thread in a fixed
// order, so results do not depend on the thread count or on the schedule.
// Two decode paths: AVX2 + FMA + F16C (the tables above) and AVX-512F, which expands 16 values under each 16-bit
// piece of the mask word with vexpandps (float32 straight from memory; bf16 / fp16 after widening 16 values) instead
// of tables. The AVX-512 path sums in exactly the AVX2 path's order (see row_dot512), so the two give the same bits;
// the Python loader checks that on the CPU itself before it switches a dtype to AVX-512 (`owl_set_isa`). Prefill
// expansion is AVX2 only. The AVX-512 path was written on a machine without AVX-512 and verified there only in a build
// that emulates its intrinsics in plain C++ (tests/csrc/avx512_emulated.h), hence the check on first use.
// The functions carry target attributes, the Python loader calls them only after checking the CPU flags, and each
// entry point checks again. Plain C entry points (ctypes) keep the first build short: only ATen/Parallel.h.
// int8 values (codes + float32 scales) have their own decode / expand loops in sparse_linear_q8.h, included below.

#include <ATen/Parallel.h>  // at::parallel_for: torch's intra-op pool (only light headers: fast first build)

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#define OWL_AVX2 __attribute__((target("avx2,fma,f16c,popcnt")))
#ifdef OWL_AVX512_EMULATED  // test build: AVX-512 intrinsics emulated in C++ (tests/csrc/avx512_emulated.h)
#define OWL_AVX512 OWL_AVX2
#else
#define OWL_AVX512 __attribute__((target("avx512f,avx2,fma,f16c,popcnt")))
#endif

namespace {

// perm[m][lane]: index among the packed values of the value that lands in `lane` (the set bits of m below lane);
// lanes where bit `lane` of m is clear get the sign bit set (vpermps ignores it, vblendvps zeroes those lanes).
// bf16[m][4 * lane + b]: vpshufb control (per 128-bit half, both halves see the same 16 value bytes): bytes 2, 3 of
// float32 lane `lane` take bytes 2k, 2k+1 of the packed values (k = set bits of m below lane); all else 0x80 (zero).
// half[m][2 * lane + b]: the same for 16-bit lanes (float16 expanded in place before vcvtph2ps).
// 256 x (32 + 32 + 16) bytes = 20 KiB.
struct Tables {
  alignas(32) int32_t perm[256][8];
  alignas(32) uint8_t bf16[256][32];
  alignas(16) uint8_t half[256][16];
  Tables() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int lane = 0; lane < 8; ++lane) {
        const bool on = (m >> lane) & 1;
        perm[m][lane] = on ? k : (int32_t)0x80000000;
        for (int b = 0; b < 4; ++b) bf16[m][4 * lane + b] = (on && b >= 2) ? (uint8_t)(2 * k + b - 2) : 0x80;
        for (int b = 0; b < 2; ++b) half[m][2 * lane + b] = on ? (uint8_t)(2 * k + b) : 0x80;
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

bool avx512_ok() {
#ifdef OWL_AVX512_EMULATED
  return cpu_ok();
#else
  static const bool ok = cpu_ok() && __builtin_cpu_supports("avx512f");  // also false when the OS does not save zmm
  return ok;
#endif
}

// Decode path per values dtype (0 float32, 1 bfloat16, 2 float16, 3 int8 codes): 0 AVX2, 1 AVX-512. Set by
// `owl_set_isa`.
std::atomic<int> g_isa[4] = {0, 0, 0, 0};

struct bf16 { uint16_t bits; };
struct fp16 { uint16_t bits; };

// The 8 weights under mask byte `m` as float32, given the packed values that start at `p` (reads 8 values).
OWL_AVX2 inline __m256 expand(const float* p, unsigned m) {
  // vblendvps against a zero the compiler cannot see as constant: with a literal zero GCC emits compare + and-not.
  __m256 zero = _mm256_setzero_ps();
  asm("" : "+x"(zero));
  const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(kTables.perm[m]));
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(p), idx), zero, _mm256_castsi256_ps(idx));
}
OWL_AVX2 inline __m256 expand(const bf16* p, unsigned m) {
  const __m256i src = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i ctl = _mm256_load_si256(reinterpret_cast<const __m256i*>(kTables.bf16[m]));
  return _mm256_castsi256_ps(_mm256_shuffle_epi8(src, ctl));
}
OWL_AVX2 inline __m256 expand(const fp16* p, unsigned m) {
  const __m128i src = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i ctl = _mm_load_si128(reinterpret_cast<const __m128i*>(kTables.half[m]));
  return _mm256_cvtph_ps(_mm_shuffle_epi8(src, ctl));
}

OWL_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// How far ahead of the values being read the decode loop prefetches (bytes; about 8 rows of 64 float32 at 70%).
constexpr int kPrefetchBytes = 2048;

struct Args {
  const uint64_t* mask;
  const void* values;
  const int64_t* offsets;
  const float* x;
  const float* bias;
  void* y;
  int64_t wpr, n, ldx, out;
  int ydtype;  // 0 float32, 1 bfloat16, 2 float16
};

// float32 -> bfloat16, round to nearest even (what torch's conversion does); NaN -> the canonical quiet NaN.
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

OWL_AVX2 inline void store(const Args& a, int64_t i, float v) {
  switch (a.ydtype) {
    case 0: static_cast<float*>(a.y)[i] = v; break;
    case 1: static_cast<uint16_t*>(a.y)[i] = to_bf16(v); break;
    default: static_cast<uint16_t*>(a.y)[i] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT); break;
  }
}

// Row t of the caller's activations x [n, in] (dtype 0/1/2) as float32 into dst[0, ld), zeros past `in`.
OWL_AVX2 void widen_row(const void* x, int xdtype, int64_t t, int64_t in, int64_t ld, float* dst) {
  int64_t i = 0;
  if (xdtype == 0) {
    std::memcpy(dst, static_cast<const float*>(x) + t * in, in * sizeof(float));
    i = in;
  } else {
    const uint16_t* src = static_cast<const uint16_t*>(x) + t * in;
    for (; i + 8 <= in; i += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      const __m256 f = xdtype == 1 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                                   : _mm256_cvtph_ps(h);
      _mm256_storeu_ps(dst + i, f);
    }
    for (; i < in; ++i) {
      const uint32_t u = static_cast<uint32_t>(src[i]) << 16;
      float f;
      std::memcpy(&f, &u, 4);
      dst[i] = xdtype == 1 ? f : _cvtsh_ss(src[i]);
    }
  }
  std::memset(dst + in, 0, (ld - in) * sizeof(float));
}

// NT tokens starting at t0, one row. A accumulators per token hide the FMA latency when NT is small.
template <typename T, int NT>
OWL_AVX2 inline void row_dot(const Args& a, int64_t r, int64_t t0) {
  constexpr int A = NT >= 4 ? 1 : (NT == 1 ? 4 : 2);
  const uint64_t* m = a.mask + r * a.wpr;
  const T* v = static_cast<const T*>(a.values) + a.offsets[r];
  // one base pointer per token (one shared base + t * ldx made GCC keep 24 offsets for NT = 4 and reload them from
  // the stack inside the loop)
  const float* xt[NT];
  for (int t = 0; t < NT; ++t) xt[t] = a.x + (t0 + t) * a.ldx;
  __m256 acc[NT][A];
  for (int t = 0; t < NT; ++t)
    for (int j = 0; j < A; ++j) acc[t][j] = _mm256_setzero_ps();
  for (int64_t w = 0; w < a.wpr; ++w) {
    // two lines per word: 64 weights consume up to 256 bytes of float32 values (77 at 70%), and a skipped line stalls
    _mm_prefetch(reinterpret_cast<const char*>(v) + kPrefetchBytes, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(v) + kPrefetchBytes + 64, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(m + w) + kPrefetchBytes / 8, _MM_HINT_T0);
    if (!m[w]) continue;
    const uint8_t* mb = reinterpret_cast<const uint8_t*>(m + w);
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) {
      const unsigned byte = mb[k];
      const __m256 e = expand(v, byte);
      v += _mm_popcnt_u32(byte);
      for (int t = 0; t < NT; ++t)
        acc[t][k % A] = _mm256_fmadd_ps(e, _mm256_loadu_ps(xt[t] + w * 64 + 8 * k), acc[t][k % A]);
    }
  }
  const float b = a.bias ? a.bias[r] : 0.0f;
  for (int t = 0; t < NT; ++t) {
    __m256 s = acc[t][0];
    for (int j = 1; j < A; ++j) s = _mm256_add_ps(s, acc[t][j]);
    store(a, (t0 + t) * a.out + r, hsum(s) + b);
  }
}

// The 16 weights under the 16-bit mask piece `m` as float32 in column order (zero where the bit is clear), given the
// packed values at `p`. float32 reads only popcount(m) values; bf16 / fp16 read 16 (inside the buffer's padding).
OWL_AVX512 inline __m512 expand16(const float* p, __mmask16 m) { return _mm512_maskz_expandloadu_ps(m, p); }
OWL_AVX512 inline __m512 expand16(const bf16* p, __mmask16 m) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_maskz_expand_ps(m, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
}
OWL_AVX512 inline __m512 expand16(const fp16* p, __mmask16 m) {
  return _mm512_maskz_expand_ps(m, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
}
OWL_AVX512 inline __m256 lo256(__m512 v) { return _mm512_castps512_ps256(v); }
OWL_AVX512 inline __m256 hi256(__m512 v) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)); }

// row_dot with AVX-512, the same sums bit for bit. row_dot sends mask byte k of a word to accumulator k % A; a 16-bit
// piece j holds bytes 2j (low 8 lanes) and 2j + 1 (high 8 lanes). So for NT = 1 (A = 4) one zmm accumulator stands
// for row_dot's accumulators 0 | 1 (even j) and another for 2 | 3 (odd j); for NT = 2, 3 (A = 2) one zmm is 0 | 1.
// The halves are then added in row_dot's order (0 + 1 + 2 + 3) and summed by the same hsum. Groups of 4 tokens stay
// on row_dot (A = 1 would need each 16-lane product split into two ymm FMAs: 11-22% slower than AVX2 on Zen 4).
template <typename T, int NT>
OWL_AVX512 inline void row_dot512(const Args& a, int64_t r, int64_t t0) {
  static_assert(NT >= 1 && NT <= 3, "groups of 4 tokens use row_dot");
  constexpr int Z = NT == 1 ? 2 : 1;
  const uint64_t* m = a.mask + r * a.wpr;
  const T* v = static_cast<const T*>(a.values) + a.offsets[r];
  const float* xt[NT];
  for (int t = 0; t < NT; ++t) xt[t] = a.x + (t0 + t) * a.ldx;
  __m512 acc[NT][Z];
  for (int t = 0; t < NT; ++t)
    for (int j = 0; j < Z; ++j) acc[t][j] = _mm512_setzero_ps();
  for (int64_t w = 0; w < a.wpr; ++w) {
    _mm_prefetch(reinterpret_cast<const char*>(v) + kPrefetchBytes, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(v) + kPrefetchBytes + 64, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(m + w) + kPrefetchBytes / 8, _MM_HINT_T0);
    const uint64_t bits = m[w];
    if (!bits) continue;
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const unsigned piece = static_cast<unsigned>(bits >> (16 * j)) & 0xffffu;
      const __m512 e = expand16(v, static_cast<__mmask16>(piece));
      v += _mm_popcnt_u32(piece);
      const int64_t col = w * 64 + 16 * j;
      for (int t = 0; t < NT; ++t) acc[t][j % Z] = _mm512_fmadd_ps(e, _mm512_loadu_ps(xt[t] + col), acc[t][j % Z]);
    }
  }
  const float b = a.bias ? a.bias[r] : 0.0f;
  for (int t = 0; t < NT; ++t) {
    __m256 s = _mm256_add_ps(lo256(acc[t][0]), hi256(acc[t][0]));
    if constexpr (Z == 2) s = _mm256_add_ps(_mm256_add_ps(s, lo256(acc[t][1])), hi256(acc[t][1]));
    store(a, (t0 + t) * a.out + r, hsum(s) + b);
  }
}

template <typename T>
OWL_AVX512 void decode_rows512(const Args& a, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    int64_t t = 0;
    for (; t + 4 <= a.n; t += 4) row_dot<T, 4>(a, r, t);
    switch (a.n - t) {
      case 3: row_dot512<T, 3>(a, r, t); break;
      case 2: row_dot512<T, 2>(a, r, t); break;
      case 1: row_dot512<T, 1>(a, r, t); break;
      default: break;
    }
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

// The 8 16-bit values under mask byte `m` in their own format (zero where the bit is clear), from the packed values
// at `p` (reads 8): the float16 expansion without the conversion (bf16 prefill tiles for a native bf16 GEMM).
OWL_AVX2 inline __m128i expand_bits16(const uint16_t* p, unsigned m) {
  const __m128i src = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm_shuffle_epi8(src, _mm_load_si128(reinterpret_cast<const __m128i*>(kTables.half[m])));
}

// Expand rows [r0, r1) into a dense tile with row stride 64 * wpr: float32 (Out = float), or for 16-bit values the
// values' own bits (Out = uint16_t).
template <typename T, typename Out>
OWL_AVX2 void expand_rows(const Args& a, int64_t r0, int64_t r1, int64_t tile_r0, Out* tile) {
  const int64_t ld = 64 * a.wpr;
  for (int64_t r = r0; r < r1; ++r) {
    const uint64_t* m = a.mask + r * a.wpr;
    const T* v = static_cast<const T*>(a.values) + a.offsets[r];
    Out* dst = tile + (r - tile_r0) * ld;
    for (int64_t w = 0; w < a.wpr; ++w) {
      const uint64_t bits = m[w];
      Out* d = dst + 64 * w;
      if (!bits) {
        std::memset(d, 0, 64 * sizeof(Out));
        continue;
      }
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k) {
        const unsigned byte = static_cast<unsigned>(bits >> (8 * k)) & 0xffu;
        if constexpr (sizeof(Out) == 4)
          _mm256_storeu_ps(d + 8 * k, expand(v, byte));
        else
          _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 8 * k),
                           expand_bits16(reinterpret_cast<const uint16_t*>(v), byte));
        v += _mm_popcnt_u32(byte);
      }
    }
  }
}

// f(r0, r1) over [0, rows): every thread of the pool takes chunks from a shared counter. About 4 chunks per thread
// (multiples of 16 rows): long enough runs for the hardware prefetcher, short enough to absorb a late worker.
template <typename F>
void parallel_rows(int64_t rows, const F& f) {
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t chunk = std::max<int64_t>(16, (rows + 4 * threads * 16 - 1) / (4 * threads * 16) * 16);
  const int64_t tasks = std::min(threads, (rows + chunk - 1) / chunk);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    for (int64_t r0 = next.fetch_add(chunk); r0 < rows; r0 = next.fetch_add(chunk)) f(r0, std::min(rows, r0 + chunk));
  });
}

template <typename F>
int by_dtype(int code, F&& f) {
  switch (code) {
    case 0: f(float{}); return 0;
    case 1: f(bf16{}); return 0;
    case 2: f(fp16{}); return 0;
    default: return 1;
  }
}

}  // namespace

// int8 values (codes + float32 scales): owl_decode_q8, owl_expand_q8 and their AVX2 / AVX-512 loops.
#include "sparse_linear_q8.h"

// C entry points, called through ctypes (optimum_owl/inference/kernel.py). The caller guarantees the layout above
// (SparseLinear builds and owns these buffers). dtype: 0 float32, 1 bfloat16, 2 float16. Return 0 on success, else
// 1 unknown dtype, 2 CPU without AVX2/FMA/F16C/POPCNT, 3 activations of the wrong dtype or width, 4 allocation or
// thread-pool failure, 5 AVX-512 asked for where there is none (kernel.py turns the code into a message).
extern "C" {

int owl_cpu_supported() { return cpu_ok() ? 1 : 0; }

int owl_avx512_supported() { return avx512_ok() ? 1 : 0; }

// Decode path for values of `dtype` (3: int8 codes, whose AVX-512 path also needs BW, VBMI and VBMI2): isa 0 AVX2 (the
// default), 1 AVX-512. Returns 0, 1 for an unknown dtype, or 5 for an unknown isa or AVX-512 on a CPU without it.
int owl_set_isa(int dtype, int isa) {
  if (dtype < 0 || dtype > 3) return 1;
  if (isa < 0 || isa > 1 || (isa == 1 && !(dtype == 3 ? q8_avx512_ok() : avx512_ok()))) return 5;
  g_isa[dtype].store(isa);
  return 0;
}

int owl_get_isa(int dtype) { return dtype >= 0 && dtype <= 3 ? g_isa[dtype].load() : -1; }

// y[n, out] = x[n, in] @ W^T (+ bias[out]); x and y contiguous, of dtype xdtype (0 float32, 1 bfloat16, 2 float16).
// float32 x with in == 64 * wpr is read in place; anything else is widened and padded into a float32 buffer first.
int owl_decode(const void* x, int xdtype, int64_t n, int64_t in, const uint8_t* mask, int64_t out, int64_t wpr,
               const void* values, int dtype, const int64_t* offsets, const float* bias, void* y) {
  if (!cpu_ok()) return 2;
  if (xdtype < 0 || xdtype > 2 || in > 64 * wpr || in <= 64 * (wpr - 1)) return 3;
  const int64_t ld = 64 * wpr;
  try {  // no C++ exception may cross into the caller (the buffer's allocation, the thread pool)
    std::vector<float> widened;
    const float* xf = static_cast<const float*>(x);
    if (xdtype != 0 || in != ld) {
      widened.resize(n * ld);
      for (int64_t t = 0; t < n; ++t) widen_row(x, xdtype, t, in, ld, widened.data() + t * ld);
      xf = widened.data();
    }
    Args a{reinterpret_cast<const uint64_t*>(mask), values, offsets, xf, bias, y, wpr, n, ld, out, xdtype};
    const bool wide = dtype >= 0 && dtype <= 2 && g_isa[dtype].load(std::memory_order_relaxed) == 1;
    return by_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      if (wide)
        parallel_rows(out, [&](int64_t r0, int64_t r1) { decode_rows512<T>(a, r0, r1); });
      else
        parallel_rows(out, [&](int64_t r0, int64_t r1) { decode_rows<T>(a, r0, r1); });
    });
  } catch (...) {
    return 4;
  }
}

// Rows [r0, r1) of W as dense values into tile[(r - r0) * 64 * wpr + c] (for the prefill GEMM done by torch): float32
// (tile_dtype 0), or, for 16-bit values, the values' own dtype (tile_dtype == dtype: bits copied as they are).
int owl_expand(const uint8_t* mask, int64_t r0, int64_t r1, int64_t wpr, const void* values, int dtype,
               const int64_t* offsets, void* tile, int tile_dtype) {
  if (!cpu_ok()) return 2;
  if (tile_dtype != 0 && (tile_dtype != dtype || dtype == 0)) return 1;
  Args a{reinterpret_cast<const uint64_t*>(mask), values, offsets, nullptr, nullptr, nullptr, wpr, 0, 0, 0, 0};
  try {
    return by_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      at::parallel_for(r0, r1, 8, [&](int64_t b, int64_t e) {
        if constexpr (sizeof(T) == 2) {
          if (tile_dtype) return expand_rows<T, uint16_t>(a, b, e, r0, static_cast<uint16_t*>(tile));
        }
        expand_rows<T, float>(a, b, e, r0, static_cast<float*>(tile));
      });
    });
  } catch (...) {
    return 4;
  }
}

}  // extern "C"
