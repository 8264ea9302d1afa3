// LayerNorm forward and backward over the rows of a (B, S, D) token tensor read in place.
//
// A block owns 32 rows and walks the features 32 at a time through a shared-memory tile, loaded
// and stored with consecutive lanes on whichever dim is contiguous (features for tokens, tokens for
// a feature map's (B, H*W, C) view), so both layouts are read coalesced without a copy.
// Statistics and sums are float32; every reduction has a fixed order (deterministic): the
// gamma/beta gradients are written as per-block partial sums, not accumulated with atomics.
#include "common.cuh"

namespace repa_fast {
namespace {

constexpr int ROWS = static_cast<int>(LAYER_NORM_ROWS);
constexpr int COLS = 32;
constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr int ROWS_PER_WARP = ROWS / WARPS;
static_assert(ROWS == 32, "one row per lane when the token dim is contiguous");

using TileRef = float (*)[COLS + 1];  // +1: lanes walking a column hit distinct banks

// Offset of element (row, d = 0) for each row of the block (rows past the end get 0).
__device__ void row_offsets(const TokenLayout& layout, int64_t row0, int64_t rows, int64_t* offset) {
  for (int r = threadIdx.x; r < ROWS; r += THREADS) {
    const int64_t row = row0 + r;
    const int64_t b = row / layout.tokens;
    offset[r] = row < rows ? b * layout.sb + (row - b * layout.tokens) * layout.ss : 0;
  }
}

// tile[r][c] = x(row0 + r, d0 + c) as float, 0 outside the tensor.
template <typename T>
__device__ void load_tile(const T* __restrict__ x, const TokenLayout& layout, const int64_t* offset, int valid_rows,
                          int64_t d0, TileRef tile) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t valid_cols = layout.dim - d0;
  if (layout.sd != 1) {  // lanes along rows
    for (int c = warp; c < COLS; c += WARPS)
      tile[lane][c] = lane < valid_rows && c < valid_cols ? to_float(x[offset[lane] + (d0 + c) * layout.sd]) : 0.f;
  } else {  // lanes along features
    for (int r = warp; r < ROWS; r += WARPS)
      tile[r][lane] = r < valid_rows && lane < valid_cols ? to_float(x[offset[r] + d0 + lane]) : 0.f;
  }
}

template <typename T>
__device__ void store_tile(T* __restrict__ out, const TokenLayout& layout, const int64_t* offset, int valid_rows,
                           int64_t d0, TileRef tile) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t valid_cols = layout.dim - d0;
  if (layout.sd != 1) {
    for (int c = warp; c < COLS; c += WARPS)
      if (lane < valid_rows && c < valid_cols) out[offset[lane] + (d0 + c) * layout.sd] = from_float<T>(tile[lane][c]);
  } else {
    for (int r = warp; r < ROWS; r += WARPS)
      if (r < valid_rows && lane < valid_cols) out[offset[r] + d0 + lane] = from_float<T>(tile[r][lane]);
  }
}

