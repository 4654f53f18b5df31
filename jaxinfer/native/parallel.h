// Work shared between the calling thread and XLA's intra-op thread pool (the FFI's ThreadPool
// context), used by every native kernel here.
//
// Items are claimed from an atomic counter, so the caller never waits for a task that has not started
// (a pool thread may be busy elsewhere, or be the caller itself); it only waits for items already
// claimed. They are claimed in runs of `run_length` consecutive items, so a kernel that prefetches the
// next item's data can prefetch it for the core that will read it. The state outlives the call for late
// tasks, which find no items left and return without touching the kernel's buffers.
//
// When the caller runs out of items it spins for up to kSpinWait before it sleeps on the condition
// variable: the items still running on helpers are mostly a few microseconds from done, and a futex
// sleep and wake-up cost more than that on a VM. Measured on the 2-core AVX2 EPYC (2026-12-01), one-token
// int8 calls of SmolLM2's shapes in a chain of 60 distinct weights: 12-19% less time per call.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace jaxinfer {

struct SharedWork {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;
};

inline constexpr std::chrono::microseconds kSpinWait{50};

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Runs body(item) for item in [0, items) on the caller plus at most `helpers` pool threads.
template <typename Body>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t items, int64_t helpers, Body body, int64_t run_length = 1) {
  if (items <= 0) return;
  helpers = std::clamp<int64_t>(helpers, 0, std::min<int64_t>(pool.num_threads(), items - 1));
  if (helpers == 0) {
    for (int64_t i = 0; i < items; ++i) body(i);
    return;
  }
  run_length = std::max<int64_t>(run_length, 1);
  auto run = [items, run_length, body](SharedWork* st) {
    int64_t finished = 0;
    for (int64_t first; (first = st->next.fetch_add(run_length)) < items;) {
      const int64_t last = std::min(items, first + run_length);
      for (int64_t i = first; i < last; ++i) body(i);
      finished += last - first;
    }
    if (finished && st->done.fetch_add(finished) + finished == items) {
      std::lock_guard<std::mutex> lock(st->mu);
      st->cv.notify_all();
    }
  };
  auto state = std::make_shared<SharedWork>();
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state, run] { run(state.get()); });
  run(state.get());
  auto all_done = [&] { return state->done.load(std::memory_order_acquire) == items; };
  const auto spin_until = std::chrono::steady_clock::now() + kSpinWait;
  while (!all_done() && std::chrono::steady_clock::now() < spin_until) CpuRelax();
  if (all_done()) return;
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, all_done);
}

}  // namespace jaxinfer
