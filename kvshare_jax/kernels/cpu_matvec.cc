// Few-row matrix products for XLA:CPU decode, called through the XLA FFI.
//
//   y[m, :] = sum_k x[m, k] * w[k, :]      x [M, K], w [K, N], y [M, N], float32, M small
//
// Up to 8 rows (batch-1 and small-batch decode) are bound by reading the weights. XLA:CPU
// splits a [1,K] x [K,N] dot over the output columns, so each thread reads short strided
// pieces of every weight row. Here the *rows* of w are split into contiguous chunks handed
// out through an atomic counter to the calling thread and this library's helper threads
// (class Helpers); each participant streams its chunks front to back into its own [M, N]
// partial sum (Sweep), and the caller adds the partials. More rows are bound by the FMA
// units: the *columns* are split into chunks, each computed in place by register-blocked
// tiles (ProductColumns). A helper that starts late finds no chunk left and returns
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
constexpr int64_t kChunkRows = 64;      // sweeps: weight rows per chunk (a multiple of 4)
constexpr int64_t kChunkColumns = 128;  // tiles: columns per chunk (a multiple of 16)
// Smaller weights are read by the calling thread alone: waking a helper costs more than
// the product, and a helper that never gets a job never spins (small test models).
constexpr int64_t kParallelBytes = 256 << 10;

// Up to kSweepRows rows: acc[m, :] += sum_{k0 <= k < k1} x[m, k] * w[k, :], four weight
// rows per sweep across all N columns, so the weights are read front to back (x, acc:
// rows of K and N floats). Bound by reading the weights: with few rows this beats the
// tiles below, whose strips walk the weights down their columns.
template <int M>
void Sweep(const float* x, const float* w, float* acc, int64_t K, int64_t N, int64_t k0,
           int64_t k1) {
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {
    const float* r0 = w + k * N;
    const float* r1 = r0 + N;
    const float* r2 = r1 + N;
    const float* r3 = r2 + N;
    float c[M][4];
    for (int m = 0; m < M; ++m)
      for (int i = 0; i < 4; ++i) c[m][i] = x[m * K + k + i];
    int64_t j = 0;
    for (; j + 8 <= N; j += 8) {
      v8 w0 = load8(r0 + j), w1 = load8(r1 + j), w2 = load8(r2 + j), w3 = load8(r3 + j);
      for (int m = 0; m < M; ++m) {
        float* a = acc + m * N + j;
        store8(a, load8(a) + c[m][0] * w0 + c[m][1] * w1 + c[m][2] * w2 + c[m][3] * w3);
      }
    }
    for (; j < N; ++j)
      for (int m = 0; m < M; ++m)
        acc[m * N + j] += c[m][0] * r0[j] + c[m][1] * r1[j] + c[m][2] * r2[j] + c[m][3] * r3[j];
  }
  for (; k < k1; ++k) {
    const float* r = w + k * N;
    for (int m = 0; m < M; ++m) {
      const float c = x[m * K + k];
      for (int64_t j = 0; j < N; ++j) acc[m * N + j] += c * r[j];
    }
  }
}

using SweepFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t);
constexpr int kSweepRows = 8;
constexpr SweepFn kSweep[kSweepRows + 1] = {nullptr,  Sweep<1>, Sweep<2>, Sweep<3>, Sweep<4>,
                                            Sweep<5>, Sweep<6>, Sweep<7>, Sweep<8>};

