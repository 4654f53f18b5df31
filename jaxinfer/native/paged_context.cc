// Paged-context attention for XLA:CPU, called through the XLA FFI (jax.ffi.ffi_call).
//
// For each query token i and KV head h: the G query heads of h attend to positions
// [0, limit[i]) of sequence seq[i], read in place from the paged cache through that sequence's page
// table. Returns the online-softmax state (row max m, row sum l, unnormalised output acc), so the
// caller can merge it with other parts or normalise it (acc / l). A row with no visible key gives
// (-inf, 0, 0).
//
// Why native: XLA:CPU has to gather each token's pages into a fresh buffer and transpose K/V for
// its batched dots, which on a 2-core host costs several times the arithmetic. Here each page is
// read straight from the cache, once per run of up to 8 consecutive query tokens of its sequence.
// Runs are spread over XLA's intra-op thread pool.
//
// Layouts (row-major):
//   q           f32 [T, Hk, G, D]   (scaled by the softmax scale already)
//   kv_pages    f32|bf16|f8e4m3fn|f8e5m2 [P, page, 2*Hk, D]   K of head h at 2h, V at 2h+1
//               int8 [P, page + E, 2*Hk, D]: values, then E rows of per-(token, head) float32 scales
//               (pallas_kernels/ragged_paged_attention/quantized.py: token t's scale for combined
//               head c in bytes 4t .. 4t+3, least significant first, of head c's trailer rows)
//   page_table  i32 [S, W]
//   seq, limit  i32 [T]
//   m, l        f32 [T, Hk, G];  acc f32 [T, Hk, G, D]
// Attribute page_size: tokens per page (an int8 page has more rows).
// 8-bit pages are widened to float32 (int8: times their scales) once per page and run of tokens, then
// read as float32 pages: converting each element for every query head that reads it made int8 pages
// 1.75x slower than float32 ones here (decode, GQA 3).
// Out-of-range page ids, sequence ids and limits are clamped (never read outside the cache).
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMaxGroup = 16;  // query heads per KV head handled in one pass
constexpr int64_t kRunTokens = 8;  // query tokens of one sequence sharing each page read

inline float Load(const float* p, int64_t i) { return p[i]; }
inline float Load(const uint16_t* p, int64_t i) {
  uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// The 256 values of an 8-bit float with `mbits` mantissa bits and exponent bias `bias`; `fn`: no
// infinities, the all-ones pattern is NaN (e4m3fn), else IEEE-style (e5m2: all-ones exponent = inf/NaN).
std::array<float, 256> Fp8Table(int mbits, int bias, bool fn) {
  std::array<float, 256> t{};
  const int emax = (1 << (7 - mbits)) - 1, mmax = (1 << mbits) - 1;
  for (int b = 0; b < 256; ++b) {
    const int e = (b >> mbits) & emax, m = b & mmax;
    float v;
    if (fn ? (e == emax && m == mmax) : (e == emax && m != 0)) {
      v = std::numeric_limits<float>::quiet_NaN();
    } else if (!fn && e == emax) {
      v = std::numeric_limits<float>::infinity();
    } else if (e == 0) {
      v = std::ldexp(static_cast<float>(m), 1 - bias - mbits);
    } else {
      v = std::ldexp(static_cast<float>(m + (1 << mbits)), e - bias - mbits);
    }
    t[b] = (b & 0x80) ? -v : v;
  }
  return t;
}
const std::array<float, 256> kE4M3 = Fp8Table(3, 7, true);
const std::array<float, 256> kE5M2 = Fp8Table(2, 15, false);

// exp(x) for finite x <= 0 (a score minus the running max), in plain arithmetic the compiler can
// vectorise (glibc's vector expf needs -ffast-math, which would also assume away the -inf the online
// softmax starts from): x = n ln2 + r with |r| <= ln2/2, exp(r) by its degree-6 Taylor polynomial
// (relative error below 2e-7 there), 2^n through the exponent bits. Below -87 it returns about 1e-38
// instead of a denormal or 0: next to the row's largest term, exp(0) = 1, that is nothing.
inline float ExpNonPositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer held in the low bits
  x = std::max(x, -87.0f);
  const float shifted = x * kLog2e + kRound;
  const float n = shifted - kRound;
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  const float p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720))))));
  int32_t shifted_bits, scale_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof shifted_bits);
  scale_bits = (shifted_bits - 0x4B400000 + 127) << 23;  // 0x4B400000: the bits of kRound
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  return p * scale;
}

