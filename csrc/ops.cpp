// The torch glue of the cuda backend: argument checks, allocation, the GEMMs (cuBLAS through ATen),
// the kernel launches of kernels.h, and the registration of the ops torch.ops.repa_fast.cuda_*.
//
// No CUDA header here (the stream comes from cuda_stream.cpp), so this file compiles against a CPU
// torch too: tests build it with csrc/host_launchers.cpp and REPA_FAST_DISPATCH_KEY=CPU to run the
// whole backend on the CPU without a GPU.
//
// The ops are defined with TORCH_LIBRARY_FRAGMENT, not TORCH_LIBRARY: the namespace `repa_fast` is
// shared with the Triton backend's ops and with the Python custom ops of repa_fast.cuda_backend
// (torch.library fragments), and TORCH_LIBRARY claims a namespace for one library only. Fake
// (meta) implementations and autograd are registered from Python (repa_fast/cuda_backend.py).
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <tuple>

#include "kernels.h"

#ifndef REPA_FAST_DISPATCH_KEY
#define REPA_FAST_DISPATCH_KEY CUDA
#endif

namespace repa_fast {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

Scalar scalar_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return Scalar::f32;
    case at::kHalf: return Scalar::f16;
    case at::kBFloat16: return Scalar::bf16;
    default: TORCH_CHECK_TYPE(false, "repa_fast cuda backend: float32, float16 or bfloat16 tensors only, got ", t.scalar_type());
  }
}

void check_ok(Status status, const char* kernel) {
  TORCH_CHECK(status == nullptr, "repa_fast cuda backend: ", kernel, " failed: ", status);
}

void check_device(const Tensor& first, at::ArrayRef<Tensor> others) {
  for (const Tensor& t : others)
    TORCH_CHECK(t.device() == first.device(), "repa_fast cuda backend: all tensors must be on ", first.device(),
                ", got one on ", t.device());
}

Stream stream_of(const Tensor& t) { return current_stream(t.get_device()); }

TokenLayout layout_of(const Tensor& t) {
  return {t.size(0), t.size(1), t.size(2), t.stride(0), t.stride(1), t.stride(2)};
}

// Half-precision products run on tensor cores in their dtype with float32 accumulation and give a
// float32 result (torch >= 2.8's out_dtype GEMMs); float32 ones run as torch runs them (TF32 only
// where torch's matmul precision allows it).
Tensor matmul_f32(const Tensor& a, const Tensor& b) {
  if (a.scalar_type() == at::kFloat) return a.dim() == 3 ? at::bmm(a, b) : at::mm(a, b);
  if (!a.is_cuda()) return matmul_f32(a.to(at::kFloat), b.to(at::kFloat));  // host emulation: no mixed GEMM on CPU
  return a.dim() == 3 ? at::bmm(a, b, at::kFloat) : at::mm(a, b, at::kFloat);
}

// a @ b for float32 operands with TF32 off whatever torch's matmul precision (at::NoTF32Guard: this
// thread only, torch's settings untouched). For the fused U-REPA head's projection: its manifold
// term amplifies the GEMM's relative error of z as z approaches t.
Tensor matmul_ieee(const Tensor& a, const Tensor& b) {
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat,
              "repa_fast cuda backend: matmul_ieee takes float32 operands, got ", a.scalar_type(), " and ",
              b.scalar_type());
  const at::NoTF32Guard no_tf32;
  return at::mm(a, b);
}

// out[b, r] = sum_j weight[j] * x[b, index[j]] over j in [offsets[r], offsets[r + 1]).
Tensor gather(const Tensor& x, const Tensor& offsets, const Tensor& index, const Tensor& weight) {
  TORCH_CHECK(x.dim() == 3, "repa_fast cuda backend: gather needs (B, S, C) rows, got ", x.sizes());
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 2 && offsets.scalar_type() == at::kLong &&
                  index.scalar_type() == at::kLong && weight.scalar_type() == at::kFloat &&
                  index.numel() == weight.numel(),
              "repa_fast cuda backend: taps must be int64 offsets (rows + 1), int64 index and float32 weight");
  check_device(x, {offsets, index, weight});
  const Tensor xc = x.contiguous(), off = offsets.contiguous(), idx = index.contiguous(), w = weight.contiguous();
  const int64_t batch = xc.size(0), src_rows = xc.size(1), channels = xc.size(2), dst_rows = off.size(0) - 1;
  Tensor out = at::empty({batch, dst_rows, channels}, xc.options());
  check_ok(gather_rows(scalar_of(xc), xc.data_ptr(), batch, src_rows, dst_rows, channels, off.data_ptr<int64_t>(),
                       idx.data_ptr<int64_t>(), w.data_ptr<float>(), out.data_ptr(), stream_of(xc)),
           "gather_rows");
  return out;
}

