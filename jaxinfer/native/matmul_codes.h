// Weight rows read straight from their storage inside the dot tile (matmul_tiles.h's Rows), for calls
// with up to four tokens: there a round trip through a float32 scratch row costs as much as the dot.
// Each Load gives exactly the float32 values DequantizeRow would write (the same fma(code, scale,
// offset) or code * scale), so the result does not depend on which path a call takes.
//
// Integer rows need every 16-input step inside one group: `shift` is log2(group) for a power-of-two
// group of at least 16, or 62 for one group per row. 4-bit rows must start on a byte (even I).
#pragma once

#include "matmul_tiles.h"

namespace jaxinfer {
// Rows [0, valid) of a reader written out as float32 rows of `in` into out (row j at out + j * in).
// Declared for every build, defined with each build's readers.
template <typename Rows>
void DecodeRows(Rows w, int64_t in, int64_t valid, float* out);

// Per row: its codes and its groups' scales and offsets (offset null when absent, for every row). The
// portable readers' Load takes 8 inputs, in one group too.
template <int R, typename Code>
struct QuantRows : Prefetcher {
  const Code* w[R];
  const float* scale[R];
  const float* offset[R];
  int shift;

  int64_t Begin(int64_t) { return INT64_MAX; }

#ifdef JAXINFER_AVX512
  __m512 Dequantize(int r, int64_t k, __m512 codes) const {
    const int64_t g = k >> shift;
    const __m512 s = _mm512_set1_ps(scale[r][g]);
    return offset[r] ? _mm512_fmadd_ps(codes, s, _mm512_set1_ps(offset[r][g])) : _mm512_mul_ps(codes, s);
  }
#endif
};
}  // namespace jaxinfer

#ifdef JAXINFER_AVX512

namespace jaxinfer {

template <int R>
struct BF16Rows : Prefetcher {
  const uint16_t* w[R];
  int64_t Begin(int64_t) { return INT64_MAX; }
  __m512 Load(int r, int64_t k, __mmask16 m) const {  // exact: a bfloat16 is the top half of a float32
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, w[r] + k));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  }
};

// kScaled false: the codes alone, as float32 (one scale per row, applied to the dot products after: the
// caller's post_scale, matmul.cc).
template <int R, bool kScaled = true>
struct Int8Rows : QuantRows<R, int8_t> {
  __m512 Load(int r, int64_t k, __mmask16 m) const {
    const __m512 c = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, this->w[r] + k)));
    if constexpr (!kScaled) return c;  // masked lanes load as 0
    const __m512 f = this->Dequantize(r, k, c);
    return m == 0xFFFF ? f : _mm512_maskz_mov_ps(m, f);  // offset-only lanes past the row end -> 0
  }
};

#ifdef __AVX512VBMI__  // vpmultishiftqb (Ice Lake and later); without it 4-bit rows take the scratch path

// 4-bit codes: each nibble indexes a 16-float table of its group's dequantized values, built from the
// codes 0..15 or, signed, 0..7, -8..-1 (two's-complement nibble order) once per row and group. The 8
// bytes of a step are broadcast to every 64-bit lane and vpmultishiftqb moves nibble i to the low bits
// of 32-bit lane i (vpermps reads only an index's low 4 bits): two shuffles per 16 weights.
template <int R, bool kSigned>
struct Int4Rows : QuantRows<R, uint8_t> {
  __m512 table[R];

  int64_t Begin(int64_t k) {  // the tables of k's group, good until the group ends
    const __m512 codes = kSigned ? _mm512_set_ps(-1, -2, -3, -4, -5, -6, -7, -8, 7, 6, 5, 4, 3, 2, 1, 0)
                                 : _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int r = 0; r < R; ++r) table[r] = this->Dequantize(r, k, codes);
    return this->shift >= 62 ? INT64_MAX : ((k >> this->shift) + 1) << this->shift;
  }

  __m512 Load(int r, int64_t k, __mmask16 m) const {
    const uint8_t* p = this->w[r] + k / 2;
    __m512i bytes;
    if (m == 0xFFFF) {
      int64_t eight;
      std::memcpy(&eight, p, sizeof eight);
      bytes = _mm512_set1_epi64(eight);
    } else {  // the row's last step: read only its own bytes
      const auto valid = static_cast<__mmask16>((1u << ((_mm_popcnt_u32(m) + 1) / 2)) - 1);
      bytes = _mm512_broadcastq_epi64(_mm_maskz_loadu_epi8(valid, p));
    }
    // 64-bit lane q: byte 0 <- bits 8q.. (nibble 2q), byte 4 <- bits 8q + 4.. (nibble 2q + 1)
    const __m512i at = _mm512_set_epi64(0x3C00000038ll, 0x3400000030ll, 0x2C00000028ll, 0x2400000020ll,
                                        0x1C00000018ll, 0x1400000010ll, 0x0C00000008ll, 0x0400000000ll);
    const __m512 f = _mm512_permutexvar_ps(_mm512_multishift_epi64_epi8(at, bytes), table[r]);
    return m == 0xFFFF ? f : _mm512_maskz_mov_ps(m, f);
  }
};

