// iREPA's target z-score as a per-(sample, channel) affine map (repa_fast.reference.target_zscore):
// shift = alpha * mean_n(t), scale = 1 / (std_n(t) + eps), unbiased std (0 for one token), in one
// pass over the (B, N, E) target read in place. A block takes 32 features of one sample: each warp
// reads a coalesced 32-feature segment of a token row, its 8 warps every 8th token; each thread keeps
// Welford moments of the deviations from the sample's first token (a pivot: the sums stay at the
// std's scale however large the mean), and the 8 per-warp moments of a feature are merged the
// Chan et al. way in a fixed order. float32 throughout, no atomics.
#include "common.cuh"

namespace repa_fast {
namespace {

constexpr int FEATURES = 32;     // per block: one warp's segment of a token row
constexpr int TOKEN_WARPS = 8;   // warps per block, each every TOKEN_WARPS-th token
constexpr int THREADS = FEATURES * TOKEN_WARPS;

struct Moments {
  float count, mean, m2;  // m2: sum of squared deviations from mean
};

__device__ __forceinline__ Moments merge(Moments a, Moments b) {
  const float count = a.count + b.count;
  if (count == 0.f) return a;
  const float delta = b.mean - a.mean, weight = __fdividef(b.count, count);
  return {count, a.mean + delta * weight, a.m2 + b.m2 + delta * delta * a.count * weight};
}

// t: (B, N, E) at layout's strides; affine: (2, B, E) float32 out. Grid (ceil(E / FEATURES), B).
template <typename T>
__global__ void __launch_bounds__(THREADS)
target_zscore_kernel(const T* __restrict__ t, TokenLayout layout, float alpha, float eps, float* __restrict__ affine) {
  __shared__ Moments partial[TOKEN_WARPS][FEATURES];
  const int lane = threadIdx.x % FEATURES, warp = threadIdx.x / FEATURES;
  const int64_t b = blockIdx.y, e = static_cast<int64_t>(blockIdx.x) * FEATURES + lane;
  Moments m{0.f, 0.f, 0.f};
  float pivot = 0.f;
  if (e < layout.dim) {
    const T* column = t + b * layout.sb + e * layout.sd;
    pivot = to_float(column[0]);
#pragma unroll 4  // loads of the next tokens in flight while the moments update
    for (int64_t n = warp; n < layout.tokens; n += TOKEN_WARPS) {
      const float x = to_float(column[n * layout.ss]) - pivot;
      m.count += 1.f;
      const float delta = x - m.mean;
      m.mean += __fdividef(delta, m.count);  // 2 ulp; the IEEE division's slow path spilled
      m.m2 += delta * (x - m.mean);
    }
  }
  partial[warp][lane] = m;
  __syncthreads();
  if (warp != 0 || e >= layout.dim) return;
  for (int w = 1; w < TOKEN_WARPS; ++w) m = merge(m, partial[w][lane]);
  const float std = layout.tokens > 1 ? sqrtf(m.m2 / static_cast<float>(layout.tokens - 1)) : 0.f;
  affine[b * layout.dim + e] = alpha * (pivot + m.mean);
  affine[(layout.batch + b) * layout.dim + e] = 1.f / (std + eps);
}

}  // namespace

Status target_zscore(Scalar dtype, const void* t, TokenLayout layout, float alpha, float eps, float* affine,
                     Stream stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(blocks_for(layout.dim, FEATURES), static_cast<unsigned>(layout.batch));
    target_zscore_kernel<T><<<grid, THREADS, 0, static_cast<cudaStream_t>(stream)>>>(static_cast<const T*>(t), layout,
                                                                                     alpha, eps, affine);
  });
}

}  // namespace repa_fast
