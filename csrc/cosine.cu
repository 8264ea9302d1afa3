// Row-wise parts of the alignment losses: per-row cosine (forward, optionally writing the normalized
// rows the manifold loss multiplies), and the gradient through the row normalization of both losses
// (backward). One warp per row, float32 sums, no atomics.
#include "common.cuh"

namespace repa_fast {
namespace {

constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;

// The target's element e of a row: with an affine map (shift and scale of the row's sample,
// target_zscore's; null without one), (t - shift) * scale, iREPA's z-score formed on load.
template <typename U>
__device__ __forceinline__ float target_at(const U* tr, int64_t e, const float* shift, const float* scale) {
  const float v = to_float(tr[e]);
  return shift == nullptr ? v : (v - shift[e]) * scale[e];
}

// The row's sample's shift and scale in t_affine (2, B, E) = (rows / tokens samples), or nulls.
__device__ __forceinline__ void affine_of(const float* t_affine, int64_t row, int64_t tokens, int64_t rows,
                                          int64_t dim, const float** shift, const float** scale) {
  if (t_affine == nullptr) return;
  const int64_t sample = row / tokens;
  *shift = t_affine + sample * dim;
  *scale = t_affine + (rows / tokens + sample) * dim;
}

// z: (rows, dim) in T, t: (rows, dim) in U, t_affine: (2, B, E) float32 or null; cos: (rows,) fp32;
// normalized: (rows, 2 * dim) = [z^ + t^ | z^ - t^], or null.
template <typename T, typename U, typename N>
__global__ void __launch_bounds__(THREADS, 4)
cosine_rows_forward_kernel(const T* __restrict__ z, const U* __restrict__ t, const float* __restrict__ t_affine,
                           int64_t tokens, int64_t rows, int64_t dim, float* __restrict__ cos,
                           N* __restrict__ normalized) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * WARPS + threadIdx.x / 32;
  if (row >= rows) return;  // the whole warp
  const T* zr = z + row * dim;
  const U* tr = t + row * dim;
  const float *shift = nullptr, *scale = nullptr;
  affine_of(t_affine, row, tokens, rows, dim, &shift, &scale);
  float zz = 0.f, tt = 0.f, zt = 0.f;
  for (int64_t e = lane; e < dim; e += 32) {
    const float a = to_float(zr[e]), b = target_at(tr, e, shift, scale);
    zz += a * a;
    tt += b * b;
    zt += a * b;
  }
  zz = warp_sum(zz);
  tt = warp_sum(tt);
  zt = warp_sum(zt);
  const float inv_z = 1.f / fmaxf(sqrtf(zz), NORMALIZE_EPS), inv_t = 1.f / fmaxf(sqrtf(tt), NORMALIZE_EPS);
  if (lane == 0) cos[row] = zt * inv_z * inv_t;
  if (normalized == nullptr) return;
  N* out = normalized + row * 2 * dim;
  for (int64_t e = lane; e < dim; e += 32) {
    const float zn = to_float(zr[e]) * inv_z, tn = target_at(tr, e, shift, scale) * inv_t;
    out[e] = from_float<N>(zn + tn);
    out[dim + e] = from_float<N>(zn - tn);
  }
}

// With z^ = z / max(||z||, eps) and g the gradient w.r.t. z^:
// g = grad_align * align_scale * t^ + grad_manifold * M, and
// grad_z = (g - <g, z^> z^) / ||z|| where the eps clamp is inactive, g / eps where it is.
// z, grad_z: (rows, dim) in T; t: (rows, dim) in U, t_affine as in the forward; manifold_grad:
// (rows, dim) fp32 or null; grad_*: device scalars.
template <typename T, typename U>
__global__ void __launch_bounds__(THREADS, 4)
cosine_rows_backward_kernel(const T* __restrict__ z, const U* __restrict__ t, const float* __restrict__ t_affine,
                            int64_t tokens, const float* __restrict__ manifold_grad,
                            const float* __restrict__ grad_align, const float* __restrict__ grad_manifold,
                            float align_scale, int64_t rows, int64_t dim, T* __restrict__ grad_z) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * WARPS + threadIdx.x / 32;
  if (row >= rows) return;
  const T* zr = z + row * dim;
  const U* tr = t + row * dim;
  const float *shift = nullptr, *scale = nullptr;
  affine_of(t_affine, row, tokens, rows, dim, &shift, &scale);
  const float* mr = manifold_grad != nullptr ? manifold_grad + row * dim : nullptr;
  float zz = 0.f, tt = 0.f, tz = 0.f, mz = 0.f;
  for (int64_t e = lane; e < dim; e += 32) {
    const float a = to_float(zr[e]), b = target_at(tr, e, shift, scale);
    zz += a * a;
    tt += b * b;
    tz += a * b;
    if (mr != nullptr) mz += mr[e] * a;
  }
  zz = warp_sum(zz);
  tt = warp_sum(tt);
  tz = warp_sum(tz);
  mz = warp_sum(mz);
  const float norm_z = sqrtf(zz);
  const float inv_z = 1.f / fmaxf(norm_z, NORMALIZE_EPS), inv_t = 1.f / fmaxf(sqrtf(tt), NORMALIZE_EPS);
  const float coef_t = *grad_align * align_scale * inv_t;  // g = coef_t * t + coef_m * M
  const float coef_m = mr != nullptr ? *grad_manifold : 0.f;
  const float g_dot_zhat = (coef_t * tz + coef_m * mz) * inv_z;
  const float radial = norm_z >= NORMALIZE_EPS ? g_dot_zhat * inv_z : 0.f;  // torch's clamp_min passes at ==
  T* gr = grad_z + row * dim;
  for (int64_t e = lane; e < dim; e += 32) {
    const float g = coef_t * target_at(tr, e, shift, scale) + (mr != nullptr ? coef_m * mr[e] : 0.f);
    gr[e] = from_float<T>((g - radial * to_float(zr[e])) * inv_z);
  }
}

}  // namespace

