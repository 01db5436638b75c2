// The GEMM / conv run time declared in ffi_runtime.h: chain planning, batch broadcasting, tiling
// and the workers.  Baseline flags: the per-ISA work happens behind Job::fn.
#include "ffi_runtime.h"

#include <algorithm>

namespace jdfp {
namespace {

// Default inline threshold on batch * M * N * K: 2**23 (~203**3).  On the 2-core Zen 5 VM under load,
// inline ran 128**3 in 17-20 us vs 34-46 us pooled, 192**3 in 42-49 vs 59-72 us (docs/op_costs.md).
constexpr int64_t kInlineWork = int64_t(1) << 23;

// Chains of the contract cut into pieces and grouped into kc blocks of at most kc_pairs pairs.
void build_chains(Job& j, int64_t K, int64_t block_k, int64_t KB, int64_t C, int32_t kc_pairs) {
  auto& pcs = j.pieces;
  auto& kcb = j.kcb;
  int32_t cur_begin = 0, cur_pairs = 0;
  auto close = [&]() {
    const int32_t end = int32_t(pcs.size());
    if (end == cur_begin) return;
    KcBlock b{};
    b.piece_begin = cur_begin;
    b.piece_end = end;
    b.pairs = cur_pairs;
    b.blk_first = pcs[cur_begin].blk;
    b.nblk = pcs[end - 1].blk - b.blk_first + 1;
    for (int32_t i = cur_begin; i < end; ++i) pcs[i].bl = pcs[i].blk - b.blk_first;
    kcb.push_back(b);
    cur_begin = end;
    cur_pairs = 0;
  };
  for (int64_t blk = 0; blk < KB; ++blk) {
    const int64_t bs = blk * block_k, be = std::min(bs + block_k, K);
    for (int64_t cs = bs; cs < be; cs += C) {
      const int64_t len = std::min(C, be - cs);
      const int64_t cp = (len + 1) / 2;
      if (cp <= kc_pairs) {
        if (cur_pairs + cp > kc_pairs) close();
        pcs.push_back(Piece{cs, int32_t(len), int32_t(cp), int32_t(blk), 0});
        cur_pairs += int32_t(cp);
      } else {
        // A chain longer than a kc block: split at even offsets (each piece is summed exactly on its own).
        close();
        for (int64_t o = 0; o < len; o += 2 * int64_t(kc_pairs)) {
          const int64_t pl = std::min<int64_t>(2 * int64_t(kc_pairs), len - o);
          const bool last = o + pl >= len;
          pcs.push_back(Piece{cs + o, int32_t(pl), int32_t((pl + 1) / 2), int32_t(blk), 0});
          cur_pairs += int32_t((pl + 1) / 2);
          if (!last) close();
        }
      }
    }
  }
  close();
}

// The error of a tile that met an int16 operand value outside [-qmax, qmax] (bad: 1 = A, 2 = B).
ffi::Error range_error(const Job& job, int bad) {
  const bool is_a = bad == 1;
  const std::string& nm = is_a ? job.name_a : job.name_b;
  return invalid_as(job.who, job.operand_type + " operand " + nm + " has a value outside [-qmax, qmax] for bits_" + nm + "=" +
                                 std::to_string(is_a ? job.bits_a : job.bits_b) +
                                 " (qmax = 2**(bits-1) - 1; -32768 is never valid)");
}

void run_worker(const std::shared_ptr<Job>& job) {
  int bad = 0;
  int64_t done = 0;
  {
    const WorkerFpEnv fp_env;
    // Own chunk first, then the others' in turn: every tile is claimed exactly once (fetch_add on
    // its chunk's cursor), whoever shows up, so the calling thread alone can always finish the op.
    const int64_t nc = job->nchunks;
    const int64_t first = job->next_worker.fetch_add(1, std::memory_order_relaxed) % nc;
    for (int64_t i = 0; i < nc; ++i) {
      const int64_t c = (first + i) % nc;
      for (;;) {
        const int64_t t = job->cursor[size_t(c)].fetch_add(1, std::memory_order_relaxed);
        if (t >= job->chunk_end[size_t(c)]) break;
        ++done;
        if (bad) continue;  // keep draining so the count stays right; the output is an error anyway
        bad = job->tile_fn ? job->tile_fn(job->tiles[size_t(t)]) : job->fn(job->P, job->tiles[size_t(t)]);
      }
    }
  }
  // The promise counts tiles, not workers: a scheduled worker that starts late (or never, while
  // the pool threads sit in a collective's rendezvous waiting for this very op) finds no tiles and
  // owes nothing, so the calling thread alone can always complete the op. No deadlock under pmap.
  if (done == 0) return;
  if (bad) {
    job->done.CountDown(size_t(done), range_error(*job, bad));
  } else {
    job->done.CountDown(size_t(done));
  }
}

// Tile sizes: big enough to amortize packing (B over mb rows, A over nb columns), small enough to
// give every worker several tiles so a busy core does not leave the others idle at the end.
}  // namespace

void Job::reset() {
  P = Problem{};
  pieces.clear();
  kcb.clear();
  a_off.clear(); b_off.clear(); ea_off.clear(); eb_off.clear();
  tiles.clear();
  fn = nullptr;
  tile_fn = nullptr;
  nchunks = 1;
  chunk_end.clear();
  next_worker.store(0, std::memory_order_relaxed);
  done = ffi::CountDownPromise();
  bits_a = bits_b = 0;
  who = "gemm"; name_a = "a"; name_b = "b";
  operand_type = "int16";
  conv = ConvGeom{};
  c_off.clear();
}

std::shared_ptr<Job> reusable_job() {
  thread_local std::shared_ptr<Job> last;
  // use_count() is a relaxed read: the fence orders it after the release by which the pool tasks
  // dropped their references, so their last reads of the job happen before the reset below.
  if (last && last.use_count() == 1) {
    std::atomic_thread_fence(std::memory_order_acquire);
    last->reset();
  } else {
    last = std::make_shared<Job>();
  }
  return last;
}

uint64_t next_job_id() {
  static std::atomic<uint64_t> seq{0};
  return seq.fetch_add(1, std::memory_order_relaxed) + 1;
}

// A deep GEMM (K at least 8x its larger side, e.g. a weight gradient: 576 x 32768 x 64) of one batch
// element whose other side fits one tile: one tile per worker along the larger side.  Every tile
// streams the whole of its K range of both packed operands, so the usual 4 tiles per worker cost
// more in re-read B panels and per-kc-block work than they gain in balance (measured on a 2-core
// Zen 4: the INT16 576 x 32768 x 64 weight gradient 11 ms against 16-18 ms in 48-row tiles; the
// DFP16 conv's 64 x 32768 x 576 one 9 ms against 10-11 ms).  Tiles at most 384 rows (measured up
// to 288) or 512 columns, so a kc block's packed A still stays near L2.  False (tiles untouched)
// otherwise.
bool deep_split(int mr, int nr, int64_t nthreads, int64_t nbatch, int64_t M, int64_t N, int64_t K, int64_t& mb,
                int64_t& nb) {
  auto rup = [](int64_t x, int64_t m) { return (x + m - 1) / m * m; };
  if (nbatch != 1 || K < 8 * std::max(M, N)) return false;
  const int64_t rows = rup((M + nthreads - 1) / nthreads, mr), cols = rup((N + nthreads - 1) / nthreads, nr);
  if (M >= N && rup(N, nr) <= nb && rows <= 384) {
    mb = rows;
    nb = rup(N, nr);
    return true;
  }
  if (N > M && rup(M, mr) <= mb && cols <= 512) {
    nb = cols;
    mb = rup(M, mr);
    return true;
  }
  return false;
}

namespace {

void tile_sizes(int isa_mr, int isa_nr, int64_t nthreads, int64_t nbatch, int64_t M, int64_t N, int64_t K,
                int64_t& mb, int64_t& nb) {
  struct {
    int mr, nr;
  } isa{isa_mr, isa_nr};
  auto rup = [](int64_t x, int64_t m) { return (x + m - 1) / m * m; };
  static const int64_t tm_env = env_knob("JDFP_TILE_M"), tn_env = env_knob("JDFP_TILE_N");
  mb = std::min(rup(M, isa.mr), tm_env > 0 ? rup(tm_env, isa.mr) : int64_t(isa.mr) * std::max(1, 192 / isa.mr));
  nb = std::min(rup(N, isa.nr), tn_env > 0 ? rup(tn_env, isa.nr) : int64_t(512));
  auto count = [&]() { return nbatch * ((M + mb - 1) / mb) * ((N + nb - 1) / nb); };
  if (nthreads <= 1 || count() >= 4 * nthreads) return;
  if (tm_env <= 0 && tn_env <= 0 && deep_split(isa.mr, isa.nr, nthreads, nbatch, M, N, K, mb, nb)) return;
  while (count() < 4 * nthreads) {
    if (nb >= 2 * 128 && nb >= mb) nb = rup(nb / 2, isa.nr);
    else if (mb >= 2 * 4 * isa.mr) mb = rup(mb / 2, isa.mr);
    else if (nb >= 2 * 64) nb = rup(nb / 2, isa.nr);
    else break;
  }
}

// One contiguous chunk of tiles per worker (see Job).
void split_chunks(Job& job, int64_t nworkers) {
  const int64_t ntiles = int64_t(job.tiles.size());
  job.nchunks = nworkers;
  if (job.cursor_cap < nworkers) {
    job.cursor.reset(new std::atomic<int64_t>[size_t(nworkers)]);
    job.cursor_cap = nworkers;
  }
  job.chunk_end.assign(size_t(nworkers), 0);
  for (int64_t c = 0; c < nworkers; ++c) {
    job.cursor[size_t(c)].store(ntiles * c / nworkers, std::memory_order_relaxed);
    job.chunk_end[size_t(c)] = ntiles * (c + 1) / nworkers;
  }
}

}  // namespace

void plan_chains(Job& j, int64_t K, int64_t block_k, int64_t KB, int64_t C, int32_t isa_kc_pairs) {
  static const int64_t kc_env = env_knob("JDFP_KC_PAIRS");
  // At most kMaxWhPieces pieces per kc block (each piece is at least one pair): the SIMD kernels'
  // int32-pair block sums need it (gemm_driver.h, macro_kernel).
  const int64_t kcp = std::min<int64_t>(kc_env > 0 ? kc_env : isa_kc_pairs, kMaxWhPieces);
  build_chains(j, K, block_k, KB, C, int32_t(kcp));
  Problem& P = j.P;
  P.pieces = j.pieces.data();
  P.kcb = j.kcb.data();
  P.nkcb = int64_t(j.kcb.size());
  P.max_pairs = 0;
  P.max_nblk = 0;
  for (const auto& kb : j.kcb) {
    P.max_pairs = std::max(P.max_pairs, kb.pairs);
    P.max_nblk = std::max(P.max_nblk, kb.nblk);
  }
}

bool batch_offsets(ffi::Span<const int64_t> d, const std::vector<int64_t>& ob, int64_t mat_elems,
                   std::vector<int64_t>& off) {
  const size_t nb = ob.size(), db = d.size() - 2;
  if (db > nb) return false;
  // Strides and the index on the stack for up to 8 batch dims (no heap allocation per call).
  int64_t small[16];
  std::vector<int64_t> big(nb > 8 ? 2 * nb : 0);
  int64_t* const stride = nb > 8 ? big.data() : small;
  int64_t* const idx = stride + nb;
  std::fill(stride, stride + 2 * nb, int64_t(0));
  int64_t st = mat_elems;
  for (size_t i = 0; i < db; ++i) {
    const size_t di = db - 1 - i, oi = nb - 1 - i;
    if (d[di] != ob[oi] && d[di] != 1) return false;
    stride[oi] = d[di] == 1 ? 0 : st;
    st *= d[di];
  }
  int64_t total = 1;
  for (int64_t x : ob) total *= x;
  off.assign(size_t(total), 0);
  for (int64_t t = 0; t < total; ++t) {
    int64_t o = 0;
    for (size_t i = 0; i < nb; ++i) o += idx[i] * stride[i];
    off[size_t(t)] = o;
    for (size_t i = nb; i-- > 0;) {
      if (++idx[i] < ob[i]) break;
      idx[i] = 0;
    }
  }
  return true;
}

ffi::Future launch(const std::shared_ptr<Job>& job, ffi::ThreadPool pool, const IsaKernels& isa, int64_t nbatch,
                   int64_t M, int64_t N, int64_t K) {
  job->fn = isa.tile;
  return launch_tiles(job, pool, isa.mr, isa.nr, nbatch, M, N, K);
}

ffi::Future launch_tiles(const std::shared_ptr<Job>& job, ffi::ThreadPool pool, int mr, int nr, int64_t nbatch,
                         int64_t M, int64_t N, int64_t K) {
  // Small problems run inline on the calling thread: no pool task, no split into smaller tiles, and
  // no wait for a pool thread that claimed a tile and was descheduled (JDFP_INLINE_WORK overrides the
  // threshold on M * N * K; 1 sends everything to the pool).
  static const int64_t inline_env = env_knob("JDFP_INLINE_WORK");
  const int64_t inline_below = inline_env > 0 ? inline_env : kInlineWork;
  const int64_t work = nbatch * M * N * std::max<int64_t>(K, 1);
  int64_t nthreads = pool_workers(pool);
  if (work < inline_below) nthreads = 1;
  int64_t mb, nb;
  tile_sizes(mr, nr, nthreads, nbatch, M, N, K, mb, nb);
  for (int64_t bi = 0; bi < nbatch; ++bi)
    for (int64_t n0 = 0; n0 < std::max<int64_t>(N, 1); n0 += nb)
      for (int64_t m0 = 0; m0 < std::max<int64_t>(M, 1); m0 += mb)
        job->tiles.push_back(Tile{bi, m0, std::min(m0 + mb, M), n0, std::min(n0 + nb, N)});
  if (job->tiles.empty() || M == 0 || N == 0) {
    job->tiles.clear();
    nthreads = 1;
  }
  return launch_job_tiles(job, pool, nthreads);
}

ffi::Future launch_job_tiles(const std::shared_ptr<Job>& job, ffi::ThreadPool pool, int64_t nthreads) {
  const int64_t ntiles = int64_t(job->tiles.size());
  const int64_t nworkers = std::max<int64_t>(1, std::min<int64_t>(nthreads, ntiles));
  split_chunks(*job, nworkers);
  job->done = ffi::CountDownPromise(std::max<int64_t>(ntiles, 1));
  ffi::Future fut(job->done);
  for (int64_t w = 1; w < nworkers; ++w) pool.Schedule([job]() { run_worker(job); });
  run_worker(job);  // the calling thread works too; it never waits for the others
  if (ntiles == 0) job->done.CountDown();
  return fut;
}

}  // namespace jdfp