// x: (B, S, D) strided; gamma, beta: (D,) fp32; y: (B*S, D) row-major in Y (the GEMM's dtype or fp32);
// mean, rstd: (B*S,) fp32.
template <typename T, typename Y>
__global__ void __launch_bounds__(THREADS, 2)
layer_norm_forward_kernel(const T* __restrict__ x, TokenLayout layout, const float* __restrict__ gamma,
                          const float* __restrict__ beta, float eps, Y* __restrict__ y,
                          float* __restrict__ mean, float* __restrict__ rstd) {
  __shared__ float tile[ROWS][COLS + 1];
  __shared__ int64_t offset[ROWS];
  __shared__ float row_mean[ROWS], row_rstd[ROWS];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t rows = layout.batch * layout.tokens, dim = layout.dim;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * ROWS;
  const int valid_rows = static_cast<int>(rows - row0 < ROWS ? rows - row0 : ROWS);
  row_offsets(layout, row0, rows, offset);
  __syncthreads();

  // Pass 1: sums of (x - K) and (x - K)^2 with K the row's first feature, so that
  // var = E[(x - K)^2] - E[x - K]^2 does not cancel when |mean| >> std.
  float shift[ROWS_PER_WARP] = {}, s1[ROWS_PER_WARP] = {}, s2[ROWS_PER_WARP] = {};
  for (int64_t d0 = 0; d0 < dim; d0 += COLS) {
    load_tile(x, layout, offset, valid_rows, d0, tile);
    __syncthreads();
    const bool col_ok = d0 + lane < dim;
#pragma unroll
    for (int i = 0; i < ROWS_PER_WARP; ++i) {
      const int r = warp * ROWS_PER_WARP + i;
      if (d0 == 0) shift[i] = tile[r][0];
      const float v = tile[r][lane] - shift[i];
      if (col_ok) {
        s1[i] += v;
        s2[i] += v * v;
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < ROWS_PER_WARP; ++i) {
    const int r = warp * ROWS_PER_WARP + i;
    const float m = warp_sum(s1[i]) / dim;
    const float var = fmaxf(warp_sum(s2[i]) / dim - m * m, 0.f);
    if (lane == 0) {
      row_mean[r] = shift[i] + m;
      row_rstd[r] = rsqrtf(var + eps);
      if (r < valid_rows) {
        mean[row0 + r] = row_mean[r];
        rstd[row0 + r] = row_rstd[r];
      }
    }
  }
  __syncthreads();

  // Pass 2: normalize, scale, shift; y is written row-major with lanes along features.
  for (int64_t d0 = 0; d0 < dim; d0 += COLS) {
    load_tile(x, layout, offset, valid_rows, d0, tile);
    __syncthreads();
    const int64_t d = d0 + lane;
    if (d < dim) {
      const float g = gamma[d], b = beta[d];
      for (int r = warp; r < valid_rows; r += WARPS)
        y[(row0 + r) * dim + d] = from_float<Y>((tile[r][lane] - row_mean[r]) * row_rstd[r] * g + b);
    }
    __syncthreads();
  }
}

// grad_x = rstd * (g*gamma - mean_d(g*gamma) - xhat * mean_d(g*gamma*xhat)) per row, and per-column
// sums over the block's rows of g*xhat (gamma) and g (beta), with g = grad_y * grad_y_row_scale[row].
// x: strided; grad_y: (B*S, D) row-major fp32; grad_y_row_scale: (B*S,) fp32 or null (1);
// grad_x: strided (grad_layout) or null; gamma_partial, beta_partial: (gridDim.x, D) fp32 or null.
template <typename T>
__global__ void __launch_bounds__(THREADS, 2)
layer_norm_backward_kernel(const T* __restrict__ x, TokenLayout layout, const float* __restrict__ grad_y,
                           const float* __restrict__ grad_y_row_scale, const float* __restrict__ mean,
                           const float* __restrict__ rstd,
                           const float* __restrict__ gamma, T* __restrict__ grad_x, TokenLayout grad_layout,
                           float* __restrict__ gamma_partial, float* __restrict__ beta_partial) {
  __shared__ float tile[ROWS][COLS + 1];
  __shared__ int64_t offset[ROWS], grad_offset[ROWS];
  __shared__ float row_mean[ROWS], row_rstd[ROWS], row_scale[ROWS], row_c1[ROWS], row_c2[ROWS];
  __shared__ float col_gamma[WARPS][COLS], col_beta[WARPS][COLS];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t rows = layout.batch * layout.tokens, dim = layout.dim;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * ROWS;
  const int valid_rows = static_cast<int>(rows - row0 < ROWS ? rows - row0 : ROWS);
  row_offsets(layout, row0, rows, offset);
  if (grad_x != nullptr) row_offsets(grad_layout, row0, rows, grad_offset);
  if (threadIdx.x < ROWS) {
    const bool ok = static_cast<int>(threadIdx.x) < valid_rows;
    row_mean[threadIdx.x] = ok ? mean[row0 + threadIdx.x] : 0.f;
    row_rstd[threadIdx.x] = ok ? rstd[row0 + threadIdx.x] : 0.f;
    row_scale[threadIdx.x] = ok && grad_y_row_scale != nullptr ? grad_y_row_scale[row0 + threadIdx.x] : 1.f;
  }
  __syncthreads();

  // Pass 1: row sums for grad_x, column sums for gamma/beta.
  float sum_g[ROWS_PER_WARP] = {}, sum_gx[ROWS_PER_WARP] = {};
  for (int64_t d0 = 0; d0 < dim; d0 += COLS) {
    load_tile(x, layout, offset, valid_rows, d0, tile);
    __syncthreads();
    const int64_t d = d0 + lane;
    const bool col_ok = d < dim;
    const float gam = col_ok ? gamma[d] : 0.f;
    float col_gx = 0.f, col_g = 0.f;
#pragma unroll
    for (int i = 0; i < ROWS_PER_WARP; ++i) {
      const int r = warp * ROWS_PER_WARP + i;
      if (r < valid_rows && col_ok) {
        const float g = grad_y[(row0 + r) * dim + d] * row_scale[r];
        const float xhat = (tile[r][lane] - row_mean[r]) * row_rstd[r];
        sum_g[i] += g * gam;
        sum_gx[i] += g * gam * xhat;
        col_gx += g * xhat;
        col_g += g;
      }
    }
    if (gamma_partial != nullptr) {
      col_gamma[warp][lane] = col_gx;
      col_beta[warp][lane] = col_g;
    }
    __syncthreads();
    // Read before the next tile's barrier; the next writes come after it.
    if (gamma_partial != nullptr && warp == 0 && col_ok) {
      float sg = 0.f, sb = 0.f;
#pragma unroll
      for (int w = 0; w < WARPS; ++w) {
        sg += col_gamma[w][lane];
        sb += col_beta[w][lane];
      }
      gamma_partial[blockIdx.x * dim + d] = sg;
      beta_partial[blockIdx.x * dim + d] = sb;
    }
  }
  if (grad_x == nullptr) return;

#pragma unroll
  for (int i = 0; i < ROWS_PER_WARP; ++i) {
    const int r = warp * ROWS_PER_WARP + i;
    const float c1 = warp_sum(sum_g[i]) / dim, c2 = warp_sum(sum_gx[i]) / dim;
    if (lane == 0) {
      row_c1[r] = c1;
      row_c2[r] = c2;
    }
  }
  __syncthreads();

  // Pass 2: grad_x through the tile, stored with grad_x's own layout.
  for (int64_t d0 = 0; d0 < dim; d0 += COLS) {
    load_tile(x, layout, offset, valid_rows, d0, tile);
    __syncthreads();
    const int64_t d = d0 + lane;
    const float gam = d < dim ? gamma[d] : 0.f;
    for (int r = warp; r < ROWS; r += WARPS) {
      float v = 0.f;
      if (r < valid_rows && d < dim) {
        const float g = grad_y[(row0 + r) * dim + d] * row_scale[r];
        const float xhat = (tile[r][lane] - row_mean[r]) * row_rstd[r];
        v = row_rstd[r] * (g * gam - row_c1[r] - xhat * row_c2[r]);
      }
      tile[r][lane] = v;
    }
    __syncthreads();
    store_tile(grad_x, grad_layout, grad_offset, valid_rows, d0, tile);
    __syncthreads();
  }
}

}  // namespace

Status layer_norm_forward(Scalar dtype, const void* x, TokenLayout x_layout, const float* gamma, const float* beta,
                          float eps, void* y, bool y_float32, float* mean, float* rstd, Stream stream) {
  const unsigned blocks = blocks_for(x_layout.batch * x_layout.tokens, ROWS);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto launch = [&](auto y_tag) {
      using Y = decltype(y_tag);
      layer_norm_forward_kernel<T, Y><<<blocks, THREADS, 0, static_cast<cudaStream_t>(stream)>>>(
          static_cast<const T*>(x), x_layout, gamma, beta, eps, static_cast<Y*>(y), mean, rstd);
    };
    if (y_float32) launch(float{});
    else launch(GemmType<T>{});
  });
}

Status layer_norm_backward(Scalar dtype, const void* x, TokenLayout x_layout, const float* grad_y,
                           const float* grad_y_row_scale, const float* mean, const float* rstd, const float* gamma,
                           void* grad_x, TokenLayout grad_x_layout, float* gamma_partial, float* beta_partial,
                           Stream stream) {
  const unsigned blocks = blocks_for(x_layout.batch * x_layout.tokens, ROWS);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    layer_norm_backward_kernel<T><<<blocks, THREADS, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), x_layout, grad_y, grad_y_row_scale, mean, rstd, gamma, static_cast<T*>(grad_x),
        grad_x_layout, gamma_partial, beta_partial);
  });
}

}  // namespace repa_fast
