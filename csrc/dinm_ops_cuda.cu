// CUDA kernels of dinm's ops (schemas, input checks and CPU kernels: dinm_ops.cpp). Built only when torch has CUDA
// and a CUDA toolkit is present. Launched on the current stream of the inputs' device (a device guard); every launch
// is checked. Accumulation as on the CPU: float32, float64 for float64 inputs (at::opmath_type).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "dinm_ops.h"

namespace dinm {
namespace {

constexpr int kThreads = 256;
constexpr int kChunk = 256;  // hidden dimensions per block of layer_distances

template <typename T>
__device__ T block_sum(T value, T* shared) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffff, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  value = threadIdx.x < blockDim.x / 32 ? shared[lane] : T(0);
  if (warp == 0)
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffff, value, offset);
  return value;  // valid in thread 0
}

// Grid (layers * pairs, chunks of hidden). Each block reads its chunk of both responses over all tokens
// (coalesced along hidden) and adds 4 partial sums to parts[job]: dot, |a|^2, |b|^2, |a - b|^2 of the masked
// means (or, for l2_tokens, the squared position-wise difference in slot 3).
template <typename scalar_t, typename acc_t>
__global__ void distances_partial(const int64_t* __restrict__ hidden, const bool* __restrict__ mask_a,
                                  const bool* __restrict__ mask_b, acc_t* __restrict__ parts, int64_t pairs,
                                  int64_t tokens, int64_t width, bool per_token) {
  __shared__ acc_t shared[32];
  const int64_t job = blockIdx.x, layer = job / pairs, pair = job % pairs;
  const scalar_t* a = reinterpret_cast<const scalar_t*>(hidden[layer]) + 2 * pair * tokens * width;
  const scalar_t* b = a + tokens * width;
  const bool* ma = mask_a + pair * tokens;
  const bool* mb = mask_b + pair * tokens;
  acc_t dot = 0, na2 = 0, nb2 = 0, diff = 0;
  const int64_t first = static_cast<int64_t>(blockIdx.y) * kChunk;
  const int64_t last = first + kChunk < width ? first + kChunk : width;
  for (int64_t i = first + threadIdx.x; i < last; i += blockDim.x) {
    if (per_token) {
      for (int64_t t = 0; t < tokens; ++t) {
        if (ma[t] && mb[t]) {
          const acc_t d = static_cast<acc_t>(a[t * width + i]) - static_cast<acc_t>(b[t * width + i]);
          diff += d * d;
        }
      }
      continue;
    }
    acc_t sa = 0, sb = 0;
    int64_t ca = 0, cb = 0;
    for (int64_t t = 0; t < tokens; ++t) {
      if (ma[t]) { sa += static_cast<acc_t>(a[t * width + i]); ++ca; }
      if (mb[t]) { sb += static_cast<acc_t>(b[t * width + i]); ++cb; }
    }
    const acc_t x = sa / static_cast<acc_t>(ca > 0 ? ca : 1), y = sb / static_cast<acc_t>(cb > 0 ? cb : 1);
    dot += x * y;
    na2 += x * x;
    nb2 += y * y;
    diff += (x - y) * (x - y);
  }
  const acc_t sums[4] = {dot, na2, nb2, diff};
  for (int k = 0; k < 4; ++k) {
    const acc_t total = block_sum(sums[k], shared);
    if (threadIdx.x == 0) atomicAdd(parts + job * 4 + k, total);
  }
}

template <typename acc_t>
__global__ void distances_finish(const acc_t* __restrict__ parts, float* __restrict__ out, int64_t jobs, int kind) {
  const int64_t job = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (job >= jobs) return;
  const acc_t* p = parts + job * 4;
  out[job] = static_cast<float>(kind == static_cast<int>(DistanceKind::Cosine) ? cosine_distance(p[0], p[1], p[2])
                                                                                : ::sqrt(p[3]));
}

// Masked rows (count of them): element e of the grid is column e % cols of row rows[e / cols].
template <typename scalar_t>
__global__ void update_rows_kernel(scalar_t* __restrict__ weight, const scalar_t* __restrict__ delta,
                                   const int64_t* __restrict__ rows, int64_t count, int64_t cols, bool compact,
                                   at::opmath_type<scalar_t> alpha) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < count * cols;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = e / cols, j = e % cols, row = rows[k];
    const int64_t src = (compact ? k : row) * cols + j;
    weight[row * cols + j] = static_cast<scalar_t>(static_cast<acc_t>(weight[row * cols + j]) +
                                                   alpha * static_cast<acc_t>(delta[src]));
  }
}

