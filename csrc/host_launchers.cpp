// CPU stand-ins for the launchers of kernels.h, for tests only: built with ops.cpp and
// REPA_FAST_DISPATCH_KEY=CPU, they let the whole cuda backend (glue, GEMMs, op registration, the
// Python custom ops, autograd, torch.compile) run on a machine without a GPU. Each follows its
// launcher's contract with plain loops; they are not the kernels, whose numerics are checked on a
// GPU by tests/test_cuda_backend.py.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace repa_fast {
namespace {

constexpr int DIRECT_BLOCK_ROWS = 16;  // small, so that small tests still sum several partials

template <typename F>
Status dispatch(Scalar dtype, F&& f) {
  switch (dtype) {
    case Scalar::f32: f(float{}); return nullptr;
    case Scalar::f16: f(c10::Half{}); return nullptr;
    case Scalar::bf16: f(c10::BFloat16{}); return nullptr;
  }
  return "unsupported dtype";
}

template <typename T> float to_f(T v) { return static_cast<float>(v); }
template <typename T> T from_f(float v) { return static_cast<T>(v); }

// The C++ type of gemm_dtype() for activations of type T.
template <typename T> using GemmType = std::conditional_t<std::is_same_v<T, float>, float, c10::Half>;

int64_t offset_of(const TokenLayout& l, int64_t row) {
  const int64_t b = row / l.tokens;
  return b * l.sb + (row - b * l.tokens) * l.ss;
}

}  // namespace

Stream current_stream(int) { return nullptr; }

Status layer_norm_forward(Scalar dtype, const void* x, TokenLayout xl, const float* gamma, const float* beta, float eps,
                          void* y, bool y_float32, float* mean, float* rstd, Stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xs = static_cast<const T*>(x);
    for (int64_t row = 0; row < xl.batch * xl.tokens; ++row) {
      const int64_t base = offset_of(xl, row);
      float sum = 0.f, sq = 0.f;
      for (int64_t d = 0; d < xl.dim; ++d) sum += to_f(xs[base + d * xl.sd]);
      const float mu = sum / xl.dim;
      for (int64_t d = 0; d < xl.dim; ++d) sq += (to_f(xs[base + d * xl.sd]) - mu) * (to_f(xs[base + d * xl.sd]) - mu);
      mean[row] = mu;
      rstd[row] = 1.f / std::sqrt(sq / xl.dim + eps);
      for (int64_t d = 0; d < xl.dim; ++d) {
        const float value = (to_f(xs[base + d * xl.sd]) - mu) * rstd[row] * gamma[d] + beta[d];
        if (y_float32) static_cast<float*>(y)[row * xl.dim + d] = value;
        else static_cast<GemmType<T>*>(y)[row * xl.dim + d] = from_f<GemmType<T>>(value);
      }
    }
  });
}

Status layer_norm_backward(Scalar dtype, const void* x, TokenLayout xl, const float* grad_y,
                           const float* grad_y_row_scale, const float* mean, const float* rstd, const float* gamma,
                           void* grad_x, TokenLayout gl, float* gamma_partial, float* beta_partial, Stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xs = static_cast<const T*>(x);
    const int64_t rows = xl.batch * xl.tokens, dim = xl.dim;
    const int64_t blocks = (rows + LAYER_NORM_ROWS - 1) / LAYER_NORM_ROWS;
    if (gamma_partial != nullptr)
      for (int64_t i = 0; i < blocks * dim; ++i) gamma_partial[i] = beta_partial[i] = 0.f;
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t base = offset_of(xl, row);
      std::vector<float> xhat(dim), g(dim);
      const float g_scale = grad_y_row_scale != nullptr ? grad_y_row_scale[row] : 1.f;
      float c1 = 0.f, c2 = 0.f;
      for (int64_t d = 0; d < dim; ++d) {
        xhat[d] = (to_f(xs[base + d * xl.sd]) - mean[row]) * rstd[row];
        g[d] = grad_y[row * dim + d] * g_scale;
        c1 += g[d] * gamma[d];
        c2 += g[d] * gamma[d] * xhat[d];
      }
      c1 /= dim;
      c2 /= dim;
      for (int64_t d = 0; d < dim; ++d) {
        if (grad_x != nullptr)
          static_cast<T*>(grad_x)[offset_of(gl, row) + d * gl.sd] =
              from_f<T>(rstd[row] * (g[d] * gamma[d] - c1 - xhat[d] * c2));
        if (gamma_partial != nullptr) {
          gamma_partial[(row / LAYER_NORM_ROWS) * dim + d] += g[d] * xhat[d];
          beta_partial[(row / LAYER_NORM_ROWS) * dim + d] += g[d];
        }
      }
    }
  });
}

