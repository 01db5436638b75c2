// Run-time pieces shared by the GEMM and conv FFI handlers (defined in ffi_runtime.cc): the Job
// (a validated Problem plus the storage it points into), the chain / kc-block plan, batch
// broadcasting, and the launch: tiles grabbed from per-worker chunks by the caller and XLA's pool
// threads, completion through a tile-counting CountDownPromise.  Handler TUs only (baseline flags).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "ffi_helpers.h"
#include "gemm_common.h"

// The binding of the GEMM handlers (INT16, INT8, and with the conv attributes appended, their
// col2im forms): a, b as AnyBuffer so that a wrong dtype gets our own error message.
#define JDFP_GEMM_BINDING             \
  ffi::Ffi::Bind()                    \
      .Ctx<ffi::ThreadPool>()         \
      .Arg<ffi::AnyBuffer>()          \
      .Arg<ffi::AnyBuffer>()          \
      .Arg<ffi::Buffer<ffi::S32>>()   \
      .Arg<ffi::Buffer<ffi::S32>>()   \
      .Ret<ffi::Buffer<ffi::F32>>()   \
      .Attr<int32_t>("bits_a")        \
      .Attr<int32_t>("bits_b")        \
      .Attr<int64_t>("block_k")       \
      .Attr<bool>("transpose_a")      \
      .Attr<bool>("transpose_b")      \
      .Attr<int32_t>("isa")

namespace jdfp {

struct Job {
  Problem P{};
  std::vector<Piece> pieces;
  std::vector<KcBlock> kcb;
  std::vector<int64_t> a_off, b_off, ea_off, eb_off;
  std::vector<Tile> tiles;
  TileFn fn = nullptr;
  // Kernel families with their own problem type (the INT8 GEMM, gemm_i8_ffi.cc): when set, the
  // workers run tiles through this instead of fn(P, tile).
  std::function<int(const Tile&)> tile_fn;
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
  std::string operand_type = "int16";  // in the range error
  // Conv jobs: the gather geometry (P.conv points here) and output offsets per batch element.
  ConvGeom conv;
  std::vector<int64_t> c_off;
  int64_t cursor_cap = 0;  // entries allocated in cursor (reused by the next job on this thread)

  // Back to a new job's state, keeping the vectors' storage (reusable_job).
  void reset();
};

// A Job for the calling thread's next op: the thread's previous one, reset, once nobody else holds
// it (its pool tasks have finished), else a new one.  A small op's handler then allocates none of
// its vectors: on a 64-128-10 MLP step the GEMM handlers made ~25 heap allocations per call.
std::shared_ptr<Job> reusable_job();

// Cuts the contract's chains (blocks of block_k, chains of at most C products) into pieces grouped
// into kc blocks of at most kc_pairs packed pairs (JDFP_KC_PAIRS overrides the ISA's default), and
// points P's pieces / kcb / nkcb / max_pairs / max_nblk at the result.
void plan_chains(Job& j, int64_t K, int64_t block_k, int64_t KB, int64_t C, int32_t isa_kc_pairs);

// Batch broadcasting: `d` right-aligned against the output batch dims `ob`.  Fills the element
// offset of every output batch index (0 stride where d has size 1).  Returns false if incompatible.
bool batch_offsets(ffi::Span<const int64_t> d, const std::vector<int64_t>& ob, int64_t mat_elems,
                   std::vector<int64_t>& off);

// The INT16 GEMM's operands as its handlers read them (gemm_ffi.cc): a [..., M, K] (or [..., K, M]
// transposed), b [..., K, N] (or [..., N, K]), shapes checked by read_shapes / check_batch_dims, and
// the job's Problem filled from them by set_up_job.  Shared with the fused patch-conversion + GEMM
// handler (block_quantize_ffi.cc).
struct GemmShape {
  ffi::Span<const int64_t> da, db, dea, deb, dout;
  int64_t M = 0, N = 0, K = 0, bk = 0, KB = 0;
  std::vector<int64_t> ob;  // output batch dims
};
struct GemmOperands {
  const void* a;
  const void* b;
  const int32_t* ea;
  const int32_t* eb;
  float* out;
  bool a_f32, b_f32;  // float32 operands, quantized while packing
};
ffi::Error read_shapes(GemmShape& s, int64_t block_k, bool trans_a, bool trans_b);
ffi::Error check_batch_dims(GemmShape& s);
ffi::Error set_up_job(Job& job, const GemmShape& s, const GemmOperands& ops, int32_t bits_a, int32_t bits_b,
                      bool trans_a, bool trans_b, const IsaKernels& isa);

// A GEMM out [1, M, N] = a . b (b [1, K, N], eb [1, KB, N or 1]) whose A rows the caller supplies a
// range at a time (the fused patch conversion, block_quantize_ffi.cc): run(r0, r1, a, ea) multiplies
// rows [r0, r1) by every column, a / ea pointing at those rows ([r1 - r0, K] int16 or int8 values,
// [r1 - r0, KB] exponents), on the calling thread.  Bit for bit the GEMM handler's result for those
// rows.  Returns 0, or the tile function's range error (2: a value of b out of [-qmax, qmax]).
struct RowGemm {
  virtual ~RowGemm() = default;
  virtual int run(int64_t r0, int64_t r1, const void* a, const int32_t* ea) const = 0;
};
// `s` holds the operands' dims (da, dea as the rows would be stored); its shapes are checked here.
// INT16 kernel (gemm_ffi.cc): int16 a and b.  INT8 kernel (gemm_i8_ffi.cc): int8, bits <= 8; with
// isa "auto" on AMX-INT8, the rows whose block scales are exact run on the tiles (as JdfpGemmI8).
ffi::Error make_row_gemm_i16(GemmShape& s, int64_t block_k, const void* b, const int32_t* eb, float* out,
                             int32_t bits_a, int32_t bits_b, int32_t isa, std::unique_ptr<RowGemm>& gemm);
ffi::Error make_row_gemm_i8(GemmShape& s, int64_t block_k, const void* b, const int32_t* eb, float* out,
                            int32_t bits_a, int32_t bits_b, int32_t isa, std::unique_ptr<RowGemm>& gemm);

// Split (batch, M, N) into tiles and run them on the calling thread plus XLA's pool with the
// entry's tile function; the returned future completes when the last tile is done (run_worker).
ffi::Future launch(const std::shared_ptr<Job>& job, ffi::ThreadPool pool, const IsaKernels& isa, int64_t nbatch,
                   int64_t M, int64_t N, int64_t K);
// The same for a job whose tiles run through job->tile_fn, with an mr x nr micro-tile.
ffi::Future launch_tiles(const std::shared_ptr<Job>& job, ffi::ThreadPool pool, int mr, int nr, int64_t nbatch,
                         int64_t M, int64_t N, int64_t K);
// Tiles of a deep GEMM (K >= 8 x max(M, N)), one per worker along the larger side where the other
// fits one tile (mb / nb: the caller's cap-sized tile on entry): sets mb / nb and returns true, else
// leaves them.  launch_tiles' and the BF16 GEMM's tilings both use it (ffi_runtime.cc).
bool deep_split(int mr, int nr, int64_t nthreads, int64_t nbatch, int64_t M, int64_t N, int64_t K, int64_t& mb,
                int64_t& nb);
// Runs the tiles already in job->tiles (each through job->tile_fn or job->fn) on at most nthreads
// workers, the calling thread included; launch_tiles after its split.
ffi::Future launch_job_tiles(const std::shared_ptr<Job>& job, ffi::ThreadPool pool, int64_t nthreads);

}  // namespace jdfp
