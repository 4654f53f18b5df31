// The memory's ceiling for a one-token int8 linear layer on this CPU, outside XLA (AVX2 + FMA, x86):
//
//   g++ -O3 -march=native -std=c++17 -pthread scripts/benchmark_stream.cc -o /tmp/benchmark_stream
//   /tmp/benchmark_stream
//
// Over 105 MiB of int8 weights (30 SmolLM2 layers' worth, so they come from DRAM), medians of 15:
//   * a plain int8 sum on 1 and 2 threads: what the memory gives a stream right now;
//   * the one-token dot products in the native kernel's style (8 rows of 576 inputs side by side, 16
//     inputs a step, int8 -> float32, FMAs) over 512 KiB in L2: what one core computes;
//   * the same over DRAM on 1 and 2 threads, with the rows stored row-major (as jaxinfer stores them)
//     or blocked (a block's 8 rows interleaved 16 bytes at a time: one sequential stream), and software
//     prefetch 0, 1 or 2 row blocks ahead;
//   * the same bytes as SmolLM2's 120 calls a step, each call's row blocks shared by the caller and a
//     spinning helper: in contiguous halves, claimed one at a time, in runs of 4, in about 8, 2 or 1
//     runs a thread (8: jaxinfer's RunProblems), and in halves with the next call's first bytes
//     prefetched.
// Compare its figures with `scripts/benchmark_matmul.py --n 1 --paths native-int8` in the same hour:
// shared machines' memory speed varies by the hour (docs/PERFORMANCE.md).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <utility>
#include <vector>

namespace {

constexpr int kInputs = 576;
constexpr int kRepeats = 15;

__m256 Load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// Row blocks [b0, b1) of 8 rows against x; blocked: each block stored [input / 16][row][16].
// Prefetches stop at block `limit` (default b1).
void Gemv(const int8_t* w, const float* x, int64_t b0, int64_t b1, bool blocked, int prefetch, float* y,
          int inputs = kInputs, int64_t limit = -1) {
  if (limit < 0) limit = b1;
  for (int64_t b = b0; b < b1; ++b) {
    __m256 acc[8];
    for (auto& a : acc) a = _mm256_setzero_ps();
    const int8_t* block = w + b * 8 * inputs;
    const char* next = prefetch && b + prefetch < limit ? reinterpret_cast<const char*>(w + (b + prefetch) * 8 * inputs)
                                                     : nullptr;
    for (int k = 0; k < inputs; k += 16) {
      if (next) {  // 128 bytes of the block ahead per step: all of it over the block
        __builtin_prefetch(next + k / 16 * 128);
        __builtin_prefetch(next + k / 16 * 128 + 64);
      }
      const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
      for (int j = 0; j < 8; ++j) {
        const int8_t* p = blocked ? block + k / 16 * 128 + j * 16 : block + j * inputs + k;
        acc[j] = _mm256_fmadd_ps(x0, Load8(p), acc[j]);
        acc[j] = _mm256_fmadd_ps(x1, Load8(p + 8), acc[j]);
      }
    }
    for (int j = 0; j < 8; ++j) {
      float lanes[8];
      _mm256_storeu_ps(lanes, acc[j]);
      float sum = 0;
      for (float v : lanes) sum += v;
      y[b * 8 + j] = sum;
    }
  }
}

int64_t Sum(const int8_t* w, int64_t first, int64_t last) {
  __m256i s = _mm256_setzero_si256();
  for (int64_t i = first; i + 32 <= last; i += 32) {
    s = _mm256_add_epi8(s, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i)));
  }
  int64_t r[4];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(r), s);
  return r[0] + r[1] + r[2] + r[3];
}

// The median seconds of `kRepeats` runs of work(thread, threads) on `threads` threads.
template <typename Work>
double Median(int threads, Work work) {
  std::vector<double> times;
  for (int rep = 0; rep < kRepeats; ++rep) {
    const auto start = std::chrono::steady_clock::now();
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] { work(t, threads); });
    for (auto& th : pool) th.join();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

// One weight's one-token call: its row blocks of 8 rows, `inputs` long.
struct Call {
  const int8_t* w;
  int64_t blocks;
  int inputs;
};

// SmolLM2's 120 one-token calls a step, laid out one after another from w (per layer: q/k/v 960 rows,
// o 576, gate/up 3,072, all of 576 inputs; down 576 rows of 1,536).
std::vector<Call> SmolLM2Calls(const int8_t* w) {
  std::vector<Call> calls;
  int64_t at = 0;
  for (int layer = 0; layer < 30; ++layer) {
    for (auto [rows, inputs] : {std::pair{960, 576}, {576, 576}, {3072, 576}, {576, 1536}}) {
      calls.push_back({w + at, rows / 8, inputs});
      at += int64_t{rows} * inputs;
    }
  }
  return calls;
}

// The first `bytes` of this thread's share of `c` (contiguous halves), prefetched.
void PrefetchShare(const Call& c, int thread, int64_t bytes) {
  const char* p = reinterpret_cast<const char*>(c.w + (thread ? c.blocks / 2 : 0) * 8 * c.inputs);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b);
}

