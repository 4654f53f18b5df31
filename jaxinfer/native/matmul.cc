// A linear layer with low-precision weights for XLA:CPU, called through the XLA FFI
// (jaxinfer/native/matmul.py): y[n, o] = sum_i x[n, i] * W[o, i], accumulated in float32.
//
// Why native: XLA:CPU converts a bfloat16 or integer weight to float32 in a separate pass over memory
// before an f32 dot (bf16 decode ran 8x slower than f32). Here each weight byte is read once per call
// (per block of up to 256 tokens): for up to four tokens the dot tile decodes the weights in
// registers (matmul_codes.h), for more each block of 8 rows is decoded once into a float32 scratch
// that stays in cache and serves every token of the block, in dot-product tiles of AVX-512 FMAs
// (matmul_tiles.h says why not bfloat16 dot instructions). Without AVX-512 (AMD Zen 3, older Intel,
// Arm) the same loops run on compiler vector types (8 lanes: one AVX2 register) with smaller tiles;
// until 2026-11-30 they were scalar loops, 3-10x slower than XLA's own dot on an AVX2 EPYC
// (docs/PERFORMANCE.md). The caller converts bfloat16 activations to float32 (exactly). Both ways give
// bit-identical results (the same decoded values, the same sums).
//
// Layouts (row-major):
//   x       [N, I]  float32
//   values  [O, I]  float32 | bfloat16 | int8 | int4 | uint4 (4-bit: packed two per byte, low
//                   nibble first, over the whole array, as XLA:CPU stores them)
//   scale   [O, G]  float32, G = ceil(I / group); integer weights only (else zero-sized)
//   offset  [O, G]  float32, or zero-sized when absent
//   y       [N, O]  float32
// W[o, i] = values[o, i] * scale[o, i / group] + offset[o, i / group] for integer values, in float32.
// Work items are (token block, block of kRowBlock weight rows), spread over XLA's intra-op pool.
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "matmul_codes.h"
#include "matmul_tiles.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using jaxinfer::DequantizeRow;
using jaxinfer::DotTile;
using jaxinfer::FloatRows;

