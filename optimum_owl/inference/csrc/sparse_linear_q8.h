// int8 values: y = x @ W^T (+ bias) for W stored as the bitmask plus int8 codes with float32 scales (issue 27).
// Included by sparse_linear.cpp after its helpers (one translation unit: Args, widen_row, store, hsum, parallel_rows,
// cpu_ok, lo256 / hi256 and the isa switch are shared). Buffers (built by optimum_owl/inference/format.py):
//   mask    as for float values (uint8 [out, 8 * wpr], bit b of 64-bit word w of row r: W[r, 64 w + b] stored).
//   codes   int8 [nnz + INT8_VALUE_PADDING (64)]: the stored elements' codes in row-major order, then zeros. The AVX2
//           loops load 16 bytes at the first code of every mask byte, so they read up to 15 bytes past a row's last
//           code (the next row's codes, or the padding after the last row); the AVX-512 expand-load reads only the
//           codes its mask selects. 64 bytes leave room for a whole 64-byte vector load at the last code.
//   offsets int64 [out + 1]: index of row r's first code (prefix sum of the rows' popcounts).
//   scales  float32 [out * groups]: row r's scale for inputs of group g at scales[r * groups + g]; a group is
//           `gw` whole mask words (gw * 64 inputs; gw = wpr and groups = 1: one scale per row).
// A stored element's value is code * scale (optimum_owl.algorithms.quantize).
//
// Decode sums float(code) * x in float32 per group and applies the group's scale once: the group's partial sums
// (still vectors) are folded into the row's total by one FMA with the scale, then the total is reduced as the float
// paths reduce theirs. Codes are placed in the top byte of their float32 lane (code << 24) and converted, so the
// products are code * 2^24 * x; the scale is applied as scale * 2^-24 (exact: powers of two), so this equals
// code * x * scale up to float32 rounding, and it is the same sum on both paths below. Words whose mask is zero are not
// skipped (their lanes add 0 * x, as a dense matmul does: an infinite activation gives NaN).
//   AVX2: each mask byte expands the 8 codes at `v` with one vpshufb (256-entry table kQ8, broadcast 16 source
//         bytes; a clear bit's lane and bytes 0-2 of every lane get 0x80, i.e. zero), then vcvtdq2ps and one FMA per
//         token into accumulator [piece % A][half]: byte k of a word is piece k / 2, half k % 2.
//   AVX-512 (F, BW, VBMI, VBMI2): each 64-bit word expands its codes at once (vpexpandb under the word) and
//         4 vpermb place pieces of 16 codes in their dword lanes; a piece's 16 lanes are the two halves of the
//         AVX2 path's accumulator pair, so both paths give the same bits (for every token count: groups of 4 tokens
//         too). The expansion is issued two words ahead of its use: its latency otherwise stalled the loop (5.4 ->
//         2.8 ns per word on Zen 4, one core, rows in cache, in a standalone test).
// Prefill expands rows into a float32 tile (code * scale, exactly as dequantize_int8 computes it) or a bf16 tile
// (that value rounded to nearest even), for the GEMM done by torch.

#ifdef OWL_AVX512_EMULATED
#define OWL_Q8_512 OWL_AVX2
#else
#define OWL_Q8_512 __attribute__((target("avx512f,avx512bw,avx512vbmi,avx512vbmi2,avx2,fma,f16c,popcnt")))
#endif

namespace {

// q8[m][4 * lane + b]: vpshufb control, per 128-bit half (both halves see the same 16 code bytes): byte 3 of float32
// lane `lane` takes code k (k = set bits of m below lane) when bit `lane` of m is set; every other byte is 0x80.
// place[j][4 * i + 3] = 16 j + i: vpermb control putting code 16 j + i of a word in the top byte of dword lane i.
struct Q8Tables {
  alignas(32) uint8_t q8[256][32];
  alignas(64) uint8_t place[4][64];
  Q8Tables() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int lane = 0; lane < 8; ++lane) {
        const bool on = (m >> lane) & 1;
        for (int b = 0; b < 4; ++b) q8[m][4 * lane + b] = (on && b == 3) ? static_cast<uint8_t>(k) : 0x80;
        k += on;
      }
    }
    for (int j = 0; j < 4; ++j)
      for (int i = 0; i < 64; ++i) place[j][i] = i % 4 == 3 ? static_cast<uint8_t>(16 * j + i / 4) : 0;
  }
};
const Q8Tables kQ8;