// Seconds a step of `calls`, each split between the caller and one helper thread that spins for work
// (the cheapest hand-off there is): `runs` 0 gives each thread one contiguous half of a call's row
// blocks (and with `ahead_bytes`, each thread then prefetches the start of its half of the next call),
// else blocks are claimed from a shared counter in runs of `runs` (negative: about -runs runs a thread).
double StepsAsCalls(const std::vector<Call>& calls, const float* x, float* y, int runs, int steps,
                    int64_t ahead_bytes = 0) {
  std::atomic<int64_t> generation{0}, next{0}, done{0};
  std::atomic<bool> stop{false};
  const Call* current = nullptr;
  auto share = [&](int thread) {
    const Call& c = *current;
    if (runs == 0) {
      const int64_t half = c.blocks / 2;
      Gemv(c.w, x, thread ? half : 0, thread ? c.blocks : half, false, 1, y, c.inputs);
      if (ahead_bytes) PrefetchShare(&c == &calls.back() ? calls.front() : (&c)[1], thread, ahead_bytes);
      return;
    }
    // runs < 0: about -runs runs a thread, as jaxinfer's RunProblems deals them (8), prefetching past a
    // run's end as its kernel does
    const int64_t length = runs > 0 ? runs : std::max<int64_t>(1, c.blocks / (2 * -runs));
    for (int64_t first; (first = next.fetch_add(length)) < c.blocks;) {
      Gemv(c.w, x, first, std::min(c.blocks, first + length), false, 1, y, c.inputs, runs > 0 ? -1 : c.blocks);
    }
  };
  std::thread helper([&] {
    for (int64_t seen = 0;;) {
      while (generation.load(std::memory_order_acquire) == seen) {
        if (stop.load()) return;
        _mm_pause();
      }
      ++seen;
      share(1);
      done.fetch_add(1, std::memory_order_release);
    }
  });
  const auto start = std::chrono::steady_clock::now();
  int64_t calls_done = 0;
  for (int step = 0; step < steps; ++step) {
    for (const Call& c : calls) {
      current = &c;
      next.store(0);
      generation.fetch_add(1, std::memory_order_release);
      share(0);
      ++calls_done;
      while (done.load(std::memory_order_acquire) != calls_done) _mm_pause();
    }
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  stop = true;
  helper.join();
  return s / steps;
}

}  // namespace

int main() {
  const int64_t blocks = (105l << 20) / (8 * kInputs), bytes = blocks * 8 * kInputs;
  auto* w = static_cast<int8_t*>(std::aligned_alloc(64, bytes));
  for (int64_t i = 0; i < bytes; ++i) w[i] = static_cast<int8_t>(i * 7);
  std::vector<float> x(kInputs, 0.5f), y(blocks * 8);
  volatile int64_t sink = 0;
  for (int threads : {1, 2}) {
    const double s = Median(threads, [&](int t, int n) { sink = sink + Sum(w, bytes * t / n, bytes * (t + 1) / n); });
    std::printf("plain int8 sum, %d thread(s)             %6.1f GB/s\n", threads, bytes / s / 1e9);
  }
  const int64_t l2_blocks = (512 << 10) / (8 * kInputs);
  double in_l2 = Median(1, [&](int, int) {
    for (int rep = 0; rep < 100; ++rep) Gemv(w, x.data(), 0, l2_blocks, false, 1, y.data());
  });
  std::printf("one-token GEMV in L2, 1 thread           %6.1f GB/s\n", 100.0 * l2_blocks * 8 * kInputs / in_l2 / 1e9);
  for (int threads : {1, 2}) {
    for (int prefetch : {0, 1, 2}) {
      for (bool blocked : {false, true}) {
        const double s = Median(threads, [&](int t, int n) {
          Gemv(w, x.data(), blocks * t / n, blocks * (t + 1) / n, blocked, prefetch, y.data());
        });
        std::printf("one-token GEMV, %d thread(s), prefetch %d, %-9s %6.1f GB/s\n", threads, prefetch,
                    blocked ? "blocked" : "row-major", bytes / s / 1e9);
      }
    }
  }
  const auto calls = SmolLM2Calls(w);
  int64_t step_bytes = 0;
  for (const Call& c : calls) step_bytes += c.blocks * 8 * c.inputs;
  const std::pair<int, const char*> splits[] = {
      {0, "contiguous halves"}, {1, "blocks one at a time"},         {4, "runs of 4 blocks"},
      {-8, "8 runs a thread (jaxinfer's)"}, {-2, "2 runs a thread"}, {-1, "1 run a thread (claimed)"}};
  for (const auto& [runs, label] : splits) {
    const double s = StepsAsCalls(calls, x.data(), y.data(), runs, 31);
    std::printf("SmolLM2's 120 calls a step, 2 threads, %-28s %6.1f GB/s (%.2f ms a step)\n", label,
                step_bytes / s / 1e9, s * 1e3);
  }
  for (int64_t ahead : {4 << 10, 16 << 10, 64 << 10}) {  // each thread's next share started early
    const double s = StepsAsCalls(calls, x.data(), y.data(), 0, 31, ahead);
    std::printf("SmolLM2's 120 calls a step, 2 threads, halves, next call's first %2ld KiB prefetched %6.1f GB/s (%.2f ms)\n",
                static_cast<long>(ahead >> 10), step_bytes / s / 1e9, s * 1e3);
  }
  std::free(w);
  return 0;
}
