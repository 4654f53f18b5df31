// The inner loops of the native linear layer (matmul.cc): a weight row's codes turned into floats
// (dequantize), and a tile of R weight rows against T activation rows (dot products over the input
// dimension, in float32: on Sapphire Rapids without AMX, vdpbf16ps issues at half the rate of
// vfmadd231ps, so bfloat16 dot products would be slower than float32 FMAs on exact conversions).
//
// Every output element is computed by the same sequence of operations whatever the tile it falls in
// (lane-wise fused multiply-adds over 16 inputs at a time in input order, a masked last step, then one
// fixed horizontal sum), so a token's output does not depend on how many tokens share the call: the
// kernel is batch-invariant bit for bit. With AVX-512 the tiles use it; elsewhere a portable version of the
// same loops runs.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define JAXINFER_AVX512 1
#endif
#if defined(JAXINFER_AVX512) || defined(__FMA__)
#include <immintrin.h>
#endif

namespace jaxinfer {

inline float BF16ToF32(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Nibbles [first, first + count) of a packed 4-bit array (two per byte, the low nibble first, as
// XLA:CPU stores int4/uint4) as int8 codes: -8..7 when is_signed, else 0..15.
inline void UnpackNibbles(const uint8_t* packed, int64_t first, int64_t count, bool is_signed, int8_t* out) {
  auto nibble = [&](int64_t i) {
    const int64_t a = first + i;
    const int v = (packed[a >> 1] >> ((a & 1) * 4)) & 0xF;
    return static_cast<int8_t>(is_signed ? (v ^ 8) - 8 : v);
  };
  int64_t i = 0;
  if (first & 1) out[i] = nibble(i), ++i;
#ifdef JAXINFER_AVX512
  const uint8_t* p = packed + ((first + i) >> 1);
  const __m256i low = _mm256_set1_epi16(0x0F), high = _mm256_set1_epi16(0xF0), eight = _mm256_set1_epi8(8);
  for (; i + 32 <= count; i += 32, p += 16) {  // 16 bytes -> 32 codes, in order
    const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    __m256i n = _mm256_or_si256(_mm256_and_si256(b, low), _mm256_slli_epi16(_mm256_and_si256(b, high), 4));
    if (is_signed) n = _mm256_sub_epi8(_mm256_xor_si256(n, eight), eight);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), n);
  }
#else
  const uint8_t* p = packed + ((first + i) >> 1);  // whole bytes, in a loop the compiler vectorizes
  for (; i + 2 <= count; i += 2, ++p) {
    const int lo = *p & 0xF, hi = *p >> 4;
    out[i] = static_cast<int8_t>(is_signed ? (lo ^ 8) - 8 : lo);
    out[i + 1] = static_cast<int8_t>(is_signed ? (hi ^ 8) - 8 : hi);
  }
#endif
  for (; i < count; ++i) out[i] = nibble(i);
}

// One row of int8 codes -> code * scale[g] (+ offset[g], one rounding) for each group g of `group`
// inputs, as float32. offset may be null.
inline void DequantizeRow(const int8_t* codes, const float* scale, const float* offset, int64_t in, int64_t group,
                          float* out) {
  for (int64_t g0 = 0, g = 0; g0 < in; g0 += group, ++g) {
    const int64_t g1 = std::min(in, g0 + group);
#ifdef JAXINFER_AVX512
    const __m512 s = _mm512_set1_ps(scale[g]), o = _mm512_set1_ps(offset ? offset[g] : 0.f);
    for (int64_t k = g0; k < g1; k += 16) {
      const __mmask16 m = g1 - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (g1 - k)) - 1);
      const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, codes + k)));
      const __m512 f = offset ? _mm512_fmadd_ps(v, s, o) : _mm512_mul_ps(v, s);
      _mm512_mask_storeu_ps(out + k, m, f);
    }
#else
    for (int64_t k = g0; k < g1; ++k) {
      out[k] = offset ? std::fma(static_cast<float>(codes[k]), scale[g], offset[g])
                      : static_cast<float>(codes[k]) * scale[g];
    }
#endif
  }
}

// Software prefetch of the weight rows a reader's next tile will read (set by the caller; none by default).
// A tile reads 8 short rows side by side (576 int8 codes: 9 cache lines each), too short for the hardware
// prefetchers to follow, and a one-token call stalls on every new line (measured on the AVX2 EPYC:
// samples pile up behind the code loads). The tile's rows are one contiguous block and so are the next
// tile's, so each 16-input step asks for its share of the next block: `step_bytes` from `next`.
struct Prefetcher {
  const char* next = nullptr;
  int64_t step_bytes = 0;
  // Inlined always: a call GCC left out of line it judged free of side effects and deleted.
  __attribute__((always_inline)) void Prefetch(int64_t k) const {
    if (next == nullptr) return;
    const char* p = next + k / 16 * step_bytes;
    for (int64_t b = 0; b < step_bytes; b += 64) __builtin_prefetch(p + b);
  }
};