bool q8_avx512_ok() {
#ifdef OWL_AVX512_EMULATED
  return cpu_ok();
#else
  static const bool ok = avx512_ok() && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vbmi2");
  return ok;
#endif
}

struct Q8Args {
  Args a;  // a.values: the int8 codes
  const float* scales;
  int64_t gw, groups;  // words per group, scales per row
};

// accumulator pairs per token: enough independent FMA chains for one or two tokens
template <int NT>
constexpr int q8_acc() { return NT == 1 ? 4 : (NT == 2 ? 2 : 1); }

// The 8 codes under mask byte `m` (from `p`, reads 16 bytes) as float32 code * 2^24, zero where the bit is clear.
OWL_AVX2 inline __m256i q8_expand8(const int8_t* p, unsigned m) {
  const __m256i src = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_shuffle_epi8(src, _mm256_load_si256(reinterpret_cast<const __m256i*>(kQ8.q8[m])));
}

// The mask rows two rows ahead (the codes are prefetched 1 KiB ahead in the word loops). Prefetching the mask in the
// word loop, and skipping zero words there, each cost about 5% in cache (Zen 4).
inline void q8_prefetch_mask(const uint64_t* m, int64_t wpr) {
  for (int64_t i = 0; i < wpr; i += 8) _mm_prefetch(reinterpret_cast<const char*>(m + i), _MM_HINT_T0);
}

template <int NT>
OWL_AVX2 inline void q8_row(const Q8Args& q, int64_t r, int64_t t0) {
  constexpr int A = q8_acc<NT>();
  const Args& a = q.a;
  const uint64_t* m = a.mask + r * a.wpr;
  const int8_t* v = static_cast<const int8_t*>(a.values) + a.offsets[r];
  const float* xt[NT];
  for (int t = 0; t < NT; ++t) xt[t] = a.x + (t0 + t) * a.ldx;
  q8_prefetch_mask(m + 2 * a.wpr, a.wpr);
  __m256 tot[NT][2];
  for (int t = 0; t < NT; ++t) tot[t][0] = tot[t][1] = _mm256_setzero_ps();
  for (int64_t g = 0, w = 0; w < a.wpr; ++g) {
    const int64_t end = std::min(a.wpr, w + q.gw);
    __m256 acc[NT][A][2];
    for (int t = 0; t < NT; ++t)
      for (int j = 0; j < A; ++j) acc[t][j][0] = acc[t][j][1] = _mm256_setzero_ps();
    for (; w < end; ++w) {
      _mm_prefetch(reinterpret_cast<const char*>(v) + 1024, _MM_HINT_T0);
      const uint64_t bits = m[w];
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k) {
        const unsigned byte = static_cast<unsigned>(bits >> (8 * k)) & 0xffu;
        const __m256 e = _mm256_cvtepi32_ps(q8_expand8(v, byte));
        v += _mm_popcnt_u32(byte);
        for (int t = 0; t < NT; ++t) {
          __m256& s = acc[t][(k / 2) % A][k % 2];
          s = _mm256_fmadd_ps(e, _mm256_loadu_ps(xt[t] + w * 64 + 8 * k), s);
        }
      }
    }
    const __m256 scale = _mm256_set1_ps(q.scales[r * q.groups + g] * 0x1p-24f);
    for (int t = 0; t < NT; ++t)
      for (int h = 0; h < 2; ++h) {
        __m256 sum = acc[t][0][h];
        for (int j = 1; j < A; ++j) sum = _mm256_add_ps(sum, acc[t][j][h]);
        tot[t][h] = _mm256_fmadd_ps(sum, scale, tot[t][h]);
      }
  }
  const float b = a.bias ? a.bias[r] : 0.0f;
  for (int t = 0; t < NT; ++t) store(a, (t0 + t) * a.out + r, hsum(_mm256_add_ps(tot[t][0], tot[t][1])) + b);
}

