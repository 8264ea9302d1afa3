// Device helpers shared by the kernels: dtype conversions, warp/block sums, the dtype dispatch of
// the launchers. CUDA headers only (no torch), so every .cu compiles with plain nvcc.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "kernels.h"

namespace repa_fast {

// Explicit conversions: torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends.
template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// The CUDA type of gemm_dtype() for activations of CUDA type T.
template <typename T> using GemmType = std::conditional_t<std::is_same_v<T, float>, float, __half>;

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block, returned to every thread; `scratch` holds 32 floats. Fixed order: deterministic.
template <int THREADS>
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  static_assert(THREADS % 32 == 0 && THREADS <= 1024, "whole warps");
  constexpr int WARPS = THREADS / 32;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < WARPS ? scratch[lane] : 0.f;
  v = warp_sum(v);
  __syncthreads();  // scratch may be reused right after
  return v;
}

inline Status launch_status() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// Calls f(T{}) with T the CUDA type of `dtype`, then reports the launch's status.
template <typename F>
Status dispatch(Scalar dtype, F&& f) {
  switch (dtype) {
    case Scalar::f32: f(float{}); break;
    case Scalar::f16: f(__half{}); break;
    case Scalar::bf16: f(__nv_bfloat16{}); break;
    default: return "unsupported dtype";
  }
  return launch_status();
}

// Calls f(T{}, U{}) with T and U the CUDA types of `first` and `second` (a kernel reading two
// inputs of their own dtypes), then reports the launch's status.
template <typename F>
Status dispatch_pair(Scalar first, Scalar second, F&& f) {
  Status inner = nullptr;
  const Status outer = dispatch(first, [&](auto a) { inner = dispatch(second, [&](auto b) { f(a, b); }); });
  return outer != nullptr ? outer : inner;
}

inline unsigned blocks_for(int64_t n, int64_t per_block) { return static_cast<unsigned>((n + per_block - 1) / per_block); }

}  // namespace repa_fast
