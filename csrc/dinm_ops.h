// Shared by the CPU (dinm_ops.cpp) and CUDA (dinm_ops_cuda.cu) kernels of dinm's ops.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

namespace dinm {

enum class DistanceKind { Cosine, L2, L2Tokens };

DistanceKind parse_kind(c10::string_view kind);
void check_distance_inputs(at::TensorList layers, const at::Tensor& mask_a, const at::Tensor& mask_b);
void check_update_inputs(const at::Tensor& weight, const at::Tensor& delta, const c10::optional<at::Tensor>& mask);

// 1 - cosine, as torch.nn.functional.cosine_similarity computes it (each norm clamped at eps = 1e-12).
template <typename T>
C10_HOST_DEVICE inline T cosine_distance(T dot, T norm_a_sq, T norm_b_sq) {
  const T eps = T(1e-12);
  const T na = ::sqrt(norm_a_sq) > eps ? ::sqrt(norm_a_sq) : eps;
  const T nb = ::sqrt(norm_b_sq) > eps ? ::sqrt(norm_b_sq) : eps;
  return T(1) - dot / (na * nb);
}

}  // namespace dinm
