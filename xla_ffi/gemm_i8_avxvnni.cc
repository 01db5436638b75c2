// INT8 GEMM on AVX-VNNI (VEX vpdpbusd ymm): gemm_i8_avx2.cc's kernels with the VNNI dot product.
#define JDFP_I8_AVXVNNI 1
#include "gemm_i8_avx2.cc"
