// Run-time pieces shared by the GEMM and conv FFI handlers: chain/kc-block set-up,
// the job and its workers (tiles grabbed from an atomic counter by the caller and XLA's pool
// threads, completion through a tile-counting CountDownPromise).  Handler TUs only (baseline flags).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ffi_helpers.h"
#include "gemm_common.h"


namespace jdfp {
namespace {

// ---------------------------------------------------------------- problem set-up
struct Job {
  Problem P{};
  std::vector<Piece> pieces;
  std::vector<KcBlock> kcb;
  std::vector<int64_t> a_off, b_off, ea_off, eb_off;
  std::vector<Tile> tiles;
  TileFn fn = nullptr;
  // Tiles are split into one contiguous chunk per worker (tiles are ordered columns-outer, so a
  // chunk covers few column ranges and its B panels are packed once, by one worker); a worker that
  // drains its own chunk steals from the others' (run_worker).
  int64_t nchunks = 1;
  std::unique_ptr<std::atomic<int64_t>[]> cursor;  // next unclaimed tile of each chunk
  std::vector<int64_t> chunk_end;
  std::atomic<int64_t> next_worker{0};
  ffi::CountDownPromise done;
  int bits_a = 0, bits_b = 0;
  // Error text: "jdfp <who>: int16 operand <name_a|name_b> has a value ..."
  std::string who = "gemm", name_a = "a", name_b = "b";
  // Conv jobs: the gather geometry (P.conv points here) and output offsets per batch element.
  ConvGeom conv;
  std::vector<int64_t> c_off;
};

[[maybe_unused]] ffi::Error invalid(const std::string& msg) { return invalid_as("gemm", msg); }

// Chains of the contract cut into pieces and grouped into kc blocks of at most kc_pairs pairs.
[[maybe_unused]] void build_chains(Job& j, int64_t K, int64_t block_k, int64_t KB, int64_t C, int32_t kc_pairs) {
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
        pcs.push_back(Piece{cs, int32_t(len), int32_t(cp), int32_t(blk), 0, 0, 0});
        cur_pairs += int32_t(cp);
      } else {
        // A chain longer than a kc block: split at even offsets, carry the int32 sums across.
        close();
        for (int64_t o = 0; o < len; o += 2 * int64_t(kc_pairs)) {
          const int64_t pl = std::min<int64_t>(2 * int64_t(kc_pairs), len - o);
          const bool last = o + pl >= len;
          pcs.push_back(Piece{cs + o, int32_t(pl), int32_t((pl + 1) / 2), int32_t(blk), 0,
                              uint8_t(o > 0), uint8_t(!last)});
          cur_pairs += int32_t((pl + 1) / 2);
          if (!last) close();
        }
        j.P.has_carry = true;
      }
    }
  }
  close();
}