#endif  // __AVX512VBMI__

template <typename Rows>
void DecodeRows(Rows w, int64_t in, int64_t valid, float* out) {
  const int64_t full = in / 16 * 16;
  for (int64_t k = 0; k < full;) {
    const int64_t end = std::min(full, w.Begin(k));
    for (; k < end; k += 16) {
      for (int64_t j = 0; j < valid; ++j) _mm512_storeu_ps(out + j * in + k, w.Load(static_cast<int>(j), k, 0xFFFF));
    }
  }
  if (full < in) {
    w.Begin(full);
    const auto m = static_cast<__mmask16>((1u << (in - full)) - 1);
    for (int64_t j = 0; j < valid; ++j) {
      _mm512_mask_storeu_ps(out + j * in + full, m, w.Load(static_cast<int>(j), full, m));
    }
  }
}

}  // namespace jaxinfer

#else  // portable readers (matmul_tiles.h's Lanes): bfloat16 and int8 rows; 4-bit rows take the scratch path

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace jaxinfer {

template <int R>
struct BF16Rows : Prefetcher {
  const uint16_t* w[R];
  Lanes Load(int r, int64_t k) const {  // exact: a bfloat16 is the top half of a float32
    typedef uint16_t Halves __attribute__((vector_size(16), aligned(2), may_alias));
    typedef uint32_t Words __attribute__((vector_size(32)));
    const Words bits = __builtin_convertvector(*reinterpret_cast<const Halves*>(w[r] + k), Words) << 16;
    return reinterpret_cast<const Lanes&>(bits);
  }
  float At(int r, int64_t k) const { return BF16ToF32(w[r][k]); }
  int64_t Begin(int64_t) { return INT64_MAX; }
};

// kScaled false: the codes alone, as float32 (one scale per row, applied to the dot products after: the
// caller's post_scale, matmul.cc).
template <int R, bool kScaled = true>
struct Int8Rows : QuantRows<R, int8_t> {
  Lanes s[R], o[R];  // the current group's scale and offset of each row, in every lane (Begin)

  int64_t Begin(int64_t k) {  // the group of k, good until the group ends
    if constexpr (!kScaled) return INT64_MAX;
    const int64_t g = k >> this->shift;
    for (int r = 0; r < R; ++r) {
      s[r] = Lanes{} + this->scale[r][g];
      o[r] = Lanes{} + (this->offset[r] ? this->offset[r][g] : 0.f);
    }
    return this->shift >= 62 ? INT64_MAX : (g + 1) << this->shift;
  }

  Lanes Load(int r, int64_t k) const {
#ifdef __AVX2__  // GCC turns the generic conversion below into 8 scalar ones
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(this->w[r] + k));
    const Lanes c = reinterpret_cast<Lanes>(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)));
#else
    typedef int8_t Codes __attribute__((vector_size(8), aligned(1), may_alias));
    const Lanes c = __builtin_convertvector(*reinterpret_cast<const Codes*>(this->w[r] + k), Lanes);
#endif
    if constexpr (!kScaled) return c;
    return this->offset[0] ? MulAdd(c, s[r], o[r]) : c * s[r];  // one rounding, as DequantizeRow's fma
  }
  float At(int r, int64_t k) const {
    if constexpr (!kScaled) return this->w[r][k];
    const int64_t g = k >> this->shift;
    const float c = this->w[r][k], sc = this->scale[r][g];
    return this->offset[r] ? std::fma(c, sc, this->offset[r][g]) : c * sc;
  }
};

template <typename Rows>
void DecodeRows(Rows w, int64_t in, int64_t valid, float* out) {
  for (int64_t j = 0; j < valid; ++j)
    for (int64_t k = 0; k < in; ++k) out[j * in + k] = w.At(static_cast<int>(j), k);
}

}  // namespace jaxinfer

#endif