Tensor gather_if(const Tensor& x, const OptionalTensor& offsets, const OptionalTensor& index,
                 const OptionalTensor& weight) {
  if (!offsets.has_value()) return x;
  TORCH_CHECK(index.has_value() && weight.has_value(), "repa_fast cuda backend: taps need offsets, index and weight");
  return gather(x, *offsets, *index, *weight);
}

// hidden (B, S, D) non-empty, ln_weight (D,) or absent (no LayerNorm), proj_weight (E, D).
void check_projection(const char* op, const Tensor& hidden, const OptionalTensor& ln_weight,
                      const Tensor& proj_weight) {
  TORCH_CHECK(hidden.dim() == 3 && hidden.numel() > 0, op, ": hidden must be non-empty (B, S, D), got ", hidden.sizes());
  TORCH_CHECK(!ln_weight.has_value() || (ln_weight->dim() == 1 && ln_weight->size(0) == hidden.size(2)), op,
              ": ln_weight must be (D,) with D = ", hidden.size(2), " or None, got ", ln_weight->sizes());
  TORCH_CHECK(proj_weight.dim() == 2 && proj_weight.size(1) == hidden.size(2), op,
              ": proj_weight must be (E, D) with D = ", hidden.size(2), ", got ", proj_weight.sizes());
}

// The dtype of the projection GEMM's operands for `activations` (kernels.h's gemm_dtype).
at::ScalarType gemm_type(const Tensor& activations) {
  return gemm_dtype(scalar_of(activations)) == Scalar::f16 ? at::kHalf : at::kFloat;
}

// The rows of x (R, C) float32 as a float16 GEMM operand, row r scaled by 2^-e_r with e_r the power
// of two that brings max |x_r| into [2^14, 2^15): dL/dz of a mean over many rows lies far below
// float16's normal range, far above it under a loss scaler, and one row can lie 1e14 above the
// others (a zero z row's 1 / 1e-12 from F.normalize's clamp): one scale for all rows would flush
// the others to 0. Returns (operand, e) with e (R, 1) float32 on the device (no synchronization);
// an all-zero row keeps a finite e.
std::tuple<Tensor, Tensor> scaled_half_rows(const Tensor& x) {
  const Tensor row_max = at::linalg_vector_norm(x, INFINITY, at::IntArrayRef{1}, /*keepdim=*/true);
  const Tensor exponent = at::clamp(at::floor(at::log2(row_max)) - 14.0, -126.0, 126.0);
  Tensor operand = at::empty_like(x, x.options().dtype(at::kHalf));
  at::mul_out(operand, x, at::exp2(exponent.neg()));
  return {operand, exponent};
}

// dW = dZ^T y from float16 operands, given dZ's rows scaled by 2^-e_r (scaled_half_rows): row r of
// y (R, D) is scaled by 2^(e_r - c), which keeps each row's product dz_r^T y_r exact in scale, and
// the sum by 2^c, with c the power of two that brings the largest scaled |y| into [2^14, 2^15).
// A row with y = 0 contributes 0 and leaves c alone, so its dz (however large) costs nothing.
Tensor weight_gradient_half(const Tensor& dz_operand, const Tensor& dz_exponent, const Tensor& y_rows) {
  const Tensor y_max = at::linalg_vector_norm(y_rows, INFINITY, at::IntArrayRef{1}, /*keepdim=*/true).to(at::kFloat);
  const Tensor c = at::clamp(at::amax(at::floor(at::log2(y_max)) + dz_exponent) - 14.0, -126.0, 126.0);
  Tensor y_operand = at::empty(y_rows.sizes(), y_rows.options().dtype(at::kHalf));
  at::mul_out(y_operand, y_rows, at::exp2(at::clamp(dz_exponent - c, -126.0, 126.0)));
  return matmul_f32(dz_operand.t(), y_operand).mul_(at::exp2(c));
}