struct Shape {
  int64_t tokens, kv_heads, group, dim, pages, page, slots, width;
  int64_t rows;  // rows of one page in the cache: `page` tokens, plus the int8 scale trailer
};

// How a cache dtype is read. Float32 and bfloat16 pages are read in place (`Load`); 8-bit pages are
// first widened: keys [0, n) of the page at `base` to float32 [n, 2*Hk, D] in `out` (`bits`: scratch of
// 2*Hk*page words).
template <typename Stored>
struct InPlace {
  using T = Stored;
  static constexpr bool kWide = false;
};
struct Int8 {
  using T = int8_t;
  static constexpr bool kWide = true;
  static void Widen(const Shape& s, const int8_t* base, int64_t n, float* out, uint32_t* bits) {
    const int64_t heads = 2 * s.kv_heads;
    for (int64_t c = 0; c < heads; ++c) {  // scales: key k's in bytes 4k .. 4k+3 of head c's trailer
      for (int64_t k = 0; k < n; ++k) {
        const int64_t f = 4 * k;  // D is a multiple of 4: the four bytes share one row
        const auto* at = reinterpret_cast<const uint8_t*>(base) + ((s.page + f / s.dim) * heads + c) * s.dim + f % s.dim;
        bits[c * s.page + k] = static_cast<uint32_t>(at[0]) | static_cast<uint32_t>(at[1]) << 8 |
                               static_cast<uint32_t>(at[2]) << 16 | static_cast<uint32_t>(at[3]) << 24;
      }
    }
    for (int64_t k = 0; k < n; ++k) {
      for (int64_t c = 0; c < heads; ++c) {
        float scale;
        std::memcpy(&scale, bits + c * s.page + k, sizeof scale);
        const int8_t* in = base + (k * heads + c) * s.dim;
        float* o = out + (k * heads + c) * s.dim;
#pragma omp simd
        for (int64_t d = 0; d < s.dim; ++d) o[d] = static_cast<float>(in[d]) * scale;
      }
    }
  }
};
template <const std::array<float, 256>& kTable>
struct Fp8 {
  using T = uint8_t;
  static constexpr bool kWide = true;
  static void Widen(const Shape& s, const uint8_t* base, int64_t n, float* out, uint32_t*) {
    const int64_t count = n * 2 * s.kv_heads * s.dim;
    for (int64_t i = 0; i < count; ++i) out[i] = kTable[base[i]];
  }
};

// One query token, all its heads, against keys [0, n) of one page at `base` (a page holds every
// head's K and V of `page` positions contiguously): updates the token's online-softmax state.
template <typename KV>
void AttendPage(const Shape& s, const float* q, const KV* base, int64_t n, float* m, float* l, float* acc,
                float* scores) {
  const int64_t rows = s.kv_heads * s.group, d_n = s.dim;
  const int64_t row_stride = 2 * s.kv_heads * d_n;  // one position of a page
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t h = r / s.group;
    const float* qr = q + r * d_n;
    float* sc = scores + r * s.page;
    float block_max = -std::numeric_limits<float>::infinity();
    for (int64_t k = 0; k < n; ++k) {
      const KV* key = base + k * row_stride + 2 * h * d_n;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < d_n; ++d) dot += qr[d] * Load(key, d);
      sc[k] = dot;
      block_max = std::max(block_max, dot);
    }
    const float m_new = std::max(m[r], block_max);
    const float scale = std::isinf(m[r]) ? 0.f : std::exp(m[r] - m_new);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t k = 0; k < n; ++k) {
      sc[k] = ExpNonPositive(sc[k] - m_new);
      sum += sc[k];
    }
    l[r] = l[r] * scale + sum;
    m[r] = m_new;
    float* ar = acc + r * d_n;
