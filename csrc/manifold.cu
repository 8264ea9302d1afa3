// The manifold loss in its direct form, tiled, for float16 rows on tensor cores (WMMA 16x16x16,
// float32 accumulation). Its operands are the rows S = Zn + Tn and D = Zn - Tn, each formed in float32
// from the normalized rows and rounded once to float16 (cosine_rows_forward): Zn Zn^T - Tn Tn^T =
// (S D^T + D S^T) / 2 is then as exact relative to itself as D's rows are, however close Zn is to Tn
// (products of rounded Zn and Tn would err by float16's epsilon whatever the difference, 100% of it at
// 1e-3). It never stores an N x N matrix outside one block's shared memory.
//
// A block owns BM rows i of one sample. Phase 1 walks the column tiles j: the tile of differences
// (BM x BN) is accumulated over the features in one accumulator, S_i D_j^T and D_i S_j^T, its squares
// are summed in float32, and, when the gradient is wanted, it is kept (rounded to the input dtype) in
// a BM x N strip in shared memory. Phase 2 multiplies the strip by Zn = (S + D) / 2 (formed as its
// tiles are loaded), BN features at a time, giving grad_scale * (D Zn) for the block's rows: the loss
// ends the graph, so its gradient is computed in the forward pass. Each block writes only its own rows
// and one partial loss: no atomics.
// Without the gradient only the tiles with j >= i are computed (D is symmetric: off-diagonal
// entries count twice).
#include <mma.h>

#include "common.cuh"

namespace repa_fast {
namespace {

using namespace nvcuda;

constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr int BK = 32;  // features per phase-1 step
constexpr int NK = 32;  // tokens per phase-2 step
constexpr int PAD = 8;  // elements added to each shared row: spreads rows over banks, keeps 16-byte rows

using FragAcc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

__host__ __device__ constexpr int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

template <int BM>
struct Tiles {
  static constexpr int BN = BM == 16 ? 128 : 64;  // difference-tile columns = phase-2 output columns
  static constexpr int FRAGS = (BM / 16) * (BN / 16) / WARPS;  // 16x16 accumulators per warp
  static constexpr int SCRATCH_LD = BN + 4;  // floats
  static constexpr int OP_LD = BK + PAD;     // phase-1 operands
  static constexpr int P2_LD = BN + PAD;     // phase-2 operand
  static constexpr int64_t SCRATCH_BYTES = round_up(int64_t(BM) * SCRATCH_LD * 4, 128);
  static constexpr int64_t OPERAND_BYTES = round_up(
      2 * ((2 * BM + 2 * BN) * OP_LD > NK * P2_LD ? (2 * BM + 2 * BN) * OP_LD : NK * P2_LD), 128);
  static_assert(FRAGS >= 1 && (BM / 16) * (BN / 16) % WARPS == 0, "whole accumulators per warp");

  // Accumulator f of warp w holds the 16 x 16 tile at rows 16 * frag_row, columns 16 * frag_col of BM x BN.
  __device__ static int frag_row(int w, int f) { return (w * FRAGS + f) / (BN / 16); }
  __device__ static int frag_col(int w, int f) { return (w * FRAGS + f) % (BN / 16); }
  __host__ __device__ static int64_t strip_ld(int64_t tokens) { return round_up(tokens, BN) + PAD; }
  static int64_t smem_bytes(int64_t tokens, bool with_grad) {
    return SCRATCH_BYTES + OPERAND_BYTES + (with_grad ? 2 * int64_t(BM) * strip_ld(tokens) : 0);
  }
};

// dst[r][c] = src[r][c], or (src[r][c] + mean_with[r][c]) / 2 when `mean_with` is given (rounded
// once from float32), for r < rows_left, c < cols_left, else 0. With `vec` (row strides and
// cols_left multiples of 8, 16-byte aligned rows) 16 bytes per load.
template <typename T, int ROWS, int COLS>
__device__ __forceinline__ void load_tile(T* dst, int dst_ld, const T* __restrict__ src,
                                          const T* __restrict__ mean_with, int64_t src_ld, int64_t rows_left,
                                          int64_t cols_left, bool vec) {
  static_assert(COLS % 8 == 0 && sizeof(T) == 2, "16-byte chunks of 8 values");
  if (vec) {
    constexpr int CHUNKS = COLS / 8;
    for (int v = threadIdx.x; v < ROWS * CHUNKS; v += THREADS) {
      const int r = v / CHUNKS, c = (v % CHUNKS) * 8;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (r < rows_left && c < cols_left) {
        val = *reinterpret_cast<const uint4*>(src + r * src_ld + c);
        if (mean_with != nullptr) {
          const uint4 other = *reinterpret_cast<const uint4*>(mean_with + r * src_ld + c);
          T* a = reinterpret_cast<T*>(&val);
          const T* b = reinterpret_cast<const T*>(&other);
#pragma unroll
          for (int k = 0; k < 8; ++k) a[k] = from_float<T>(0.5f * (to_float(a[k]) + to_float(b[k])));
        }
      }
      *reinterpret_cast<uint4*>(dst + r * dst_ld + c) = val;
    }
  } else {
    for (int v = threadIdx.x; v < ROWS * COLS; v += THREADS) {
      const int r = v / COLS, c = v % COLS;
      float val = 0.f;
      if (r < rows_left && c < cols_left) {
        val = to_float(src[r * src_ld + c]);
        if (mean_with != nullptr) val = 0.5f * (val + to_float(mean_with[r * src_ld + c]));
      }
      dst[r * dst_ld + c] = from_float<T>(val);
    }
  }
}

// acc += a (16 x 16, row-major, leading dimension lda) @ b (16 x 16 in `BLayout`, leading dimension ldb).
template <typename BLayout, typename T>
__device__ __forceinline__ void mma16(FragAcc& acc, const T* a, unsigned lda, const T* b, unsigned ldb) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a_frag;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> b_frag;
  wmma::load_matrix_sync(a_frag, a, lda);
  wmma::load_matrix_sync(b_frag, b, ldb);
  wmma::mma_sync(acc, a_frag, b_frag, acc);
}

// Stores the warps' accumulators into `scratch` (BM x BN floats), then calls visit(r, c, value) for
// every entry, spread over the block's threads. Ends with a barrier: scratch may be reused after it.
template <int BM, typename Visit>
__device__ __forceinline__ void visit_accumulators(const FragAcc* acc, float* scratch, Visit&& visit) {
  using S = Tiles<BM>;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int f = 0; f < S::FRAGS; ++f)
    wmma::store_matrix_sync(scratch + S::frag_row(warp, f) * 16 * S::SCRATCH_LD + S::frag_col(warp, f) * 16, acc[f],
                            S::SCRATCH_LD, wmma::mem_row_major);
  __syncthreads();
  for (int e = threadIdx.x; e < BM * S::BN; e += THREADS) {
    const int r = e / S::BN, c = e % S::BN;
    visit(r, c, scratch[r * S::SCRATCH_LD + c]);
  }
  __syncthreads();
}

