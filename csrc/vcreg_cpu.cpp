// The `cpu` backend: CPU kernels of vcreg::backward_kernel, vcreg::stats_kernel,
// vcreg::apply_kernel and the VICReg loss's pair kernels vcreg::pair_stats_kernel and
// vcreg::pair_apply_kernel, whose schemas are defined once in vcreg_kernels/_ops.py and whose exact
// semantics are those of vcreg_kernels/reference.py.
//
// Inputs are the canonical tensors of vcreg_kernels/_layout.py, x3 and grad_y3: (B, d, L), samples
// s = (b, l), n = B * L, X (n x d) the activation flattened along its feature dimension:
//   "rows": L == 1, strides (d, 1, 1): X is x3 as a row-major matrix
//           (x: (N, T, d) with dim=-1, or x: (N, C, H, W) channels_last with dim=1);
//   "bdl":  contiguous, L > 1: slab b is the d x L matrix X_b^T (x: (N, C, H, W) with dim=1, L = H*W).
// Both are contiguous (B, d, L) tensors (vcreg_common.h checks); so is grad_x3.
//
//   stats_kernel(x3)              -> mu = X^T 1 / n  (d),  M2 = Xc^T Xc  (d x d),  Xc = X - 1 mu^T
//   apply_kernel(gy3, x3, G, mu)  -> grad_x3 = grad_y3 + (X - 1 mu^T) G   (G: d x d)
//   backward_kernel(gy3, x3, ...) -> C = M2 / (n-1); G and (l_var, l_cov) of SPEC section 2 from C
//                                    (in float64); grad_x3 = grad_y3 + Xc G.
// and for two branches za3, zb3 of one shape and dtype (the VICReg loss, SPEC section 9), Z_a, Z_b
// their rows:
//   pair_stats_kernel(za3, zb3)   -> (mu_a, M2_a, mu_b, M2_b, sum (Z_a - Z_b)^2)
//   pair_apply_kernel(g, za3, zb3, G_a, mu_a, G_b, mu_b, c)
//                                 -> grad_a3 = g (c (Z_a - Z_b) + (Z_a - 1 mu_a^T) G_a),
//                                    grad_b3 = g (c (Z_b - Z_a) + (Z_b - 1 mu_b^T) G_b)   (g, c: 0-dim)
// mu, M2, the terms and the invariance sum are returned in the accumulate dtype (float64 for
// float64 input, else float32); grad_x3 in grad_y3's dtype, the pair's gradients in z's.
//
// Numerics (SPEC section 2). Every product runs on shifted data X - 1 K^T, K the mean of 64
// samples (4 runs of 16 spread over X), subtracted in the accumulate dtype before any product:
//   S = (X - 1 K^T)^T 1  (float64),  mu = K + S / n,  Q = (X - 1 K^T)^T (X - 1 K^T),  M2 = Q - S S^T / n,
// which is Chan's merge with one shared shift; with K within a few std of mu no float32 product
// sees the mean, so |mu|/std = 1000 costs nothing. Where X is gathered whole (panel and dual
// plans), its columns are centred as well, by m = S / n rounded to the accumulate dtype, while
// they are in cache: Q is then M2 itself, and the apply multiplies the same centred panel, the
// rounding of m being below float32's rounding of the centred values. Elsewhere each product
// covers one gathered panel and Q sums them in float64; the apply gathers X - 1 K'^T again with
// K' = mu rounded to the accumulate dtype and subtracts the rounding's image (mu - K') G, a
// d-vector in float64.
//
// Operands (SPEC section 2's precision table). float32 and float64 input multiply in their own
// dtype. bfloat16 input multiplies bfloat16 operands where the CPU multiplies bfloat16 natively
// (AVX512-BF16 or AMX, through MKL's gemm_bf16bf16f32; bf16_products): the shifted or centred
// values and G, each formed in float32 and rounded once to bfloat16, with float32 products and
// sums; the dual plan then runs in float32, and only where n <= d / 2 (vcreg_backward_cpu says
// why). float16 input, and bfloat16 on other CPUs, multiply in float32. On the same CPUs the
// bfloat16 gathers and gradient writes run as AVX-512 loops (avx512_bf16_loops), bitwise equal to
// the portable ones that ATEN_CPU_CAPABILITY=default selects (NaN payloads and float32 subnormals
// aside). On CPUs with AVX-512 (avx512_float32), float32 input with d <= kFusedMaxFeatures takes
// two kernels of ours instead of the BLAS: in "bdl", the apply (panel, grouped and streamed plans,
// apply_kernel) as one pass of FMAs (fused_apply: x, or the centred panel, and grad_y read and
// grad_x written tile by tile, each value one FMA chain over the features in order) where there
// were a gather, a BLAS product and an add; and the Gram products of the panel and grouped plans
// (and the dual plan's in "rows", the pair statistics') as dot products over the samples
// (gram_dots), in passes over at most kDotsPanelBytes of the panel. The d x d passes' loops (G's
// elements, the mirrored halves) take AVX-512 forms there too, bitwise equal to the portable ones.
//
// Plans, chosen by n, d and whether delta is set (never by the thread count):
//   dual (backward_kernel; delta None, n <= d, X within kPanelMaxBytes). Without a clip G is M2
//     scaled off its diagonal: G = kappa M2 + diag(h), kappa = 4 beta / (d (d-1) (n-1)^2),
//     h = diag(G) - kappa diag(M2), so with A = Xc Xc^T (n x n)
//       Xc G = kappa A Xc + Xc diag(h),   ||M2||_F = ||A||_F  (l_cov),   diag(M2) = column norms,
//     about 3 n^2 d flops instead of 3 n d^2, and no d x d matrix at all. l_cov subtracts the
//     diagonal's sum of squares from ||A||_F^2; with n <= d the off-diagonal part is at least
//     about as large for uncorrelated features, so the subtraction costs at most a bit or two.
//   panel (X within kPanelMaxBytes; d >= 128, or n not large against d): one centred panel of
//     every sample; each row block of Q's upper triangle is one BLAS product over all samples
//     straight into the accumulate dtype (no float64 accumulators: one product covers every
//     sample); G in one d x d pass; the apply multiplies the same panel by G.
//   grouped (n >= 16 max(512, 2d) with d < 128, or d <= 256 past kPanelMaxBytes): 16 fixed sample
//     ranges, each gathering its samples panel by panel into its own buffer (in L2) and adding the
//     row blocks of Q's upper triangle over that panel into its own float64 accumulator (too few
//     blocks to keep two threads busy: the samples are split instead); the apply gathers again,
//     panel by panel.
//   streamed (the rest: X past kPanelMaxBytes): X gathered in super-panels of ~8 MiB by parallel
//     chunks, whose (sample group x upper tile) products go into float64 accumulators; apply as
//     grouped.
//
// Pair kernels: one pass over each branch for the statistics, one pass writing both gradients.
//   pair_stats, where the panel plan applies and both panels together are within kPanelMaxBytes:
//     both branches' centred panels from one parallel gather that reads each value once from
//     memory and also sums (Z_a - Z_b)^2 in the accumulate dtype (as the column sums: kSumBlock
//     values per partial sum, then float64, features added in order); the Gram products of both
//     branches in one parallel region, straight into the returned M2s. Elsewhere each branch
//     takes its own plan (one panel, reused) and the invariance sum is one more pass over fixed
//     chunks: with two 19.7 MB panels at once the pair statistics took 41.5 ms against 35.7 (bdl,
//     128 x 768 x 50; the same in rows, 6400 x 768).
//   pair_apply: both branches gathered as X - 1 K'^T (K' = mu rounded to the accumulate dtype;
//     the rounding's image corrected as in the apply above, and not computed where mu is in the
//     accumulate dtype already, as the loss passes it), every sample at once where both panels
//     are within kPanelMaxBytes, else in super-panels of that size. Tasks: (column block of G x
//     sample block) products of both branches, each writing both gradients from one read of
//     both branches' values, the difference formed in the accumulate dtype and multiplied by g
//     before the rounding to z's dtype; no n x d temporary but the panels' scratch. Blocks of up
//     to kPairFeatures columns against up to kPairSamples samples, not all of G against fewer
//     samples: MKL's product of 128 rows by an 8192 x 8192 G ran at 0.6 of the rate of 256 rows
//     by 256 columns of it (one thread).
//
// Work split: tasks fixed by the shape (n, d, layout) and the plan only, so results are bitwise
// the same run to run and for any number of threads; the threads claim them one at a time
// (parallel_tasks), within one parallel region for the whole of backward_kernel (Team: its phases
// would otherwise open a region each, and sleeping OpenMP workers wake up for each). Each feature's
// sums come from one task; every product is one BLAS call of a fixed shape on one thread
// (SingleThreadBlas: MKL would cut a product's inner dimension by its thread count), or in the fused
// apply one FMA chain per value, whatever the tiling; accumulators
// and partial sums are added in a fixed order (sample groups, tiles, chunks). Panel and dual Gram
// products: row blocks I and nb-1-I of the triangle make one task, of equal work (per branch in
// pair_stats); their applies: (feature block x sample block) products, whole rows in the "rows"
// layout. The d x d and n x n passes: fixed 64 x 64 tiles, in parallel from 256 on.
// Temporaries (the panel, up to kPanelMaxBytes, the pair kernels' two panels within it together;
// a d x d or n x n matrix) are per-thread scratch reused across calls. grad_x (backward_kernel,
// apply_kernel) takes the memory of an earlier grad_x of the same size where one has been freed
// (OutputPool: at most kOutputPoolBlocks blocks, kOutputPoolBytes in all, wait there), so that
// the apply's stores do not fault in and zero fresh pages (measured with getrusage's minor
// faults in bench/cpu_ratios' interleaving: 200-800 faults a call at (B, 96, 56, 56) without it).
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <deque>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "vcreg_common.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <cpuid.h>
#endif
// The AVX-512 code (avx512_bf16_loops, avx512_float32 below) needs a compiler that knows AVX512-BF16.
#if defined(__x86_64__) && ((defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10))
#define VCREG_AVX512 1
#include <immintrin.h>
#else
#define VCREG_AVX512 0
#endif

namespace vcreg {
namespace {

// Tuning constants. None depends on the thread count (see the work split above).
constexpr int64_t kShiftRuns = 4;                  // the shift K: runs of consecutive samples spread over X
constexpr int64_t kShiftRunLength = 16;            //   ... each this long
constexpr int64_t kSumBlock = 256;                 // values per float32 partial column sum
constexpr int64_t kPanelMaxBytes = 32 << 20;       // panel, dual: the largest shifted copy of X kept whole
constexpr int64_t kMinPanelWidth = 128;            // panel: narrower Q leaves too thin row blocks
constexpr int64_t kBlock = 256;                    // panel, dual: Gram row-block width
constexpr int64_t kMinBlocks = 4;                  // panel, dual: row blocks, paired into >= 2 equal tasks
constexpr int64_t kGatherFeatures = 32;            // panel, dual: features per gather task ("bdl")
constexpr int64_t kGatherRowFeatures = 128;        //   ... ("rows": a row's run of them)
constexpr int64_t kSuperPanelBytes = 8 << 20;      // streamed: shifted X gathered per round; fits L3
constexpr int64_t kGroups = 16;                    // grouped: parallel tasks, each a range of samples
constexpr int64_t kGroupPanelBytes = 512 << 10;    // grouped: gathered panel per task; fits L2
constexpr int64_t kGroupAccBytes = 8 << 20;        // grouped: all float64 accumulators together
constexpr int64_t kGatherChunk = 1024;             // streamed: samples per gather task
constexpr int64_t kTile = 96;                      // grouped, streamed: Gram row-block / tile width
constexpr int64_t kMinSplitWidth = 96;             // from here on even two blocks beat one square product
constexpr int64_t kMinGramItems = 16;              // streamed: tiles x sample groups per super-panel
constexpr int64_t kMinGroupSamples = 128;          // the shortest product worth one BLAS call
constexpr int64_t kApplyPanelBytes = 256 << 10;    // apply (gathered): product block; stays in L2
constexpr int64_t kApplyBlockBytes = 1 << 20;      // apply (panel, dual): product block, float32 operands
constexpr int64_t kApplyBlockBytes16 = 256 << 10;  //   ... bfloat16 operands
constexpr int64_t kApplyPanelSamples = 512;        // apply (gathered): panel length for large d
constexpr int64_t kApplyPanelMaxBytes = 4 << 20;   // apply (gathered): panel cap for very large d
constexpr int64_t kMinApplyPanelSamples = 256;     // apply (gathered): shortest panel worth rounding the count for
constexpr int64_t kApplyPanelMultiple = 8;         // apply (gathered): panel count splits evenly over 1, 2, 4, 8 threads
constexpr int64_t kMinApplyTasks = 4;              // apply (panel, dual): fewest products
constexpr int64_t kMinApplySamples = 128;          // apply (panel, dual): shortest sample block
constexpr int64_t kFusedSamples = 384;             // fused apply: samples per task, a run of one slab
constexpr int64_t kFusedMaxFeatures = 192;         // fused apply (float32, bdl), gram_dots: widest d they serve
constexpr int64_t kDotsPanelBytes = 1 << 20;       // gram_dots: rows x samples per pass; stay in L2
constexpr int64_t kPairFeatures = 512;             // pair apply: widest feature block (G's columns) per product
constexpr int64_t kPairSamples = 512;              // pair apply: longest sample block per product
constexpr int64_t kGatherRows = 16;                // pair apply ("rows"): samples per gather task
constexpr int64_t kInvarianceChunk = 1 << 16;      // pair stats (grouped, streamed): values per invariance task
constexpr int64_t kRoundChunk = 1 << 16;          // G rounded to bfloat16: values per parallel task
constexpr int64_t kPassTile = 64;                  // d x d and n x n passes: tile width
constexpr int64_t kRowGrain = 256;                 // d x d and n x n passes: from this size on in parallel
constexpr size_t kOutputPoolBlocks = 4;            // grad_x memory kept for later calls: at most this many blocks
constexpr size_t kOutputPoolBytes = 128 << 20;     //   ... and this many bytes

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Scratch memory kept per calling thread and reused by later calls. The temporaries are a few MiB;
// allocated afresh on each call they fragment the heap so that grad_x often lands on fresh pages,
// which the kernel then faults in and zeroes (~1 ms for a 10 MB gradient, as much as a product).
enum class Scratch { kGramAcc, kGramPanel, kGramProd, kG, kApply, kOperandG, kPackedG, kFusedTile, kCount };

void* scratch_bytes(Scratch slot, int64_t bytes) {
  thread_local at::Tensor buffers[static_cast<int>(Scratch::kCount)];
  at::Tensor& b = buffers[static_cast<int>(slot)];
  if (!b.defined() || b.nbytes() < static_cast<size_t>(bytes)) b = at::empty({bytes}, at::kByte);
  return b.mutable_data_ptr();
}

template <typename T>
T* scratch(Scratch slot, int64_t count) {
  return static_cast<T*>(scratch_bytes(slot, count * static_cast<int64_t>(sizeof(T))));
}

// grad_x's memory, kept for a later call of the same size. A fresh n x d gradient often lands on
// pages that glibc has just handed back to the system (a trimmed heap top, or an mmap of its own,
// depending on what the caller allocated and freed in between), which the apply's stores then
// fault in and the system zeroes: about 0.5 ms for the 4.8 MB of (4, 96, 56, 56) against a 2.1 ms
// BLAS floor. A block comes back here when its tensor is freed (on any thread) and waits, up to
// kOutputPoolBlocks blocks and kOutputPoolBytes in all, the least recently freed dropped first.
// Hand-outs and returns are reported to the profiler as the CPU allocator's are, so that memory
// profiles count grad_x as before.
class OutputPool final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    void* p = nullptr;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->bytes == bytes) {
          p = it->ptr;
          cached_ -= bytes;
          free_.erase(it);
          break;
        }
      }
      live_ += bytes;
    }
    if (p == nullptr) p = c10::alloc_cpu(bytes);
    report(p, static_cast<int64_t>(bytes));
    return {p, new Block{this, p, bytes}, &OutputPool::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Block {
    OutputPool* pool;
    void* ptr;
    size_t bytes;
  };

  static void release(void* ctx) {
    const std::unique_ptr<Block> b(static_cast<Block*>(ctx));
    b->pool->give_back(b->ptr, b->bytes);
  }

  void give_back(void* p, size_t bytes) {
    std::vector<void*> dropped;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      live_ -= bytes;
      free_.push_front(Block{this, p, bytes});
      cached_ += bytes;
      while (free_.size() > kOutputPoolBlocks || cached_ > kOutputPoolBytes) {
        dropped.push_back(free_.back().ptr);
        cached_ -= free_.back().bytes;
        free_.pop_back();
      }
    }
    report(p, -static_cast<int64_t>(bytes));
    for (void* q : dropped) c10::free_cpu(q);
  }

  void report(void* p, int64_t delta) const {
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(p, delta, live_, live_ + cached_, c10::Device(c10::DeviceType::CPU));
    }
  }

  std::mutex mutex_;
  std::deque<Block> free_;  // most recently freed first
  size_t cached_ = 0, live_ = 0;
};

// A contiguous CPU tensor on the pool's memory. The pool is never destroyed: tensors may be freed
// after static destruction.
at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype) {
  static OutputPool* pool = new OutputPool();
  return at::Tensor(at::detail::empty_generic(sizes, pool, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                              std::nullopt));
}

struct Shape {
  int64_t d, L, n;
  bool rows() const { return L == 1; }
};

Shape shape_of(const at::Tensor& x3) { return {x3.size(1), x3.size(2), x3.size(0) * x3.size(2)}; }