#pragma omp simd
    for (int64_t d = 0; d < d_n; ++d) ar[d] *= scale;
    for (int64_t k = 0; k < n; ++k) {
      const KV* value = base + k * row_stride + (2 * h + 1) * d_n;
      const float p = sc[k];
#pragma omp simd
      for (int64_t d = 0; d < d_n; ++d) ar[d] += p * Load(value, d);
    }
  }
}

// A run of consecutive query tokens of one sequence (a prefill chunk, or one decode token): each
// page is read from memory once for the whole run and used by every token that sees it.
template <typename Format>
void AttendRun(const Shape& s, const float* q, const typename Format::T* kv, const int32_t* pages,
               const int32_t* limits, int64_t count, float* m, float* l, float* acc, float* scores, float* wide,
               uint32_t* bits) {
  const int64_t per_token = s.kv_heads * s.group;
  std::fill(m, m + count * per_token, -std::numeric_limits<float>::infinity());
  std::fill(l, l + count * per_token, 0.f);
  std::fill(acc, acc + count * per_token * s.dim, 0.f);
  const int32_t longest = *std::max_element(limits, limits + count);
  for (int64_t start = 0; start < longest; start += s.page) {
    const int64_t pid = std::clamp<int64_t>(pages[start / s.page], 0, s.pages - 1);
    const typename Format::T* base = kv + pid * s.rows * 2 * s.kv_heads * s.dim;
    if constexpr (Format::kWide) Format::Widen(s, base, std::min<int64_t>(s.page, longest - start), wide, bits);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t n = std::min<int64_t>(s.page, limits[i] - start);
      if (n <= 0) continue;
      const int64_t o = i * per_token;
      if constexpr (Format::kWide) {
        AttendPage<float>(s, q + o * s.dim, wide, n, m + o, l + o, acc + o * s.dim, scores);
      } else {
        AttendPage<typename Format::T>(s, q + o * s.dim, base, n, m + o, l + o, acc + o * s.dim, scores);
      }
    }
  }
}