// sum_rows, diff_rows: S and D (B, N, E) with row stride ld; loss_partial: (B, gridDim.x); grad:
// (B, N, E) fp32 or null.
// Grid: (ceil(N / BM), B). Dynamic shared memory: Tiles<BM>::smem_bytes(N, grad != null).
template <typename T, int BM>
__global__ void __launch_bounds__(THREADS, 1)
manifold_direct_kernel(const T* __restrict__ sum_rows, const T* __restrict__ diff_rows, int64_t ld, int64_t tokens,
                       int64_t dim,
                       float grad_scale, float* __restrict__ loss_partial, float* __restrict__ grad, bool vec) {
  using S = Tiles<BM>;
  constexpr int BN = S::BN;

  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ float reduce_scratch[32];
  float* scratch = reinterpret_cast<float*>(smem);
  T* a_s = reinterpret_cast<T*>(smem + S::SCRATCH_BYTES);  // phase 1: rows i of S, D; columns j of D, S
  T* a_d = a_s + BM * S::OP_LD;
  T* b_d = a_d + BM * S::OP_LD;
  T* b_s = b_d + BN * S::OP_LD;
  T* b_k = a_s;  // phase 2: NK tokens x BN features of Zn
  T* strip = reinterpret_cast<T*>(smem + S::SCRATCH_BYTES + S::OPERAND_BYTES);

  const bool with_grad = grad != nullptr;
  const int warp = threadIdx.x / 32;
  const int64_t b = blockIdx.y, i0 = static_cast<int64_t>(blockIdx.x) * BM;
  const T* s_b = sum_rows + b * tokens * ld;
  const T* d_b = diff_rows + b * tokens * ld;
  const int64_t strip_ld = S::strip_ld(tokens);
  float loss = 0.f;
  FragAcc acc[S::FRAGS];

  // Phase 1: difference tiles, their squared sum, and the strip.
  for (int64_t j0 = with_grad ? 0 : i0 / BN * BN; j0 < tokens; j0 += BN) {
#pragma unroll
    for (int f = 0; f < S::FRAGS; ++f) wmma::fill_fragment(acc[f], 0.f);
    for (int64_t k0 = 0; k0 < dim; k0 += BK) {
      load_tile<T, BM, BK>(a_s, S::OP_LD, s_b + i0 * ld + k0, nullptr, ld, tokens - i0, dim - k0, vec);
      load_tile<T, BM, BK>(a_d, S::OP_LD, d_b + i0 * ld + k0, nullptr, ld, tokens - i0, dim - k0, vec);
      load_tile<T, BN, BK>(b_d, S::OP_LD, d_b + j0 * ld + k0, nullptr, ld, tokens - j0, dim - k0, vec);
      load_tile<T, BN, BK>(b_s, S::OP_LD, s_b + j0 * ld + k0, nullptr, ld, tokens - j0, dim - k0, vec);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
#pragma unroll
        for (int f = 0; f < S::FRAGS; ++f) {
          const int a_at = S::frag_row(warp, f) * 16 * S::OP_LD + kk, b_at = S::frag_col(warp, f) * 16 * S::OP_LD + kk;
          mma16<wmma::col_major>(acc[f], a_s + a_at, S::OP_LD, b_d + b_at, S::OP_LD);  // S_i D_j^T
          mma16<wmma::col_major>(acc[f], a_d + a_at, S::OP_LD, b_s + b_at, S::OP_LD);  // D_i S_j^T
        }
      }
      __syncthreads();
    }
    visit_accumulators<BM>(acc, scratch, [&](int r, int c, float twice_d) {
      const int64_t i = i0 + r, j = j0 + c;
      const float d = 0.5f * twice_d;
      const bool valid = i < tokens && j < tokens;
      const float weight = with_grad ? 1.f : (j > i ? 2.f : (j == i ? 1.f : 0.f));
      if (valid) loss += weight * d * d;
      if (with_grad) strip[r * strip_ld + j] = from_float<T>(valid ? d : 0.f);
    });
  }

  // Phase 2: grad rows i = grad_scale * strip @ Zn, BN features at a time.
  if (with_grad) {
    const int64_t k_end = round_up(tokens, NK);
    for (int64_t e0 = 0; e0 < dim; e0 += BN) {
#pragma unroll
      for (int f = 0; f < S::FRAGS; ++f) wmma::fill_fragment(acc[f], 0.f);
      for (int64_t k0 = 0; k0 < k_end; k0 += NK) {
        load_tile<T, NK, BN>(b_k, S::P2_LD, s_b + k0 * ld + e0, d_b + k0 * ld + e0, ld, tokens - k0, dim - e0, vec);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < NK; kk += 16) {
#pragma unroll
          for (int f = 0; f < S::FRAGS; ++f)
            mma16<wmma::row_major>(acc[f], strip + S::frag_row(warp, f) * 16 * strip_ld + k0 + kk,
                                   static_cast<unsigned>(strip_ld), b_k + kk * S::P2_LD + S::frag_col(warp, f) * 16,
                                   S::P2_LD);
        }
        __syncthreads();
      }
      visit_accumulators<BM>(acc, scratch, [&](int r, int c, float v) {
        const int64_t i = i0 + r, col = e0 + c;
        if (i < tokens && col < dim) grad[(b * tokens + i) * dim + col] = grad_scale * v;
      });
    }
  }

  loss = block_sum<THREADS>(loss, reduce_scratch);
  if (threadIdx.x == 0) loss_partial[b * gridDim.x + blockIdx.x] = loss;
}