// z = resample(LN(hidden)) @ W^T + b, float32, with LN the LayerNorm, or nothing when ln_weight and
// ln_bias are None (an MLP head's last Linear). The GEMM takes operands of gemm_type(hidden)
// (float16 for half-precision activations) with float32 accumulation, or with `fp32_gemm` float32
// operands with TF32 off (matmul_ieee: the fused U-REPA head); the bias is added in float32
// (rounding it would shift every row the same way). Also returns, for the backward, the GEMM's input
// y (B, N, D) in that operand dtype (empty without LayerNorm and resampling: y is hidden itself, read
// again by the backward rather than kept as a copy) and the LayerNorm statistics (B*S,) (empty
// without LayerNorm). Resampling is linear with weights summing to one, so it is applied before
// the GEMM (fewer rows).
std::tuple<Tensor, Tensor, Tensor, Tensor> projection_forward(
    const Tensor& hidden, const OptionalTensor& ln_weight, const OptionalTensor& ln_bias, const Tensor& proj_weight,
    const Tensor& proj_bias, const OptionalTensor& taps_offsets, const OptionalTensor& taps_index,
    const OptionalTensor& taps_weight, double ln_eps, bool fp32_gemm) {
  check_projection("cuda_projection_forward", hidden, ln_weight, proj_weight);
  const bool layer_norm = ln_weight.has_value();
  TORCH_CHECK(ln_bias.has_value() == layer_norm,
              "cuda_projection_forward: ln_weight and ln_bias must both be tensors or both be None (no LayerNorm)");
  TORCH_CHECK((!layer_norm || ln_bias->numel() == hidden.size(2)) && proj_bias.numel() == proj_weight.size(0),
              "cuda_projection_forward: ln_bias must be (D,) and proj_bias (E,)");
  check_device(hidden, {proj_weight, proj_bias});
  if (layer_norm) check_device(hidden, {*ln_weight, *ln_bias});
  const c10::DeviceGuard guard(hidden.device());
  const int64_t batch = hidden.size(0), tokens = hidden.size(1), dim = hidden.size(2), out_dim = proj_weight.size(0);
  const auto gemm = fp32_gemm ? at::kFloat : gemm_type(hidden);
  const auto f32 = hidden.options().dtype(at::kFloat);
  Tensor y, mean = at::empty({layer_norm ? batch * tokens : 0}, f32), rstd = at::empty_like(mean);
  if (layer_norm) {
    const Tensor gamma = ln_weight->to(at::kFloat).contiguous(), beta = ln_bias->to(at::kFloat).contiguous();
    y = at::empty({batch, tokens, dim}, hidden.options().dtype(gemm));
    check_ok(layer_norm_forward(scalar_of(hidden), hidden.data_ptr(), layout_of(hidden), gamma.data_ptr<float>(),
                                beta.data_ptr<float>(), static_cast<float>(ln_eps), y.data_ptr(), fp32_gemm,
                                mean.data_ptr<float>(), rstd.data_ptr<float>(), stream_of(hidden)),
             "layer_norm_forward");
  } else {
    y = hidden.to(gemm);
  }
  y = gather_if(y, taps_offsets, taps_index, taps_weight);
  const int64_t rows = y.size(1);
  const Tensor y_rows = y.reshape({batch * rows, dim}), weight_t = proj_weight.to(gemm).t();
  Tensor z = (fp32_gemm ? matmul_ieee(y_rows, weight_t) : matmul_f32(y_rows, weight_t))
                 .add_(proj_bias.to(at::kFloat));
  const bool y_is_hidden = !layer_norm && !taps_offsets.has_value();
  return {z.view({batch, rows, out_dim}), y_is_hidden ? at::empty({0}, y.options()) : y, mean, rstd};
}