// MKL may cut a product's inner (sample) dimension by the number of threads it is allowed, which
// changes the order of its sums: a task's product must then not depend on that number, nor on
// whether the task runs inside a parallel region (an inline task may get every thread). Each
// task holding this guard runs its products on one thread. MKL_Set_Num_Threads_Local (the C entry
// point that mkl_service.h's mkl_set_num_threads_local names; the lowercase symbol is Fortran's,
// taking a pointer) is thread-local and restored on exit; it comes with torch's MKL builds (x86),
// and where it is absent (weak symbol, null) the BLAS is left as it is.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

class SingleThreadBlas {
 public:
  SingleThreadBlas() : previous_(MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SingleThreadBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous_);
  }
  SingleThreadBlas(const SingleThreadBlas&) = delete;
  SingleThreadBlas& operator=(const SingleThreadBlas&) = delete;

 private:
  int previous_;  // 0: the thread had no local setting (MKL then follows the global one)
};

// One parallel region for a whole kernel call: Team::run(body) runs body on one thread (the team's
// lead, the one that runs the first chunk) inside one at::parallel_for region, whose other threads
// wait, spinning, for the lead's parallel_tasks to post work. A kernel of several parallel phases
// would otherwise open a region per phase, and where the OpenMP workers sleep between regions
// (OMP_WAIT_POLICY=PASSIVE, as bench/report.py runs, or a long wait) each region pays their wake-up:
// at (4, 384, 14, 14) the backward took 1.77 ms with spinning workers and 2.00 with sleeping ones
// in its 4 regions, and 1.72 to 1.76 with sleeping ones in one (2-core Xeon VM; the two BLAS
// products of the same shapes, 1.79). While the lead runs serial code the others spin for about
// 0.1 ms, then yield between checks. A job is published as one 64-bit word (job number, task
// count, next task) that every thread claims from by compare-and-swap, so that no thread can take
// a task of a job that has ended; the lead returns from a job when all its tasks are done.
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

class Team {
 public:
  template <typename Body>
  static void run(const Body& body) {
    if (current_ != nullptr || at::in_parallel_region() || at::get_num_threads() < 2) return body();
    Team team;
    std::exception_ptr error;
    const int nthreads = at::get_num_threads();
    at::parallel_for(0, nthreads, 1, [&](int64_t begin, int64_t) {
      if (begin != 0) return team.serve();  // the lead: the thread that runs the first chunk
      // The kernels size per-thread scratch by at::get_num_threads() and index it by
      // at::get_thread_num(): inside the region the count must still be the team's bound.
      if (at::get_num_threads() >= nthreads) current_ = &team;
      try {
        body();
      } catch (...) {
        error = std::current_exception();
      }
      current_ = nullptr;
      team.word_.store(kExit, std::memory_order_release);
    });
    if (error) std::rethrow_exception(error);
  }

  // The team the calling thread leads and can post a job to: none inside a task of the team's.
  static Team* led() { return current_ != nullptr && !current_->in_job_ ? current_ : nullptr; }

  // f(task) for every task in [0, ntasks), on the team's threads; returns when all are done.
  template <typename F>
  void tasks(int64_t ntasks, const F& f) {
    TORCH_INTERNAL_ASSERT(ntasks < static_cast<int64_t>(kMask));
    fn_ = [](const void* ctx, int64_t q) { (*static_cast<const F*>(ctx))(q); };
    ctx_ = &f;
    done_.store(0, std::memory_order_relaxed);
    job_ = (job_ + 1) & kMask;
    word_.store(job_ << (2 * kBits) | static_cast<uint64_t>(ntasks) << kBits, std::memory_order_release);
    in_job_ = true;
    work();
    in_job_ = false;
    for (int64_t spins = 0; done_.load(std::memory_order_acquire) < ntasks;) pause(spins);
    word_.store(kIdle, std::memory_order_release);
    if (error_) {
      std::exception_ptr e = std::exchange(error_, nullptr);
      std::rethrow_exception(e);
    }
  }

 private:
  static constexpr int kBits = 21;  // the word's three fields: job number (wrapping), task count, next task
  static constexpr uint64_t kMask = (uint64_t{1} << kBits) - 1;
  static constexpr uint64_t kIdle = 0;  // no job (or, after a wrap, job 0 with no tasks: the same)
  static constexpr uint64_t kExit = ~uint64_t{0};
  static constexpr int64_t kSpins = 2048;  // about 0.1 ms of pause instructions

  // Claims and runs tasks of the published job until none is left.
  void work() {
    const SingleThreadBlas single_thread_blas;
    uint64_t w = word_.load(std::memory_order_acquire);
    for (;;) {
      if (w == kIdle || w == kExit) return;
      const uint64_t ntasks = (w >> kBits) & kMask, q = w & kMask;
      if (q >= ntasks) return;
      if (!word_.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      // The job cannot end before this task is done, so fn_ and ctx_ are still the job's.
      try {
        fn_(ctx_, static_cast<int64_t>(q));
      } catch (...) {
        const std::lock_guard<std::mutex> lock(error_mutex_);
        if (!error_) error_ = std::current_exception();
      }
      done_.fetch_add(1, std::memory_order_release);
      w = word_.load(std::memory_order_acquire);
    }
  }

  // A helper's loop: wait for a job with tasks left, help, until the lead is done.
  void serve() {
    for (int64_t spins = 0;;) {
      const uint64_t w = word_.load(std::memory_order_acquire);
      if (w == kExit) return;
      if (w != kIdle && (w & kMask) < ((w >> kBits) & kMask)) {
        work();
        spins = 0;
      } else {
        pause(spins);
      }
    }
  }

  // One step of a wait: a spin, or past kSpins of them a yield to whatever else the OS would run
  // (a long serial stretch of the lead, more threads than cores, another process).
  static void pause(int64_t& spins) {
    if (++spins < kSpins) {
      cpu_relax();
    } else {
      std::this_thread::yield();
    }
  }

  static thread_local Team* current_;
  std::atomic<uint64_t> word_{kIdle};
  std::atomic<int64_t> done_{0};
  uint64_t job_ = 0;     // the lead's
  bool in_job_ = false;  // the lead's: running tasks (a nested parallel_tasks then runs inline)
  void (*fn_)(const void*, int64_t) = nullptr;
  const void* ctx_ = nullptr;
  std::mutex error_mutex_;
  std::exception_ptr error_;
};

thread_local Team* Team::current_ = nullptr;

// Runs f(task) for every task in [0, ntasks) on at::parallel_for's threads (or, inside Team::run
// on its lead, on the team's), each thread claiming the next task as it frees up, with its BLAS on
// one thread. Claiming rather than a fixed share: a thread that the OS preempts for another process
// holds up one task, not a share of them. No task's result depends on the thread that runs it or
// on the order.
template <typename F>
void parallel_tasks(int64_t ntasks, const F& f) {
  if (Team* team = Team::led()) return team->tasks(ntasks, f);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(ntasks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    const SingleThreadBlas single_thread_blas;
    for (int64_t q = next.fetch_add(1); q < ntasks; q = next.fetch_add(1)) f(q);
  });
}

// In "bdl" a panel's samples are short runs, one per feature row, L elements apart; the hardware
// prefetcher starts afresh on each, so the loops request the next row's lines while on this one.
// (A prefetch never faults, also past the end of the tensor.)
template <typename T>
inline void prefetch(const T* p, bool write) {
#if defined(__GNUC__)
  if (write) {
    __builtin_prefetch(p, 1);
  } else {
    __builtin_prefetch(p, 0);
  }
#else
  (void)p;
  (void)write;
#endif
}

// The BLAS's own entry points (Fortran, LP64), which torch's MKL builds export. A product through
// at::cpu::mm_out builds three tensors and goes through the dispatcher; the backward makes about 90
// products at (16, 96, 56, 56), and calling the BLAS directly made it 2-4% faster at ConvNeXt-T's
// shapes (2-core Xeon). Where the symbols are absent (weak, null), products go through mm_out.
extern "C" void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                       const int*, const float*, const int*, const float*, float*, const int*) __attribute__((weak));
extern "C" void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
                       const int*, const double*, const int*, const double*, double*, const int*)
    __attribute__((weak));
// bfloat16 operands, float32 products and sums (MKL's gemm_bf16bf16f32; MKL_BF16 is bfloat16's
// bits, as at::BFloat16 holds them).
extern "C" void gemm_bf16bf16f32_(const char*, const char*, const int*, const int*, const int*, const float*,
                                  const at::BFloat16*, const int*, const at::BFloat16*, const int*, const float*,
                                  float*, const int*) __attribute__((weak));

bool cpu_has_avx512_bf16();

// Products of bfloat16 operands where the BLAS has them and the CPU multiplies bfloat16 natively
// (cpu_has_avx512_bf16; MKL picks the instructions, AMX where present), for sizes within the
// BLAS's int32 arguments. One thread's product ran at 2 to 5 times the rate of float32's at the
// shapes the plans make (2-core Xeon with AMX: 280-770 against 155-170 GFLOP/s).
bool bf16_products(int64_t n, int64_t d) {
  static const bool native = gemm_bf16bf16f32_ != nullptr && cpu_has_avx512_bf16();
  return native && std::max(n, d) <= std::numeric_limits<int>::max();
}

// C = op(A) op(B) (column-major, the BLAS's own arguments) for operands of type T and C of type
// C_t: float, double, or bfloat16 operands into float. False where the BLAS lacks the entry point
// or a size passes int32.
template <typename T, typename C_t>
bool blas_gemm(char transa, char transb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
               int64_t ldb, C_t* c, int64_t ldc) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  if (std::max({m, n, k, lda, ldb, ldc}) > kMax) return false;
  const int m_ = static_cast<int>(m), n_ = static_cast<int>(n), k_ = static_cast<int>(k);
  const int lda_ = static_cast<int>(std::max<int64_t>(lda, 1)), ldb_ = static_cast<int>(std::max<int64_t>(ldb, 1));
  const int ldc_ = static_cast<int>(std::max<int64_t>(ldc, 1));
  const C_t one(1), zero(0);
  if constexpr (std::is_same_v<T, float> && std::is_same_v<C_t, float>) {
    if (sgemm_ == nullptr) return false;
    sgemm_(&transa, &transb, &m_, &n_, &k_, &one, a, &lda_, b, &ldb_, &zero, c, &ldc_);
    return true;
  } else if constexpr (std::is_same_v<T, double> && std::is_same_v<C_t, double>) {
    if (dgemm_ == nullptr) return false;
    dgemm_(&transa, &transb, &m_, &n_, &k_, &one, a, &lda_, b, &ldb_, &zero, c, &ldc_);
    return true;
  } else if constexpr (std::is_same_v<T, at::BFloat16> && std::is_same_v<C_t, float>) {
    if (gemm_bf16bf16f32_ == nullptr) return false;
    gemm_bf16bf16f32_(&transa, &transb, &m_, &n_, &k_, &one, a, &lda_, b, &ldb_, &zero, c, &ldc_);
    return true;
  }
  return false;
}

// C (m x k2, row-major, leading dimension ldc) = op(A) op(B) on row-major operands: op(A) is
// m x k (A stored k x m when ta), op(B) is k x k2 (B stored k2 x k when tb). Row-major C is
// column-major C^T = op(B)^T op(A)^T, which is how the BLAS is called. bfloat16 operands (into
// float C) only where bf16_products holds.
template <typename T, typename C_t>
void gemm(bool ta, const T* A, int64_t lda, bool tb, const T* B, int64_t ldb, C_t* C, int64_t ldc, int64_t m,
          int64_t k2, int64_t k) {
  if (m == 0 || k2 == 0) return;
  if (blas_gemm(tb ? 'T' : 'N', ta ? 'T' : 'N', k2, m, k, B, ldb, A, lda, C, ldc)) {
    return;
  }
  if constexpr (std::is_same_v<T, C_t>) {
    const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
    T* a = const_cast<T*>(A);
    T* b = const_cast<T*>(B);
    const at::Tensor ta_ = ta ? at::from_blob(a, {k, m}, {lda, 1}, opts).t() : at::from_blob(a, {m, k}, {lda, 1}, opts);
    const at::Tensor tb_ =
        tb ? at::from_blob(b, {k2, k}, {ldb, 1}, opts).t() : at::from_blob(b, {k, k2}, {ldb, 1}, opts);
    at::Tensor c = at::from_blob(C, {m, k2}, {ldc, 1}, opts);
    at::cpu::mm_out(c, ta_, tb_);
  } else {
    TORCH_INTERNAL_ASSERT(false, "vcreg: a product of bfloat16 operands without bf16_products");
  }
}

// Calls f with a null pointer to the products' operand type for x's dtype (SPEC section 2's
// precision table): bfloat16 input multiplies bfloat16 operands (its shifted or centred values
// and G, each rounded once to bfloat16 from the accumulate dtype) where bf16_products holds; all
// else, float16 input included, multiplies in the accumulate dtype.
template <typename scalar_t, typename F>
void with_operand_type(int64_t n, int64_t d, const F& f) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (bf16_products(n, d)) {
      f(static_cast<at::BFloat16*>(nullptr));
      return;
    }
  }
  f(static_cast<at::opmath_type<scalar_t>*>(nullptr));
}

void round_to_bf16(const float* src, at::BFloat16* dst, int64_t count);

// G (count values) as a product operand: G itself, or G rounded to op_t into buf (count values;
// by default this thread's scratch).
template <typename op_t, typename acc_t>
const op_t* as_operand(const acc_t* G, int64_t count, op_t* buf = nullptr) {
  if constexpr (std::is_same_v<op_t, acc_t>) {
    return G;
  } else {
    static_assert(std::is_same_v<op_t, at::BFloat16> && std::is_same_v<acc_t, float>);
    op_t* h = buf != nullptr ? buf : scratch<op_t>(Scratch::kOperandG, count);
    round_to_bf16(G, h, count);
    return h;
  }
}

// Requests the cache lines of a row segment [p, p + len) ahead of its use: the d x d and n x n
// passes step through 64-wide tiles a row at a time, too short a run for the hardware prefetcher.
template <typename T>
inline void prefetch_row(const T* p, int64_t len, bool write) {
  for (int64_t i = 0; i < len; i += 64 / static_cast<int64_t>(sizeof(T))) prefetch(p + i, write);
}

// Calls f(b, l, r, len) for each maximal run of samples s0 + r .. s0 + r + len - 1 that lie in
// one slab b, starting at position l.
template <typename F>
void for_each_run(const Shape& sh, int64_t s0, int64_t count, const F& f) {
  for (int64_t r = 0; r < count;) {
    const int64_t s = s0 + r, b = s / sh.L, l = s % sh.L;
    const int64_t len = std::min(sh.L - l, count - r);
    f(b, l, r, len);
    r += len;
  }
}

// The shift K: the mean of kShiftRuns runs of kShiftRunLength consecutive samples spread from the
// first sample to the last (all samples where there are fewer), as the first rows may belong to
// one image or token; runs rather than single samples, so that in "bdl" a feature's values share
// cache lines.
template <typename scalar_t, typename acc_t>
std::vector<acc_t> shift_of(const scalar_t* x, const Shape& sh) {
  const int64_t d = sh.d, len = std::min(sh.n, kShiftRunLength);
  const int64_t runs = sh.n <= kShiftRuns * kShiftRunLength ? 1 : kShiftRuns;
  const int64_t run_len = runs == 1 ? sh.n : len;
  std::vector<double> sum(d, 0.0);
  for (int64_t q = 0; q < runs; ++q) {
    const int64_t s0 = runs == 1 ? 0 : q * (sh.n - run_len) / (runs - 1);
    for_each_run(sh, s0, run_len, [&](int64_t b, int64_t l, int64_t, int64_t cnt) {
      if (sh.rows()) {
        for (int64_t i = 0; i < cnt; ++i) {
          const scalar_t* src = x + (b + l + i) * d;
          for (int64_t j = 0; j < d; ++j) sum[j] += static_cast<double>(src[j]);
        }
        return;
      }
      for (int64_t j = 0; j < d; ++j) {
        const scalar_t* src = x + (b * d + j) * sh.L + l;
        double v = 0.0;
        for (int64_t i = 0; i < cnt; ++i) v += static_cast<double>(src[i]);
        sum[j] += v;
      }
    });
  }
  std::vector<acc_t> K(d);
  const double count = static_cast<double>(runs * run_len);
  for (int64_t j = 0; j < d; ++j) K[j] = static_cast<acc_t>(sum[j] / count);
  return K;
}

// The elementwise loops, on restrict pointers so that they vectorize. Sums keep kLanes
// independent partial sums (one running sum would wait on each add's latency), lane u taking the
// elements at u mod kLanes: the same order whatever the vector width. shift_run's blocks of
// 2 kLanes values keep 2 kLanes partial sums of their own (two chains per lane, for wider vectors),
// folded into the lanes per call.
constexpr int kLanes = 8;

template <typename acc_t>
acc_t sum_lanes(const acc_t* lane) {
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

template <typename acc_t>
void fold_lanes(const acc_t* part, acc_t* lane) {
  for (int u = 0; u < kLanes; ++u) lane[u] += part[u] + part[u + kLanes];
}

// Whether the CPU (and the OS, which must save the AVX-512 registers) runs AVX-512 with its
// bfloat16 conversions: AVX512-BF16 is CPUID leaf 7, subleaf 1, EAX bit 5; every CPU with AMX-BF16
// has it too.
bool cpu_has_avx512_bf16() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool has = [] {
    unsigned int a = 0, b = 0, c = 0, e = 0;
    return __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __get_cpuid_count(7, 1, &a, &b, &c, &e) != 0 && (a & (1u << 5)) != 0;
  }();
  return has;
#else
  return false;
#endif
}

