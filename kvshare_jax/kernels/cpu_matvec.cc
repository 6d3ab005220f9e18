// Small-batch matrix-vector product for XLA:CPU, called through the XLA FFI.
//
//   y[m, :] = sum_k x[m, k] * w[k, :]      x [M, K], w [K, N], y [M, N], float32, M small
//
// Decode at batch 1 is bound by reading the weights. XLA:CPU splits a [1,K] x [K,N] dot
// over the output columns, so each thread reads short strided pieces of every weight row.
// Here the *rows* of w are split into contiguous chunks handed out through an atomic
// counter to the calling thread and this library's helper threads (class Helpers); each
// participant streams its chunks front to back into its own [M, N] partial sum, and the
// caller adds the partials. A helper that starts late finds no chunk left and returns
// without touching any buffer, so the caller only waits for chunks actually claimed.
// Built at first use by kvshare_jax/kernels/cpu_matvec.py (see there).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#ifdef __linux__
#include <sched.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v8 __attribute__((vector_size(32)));  // 8 lanes: AVX on x86, 2 x NEON on ARM

inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }

constexpr int64_t kMaxRows = 64;   // M at most this (the Python side routes larger M to XLA)
constexpr int kGroup = 8;          // rows of x per pass over a panel (M > 1)
constexpr int64_t kPanel = 256;    // columns per panel (M > 1): a group's sums stay in L1
constexpr int64_t kChunkRows = 64;  // weight rows per chunk (a multiple of 4)
// Smaller weights are read by the calling thread alone: waking a helper costs more than
// the product, and a helper that never gets a job never spins (small test models).
constexpr int64_t kParallelBytes = 256 << 10;

// acc[m, j0:j1] += sum_{k0 <= k < k1} x[m, k] * w[k, j0:j1], four weight rows per sweep
// (x, acc: rows of K and N floats; w: rows of N floats).
template <int M>
void Accumulate(const float* x, const float* w, float* acc, int64_t K, int64_t N, int64_t k0,
                int64_t k1, int64_t j0, int64_t j1) {
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {
    const float* r0 = w + k * N;
    const float* r1 = r0 + N;
    const float* r2 = r1 + N;
    const float* r3 = r2 + N;
    float c[M][4];
    for (int m = 0; m < M; ++m)
      for (int i = 0; i < 4; ++i) c[m][i] = x[m * K + k + i];
    int64_t j = j0;
    for (; j + 8 <= j1; j += 8) {
      v8 w0 = load8(r0 + j), w1 = load8(r1 + j), w2 = load8(r2 + j), w3 = load8(r3 + j);
      for (int m = 0; m < M; ++m) {
        float* a = acc + m * N + j;
        store8(a, load8(a) + c[m][0] * w0 + c[m][1] * w1 + c[m][2] * w2 + c[m][3] * w3);
      }
    }
    for (; j < j1; ++j)
      for (int m = 0; m < M; ++m)
        acc[m * N + j] += c[m][0] * r0[j] + c[m][1] * r1[j] + c[m][2] * r2[j] + c[m][3] * r3[j];
  }
  for (; k < k1; ++k) {
    const float* r = w + k * N;
    for (int m = 0; m < M; ++m) {
      const float c = x[m * K + k];
      for (int64_t j = j0; j < j1; ++j) acc[m * N + j] += c * r[j];
    }
  }
}

using AccumulateFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t,
                              int64_t, int64_t, int64_t);
constexpr AccumulateFn kAccumulate[kGroup + 1] = {
    nullptr,         Accumulate<1>, Accumulate<2>, Accumulate<3>, Accumulate<4>,
    Accumulate<5>, Accumulate<6>, Accumulate<7>, Accumulate<8>};

// acc[m, :] += sum_{k0 <= k < k1} x[m, k] * w[k, :] for all M rows. One row sweeps the
// weight rows whole (bound by reading them). More rows go panel by panel of kPanel
// columns, groups of kGroup rows each: a group's partial sums of a panel stay in L1
// while the chunk's weight rows stream through, instead of the whole [M, N] sums
// crossing the caches every four weight rows. (Measured on a Zen 3 core against a
// register-tiled kernel over packed weight panels, which was slower.)
void AccumulateRows(const float* x, const float* w, float* acc, int64_t M, int64_t K,
                    int64_t N, int64_t k0, int64_t k1) {
  if (M == 1) return Accumulate<1>(x, w, acc, K, N, k0, k1, 0, N);
  for (int64_t j0 = 0; j0 < N; j0 += kPanel)
    for (int64_t m0 = 0; m0 < M; m0 += kGroup)
      kAccumulate[std::min<int64_t>(kGroup, M - m0)](x + m0 * K, w, acc + m0 * N, K, N, k0,
                                                     k1, j0, std::min(N, j0 + kPanel));
}

// What the participants of one call share. Held by shared_ptr: a helper may pick a job
// up after its call returned; it then claims nothing and only touches this struct.
struct Work {
  const float* x;
  const float* w;
  int64_t M, K, N, rows, chunks;  // rows: weight rows per chunk
  std::vector<float*> partial;                // participant p's [M, N] partial sum
  std::unique_ptr<std::atomic<bool>[]> used;  // participant p claimed a chunk
  std::atomic<int64_t> next{0};               // next chunk to claim
  std::atomic<int64_t> done{0};               // chunks finished
};