#ifdef JAXINFER_AVX512

// out[i] = the sum of v[i]'s 16 lanes, for 8 vectors at once (a transpose-and-add tree: 23 instructions
// instead of 8 horizontal sums of ~9). Every vector's lanes are added in the same tree whatever its
// slot, (l0+l8 + l4+l12) + (l2+l10 + l6+l14) + ..., so a result never depends on its neighbours.
inline void Reduce8(const __m512* v, float* out) {
  __m512 s[4], u[2];
  for (int i = 0; i < 4; ++i) {  // 128-bit blocks: [a0+a2, a1+a3, b0+b2, b1+b3]
    s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  }
  for (int i = 0; i < 2; ++i) {  // blocks: one vector each, [a | b | c | d]
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0xDD));
  }
  const __m512 h = _mm512_add_ps(_mm512_unpacklo_ps(u[0], u[1]), _mm512_unpackhi_ps(u[0], u[1]));
  const __m512 t = _mm512_add_ps(h, _mm512_permute_ps(h, 0x4E));  // lane 4i: v[i]; lane 4i + 1: v[4 + i]
  const __m512i order = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 13, 9, 5, 1, 12, 8, 4, 0);
  _mm256_storeu_ps(out, _mm512_castps512_ps256(_mm512_permutexvar_ps(order, t)));
}

// R weight rows already in float32 (a row of the weights, or one dequantized into a scratch row).
template <int R>
struct FloatRows {
  const float* w[R];
  int64_t Begin(int64_t) { return INT64_MAX; }
  __m512 Load(int r, int64_t k, __mmask16 m) const { return _mm512_maskz_loadu_ps(m, w[r] + k); }
};

// acc[t][r] += w(r, k) x[t][k] over the 16-input steps from k while they end by `end` (masked by m, for
// the last one): returns where it stopped. The accumulators live in a local copy for the loop, which the
// compiler keeps in registers (a reference into the caller's array it would store back every step).
template <int R, int T, typename Rows>
__attribute__((always_inline)) inline int64_t Steps(const Rows& w, const float* const* x, int64_t k, int64_t end,
                                                    __mmask16 m, __m512 (&acc)[T][R]) {
  __m512 a[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) a[t][r] = acc[t][r];
  for (; k < end; k += 16) {
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = w.Load(r, k, m);
    for (int t = 0; t < T; ++t) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x[t] + k);
      for (int r = 0; r < R; ++r) a[t][r] = _mm512_fmadd_ps(wv[r], xv, a[t][r]);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = a[t][r];
  return k;
}

// res[t * R + r] = sum_k w(r, k) x[t][k] for k < in, 16 inputs per step (Rows::Begin(k) prepares the
// steps from k up to the input it returns, Rows::Load gives 16 weights as float32, zero where the mask
// is off); the last step is masked, so rows need no padding.
template <int R, int T, typename Rows>
inline void DotTile(Rows w, const float* const* x, int64_t in, float* res) {
  __m512 acc[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm512_setzero_ps();
  const int64_t full = in / 16 * 16;
  for (int64_t k = 0; k < full;) k = Steps(w, x, k, std::min(full, w.Begin(k)), 0xFFFF, acc);
  if (full < in) {  // the masked last step
    w.Begin(full);
    Steps(w, x, full, in, static_cast<__mmask16>((1u << (in - full)) - 1), acc);
  }
  static_assert((T * R) % 4 == 0, "tiles hold a multiple of 4 accumulators");
  const __m512* flat = &acc[0][0];  // row-major [T][R]: res's order
  for (int i = 0; i + 8 <= T * R; i += 8) Reduce8(flat + i, res + i);
  if constexpr ((T * R) % 8 == 4) {
    __m512 last[8] = {flat[T * R - 4], flat[T * R - 3], flat[T * R - 2], flat[T * R - 1]};
    for (int i = 4; i < 8; ++i) last[i] = _mm512_setzero_ps();
    float sums[8];
    Reduce8(last, sums);
    std::memcpy(res + T * R - 4, sums, 4 * sizeof(float));
  }
}

#else  // portable: the same contract with GCC/Clang vector types (one AVX2 register, two NEON ones, ...)

// Eight float32 lanes, one accumulator: lane l sums the products at inputs k = l (mod 8) in input order; a
// multiply-add is one fused instruction where the target has one (-ffp-contract=fast,
// jaxinfer/native/__init__.py), the same for every tile. So within one build every output element takes
// the same operations whatever its tile: the kernel stays batch-invariant bit for bit (not bit-identical
// to an AVX-512 build). Until 2026-11-30 an accumulator was two vectors (the AVX-512 tiles' 16 lanes):
// a one-token tile's 16 then did not fit AVX2's 16 registers with the token, and spilled (measured: the
// one-token int8 call 30% slower). Vectors of 16 lanes were split badly by GCC for AVX2 (through memory).
typedef float Lanes __attribute__((vector_size(32)));
typedef float UnalignedLanes __attribute__((vector_size(32), aligned(4), may_alias));

inline Lanes LoadLanes(const float* p) { return *reinterpret_cast<const UnalignedLanes*>(p); }

// a * b + c lane-wise, rounded once where the target has fused multiply-adds. Written out, not left to
// -ffp-contract: GCC contracted `acc += w * x` in some inlined copies of the tiles and not in others, and
// a one-token row then differed from the same row in a larger call in the last bit.
inline Lanes MulAdd(Lanes a, Lanes b, Lanes c) {
#if defined(__FMA__)
  return reinterpret_cast<Lanes>(_mm256_fmadd_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b),
                                                 reinterpret_cast<__m256>(c)));