// Whether the bfloat16 loops below take their AVX-512 forms: where the CPU has them and ATen's own
// kernels use AVX-512 as well, so that torch's knob ATEN_CPU_CAPABILITY (default, avx2) turns them
// back to the portable loops, as it does ATen's.
bool avx512_bf16_loops() {
#if VCREG_AVX512
  static const bool on = cpu_has_avx512_bf16() && at::get_cpu_capability() == "AVX512";
  return on;
#else
  return false;
#endif
}

// Whether the float32 and float64 code takes its AVX-512 forms (fused_apply, gram_by_dots, and the d x d
// passes' gradient_row_avx512 and column_avx512): where the CPU has AVX-512F and ATen's own kernels
// use AVX-512 (ATEN_CPU_CAPABILITY, as for avx512_bf16_loops).
bool avx512_float32() {
#if VCREG_AVX512
  static const bool on = __builtin_cpu_supports("avx512f") && at::get_cpu_capability() == "AVX512";
  return on;
#else
  return false;
#endif
}

#if VCREG_AVX512
#define VCREG_AVX512_TARGET __attribute__((target("avx512f")))

// The first w (0 to 16) lanes.
VCREG_AVX512_TARGET inline __mmask16 lanes_below(int64_t w) {
  if (w >= 16) return static_cast<__mmask16>(0xFFFF);
  return w <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << w) - 1);
}

// The elementwise loops below on bfloat16 values, 16 at a time, where avx512_bf16_loops holds. The
// portable loops convert float32 to bfloat16 a value at a time (c10's rounding, in SSE2 here: the
// package is built for any x86-64): the bfloat16 gathers ran at 3 to 5 GB/s against 20 for a copy
// (2-core Xeon). The rounding is the same, to nearest even (VCVTNEPS2BF16), with two exceptions
// that no gradient can feel: a NaN keeps its sign and payload (c10 writes 0x7FC0), and float32
// subnormals (below 1.2e-38) become zeros of their sign.
#define VCREG_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

VCREG_BF16_TARGET inline __m512 load_bf16(const at::BFloat16* p) {
  // The zero-masked forms: GCC 12 warns of the unmasked ones' undefined pass-through operand.
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __mmask16 all = 0xFFFF;
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(all, _mm512_maskz_cvtepu16_epi32(all, h), 16));
}

VCREG_BF16_TARGET inline void store_bf16(at::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

// 16 float32 values stored as op_t: rounded to bfloat16, or as they are.
VCREG_BF16_TARGET inline void store_as(at::BFloat16* p, __m512 v) { store_bf16(p, v); }
VCREG_BF16_TARGET inline void store_as(float* p, __m512 v) { _mm512_storeu_ps(p, v); }

// shift_run's blocks of 16 for bfloat16 input: dst = src - k in op_t (bfloat16 or float), the
// sums as shift_run's portable loop forms them. Returns how many values it took.
template <bool kSums, bool kStore, typename op_t>
VCREG_BF16_TARGET int64_t shift_run_avx512(const at::BFloat16* __restrict src, float k, op_t* __restrict dst,
                                           int64_t len, float* __restrict lane) {
  const __m512 kv = _mm512_set1_ps(k);
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __m512 v = _mm512_sub_ps(load_bf16(src + i), kv);
    if constexpr (kStore) store_as(dst + i, v);
    if constexpr (kSums) acc = _mm512_add_ps(acc, v);
  }
  if (kSums && i > 0) {
    alignas(64) float part[2 * kLanes];
    _mm512_store_ps(part, acc);
    fold_lanes(part, lane);
  }
  return i;
}

// shift_row for bfloat16 input: dst = src - K over w features (each value as the portable loop
// computes it); returns how many it took.
template <bool kSums, bool kStore, typename op_t>
VCREG_BF16_TARGET int64_t shift_row_avx512(const at::BFloat16* __restrict src, const float* __restrict K,
                                           op_t* __restrict dst, int64_t w, float* __restrict part) {
  int64_t j = 0;
  for (; j + 16 <= w; j += 16) {
    const __m512 v = _mm512_sub_ps(load_bf16(src + j), _mm512_loadu_ps(K + j));
    if constexpr (kStore) store_as(dst + j, v);
    if constexpr (kSums) _mm512_storeu_ps(part + j, _mm512_add_ps(_mm512_loadu_ps(part + j), v));
  }
  return j;
}

// add_run / add_row for a bfloat16 gradient, without the dual plan's diagonal term (which could
// fuse into an FMA here and not in the portable loop): out = gy + (t - c), c one value (cv) or one
// per value (cj); returns how many values it took.
VCREG_BF16_TARGET int64_t add_avx512(const at::BFloat16* __restrict gy, const float* __restrict t, float cv,
                                     const float* __restrict cj, at::BFloat16* __restrict out, int64_t len) {
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __m512 c = cj != nullptr ? _mm512_loadu_ps(cj + i) : _mm512_set1_ps(cv);
    const __m512 minus_c = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(c), sign));  // -c, as -0.0 for 0
    store_bf16(out + i, _mm512_add_ps(load_bf16(gy + i), _mm512_add_ps(_mm512_loadu_ps(t + i), minus_c)));
  }
  return i;
}

// pair_grad_run / pair_grad_row (the VICReg pair apply) for bfloat16 branches:
// oa = ((ta - ca) + inv) g, ob = ((tb - cb) - inv) g, inv = (a - b) c, with ca, cb one value each
// (cav, cbv) or one per value (caj, cbj); returns how many values it took.
VCREG_BF16_TARGET int64_t pair_grad_avx512(const at::BFloat16* __restrict a, const at::BFloat16* __restrict b,
                                           const float* __restrict ta, const float* __restrict tb, float cav,
                                           float cbv, const float* __restrict caj, const float* __restrict cbj,
                                           float g, float c, at::BFloat16* __restrict oa,
                                           at::BFloat16* __restrict ob, int64_t len) {
  const __m512 gv = _mm512_set1_ps(g), cv = _mm512_set1_ps(c);
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __m512 ca = caj != nullptr ? _mm512_loadu_ps(caj + i) : _mm512_set1_ps(cav);
    const __m512 cb = cbj != nullptr ? _mm512_loadu_ps(cbj + i) : _mm512_set1_ps(cbv);
    const __m512 inv = _mm512_mul_ps(_mm512_sub_ps(load_bf16(a + i), load_bf16(b + i)), cv);
    store_bf16(oa + i, _mm512_mul_ps(_mm512_add_ps(_mm512_sub_ps(_mm512_loadu_ps(ta + i), ca), inv), gv));
    store_bf16(ob + i, _mm512_mul_ps(_mm512_sub_ps(_mm512_sub_ps(_mm512_loadu_ps(tb + i), cb), inv), gv));
  }
  return i;
}

// round_to_bf16's blocks of 16; returns how many values it took.
VCREG_BF16_TARGET int64_t round_avx512(const float* __restrict src, at::BFloat16* __restrict dst, int64_t len) {
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) store_bf16(dst + i, _mm512_loadu_ps(src + i));
  return i;
}
#undef VCREG_BF16_TARGET
#endif

// dst = src - k over len values, rounded to the operand type op_t (not stored without kStore);
// kSums adds them (unrounded) to lane.
template <bool kSums, bool kStore, typename scalar_t, typename acc_t, typename op_t>
inline void shift_run(const scalar_t* __restrict src, acc_t k, op_t* __restrict dst, int64_t len,
                      acc_t* __restrict lane) {
  int64_t i = 0;
#if VCREG_AVX512
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (avx512_bf16_loops()) i = shift_run_avx512<kSums, kStore>(src, k, dst, len, lane);
  }
#endif
  if (i == 0 && len >= 2 * kLanes) {
    acc_t part[2 * kLanes] = {};
    for (; i + 2 * kLanes <= len; i += 2 * kLanes) {
      for (int u = 0; u < 2 * kLanes; ++u) {
        const acc_t v = static_cast<acc_t>(src[i + u]) - k;
        if constexpr (kStore) dst[i + u] = static_cast<op_t>(v);
        if constexpr (kSums) part[u] += v;
      }
    }
    if constexpr (kSums) fold_lanes(part, lane);
  }
  for (; i + kLanes <= len; i += kLanes) {
    for (int u = 0; u < kLanes; ++u) {
      const acc_t v = static_cast<acc_t>(src[i + u]) - k;
      if constexpr (kStore) dst[i + u] = static_cast<op_t>(v);
      if constexpr (kSums) lane[u] += v;
    }
  }
  for (int u = 0; i < len; ++i, ++u) {
    const acc_t v = static_cast<acc_t>(src[i]) - k;
    if constexpr (kStore) dst[i] = static_cast<op_t>(v);
    if constexpr (kSums) lane[u] += v;
  }
}

// dst = src - K over a row of w features, rounded to op_t (not stored without kStore); kSums adds
// them to part (w).
template <bool kSums, bool kStore, typename scalar_t, typename acc_t, typename op_t>
inline void shift_row(const scalar_t* __restrict src, const acc_t* __restrict K, op_t* __restrict dst, int64_t w,
                      acc_t* __restrict part) {
  int64_t j = 0;
#if VCREG_AVX512
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (avx512_bf16_loops()) j = shift_row_avx512<kSums, kStore>(src, K, dst, w, part);
  }
#endif
  for (; j < w; ++j) {
    const acc_t v = static_cast<acc_t>(src[j]) - K[j];
    if constexpr (kStore) dst[j] = static_cast<op_t>(v);
    if constexpr (kSums) part[j] += v;
  }
}

// out = gy + (t + p h) (kDiag) or gy + (t - c) over len values.
template <bool kDiag, typename acc_t, typename grad_t>
inline void add_run(const grad_t* __restrict gy, const acc_t* __restrict t, const acc_t* __restrict p, acc_t c,
                    grad_t* __restrict out, int64_t len) {
  int64_t i = 0;
#if VCREG_AVX512
  if constexpr (!kDiag && std::is_same_v<grad_t, at::BFloat16> && std::is_same_v<acc_t, float>) {
    if (avx512_bf16_loops()) i = add_avx512(gy, t, c, nullptr, out, len);
  }
#endif
  for (; i < len; ++i) {
    const acc_t extra = kDiag ? p[i] * c : -c;
    out[i] = static_cast<grad_t>(static_cast<acc_t>(gy[i]) + (t[i] + extra));
  }
}

// The same over a row of features, c and h per feature.
template <bool kDiag, typename acc_t, typename grad_t>
inline void add_row(const grad_t* __restrict gy, const acc_t* __restrict t, const acc_t* __restrict p,
                    const acc_t* __restrict c, grad_t* __restrict out, int64_t w) {
  int64_t j = 0;
#if VCREG_AVX512
  if constexpr (!kDiag && std::is_same_v<grad_t, at::BFloat16> && std::is_same_v<acc_t, float>) {
    if (avx512_bf16_loops()) j = add_avx512(gy, t, 0.0f, c, out, w);
  }
#endif
  for (; j < w; ++j) {
    const acc_t extra = kDiag ? p[j] * c[j] : -c[j];
    out[j] = static_cast<grad_t>(static_cast<acc_t>(gy[j]) + (t[j] + extra));
  }
}

// dst = src rounded to bfloat16 (count values), in chunks of kRoundChunk in parallel.
void round_to_bf16(const float* src, at::BFloat16* dst, int64_t count) {
  parallel_tasks(ceil_div(count, kRoundChunk), [&](int64_t c) {
    int64_t i = c * kRoundChunk;
    const int64_t end = std::min(count, i + kRoundChunk);
#if VCREG_AVX512
    if (avx512_bf16_loops()) i += round_avx512(src + i, dst + i, end - i);
#endif
    for (; i < end; ++i) dst[i] = static_cast<at::BFloat16>(src[i]);
  });
}

// Features j0 <= j < j1 of samples s0 .. s0+count-1 of P = X - 1 K^T, computed in the accumulate
// dtype and stored in the operand type op_t (acc_t, or bfloat16: see Operands), written to P
// (sample r, feature j) at P[r * ldp + j] ("rows") or P[j * ldp + r] ("bdl": samples along a
// feature row). kSums adds the column sums of X - 1 K^T to sums[j] (float64), summing at most
// kSumBlock values per partial sum in acc_t: cheap, and bounded error even where K is a poor
// estimate of mu. Without kStore only the sums are formed (P is not touched).
template <bool kSums, bool kStore = true, typename scalar_t, typename acc_t, typename op_t>
void gather_shifted(const scalar_t* x, const Shape& sh, int64_t s0, int64_t count, int64_t j0, int64_t j1,
                    const acc_t* K, op_t* P, int64_t ldp, double* sums) {
  static_assert(kSums || kStore);
  const int64_t d = sh.d, w = j1 - j0;
  if (sh.rows()) {
    std::vector<acc_t> part(kSums ? w : 0, acc_t(0));
    for (int64_t r = 0; r < count; ++r) {
      shift_row<kSums, kStore>(x + (s0 + r) * d + j0, K + j0, kStore ? P + r * ldp + j0 : nullptr, w, part.data());
      if constexpr (kSums) {
        if ((r + 1) % kSumBlock == 0 || r + 1 == count) {
          for (int64_t j = 0; j < w; ++j) {
            sums[j0 + j] += part[j];
            part[j] = 0;
          }
        }
      }
    }
    return;
  }
  for_each_run(sh, s0, count, [&](int64_t b, int64_t l, int64_t r, int64_t len) {
    for (int64_t j = j0; j < j1; ++j) {
      const scalar_t* src = x + (b * d + j) * sh.L + l;
      prefetch(src + sh.L, /*write=*/false);
      prefetch(src + sh.L + 16, /*write=*/false);
      for (int64_t i0 = 0; i0 < len; i0 += kLanes * kSumBlock) {
        acc_t lane[kLanes] = {};
        shift_run<kSums, kStore>(src + i0, K[j], kStore ? P + j * ldp + r + i0 : nullptr,
                                 std::min(len - i0, kLanes * kSumBlock), lane);
        if constexpr (kSums) sums[j] += static_cast<double>(sum_lanes(lane));
      }
    }
  });
}

// P -= 1 m^T for features j0 <= j < j1 of all n samples, P laid out as gather_shifted's; kSquares
// adds the centred columns' sums of squares to sq[j] (float64, kSumBlock values per partial sum).
template <bool kSquares, typename acc_t>
inline void centre_run(acc_t* __restrict p, acc_t m, int64_t len, acc_t* __restrict lane) {
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int u = 0; u < kLanes; ++u) {
      const acc_t v = p[i + u] - m;
      p[i + u] = v;
      if constexpr (kSquares) lane[u] += v * v;
    }
  }
  for (int u = 0; i < len; ++i, ++u) {
    const acc_t v = p[i] - m;
    p[i] = v;
    if constexpr (kSquares) lane[u] += v * v;
  }
}

template <bool kSquares, typename acc_t>
inline void centre_row(acc_t* __restrict p, const acc_t* __restrict m, int64_t w, acc_t* __restrict part) {
  for (int64_t j = 0; j < w; ++j) {
    const acc_t v = p[j] - m[j];
    p[j] = v;
    if constexpr (kSquares) part[j] += v * v;
  }
}

template <bool kSquares, typename acc_t>
void centre_columns(const Shape& sh, acc_t* P, int64_t ldp, int64_t j0, int64_t j1, const acc_t* m, double* sq) {
  const int64_t w = j1 - j0;
  if (sh.rows()) {
    std::vector<acc_t> part(kSquares ? w : 0, acc_t(0));
    for (int64_t r = 0; r < sh.n; ++r) {
      centre_row<kSquares>(P + r * ldp + j0, m + j0, w, part.data());
      if constexpr (kSquares) {
        if ((r + 1) % kSumBlock == 0 || r + 1 == sh.n) {
          for (int64_t j = 0; j < w; ++j) {
            sq[j0 + j] += part[j];
            part[j] = 0;
          }
        }
      }
    }
    return;
  }
  for (int64_t j = j0; j < j1; ++j) {
    for (int64_t i0 = 0; i0 < sh.n; i0 += kLanes * kSumBlock) {
      acc_t lane[kLanes] = {};
      centre_run<kSquares>(P + j * ldp + i0, m[j], std::min(sh.n - i0, kLanes * kSumBlock), lane);
      if constexpr (kSquares) sq[j] += static_cast<double>(sum_lanes(lane));
    }
  }
}

// The panel and dual plans' operand: every sample of X - 1 (K + m)^T, computed in the accumulate
// dtype with m = S / n rounded to acc_t, in the operand type op_t, in this thread's scratch.
// Centring while a feature block's columns are in cache costs n d; correcting Q or the apply by S
// afterwards would cost d^2 each. In acc_t each feature block is gathered shifted by K (its sums
// give m), then centred in place; in a narrower op_t a first pass over the block forms only the
// sums and a second gathers X - 1 (K + m)^T rounded once to op_t, so that no acc_t panel is kept.
template <typename acc_t, typename op_t = acc_t>
struct Panel {
  const op_t* P = nullptr;
  int64_t ld = 0;         // P[r * ld + j] ("rows") or P[j * ld + r] ("bdl")
  std::vector<acc_t> K;   // the shift
  std::vector<double> S;  // column sums of X - 1 K^T
  std::vector<double> sq; // dual: column sums of squares of the centred values (the diagonal of M2)
};