// q8_row with AVX-512, the same sums bit for bit (see the file comment). kLead words are expanded ahead of their use.
template <int NT>
OWL_Q8_512 inline void q8_row512(const Q8Args& q, int64_t r, int64_t t0) {
  constexpr int A = q8_acc<NT>();
  constexpr int kLead = 2;
  const Args& a = q.a;
  const uint64_t* m = a.mask + r * a.wpr;
  const int8_t* v = static_cast<const int8_t*>(a.values) + a.offsets[r];
  const float* xt[NT];
  for (int t = 0; t < NT; ++t) xt[t] = a.x + (t0 + t) * a.ldx;
  const __mmask64 top = 0x8888888888888888ull;  // byte 3 of every dword
  __m512i place[4];
  for (int j = 0; j < 4; ++j) place[j] = _mm512_load_si512(kQ8.place[j]);
  __m512i ahead[kLead];
  for (int i = 0; i < kLead; ++i) {
    const uint64_t bits = i < a.wpr ? m[i] : 0;
    ahead[i] = _mm512_maskz_expandloadu_epi8(bits, v);
    v += _mm_popcnt_u64(bits);
  }
  q8_prefetch_mask(m + 2 * a.wpr, a.wpr);
  __m512 tot[NT];
  for (int t = 0; t < NT; ++t) tot[t] = _mm512_setzero_ps();
  for (int64_t g = 0, w = 0; w < a.wpr; ++g) {
    const int64_t end = std::min(a.wpr, w + q.gw);
    __m512 acc[NT][A];
    for (int t = 0; t < NT; ++t)
      for (int j = 0; j < A; ++j) acc[t][j] = _mm512_setzero_ps();
    for (; w < end; ++w) {
      _mm_prefetch(reinterpret_cast<const char*>(v) + 1024, _MM_HINT_T0);
      const __m512i e = ahead[0];
      for (int i = 0; i + 1 < kLead; ++i) ahead[i] = ahead[i + 1];
      const uint64_t next = w + kLead < a.wpr ? m[w + kLead] : 0;
      ahead[kLead - 1] = _mm512_maskz_expandloadu_epi8(next, v);
      v += _mm_popcnt_u64(next);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const __m512 e16 = _mm512_cvtepi32_ps(_mm512_maskz_permutexvar_epi8(top, place[j], e));
        for (int t = 0; t < NT; ++t)
          acc[t][j % A] = _mm512_fmadd_ps(e16, _mm512_loadu_ps(xt[t] + w * 64 + 16 * j), acc[t][j % A]);
      }
    }
    const __m512 scale = _mm512_set1_ps(q.scales[r * q.groups + g] * 0x1p-24f);
    for (int t = 0; t < NT; ++t) {
      __m512 sum = acc[t][0];
      for (int j = 1; j < A; ++j) sum = _mm512_add_ps(sum, acc[t][j]);
      tot[t] = _mm512_fmadd_ps(sum, scale, tot[t]);
    }
  }
  const float b = a.bias ? a.bias[r] : 0.0f;
  for (int t = 0; t < NT; ++t) store(a, (t0 + t) * a.out + r, hsum(_mm256_add_ps(lo256(tot[t]), hi256(tot[t]))) + b);
}

// Rows [r0, r1), all tokens: groups of 4, then 3, 2 or 1 (each row's codes are read once per group of tokens).
#define OWL_Q8_ROWS(ROW)                                      \
  for (int64_t r = r0; r < r1; ++r) {                         \
    int64_t t = 0;                                            \
    for (; t + 4 <= q.a.n; t += 4) ROW<4>(q, r, t);           \
    switch (q.a.n - t) {                                      \
      case 3: ROW<3>(q, r, t); break;                         \
      case 2: ROW<2>(q, r, t); break;                         \
      case 1: ROW<1>(q, r, t); break;                         \
      default: break;                                         \
    }                                                         \
  }
OWL_AVX2 void q8_decode_rows(const Q8Args& q, int64_t r0, int64_t r1) { OWL_Q8_ROWS(q8_row) }
OWL_Q8_512 void q8_decode_rows512(const Q8Args& q, int64_t r0, int64_t r1) { OWL_Q8_ROWS(q8_row512) }
#undef OWL_Q8_ROWS

// 8 float32 -> bfloat16, round to nearest even (finite values: code * scale never is NaN), in the low 128 bits.
OWL_AVX2 inline __m128i q8_to_bf16(__m256 f) {
  const __m256i u = _mm256_castps_si256(f);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}