template <typename scalar_t>
__global__ void update_elements_kernel(scalar_t* __restrict__ weight, const scalar_t* __restrict__ delta,
                                       const bool* __restrict__ mask, int64_t numel, at::opmath_type<scalar_t> alpha) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (mask[i]) weight[i] = static_cast<scalar_t>(static_cast<acc_t>(weight[i]) + alpha * static_cast<acc_t>(delta[i]));
  }
}

inline int grid_for(int64_t n) { return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 65535))); }

at::Tensor layer_distances_cuda(at::TensorList hidden_in, const at::Tensor& mask_a_in,
                                const at::Tensor& mask_b_in, c10::string_view kind_name) {
  check_distance_inputs(hidden_in, mask_a_in, mask_b_in);
  const DistanceKind kind = parse_kind(kind_name);
  const c10::cuda::CUDAGuard guard(hidden_in[0].device());
  std::vector<at::Tensor> hidden;
  std::vector<int64_t> addresses;
  for (const auto& h : hidden_in) {
    hidden.push_back(h.contiguous());
    addresses.push_back(reinterpret_cast<int64_t>(hidden.back().data_ptr()));
  }
  const at::Tensor mask_a = mask_a_in.contiguous(), mask_b = mask_b_in.contiguous();
  const int64_t layers = static_cast<int64_t>(hidden.size()), pairs = hidden[0].size(0) / 2;
  const int64_t tokens = hidden[0].size(1), width = hidden[0].size(2), jobs = layers * pairs;
  const auto options = hidden[0].options();
  const at::Tensor pointers = at::tensor(addresses, at::kLong).to(options.device(), at::kLong, /*non_blocking=*/false);
  at::Tensor out = at::empty({layers, pairs}, options.dtype(at::kFloat));
  if (jobs == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(jobs), static_cast<unsigned>((width + kChunk - 1) / kChunk));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, options.dtype().toScalarType(), "dinm_layer_distances_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor parts = at::zeros({jobs, 4}, options.dtype(c10::CppTypeToScalarType<acc_t>::value));
    if (width > 0) {  // (no hidden features: zero sums, as on the CPU)
      distances_partial<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
          pointers.data_ptr<int64_t>(), mask_a.data_ptr<bool>(), mask_b.data_ptr<bool>(), parts.data_ptr<acc_t>(),
          pairs, tokens, width, kind == DistanceKind::L2Tokens);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    distances_finish<acc_t><<<static_cast<unsigned>((jobs + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        parts.data_ptr<acc_t>(), out.data_ptr<float>(), jobs, static_cast<int>(kind));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

void masked_update_cuda(at::Tensor& weight, const at::Tensor& delta_in, const c10::optional<at::Tensor>& mask_in,
                        double alpha) {
  check_update_inputs(weight, delta_in, mask_in);
  if (!mask_in.has_value()) {
    weight.add_(delta_in, alpha);  // ATen's kernel: one rounding per element
    return;
  }
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor delta = delta_in.contiguous(), mask = mask_in->contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (mask.sizes() == weight.sizes()) {
    const int64_t numel = weight.numel();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "dinm_masked_update_cuda", [&] {
      update_elements_kernel<scalar_t><<<grid_for(numel), kThreads, 0, stream>>>(
          weight.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(), mask.data_ptr<bool>(), numel,
          static_cast<at::opmath_type<scalar_t>>(alpha));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const at::Tensor rows = mask.nonzero().reshape(-1).contiguous();
  const int64_t count = rows.numel(), cols = weight.size(1);
  if (count == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "dinm_masked_update_cuda", [&] {
    update_rows_kernel<scalar_t><<<grid_for(count * cols), kThreads, 0, stream>>>(
        weight.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(), rows.data_ptr<int64_t>(), count, cols,
        delta.size(0) != weight.size(0), static_cast<at::opmath_type<scalar_t>>(alpha));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(dinm, CUDA, m) {
  m.impl("layer_distances", &layer_distances_cuda);
  m.impl("masked_update", &masked_update_cuda);
}

}  // namespace dinm