template <typename scalar_t, typename op_t = at::opmath_type<scalar_t>>
Panel<at::opmath_type<scalar_t>, op_t> gather_panel(const scalar_t* x, const Shape& sh, bool squares) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t d = sh.d, n = sh.n;
  Panel<acc_t, op_t> p;
  p.K = shift_of<scalar_t, acc_t>(x, sh);
  p.S.assign(d, 0.0);
  if (squares) p.sq.assign(d, 0.0);
  p.ld = sh.rows() ? d : n;
  op_t* P = scratch<op_t>(Scratch::kGramPanel, n * d);
  std::vector<acc_t> m(d);
  // Feature blocks: each feature's sums come from one task, whatever the thread count.
  const int64_t wf = sh.rows() ? kGatherRowFeatures : kGatherFeatures;
  parallel_tasks(ceil_div(d, wf), [&](int64_t f) {
    const int64_t j0 = f * wf, j1 = std::min(d, j0 + wf);
    if constexpr (std::is_same_v<op_t, acc_t>) {
      gather_shifted<true>(x, sh, 0, n, j0, j1, p.K.data(), P, p.ld, p.S.data());
      for (int64_t j = j0; j < j1; ++j) m[j] = static_cast<acc_t>(p.S[j] / static_cast<double>(n));
      if (squares) {
        centre_columns<true>(sh, P, p.ld, j0, j1, m.data(), p.sq.data());
      } else {
        centre_columns<false>(sh, P, p.ld, j0, j1, m.data(), nullptr);
      }
    } else {
      TORCH_INTERNAL_ASSERT(!squares, "vcreg: the dual plan's panel is in the accumulate dtype");
      gather_shifted<true, false>(x, sh, 0, n, j0, j1, p.K.data(), P, p.ld, p.S.data());
      for (int64_t j = j0; j < j1; ++j) {
        m[j] = p.K[j] + static_cast<acc_t>(p.S[j] / static_cast<double>(n));  // K + m
      }
      gather_shifted<false>(x, sh, 0, n, j0, j1, m.data(), P, p.ld, nullptr);
    }
  });
  p.P = P;
  return p;
}

// Block boundaries along a dimension of size dim: nb blocks of about equal width, interior
// boundaries at multiples of 16 elements (cache-line aligned columns), none empty.
std::vector<int64_t> block_edges(int64_t dim, int64_t nb) {
  std::vector<int64_t> edges{0};
  for (int64_t i = 1; i <= nb; ++i) {
    const int64_t e = i == nb ? dim : std::min(dim, ceil_div(i * dim / nb, 16) * 16);
    if (e > edges.back()) edges.push_back(e);
  }
  return edges;
}

#if VCREG_AVX512
// The sum of v's 16 lanes, in one fixed order. Here and below the zero-masked forms of the
// intrinsics (all lanes on): GCC 12 warns of the unmasked ones' undefined pass-through operand.
VCREG_AVX512_TARGET inline float lanes_sum(__m512 v) {
  const __m512d w = _mm512_castps_pd(v);
  const __m256 h = _mm256_add_ps(_mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, w, 0)),
                                 _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, w, 1)));
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
  return _mm_cvtss_f32(q);
}

// One pass of gram_dots, over samples k0 .. k0 + k - 1: its sums go into out (k0 == 0) or onto it.
VCREG_AVX512_TARGET void gram_dots_pass(const float* P, int64_t ld, int64_t k0, int64_t k, int64_t dim, int64_t i0,
                                        int64_t i1, float* out, int64_t ldo) {
  constexpr int kI = 4, kJ = 6;
  const __mmask16 tail = lanes_below(k % 16);
  const int64_t kv = k - k % 16;
  for (int64_t i = i0; i < i1; i += kI) {
    const float* a[kI];
#pragma GCC unroll 4
    for (int r = 0; r < kI; ++r) a[r] = P + std::min(i + r, dim - 1) * ld + k0;
    for (int64_t j = i; j < dim; j += kJ) {
      const float* b[kJ];
#pragma GCC unroll 6
      for (int c = 0; c < kJ; ++c) b[c] = P + std::min(j + c, dim - 1) * ld + k0;
      __m512 acc[kI][kJ];
#pragma GCC unroll 4
      for (int r = 0; r < kI; ++r) {
#pragma GCC unroll 6
        for (int c = 0; c < kJ; ++c) acc[r][c] = _mm512_setzero_ps();
      }
      const auto step = [&](int64_t s, __mmask16 m) VCREG_AVX512_TARGET {
        __m512 av[kI];
#pragma GCC unroll 4
        for (int r = 0; r < kI; ++r) av[r] = _mm512_maskz_loadu_ps(m, a[r] + s);
#pragma GCC unroll 6
        for (int c = 0; c < kJ; ++c) {
          const __m512 bv = _mm512_maskz_loadu_ps(m, b[c] + s);
#pragma GCC unroll 4
          for (int r = 0; r < kI; ++r) acc[r][c] = _mm512_fmadd_ps(av[r], bv, acc[r][c]);
        }
      };
      for (int64_t s = 0; s < kv; s += 16) step(s, static_cast<__mmask16>(0xFFFF));
      if (kv < k) step(kv, tail);
#pragma GCC unroll 4
      for (int r = 0; r < kI; ++r) {
#pragma GCC unroll 6
        for (int c = 0; c < kJ; ++c) {
          const int64_t row = i + r, col = j + c;  // rows and columns past the block's are clamped copies
          if (row < i1 && col < dim && col >= row) {
            const float v = lanes_sum(acc[r][c]);
            float& o = out[(row - i0) * ldo + (col - i0)];
            o = k0 == 0 ? v : o + v;
          }
        }
      }
    }
  }
}

// Rows i0 <= i < i1 of the upper triangle of Z^T Z (dim x dim), Z stored dim-major as P (row i of P,
// k values, is Z's column i): sum_s P[i, s] P[j, s] for i <= j < dim into out[(i - i0) * ldo + j - i0]
// (out at element (i0, i0), as for the BLAS call it stands in for), float32, where gram_by_dots holds;
// the entries left of the diagonal are not written. Blocks of 4 rows by 6 against 16 samples at a
// time (24 accumulators, 10 loads for 24 FMAs), each entry's 16 lanes summed in one fixed order at
// the end of a pass; passes over kDotsPanelBytes of P at most (the rows' runs stay in L2 while
// every block reads them), their sums added in order. Against MKL's products of the same panels (2-core Xeon,
// stats_kernel): (4, 96, 3136), grouped, 0.75-0.84 ms against 1.0-1.04; (4, 192, 784), panel,
// 0.76-0.82 against 0.87-0.88; (8, 96, 384) 0.26-0.29 against 0.42-0.45. At d = 384 they were even,
// at 512 MKL's was faster.
VCREG_AVX512_TARGET void gram_dots(const float* P, int64_t ld, int64_t k, int64_t dim, int64_t i0, int64_t i1,
                                   float* out, int64_t ldo) {
  const int64_t kc = std::max<int64_t>(16, kDotsPanelBytes / (dim * 4) / 16 * 16);
  for (int64_t k0 = 0; k0 < k; k0 += kc) gram_dots_pass(P, ld, k0, std::min(kc, k - k0), dim, i0, i1, out, ldo);
}
#endif

// Whether gram_upper and gram_tile form their float32 "dim-major" products with gram_dots.
bool gram_by_dots(int64_t dim) { return dim <= kFusedMaxFeatures && avx512_float32(); }

// One Gram product of gram_upper: Z stored as P, its upper triangle into out.
template <typename acc_t, typename op_t = acc_t>
struct GramOperand {
  const op_t* P;
  acc_t* out;
};

// The upper triangle of Z^T Z (dim x dim, into out with leading dimension ldo) for Z (k x dim)
// stored as P: k x dim (leading dimension ld) or, with dim_major, its transpose dim x k; for each
// of nops operands of one shape. Row block I (columns from its own first on) is one product over
// all k; blocks I and nb-1-I of one operand make one parallel task, of equal work.
template <typename acc_t, typename op_t>
void gram_upper(const GramOperand<acc_t, op_t>* ops, int64_t nops, int64_t ld, bool dim_major, int64_t dim, int64_t k,
                int64_t ldo) {
  const int64_t nb0 = std::max(kMinBlocks, ceil_div(dim, kBlock));
  const std::vector<int64_t> edges = block_edges(dim, nb0 + nb0 % 2);
  const int64_t nb = static_cast<int64_t>(edges.size()) - 1, per_op = ceil_div(nb, 2);
  parallel_tasks(nops * per_op, [&](int64_t q) {
    const op_t* P = ops[q / per_op].P;
    acc_t* out = ops[q / per_op].out;
    const int64_t t = q % per_op, pair[2] = {t, nb - 1 - t};
    for (int u = 0; u < (pair[0] == pair[1] ? 1 : 2); ++u) {  // an odd count's middle block alone
      const int64_t i0 = edges[pair[u]], w = edges[pair[u] + 1] - i0, cols = dim - i0;
#if VCREG_AVX512
      if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<op_t, float>) {
        if (dim_major && gram_by_dots(dim)) {
          gram_dots(P, ld, k, dim, i0, i0 + w, out + i0 * ldo + i0, ldo);
          continue;
        }
      }
#endif
      if (dim_major) {
        gemm(false, P + i0 * ld, ld, true, P + i0 * ld, ld, out + i0 * ldo + i0, ldo, w, cols, k);
      } else {
        gemm(true, P + i0, ld, false, P + i0, ld, out + i0 * ldo + i0, ldo, w, cols, k);
      }
    }
  });
}

// How Q = (X - 1 K^T)^T (X - 1 K^T) is cut into BLAS calls (the top comment says why):
//   panel:    the centred panel (gather_panel), Q = M2 by gram_upper straight into acc_t;
//   grouped:  kGroups fixed ranges of samples, one parallel task each, gathering its samples panel
//             by panel into its own buffer (in L2) and adding each row block of the upper triangle
//             over it into that group's float64 accumulator;
//   streamed: X in super-panels gathered in parallel into one buffer, whose (sample group x tile)
//             products are the parallel tasks, each into its group's float64 accumulator.
enum class GramKind { kPanel, kGrouped, kStreamed };

GramKind gram_kind(int64_t n, int64_t d, int64_t elem_bytes) {
  // The panel gathers X once for both halves; below kMinPanelWidth its row blocks get too thin
  // and grouped's L2-sized panels win where n is large. Grouped needs products long against d
  // (accumulators cost d^2 per group) and d^2 accumulators that stay small.
  const bool fits = n * d * elem_bytes <= kPanelMaxBytes;
  if (fits && d >= kMinPanelWidth) return GramKind::kPanel;
  if (n / kGroups >= std::max(4 * kMinGroupSamples, 2 * d) && kGroups * d * d * 8 <= kGroupAccBytes) {
    return GramKind::kGrouped;
  }
  return fits ? GramKind::kPanel : GramKind::kStreamed;
}

// grouped, streamed: blocks of about kTile along d, sample groups, panel length; streamed also
// cuts the upper triangle into tiles (diagonal tiles whole), grouped into row blocks.
struct TilePlan {
  std::vector<int64_t> edges;
  std::vector<std::pair<int64_t, int64_t>> tiles;  // streamed: (I, J), I <= J
  int64_t max_width = 0;
  int64_t groups = 1;  // sample groups, each with its own accumulator
  int64_t panel = 0;   // samples gathered at once: per task (grouped) or per super-panel (streamed)
};

TilePlan plan_tiles(GramKind kind, int64_t n, int64_t d, int64_t elem_bytes) {
  TilePlan p;
  // Skipping the lower triangle pays from d = 96 on: 3 tiles of 48 cost 0.87 of one 96 x 96 product.
  p.edges = block_edges(d, std::max(ceil_div(d, kTile), d >= kMinSplitWidth ? int64_t{2} : int64_t{1}));
  const int64_t nt = static_cast<int64_t>(p.edges.size()) - 1;
  for (int64_t I = 0; I < nt; ++I) {
    p.max_width = std::max(p.max_width, p.edges[I + 1] - p.edges[I]);
    for (int64_t J = I; J < nt; ++J) p.tiles.emplace_back(I, J);
  }
  const int64_t ntiles = static_cast<int64_t>(p.tiles.size());
  if (kind == GramKind::kGrouped) {
    p.groups = kGroups;
    const int64_t per_group = ceil_div(n, kGroups);
    const int64_t target = std::max(kMinGroupSamples, kGroupPanelBytes / (d * elem_bytes));
    p.panel = ceil_div(per_group, ceil_div(per_group, target));
  } else {
    const int64_t target = std::max(kMinGroupSamples, kSuperPanelBytes / (d * elem_bytes));
    p.panel = ceil_div(n, ceil_div(n, target));  // equal super-panels, none a small remainder
    p.groups = std::clamp<int64_t>(ceil_div(kMinGramItems, ntiles), 1,
                                   std::max<int64_t>(1, p.panel / kMinGroupSamples));
  }
  return p;
}

// acc[I, J] += P_I^T P_J over the k samples of P from sample k0 on, for the tile (i0 + wi, j0 + wj)
// (acc[I, J] = ... for the first product of a group: no accumulator needs zeroing beforehand).
// P holds samples as rows ("rows": k x d) or as columns ("bdl": d x k), with leading dimension ld.
// The product lands in prod (wi x wj, acc_t; by gram_dots, where it serves, right of the diagonal
// only), then its part right of the diagonal goes into acc (d x d, float64).
template <typename acc_t, typename op_t>
void gram_tile(bool rows, const op_t* P, int64_t ld, int64_t k0, int64_t k, int64_t i0, int64_t wi, int64_t j0,
               int64_t wj, int64_t d, acc_t* prod, double* acc, bool first) {
  const auto product = [&] {
#if VCREG_AVX512
    if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<op_t, float>) {
      // A whole row block of the triangle (the grouped plan's).
      if (!rows && j0 == i0 && j0 + wj == d && gram_by_dots(d)) {
        return gram_dots(P + k0, ld, k, d, i0, i0 + wi, prod, wj);
      }
    }
#endif
    if (rows) {
      gemm(true, P + k0 * ld + i0, ld, false, P + k0 * ld + j0, ld, prod, wj, wi, wj, k);
    } else {
      gemm(false, P + i0 * ld + k0, ld, true, P + j0 * ld + k0, ld, prod, wj, wi, wj, k);
    }
  };
  product();
  // Only the upper triangle of acc is read: a tile on the diagonal adds its part right of it.
  double* dst = acc + i0 * d + j0;
  for (int64_t i = 0; i < wi; ++i) {
    const int64_t jb = std::max<int64_t>(0, i0 + i - j0);
    if (first) {
      for (int64_t j = jb; j < wj; ++j) dst[i * d + j] = prod[i * wj + j];
    } else {
      for (int64_t j = jb; j < wj; ++j) dst[i * d + j] += prod[i * wj + j];
    }
  }
}

int64_t num_upper_tiles(int64_t dim) {
  const int64_t nb = ceil_div(dim, kPassTile);
  return nb * (nb + 1) / 2;
}

// Calls f(t, i0, i1, j0, j1) for each tile t of the upper triangle of a dim x dim matrix (diagonal
// tiles whole), in parallel from dim = kRowGrain on; the tiles are fixed by dim.
template <typename F>
void for_upper_tiles(int64_t dim, const F& f) {
  const int64_t nb = ceil_div(dim, kPassTile);
  std::vector<std::pair<int64_t, int64_t>> tiles;  // (I, J): tile t in the row-major order of the triangle
  for (int64_t I = 0; I < nb; ++I) {
    for (int64_t J = I; J < nb; ++J) tiles.emplace_back(I, J);
  }
  const auto run = [&](int64_t t) {
    const auto [I, J] = tiles[t];
    f(t, I * kPassTile, std::min(dim, (I + 1) * kPassTile), J * kPassTile, std::min(dim, (J + 1) * kPassTile));
  };
  const int64_t ntiles = static_cast<int64_t>(tiles.size());
  if (dim < kRowGrain) {
    for (int64_t t = 0; t < ntiles; ++t) run(t);
  } else {
    parallel_tasks(ntiles, run);
  }
}

#if VCREG_AVX512
// dst[r] = col[r * stride] for r < len, 16 (float) or 8 (double) at a time by gathers (stride
// within int32); returns how many it wrote. write_mirrored's transposed half, a column of a tile.
VCREG_AVX512_TARGET inline int64_t column_avx512(const float* col, int64_t stride, float* dst, int64_t len) {
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(static_cast<int>(stride)));
  int64_t r = 0;
  for (; r + 16 <= len; r += 16) {
    _mm512_storeu_ps(dst + r, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), 0xFFFF, idx, col + r * stride, 4));
  }
  return r;
}
VCREG_AVX512_TARGET inline int64_t column_avx512(const double* col, int64_t stride, double* dst, int64_t len) {
  const __m256i idx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                         _mm256_set1_epi32(static_cast<int>(stride)));
  int64_t r = 0;
  for (; r + 8 <= len; r += 8) {
    _mm512_storeu_pd(dst + r, _mm512_mask_i32gather_pd(_mm512_setzero_pd(), 0xFF, idx, col + r * stride, 8));
  }
  return r;
}
#endif

// Writes the strictly upper part of a tile both ways: buf (rows i0..i1, columns j0..j1, leading
// dimension j1 - j0) holds element (i, j) for j > i; M[i, j] and M[j, i] get it (M[j, i] only,
// without upper: M's upper part holds buf already). Row runs both ways: a column-wise mirror would
// hit one cache set per element where ldm is a power of two.
template <typename T>
void write_mirrored(const T* buf, int64_t i0, int64_t i1, int64_t j0, int64_t j1, int64_t ldm, T* M,
                    bool upper = true) {
  const int64_t wj = j1 - j0;
  constexpr int64_t kAhead = 4;  // rows
  for (int64_t i = i0; upper && i < i1; ++i) {
    if (i + kAhead < i1) prefetch_row(M + (i + kAhead) * ldm + j0, wj, /*write=*/true);
    const int64_t jb = std::max(i + 1, j0);
    std::copy(buf + (i - i0) * wj + (jb - j0), buf + (i - i0) * wj + wj, M + i * ldm + jb);
  }
  for (int64_t j = j0; j < j1; ++j) {
    if (j + kAhead < j1) prefetch_row(M + (j + kAhead) * ldm + i0, i1 - i0, /*write=*/true);
    const int64_t ie = std::min(i1, j);
    int64_t i = i0;
#if VCREG_AVX512
    if (avx512_float32() && ie > i0) i += column_avx512(buf + (j - j0), wj, M + j * ldm + i0, ie - i0);
#endif
    for (; i < ie; ++i) M[j * ldm + i] = buf[(i - i0) * wj + (j - j0)];
  }
}