Status gather_rows(Scalar dtype, const void* x, int64_t batch, int64_t src_rows, int64_t dst_rows, int64_t channels,
                   const int64_t* offsets, const int64_t* index, const float* weight, void* out, Stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xs = static_cast<const T*>(x);
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t r = 0; r < dst_rows; ++r)
        for (int64_t c = 0; c < channels; ++c) {
          float acc = 0.f;
          for (int64_t j = offsets[r]; j < offsets[r + 1]; ++j)
            acc += weight[j] * to_f(xs[(b * src_rows + index[j]) * channels + c]);
          static_cast<T*>(out)[(b * dst_rows + r) * channels + c] = from_f<T>(acc);
        }
  });
}

namespace {

// Calls f(T{}, U{}) with the C++ types of `first` and `second`.
template <typename F>
Status dispatch_pair(Scalar first, Scalar second, F&& f) {
  Status inner = nullptr;
  const Status outer = dispatch(first, [&](auto a) { inner = dispatch(second, [&](auto b) { f(a, b); }); });
  return outer != nullptr ? outer : inner;
}

// Row r of t (in U) in float32, z-scored with its sample's shift and scale when t_affine is given.
template <typename U>
std::vector<float> target_row(const U* ts, const float* t_affine, int64_t tokens, int64_t rows, int64_t dim,
                              int64_t r) {
  std::vector<float> row(dim);
  const int64_t sample = r / tokens;
  for (int64_t e = 0; e < dim; ++e) {
    row[e] = to_f(ts[r * dim + e]);
    if (t_affine != nullptr)
      row[e] = (row[e] - t_affine[sample * dim + e]) * t_affine[(rows / tokens + sample) * dim + e];
  }
  return row;
}

}  // namespace

Status cosine_rows_forward(Scalar dtype, const void* z, Scalar t_dtype, const void* t, const float* t_affine,
                           int64_t tokens, int64_t rows, int64_t dim, float* cos, void* normalized,
                           Scalar normalized_dtype, Stream) {
  if (normalized_dtype != Scalar::f32 && normalized_dtype != Scalar::f16) return "normalized rows are f32 or f16";
  return dispatch_pair(dtype, t_dtype, [&](auto z_tag, auto t_tag) {
    using T = decltype(z_tag);
    using U = decltype(t_tag);
    const T* zs = static_cast<const T*>(z);
    for (int64_t r = 0; r < rows; ++r) {
      const std::vector<float> tr = target_row(static_cast<const U*>(t), t_affine, tokens, rows, dim, r);
      float zz = 0.f, tt = 0.f, zt = 0.f;
      for (int64_t e = 0; e < dim; ++e) {
        const float a = to_f(zs[r * dim + e]), b = tr[e];
        zz += a * a;
        tt += b * b;
        zt += a * b;
      }
      const float inv_z = 1.f / std::fmax(std::sqrt(zz), NORMALIZE_EPS);
      const float inv_t = 1.f / std::fmax(std::sqrt(tt), NORMALIZE_EPS);
      cos[r] = zt * inv_z * inv_t;
      if (normalized == nullptr) continue;
      for (int64_t e = 0; e < dim; ++e) {
        const float zn = to_f(zs[r * dim + e]) * inv_z, tn = tr[e] * inv_t;
        const float first = zn + tn, second = zn - tn;
        if (normalized_dtype == Scalar::f16) {
          static_cast<c10::Half*>(normalized)[r * 2 * dim + e] = from_f<c10::Half>(first);
          static_cast<c10::Half*>(normalized)[r * 2 * dim + dim + e] = from_f<c10::Half>(second);
        } else {
          static_cast<float*>(normalized)[r * 2 * dim + e] = first;
          static_cast<float*>(normalized)[r * 2 * dim + dim + e] = second;
        }
      }
    }
  });
}

