// The one piece of the glue that needs torch's CUDA headers: the current stream. Kept apart so
// that ops.cpp compiles against any torch (a CPU build included), and so that the host emulation
// (host_launchers.cpp) can stand in for it.
#include <c10/cuda/CUDAStream.h>

#include "kernels.h"

namespace repa_fast {

Stream current_stream(int device) {
  return c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
}

}  // namespace repa_fast