Status cosine_rows_forward(Scalar dtype, const void* z, Scalar t_dtype, const void* t, const float* t_affine,
                           int64_t tokens, int64_t rows, int64_t dim, float* cos, void* normalized,
                           Scalar normalized_dtype, Stream stream) {
  if (normalized_dtype != Scalar::f32 && normalized_dtype != Scalar::f16) return "normalized rows are f32 or f16";
  return dispatch_pair(dtype, t_dtype, [&](auto z_tag, auto t_tag) {
    using T = decltype(z_tag);
    using U = decltype(t_tag);
    const auto launch = [&](auto out_tag) {
      using N = decltype(out_tag);
      cosine_rows_forward_kernel<T, U, N><<<blocks_for(rows, WARPS), THREADS, 0, static_cast<cudaStream_t>(stream)>>>(
          static_cast<const T*>(z), static_cast<const U*>(t), t_affine, tokens, rows, dim, cos,
          static_cast<N*>(normalized));
    };
    if (normalized_dtype == Scalar::f16) launch(__half{});
    else launch(float{});
  });
}

Status cosine_rows_backward(Scalar dtype, const void* z, Scalar t_dtype, const void* t, const float* t_affine,
                            int64_t tokens, const float* manifold_grad, const float* grad_align,
                            const float* grad_manifold, float align_scale, int64_t rows, int64_t dim, void* grad_z,
                            Stream stream) {
  return dispatch_pair(dtype, t_dtype, [&](auto z_tag, auto t_tag) {
    using T = decltype(z_tag);
    using U = decltype(t_tag);
    cosine_rows_backward_kernel<T, U><<<blocks_for(rows, WARPS), THREADS, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(z), static_cast<const U*>(t), t_affine, tokens, manifold_grad, grad_align, grad_manifold,
        align_scale, rows, dim, static_cast<T*>(grad_z));
  });
}

}  // namespace repa_fast