Status cosine_rows_backward(Scalar dtype, const void* z, Scalar t_dtype, const void* t, const float* t_affine,
                            int64_t tokens, const float* manifold_grad, const float* grad_align,
                            const float* grad_manifold, float align_scale, int64_t rows, int64_t dim, void* grad_z,
                            Stream) {
  return dispatch_pair(dtype, t_dtype, [&](auto z_tag, auto t_tag) {
    using T = decltype(z_tag);
    using U = decltype(t_tag);
    const T* zs = static_cast<const T*>(z);
    for (int64_t r = 0; r < rows; ++r) {
      const std::vector<float> tr = target_row(static_cast<const U*>(t), t_affine, tokens, rows, dim, r);
      float zz = 0.f, tt = 0.f;
      for (int64_t e = 0; e < dim; ++e) {
        zz += to_f(zs[r * dim + e]) * to_f(zs[r * dim + e]);
        tt += tr[e] * tr[e];
      }
      const float norm_z = std::sqrt(zz);
      const float inv_z = 1.f / std::fmax(norm_z, NORMALIZE_EPS), inv_t = 1.f / std::fmax(std::sqrt(tt), NORMALIZE_EPS);
      std::vector<float> g(dim);
      float g_dot_zhat = 0.f;
      for (int64_t e = 0; e < dim; ++e) {
        g[e] = *grad_align * align_scale * tr[e] * inv_t;
        if (manifold_grad != nullptr) g[e] += *grad_manifold * manifold_grad[r * dim + e];
        g_dot_zhat += g[e] * to_f(zs[r * dim + e]) * inv_z;
      }
      for (int64_t e = 0; e < dim; ++e) {
        const float radial = norm_z >= NORMALIZE_EPS ? g_dot_zhat * to_f(zs[r * dim + e]) * inv_z : 0.f;
        static_cast<T*>(grad_z)[r * dim + e] = from_f<T>((g[e] - radial) * inv_z);
      }
    }
  });
}

// Two passes in double over each (sample, feature) column: the contract, not the kernel's one pass.
Status target_zscore(Scalar dtype, const void* t, TokenLayout l, float alpha, float eps, float* affine, Stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* ts = static_cast<const T*>(t);
    for (int64_t b = 0; b < l.batch; ++b)
      for (int64_t e = 0; e < l.dim; ++e) {
        const auto at = [&](int64_t n) { return static_cast<double>(to_f(ts[b * l.sb + n * l.ss + e * l.sd])); };
        double mean = 0.0, m2 = 0.0;
        for (int64_t n = 0; n < l.tokens; ++n) mean += at(n);
        mean /= l.tokens;
        for (int64_t n = 0; n < l.tokens; ++n) m2 += (at(n) - mean) * (at(n) - mean);
        const double std = l.tokens > 1 ? std::sqrt(m2 / (l.tokens - 1)) : 0.0;
        affine[b * l.dim + e] = static_cast<float>(alpha * mean);
        affine[(l.batch + b) * l.dim + e] = static_cast<float>(1.0 / (std + eps));
      }
  });
}

int manifold_direct_block_rows(Scalar dtype, int64_t, bool, int) {
  return dtype == Scalar::f16 ? DIRECT_BLOCK_ROWS : 0;
}

Status manifold_direct(Scalar dtype, const void* sum_rows, const void* diff_rows, int64_t ld, int64_t batch,
                       int64_t tokens, int64_t dim, float grad_scale, float* loss_partial, float* grad, int block_rows,
                       Stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* ss = static_cast<const T*>(sum_rows);
    const T* ds = static_cast<const T*>(diff_rows);
    const int64_t blocks = (tokens + block_rows - 1) / block_rows;
    for (int64_t i = 0; i < batch * blocks; ++i) loss_partial[i] = 0.f;
    std::vector<float> strip(tokens);
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t i = 0; i < tokens; ++i) {
        const int64_t ri = (b * tokens + i) * ld;
        for (int64_t j = 0; j < tokens; ++j) {
          const int64_t rj = (b * tokens + j) * ld;
          float twice_d = 0.f;  // s_i.d_j + d_i.s_j
          for (int64_t e = 0; e < dim; ++e)
            twice_d += to_f(ss[ri + e]) * to_f(ds[rj + e]) + to_f(ds[ri + e]) * to_f(ss[rj + e]);
          const float d = 0.5f * twice_d;
          // With the gradient every (i, j) counts once; without, only j >= i (off-diagonal twice).
          const float weight = grad != nullptr ? 1.f : (j > i ? 2.f : (j == i ? 1.f : 0.f));
          loss_partial[b * blocks + i / block_rows] += weight * d * d;
          strip[j] = to_f(from_f<T>(d));  // the kernel keeps the strip in the input dtype
        }
        if (grad == nullptr) continue;
        for (int64_t e = 0; e < dim; ++e) {
          float acc = 0.f;
          for (int64_t j = 0; j < tokens; ++j) {  // zn_j = (s_j + d_j) / 2 in the kernel's dtype
            const int64_t rj = (b * tokens + j) * ld + e;
            acc += strip[j] * to_f(from_f<T>(0.5f * (to_f(ss[rj]) + to_f(ds[rj]))));
          }
          grad[(b * tokens + i) * dim + e] = grad_scale * acc;
        }
      }
  });
}

}  // namespace repa_fast