namespace {

constexpr int64_t kRowBlock = 8;  // weight rows dequantized together; the widest tile
constexpr int64_t kRegisterTokens = 4;  // calls of at most this many tokens decode the weights in registers
// Tiles for more tokens: 6 tokens x 4 rows (24 accumulators of AVX-512's 32 registers); portable, 3 x 4
// (12 one-vector accumulators, the 3 tokens' vectors and a weight vector: AVX2's 16 registers). Measured
// on the AVX2 EPYC (SmolLM2's projections, 2026-11-30): 3 x 4 took N = 32 from 144 to 102-108 ms and
// N = 256 from 1,170 to 667-748 ms against 3 x 2; 4 x 2 and 5 x 2 were slower.
#ifdef JAXINFER_AVX512
constexpr int kTileTokens = 6, kTileRows = 4;
#else
constexpr int kTileTokens = 3, kTileRows = 4;
#endif
// Tokens sharing one decoded row block: as many as keep their x within about 1 MiB (half the L2), in
// whole 6-token tiles, 48 to 256 (measured at I = 4096, N = 256: 60 tokens 15.5 ms a core, 256 19 ms).
constexpr int64_t kXBlockBytes = 1 << 20, kMinTokenBlock = 48, kMaxTokenBlock = 256;
// Work per extra thread: 2^18 multiply-adds is a few microseconds of one core, about what handing a task
// to a pool thread and waking it costs (an estimate: the shared 2-core host gave no clean measurement).
constexpr int64_t kMacsPerHelper = 1 << 18;

enum class Weights { kF32, kBF16, kS8, kS4, kU4 };

struct Problem {
  int64_t n, in, out, groups, group;
  const float* x;
  const void* w;
  Weights type;
  const float* scale;   // [out, groups]
  const float* offset;  // [out, groups] or null
  float* y;
  // int8 with one scale per row and no offset: the dot products run on the codes themselves and each
  // output is multiplied by its row's scale after (y[n, o] = scale[o] * sum_i x[n, i] code[o, i]),
  // which saves a multiply per weight in the one-token tiles. Every path does the same, so the result
  // still does not depend on the path or the batch.
  const float* post_scale = nullptr;  // [out] or null
};

// Row o of the weights in float32: the row itself when it is stored so, else written into `buf` (the
// values the readers of WithCodeRows give, for any group and alignment).
const float* WeightRow(const Problem& p, int64_t o, float* buf, std::vector<int8_t>& codes) {
  if (p.type == Weights::kF32) return static_cast<const float*>(p.w) + o * p.in;
  if (p.type == Weights::kBF16) {  // exact
    const uint16_t* src = static_cast<const uint16_t*>(p.w) + o * p.in;
    for (int64_t k = 0; k < p.in; ++k) buf[k] = jaxinfer::BF16ToF32(src[k]);
    return buf;
  }
  const int8_t* row;
  if (p.type == Weights::kS8) {
    row = static_cast<const int8_t*>(p.w) + o * p.in;
  } else {
    codes.resize(p.in);
    jaxinfer::UnpackNibbles(static_cast<const uint8_t*>(p.w), o * p.in, p.in, p.type == Weights::kS4, codes.data());
    row = codes.data();
  }
  if (p.post_scale) {  // the codes alone (exact)
    static const float kOne = 1.f;
    DequantizeRow(row, &kOne, nullptr, p.in, p.in, buf);
    return buf;
  }
  const int64_t g = o * p.groups;
  DequantizeRow(row, p.scale + g, p.offset ? p.offset + g : nullptr, p.in, p.group, buf);
  return buf;
}

// Tokens [t, t + T) against the R rows of `w` starting at output o, of which the first `valid` are real.
template <int R, int T, typename Rows>
void TileToY(const Problem& p, const Rows& w, int64_t t, int64_t o, int64_t valid) {
  const float* xs[T];
  for (int i = 0; i < T; ++i) xs[i] = p.x + (t + i) * p.in;
  float res[T * R];
  DotTile<R, T>(w, xs, p.in, res);
  for (int i = 0; i < T; ++i) {
    for (int64_t j = 0; j < valid; ++j) {
      const float dot = res[i * R + j];
      p.y[(t + i) * p.out + o + j] = p.post_scale ? dot * p.post_scale[o + j] : dot;
    }
  }
}

// One or two tokens against rows [o0, o0 + valid), 8 rows a tile (missing rows repeat the first).
// Three or four tokens take two passes over the same rows: on the 2-core AVX2 EPYC (2026-12-01) a
// 4-token int8 SmolLM2 step took 1.6-1.8x a one-token step this way against 2.0-2.2x through the float32
// scratch rows; at 8 tokens (four passes) it was no faster, so the scratch path keeps five and up.
template <typename Rows>
void FewTokens(const Problem& p, const Rows& w, int64_t t0, int64_t t1, int64_t o0, int64_t valid) {
  if (t1 - t0 == 1) return TileToY<8, 1>(p, w, t0, o0, valid);
  TileToY<8, 2>(p, w, t0, o0, valid);
}

// visit(rows) with weight rows [o0, o0 + 8) as a reader that decodes them in registers (matmul_codes.h;
// missing rows repeat the first), or false where there is none: float32 weights, 4-bit rows without
// AVX512-VBMI (the portable build has bfloat16 and int8 readers only), groups straddling a 16-input step,
// 4-bit rows not starting on a byte.
template <typename Visit>
bool WithCodeRows(const Problem& p, int64_t o0, int64_t valid, Visit visit) {
  if (p.type == Weights::kF32) return false;
  auto row = [&](int64_t j) { return o0 + (j < valid ? j : 0); };
  // the next row block, prefetched as this one is read (matmul_tiles.h's Prefetcher); 4-bit rows: none
  auto ahead = [&](jaxinfer::Prefetcher& w, const void* codes, int64_t code_bytes) {
    if (o0 + kRowBlock >= p.out) return;
    w.next = static_cast<const char*>(codes) + (o0 + kRowBlock) * p.in * code_bytes;
    w.step_bytes = kRowBlock * 16 * code_bytes;
  };
  if (p.type == Weights::kBF16) {
    jaxinfer::BF16Rows<8> w;
    for (int j = 0; j < 8; ++j) w.w[j] = static_cast<const uint16_t*>(p.w) + row(j) * p.in;
    ahead(w, p.w, 2);
    visit(w);
    return true;
  }
  int shift = -1;
  if (p.groups == 1) {
    shift = 62;
  } else if (p.group >= 16 && (p.group & (p.group - 1)) == 0) {
    shift = __builtin_ctzll(p.group);
  }
  if (shift < 0 || (p.type != Weights::kS8 && p.in % 2 != 0)) return false;
#ifndef __AVX512VBMI__
  if (p.type != Weights::kS8) return false;
#endif
  auto fill = [&](auto& w, const auto* codes, int64_t row_bytes) {
    w.shift = shift;
    for (int j = 0; j < 8; ++j) {
      w.w[j] = codes + row(j) * row_bytes;
      w.scale[j] = p.scale + row(j) * p.groups;
      w.offset[j] = p.offset ? p.offset + row(j) * p.groups : nullptr;
    }
    visit(w);
  };
  [[maybe_unused]] const auto* bytes = static_cast<const uint8_t*>(p.w);
  if (p.type == Weights::kS8) {  // the codes alone where each output is scaled after (post_scale)
    auto int8 = [&](auto w) {
      ahead(w, p.w, 1);
      fill(w, static_cast<const int8_t*>(p.w), p.in);
    };
    p.post_scale ? int8(jaxinfer::Int8Rows<8, false>{}) : int8(jaxinfer::Int8Rows<8>{});
  }
#ifdef __AVX512VBMI__
  if (p.type == Weights::kS4) {
    jaxinfer::Int4Rows<8, true> w;
    fill(w, bytes, p.in / 2);
  } else if (p.type == Weights::kU4) {
    jaxinfer::Int4Rows<8, false> w;
    fill(w, bytes, p.in / 2);
  }
#endif
  return true;
}

// T tokens from t against the block's rows (the first `valid` real) in tiles of kTileRows rows.
template <int T>
void RowTiles(const Problem& p, const FloatRows<8>& w, int64_t t, int64_t o0, int64_t valid) {
  for (int64_t r0 = 0; r0 < valid; r0 += kTileRows) {
    FloatRows<kTileRows> sub;
    for (int j = 0; j < kTileRows; ++j) sub.w[j] = w.w[r0 + j];
    TileToY<kTileRows, T>(p, sub, t, o0 + r0, std::min<int64_t>(kTileRows, valid - r0));
  }
}

// Tokens [t0, t1) against weight rows [o0, o0 + kRowBlock) (fewer at the end): each row turned into
// float32 once into a scratch row (by the same readers, else WeightRow), then tiles of kTileTokens tokens
// x kTileRows rows (fewer tokens at the end).
void RunBlock(const Problem& p, int64_t t0, int64_t t1, int64_t o0) {
  const int64_t valid = std::min(kRowBlock, p.out - o0);
  // Up to kRegisterTokens tokens: the tiles read the weights themselves, two tokens a pass (the block's
  // codes stay in L1 for the passes after the first).
  if (t1 - t0 <= kRegisterTokens && WithCodeRows(p, o0, valid, [&](const auto& w) {
        for (int64_t t = t0; t < t1; t += 2) FewTokens(p, w, t, std::min(t + 2, t1), o0, valid);
      })) {
    return;
  }
  thread_local std::vector<float> buf;
  thread_local std::vector<int8_t> codes;
  buf.resize(kRowBlock * p.in);
  FloatRows<8> w;
  // 4-bit rows through their tables (measured faster than unpacking nibbles to bytes first); bfloat16
  // and int8 rows one at a time (WeightRow: faster than the readers' 8 rows side by side).
  const bool four_bit = p.type == Weights::kS4 || p.type == Weights::kU4;
  const bool decoded = four_bit && WithCodeRows(p, o0, valid, [&](const auto& rows) {
    jaxinfer::DecodeRows(rows, p.in, valid, buf.data());
    for (int64_t j = 0; j < valid; ++j) w.w[j] = buf.data() + j * p.in;
  });
  for (int64_t j = 0; j < kRowBlock; ++j) {  // missing rows repeat row 0; their results are dropped
    if (j >= valid) {
      w.w[j] = w.w[0];
    } else if (!decoded) {
      w.w[j] = WeightRow(p, o0 + j, buf.data() + j * p.in, codes);
    }
  }
  int64_t t = t0;
  for (; t + kTileTokens <= t1; t += kTileTokens) RowTiles<kTileTokens>(p, w, t, o0, valid);
  switch (t1 - t) {
    case 5: return RowTiles<5>(p, w, t, o0, valid);
    case 4: return RowTiles<4>(p, w, t, o0, valid);
    case 3: return RowTiles<3>(p, w, t, o0, valid);
    case 2: return TileToY<8, 2>(p, w, t, o0, valid);
    case 1: return TileToY<8, 1>(p, w, t, o0, valid);
    default: return;
  }
}

// One weight's problem against x, its arguments checked.
ffi::Error MakeProblem(const ffi::Buffer<ffi::F32>& x, const ffi::AnyBuffer& values, const ffi::Buffer<ffi::F32>& scale,
                       const ffi::Buffer<ffi::F32>& offset, int64_t group, ffi::Result<ffi::Buffer<ffi::F32>>& y,
                       Problem& p) {
  auto xd = x.dimensions(), wd = values.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2 || wd[1] != xd[1] || yd[0] != xd[0] || yd[1] != wd[0]) {
    return ffi::Error::InvalidArgument("linear: x must be [N, I], values [O, I] and y [N, O]");
  }
  p = Problem{xd[0], xd[1], wd[0], 0, group, x.typed_data(), values.untyped_data(), Weights::kF32,
              nullptr, nullptr, y->typed_data()};
  switch (values.element_type()) {
    case ffi::DataType::F32: p.type = Weights::kF32; break;
    case ffi::DataType::BF16: p.type = Weights::kBF16; break;
    case ffi::DataType::S8: p.type = Weights::kS8; break;
    case ffi::DataType::S4: p.type = Weights::kS4; break;
    case ffi::DataType::U4: p.type = Weights::kU4; break;
    default: return ffi::Error::InvalidArgument("linear: values must be float32, bfloat16, int8, int4 or uint4");
  }
  const bool quantized = p.type != Weights::kF32 && p.type != Weights::kBF16;
  if (quantized) {
    if (group < 1) return ffi::Error::InvalidArgument("linear: group must be >= 1");
    p.groups = (p.in + group - 1) / group;
    auto sd = scale.dimensions();
    if (sd.size() != 2 || sd[0] != p.out || sd[1] != p.groups) {
      return ffi::Error::InvalidArgument("linear: scale must be [O, ceil(I / group)]");
    }
    p.scale = scale.typed_data();
    if (offset.element_count() != 0) {
      auto od = offset.dimensions();
      if (od.size() != 2 || od[0] != p.out || od[1] != p.groups) {
        return ffi::Error::InvalidArgument("linear: offset must be zero-sized or of scale's shape");
      }
      p.offset = offset.typed_data();
    }
    if (p.type == Weights::kS8 && p.groups == 1 && p.offset == nullptr) p.post_scale = p.scale;
  }
  return ffi::Error::Success();
}