// Rows [r0, r1) dequantized into tile rows (row stride 64 * wpr): float32 code * scale, or that rounded to bf16.
template <typename Out>
OWL_AVX2 void q8_expand_rows(const Q8Args& q, int64_t r0, int64_t r1, int64_t tile_r0, Out* tile) {
  const Args& a = q.a;
  const int64_t ld = 64 * a.wpr;
  for (int64_t r = r0; r < r1; ++r) {
    const uint64_t* m = a.mask + r * a.wpr;
    const int8_t* v = static_cast<const int8_t*>(a.values) + a.offsets[r];
    Out* dst = tile + (r - tile_r0) * ld;
    for (int64_t w = 0; w < a.wpr; ++w) {
      const uint64_t bits = m[w];
      Out* d = dst + 64 * w;
      if (!bits) {
        std::memset(d, 0, 64 * sizeof(Out));
        continue;
      }
      const __m256 scale = _mm256_set1_ps(q.scales[r * q.groups + w / q.gw]);
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k) {
        const unsigned byte = static_cast<unsigned>(bits >> (8 * k)) & 0xffu;
        // the exact code (arithmetic shift back from the top byte), times the scale: one float32 rounding
        const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(q8_expand8(v, byte), 24)), scale);
        v += _mm_popcnt_u32(byte);
        if constexpr (sizeof(Out) == 4)
          _mm256_storeu_ps(reinterpret_cast<float*>(d + 8 * k), f);
        else
          _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 8 * k), q8_to_bf16(f));
      }
    }
  }
}

// The group layout from the caller's `group_words` (<= 0: one scale per row).
inline void q8_groups(int64_t wpr, int64_t group_words, int64_t* gw, int64_t* groups) {
  *gw = group_words > 0 ? group_words : std::max<int64_t>(1, wpr);
  *groups = group_words > 0 ? (wpr + group_words - 1) / group_words : 1;
}

}  // namespace

extern "C" {

int owl_q8_avx512_supported() { return q8_avx512_ok() ? 1 : 0; }

// y[n, out] = x[n, in] @ W^T (+ bias[out]) for int8 codes; x, y and the other arguments as in owl_decode, plus
// `scales` (float32 [out * groups]) and `group_words` (words per scale group, <= 0 for one scale per row).
int owl_decode_q8(const void* x, int xdtype, int64_t n, int64_t in, const uint8_t* mask, int64_t out, int64_t wpr,
                  const int8_t* codes, const int64_t* offsets, const float* scales, int64_t group_words,
                  const float* bias, void* y) {
  if (!cpu_ok()) return 2;
  if (xdtype < 0 || xdtype > 2 || in > 64 * wpr || in <= 64 * (wpr - 1)) return 3;
  const int64_t ld = 64 * wpr;
  try {
    std::vector<float> widened;
    const float* xf = static_cast<const float*>(x);
    if (xdtype != 0 || in != ld) {
      widened.resize(n * ld);
      for (int64_t t = 0; t < n; ++t) widen_row(x, xdtype, t, in, ld, widened.data() + t * ld);
      xf = widened.data();
    }
    Q8Args q{{reinterpret_cast<const uint64_t*>(mask), codes, offsets, xf, bias, y, wpr, n, ld, out, xdtype},
             scales, 0, 0};
    q8_groups(wpr, group_words, &q.gw, &q.groups);
    if (g_isa[3].load(std::memory_order_relaxed) == 1)
      parallel_rows(out, [&](int64_t r0, int64_t r1) { q8_decode_rows512(q, r0, r1); });
    else
      parallel_rows(out, [&](int64_t r0, int64_t r1) { q8_decode_rows(q, r0, r1); });
    return 0;
  } catch (...) {
    return 4;
  }
}

// Rows [r0, r1) of W dequantized into tile[(r - r0) * 64 * wpr + c]: float32 (tile_dtype 0) or bfloat16 (1).
int owl_expand_q8(const uint8_t* mask, int64_t r0, int64_t r1, int64_t wpr, const int8_t* codes,
                  const int64_t* offsets, const float* scales, int64_t group_words, void* tile, int tile_dtype) {
  if (!cpu_ok()) return 2;
  if (tile_dtype != 0 && tile_dtype != 1) return 1;
  Q8Args q{{reinterpret_cast<const uint64_t*>(mask), codes, offsets, nullptr, nullptr, nullptr, wpr, 0, 0, 0, 0},
           scales, 0, 0};
  q8_groups(wpr, group_words, &q.gw, &q.groups);
  try {
    at::parallel_for(r0, r1, 8, [&](int64_t b, int64_t e) {
      if (tile_dtype)
        q8_expand_rows<uint16_t>(q, b, e, r0, static_cast<uint16_t*>(tile));
      else
        q8_expand_rows<float>(q, b, e, r0, static_cast<float*>(tile));
    });
    return 0;
  } catch (...) {
    return 4;
  }
}

}  // extern "C"