// The Gram pass's result: M2_ij for i <= j is Q_ij (kCentred: Q formed from the centred panel) or
// Q_ij - S_i S_j / n; Q (upper triangle valid, leading dimension d) in acc_t or float64.
template <typename acc_t, typename op_t = acc_t>
struct Moments {
  std::vector<acc_t> K;        // the shift
  std::vector<double> S;       // column sums of X - 1 K^T
  const acc_t* Qa = nullptr;   // panel (centred)
  const double* Qd = nullptr;  // grouped, streamed
  Panel<acc_t, op_t> panel;    // panel: its operand, which the apply reuses
};

// (K, S, Q) of x3 (contiguous), Q from products of op_t operands; Q and the panel live in this
// thread's scratch until its next call, except that the panel plan writes Q into q_out where one
// is given (the caller's d x d output).
template <typename scalar_t, typename op_t>
Moments<at::opmath_type<scalar_t>, op_t> gram_moments(const at::Tensor& x3,
                                                      at::opmath_type<scalar_t>* q_out = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  const Shape sh = shape_of(x3);
  const int64_t d = sh.d, n = sh.n;
  const scalar_t* x = x3.const_data_ptr<scalar_t>();
  Moments<acc_t, op_t> m;
  const GramKind kind = gram_kind(n, d, sizeof(acc_t));
  if (kind == GramKind::kPanel) {
    m.panel = gather_panel<scalar_t, op_t>(x, sh, /*squares=*/false);
    m.K = m.panel.K;
    m.S = m.panel.S;
    acc_t* Q = q_out != nullptr ? q_out : scratch<acc_t>(Scratch::kGramAcc, d * d);
    const GramOperand<acc_t, op_t> op{m.panel.P, Q};
    gram_upper(&op, 1, m.panel.ld, /*dim_major=*/!sh.rows(), d, n, d);
    m.Qa = Q;
    return m;
  }

  m.K = shift_of<scalar_t, acc_t>(x, sh);
  m.S.assign(d, 0.0);
  const acc_t* K = m.K.data();
  const TilePlan plan = plan_tiles(kind, n, d, sizeof(acc_t));
  const int64_t ntiles = static_cast<int64_t>(plan.tiles.size());
  const int64_t groups = plan.groups;
  const int64_t w2 = plan.max_width * (kind == GramKind::kGrouped ? d : plan.max_width);
  const int64_t nthreads = at::get_num_threads();
  // Q per sample group; only its upper tiles are written and read.
  double* acc = scratch<double>(Scratch::kGramAcc, groups * d * d);
  acc_t* prod_all = scratch<acc_t>(Scratch::kGramProd, nthreads * w2);
  // Column sums in slots summed in a fixed order: per group (grouped) or per gather chunk (streamed).
  const int64_t nchunks_max = kind == GramKind::kGrouped ? groups : ceil_div(plan.panel, kGatherChunk);
  std::vector<double> part_sums(nchunks_max * d, 0.0);

  if (kind == GramKind::kGrouped) {
    op_t* panel_all = scratch<op_t>(Scratch::kGramPanel, nthreads * plan.panel * d);
    parallel_tasks(groups, [&](int64_t g) {
      const int64_t tid = at::get_thread_num();
      op_t* P = panel_all + tid * plan.panel * d;
      acc_t* prod = prod_all + tid * w2;
      const int64_t begin = g * n / groups, end = (g + 1) * n / groups;
      for (int64_t s0 = begin; s0 < end; s0 += plan.panel) {
        const int64_t cnt = std::min(plan.panel, end - s0), ld = sh.rows() ? d : cnt;
        gather_shifted<true>(x, sh, s0, cnt, 0, d, K, P, ld, part_sums.data() + g * d);
        for (size_t I = 0; I + 1 < plan.edges.size(); ++I) {  // row blocks of the upper triangle
          const int64_t i0 = plan.edges[I];
          gram_tile(sh.rows(), P, ld, 0, cnt, i0, plan.edges[I + 1] - i0, i0, d - i0, d, prod, acc + g * d * d,
                    s0 == begin);
        }
      }
    });
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t j = 0; j < d; ++j) m.S[j] += part_sums[g * d + j];
    }
  } else {
    op_t* P = scratch<op_t>(Scratch::kGramPanel, plan.panel * d);
    for (int64_t s0 = 0; s0 < n; s0 += plan.panel) {
      const int64_t len = std::min(plan.panel, n - s0), ld = sh.rows() ? d : len;
      const int64_t nchunks = ceil_div(len, kGatherChunk), chunk = ceil_div(len, nchunks);
      std::fill(part_sums.begin(), part_sums.end(), 0.0);
      parallel_tasks(nchunks, [&](int64_t c) {
        const int64_t r0 = c * chunk, cnt = std::min(chunk, len - r0);
        if (cnt <= 0) return;
        gather_shifted<true>(x, sh, s0 + r0, cnt, 0, d, K, sh.rows() ? P + r0 * d : P + r0, ld,
                             part_sums.data() + c * d);
      });
      for (int64_t c = 0; c < nchunks; ++c) {
        for (int64_t j = 0; j < d; ++j) m.S[j] += part_sums[c * d + j];
      }
      parallel_tasks(groups * ntiles, [&](int64_t q) {
        acc_t* prod = prod_all + at::get_thread_num() * w2;
        const int64_t g = q / ntiles;
        const auto [I, J] = plan.tiles[q % ntiles];
        const int64_t k0 = g * len / groups, k = (g + 1) * len / groups - k0;
        // The first super-panel has len >= groups (plan_tiles), so every product there is non-empty.
        TORCH_INTERNAL_ASSERT(k > 0 || s0 > 0);
        if (k == 0) return;
        gram_tile(sh.rows(), P, ld, k0, k, plan.edges[I], plan.edges[I + 1] - plan.edges[I], plan.edges[J],
                  plan.edges[J + 1] - plan.edges[J], d, prod, acc + g * d * d, s0 == 0);
      });
    }
  }
  // The groups' accumulators summed into the first, in group order.
  if (groups > 1) {
    for_upper_tiles(d, [&](int64_t, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t j = std::max(i, j0); j < j1; ++j) {
          double q = acc[i * d + j];
          for (int64_t g = 1; g < groups; ++g) q += acc[(g * d + i) * d + j];
          acc[i * d + j] = q;
        }
      }
    });
  }
  m.Qd = acc;
  return m;
}

// M2 full and symmetric, computed in float64 and stored in m_t (the accumulate dtype: the
// returned M2 is then the only d x d allocation; see Moments). Q may be M2 itself (kCentred):
// each element is read, in the upper triangle, before any write can reach it, and the upper
// triangle, which already holds M2, is not written again.
template <bool kCentred, typename q_t, typename m_t>
void centred_gram(const q_t* Q, const double* S, int64_t d, int64_t n, m_t* M2) {
  const double nd = static_cast<double>(n);
  const bool in_place = kCentred && static_cast<const void*>(Q) == static_cast<const void*>(M2);
  for (int64_t j = 0; j < d; ++j) {
    M2[j * d + j] = static_cast<m_t>(static_cast<double>(Q[j * d + j]) - (kCentred ? 0.0 : S[j] * S[j] / nd));
  }
  for_upper_tiles(d, [&](int64_t, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    m_t buf[kPassTile * kPassTile];
    const int64_t wj = j1 - j0;
    for (int64_t i = i0; i < i1; ++i) {
      if (i + 4 < i1) prefetch_row(Q + (i + 4) * d + j0, j1 - j0, /*write=*/false);
      for (int64_t j = std::max(i + 1, j0); j < j1; ++j) {
        buf[(i - i0) * wj + (j - j0)] =
            static_cast<m_t>(static_cast<double>(Q[i * d + j]) - (kCentred ? 0.0 : S[i] * S[j] / nd));
      }
    }
    write_mirrored(buf, i0, i1, j0, j1, d, M2, /*upper=*/!in_place);
  });
}

// The diagonal of G and l_var (SPEC section 2) from the diagonal of M2. A NaN variance gives a
// NaN l_var and G_jj = 0 (hinge inactive), as in the reference.
template <typename F, typename G_t>
double fill_diagonal(int64_t d, int64_t n, double alpha, double eps, double gamma, const F& m2_diag, const G_t& set) {
  const double inv_nm1 = 1.0 / static_cast<double>(n - 1), dd = static_cast<double>(d);
  double l_var = 0.0;
  for (int64_t j = 0; j < d; ++j) {
    const double s = std::sqrt(m2_diag(j) * inv_nm1 + eps);
    const double hinge = gamma - s;
    l_var += hinge < 0 ? 0.0 : hinge;  // relu that keeps NaN
    set(j, s < gamma ? -alpha * inv_nm1 / dd / s : 0.0);
  }
  return l_var / dd;
}

#if VCREG_AVX512
// gradient_row's blocks of kLanes (8) elements, one element per lane of 8 doubles, each formed by the
// portable loop's operations in its order (no contraction into FMAs): bitwise the same values and
// lane sums. Returns how many elements it took.
VCREG_AVX512_TARGET inline __m512d load_doubles(const float* p) {
  return _mm512_maskz_cvtps_pd(0xFF, _mm256_loadu_ps(p));
}
VCREG_AVX512_TARGET inline __m512d load_doubles(const double* p) { return _mm512_loadu_pd(p); }
VCREG_AVX512_TARGET inline void store_doubles(float* p, __m512d v) {
  _mm256_storeu_ps(p, _mm512_maskz_cvtpd_ps(0xFF, v));
}
VCREG_AVX512_TARGET inline void store_doubles(double* p, __m512d v) { _mm512_storeu_pd(p, v); }

template <bool kClip, bool kCentred, typename q_t, typename acc_t>
VCREG_AVX512_TARGET int64_t gradient_row_avx512(const q_t* __restrict q, const double* __restrict Sn, double si,
                                                double inv_nm1, double scale, double dl, acc_t* __restrict g,
                                                int64_t len, double* __restrict cov) {
  static_assert(kLanes == 8);
  const __m512d vsi = _mm512_set1_pd(si), vinv = _mm512_set1_pd(inv_nm1), vscale = _mm512_set1_pd(scale);
  const __m512d vdl = _mm512_set1_pd(dl), vndl = _mm512_set1_pd(-dl), v2dl = _mm512_set1_pd(2.0 * dl),
                vdl2 = _mm512_set1_pd(dl * dl);
  __m512d vcov = _mm512_loadu_pd(cov);
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    __m512d m2 = load_doubles(q + j);
    if constexpr (!kCentred) m2 = _mm512_sub_pd(m2, _mm512_mul_pd(vsi, _mm512_loadu_pd(Sn + j)));
    const __m512d c = _mm512_mul_pd(m2, vinv);
    const __m512d cc = _mm512_mul_pd(c, c);
    if constexpr (kClip) {
      const __m512d a = _mm512_abs_pd(c);
      const __m512d linear = _mm512_sub_pd(_mm512_mul_pd(v2dl, a), vdl2);
      // a <= dl, ordered: a NaN takes the linear branch, NaN as the portable loop's.
      const __mmask8 quad = _mm512_cmp_pd_mask(a, vdl, _CMP_LE_OQ);
      vcov = _mm512_add_pd(vcov, _mm512_mask_blend_pd(quad, linear, cc));
      // max(-dl, c), min(dl, .): a NaN c is the second operand, and stays, as with std::max/min.
      store_doubles(g + j, _mm512_mul_pd(_mm512_maskz_min_pd(0xFF, vdl, _mm512_maskz_max_pd(0xFF, vndl, c)), vscale));
    } else {
      vcov = _mm512_add_pd(vcov, cc);
      store_doubles(g + j, _mm512_mul_pd(c, vscale));
    }
  }
  _mm512_storeu_pd(cov, vcov);
  return j;
}
#endif

// One row's run of len off-diagonal elements of G (fill_gradient_matrix): from M2 = q (kCentred)
// or q - si Sn, C = M2 / (n-1), G = scale C (clipped to [-dl, dl] first with kClip), and phi(C)
// summed into cov, lane u taking the elements at u mod kLanes.
template <bool kClip, bool kCentred, typename q_t, typename acc_t>
inline void gradient_row(const q_t* __restrict q, const double* __restrict Sn, double si, double inv_nm1, double scale,
                         double dl, acc_t* __restrict g, int64_t len, double* __restrict cov) {
  const auto element = [&](int64_t j, int u) {
    double m2 = static_cast<double>(q[j]);
    if constexpr (!kCentred) m2 -= si * Sn[j];
    const double c = m2 * inv_nm1;
    if constexpr (kClip) {
      const double a = std::abs(c);
      cov[u] += a <= dl ? c * c : 2.0 * dl * a - dl * dl;
      g[j] = static_cast<acc_t>(std::min(std::max(c, -dl), dl) * scale);  // min/max keep NaN
    } else {
      cov[u] += c * c;
      g[j] = static_cast<acc_t>(c * scale);
    }
  };
  int64_t j = 0;
#if VCREG_AVX512
  if (avx512_float32()) j = gradient_row_avx512<kClip, kCentred>(q, Sn, si, inv_nm1, scale, dl, g, len, cov);
#endif
  for (; j + kLanes <= len; j += kLanes) {
    for (int u = 0; u < kLanes; ++u) element(j + u, u);
  }
  for (int u = 0; j < len; ++j, ++u) element(j, u);
}

// G (d x d, in acc_t) of SPEC section 2 from C = M2 / (n-1), M2 formed on the fly in float64 from
// Q's upper triangle (see Moments); returns (l_var, l_cov).
template <bool kCentred, typename acc_t, typename q_t>
std::pair<double, double> fill_gradient_matrix(const q_t* Q, const double* S, int64_t d, int64_t n, double alpha,
                                               double beta, double eps, double gamma, std::optional<double> delta,
                                               acc_t* G) {
  const double nd = static_cast<double>(n), inv_nm1 = 1.0 / static_cast<double>(n - 1),
               dd = static_cast<double>(d);
  std::vector<double> Sn(d);
  for (int64_t j = 0; j < d; ++j) Sn[j] = S[j] / nd;
  const double l_var = fill_diagonal(
      d, n, alpha, eps, gamma,
      [&](int64_t j) { return static_cast<double>(Q[j * d + j]) - (kCentred ? 0.0 : S[j] * Sn[j]); },
      [&](int64_t j, double g) { G[j * d + j] = static_cast<acc_t>(g); });
  if (d == 1) return {l_var, 0.0};
  const double scale = 4.0 * beta * inv_nm1 / (dd * (dd - 1.0));
  const double dl = delta.value_or(0.0);
  // Tiles in parallel, their phi sums added in tile order: the same l_cov for any thread count.
  std::vector<double> tile_cov(num_upper_tiles(d), 0.0);
  const auto pass = [&](auto clip) {
    for_upper_tiles(d, [&](int64_t t, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
      acc_t buf[kPassTile * kPassTile];
      const int64_t wj = j1 - j0;
      double cov[kLanes] = {};
      for (int64_t i = i0; i < i1; ++i) {
        if (i + 4 < i1) prefetch_row(Q + (i + 4) * d + j0, j1 - j0, /*write=*/false);
        const int64_t jb = std::max(i + 1, j0);
        gradient_row<decltype(clip)::value, kCentred>(Q + i * d + jb, Sn.data() + jb, S[i], inv_nm1, scale, dl,
                                                      buf + (i - i0) * wj + (jb - j0), j1 - jb, cov);
      }
      tile_cov[t] = sum_lanes(cov);
      write_mirrored(buf, i0, i1, j0, j1, d, G);
    });
  };
  if (delta) {
    pass(std::true_type{});
  } else {
    pass(std::false_type{});
  }
  double l_cov = 0.0;
  for (const double v : tile_cov) l_cov += v;
  return {l_var, 2.0 * l_cov / (dd * (dd - 1.0))};
}

// out = gy + (T - 1 c^T) (kDiag: gy + T + P diag(h)) for features j0 <= j < j1 of samples
// s0 .. s0+count-1; T laid out as gather_shifted's P (T[r * ldt + j - j0] or T[(j - j0) * ldt + r]),
// P is the panel (leading dimension ldp).
template <bool kDiag, typename acc_t, typename grad_t>
void add_grad(const acc_t* T, int64_t ldt, const acc_t* c, const acc_t* P, int64_t ldp, const grad_t* gy,
              grad_t* out, const Shape& sh, int64_t s0, int64_t count, int64_t j0, int64_t j1) {
  const int64_t d = sh.d;
  if (sh.rows()) {
    for (int64_t r = 0; r < count; ++r) {
      const int64_t o = (s0 + r) * d + j0;
      add_row<kDiag>(gy + o, T + r * ldt, kDiag ? P + (s0 + r) * ldp + j0 : nullptr, c + j0, out + o, j1 - j0);
    }
    return;
  }
  for_each_run(sh, s0, count, [&](int64_t b, int64_t l, int64_t r, int64_t len) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t o = (b * d + j) * sh.L + l;
      prefetch(gy + o + sh.L, /*write=*/false);
      prefetch(out + o + sh.L, /*write=*/true);
      add_run<kDiag>(gy + o, T + (j - j0) * ldt + r, kDiag ? P + j * ldp + s0 + r : nullptr, c[j], out + o, len);
    }
  });
}