// Gradients of projection_forward's z for the inputs flagged in `needs` (hidden, ln_weight, ln_bias,
// proj_weight, proj_bias), undefined for the others (without LayerNorm, ln_weight None, the ln ones
// cannot be asked for). hidden's comes in its dtype and, when it is dense, its strides; the
// parameters' come in float32 (the caller casts). The taps are the transposed (scatter) taps of the
// forward's resampling. The products take dL/dz in the operand dtype of gemm_type(hidden) (float16:
// each row scaled by its own power of two, see scaled_half_rows; a float32 y of the fused head is
// cast to it) and give float32 results, which feed reductions (over rows for W, over rows and
// features in the LayerNorm backward); b's gradient sums float32 dL/dz itself.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> projection_backward(
    const Tensor& grad_z, const Tensor& hidden, const OptionalTensor& ln_weight, const Tensor& proj_weight,
    const Tensor& y, const Tensor& mean, const Tensor& rstd, const OptionalTensor& taps_offsets,
    const OptionalTensor& taps_index, const OptionalTensor& taps_weight, std::array<bool, 5> needs) {
  check_projection("cuda_projection_backward", hidden, ln_weight, proj_weight);
  check_device(hidden, {grad_z, proj_weight, y, mean, rstd});
  const bool layer_norm = ln_weight.has_value(), resampled = taps_offsets.has_value();
  TORCH_CHECK(layer_norm || !(needs[1] || needs[2]),
              "cuda_projection_backward: without LayerNorm (ln_weight None) there are no ln_weight or ln_bias "
              "gradients to compute");
  const c10::DeviceGuard guard(hidden.device());
  const int64_t batch = hidden.size(0), tokens = hidden.size(1), dim = hidden.size(2), out_dim = proj_weight.size(0);
  const int64_t rows = grad_z.dim() == 3 ? grad_z.size(1) : -1;
  const bool y_is_hidden = !layer_norm && !resampled;
  const auto gemm = gemm_type(hidden);
  const int64_t stats = layer_norm ? batch * tokens : 0;
  TORCH_CHECK(grad_z.sizes() == at::IntArrayRef({batch, rows, out_dim}) &&
                  (y_is_hidden ? y.numel() == 0 : y.sizes() == at::IntArrayRef({batch, rows, dim})) &&
                  (y.scalar_type() == gemm || y.scalar_type() == at::kFloat) && mean.numel() == stats &&
                  rstd.numel() == stats,
              "cuda_projection_backward: grad_z, y, mean and rstd do not match the forward's shapes and dtypes");
  const Tensor gz = grad_z.to(at::kFloat).contiguous().view({batch * rows, out_dim});
  // float16 products take dL/dz's rows scaled by 2^-e_r (exponent and row_unscale = 2^e_r are
  // undefined for float32 ones)
  Tensor operand = gz, exponent, row_unscale;
  if (gemm == at::kHalf) {
    std::tie(operand, exponent) = scaled_half_rows(gz);
    row_unscale = at::exp2(exponent);
  }
  Tensor g_hidden, g_gamma, g_beta, g_weight, g_bias;
  if (needs[3]) {
    const Tensor y_rows = (y_is_hidden ? hidden : y).reshape({batch * rows, dim});
    g_weight = exponent.defined() ? weight_gradient_half(operand, exponent, y_rows) : matmul_f32(operand.t(), y_rows);
  }
  if (needs[4]) g_bias = gz.sum(0);
  if (!(needs[0] || needs[1] || needs[2])) return {g_hidden, g_gamma, g_beta, g_weight, g_bias};

  Tensor g_y = matmul_f32(operand, proj_weight.to(gemm));  // (B*rows, D) float32, row r still times 2^-e_r
  if (row_unscale.defined() && resampled) {  // the transposed taps mix rows of different scales
    g_y.mul_(row_unscale);
    row_unscale = Tensor();
  }
  g_y = gather_if(g_y.view({batch, rows, dim}), taps_offsets, taps_index, taps_weight).contiguous();
  TORCH_CHECK(g_y.size(1) == tokens, "cuda_projection_backward: the taps map ", rows, " rows to ", g_y.size(1),
              ", expected ", tokens);
  if (!layer_norm) {  // dL/dhidden = g_y (unscaled) in hidden's dtype and, when it is dense, strides
    if (!row_unscale.defined() && g_y.scalar_type() == hidden.scalar_type() && g_y.strides() == hidden.strides())
      return {g_y, g_gamma, g_beta, g_weight, g_bias};
    g_hidden = at::empty_like(hidden);
    if (row_unscale.defined()) at::mul_out(g_hidden, g_y, row_unscale.view({batch, tokens, 1}));
    else g_hidden.copy_(g_y);
    return {g_hidden, g_gamma, g_beta, g_weight, g_bias};
  }
  const Tensor gamma = ln_weight->to(at::kFloat).contiguous();
  const bool params = needs[1] || needs[2];
  const int64_t blocks = (batch * tokens + LAYER_NORM_ROWS - 1) / LAYER_NORM_ROWS;
  const auto f32 = hidden.options().dtype(at::kFloat);
  const Tensor gamma_partial = params ? at::empty({blocks, dim}, f32) : Tensor();
  const Tensor beta_partial = params ? at::empty({blocks, dim}, f32) : Tensor();
  if (needs[0]) g_hidden = at::empty_like(hidden);  // hidden's strides when it is dense, else contiguous
  check_ok(layer_norm_backward(scalar_of(hidden), hidden.data_ptr(), layout_of(hidden), g_y.data_ptr<float>(),
                               row_unscale.defined() ? row_unscale.data_ptr<float>() : nullptr,
                               mean.contiguous().data_ptr<float>(), rstd.contiguous().data_ptr<float>(),
                               gamma.data_ptr<float>(), needs[0] ? g_hidden.data_ptr() : nullptr,
                               layout_of(needs[0] ? g_hidden : hidden),
                               params ? gamma_partial.data_ptr<float>() : nullptr,
                               params ? beta_partial.data_ptr<float>() : nullptr, stream_of(hidden)),
           "layer_norm_backward");
  if (needs[1]) g_gamma = gamma_partial.sum(0);
  if (needs[2]) g_beta = beta_partial.sum(0);
  return {g_hidden, g_gamma, g_beta, g_weight, g_bias};
}