template <int BM>
Status launch(const __half* sum_rows, const __half* diff_rows, int64_t ld, int64_t batch, int64_t tokens, int64_t dim,
              float grad_scale, float* loss_partial, float* grad, cudaStream_t stream) {
  const int64_t bytes = Tiles<BM>::smem_bytes(tokens, grad != nullptr);
  const auto kernel = manifold_direct_kernel<__half, BM>;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess) return cudaGetErrorString(err);
  const bool vec = ld % 8 == 0 && dim % 8 == 0 && reinterpret_cast<uintptr_t>(sum_rows) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(diff_rows) % 16 == 0;
  const dim3 grid(blocks_for(tokens, BM), static_cast<unsigned>(batch));
  kernel<<<grid, THREADS, bytes, stream>>>(sum_rows, diff_rows, ld, tokens, dim, grad_scale, loss_partial, grad, vec);
  return launch_status();
}

}  // namespace

int manifold_direct_block_rows(Scalar dtype, int64_t tokens, bool with_grad, int device) {
  int max_bytes = 0;
  if (dtype != Scalar::f16 ||
      cudaDeviceGetAttribute(&max_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    cudaGetLastError();  // clear a failed query; the caller takes another form
    return 0;
  }
  const int64_t budget = max_bytes - 1024;  // leaves the static shared memory (reduce_scratch) room to spare
  if (Tiles<64>::smem_bytes(tokens, with_grad) <= budget) return 64;
  if (Tiles<32>::smem_bytes(tokens, with_grad) <= budget) return 32;
  if (Tiles<16>::smem_bytes(tokens, with_grad) <= budget) return 16;
  return 0;
}

Status manifold_direct(Scalar dtype, const void* sum_rows, const void* diff_rows, int64_t ld, int64_t batch,
                       int64_t tokens, int64_t dim, float grad_scale, float* loss_partial, float* grad, int block_rows,
                       Stream stream) {
  if (dtype != Scalar::f16) return "manifold_direct: float16 rows only";
  const auto sums = static_cast<const __half*>(sum_rows), diffs = static_cast<const __half*>(diff_rows);
  const auto s = static_cast<cudaStream_t>(stream);
  switch (block_rows) {
    case 64: return launch<64>(sums, diffs, ld, batch, tokens, dim, grad_scale, loss_partial, grad, s);
    case 32: return launch<32>(sums, diffs, ld, batch, tokens, dim, grad_scale, loss_partial, grad, s);
    case 16: return launch<16>(sums, diffs, ld, batch, tokens, dim, grad_scale, loss_partial, grad, s);
    default: return "manifold_direct: block_rows must be 64, 32 or 16";
  }
}

}  // namespace repa_fast