// The float32 applies of the "bdl" layout as one pass of AVX-512 FMAs (fused_apply: where the CPU has
// AVX-512F, ATen uses AVX-512, as for avx512_bf16_loops, and d <= kFusedMaxFeatures). Each tile of
// grad_x, 8 features by 48 samples of one slab, is
//   out = gy + (sum_k G[k, j] (src[k, l] - K[k]) - c[j]),   one FMA chain over k = 0 .. d-1 in order,
// src the activation (shifted as it is copied into the tile: the gathered panel's values, bitwise)
// or the centred panel. The product, the shift and the gradient write share one instruction stream
// and the next tile's lines are requested during this one's, so that the loads of x and grad_y
// overlap the FMAs: the gather, the MKL product and the add, as three passes, left the passes'
// memory traffic exposed (apply of (4, 96, 56, 56) with cold caches, 2-core Xeon: 1.45-1.51 ms, fused
// 1.07-1.12; (4, 192, 28, 28) 1.15-1.20 against 0.87-0.92). From d = 256 MKL's blocked product
// gains more than the overlap does (ResNet-50's and ConvNeXt-T's d = 256 to 512 stages took 1.01 to
// 1.03x as long). Each value is one chain whatever the tiling, so the tasks (runs of one slab) fix
// nothing in the result.
bool fused_apply(const Shape& sh) { return !sh.rows() && sh.d <= kFusedMaxFeatures && avx512_float32(); }

#if VCREG_AVX512
constexpr int kFusedWidth = 8;         // features per block of G, packed: Gp[(jb * d + k) * 8 + u] = G[k, 8 jb + u]
constexpr int64_t kTileSamples = 48;   // samples per tile: 3 vectors, 24 accumulators with 8 features

// One tile: kBlocks blocks of G's packed columns (gp: the first) against the w <= 16 kVec samples of
// the packed tile pk (kTileSamples values a feature row); writes features
// j0 .. j0 + nj - 1 (gy, out: their rows, ldo apart, at the tile's first sample; c: at j0).
template <int kVec, int kBlocks>
VCREG_AVX512_TARGET inline void fused_tile(const float* __restrict pk, const float* __restrict gp, int64_t d,
                                           const float* __restrict c, const float* __restrict gy,
                                           float* __restrict out, int64_t ldo, int64_t nj, int64_t w) {
  constexpr int kRows = kBlocks * kFusedWidth;
  __m512 acc[kRows][kVec];
  __mmask16 m[kVec];
#pragma GCC unroll 8
  for (int i = 0; i < kVec; ++i) m[i] = lanes_below(w - 16 * i);
#pragma GCC unroll 16
  for (int u = 0; u < kRows; ++u) {
#pragma GCC unroll 8
    for (int i = 0; i < kVec; ++i) acc[u][i] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < d; ++k) {
    __m512 v[kVec];
#pragma GCC unroll 8
    for (int i = 0; i < kVec; ++i) v[i] = _mm512_loadu_ps(pk + k * kTileSamples + 16 * i);
#pragma GCC unroll 16
    for (int u = 0; u < kRows; ++u) {
      const __m512 g = _mm512_set1_ps(gp[((u / kFusedWidth) * d + k) * kFusedWidth + u % kFusedWidth]);
#pragma GCC unroll 8
      for (int i = 0; i < kVec; ++i) acc[u][i] = _mm512_fmadd_ps(g, v[i], acc[u][i]);
    }
  }
#pragma GCC unroll 16
  for (int u = 0; u < kRows; ++u) {
    if (u < nj) {
      const __m512 cu = _mm512_set1_ps(c[u]);
#pragma GCC unroll 8
      for (int i = 0; i < kVec; ++i) {
        const int64_t o = u * ldo + 16 * i;
        const __m512 t = _mm512_sub_ps(acc[u][i], cu);
        _mm512_mask_storeu_ps(out + o, m[i], _mm512_add_ps(_mm512_maskz_loadu_ps(m[i], gy + o), t));
      }
    }
  }
}

// Samples 0 .. len-1 of one run: src's feature rows lds apart (shifted by K with kShift), gy's and
// out's ldo apart. Tile by tile: the tile's values copied into this thread's packed tile, then every
// block of features against it; while on a block, the next tile's lines of the block's rows are
// requested (src and gy into L2, out for writing), as each row is a short stream of its own that the
// hardware prefetcher would pick up late.
template <bool kShift>
VCREG_AVX512_TARGET void fused_run(const float* src, int64_t lds, const float* K, const float* Gp, const float* c,
                                   int64_t d, const float* gy, float* out, int64_t ldo, int64_t len) {
  const int64_t nb = ceil_div(d, kFusedWidth);
  float* pk = scratch<float>(Scratch::kFusedTile, d * kTileSamples);
  for (int64_t l = 0; l < len; l += kTileSamples) {
    const int64_t w = std::min(kTileSamples, len - l), next = l + kTileSamples;
    for (int64_t k = 0; k < d; ++k) {
      const __m512 kk = _mm512_set1_ps(kShift ? K[k] : 0.0f);
      for (int i = 0; i < kTileSamples / 16; ++i) {
        __m512 v = _mm512_maskz_loadu_ps(lanes_below(w - 16 * i), src + k * lds + l + 16 * i);
        if constexpr (kShift) v = _mm512_sub_ps(v, kk);
        _mm512_storeu_ps(pk + k * kTileSamples + 16 * i, v);
      }
    }
    for (int64_t jb = 0; jb < nb; ++jb) {
      // A tile of one vector of samples takes two blocks of features: 8 FMA chains alone would wait
      // on their latency.
      const bool pair = w <= 16 && jb + 1 < nb;
      const int64_t j0 = jb * kFusedWidth, nj = std::min<int64_t>(pair ? 2 * kFusedWidth : kFusedWidth, d - j0);
      if (next < len) {
        for (int64_t r = j0; r < j0 + nj; ++r) {
          for (int64_t q = 0; q < kTileSamples; q += 16) {
            __builtin_prefetch(src + r * lds + next + q, 0, 2);
            __builtin_prefetch(gy + r * ldo + next + q, 0, 2);
            __builtin_prefetch(out + r * ldo + next + q, 1, 3);
          }
        }
      }
      const float* gp = Gp + jb * d * kFusedWidth;
      const float* t_gy = gy + j0 * ldo + l;
      float* t_out = out + j0 * ldo + l;
      if (w > 32) {
        fused_tile<3, 1>(pk, gp, d, c + j0, t_gy, t_out, ldo, nj, w);
      } else if (w > 16) {
        fused_tile<2, 1>(pk, gp, d, c + j0, t_gy, t_out, ldo, nj, w);
      } else if (pair) {
        fused_tile<1, 2>(pk, gp, d, c + j0, t_gy, t_out, ldo, nj, w);
        ++jb;
      } else {
        fused_tile<1, 1>(pk, gp, d, c + j0, t_gy, t_out, ldo, nj, w);
      }
    }
  }
}
#endif

// grad_x3 = gy3 + (S - 1 K^T) G - 1 c^T in the "bdl" layout, float32 throughout, where fused_apply(sh)
// holds: S the activation x3 (kShift; slab b at src + b d L, feature rows L apart) or the centred
// panel (src = P, sample (b, l) of feature k at P[k n + b L + l]; K unused). G: d x d, row-major.
template <bool kShift>
void apply_fused(const Shape& sh, const float* src, const float* K, const float* G, const float* c, const float* gy,
                 float* out) {
#if VCREG_AVX512
  const int64_t d = sh.d, L = sh.L, B = sh.n / sh.L;
  const int64_t nb = ceil_div(d, kFusedWidth);
  float* Gp = scratch<float>(Scratch::kPackedG, nb * d * kFusedWidth);
  for (int64_t jb = 0; jb < nb; ++jb) {
    for (int64_t k = 0; k < d; ++k) {
      for (int64_t u = 0; u < kFusedWidth; ++u) {
        const int64_t j = jb * kFusedWidth + u;
        Gp[(jb * d + k) * kFusedWidth + u] = j < d ? G[k * d + j] : 0.0f;
      }
    }
  }
  // Tasks: runs of about kFusedSamples samples of one slab, 16-sample multiples but for the last.
  int64_t runs = ceil_div(L, kFusedSamples);
  const int64_t len = ceil_div(ceil_div(L, runs), 16) * 16;
  runs = ceil_div(L, len);
  const int64_t slab = kShift ? d * L : L, lds = kShift ? L : sh.n;
  parallel_tasks(B * runs, [&](int64_t t) {
    const int64_t b = t / runs, l0 = (t % runs) * len, o = b * d * L + l0;
    fused_run<kShift>(src + b * slab + l0, lds, K, Gp, c, d, gy + o, out + o, L, std::min(len, L - l0));
  });
#else
  (void)sh, (void)src, (void)K, (void)G, (void)c, (void)gy, (void)out;
  TORCH_INTERNAL_ASSERT(false, "vcreg: apply_fused without AVX-512");
#endif
}

// grad_x3 = gy3 + (X - 1 K^T) G - 1 c^T, samples gathered panel by panel into the operand type op_t.
// G: (d x d) contiguous, in op_t; K, c: (d) in the accumulate dtype; out: contiguous like x3, in
// grad_t.
template <typename scalar_t, typename grad_t, typename op_t>
void apply_gathered(const Shape& sh, const scalar_t* x, const op_t* G, const at::opmath_type<scalar_t>* K,
                    const at::opmath_type<scalar_t>* c, const grad_t* gy, grad_t* o) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<op_t, float> && std::is_same_v<grad_t, float>) {
    if (fused_apply(sh)) return apply_fused<true>(sh, x, K, G, c, gy, o);
  }
  const int64_t d = sh.d, n = sh.n;
  // Panels of about kApplyPanelBytes, at least kApplyPanelSamples long (each product packs G again:
  // about 1/R of its own cost) unless that passes kApplyPanelMaxBytes. Their count is rounded up to
  // a multiple of kApplyPanelMultiple for balance where panels stay kMinApplyPanelSamples long,
  // else to an even count.
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(acc_t));
  const int64_t target = std::min(std::max(kApplyPanelSamples, kApplyPanelBytes / row_bytes),
                                  std::max(kMinGroupSamples, kApplyPanelMaxBytes / row_bytes));
  int64_t panels = ceil_div(n, target);
  const int64_t balanced = ceil_div(panels, kApplyPanelMultiple) * kApplyPanelMultiple;
  if (n / balanced >= kMinApplyPanelSamples) {
    panels = balanced;
  } else if (panels > 1) {
    panels = ceil_div(panels, 2) * 2;
  }
  const int64_t R = ceil_div(n, panels);
  panels = ceil_div(n, R);
  // Per thread: the gathered panel P (op_t), then the product T (acc_t), 64-byte aligned.
  const int64_t p_bytes = ceil_div(R * d * static_cast<int64_t>(sizeof(op_t)), 64) * 64;
  const int64_t task_bytes = p_bytes + ceil_div(R * d * static_cast<int64_t>(sizeof(acc_t)), 64) * 64;
  char* buf_all = static_cast<char*>(scratch_bytes(Scratch::kApply, at::get_num_threads() * task_bytes));

  parallel_tasks(panels, [&](int64_t p) {
    char* buf = buf_all + at::get_thread_num() * task_bytes;
    op_t* P = reinterpret_cast<op_t*>(buf);
    acc_t* T = reinterpret_cast<acc_t*>(buf + p_bytes);
    const int64_t s0 = p * R, cnt = std::min(R, n - s0);
    const int64_t ld = sh.rows() ? d : cnt;
    gather_shifted<false>(x, sh, s0, cnt, 0, d, K, P, ld, nullptr);
    if (sh.rows()) {
      gemm(false, P, ld, false, G, d, T, ld, cnt, d, d);
    } else {
      gemm(true, G, d, false, P, ld, T, ld, d, cnt, d);  // bdl panels are d x R: G^T P
    }
    add_grad<false>(T, ld, c, static_cast<const acc_t*>(nullptr), 0, gy, o, sh, s0, cnt, 0, d);
  });
}

// The (feature block x sample block) products of the panel and dual plans' applies: blocks of
// whole rows ("rows": the product's rows are grad_x's) or of up to kBlock features ("bdl"), and
// of kMinApplySamples or more samples whose product stays within block_bytes, at least
// kMinApplyTasks of them; fixed by n, d, the layout and the operand type.
struct ApplyGrid {
  int64_t nf, wf, ns, ls;
};

ApplyGrid apply_grid(int64_t n, int64_t d, int64_t elem_bytes, bool rows, int64_t block_bytes) {
  ApplyGrid g;
  g.nf = rows ? 1 : ceil_div(d, kBlock);
  const int64_t blocks = std::max(kMinApplyTasks, ceil_div(n * d * elem_bytes, block_bytes));
  const int64_t max_ns = std::max<int64_t>(1, n / kMinApplySamples);
  g.ns = std::clamp<int64_t>(ceil_div(blocks, g.nf), 1, max_ns);
  if (g.nf * g.ns < kMinApplyTasks) g.nf = std::min(ceil_div(kMinApplyTasks, g.ns), std::max<int64_t>(1, d / 32));
  g.wf = ceil_div(d, g.nf);
  g.nf = ceil_div(d, g.wf);
  // A multiple of kMinApplyTasks products, where the samples allow: as many for each of 1, 2 or 4
  // threads (of 5 products on 2 threads, the last one runs alone).
  for (int64_t ns = g.ns; ns <= max_ns; ++ns) {
    const int64_t ls = ceil_div(n, ns);
    if (g.nf * ceil_div(n, ls) % kMinApplyTasks == 0) {
      g.ns = ns;
      break;
    }
  }
  g.ls = ceil_div(n, g.ns);
  g.ns = ceil_div(n, g.ls);
  return g;
}

// grad_x3 = gy3 + P G (panel plan: P centred; G in the panel's operand type) or gy3 + P A + P diag(h)
// (dual plan: A is n x n; operands in the accumulate dtype).
template <bool kDual, typename acc_t, typename op_t, typename grad_t>
void apply_panel(const Shape& sh, const Panel<acc_t, op_t>& panel, const op_t* M, const acc_t* c, const grad_t* gy,
                 grad_t* o) {
  static_assert(!kDual || std::is_same_v<op_t, acc_t>);
  if constexpr (!kDual && std::is_same_v<acc_t, float> && std::is_same_v<op_t, float> &&
                std::is_same_v<grad_t, float>) {
    if (fused_apply(sh)) return apply_fused<false>(sh, panel.P, nullptr, M, c, gy, o);
  }
  const int64_t d = sh.d, n = sh.n, ldp = panel.ld;
  const op_t* P = panel.P;
  // Larger blocks pack G fewer times; bfloat16 products are fast enough that the smaller blocks'
  // gradient writes, from L2, count for more (2-core Xeon with AMX).
  const int64_t block_bytes = std::is_same_v<op_t, acc_t> ? kApplyBlockBytes : kApplyBlockBytes16;
  const ApplyGrid g = apply_grid(n, d, sizeof(acc_t), sh.rows(), block_bytes);
  acc_t* buf_all = scratch<acc_t>(Scratch::kApply, at::get_num_threads() * g.ls * g.wf);
  parallel_tasks(g.nf * g.ns, [&](int64_t q) {
    acc_t* T = buf_all + at::get_thread_num() * g.ls * g.wf;
    {
      const int64_t f = q / g.ns, s = q % g.ns;
      const int64_t j0 = f * g.wf, j1 = std::min(d, j0 + g.wf), w = j1 - j0;
      const int64_t s0 = s * g.ls, cnt = std::min(g.ls, n - s0);
      const int64_t ldt = sh.rows() ? w : cnt;
      if (sh.rows()) {
        if constexpr (kDual) {
          gemm(false, M + s0 * n, n, false, P + j0, ldp, T, ldt, cnt, w, n);  // A[s, :] P[:, f]
        } else {
          gemm(false, P + s0 * ldp, ldp, false, M + j0, d, T, ldt, cnt, w, d);  // P[s, :] G[:, f]
        }
      } else {
        if constexpr (kDual) {
          gemm(false, P + j0 * ldp, ldp, false, M + s0, n, T, ldt, w, cnt, n);  // (P^T)[f, :] A[:, s]
        } else {
          gemm(true, M + j0, d, false, P + s0, ldp, T, ldt, w, cnt, d);  // (G^T)[f, :] (P^T)[:, s]
        }
      }
      const acc_t* diag_operand = nullptr;  // kDual: the panel, whose P diag(h) is added
      if constexpr (kDual) diag_operand = P;
      add_grad<kDual>(T, ldt, c, diag_operand, ldp, gy, o, sh, s0, cnt, j0, j1);
    }
  });
}

// c = e^T G in float64 then acc_t: the image of the part e (d) of mu the shift leaves out.
template <typename acc_t>
std::vector<acc_t> shift_correction(const double* e, const acc_t* G, int64_t d) {
  std::vector<double> c(d, 0.0);
  parallel_tasks(ceil_div(d, kRowGrain), [&](int64_t b) {
    const int64_t j0 = b * kRowGrain, j1 = std::min(d, j0 + kRowGrain);
    for (int64_t i = 0; i < d; ++i) {
      const double ei = e[i];
      for (int64_t j = j0; j < j1; ++j) c[j] += ei * static_cast<double>(G[i * d + j]);
    }
  });
  return std::vector<acc_t>(c.begin(), c.end());
}

// The apply's operands in the layout its loops take, and its output, allocated up front: the
// backward allocates grad_x before the statistics' temporaries, so that it can take the block
// the previous step's gradient freed rather than fresh pages the kernel must fault in and zero.
struct ApplyIO {
  at::Tensor x3, gy3, out;
  bool same_dtype;
};

