// The inner loops of the native linear layer (matmul.cc): a weight row's codes turned into floats
// (dequantize), and a tile of R weight rows against T activation rows (dot products over the input
// dimension, accumulated in float32).
//
// Every output element is computed by the same sequence of operations whatever the tile it falls in
// (lane-wise fused multiply-adds over 16 inputs at a time in input order, a masked last step, then one
// fixed horizontal sum), so a token's output does not depend on how many tokens share the call: the
// kernel is batch-invariant bit for bit. With AVX-512 (and AVX512-BF16 for bfloat16 activations) the
// tiles use those instructions; elsewhere a portable version of the same loops runs.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define JAXINFER_AVX512 1
#endif

namespace jaxinfer {

inline float BF16ToF32(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t F32ToBF16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
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
#endif
  for (; i < count; ++i) out[i] = nibble(i);
}

#ifdef JAXINFER_AVX512
// 16 floats -> 16 bfloat16, rounded to nearest even.
inline __m256i RoundToBF16(__m512 f) {
#ifdef __AVX512BF16__
  __m256bh r = _mm512_cvtneps_pbh(f);
  return reinterpret_cast<__m256i&>(r);
#else
  const __m512i bits = _mm512_castps_si512(f);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
#endif
}
#endif

// One row of int8 codes -> code * scale[g] (+ offset[g]) for each group g of `group` inputs, written as
// float32 (Out = float) or rounded to bfloat16 (Out = uint16_t). offset may be null.
template <typename Out>
void DequantizeRow(const int8_t* codes, const float* scale, const float* offset, int64_t in, int64_t group,
                   Out* out) {
  for (int64_t g0 = 0, g = 0; g0 < in; g0 += group, ++g) {
    const int64_t g1 = std::min(in, g0 + group);
#ifdef JAXINFER_AVX512
    const __m512 s = _mm512_set1_ps(scale[g]), o = _mm512_set1_ps(offset ? offset[g] : 0.f);
    for (int64_t k = g0; k < g1; k += 16) {
      const __mmask16 m = g1 - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (g1 - k)) - 1);
      const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, codes + k)));
      const __m512 f = offset ? _mm512_fmadd_ps(v, s, o) : _mm512_mul_ps(v, s);
      if constexpr (sizeof(Out) == 4) {
        _mm512_mask_storeu_ps(out + k, m, f);
      } else {
        _mm256_mask_storeu_epi16(out + k, m, RoundToBF16(f));
      }
    }
#else
    for (int64_t k = g0; k < g1; ++k) {
      const float f = offset ? std::fma(static_cast<float>(codes[k]), scale[g], offset[g])
                             : static_cast<float>(codes[k]) * scale[g];
      if constexpr (sizeof(Out) == 4) {
        out[k] = f;
      } else {
        out[k] = F32ToBF16(f);
      }
    }
#endif
  }
}

#ifdef JAXINFER_AVX512

// acc += the products of 16 pairs of bfloat16 (a[2i] b[2i] + a[2i+1] b[2i+1] into lane i).
inline __m512 DotPairs(__m512 acc, __m512i a, __m512i b) {
#ifdef __AVX512BF16__
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh&>(a), reinterpret_cast<__m512bh&>(b));
#else
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(a, 16)), _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)),
                        acc);
  return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(a, hi)), _mm512_castsi512_ps(_mm512_and_si512(b, hi)),
                         acc);
#endif
}

// res[t * R + r] = sum_k w[r][k] x[t][k] for k < in. W and X are float (16 per step) or bfloat16
// (uint16_t, 32 per step, as pairs); the last step is masked, so rows need no padding.
template <int R, int T, typename E>
inline void DotTile(const E* const* w, const E* const* x, int64_t in, float* res) {
  constexpr int64_t kStep = 64 / sizeof(E);
  __m512 acc[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm512_setzero_ps();
  auto step = [&](int64_t k, auto load) {
    __m512i wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load(w[r] + k);
    for (int t = 0; t < T; ++t) {
      const __m512i xv = load(x[t] + k);
      for (int r = 0; r < R; ++r) {
        if constexpr (sizeof(E) == 4) {
          acc[t][r] = _mm512_fmadd_ps(_mm512_castsi512_ps(wv[r]), _mm512_castsi512_ps(xv), acc[t][r]);
        } else {
          acc[t][r] = DotPairs(acc[t][r], wv[r], xv);
        }
      }
    }
  };
  int64_t k = 0;
  for (; k + kStep <= in; k += kStep) step(k, [](const E* p) { return _mm512_loadu_si512(p); });
  if (k < in) {
    const int64_t left = in - k;
    if constexpr (sizeof(E) == 4) {
      const __mmask16 m = static_cast<__mmask16>((1u << left) - 1);
      step(k, [m](const E* p) { return _mm512_maskz_loadu_epi32(m, p); });
    } else {
      const __mmask32 m = static_cast<__mmask32>((1ull << left) - 1);
      step(k, [m](const E* p) { return _mm512_maskz_loadu_epi16(m, p); });
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) res[t * R + r] = _mm512_reduce_add_ps(acc[t][r]);
}

#else  // portable: the same contract, in plain loops

template <int R, int T, typename E>
inline void DotTile(const E* const* w, const E* const* x, int64_t in, float* res) {
  auto value = [](E e) {
    if constexpr (sizeof(E) == 4) {
      return e;
    } else {
      return BF16ToF32(e);
    }
  };
  for (int t = 0; t < T; ++t) {
    for (int r = 0; r < R; ++r) {
      float lanes[16] = {};
      for (int64_t k = 0; k < in; ++k) lanes[k % 16] += value(w[r][k]) * value(x[t][k]);
      float sum = 0.f;
      for (float l : lanes) sum += l;
      res[t * R + r] = sum;
    }
  }
}

#endif

}  // namespace jaxinfer