Tensor gather_rows_op(const Tensor& x, const Tensor& offsets, const Tensor& index, const Tensor& weight) {
  const c10::DeviceGuard guard(x.device());
  return gather(x, offsets, index, weight);
}

// The manifold loss of normalized rows, float16 or float32, and, when asked, its gradient w.r.t.
// Zn: (4 / (B N^2)) (Zn Zn^T - Tn Tn^T) Zn, float32 (else an empty (0, N, E)). Three ways, none
// storing B x N x N: the Gram form through cuBLAS when the caller prefers it (it is cheaper for
// N > 5E/3); else the direct form, in the tiled kernel (float16 rows, on tensor cores) when its strip
// fits in shared memory, else in chunks of rows through cuBLAS (float32 rows: exact float32, TF32
// only where torch allows it). `pairs` (B, N, 2E) holds [S | D] = [Zn + Tn | Zn - Tn], each rounded
// once from float32 (cosine_rows_forward): both forms multiply S and D only, so the products are as
// exact relative to Zn Zn^T - Tn Tn^T as D's rows are, however close Zn is to Tn.
std::tuple<Tensor, Tensor> manifold_terms(const Tensor& pairs, bool gram, bool need_grad) {
  const int64_t batch = pairs.size(0), tokens = pairs.size(1), dim = pairs.size(2) / 2;
  const double count = static_cast<double>(batch) * tokens * tokens;
  const auto f32 = pairs.options().dtype(at::kFloat);
  const Tensor no_grad = at::empty({0, tokens, dim}, f32);
  const Tensor s = pairs.narrow(2, 0, dim), d = pairs.narrow(2, dim, dim);
  if (gram) {
    // Zn Zn^T - Tn Tn^T = (S D^T + D S^T) / 2, so the sum is (<S^T S, D^T D> + <S^T D, D^T S>) / 2:
    // three E x E products, without the textbook ||Zn^T Zn||^2 - 2 ||Zn^T Tn||^2 + ||Tn^T Tn||^2's
    // cancellation of large terms when rows are aligned or share a direction.
    const Tensor s_products = matmul_f32(s.transpose(1, 2), pairs);  // (B, E, 2E) = [S^T S | S^T D]
    const Tensor ss = s_products.narrow(2, 0, dim), sd = s_products.narrow(2, dim, dim);
    const Tensor dd = matmul_f32(d.transpose(1, 2), d);
    const Tensor loss = (at::sum(ss * dd) + at::sum(sd * sd.transpose(1, 2))) / (2.0 * count);
    if (!need_grad) return {loss, no_grad};
    // 4 (Zn Zn^T - Tn Tn^T) Zn = [S | D] @ [D^T S + D^T D ; S^T S + S^T D] (with Zn = (S + D) / 2),
    // one product reusing the three above, without large cancelling terms either.
    Tensor rhs = at::cat({sd.transpose(1, 2) + dd, ss + sd}, 1);  // (B, 2E, E)
    if (pairs.scalar_type() == at::kFloat) return {loss, matmul_f32(pairs, rhs.mul_(1.0 / count))};
    // float16: rhs's entries are at most 8N in magnitude (rows of S and D have norms <= 2); scaled to
    // at most 2^15 rather than by 1 / count, which would flush them below float16's range.
    const double scale = std::ldexp(1.0, 12 - static_cast<int>(std::ceil(std::log2(static_cast<double>(tokens)))));
    return {loss, matmul_f32(pairs, rhs.mul_(scale).to(at::kHalf)).mul_(1.0 / (count * scale))};
  }
  Tensor grad = need_grad ? at::empty({batch, tokens, dim}, f32) : no_grad;
  const int block_rows = manifold_direct_block_rows(scalar_of(pairs), tokens, need_grad, pairs.get_device());
  if (block_rows > 0) {
    Tensor partial = at::empty({batch * ((tokens + block_rows - 1) / block_rows)}, f32);
    const char* rows = static_cast<const char*>(pairs.data_ptr());
    check_ok(manifold_direct(scalar_of(pairs), rows, rows + dim * pairs.element_size(), 2 * dim, batch, tokens, dim,
                             static_cast<float>(4.0 / count), partial.data_ptr<float>(),
                             need_grad ? grad.data_ptr<float>() : nullptr, block_rows, stream_of(pairs)),
             "manifold_direct");
    return {partial.sum() / count, grad};
  }
  // Chunks of rows i: (B, rows, N) float32 differences (S_i D^T + D_i S^T) / 2, at most 2^24 values
  // (64 MiB) at a time and fewer rows than N (never the whole B x N x N).
  const Tensor zn = need_grad ? (s.to(at::kFloat) + d.to(at::kFloat)).mul_(0.5).to(pairs.scalar_type()) : Tensor();
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(tokens - 1, (int64_t(1) << 24) / (batch * tokens)));
  Tensor total = at::zeros({}, f32);
  for (int64_t start = 0; start < tokens; start += chunk) {
    const int64_t length = std::min(chunk, tokens - start);
    const Tensor diff = matmul_f32(s.narrow(1, start, length), d.transpose(1, 2))
                            .add_(matmul_f32(d.narrow(1, start, length), s.transpose(1, 2)))
                            .mul_(0.5);
    total.add_(at::linalg_vector_norm(diff).square());
    if (need_grad) {
      // Round the differences (|diff| <= 2) to the rows' dtype first and scale the fp32 product
      // after: scaled by 4 / (B N^2) first, fp16 values would land in subnormals or flush to 0.
      grad.narrow(1, start, length).copy_(matmul_f32(diff.to(pairs.scalar_type()), zn).mul_(4.0 / count));
    }
  }
  return {total / count, grad};
}

