// Token resampling of the alignment as a gather over explicit taps (CSR: per output row, the input
// rows and weights), float32 accumulation in a fixed order. The forward step gathers each output
// token's 2 (linear), 4 (bilinear) or S (mean) taps; its backward is the same gather over the
// transposed taps, so no scatter and no atomics.
#include "common.cuh"

namespace repa_fast {
namespace {

constexpr int THREADS = 256;

// x: (B, src_rows, C); offsets: (dst_rows + 1,); index, weight: (offsets[dst_rows],); out: (B, dst_rows, C).
// Grid: (dst_rows, B, ceil(C / THREADS)); lanes along channels.
template <typename T>
__global__ void __launch_bounds__(THREADS, 4)
gather_rows_kernel(const T* __restrict__ x, int64_t src_rows, int64_t dst_rows, int64_t channels,
                   const int64_t* __restrict__ offsets, const int64_t* __restrict__ index,
                   const float* __restrict__ weight, T* __restrict__ out) {
  const int64_t row = blockIdx.x, b = blockIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.z) * THREADS + threadIdx.x;
  if (c >= channels) return;
  const T* xb = x + b * src_rows * channels + c;
  float acc = 0.f;
  for (int64_t j = offsets[row]; j < offsets[row + 1]; ++j) acc += weight[j] * to_float(xb[index[j] * channels]);
  out[(b * dst_rows + row) * channels + c] = from_float<T>(acc);
}

}  // namespace

Status gather_rows(Scalar dtype, const void* x, int64_t batch, int64_t src_rows, int64_t dst_rows, int64_t channels,
                   const int64_t* offsets, const int64_t* index, const float* weight, void* out, Stream stream) {
  const dim3 grid(static_cast<unsigned>(dst_rows), static_cast<unsigned>(batch), blocks_for(channels, THREADS));
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    gather_rows_kernel<T><<<grid, THREADS, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), src_rows, dst_rows, channels, offsets, index, weight, static_cast<T*>(out));
  });
}

}  // namespace repa_fast