#elif defined(__aarch64__) || defined(__FP_FAST_FMAF)
  Lanes r;
  for (int i = 0; i < 8; ++i) r[i] = std::fma(a[i], b[i], c[i]);
  return r;
#else  // no fused instruction to contract into: one multiply, one add, everywhere
  return a * b + c;
#endif
}

// Keeps v in a register from here on. Without it GCC re-read each token's inputs (or each weight row) from
// memory inside every multiply-add, 16 loads per 12 multiply-adds in the 3 x 4 tile, and the tile ran at
// about half of the FMA units' rate (measured on the AVX2 EPYC, in cache: 22-26 against 36-48 GMAC/s).
inline void InRegister(Lanes& v) {
#if defined(__x86_64__) && defined(__AVX__)
  asm("" : "+x"(v));
#else
  (void)v;
#endif
}

// The first n (< 8) floats at p, the other lanes zero.
inline Lanes LoadPartial(const float* p, int64_t n) {
  float tmp[8] = {};
  std::memcpy(tmp, p, n * sizeof(float));
  return LoadLanes(tmp);
}

// The sum of an accumulator's 8 lanes in a fixed order (halves folded three times).
inline float SumLanes(Lanes v) {
  float l[8];
  std::memcpy(l, &v, sizeof l);
  for (int width = 4; width >= 1; width /= 2) {
    for (int i = 0; i < width; ++i) l[i] += l[i + width];
  }
  return l[0];
}

// R weight rows already in float32. A portable reader gives 8 weights at k as float32 (Load; all within the
// row) and one at k (At), equal to what Load gives for it; Begin(k) prepares the Loads from k up to the
// input it returns (a quantized reader: its group's scales).
template <int R>
struct FloatRows : Prefetcher {
  const float* w[R];
  Lanes Load(int r, int64_t k) const { return LoadLanes(w[r] + k); }
  float At(int r, int64_t k) const { return w[r][k]; }
  int64_t Begin(int64_t) { return INT64_MAX; }
};

// acc[t][r] += w(r, k) x[t][k] over the 8-input steps from k to `end`. As in the AVX-512 tiles, the
// accumulators live in a local copy for the loop: with them in the caller's array, which the tail step
// indexes by a loop variable, GCC kept them in memory and loaded and stored each one every step
// (measured on the AVX2 EPYC, 2026-11-30: one-token int8 calls at 8-15 GB/s, half the memory's speed).
template <int R, int T, typename Rows>
__attribute__((always_inline)) inline void Steps(const Rows& w, const float* const* x, int64_t k, int64_t end,
                                                 Lanes (&acc)[T][R]) {
  Lanes a[T][R];
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) a[t][r] = acc[t][r];
  for (; k < end; k += 8) {  // loops unrolled: accumulators in registers
    if ((k & 15) == 0) w.Prefetch(k);
    Lanes xv[T];
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      xv[t] = LoadLanes(x[t] + k);
      InRegister(xv[t]);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      Lanes wv = w.Load(r, k);
      InRegister(wv);
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) a[t][r] = MulAdd(wv, xv[t], a[t][r]);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[t][r] = a[t][r];
}

template <int R, int T, typename Rows>
inline void DotTile(Rows w, const float* const* x, int64_t in, float* res) {
  Lanes acc[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = Lanes{};
  const int64_t full = in / 8 * 8;
  for (int64_t k = 0; k < full;) {  // w.Begin(k) prepares the steps up to the input it returns
    const int64_t end = std::min(full, w.Begin(k));
    Steps(w, x, k, end, acc);
    k = end;
  }
  if (full < in) {  // the last step: zero lanes past the row end
    for (int r = 0; r < R; ++r) {
      float row[8] = {};
      for (int64_t k = full; k < in; ++k) row[k - full] = w.At(r, k);
      const Lanes wv = LoadPartial(row, in - full);
      for (int t = 0; t < T; ++t) acc[t][r] = MulAdd(wv, LoadPartial(x[t] + full, in - full), acc[t][r]);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) res[t * R + r] = SumLanes(acc[t][r]);
}

#endif

}  // namespace jaxinfer