ApplyIO prepare_apply(const at::Tensor& gy3, const at::Tensor& x3) {
  ApplyIO io;
  io.x3 = x3;
  io.same_dtype = gy3.scalar_type() == x3.scalar_type();
  // grad_y in another dtype is added in the accumulate dtype, as the reference does; grad_x is
  // then converted back to grad_y's dtype.
  io.gy3 = io.same_dtype ? gy3 : gy3.to(accumulate_type(x3.scalar_type()));
  io.out = empty_output(x3.sizes(), io.gy3.scalar_type());
  return io;
}

// Calls f(gy, out) with grad_y's and grad_x's data in their element type.
template <typename scalar_t, typename F>
void with_grad_pointers(const ApplyIO& io, const F& f) {
  using acc_t = at::opmath_type<scalar_t>;
  if (io.same_dtype) {
    f(io.gy3.const_data_ptr<scalar_t>(), io.out.mutable_data_ptr<scalar_t>());
  } else {
    f(io.gy3.const_data_ptr<acc_t>(), io.out.mutable_data_ptr<acc_t>());
  }
}

// Where the dual plan runs (the top comment says why): no clip (G off its diagonal is then M2
// scaled), n at most d, and the panel within bounds.
bool use_dual(int64_t n, int64_t d, int64_t elem_bytes, const std::optional<double>& delta) {
  return !delta && n <= d && n * d * elem_bytes <= kPanelMaxBytes;
}

// The backward by the dual plan: G = kappa M2 + diag(h) with kappa = 4 beta / (d (d-1) (n-1)^2),
// so Xc G = kappa A Xc + Xc diag(h) with A = Xc Xc^T (n x n), and ||M2||_F = ||A||_F gives l_cov.
template <typename scalar_t>
std::pair<double, double> backward_dual(const ApplyIO& io, double alpha, double beta, double eps, double gamma) {
  using acc_t = at::opmath_type<scalar_t>;
  const Shape sh = shape_of(io.x3);
  const int64_t d = sh.d, n = sh.n;
  const Panel<acc_t> panel = gather_panel(io.x3.const_data_ptr<scalar_t>(), sh, /*squares=*/true);
  acc_t* A = scratch<acc_t>(Scratch::kGramAcc, n * n);
  const GramOperand<acc_t> op{panel.P, A};
  gram_upper(&op, 1, panel.ld, /*dim_major=*/sh.rows(), n, d, n);
  const double inv_nm1 = 1.0 / static_cast<double>(n - 1), dd = static_cast<double>(d);
  const double kappa = 4.0 * beta * inv_nm1 * inv_nm1 / (dd * (dd - 1.0));
  std::vector<acc_t> h(d);
  const double l_var = fill_diagonal(
      d, n, alpha, eps, gamma, [&](int64_t j) { return panel.sq[j]; },
      [&](int64_t j, double g) { h[j] = static_cast<acc_t>(g - kappa * panel.sq[j]); });
  // A scaled by kappa and mirrored, its squares summed per tile in tile order.
  double frob = 0.0, diag = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double a = static_cast<double>(A[i * n + i]);
    frob += a * a;
    A[i * n + i] = static_cast<acc_t>(kappa * a);
  }
  for (int64_t j = 0; j < d; ++j) diag += panel.sq[j] * panel.sq[j];
  std::vector<double> tile_frob(num_upper_tiles(n), 0.0);
  for_upper_tiles(n, [&](int64_t t, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    acc_t buf[kPassTile * kPassTile];
    const int64_t wj = j1 - j0;
    double sum = 0.0;
    for (int64_t i = i0; i < i1; ++i) {
      if (i + 4 < i1) prefetch_row(A + (i + 4) * n + j0, j1 - j0, /*write=*/false);
      double lanes[kLanes] = {};
      int64_t j = std::max(i + 1, j0);
      const auto element = [&](int64_t jj, int u) {
        const double a = static_cast<double>(A[i * n + jj]);
        lanes[u] += a * a;
        buf[(i - i0) * wj + (jj - j0)] = static_cast<acc_t>(kappa * a);
      };
      for (; j + kLanes <= j1; j += kLanes) {
        for (int u = 0; u < kLanes; ++u) element(j + u, u);
      }
      for (int u = 0; j < j1; ++j, ++u) element(j, u);
      sum += sum_lanes(lanes);
    }
    tile_frob[t] = sum;
    write_mirrored(buf, i0, i1, j0, j1, n, A);
  });
  for (const double v : tile_frob) frob += 2.0 * v;
  const double l_cov = d == 1 ? 0.0 : (frob - diag) * inv_nm1 * inv_nm1 / (dd * (dd - 1.0));
  with_grad_pointers<scalar_t>(io, [&](auto* gy, auto* o) { apply_panel<true>(sh, panel, A, h.data(), gy, o); });
  return {l_var, l_cov};
}

std::tuple<at::Tensor, at::Tensor> vcreg_stats_cpu(const at::Tensor& x3) {
  check_stats_args(x3);
  const int64_t d = x3.size(1), n = num_samples(x3);
  const auto f64 = x3.options().dtype(at::kDouble);
  const at::ScalarType acc = accumulate_type(x3.scalar_type());
  at::Tensor mu_t = at::empty({d}, f64), m2_t = at::empty({d, d}, x3.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x3.scalar_type(), "vcreg_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* M2 = m2_t.mutable_data_ptr<acc_t>();
    with_operand_type<scalar_t>(n, d, [&](auto* tag) {
      using op_t = std::remove_pointer_t<decltype(tag)>;
      // The panel plan's Q is M2 itself (centred panel): computed in place, mirrored below.
      const Moments<acc_t, op_t> m = gram_moments<scalar_t, op_t>(x3, M2);
      double* mu = mu_t.mutable_data_ptr<double>();
      for (int64_t j = 0; j < d; ++j) mu[j] = static_cast<double>(m.K[j]) + m.S[j] / static_cast<double>(n);
      if (m.Qa != nullptr) {
        centred_gram<true>(m.Qa, m.S.data(), d, n, M2);
      } else {
        centred_gram<false>(m.Qd, m.S.data(), d, n, M2);
      }
    });
  });
  return {mu_t.to(acc), m2_t};
}

at::Tensor vcreg_apply_cpu(const at::Tensor& gy3, const at::Tensor& x3, const at::Tensor& G_in,
                           const at::Tensor& mu_in) {
  check_apply_args(gy3, x3, G_in, mu_in);
  const ApplyIO io = prepare_apply(gy3, x3);
  const at::ScalarType acc = accumulate_type(io.x3.scalar_type());
  const at::Tensor G = G_in.to(acc).contiguous(), mu = mu_in.to(at::kDouble).contiguous();
  const int64_t d = io.x3.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, io.x3.scalar_type(), "vcreg_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // K' = mu rounded to the accumulate dtype; e = mu - K' restores what the rounding dropped
    // (at |mu|/std = 1000 in float32 it would be a 3e-5 relative error of the gradient).
    const double* mu64 = mu.const_data_ptr<double>();
    std::vector<acc_t> K(d);
    std::vector<double> e(d);
    for (int64_t j = 0; j < d; ++j) {
      K[j] = static_cast<acc_t>(mu64[j]);
      e[j] = mu64[j] - static_cast<double>(K[j]);
    }
    const acc_t* g = G.const_data_ptr<acc_t>();
    const std::vector<acc_t> c = shift_correction(e.data(), g, d);
    with_operand_type<scalar_t>(num_samples(io.x3), d, [&](auto* tag) {
      using op_t = std::remove_pointer_t<decltype(tag)>;
      const op_t* g_op = as_operand<op_t>(g, d * d);
      with_grad_pointers<scalar_t>(io, [&](auto* gy, auto* o) {
        apply_gathered(shape_of(io.x3), io.x3.const_data_ptr<scalar_t>(), g_op, K.data(), c.data(), gy, o);
      });
    });
  });
  return io.out.to(gy3.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> vcreg_backward_cpu(const at::Tensor& gy3, const at::Tensor& x3, double alpha,
                                                      double beta, double eps, double gamma,
                                                      std::optional<double> delta) {
  check_backward_args(gy3, x3);
  const ApplyIO io = prepare_apply(gy3, x3);
  const int64_t d = io.x3.size(1), n = num_samples(io.x3);
  const at::ScalarType acc = accumulate_type(io.x3.scalar_type());
  at::Tensor terms_t = at::empty({2}, io.x3.options().dtype(acc));
  Team::run([&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, io.x3.scalar_type(), "vcreg_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      std::pair<double, double> terms;
      with_operand_type<scalar_t>(n, d, [&](auto* tag) {
        using op_t = std::remove_pointer_t<decltype(tag)>;
        // The dual plan multiplies in the accumulate dtype only: its X_c G is kappa A X_c + X_c diag(h),
        // two terms that cancel where kappa M2's diagonal outweighs G's, so that A's error relative to
        // its own size, 2^-9 from bfloat16 operands, would be that many times larger in the gradient
        // (4e-2 at n = 2, d = 4 with the features' mean 100x their spread). Against bfloat16 operands
        // in the panel plan it pays where n <= d / 2 (SPEC section 7's shapes at batch 4 in bfloat16,
        // 2-core Xeon with AMX: at n / d = 0.26 it took 0.6x the panel's time, at n / d = 0.77 1.9x).
        if (use_dual(n, d, sizeof(acc_t), delta) && (std::is_same_v<op_t, acc_t> || 2 * n <= d)) {
          terms = backward_dual<scalar_t>(io, alpha, beta, eps, gamma);
          return;
        }
        const Moments<acc_t, op_t> m = gram_moments<scalar_t, op_t>(io.x3);
        // The panel plan's Q is scratch that nothing reads after G is formed: G takes its place, so
        // that the d x d pass writes memory the Gram products have just written rather than a buffer
        // that a network's other layers have long evicted. Each tile of the pass reads its part of Q's
        // upper triangle before writing it; the mirrored lower part and the diagonal, which
        // fill_diagonal writes first, are not read.
        acc_t* G = m.Qa != nullptr ? const_cast<acc_t*>(m.Qa) : scratch<acc_t>(Scratch::kG, d * d);
        terms = m.Qa != nullptr
                    ? fill_gradient_matrix<true>(m.Qa, m.S.data(), d, n, alpha, beta, eps, gamma, delta, G)
                    : fill_gradient_matrix<false>(m.Qd, m.S.data(), d, n, alpha, beta, eps, gamma, delta, G);
        const op_t* G_op = as_operand<op_t>(G, d * d);
        // The panel holds X - 1 (K + m)^T already: mu differs from K + m by the rounding of m, whose
        // image in the gradient is below float32's own rounding of it. Otherwise a fresh gather
        // shifts by K' = mu rounded to acc_t and subtracts the image c = (mu - K')^T G of that rounding.
        std::vector<acc_t> c(d, acc_t(0));
        if (m.Qa != nullptr) {
          with_grad_pointers<scalar_t>(io, [&](auto* gy, auto* o) {
            apply_panel<false>(shape_of(io.x3), m.panel, G_op, c.data(), gy, o);
          });
        } else {
          const double nd = static_cast<double>(n);
          std::vector<acc_t> K(d);
          std::vector<double> e(d);
          for (int64_t j = 0; j < d; ++j) {
            const double mu = static_cast<double>(m.K[j]) + m.S[j] / nd;
            K[j] = static_cast<acc_t>(mu);
            e[j] = mu - static_cast<double>(K[j]);
          }
          c = shift_correction(e.data(), G, d);
          with_grad_pointers<scalar_t>(io, [&](auto* gy, auto* o) {
            apply_gathered(shape_of(io.x3), io.x3.const_data_ptr<scalar_t>(), G_op, K.data(), c.data(), gy, o);
          });
        }
      });
      acc_t* t = terms_t.mutable_data_ptr<acc_t>();
      t[0] = static_cast<acc_t>(terms.first);
      t[1] = static_cast<acc_t>(terms.second);
    });
  });
  return {io.out.to(gy3.scalar_type()), terms_t};
}

// ---------------------------------------------------------------------------------------------
// The VICReg pair kernels (SPEC section 9; the top comment's "Pair kernels").

// sum (a - b)^2 over a row of w features, added to part (w).
template <typename scalar_t, typename acc_t>
inline void invariance_row(const scalar_t* __restrict a, const scalar_t* __restrict b, int64_t w,
                           acc_t* __restrict part) {
  for (int64_t j = 0; j < w; ++j) {
    const acc_t t = static_cast<acc_t>(a[j]) - static_cast<acc_t>(b[j]);
    part[j] += t * t;
  }
}

// sum (a - b)^2 over len consecutive values (one feature's run of samples in "bdl", or a block of
// a whole tensor) into lanes, lane u taking the values at u mod kLanes (shift_run's order).
template <typename scalar_t, typename acc_t>
inline void invariance_run(const scalar_t* __restrict a, const scalar_t* __restrict b, int64_t len,
                           acc_t* __restrict lane) {
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int u = 0; u < kLanes; ++u) {
      const acc_t t = static_cast<acc_t>(a[i + u]) - static_cast<acc_t>(b[i + u]);
      lane[u] += t * t;
    }
  }
  for (int u = 0; i < len; ++i, ++u) {
    const acc_t t = static_cast<acc_t>(a[i]) - static_cast<acc_t>(b[i]);
    lane[u] += t * t;
  }
}

// The pair panel's gather: features j0 <= j < j1 of every sample of both branches, Za - 1 Ka^T and
// Zb - 1 Kb^T into Pa and Pb (laid out as gather_shifted's P), their column sums into Sa, Sb and
// sum_s (Za - Zb)^2 into inv, per feature, in float64 from acc_t partial sums of at most kSumBlock
// values (gather_shifted's rule). Without kStore only the sums (Pa, Pb are not touched).
template <bool kStore, typename scalar_t, typename acc_t>
void gather_pair(const scalar_t* za, const scalar_t* zb, const Shape& sh, int64_t j0, int64_t j1, const acc_t* Ka,
                 const acc_t* Kb, acc_t* Pa, acc_t* Pb, int64_t ldp, double* Sa, double* Sb, double* inv) {
  const int64_t d = sh.d, w = j1 - j0;
  if (sh.rows()) {
    // kSumBlock rows at a time: each branch's gather_shifted (the same partial sums as one call
    // over all rows), then the invariance sum over the rows just read, from cache.
    std::vector<acc_t> part(w);
    for (int64_t r0 = 0; r0 < sh.n; r0 += kSumBlock) {
      const int64_t cnt = std::min(kSumBlock, sh.n - r0);
      gather_shifted<true, kStore>(za, sh, r0, cnt, j0, j1, Ka, kStore ? Pa + r0 * ldp : nullptr, ldp, Sa);
      gather_shifted<true, kStore>(zb, sh, r0, cnt, j0, j1, Kb, kStore ? Pb + r0 * ldp : nullptr, ldp, Sb);
      std::fill(part.begin(), part.end(), acc_t(0));
      for (int64_t r = r0; r < r0 + cnt; ++r) invariance_row(za + r * d + j0, zb + r * d + j0, w, part.data());
      for (int64_t j = 0; j < w; ++j) inv[j0 + j] += part[j];
    }
    return;
  }
  for_each_run(sh, 0, sh.n, [&](int64_t b, int64_t l, int64_t r, int64_t len) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t o = (b * d + j) * sh.L + l;
      for (const scalar_t* z : {za, zb}) {
        prefetch(z + o + sh.L, /*write=*/false);
        prefetch(z + o + sh.L + 16, /*write=*/false);
      }
      for (int64_t i0 = 0; i0 < len; i0 += kLanes * kSumBlock) {
        // Three loops over the same few KiB: the second read of each value comes from L1 (one
        // loop over both branches' values and both panels ran at 0.7 of this speed).
        const int64_t m = std::min(len - i0, kLanes * kSumBlock);
        acc_t la[kLanes] = {}, lb[kLanes] = {}, li[kLanes] = {};
        shift_run<true, kStore>(za + o + i0, Ka[j], kStore ? Pa + j * ldp + r + i0 : nullptr, m, la);
        shift_run<true, kStore>(zb + o + i0, Kb[j], kStore ? Pb + j * ldp + r + i0 : nullptr, m, lb);
        invariance_run(za + o + i0, zb + o + i0, m, li);
        Sa[j] += static_cast<double>(sum_lanes(la));
        Sb[j] += static_cast<double>(sum_lanes(lb));
        inv[j] += static_cast<double>(sum_lanes(li));
      }
    }
  });
}

// sum (Z_a - Z_b)^2 over the count values of two contiguous tensors of one shape, for the plans
// that gather each branch on its own: fixed chunks of kInvarianceChunk values, each in acc_t lanes
// of at most kSumBlock values per partial sum, then in float64, chunks added in order.
template <typename scalar_t>
double invariance_sum(const scalar_t* a, const scalar_t* b, int64_t count) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nchunks = ceil_div(count, kInvarianceChunk);
  std::vector<double> part(nchunks, 0.0);
  parallel_tasks(nchunks, [&](int64_t q) {
    const int64_t i1 = std::min(count, (q + 1) * kInvarianceChunk);
    double sum = 0.0;
    for (int64_t k0 = q * kInvarianceChunk; k0 < i1; k0 += kLanes * kSumBlock) {
      const int64_t k1 = std::min(i1, k0 + kLanes * kSumBlock);
      acc_t lane[kLanes] = {};
      invariance_run(a + k0, b + k0, k1 - k0, lane);
      sum += static_cast<double>(sum_lanes(lane));
    }
    part[q] = sum;
  });
  double total = 0.0;
  for (const double v : part) total += v;
  return total;
}