// Batch broadcasting: `d` right-aligned against the output batch dims `ob`.  Fills the element
// offset of every output batch index (0 stride where d has size 1).  Returns false if incompatible.
[[maybe_unused]] bool batch_offsets(ffi::Span<const int64_t> d, const std::vector<int64_t>& ob, int64_t mat_elems,
                   std::vector<int64_t>& off) {
  const size_t nb = ob.size(), db = d.size() - 2;
  if (db > nb) return false;
  std::vector<int64_t> stride(nb, 0);
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
  std::vector<int64_t> idx(nb, 0);
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

void run_worker(const std::shared_ptr<Job>& job) {
#if JDFP_X86
  // Fixed FP environment: round-to-nearest-even with FTZ+DAZ, which is what XLA:CPU runs its own
  // float code with (so the pure-JAX reference and this kernel flush the same way).
  const unsigned old_csr = _mm_getcsr();
  _mm_setcsr(0x1F80u | 0x8000u | 0x0040u);
#endif
  int bad = 0;
  int64_t done = 0;
  // Own chunk first, then the others' in turn: every tile is claimed exactly once (fetch_add on its
  // chunk's cursor), whoever shows up, so the calling thread alone can always finish the op.
  const int64_t nc = job->nchunks;
  const int64_t first = job->next_worker.fetch_add(1, std::memory_order_relaxed) % nc;
  for (int64_t i = 0; i < nc; ++i) {
    const int64_t c = (first + i) % nc;
    for (;;) {
      const int64_t t = job->cursor[size_t(c)].fetch_add(1, std::memory_order_relaxed);
      if (t >= job->chunk_end[size_t(c)]) break;
      ++done;
      if (bad) continue;  // keep draining so the count stays right; the output is an error anyway
      bad = job->fn(job->P, job->tiles[size_t(t)]);
    }
  }
#if JDFP_X86
  _mm_setcsr(old_csr);
#endif
  // The promise counts tiles, not workers: a scheduled worker that starts late (or never, while
  // the pool threads sit in a collective's rendezvous waiting for this very op) finds no tiles and
  // owes nothing, so the calling thread alone can always complete the op. No deadlock under pmap.
  if (done == 0) return;
  if (bad) {
    const bool is_a = bad == 1;
    const std::string& nm = is_a ? job->name_a : job->name_b;
    job->done.CountDown(size_t(done), invalid_as(job->who, "int16 operand " + nm +
                                " has a value outside [-qmax, qmax] for bits_" + nm +
                                "=" + std::to_string(is_a ? job->bits_a : job->bits_b) +
                                " (qmax = 2**(bits-1) - 1; -32768 is never valid)"));
  } else {
    job->done.CountDown(size_t(done));
  }
}

// Split (batch, M, N) into tiles and run them on the calling thread plus XLA's pool; the returned
// future completes when the last tile is done (see run_worker).
[[maybe_unused]] ffi::Future launch(const std::shared_ptr<Job>& job, ffi::ThreadPool pool, const IsaKernels& info, int64_t nbatch,
                   int64_t M, int64_t N, int64_t K) {
  // ---- tiles and workers
  const int64_t work = nbatch * M * N * std::max<int64_t>(K, 1);
  static const int64_t threads_env = env_knob("JDFP_THREADS");  // cap on workers (0: the pool size)
  int64_t nthreads = std::max<int64_t>(1, pool.num_threads());
  if (threads_env > 0) nthreads = std::min(nthreads, threads_env);
  if (work < (int64_t(1) << 21)) nthreads = 1;  // small problems run inline
  // Tiles big enough to amortize packing (B over mb rows, A over nb columns), small enough to give
  // every worker several tiles so a busy core does not leave the others idle at the end.
  auto rup = [](int64_t x, int64_t m) { return (x + m - 1) / m * m; };
  static const int64_t tm_env = env_knob("JDFP_TILE_M"), tn_env = env_knob("JDFP_TILE_N");
  int64_t mb = std::min(rup(M, info.mr), tm_env > 0 ? rup(tm_env, info.mr) : int64_t(info.mr) * std::max(1, 192 / info.mr));
  int64_t nb = std::min(rup(N, info.nr), tn_env > 0 ? rup(tn_env, info.nr) : int64_t(512));
  auto count = [&]() { return nbatch * ((M + mb - 1) / mb) * ((N + nb - 1) / nb); };
  if (nthreads > 1) {
    while (count() < 4 * nthreads) {
      if (nb >= 2 * 128 && nb >= mb) nb = rup(nb / 2, info.nr);
      else if (mb >= 2 * 4 * info.mr) mb = rup(mb / 2, info.mr);
      else if (nb >= 2 * 64) nb = rup(nb / 2, info.nr);
      else break;
    }
  }
  for (int64_t bi = 0; bi < nbatch; ++bi)
    for (int64_t n0 = 0; n0 < std::max<int64_t>(N, 1); n0 += nb)
      for (int64_t m0 = 0; m0 < std::max<int64_t>(M, 1); m0 += mb)
        job->tiles.push_back(Tile{bi, m0, std::min(m0 + mb, M), n0, std::min(n0 + nb, N)});
  if (job->tiles.empty() || M == 0 || N == 0) {
    job->tiles.clear();
    nthreads = 1;
  }
  const int64_t nworkers = std::max<int64_t>(1, std::min<int64_t>(nthreads, int64_t(job->tiles.size())));
  const int64_t ntiles = int64_t(job->tiles.size());
  job->nchunks = nworkers;
  job->cursor.reset(new std::atomic<int64_t>[size_t(nworkers)]);
  job->chunk_end.assign(size_t(nworkers), 0);
  for (int64_t c = 0; c < nworkers; ++c) {
    job->cursor[size_t(c)].store(ntiles * c / nworkers, std::memory_order_relaxed);
    job->chunk_end[size_t(c)] = ntiles * (c + 1) / nworkers;
  }
  job->done = ffi::CountDownPromise(std::max<int64_t>(ntiles, 1));
  ffi::Future fut(job->done);
  for (int64_t w = 1; w < nworkers; ++w) pool.Schedule([job]() { run_worker(job); });
  run_worker(job);  // the calling thread works too; it never waits for the others
  if (ntiles == 0) job->done.CountDown();
  return fut;
}

}  // namespace
}  // namespace jdfp