// More rows (M > kSweepRows): y[:, j0:j1] for a range of columns, register-blocked. A
// micro-tile of R rows x 16 columns keeps its R x 2 vector sums in registers over a
// block of kKBlock weight rows: per weight row it loads two vectors and broadcasts R
// inputs for 2R fused multiply-adds, so the loop runs at the FMA units' pace instead of
// the load/store traffic of summing into memory. All row blocks of a call pass over the
// same 16-column strip of the weights, which the first one read from memory; the next
// strip is prefetched meanwhile (see ProductColumns). Weights stay in their [K, N]
// layout: no packing per call or at load.
template <int R, int V>  // R rows, V vectors of 8 columns
void Tile(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t k0,
          int64_t k1, bool add, const float* next, int64_t every) {
  v8 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = add ? load8(y + r * N + 8 * v) : v8{};
  const float* wk = w + k0 * N;
  int64_t countdown = 1;
  for (int64_t k = k0; k < k1; ++k, wk += N) {
    if (next && --countdown == 0) {  // one row of the next strip every `every` rows
      __builtin_prefetch(next);
      next += every * N;
      countdown = every;
    }
    v8 b[V];
    for (int v = 0; v < V; ++v) b[v] = load8(wk + 8 * v);
    for (int r = 0; r < R; ++r) {
      const float c = x[r * K + k];
      for (int v = 0; v < V; ++v) acc[r][v] += c * b[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) store8(y + r * N + 8 * v, acc[r][v]);
}

using TileFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t,
                        bool, const float*, int64_t);
constexpr int kTileRows = 6;  // 6 x 2 sums + 2 weight vectors + 1 broadcast: 15 registers
constexpr TileFn kTile16[kTileRows + 1] = {nullptr,     Tile<1, 2>, Tile<2, 2>, Tile<3, 2>,
                                           Tile<4, 2>, Tile<5, 2>, Tile<6, 2>};
constexpr TileFn kTile8[kTileRows + 1] = {nullptr,    Tile<1, 1>, Tile<2, 1>, Tile<3, 1>,
                                          Tile<4, 1>, Tile<5, 1>, Tile<6, 1>};
constexpr int64_t kKBlock = 256;  // weight rows per pass: a strip of 16 columns is 16 KB

// y[m, j0:j1] = sum_k x[m, k] * w[k, j0:j1] for all M rows. Rows go in blocks of
// at most kTileRows, as even as possible (8 rows: 4 + 4, 32 rows: 6 6 5 5 5 5). While the
// blocks of a strip compute, they prefetch the next strip between them (block b its rows
// b, b + blocks, ...), so reading the weights from memory overlaps all of the compute.
void ProductColumns(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N,
                    int64_t j0, int64_t j1) {
  const int64_t blocks = (M + kTileRows - 1) / kTileRows;
  for (int64_t k0 = 0; k0 < K; k0 += kKBlock) {
    const int64_t k1 = std::min(K, k0 + kKBlock);
    const bool add = k0 > 0;
    auto strip = [&](const TileFn* tiles, int64_t j, const float* next) {
      for (int64_t b = 0, m0 = 0; b < blocks; ++b) {
        const int64_t rows = (M - m0) / (blocks - b);
        const float* ahead = next && b < k1 - k0 ? next + b * N : nullptr;
        tiles[rows](x + m0 * K, w + j, y + m0 * N + j, K, N, k0, k1, add, ahead, blocks);
        m0 += rows;
      }
    };
    int64_t j = j0;
    for (; j + 16 <= j1; j += 16) {  // the next strip: this k block's, else the next one's
      const bool last = j + 32 > j1;
      const float* next = !last ? w + k0 * N + j + 16 : k1 < K ? w + k1 * N + j0 : nullptr;
      strip(kTile16, j, next);
    }
    for (; j + 8 <= j1; j += 8) strip(kTile8, j, nullptr);
    for (; j < j1; ++j)
      for (int64_t m = 0; m < M; ++m) {
        float s = add ? y[m * N + j] : 0.0f;
        for (int64_t k = k0; k < k1; ++k) s += x[m * K + k] * w[k * N + j];
        y[m * N + j] = s;
      }
  }
}

// What the participants of one call share. Held by shared_ptr: a helper may pick a job
// up after its call returned; it then claims nothing and only touches this struct.
// Sweeps (M <= kSweepRows): chunk c is weight rows [c * span, ...) summed into participant
// p's own [M, N] partial sum. Tiles: chunk c is columns [c * span, ...) of y, in place.
struct Work {
  const float* x;
  const float* w;
  float* y;
  int64_t M, K, N, span, chunks;
  std::vector<float*> partial;                // sweeps: participant p's [M, N] partial sum
  std::unique_ptr<std::atomic<bool>[]> used;  // participant p claimed a chunk
  std::atomic<int64_t> next{0};               // next chunk to claim
  std::atomic<int64_t> done{0};               // chunks finished
};

// Claims and runs chunks until none is left.
void Participate(Work& work, int p) {
  for (int64_t c = work.next.fetch_add(1, std::memory_order_relaxed); c < work.chunks;
       c = work.next.fetch_add(1, std::memory_order_relaxed)) {
    const int64_t lo = c * work.span;
    if (work.M > kSweepRows) {
      ProductColumns(work.x, work.w, work.y, work.M, work.K, work.N, lo,
                     std::min(work.N, lo + work.span));
    } else {
      if (!work.used[p].load(std::memory_order_relaxed)) {
        std::fill_n(work.partial[p], work.M * work.N, 0.0f);
        work.used[p].store(true, std::memory_order_relaxed);
      }
      kSweep[work.M](work.x, work.w, work.partial[p], work.K, work.N, lo,
                     std::min(work.K, lo + work.span));
    }
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

// y [M, N] = x [M, K] @ w [K, N] on the calling thread and the helpers.
void Product(const float* x, const float* w, float* out, int64_t M, int64_t K, int64_t N) {
  Helpers& helpers = Helpers::Get();
  const bool tiles = M > kSweepRows;  // tiles split the columns, sweeps the weight rows
  const int64_t span = tiles ? kChunkColumns : kChunkRows;
  const int64_t chunks = ((tiles ? N : K) + span - 1) / span;
  const bool parallel = K * N * static_cast<int64_t>(sizeof(float)) >= kParallelBytes;
  const int64_t extra = parallel ? std::min<int64_t>(helpers.size(), chunks - 1) : 0;

  // Sweeps: partial sums of the helpers; the caller accumulates straight into `out`.
  thread_local std::vector<float> scratch;
  const size_t need = tiles ? 0 : static_cast<size_t>(extra * M * N);
  if (scratch.size() < need) scratch.resize(need);

  auto work = std::make_shared<Work>();
  work->x = x;
  work->w = w;
  work->y = out;
  work->M = M, work->K = K, work->N = N, work->span = span, work->chunks = chunks;
  work->partial.push_back(out);
  for (int64_t p = 0; p < extra; ++p)
    work->partial.push_back(tiles ? nullptr : scratch.data() + p * M * N);
  work->used.reset(new std::atomic<bool>[extra + 1]);
  for (int64_t p = 0; p <= extra; ++p) work->used[p].store(false);

  if (extra > 0) helpers.Publish(work);
  Participate(*work, 0);
  for (int spins = 0; work->done.load(std::memory_order_acquire) < chunks;) Relax(spins);
  if (tiles) return;

  if (!work->used[0].load(std::memory_order_relaxed)) std::fill_n(out, M * N, 0.0f);
  for (int64_t p = 1; p <= extra; ++p) {
    if (!work->used[p].load(std::memory_order_relaxed)) continue;
    const float* part = work->partial[p];
    for (int64_t i = 0; i < M * N; ++i) out[i] += part[i];
  }
}

ffi::Error MatvecImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0])
    return ffi::Error::InvalidArgument("kvshare_matvec: want x [M, K] and w [K, N]");
  const int64_t M = xd[0], K = xd[1], N = wd[1];
  if (M < 1 || M > kMaxRows)
    return ffi::Error::InvalidArgument("kvshare_matvec: M must be in [1, 64]");
  Product(x.typed_data(), w.typed_data(), y->typed_data(), M, K, N);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KvshareMatvec, MatvecImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