// t_affine (iREPA's z-score of the target, target_zscore's (2, B, E) float32 map) or null, checked
// against (B, N, E) z. With it the kernels read t in its own dtype and z-score it in float32 on load;
// without it t is cast to z's dtype.
std::tuple<Tensor, const float*> target_and_affine(const char* op, const Tensor& z, const Tensor& t,
                                                   const OptionalTensor& t_affine, Tensor& affine_storage) {
  if (!t_affine.has_value()) return {t.to(z.scalar_type()).contiguous(), nullptr};
  TORCH_CHECK(t_affine->scalar_type() == at::kFloat && t_affine->sizes() == at::IntArrayRef({2, z.size(0), z.size(2)}),
              op, ": t_affine must be float32 (2, B, E) = (2, ", z.size(0), ", ", z.size(2), "), got ",
              t_affine->scalar_type(), " ", t_affine->sizes());
  check_device(z, {*t_affine});
  affine_storage = t_affine->contiguous();
  scalar_of(t);  // float32, float16 or bfloat16
  return {t.contiguous(), affine_storage.data_ptr<float>()};
}

// (alignment, manifold, manifold_grad): alignment = -mean cos(z, t) per row; the manifold loss and
// its gradient w.r.t. the normalized rows when `manifold` (else 0 and an empty (0, N, E) tensor;
// the gradient is also empty without `need_grad`). The manifold's operands, the normalized rows'
// sums and differences (manifold_terms), are float16 for the tensor cores when `half_precision`
// (half-precision activations), else float32. Losses are float32 scalars. The target is t, cast to
// z's dtype, or with `t_affine` t z-scored on load (target_and_affine).
std::tuple<Tensor, Tensor, Tensor> alignment_terms(const Tensor& z, const Tensor& t, bool manifold, bool gram,
                                                   bool need_grad, bool half_precision,
                                                   const OptionalTensor& t_affine) {
  TORCH_CHECK(z.dim() == 3 && z.numel() > 0 && t.sizes() == z.sizes(),
              "cuda_alignment_terms: z and t must be non-empty (B, N, E) of one shape, got ", z.sizes(), " and ",
              t.sizes());
  check_device(z, {t});
  const c10::DeviceGuard guard(z.device());
  Tensor affine;
  const auto [tc, affine_ptr] = target_and_affine("cuda_alignment_terms", z, t, t_affine, affine);
  const Tensor zc = z.contiguous();
  const int64_t batch = z.size(0), tokens = z.size(1), dim = z.size(2), rows = batch * tokens;
  const auto f32 = z.options().dtype(at::kFloat);
  const auto normalized_dtype = half_precision ? at::kHalf : at::kFloat;
  Tensor cos = at::empty({rows}, f32);
  Tensor pairs = manifold ? at::empty({batch, tokens, 2 * dim}, z.options().dtype(normalized_dtype)) : Tensor();
  check_ok(cosine_rows_forward(scalar_of(zc), zc.data_ptr(), scalar_of(tc), tc.data_ptr(), affine_ptr, tokens, rows, dim,
                               cos.data_ptr<float>(), manifold ? pairs.data_ptr() : nullptr,
                               half_precision ? Scalar::f16 : Scalar::f32, stream_of(zc)),
           "cosine_rows_forward");
  Tensor align = cos.mean().neg();
  if (!manifold) return {align, at::zeros({}, f32), at::empty({0, tokens, dim}, f32)};
  auto [loss, grad] = manifold_terms(pairs, gram, need_grad);
  return {align, loss, grad};
}