// Claims and runs chunks until none is left.
void Participate(Work& work, int p) {
  for (int64_t c = work.next.fetch_add(1, std::memory_order_relaxed); c < work.chunks;
       c = work.next.fetch_add(1, std::memory_order_relaxed)) {
    if (!work.used[p].load(std::memory_order_relaxed)) {
      std::fill_n(work.partial[p], work.M * work.N, 0.0f);
      work.used[p].store(true, std::memory_order_relaxed);
    }
    const int64_t k0 = c * work.rows, k1 = std::min(work.K, k0 + work.rows);
    AccumulateRows(work.x, work.w, work.partial[p], work.M, work.K, work.N, k0, k1);
    work.done.fetch_add(1, std::memory_order_release);
  }
}

// One step of a busy wait: a few pause instructions, then sched_yield, so that a wait
// on a machine with more runnable threads than cores hands the core to them (a helper
// descheduled in the middle of its chunk, say) instead of burning the time slice.
inline void Relax(int& spins) {
  if (++spins < 64) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
  } else {
    std::this_thread::yield();
  }
}

// Helper threads (one fewer than the cores this process may use, or
// $KVSHARE_MATVEC_THREADS - 1). Decode calls the kernel every few tens of microseconds,
// so a helper spins for kSpin after a job (waking a sleeping thread costs about as long
// as a whole 1 MB product) and only then sleeps on a condition variable.
class Helpers {
 public:
  static Helpers& Get() {
    static Helpers* helpers = new Helpers();  // never destroyed: threads outlive exit
    return *helpers;
  }
  int size() const { return static_cast<int>(threads_.size()); }

  // Offers `work` to every helper; helper i is participant i + 1.
  void Publish(std::shared_ptr<Work> work) {
    std::atomic_store(&job_, std::move(work));
    epoch_.fetch_add(1);
    if (sleeping_.load() > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      cv_.notify_all();
    }
  }

 private:
  static constexpr auto kSpin = std::chrono::microseconds(300);

  Helpers() {
    int cores = static_cast<int>(std::thread::hardware_concurrency());
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) cores = CPU_COUNT(&set);
#endif
    if (const char* env = std::getenv("KVSHARE_MATVEC_THREADS")) cores = std::atoi(env);
    for (int i = 0; i < std::max(1, cores) - 1; ++i)
      threads_.emplace_back([this, i] { Loop(i + 1); });
    for (auto& t : threads_) t.detach();
  }

  void Loop(int p) {
    uint64_t seen = 0;
    for (;;) {
      auto start = std::chrono::steady_clock::now();
      for (int spins = 0; epoch_.load() == seen;) {
        if (std::chrono::steady_clock::now() - start < kSpin) {
          Relax(spins);
          continue;
        }
        std::unique_lock<std::mutex> lock(mu_);
        sleeping_.fetch_add(1);
        cv_.wait(lock, [&] { return epoch_.load() != seen; });
        sleeping_.fetch_sub(1);
      }
      seen = epoch_.load();
      std::shared_ptr<Work> work = std::atomic_load(&job_);
      if (work && p < static_cast<int>(work->partial.size())) Participate(*work, p);
    }
  }

  std::vector<std::thread> threads_;
  std::shared_ptr<Work> job_;
  std::atomic<uint64_t> epoch_{0};
  std::atomic<int> sleeping_{0};
  std::mutex mu_;
  std::condition_variable cv_;
};

ffi::Error MatvecImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0])
    return ffi::Error::InvalidArgument("kvshare_matvec: want x [M, K] and w [K, N]");
  const int64_t M = xd[0], K = xd[1], N = wd[1];
  if (M < 1 || M > kMaxRows)
    return ffi::Error::InvalidArgument("kvshare_matvec: M must be in [1, 64]");
  float* out = y->typed_data();

  Helpers& helpers = Helpers::Get();
  const int64_t rows = kChunkRows;
  const int64_t chunks = (K + rows - 1) / rows;
  const bool parallel = K * N * static_cast<int64_t>(sizeof(float)) >= kParallelBytes;
  const int64_t extra = parallel ? std::min<int64_t>(helpers.size(), chunks - 1) : 0;

  // Partial sums of the helpers; the caller accumulates straight into `out`.
  thread_local std::vector<float> scratch;
  const size_t need = static_cast<size_t>(extra * M * N);
  if (scratch.size() < need) scratch.resize(need);

  auto work = std::make_shared<Work>();
  work->x = x.typed_data();
  work->w = w.typed_data();
  work->M = M, work->K = K, work->N = N, work->rows = rows, work->chunks = chunks;
  work->partial.push_back(out);
  for (int64_t p = 0; p < extra; ++p) work->partial.push_back(scratch.data() + p * M * N);
  work->used.reset(new std::atomic<bool>[extra + 1]);
  for (int64_t p = 0; p <= extra; ++p) work->used[p].store(false);

  if (extra > 0) helpers.Publish(work);
  Participate(*work, 0);
  for (int spins = 0; work->done.load(std::memory_order_acquire) < chunks;) Relax(spins);

  if (!work->used[0].load(std::memory_order_relaxed)) std::fill_n(out, M * N, 0.0f);
  for (int64_t p = 1; p <= extra; ++p) {
    if (!work->used[p].load(std::memory_order_relaxed)) continue;
    const float* part = work->partial[p];
    for (int64_t i = 0; i < M * N; ++i) out[i] += part[i];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KvshareMatvec, MatvecImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