// Rows (runs of tokens) are shared between the calling thread and the pool's by ParallelFor (parallel.h).
template <typename Format, ffi::DataType kType>
ffi::Error PagedContext(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer kv_pages,
                        ffi::Buffer<ffi::S32> page_table, ffi::Buffer<ffi::S32> seq,
                        ffi::Buffer<ffi::S32> limit, int64_t page_size, ffi::ResultBuffer<ffi::F32> m,
                        ffi::ResultBuffer<ffi::F32> l, ffi::ResultBuffer<ffi::F32> acc) {
  using KV = typename Format::T;
  auto qd = q.dimensions(), kd = kv_pages.dimensions(), td = page_table.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || td.size() != 2) {
    return ffi::Error::InvalidArgument("paged_context: q must be rank 4, kv_pages rank 4, page_table rank 2");
  }
  Shape s{qd[0], qd[1], qd[2], qd[3], kd[0], page_size, td[0], td[1], kd[1]};
  if (kd[2] != 2 * s.kv_heads || kd[3] != s.dim || s.group > kMaxGroup || s.pages < 1 || s.slots < 1) {
    return ffi::Error::InvalidArgument("paged_context: kv_pages must be [P, page, 2*Hk, D] matching q [T, Hk, G<=16, D]");
  }
  const int64_t trailer = std::is_same_v<KV, int8_t> ? (4 * s.page + s.dim - 1) / s.dim : 0;
  if (s.page < 1 || s.rows != s.page + trailer || (trailer && s.dim % 4)) {
    return ffi::Error::InvalidArgument("paged_context: page_size does not match the rows of kv_pages");
  }
  const float* qp = q.typed_data();
  if (kv_pages.element_type() != kType) {
    return ffi::Error::InvalidArgument("paged_context: kv_pages dtype does not match the handler");
  }
  const KV* kvp = kv_pages.reinterpret_data<KV>();
  const int32_t* tp = page_table.typed_data();
  const int32_t* sp = seq.typed_data();
  const int32_t* lp = limit.typed_data();
  float *mp = m->typed_data(), *lp_out = l->typed_data(), *ap = acc->typed_data();
  const int64_t max_keys = s.width * s.page;
  const int64_t per_token = s.kv_heads * s.group;
  // Work items: runs of at most kRunTokens consecutive tokens of one sequence, with clamped ids/limits.
  std::vector<int32_t> seqs(s.tokens), limits(s.tokens);
  std::vector<int64_t> runs;  // start token of each run, then s.tokens
  for (int64_t t = 0; t < s.tokens; ++t) {
    seqs[t] = std::clamp<int32_t>(sp[t], 0, static_cast<int32_t>(s.slots - 1));
    limits[t] = static_cast<int32_t>(std::clamp<int64_t>(lp[t], 0, max_keys));
    if (t == 0 || seqs[t] != seqs[t - 1] || t - runs.back() == kRunTokens) runs.push_back(t);
  }
  const int64_t rows = static_cast<int64_t>(runs.size());
  runs.push_back(s.tokens);

  // Each thread keeps its scratch (a page of scores, one widened page) across the calls it serves.
  auto body = [&](int64_t r) {
    thread_local std::vector<float> scores, wide;
    thread_local std::vector<uint32_t> bits;
    scores.resize(per_token * s.page);
    wide.resize(Format::kWide ? s.page * 2 * s.kv_heads * s.dim : 0);
    bits.resize(Format::kWide ? 2 * s.kv_heads * s.page : 0);
    const int64_t t = runs[r], o = t * per_token;
    AttendRun<Format>(s, qp + o * s.dim, kvp, tp + static_cast<int64_t>(seqs[t]) * s.width, limits.data() + t,
                      runs[r + 1] - t, mp + o, lp_out + o, ap + o * s.dim, scores.data(), wide.data(), bits.data());
  };
  // Every pool thread may help beside the caller here (the linear layer keeps one fewer): with one fewer,
  // batch-32 decode attention of SmolLM2's shape was no faster on the 2-core EPYC (2026-12-01, within noise).
  jaxinfer::ParallelFor(pool, rows, rows / 2, body);
  return ffi::Error::Success();
}

#define JAXINFER_BINDING                  \
  ffi::Ffi::Bind()                        \
      .Ctx<ffi::ThreadPool>()             \
      .Arg<ffi::Buffer<ffi::F32>>()       \
      .Arg<ffi::AnyBuffer>()              \
      .Arg<ffi::Buffer<ffi::S32>>()       \
      .Arg<ffi::Buffer<ffi::S32>>()       \
      .Arg<ffi::Buffer<ffi::S32>>()       \
      .Attr<int64_t>("page_size")         \
      .Ret<ffi::Buffer<ffi::F32>>()       \
      .Ret<ffi::Buffer<ffi::F32>>()       \
      .Ret<ffi::Buffer<ffi::F32>>()

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferPagedContextF32, (PagedContext<InPlace<float>, ffi::DataType::F32>),
                              JAXINFER_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferPagedContextBF16, (PagedContext<InPlace<uint16_t>, ffi::DataType::BF16>),
                              JAXINFER_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferPagedContextS8, (PagedContext<Int8, ffi::DataType::S8>), JAXINFER_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferPagedContextF8E4M3FN, (PagedContext<Fp8<kE4M3>, ffi::DataType::F8E4M3FN>),
                              JAXINFER_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferPagedContextF8E5M2, (PagedContext<Fp8<kE5M2>, ffi::DataType::F8E5M2>),
                              JAXINFER_BINDING);
