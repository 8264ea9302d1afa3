// The launchers of the cuda backend's kernels: raw pointers, sizes, element strides and a stream,
// with no torch and no CUDA header, so the torch glue (ops.cpp) and the kernels (*.cu) compile
// apart: the kernels with nvcc on a machine without a GPU or a CUDA torch, the glue against any
// torch (../shared/GPU_LESS.md §3). csrc/host_launchers.cpp implements the same contract on the
// CPU so that the glue can be run and checked without a GPU.
//
// Every launcher returns nullptr on success, else the CUDA error's message. Activations are float32,
// float16 or bfloat16 (`Scalar`); the projection's GEMM operands are gemm_dtype(activations);
// statistics, weights, partial sums and gradients kept for later are float32. Sizes and strides are
// in elements.
#pragma once

#include <cstdint>

namespace repa_fast {

enum class Scalar : int { f32 = 0, f16 = 1, bf16 = 2 };

using Stream = void*;        // cudaStream_t
using Status = const char*;  // nullptr, or what went wrong

constexpr float NORMALIZE_EPS = 1e-12f;  // F.normalize's eps: v^ = v / max(||v||, NORMALIZE_EPS)

// Rows of a (B, S, D) token tensor read in place: element (b, s, d) lives at b*sb + s*ss + d*sd,
// so a (B, D, H, W) feature map's (B, H*W, D) view is read without a copy.
struct TokenLayout {
  int64_t batch, tokens, dim;
  int64_t sb, ss, sd;
};

// The dtype of the projection GEMM's operands for activations of `activations`' dtype: float32 for
// float32; float16 for both half-precision dtypes (bfloat16 included: the same tensor-core speed,
// with 3 more mantissa bits — bfloat16 operands cost ~1e-2 relative error in the gradients).
constexpr Scalar gemm_dtype(Scalar activations) { return activations == Scalar::f32 ? Scalar::f32 : Scalar::f16; }

// LayerNorm of every row of x: y = (x - mean) * rstd * gamma + beta, y (B*S, D) row-major in
// gemm_dtype(dtype) (the GEMM's operand), or float32 when y_float32; mean and rstd (B*S) float32.
Status layer_norm_forward(Scalar dtype, const void* x, TokenLayout x_layout, const float* gamma,
                          const float* beta, float eps, void* y, bool y_float32, float* mean, float* rstd,
                          Stream stream);

// Rows handled by one block of layer_norm_backward: the gamma/beta partial sums have
// ceil(B*S / LAYER_NORM_ROWS) rows of D, summed (deterministically) by the caller.
constexpr int64_t LAYER_NORM_ROWS = 32;

// Backward of layer_norm_forward given grad_y (B*S, D) row-major float32, row r times
// grad_y_row_scale[r] (B*S float32) unless it is null (it undoes the per-row scaling of a float16
// GEMM operand): grad_x (may be null) written with grad_x_layout's strides in x's dtype, and
// per-block partial sums of grad_gamma = sum grad_y * xhat and grad_beta = sum grad_y (both null or
// both given).
Status layer_norm_backward(Scalar dtype, const void* x, TokenLayout x_layout, const float* grad_y,
                           const float* grad_y_row_scale, const float* mean, const float* rstd, const float* gamma,
                           void* grad_x, TokenLayout grad_x_layout, float* gamma_partial, float* beta_partial,
                           Stream stream);

// out[b, r, :] = sum over j in [offsets[r], offsets[r+1]) of weight[j] * x[b, index[j], :], with
// x (B, src_rows, C) and out (B, dst_rows, C) row-major in one dtype, float32 accumulation. The
// token resampling of the alignment (forward: taps of each output token; backward: the transposed
// taps of each input token) is this one gather.
Status gather_rows(Scalar dtype, const void* x, int64_t batch, int64_t src_rows, int64_t dst_rows,
                   int64_t channels, const int64_t* offsets, const int64_t* index, const float* weight,
                   void* out, Stream stream);

// Per row r of z and t (rows x dim, row-major, each in its dtype): cos[r] = <z^, t^> with
// v^ = v / max(||v||, 1e-12), and when `normalized` is given, normalized[r] = [z^_r + t^_r | z^_r - t^_r]
// (rows x 2*dim) in normalized_dtype (f32, or f16 for the tensor cores: values in [-2, 2] keep 3 more
// mantissa bits in f16 than in bf16): the manifold loss's operands in both forms, each rounded once
// from float32, so the difference of nearly equal rows keeps its relative precision. With t_affine
// ((2, B, E) float32: target_zscore's shift and scale; B = rows / tokens samples of `tokens` rows),
// the target is t' = (t - shift) * scale of the row's sample, formed in float32 as it is loaded.
Status cosine_rows_forward(Scalar dtype, const void* z, Scalar t_dtype, const void* t, const float* t_affine,
                           int64_t tokens, int64_t rows, int64_t dim, float* cos, void* normalized,
                           Scalar normalized_dtype, Stream stream);

// Gradient w.r.t. z of  grad_align * align_scale * sum_r <z^_r, t^_r>  +  grad_manifold * <M, Z^>,
// where M = manifold_grad (rows x dim, float32, may be null) is the manifold loss's gradient w.r.t.
// the normalized rows; grad_align and grad_manifold are device scalars; t and t_affine as in
// cosine_rows_forward. grad_z in z's dtype.
Status cosine_rows_backward(Scalar dtype, const void* z, Scalar t_dtype, const void* t, const float* t_affine,
                            int64_t tokens, const float* manifold_grad, const float* grad_align,
                            const float* grad_manifold, float align_scale, int64_t rows, int64_t dim, void* grad_z,
                            Stream stream);

// iREPA's z-score of a target t (B, N, E) at `layout`'s strides, as the affine map the two
// launchers above apply: affine (2, B, E) float32 = (alpha * mean_n(t), 1 / (std_n(t) + eps)), the
// unbiased std over the N tokens (0 when N == 1). One pass over t.
Status target_zscore(Scalar dtype, const void* t, TokenLayout layout, float alpha, float eps, float* affine,
                     Stream stream);

// The direct (tiled) manifold kernel for float16 rows S = Zn + Tn, D = Zn - Tn (B, N, E) with row
// stride `ld`: per sample sum over (i, j) of (zn_i.zn_j - tn_i.tn_j)^2 = ((s_i.d_j + d_i.s_j) / 2)^2,
// never storing an N x N matrix; with `grad` (B, N, E) float32 also grad_scale * (Zn Zn^T - Tn Tn^T) Zn,
// Zn = (S + D) / 2. Without `grad`
// only the tiles j >= i are computed (the matrix is symmetric). One block per (block_rows rows, b):
// loss_partial holds B * ceil(N / block_rows) sums, summed by the caller.
// manifold_direct_block_rows: the rows per block the kernel takes for this size on `device`; 0 for
// rows that are not float16, or when the strip of differences it keeps in shared memory does not fit
// (the caller then computes the direct form in chunks of rows through cuBLAS).
int manifold_direct_block_rows(Scalar dtype, int64_t tokens, bool with_grad, int device);
Status manifold_direct(Scalar dtype, const void* sum_rows, const void* diff_rows, int64_t ld, int64_t batch,
                       int64_t tokens, int64_t dim, float grad_scale, float* loss_partial, float* grad, int block_rows,
                       Stream stream);

// The current stream of CUDA device `device` (cuda_stream.cpp; the host emulation returns null).
Stream current_stream(int device);

}  // namespace repa_fast