// Gradient w.r.t. z of grad_align * alignment + grad_manifold * manifold (through the row
// normalization), in z's dtype. manifold_grad is alignment_terms' third output.
Tensor alignment_terms_backward(const Tensor& z, const Tensor& t, const Tensor& manifold_grad,
                                const Tensor& grad_align, const Tensor& grad_manifold,
                                const OptionalTensor& t_affine) {
  TORCH_CHECK(z.dim() == 3 && z.numel() > 0 && t.sizes() == z.sizes(),
              "cuda_alignment_terms_backward: z and t must be non-empty (B, N, E) of one shape");
  const bool has_manifold = manifold_grad.numel() > 0;
  TORCH_CHECK(!has_manifold || (manifold_grad.sizes() == z.sizes() && manifold_grad.scalar_type() == at::kFloat),
              "cuda_alignment_terms_backward: manifold_grad must be float32 ", z.sizes(), " or empty");
  TORCH_CHECK(grad_align.numel() == 1 && grad_manifold.numel() == 1,
              "cuda_alignment_terms_backward: grad_align and grad_manifold must be scalars");
  check_device(z, {t, manifold_grad, grad_align, grad_manifold});
  const c10::DeviceGuard guard(z.device());
  Tensor affine;
  const auto [tc, affine_ptr] = target_and_affine("cuda_alignment_terms_backward", z, t, t_affine, affine);
  const Tensor zc = z.contiguous();
  const Tensor mg = manifold_grad.contiguous();
  const Tensor ga = grad_align.to(at::kFloat).contiguous(), gm = grad_manifold.to(at::kFloat).contiguous();
  const int64_t rows = z.size(0) * z.size(1), dim = z.size(2);
  Tensor grad_z = at::empty_like(zc);
  check_ok(cosine_rows_backward(scalar_of(zc), zc.data_ptr(), scalar_of(tc), tc.data_ptr(), affine_ptr, z.size(1),
                                has_manifold ? mg.data_ptr<float>() : nullptr, ga.data_ptr<float>(),
                                gm.data_ptr<float>(), static_cast<float>(-1.0 / rows), rows, dim, grad_z.data_ptr(),
                                stream_of(zc)),
           "cosine_rows_backward");
  return grad_z;
}