// Every problem (the same x, so the same token blocks) as one set of work items, weight after weight:
// one hand-off to the pool for all of them.
void RunProblems(ffi::ThreadPool& pool, const std::vector<Problem>& problems) {
  if (problems.empty() || problems[0].n == 0) return;
  const int64_t n = problems[0].n, in = problems[0].in;
  const int64_t token_block = std::clamp<int64_t>(kXBlockBytes / (4 * in) / 6 * 6, kMinTokenBlock, kMaxTokenBlock);
  const int64_t token_blocks = (n + token_block - 1) / token_block;
  std::vector<int64_t> first_item{0}, row_blocks;  // problem k's items: [first_item[k], first_item[k + 1])
  int64_t macs = 0;
  for (const Problem& p : problems) {
    row_blocks.push_back((p.out + kRowBlock - 1) / kRowBlock);
    first_item.push_back(first_item.back() + row_blocks.back() * token_blocks);
    macs += n * in * p.out;
  }
  const int64_t items = first_item.back();
  // The caller works too: one helper fewer than the pool's threads keeps one thread per core (the
  // caller is a pool thread, or the pool is idle while it waits for this call).
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, macs / kMacsPerHelper);
  auto body = [&](int64_t item) {
    const auto k = std::upper_bound(first_item.begin(), first_item.end(), item) - first_item.begin() - 1;
    const int64_t local = item - first_item[k];
    const int64_t tb = local / row_blocks[k], o0 = (local % row_blocks[k]) * kRowBlock;
    const int64_t t0 = tb * token_block, t1 = std::min(n, t0 + token_block);
    RunBlock(problems[k], t0, t1, o0);
  };
  // Up to four tokens: each item prefetches the next row block (WithCodeRows), so items go in runs of
  // consecutive blocks, about 8 runs a thread, and the prefetched block is mostly read by the core that
  // fetched it. One item at a time, the next block mostly went to the other core: one-token int8 calls
  // ran at 8-15 GB/s, 17-19 GB/s in runs (the head and gate, measured on the 2-core AVX2 EPYC, 2026-11-30).
  const int64_t run_length = n <= kRegisterTokens ? items / ((helpers + 1) * 8) : 1;
  jaxinfer::ParallelFor(pool, items, helpers, body, run_length);
}