// Where pair_stats gathers both branches at once (the top comment says why): the panel plan, with
// both panels together within kPanelMaxBytes.
bool use_pair_panel(int64_t n, int64_t d, int64_t elem_bytes) {
  return gram_kind(n, d, elem_bytes) == GramKind::kPanel && 2 * n * d * elem_bytes <= kPanelMaxBytes;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> vicreg_pair_stats_cpu(const at::Tensor& za3,
                                                                                              const at::Tensor& zb3) {
  check_pair_args(za3, zb3);
  TORCH_CHECK_VALUE(num_samples(za3) >= 1, "vcreg: z_a and z_b have no samples, shape ", za3.sizes());
  const int64_t d = za3.size(1), n = num_samples(za3);
  const at::ScalarType acc = accumulate_type(za3.scalar_type());
  const auto f64 = za3.options().dtype(at::kDouble);
  at::Tensor mu_t[2] = {at::empty({d}, f64), at::empty({d}, f64)};
  at::Tensor m2_t[2] = {at::empty({d, d}, za3.options().dtype(acc)), at::empty({d, d}, za3.options().dtype(acc))};
  at::Tensor inv_t = at::empty({}, za3.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, za3.scalar_type(), "vicreg_pair_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Shape sh = shape_of(za3);
    const scalar_t* z[2] = {za3.const_data_ptr<scalar_t>(), zb3.const_data_ptr<scalar_t>()};
    acc_t* M2[2] = {m2_t[0].mutable_data_ptr<acc_t>(), m2_t[1].mutable_data_ptr<acc_t>()};
    std::vector<acc_t> K[2];
    std::vector<double> S[2];
    double inv = 0.0;
    with_operand_type<scalar_t>(n, d, [&](auto* tag) {
      using op_t = std::remove_pointer_t<decltype(tag)>;
      if (use_pair_panel(n, d, sizeof(acc_t))) {
        // Both branches' centred panels from one read of each, the invariance sum from the same
        // reads; each Q is M2 itself, computed in place in the returned tensor and mirrored below.
        for (int br = 0; br < 2; ++br) {
          K[br] = shift_of<scalar_t, acc_t>(z[br], sh);
          S[br].assign(d, 0.0);
        }
        std::vector<double> inv_j(d, 0.0);
        const int64_t ld = sh.rows() ? d : n;
        op_t* P[2] = {scratch<op_t>(Scratch::kGramPanel, 2 * n * d), nullptr};
        P[1] = P[0] + n * d;
        std::vector<acc_t> m[2] = {std::vector<acc_t>(d), std::vector<acc_t>(d)};
        // As gather_panel: in acc_t shifted by K, then centred in place; in a narrower op_t the sums
        // first, then X - 1 (K + m)^T rounded once to op_t.
        parallel_tasks(ceil_div(d, kGatherFeatures), [&](int64_t f) {
          const int64_t j0 = f * kGatherFeatures, j1 = std::min(d, j0 + kGatherFeatures);
          constexpr bool kInPlace = std::is_same_v<op_t, acc_t>;
          acc_t* Pacc[2] = {nullptr, nullptr};
          if constexpr (kInPlace) Pacc[0] = P[0], Pacc[1] = P[1];
          gather_pair<kInPlace>(z[0], z[1], sh, j0, j1, K[0].data(), K[1].data(), Pacc[0], Pacc[1], ld,
                                S[0].data(), S[1].data(), inv_j.data());
          for (int br = 0; br < 2; ++br) {
            for (int64_t j = j0; j < j1; ++j) m[br][j] = static_cast<acc_t>(S[br][j] / static_cast<double>(n));
            if constexpr (kInPlace) {
              centre_columns<false>(sh, Pacc[br], ld, j0, j1, m[br].data(), nullptr);
            } else {
              for (int64_t j = j0; j < j1; ++j) m[br][j] += K[br][j];
              gather_shifted<false>(z[br], sh, 0, n, j0, j1, m[br].data(), P[br], ld, nullptr);
            }
          }
        });
        const GramOperand<acc_t, op_t> ops[2] = {{P[0], M2[0]}, {P[1], M2[1]}};
        gram_upper(ops, 2, ld, /*dim_major=*/!sh.rows(), d, n, d);
        for (int br = 0; br < 2; ++br) centred_gram<true>(M2[br], S[br].data(), d, n, M2[br]);
        for (const double v : inv_j) inv += v;
      } else {
        for (int br = 0; br < 2; ++br) {
          const Moments<acc_t, op_t> mo = gram_moments<scalar_t, op_t>(br == 0 ? za3 : zb3, M2[br]);
          K[br] = mo.K;
          S[br] = mo.S;
          if (mo.Qa != nullptr) {
            centred_gram<true>(mo.Qa, S[br].data(), d, n, M2[br]);
          } else {
            centred_gram<false>(mo.Qd, S[br].data(), d, n, M2[br]);
          }
        }
        inv = invariance_sum(z[0], z[1], n * d);
      }
    });
    for (int br = 0; br < 2; ++br) {
      double* mu = mu_t[br].mutable_data_ptr<double>();
      for (int64_t j = 0; j < d; ++j) mu[j] = static_cast<double>(K[br][j]) + S[br][j] / static_cast<double>(n);
    }
    *inv_t.mutable_data_ptr<acc_t>() = static_cast<acc_t>(inv);
  });
  return {mu_t[0].to(acc), m2_t[0], mu_t[1].to(acc), m2_t[1], inv_t};
}

// Both gradients over features j0 <= j < j1 of samples s0 .. s0+count-1, from the products
// Ta = (Za - 1 Ka^T) Ga and Tb (laid out as add_grad's T, leading dimension ldt):
//   grad_a = g (Ta - 1 ca^T + c (Za - Zb)),   grad_b = g (Tb - 1 cb^T - c (Za - Zb)),
// the difference formed in acc_t from one read of each branch, rounded to scalar_t last.
template <typename scalar_t, typename acc_t>
inline void pair_grad_row(const scalar_t* __restrict a, const scalar_t* __restrict b, const acc_t* __restrict ta,
                          const acc_t* __restrict tb, const acc_t* __restrict ca, const acc_t* __restrict cb, acc_t g,
                          acc_t c, scalar_t* __restrict oa, scalar_t* __restrict ob, int64_t w) {
  int64_t j = 0;
#if VCREG_AVX512
  if constexpr (std::is_same_v<scalar_t, at::BFloat16> && std::is_same_v<acc_t, float>) {
    if (avx512_bf16_loops()) j = pair_grad_avx512(a, b, ta, tb, 0.0f, 0.0f, ca, cb, g, c, oa, ob, w);
  }
#endif
  for (; j < w; ++j) {
    const acc_t inv = (static_cast<acc_t>(a[j]) - static_cast<acc_t>(b[j])) * c;
    oa[j] = static_cast<scalar_t>((ta[j] - ca[j] + inv) * g);
    ob[j] = static_cast<scalar_t>((tb[j] - cb[j] - inv) * g);
  }
}

template <typename scalar_t, typename acc_t>
inline void pair_grad_run(const scalar_t* __restrict a, const scalar_t* __restrict b, const acc_t* __restrict ta,
                          const acc_t* __restrict tb, acc_t ca, acc_t cb, acc_t g, acc_t c, scalar_t* __restrict oa,
                          scalar_t* __restrict ob, int64_t len) {
  int64_t i = 0;
#if VCREG_AVX512
  if constexpr (std::is_same_v<scalar_t, at::BFloat16> && std::is_same_v<acc_t, float>) {
    if (avx512_bf16_loops()) i = pair_grad_avx512(a, b, ta, tb, ca, cb, nullptr, nullptr, g, c, oa, ob, len);
  }
#endif
  for (; i < len; ++i) {
    const acc_t inv = (static_cast<acc_t>(a[i]) - static_cast<acc_t>(b[i])) * c;
    oa[i] = static_cast<scalar_t>((ta[i] - ca + inv) * g);
    ob[i] = static_cast<scalar_t>((tb[i] - cb - inv) * g);
  }
}

template <typename scalar_t, typename acc_t>
void pair_grads(const acc_t* Ta, const acc_t* Tb, int64_t ldt, const acc_t* ca, const acc_t* cb, acc_t g, acc_t c,
                const scalar_t* za, const scalar_t* zb, scalar_t* oa, scalar_t* ob, const Shape& sh, int64_t s0,
                int64_t count, int64_t j0, int64_t j1) {
  const int64_t d = sh.d;
  if (sh.rows()) {
    for (int64_t r = 0; r < count; ++r) {
      const int64_t o = (s0 + r) * d + j0;
      pair_grad_row(za + o, zb + o, Ta + r * ldt, Tb + r * ldt, ca + j0, cb + j0, g, c, oa + o, ob + o, j1 - j0);
    }
    return;
  }
  for_each_run(sh, s0, count, [&](int64_t b, int64_t l, int64_t r, int64_t len) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t o = (b * d + j) * sh.L + l, t = (j - j0) * ldt + r;
      pair_grad_run(za + o, zb + o, Ta + t, Tb + t, ca[j], cb[j], g, c, oa + o, ob + o, len);
    }
  });
}

// The pair apply's operands for one branch: G in acc_t, G_op: G in the operand type op_t (G itself,
// or rounded to bfloat16 into buf, d x d), the shift K' = mu rounded to acc_t, and the image
// c = (mu - K')^T G of that rounding (zero, and not computed, where mu is in acc_t already).
template <typename acc_t, typename op_t>
struct PairBranch {
  at::Tensor G;
  const op_t* G_op = nullptr;
  std::vector<acc_t> K, c;
};

template <typename acc_t, typename op_t>
PairBranch<acc_t, op_t> pair_branch(const at::Tensor& G_in, const at::Tensor& mu_in, op_t* buf) {
  PairBranch<acc_t, op_t> p;
  p.G = G_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  p.G_op = as_operand<op_t>(p.G.template const_data_ptr<acc_t>(), p.G.numel(), buf);
  const at::Tensor mu = mu_in.to(at::kDouble).contiguous();
  const double* mu64 = mu.const_data_ptr<double>();
  const int64_t d = mu.numel();
  p.K.resize(d);
  std::vector<double> e(d);
  bool rounded = false;
  for (int64_t j = 0; j < d; ++j) {
    p.K[j] = static_cast<acc_t>(mu64[j]);
    e[j] = mu64[j] - static_cast<double>(p.K[j]);
    rounded = rounded || e[j] != 0.0;
  }
  p.c = rounded ? shift_correction(e.data(), p.G.template const_data_ptr<acc_t>(), d) : std::vector<acc_t>(d, acc_t(0));
  return p;
}

// grad_a, grad_b (contiguous like za3) of the pair apply. Both branches' samples are gathered
// shifted, panel by panel (one panel each where both fit in kPanelMaxBytes together); each panel's
// tasks are (feature block x sample block) products of both branches, each writing both gradients.
template <typename scalar_t, typename op_t>
void apply_pair(const Shape& sh, const scalar_t* za, const scalar_t* zb,
                const PairBranch<at::opmath_type<scalar_t>, op_t>& A,
                const PairBranch<at::opmath_type<scalar_t>, op_t>& B, at::opmath_type<scalar_t> g,
                at::opmath_type<scalar_t> c, scalar_t* oa, scalar_t* ob) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t d = sh.d, n = sh.n, elem = sizeof(acc_t);
  // Both branches' panels together within kPanelMaxBytes: the scratch pair_stats may keep.
  int64_t len = std::max(kMinApplySamples, kPanelMaxBytes / (2 * d * elem));
  len = ceil_div(n, ceil_div(n, len));  // equal panels
  // Column blocks of G against sample blocks (the top comment says why), at least kMinApplyTasks
  // tasks per panel where the shape allows.
  int64_t nf = ceil_div(d, kPairFeatures), ns = ceil_div(len, kPairSamples);
  if (nf * ns < kMinApplyTasks) {
    ns = std::clamp<int64_t>(ceil_div(kMinApplyTasks, nf), 1, std::max<int64_t>(1, len / kMinApplySamples));
  }
  if (nf * ns < kMinApplyTasks) nf = std::min(ceil_div(kMinApplyTasks, ns), std::max<int64_t>(1, d / 32));
  const std::vector<int64_t> fe = block_edges(d, nf);
  nf = static_cast<int64_t>(fe.size()) - 1;
  int64_t wf = 0;
  for (int64_t f = 0; f < nf; ++f) wf = std::max(wf, fe[f + 1] - fe[f]);
  const int64_t ls = ceil_div(len, ns);
  op_t* Pa = scratch<op_t>(Scratch::kGramPanel, 2 * len * d);
  op_t* Pb = Pa + len * d;
  acc_t* T_all = scratch<acc_t>(Scratch::kApply, at::get_num_threads() * 2 * ls * wf);
  const op_t *Ga = A.G_op, *Gb = B.G_op;
  for (int64_t s0 = 0; s0 < n; s0 += len) {
    const int64_t cnt = std::min(len, n - s0), ld = sh.rows() ? d : cnt;
    // The gather is elementwise: its split changes no result. Whole rows in "rows" (contiguous
    // reads), feature blocks in "bdl" (each feature's samples are a run).
    if (sh.rows()) {
      parallel_tasks(ceil_div(cnt, kGatherRows), [&](int64_t q) {
        const int64_t r0 = q * kGatherRows, k = std::min(kGatherRows, cnt - r0);
        gather_shifted<false>(za, sh, s0 + r0, k, 0, d, A.K.data(), Pa + r0 * ld, ld, nullptr);
        gather_shifted<false>(zb, sh, s0 + r0, k, 0, d, B.K.data(), Pb + r0 * ld, ld, nullptr);
      });
    } else {
      parallel_tasks(ceil_div(d, kGatherFeatures), [&](int64_t f) {
        const int64_t j0 = f * kGatherFeatures, j1 = std::min(d, j0 + kGatherFeatures);
        gather_shifted<false>(za, sh, s0, cnt, j0, j1, A.K.data(), Pa, ld, nullptr);
        gather_shifted<false>(zb, sh, s0, cnt, j0, j1, B.K.data(), Pb, ld, nullptr);
      });
    }
    const int64_t nsp = ceil_div(cnt, ls);
    parallel_tasks(nf * nsp, [&](int64_t q) {
      acc_t* Ta = T_all + at::get_thread_num() * 2 * ls * wf;
      acc_t* Tb = Ta + ls * wf;
      const int64_t j0 = fe[q / nsp], w = fe[q / nsp + 1] - j0;
      const int64_t r0 = (q % nsp) * ls, k = std::min(ls, cnt - r0);
      const int64_t ldt = sh.rows() ? w : k;
      for (int br = 0; br < 2; ++br) {
        const op_t* P = br == 0 ? Pa : Pb;
        const op_t* G = br == 0 ? Ga : Gb;
        acc_t* T = br == 0 ? Ta : Tb;
        if (sh.rows()) {
          gemm(false, P + r0 * ld, ld, false, G + j0, d, T, ldt, k, w, d);  // P[s, :] G[:, f]
        } else {
          gemm(true, G + j0, d, false, P + r0, ld, T, ldt, w, k, d);  // (G^T)[f, :] (P^T)[:, s]
        }
      }
      pair_grads(Ta, Tb, ldt, A.c.data(), B.c.data(), g, c, za, zb, oa, ob, sh, s0 + r0, k, j0, j0 + w);
    });
  }
}

std::tuple<at::Tensor, at::Tensor> vicreg_pair_apply_cpu(const at::Tensor& g_t, const at::Tensor& za3,
                                                         const at::Tensor& zb3, const at::Tensor& G_a,
                                                         const at::Tensor& mu_a, const at::Tensor& G_b,
                                                         const at::Tensor& mu_b, const at::Tensor& c_t) {
  check_pair_apply_args(g_t, za3, zb3, G_a, mu_a, G_b, mu_b, c_t);
  // Allocated before the operands' temporaries, as prepare_apply's output (its comment says why).
  at::Tensor out_a = at::empty(za3.sizes(), za3.options()), out_b = at::empty(zb3.sizes(), zb3.options());
  if (num_samples(za3) == 0) return {out_a, out_b};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, za3.scalar_type(), "vicreg_pair_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_operand_type<scalar_t>(num_samples(za3), za3.size(1), [&](auto* tag) {
      using op_t = std::remove_pointer_t<decltype(tag)>;
      // Both branches' G in op_t: this thread's scratch (a d x d operand each), where op_t is not acc_t.
      const int64_t dd = za3.size(1) * za3.size(1);
      op_t* buf = std::is_same_v<op_t, acc_t> ? nullptr : scratch<op_t>(Scratch::kOperandG, 2 * dd);
      const PairBranch<acc_t, op_t> A = pair_branch<acc_t, op_t>(G_a, mu_a, buf),
                                    B = pair_branch<acc_t, op_t>(G_b, mu_b, buf == nullptr ? nullptr : buf + dd);
      apply_pair<scalar_t, op_t>(shape_of(za3), za3.const_data_ptr<scalar_t>(), zb3.const_data_ptr<scalar_t>(), A, B,
                                 static_cast<acc_t>(g_t.item<double>()), static_cast<acc_t>(c_t.item<double>()),
                                 out_a.mutable_data_ptr<scalar_t>(), out_b.mutable_data_ptr<scalar_t>());
    });
  });
  return {out_a, out_b};
}

}  // namespace
}  // namespace vcreg

TORCH_LIBRARY_IMPL(vcreg, CPU, m) {
  m.impl("backward_kernel", &vcreg::vcreg_backward_cpu);
  m.impl("stats_kernel", &vcreg::vcreg_stats_cpu);
  m.impl("apply_kernel", &vcreg::vcreg_apply_cpu);
  m.impl("pair_stats_kernel", &vcreg::vicreg_pair_stats_cpu);
  m.impl("pair_apply_kernel", &vcreg::vicreg_pair_apply_cpu);
}
