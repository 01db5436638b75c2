// Shared definitions of the jdfp exact INT16 GEMM (see docs/arithmetic.md).
//
// Functions here are `static inline` on purpose: this header is compiled with different -m flags in
// different TUs, and a merged (ODR) copy built with AVX-512 could otherwise end up in the scalar path.
// Everything in this header is ISA-neutral: it is included by the handler TU (baseline flags) and by
// every per-ISA kernel TU (compiled with -mavx2 / -mavxvnni / -mavx512*).  Keep it free of
// non-static inline definitions that could be compiled with different flags in different TUs (ODR).
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace jdfp {

constexpr int32_t kNonfiniteExponent = 1 << 30;  // NONFINITE_EXPONENT in the contract
constexpr int64_t kMaxChain = int64_t(1) << 20;  // cap on the safe chain length L
// The SIMD kernels sum at most this many pieces of a block as int32 pairs before widening to int64
// (ukernel_simd.h); a kc block never holds more pieces (ffi_runtime.cc caps kc_pairs).
constexpr int64_t kMaxWhPieces = int64_t(1) << 16;
// Exponents are clamped to +-kExponentClamp before use (formats.EXPONENT_CLAMP of the reference):
// ea + eb then cannot overflow, and anything beyond already saturates scale2.
constexpr int32_t kExponentClamp = 1000;

enum Isa : int { kIsaAuto = 0, kIsaScalar = 1, kIsaAvx2 = 2, kIsaAvxVnni = 3, kIsaAvx512Vnni = 4 };

// A micro-kernel's local copy of its argument struct, 8 bytes at a time through general
// registers.  The drivers store the per-micro-tile fields one by one just before each call; a plain
// struct copy reads them back with 64-byte vector loads, which cannot be forwarded from those stores
// and wait until they reach L1 (the largest stall outside the dot products in a 2048^3 profile).
template <class T>
static inline __attribute__((always_inline)) void copy_kernel_args(T& dst, const T& src) {
  static_assert(sizeof(T) % 8 == 0 && alignof(T) >= 8 && std::is_trivially_copyable_v<T>, "copied in 8-byte words");
  const char* s = reinterpret_cast<const char*>(&src);
  char* d = reinterpret_cast<char*>(&dst);
  for (size_t o = 0; o < sizeof(T); o += 8) {
    uint64_t w;
    std::memcpy(&w, s + o, 8);
    __asm__("" : "+r"(w));  // keeps GCC from merging the words into vector moves
    std::memcpy(d + o, &w, 8);
  }
}

static inline int32_t qmax_of(int bits) { return (int32_t(1) << (bits - 1)) - 1; }

// L = floor((2**31 - 1) / (qmax_a * qmax_b)), capped at 2**20.
static inline int64_t safe_chain_length(int bits_a, int bits_b) {
  int64_t p = int64_t(qmax_of(bits_a)) * int64_t(qmax_of(bits_b));
  int64_t l = (int64_t(2147483647)) / p;
  return l < kMaxChain ? l : kMaxChain;
}

// Chain length the kernels run: the longest c <= L with c * qmax_a * qmax_b <= 2**31 - 2**16, so
// every piece sum leaves the 2**16 margin the SIMD kernels' running sums need (ukernel_simd.h).
// It is L or a few products less (14/14: 32 = L, 16/16: 2 = L, 8/8: 133140 vs 133144); cutting
// chains shorter never changes a result (docs/arithmetic.md).
static inline int64_t kernel_chain_length(int bits_a, int bits_b) {
  const int64_t p = int64_t(qmax_of(bits_a)) * int64_t(qmax_of(bits_b));
  const int64_t l = (int64_t(2147483648) - 65536) / p;
  return l < kMaxChain ? l : kMaxChain;
}

// 2**e as float32 for e in [-126, 127] (exact, built from the bits).
static inline float pow2f(int32_t e) {
  uint32_t u = uint32_t(e + 127) << 23;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static inline int32_t clamp_i32(int32_t v, int32_t lo, int32_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Whether a closed block may be scaled the fast way, given the min / max of the (clamped) exponents
// ea and eb it meets over a tile: when every 2**ea, 2**eb and 2**(ea + eb) is a normal float32 and
// ea + eb <= 63, scale2(f, ea + eb) == f * (2**ea * 2**eb) (the product of the two powers is exact,
// scale2's second factor is 1), and that product is exact: f is an integer, 0 or 1 <= |f| <= 2**63,
// so |f * 2**(ea + eb)| lies in [2**-126, 2**126].  acc + f * s is then also one fused multiply-add.
static inline bool fast_scale_block(int32_t amn, int32_t amx, int32_t bmn, int32_t bmx) {
  return amn >= -126 && bmn >= -126 && amx <= 127 && bmx <= 127 && amn + bmn >= -126 && amx + bmx <= 63;
}
static inline int32_t eclamp(int32_t e) { return clamp_i32(e, -kExponentClamp, kExponentClamp); }

// One row of A's exponents over a kc block's blocks: clamped, 2**clamp(e, -126, 127), min / max per
// block; rows after the first of a micro-tile also clear uni[bl] where they differ from the row
// above.  restrict: so that GCC vectorizes it.  Returns whether a NONFINITE exponent was seen.
template <bool kSameGroup>
static inline bool exponent_row(const int32_t* __restrict src, int32_t* __restrict xa, float* __restrict pa,
                                int32_t* __restrict amn, int32_t* __restrict amx, int32_t* __restrict uni,
                                const int32_t* __restrict above, int32_t n) {
  int32_t bad = 0;
  for (int32_t bl = 0; bl < n; ++bl) {
    const int32_t raw = src[bl];
    bad |= raw == kNonfiniteExponent;
    const int32_t e = eclamp(raw);
    if constexpr (kSameGroup) uni[bl] &= e == above[bl];
    xa[bl] = e;
    pa[bl] = pow2f(clamp_i32(e, -126, 127));
    amn[bl] = amn[bl] < e ? amn[bl] : e;
    amx[bl] = amx[bl] > e ? amx[bl] : e;
  }
  return bad != 0;
}

// Where the exponents of one kc block go for one tile, and scratch (every array >= nblk blocks).
struct TileExponents {
  int32_t* ea;       // [mbp][nblk] clamped exponents of the tile's rows (a row over the blocks)
  float* pa;         // 2**ea, same layout
  int32_t* eb;       // [nblk][nbp] the columns' (a block over the columns)
  float* pb;         // 2**eb
  uint8_t* fast;     // per block: fast_scale_block
  int32_t* uniform;  // per block: every micro-tile's rows (groups of mr) share one exponent
  int32_t* amn;      // scratch: min / max of the rows' exponents per block
  int32_t* amx;
};

// One block's exponents of n contiguous columns: clamped, 2**clamp(e, -126, 127), their min / max
// folded into mn / mx.  Plain loops over restrict pointers, so that GCC vectorizes them (a conv's
// weight gradient has 32-64 columns and ~40 blocks per kc block: as a scalar loop this was a
// tenth of the GEMM).  Returns whether a NONFINITE exponent was seen.
static inline bool exponent_cols(const int32_t* __restrict src, int32_t* __restrict xe, float* __restrict pe,
                                 int64_t n, int32_t& mn, int32_t& mx) {
  int32_t bad = 0, lo = mn, hi = mx;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t raw = src[i];
    bad |= raw == kNonfiniteExponent;
    const int32_t e = eclamp(raw);
    xe[i] = e;
    pe[i] = pow2f(clamp_i32(e, -126, 127));
    lo = lo < e ? lo : e;
    hi = hi > e ? hi : e;
  }
  mn = lo, mx = hi;
  return bad != 0;
}

// The INT16 and INT8 drivers' exponent preparation for kc block [blk_first, blk_first + nblk) of a
// tile: rows [m0, m0 + mb) of ea (row stride ea_mstride; padding rows up to mbp repeat the last row,
// their products are 0 whatever the scale), columns [n0, n0 + nb) of eb (block stride eb_j, column
// stride eb_nstride; padding columns get 0).  Both sides run along contiguous exponents, so the loops
// vectorize: with few columns (a conv's O = 32) the strided per-block loops this replaced ran as long
// as the dot products.  Returns whether a NONFINITE exponent was seen.
static inline bool tile_exponents(const int32_t* ea, int64_t ea_mstride, int64_t m0, int64_t mb, int64_t mbp,
                                  const int32_t* eb, int64_t eb_j, int64_t eb_nstride, int64_t n0, int64_t nb,
                                  int64_t nbp, int32_t blk_first, int32_t nblk, int mr, const TileExponents& out) {
  for (int32_t bl = 0; bl < nblk; ++bl) out.amn[bl] = 0, out.amx[bl] = 0, out.uniform[bl] = 1;
  bool bad = false;
  for (int64_t i = 0; i < mbp; ++i) {
    const int32_t* src = ea + (m0 + (i < mb ? i : mb - 1)) * ea_mstride + blk_first;
    // The next kc block reads the row's next nblk exponents: start fetching them now (rows of ea lie
    // KB * 4 bytes apart, so each row's segment is its own cache line; past the end, a prefetch is
    // only dropped).
    __builtin_prefetch(src + nblk);
    __builtin_prefetch(src + nblk + 16);
    int32_t* xa = out.ea + i * nblk;
    float* pa = out.pa + i * nblk;
    bad |= i % mr ? exponent_row<true>(src, xa, pa, out.amn, out.amx, out.uniform, xa - nblk, nblk)
                  : exponent_row<false>(src, xa, pa, out.amn, out.amx, out.uniform, nullptr, nblk);
  }
  for (int32_t bl = 0; bl < nblk; ++bl) {
    const int32_t* src = eb + (blk_first + bl) * eb_j + n0 * eb_nstride;
    int32_t* xe = out.eb + bl * nbp;
    float* pe = out.pb + bl * nbp;
    int32_t bmn = 0, bmx = 0;
    if (eb_nstride == 1) {
      bad |= exponent_cols(src, xe, pe, nb, bmn, bmx);
    } else {
      for (int64_t i = 0; i < nb; ++i) bad |= exponent_cols(src + i * eb_nstride, xe + i, pe + i, 1, bmn, bmx);
    }
    for (int64_t i = nb; i < nbp; ++i) xe[i] = 0, pe[i] = 1.0f;  // padding columns: exponent 0 (bmn, bmx start at 0)
    out.fast[bl] = fast_scale_block(out.amn[bl], out.amx[bl], bmn, bmx);
  }
  return bad;
}

// The contract's f(): an exact int64 block sum as float32, rounded once, half to even (cvtsi2ss with
// a 64-bit source rounds by MXCSR, which the workers set to round-to-nearest-even).
static inline float i64_to_f32(int64_t s) { return float(s); }

// scale2 of the contract: two float32 multiplies by powers of two, each rounded.  |e| <= 2000 here
// (a sum of two clamped exponents).
static inline float scale2(float x, int32_t e) {
  int32_t e1 = clamp_i32(e, -126, 127);
  int32_t e2 = clamp_i32(e - e1, -126, 127);
  return (x * pow2f(e1)) * pow2f(e2);
}

// The two power-of-two factors that scale2(x, -e) multiplies by (quantize1's s1, s2); s1 = 0 for a
// NONFINITE exponent (its values quantize to 0; the output is NaN anyway).
static inline void scales_of(int32_t e, float& s1, float& s2) {
  const int32_t ne = -eclamp(e);
  const int32_t e1 = clamp_i32(ne, -126, 127), e2 = clamp_i32(ne - e1, -126, 127);
  s1 = e == kNonfiniteExponent ? 0.0f : pow2f(e1);
  s2 = pow2f(e2);
}

// Quantize one float32 for the fused-quantization entry: clip(round_half_even(scale2(x, -e)), +-qmax).
// NaN -> 0 (the contract gives NaN groups the sentinel exponent, which forces a NaN output anyway).
// Rounding uses the 1.5*2**23 trick: exact round-half-even for |y| <= 2**22 whatever the compiler
// does with rint(); y is clipped to |y| <= 32767 first.
static inline int16_t quantize1(float x, float s1, float s2, float qm) {
  float y = (x * s1) * s2;
  if (!(y == y)) y = 0.0f;
  y = y < -qm ? -qm : (y > qm ? qm : y);
  const float magic = 12582912.0f;  // not folded: no -ffast-math anywhere
  float r = (y + magic) - magic;
  return int16_t(r);
}

// One piece of a chain inside one kc block.  A chain (the contract's `C` products, never straddling
// a block) is usually one piece; a chain longer than a kc block is split into several pieces.  The kernels sum every piece's int32 partial sum exactly into
// the block's int64 sum, so where a chain is cut does not change any result: a piece of a chain is
// no longer than the chain, so its int32 sum cannot wrap either.
struct Piece {
  int64_t k_start;  // global k of the first element
  int32_t len;      // valid elements (the last pair may be half padding)
  int32_t pairs;    // ceil(len / 2)
  int32_t blk;      // global block index j
  int32_t bl;       // block index relative to the kc block's first block
};
struct KcBlock {
  int32_t piece_begin, piece_end;
  int32_t pairs;      // total packed pairs
  int32_t blk_first;  // first global block touched
  int32_t nblk;       // number of blocks touched
};

// Implicit-GEMM view of a convolution operand gathered from an N,D,H,W,C int16 input (the im2col
// matrix is never stored: the packing routines read the input at the right offsets).  Spatial dims
// are always 3 (1-D / 2-D convs use size-1 leading dims).  Output pixel o, kernel tap t read the
// lhs-dilated, padded input at pos[d] = o[d]*stride[d] - pad[d] + t[d]*rdil[d]; that is input
// element pos[d] / ldil[d] when ldil[d] divides it and it is in range, else zero (padding).
enum ConvMode : int {
  kConvNone = 0,
  kConvRowsPixels = 1,  // X[r = output pixel (n, o), k = (tap, c)]: forward / backward-data (A)
  kConvRowsTaps = 2,    // X[r = (tap, c), k = output pixel (n, o)]: weight-gradient (B, r = n)
};

struct ConvGeom {
  int mode = kConvNone;
  bool on_b = false;                  // the gathered operand is B (its pack rows are the GEMM's n)
  int64_t n = 0;                      // batch
  int64_t in[3] = {1, 1, 1};          // input spatial sizes
  int64_t out[3] = {1, 1, 1};         // output spatial sizes
  int64_t ks[3] = {1, 1, 1};          // kernel spatial sizes
  int64_t stride[3] = {1, 1, 1};
  int64_t pad[3] = {0, 0, 0};         // low padding (may be negative: cropping)
  int64_t ldil[3] = {1, 1, 1};        // lhs (input) dilation
  int64_t rdil[3] = {1, 1, 1};        // rhs (kernel) dilation
  int64_t C = 0;                      // channels of one input pixel (element stride of a pixel)
  int64_t cg = 0;                     // channels read per tap (per group)
  int64_t npix = 0;                   // n * out[0] * out[1] * out[2]
  int64_t ntaps = 0;                  // ks[0] * ks[1] * ks[2]
};

// Element offset of input pixel (n, pos(o, t)) or -1 when it is padding.
static inline int64_t conv_pixel_offset(const ConvGeom& g, int64_t n, const int64_t* o, const int64_t* t) {
  int64_t off = n;
  for (int d = 0; d < 3; ++d) {
    int64_t pos = o[d] * g.stride[d] - g.pad[d] + t[d] * g.rdil[d];
    if (pos < 0) return -1;
    if (g.ldil[d] > 1) {
      if (pos % g.ldil[d]) return -1;
      pos /= g.ldil[d];
    }
    if (pos >= g.in[d]) return -1;
    off = off * g.in[d] + pos;
  }
  return off * g.C;
}

// Output pixel index -> (n, o[3]); tap index -> t[3].
static inline void conv_split_pixel(const ConvGeom& g, int64_t r, int64_t& n, int64_t* o) {
  o[2] = r % g.out[2]; r /= g.out[2];
  o[1] = r % g.out[1]; r /= g.out[1];
  o[0] = r % g.out[0]; n = r / g.out[0];
}
static inline void conv_split_tap(const ConvGeom& g, int64_t t, int64_t* td) {
  td[2] = t % g.ks[2]; t /= g.ks[2];
  td[1] = t % g.ks[1]; td[0] = t / g.ks[1];
}

// Output pixels in order without a division per pixel: (n, o) of pixel r, then r + 1, ...
struct PixCursor {
  int64_t n, o[3];
  PixCursor(const ConvGeom& g, int64_t r) { conv_split_pixel(g, r, n, o); }
  void next(const ConvGeom& g) {
    if (++o[2] < g.out[2]) return;
    o[2] = 0;
    if (++o[1] < g.out[1]) return;
    o[1] = 0;
    if (++o[0] < g.out[0]) return;
    o[0] = 0;
    ++n;
  }
};

struct Tile;

// int16 A supplied a kc block at a time instead of stored whole (gemm_ffi.cc's conv weight gradient
// converts it from the conv input): rows(T, k0, k1, sr, sk) returns the tile's rows of A over K
// range [k0, k1) as X[m, k] = src[m*sr + k*sk] (valid for T's rows and that range only, until the
// next call on this thread); exponents(T) returns T's block exponents, ea[m * KB + j] valid for T's
// rows.  Called by the worker that runs T.
struct ARowSource {
  virtual const int16_t* rows(const Tile& T, int64_t k0, int64_t k1, int64_t& sr, int64_t& sk) const = 0;
  virtual const int32_t* exponents(const Tile& T) const = 0;

 protected:
  ~ARowSource() = default;
};

// Fully validated problem description handed to the per-ISA tile functions.
struct Problem {
  int64_t M, N, K, KB, block_k;
  int bits_a, bits_b;
  int32_t qmax_a, qmax_b;
  bool trans_a, trans_b;
  bool a_f32, b_f32;  // fused quantization of a float32 operand while packing
  const void* a;
  const void* b;
  const int32_t* ea;
  const int32_t* eb;
  float* out;
  // Per output batch element: element offsets into a, b, ea, eb (broadcast dims have stride 0).
  const int64_t* a_off;
  const int64_t* b_off;
  const int64_t* ea_off;
  const int64_t* eb_off;
  int64_t ea_mstride;  // KB, or 0 when ea's M dim is 1 (broadcast)
  int64_t eb_nstride;  // 1, or 0 when eb's N dim is 1
  const Piece* pieces;
  const KcBlock* kcb;
  int64_t nkcb;
  int32_t max_pairs;  // max KcBlock::pairs
  int32_t max_nblk;   // max KcBlock::nblk
  // Operand views X[r, k] = src[r*sr + k*sk] (A rows are m, B rows are n), unless `conv` gathers A.
  int64_t a_sr, a_sk, b_sr, b_sk;
  // Output: C of batch element b is out + c_off[b] (b*M*N when c_off is null), row stride ldc.
  int64_t ldc;
  const int64_t* c_off;
  const ConvGeom* conv;  // non-null: A (or B if conv->on_b) is gathered from the int16 input at a|b + off
  const ARowSource* a_src;  // non-null: A and ea come from it, not from a / ea
  // Nonzero and unique per op call: a worker may keep the packed B panels of a tile's column range
  // (all kc blocks) and reuse them for its next tile with the same batch and columns.  0: no reuse.
  uint64_t job_id;
};

struct Tile {
  int64_t batch, m0, m1, n0, n1;
};

// Result of a tile: 0 = ok, 1 = an int16 operand value out of [-qmax, qmax].
using TileFn = int (*)(const Problem&, const Tile&);

// Per-ISA entry points (defined in kernel_*.cc) and their micro-tile shapes.
int tile_scalar(const Problem&, const Tile&);
int tile_avx2(const Problem&, const Tile&);
int tile_avxvnni(const Problem&, const Tile&);
int tile_avx512vnni(const Problem&, const Tile&);

// The AMX-INT8 path of the INT16 GEMM (kernel_amx.cc): KB == 1, int16 or float32 operands, no a_src,
// kAmxMinK <= K <= kAmxMaxK (the longest K whose byte-product tile sums cannot leave int32; a shorter
// K, which the tiles pad to 64, stays on the AVX-512 kernels, INT8 too); of the convolutions
// (conv_ffi.cc), the passes that gather A from the int16 input (forward, backward-data).
constexpr int64_t kAmxMaxK = 16384;
constexpr int64_t kAmxMinK = 32;
bool amx_i16_fits(const Problem&);
int tile_amx_i16(const Problem&, const Tile&);

}  // namespace jdfp