// One or several weights against the same x in one call (q, k and v; gate and up): args are (values,
// scale, offset) per weight, results one y per weight, groups one per weight. One call spreads the small
// weights (SmolLM2's k and v: 110 KB, too little to hand to a second thread alone) over every core.
ffi::Error Linears(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args, ffi::RemainingRets rets,
                   ffi::Span<const int64_t> groups) {
  const size_t count = groups.size();
  if (args.size() != 3 * count || rets.size() != count) {
    return ffi::Error::InvalidArgument("linears: want 3 arguments (values, scale, offset) and 1 result per group");
  }
  std::vector<Problem> problems;
  for (size_t k = 0; k < count; ++k) {
    auto values = args.get<ffi::AnyBuffer>(3 * k);
    auto scale = args.get<ffi::Buffer<ffi::F32>>(3 * k + 1);
    auto offset = args.get<ffi::Buffer<ffi::F32>>(3 * k + 2);
    auto y = rets.get<ffi::Buffer<ffi::F32>>(k);
    if (!values.has_value() || !scale.has_value() || !offset.has_value() || !y.has_value()) {
      return ffi::Error::InvalidArgument("linears: argument or result of the wrong type");
    }
    Problem p;
    if (ffi::Error e = MakeProblem(x, *values, *scale, *offset, groups[k], *y, p); e.failure()) return e;
    if (p.out > 0) problems.push_back(p);
  }
  RunProblems(pool, problems);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferLinears, Linears,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("groups"));