// iREPA's z-score of `target` (B, N, E), read in place, as (2, B, E) float32 (shift, scale):
// kernels.h's target_zscore with SimpleTuner's eps 1e-6.
Tensor target_zscore_op(const Tensor& target, double alpha) {
  TORCH_CHECK(target.dim() == 3 && target.numel() > 0, "cuda_target_zscore: target must be non-empty (B, N, E), got ",
              target.sizes());
  const c10::DeviceGuard guard(target.device());
  Tensor affine = at::empty({2, target.size(0), target.size(2)}, target.options().dtype(at::kFloat));
  check_ok(target_zscore(scalar_of(target), target.data_ptr(), layout_of(target), static_cast<float>(alpha), 1e-6f,
                         affine.data_ptr<float>(), stream_of(target)),
           "target_zscore");
  return affine;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(repa_fast, m) {
  m.def("cuda_projection_forward(Tensor hidden, Tensor? ln_weight, Tensor? ln_bias, Tensor proj_weight, "
        "Tensor proj_bias, Tensor? taps_offsets, Tensor? taps_index, Tensor? taps_weight, float ln_eps, "
        "bool fp32_gemm) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cuda_projection_backward(Tensor grad_z, Tensor hidden, Tensor? ln_weight, Tensor proj_weight, Tensor y, "
        "Tensor mean, Tensor rstd, Tensor? taps_offsets, Tensor? taps_index, Tensor? taps_weight, bool[5] needs) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("cuda_gather_rows(Tensor x, Tensor offsets, Tensor index, Tensor weight) -> Tensor");
  m.def("cuda_alignment_terms(Tensor z, Tensor t, bool manifold, bool gram, bool need_grad, bool half_precision, "
        "Tensor? t_affine=None) -> (Tensor, Tensor, Tensor)");
  m.def("cuda_alignment_terms_backward(Tensor z, Tensor t, Tensor manifold_grad, Tensor grad_align, "
        "Tensor grad_manifold, Tensor? t_affine=None) -> Tensor");
  m.def("cuda_target_zscore(Tensor target, float alpha) -> Tensor");
}

TORCH_LIBRARY_IMPL(repa_fast, REPA_FAST_DISPATCH_KEY, m) {
  m.impl("cuda_projection_forward", &projection_forward);
  m.impl("cuda_projection_backward", &projection_backward);
  m.impl("cuda_gather_rows", &gather_rows_op);
  m.impl("cuda_alignment_terms", &alignment_terms);
  m.impl("cuda_alignment_terms_backward", &alignment_terms_backward);
  m.impl("cuda_target_zscore", &target_zscore_op);
}

}  // namespace repa_fast
