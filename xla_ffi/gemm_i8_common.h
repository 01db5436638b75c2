// Shared definitions of the exact INT8 GEMM (docs/arithmetic.md, "INT8 kernel"): int8 operands with
// |value| <= qmax <= 127, the same contract as the INT16 GEMM (every chain sum exact in int32, each
// exponent block's integer sum exact, rounded to float32 once, scaled by 2**(ea + eb)).
//
// ISA-neutral, `static inline` / POD only: included by the handler TU (baseline flags) and by every
// per-ISA INT8 kernel TU (gemm_i8_*.cc, compiled with their own -m flags).
#pragma once

#include <cstdint>

#include "gemm_common.h"

namespace jdfp {

// Piece flags: where the piece sits in its chain and the chain in its exponent block.
enum : uint8_t {
  kI8ChainOpen = 1,   // first piece of its chain: the int32 chain sum starts here
  kI8ChainClose = 2,  // last piece of its chain: the chain sum is complete after it
  kI8FirstChain = 4,  // the piece's chain is the first of its block
  kI8LastChain = 8,   // the piece's chain is the last of its block (closing it closes the block)
};

// One piece of a chain inside one kc block, packed as `quads` groups of 4 k values (the last quad
// zero-padded).  A chain (at most L products, never straddling a block) is cut into several pieces
// only where it crosses a kc block; the int32 running sum of the chain then waits in memory.
struct I8Piece {
  int64_t k_start;  // global k of the first element
  int32_t len;      // valid elements
  int32_t quads;    // ceil(len / 4)
  int32_t blk;      // global block index j
  int32_t bl;       // block index relative to the kc block's first block
  uint8_t flags;
};

struct I8KcBlock {
  int32_t piece_begin, piece_end;
  int32_t quads;      // total packed quads
  int32_t blk_first;  // first global block touched
  int32_t nblk;       // number of blocks touched
};

// Fully validated INT8 problem handed to the per-ISA tile functions (the INT16 Problem's fields
// that apply; no fused quantization, no conv gather).
// int8 A supplied a kc block at a time instead of stored whole (gemm_i8_ffi.cc's conv weight
// gradient converts it from the conv input): as gemm_common.h's ARowSource, with A's int8 values
// (|v| <= qmax_a) in place of float32 ones.
struct I8RowSource {
  virtual const int8_t* rows(const Tile& T, int64_t k0, int64_t k1, int64_t& sr, int64_t& sk) const = 0;
  virtual const int32_t* exponents(const Tile& T) const = 0;

 protected:
  ~I8RowSource() = default;
};

struct ProblemI8 {
  int64_t M, N, K, KB, block_k;
  int32_t qmax_a, qmax_b;
  const int8_t* a;
  const int8_t* b;
  const int32_t* ea;
  const int32_t* eb;
  float* out;
  const int64_t* a_off;  // per output batch element (broadcast dims have stride 0)
  const int64_t* b_off;
  const int64_t* ea_off;
  const int64_t* eb_off;
  int64_t ea_mstride;  // KB, or 0 when ea's M dim is 1
  int64_t eb_nstride;  // 1, or 0 when eb's N dim is 1
  const I8Piece* pieces;
  const I8KcBlock* kcb;
  int64_t nkcb;
  int32_t max_quads;   // max I8KcBlock::quads
  int32_t max_pieces;  // max pieces of one kc block
  int32_t max_nblk;    // max I8KcBlock::nblk
  int64_t total_quads; // sum of I8KcBlock::quads
  // Operand views X[r, k] = src[r*sr + k*sk] (A rows are m, B rows are n).
  int64_t a_sr, a_sk, b_sr, b_sk;
  int64_t ldc;
  uint64_t job_id;  // unique per call: lets a worker reuse its packed B across its tiles of the call
  const I8RowSource* a_src = nullptr;  // non-null: A and ea come from it, not from a / ea
};

// Result of a tile: 0 = ok, 1 / 2 = an A / B value outside [-qmax, qmax].
using TileI8Fn = int (*)(const ProblemI8&, const Tile&);

// Per-ISA entry points (gemm_i8_*.cc).
int tile_i8_scalar(const ProblemI8&, const Tile&);
int tile_i8_avx2(const ProblemI8&, const Tile&);
int tile_i8_avxvnni(const ProblemI8&, const Tile&);
int tile_i8_avx512vnni(const ProblemI8&, const Tile&);

// The AMX-INT8 path (kernel_amx_i8.cc): KB == 1 with kAmxMinK <= K <= kAmxI8MaxK (the int32 tile
// sum of s8 products cannot wrap: 131072 * 127**2 < 2**31), or KB > 1 with block_k <= 64, a
// multiple of 4, and `exact_scales` (every exponent pair scales exactly, no NONFINITE).
constexpr int64_t kAmxI8MaxK = 131072;
bool amx_i8_fits(const ProblemI8&, bool exact_scales);
int tile_amx_i8(const ProblemI8&, const Tile&);

// Micro-tile of an ISA's INT8 kernel: rows of the KB == 1 kernel (the KB > 1 kernel's rows divide it),
// columns (both kernels), max packed quads per kc block.
struct I8KernelShape {
  TileI8Fn tile;
  int mr, nr, kc_quads;
};

}  // namespace jdfp
