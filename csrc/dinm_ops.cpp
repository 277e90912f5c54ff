// dinm's custom ops: the schemas (registered once, here) and their CPU kernels.
//
//   dinm::layer_distances(hidden[], mask_a, mask_b, kind) -> (layers, pairs) float32
//       hidden: one (2 * pairs, tokens, hidden) tensor per layer, as a model returns them (no stacking copy);
//       rows 2p / 2p + 1 are pair p's responses a / b;
//       mask_a, mask_b: (pairs, tokens) bool, the positions that count.
//       kind: "cosine" (1 - cosine of the masked mean states), "l2" (L2 between them),
//             "l2_tokens" (L2 over the positions both masks keep, position by position).
//   dinm::masked_update(weight!, delta, mask?, alpha) -> ()
//       weight += alpha * (delta * mask), in place, rounding once per element like `Tensor.add_` (which it
//       is, for no mask); masked-out elements are not touched at all.
//       mask: None (dense), bool of weight's shape (elements), or bool (rows,) (rows of a 2-D weight);
//       with a row mask, delta is either dense or compact: only the masked rows, in order.
//
// The pure-PyTorch twin of both is dinm/twin.py (fallback and test oracle); the CUDA kernels are in
// dinm_ops_cuda.cu. Accumulation is float32 (float64 for float64 inputs) whatever the input dtype.

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "dinm_ops.h"

// `import dinm._C` loads this library, whose static initialisers register the ops.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

namespace dinm {

DistanceKind parse_kind(c10::string_view kind) {
  if (kind == "cosine") return DistanceKind::Cosine;
  if (kind == "l2") return DistanceKind::L2;
  if (kind == "l2_tokens") return DistanceKind::L2Tokens;
  TORCH_CHECK(false, "dinm::layer_distances: kind must be 'cosine', 'l2' or 'l2_tokens', got '", kind, "'");
}

void check_distance_inputs(at::TensorList layers, const at::Tensor& mask_a, const at::Tensor& mask_b) {
  TORCH_CHECK(!layers.empty(), "dinm::layer_distances: hidden must hold one tensor per layer, got none");
  const at::Tensor& hidden = layers[0];
  TORCH_CHECK(hidden.dim() == 3 && hidden.size(0) % 2 == 0,
              "dinm::layer_distances: hidden must be (2 * pairs, tokens, hidden) per layer, got ", hidden.sizes());
  TORCH_CHECK(at::isFloatingType(hidden.scalar_type()), "dinm::layer_distances: hidden must be floating point");
  for (const auto& h : layers) {
    TORCH_CHECK(h.sizes() == hidden.sizes() && h.scalar_type() == hidden.scalar_type() &&
                    h.device() == hidden.device(),
                "dinm::layer_distances: every layer's hidden states must have the same shape, dtype and device");
  }
  const int64_t pairs = hidden.size(0) / 2, tokens = hidden.size(1);
  for (const auto* m : {&mask_a, &mask_b}) {
    TORCH_CHECK(m->scalar_type() == at::kBool && m->dim() == 2 && m->size(0) == pairs && m->size(1) == tokens,
                "dinm::layer_distances: masks must be bool (pairs, tokens) = (", pairs, ", ", tokens, "), got ",
                m->scalar_type(), m->sizes());
    TORCH_CHECK(m->device() == hidden.device(), "dinm::layer_distances: masks must be on hidden's device");
  }
}

void check_update_inputs(const at::Tensor& weight, const at::Tensor& delta, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(weight.is_contiguous(), "dinm::masked_update: weight must be contiguous");
  TORCH_CHECK(delta.scalar_type() == weight.scalar_type(), "dinm::masked_update: delta is ", delta.scalar_type(),
              ", weight is ", weight.scalar_type());
  TORCH_CHECK(delta.device() == weight.device(), "dinm::masked_update: delta must be on weight's device");
  if (!mask.has_value()) {
    TORCH_CHECK(delta.sizes() == weight.sizes(), "dinm::masked_update: delta ", delta.sizes(), " vs weight ",
                weight.sizes());
    return;
  }
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.scalar_type() == at::kBool && m.device() == weight.device(),
              "dinm::masked_update: mask must be bool, on weight's device");
  if (m.sizes() == weight.sizes()) {
    TORCH_CHECK(delta.sizes() == weight.sizes(), "dinm::masked_update: an element mask needs a dense delta");
    return;
  }
  TORCH_CHECK(weight.dim() == 2 && m.dim() == 1 && m.size(0) == weight.size(0),
              "dinm::masked_update: mask must have weight's shape or be (rows,) for a 2-D weight; got ", m.sizes());
  TORCH_CHECK(delta.dim() == 2 && delta.size(1) == weight.size(1) &&
                  (delta.size(0) == weight.size(0) || delta.size(0) == m.sum().item<int64_t>()),
              "dinm::masked_update: with a row mask, delta must be (rows, cols) or (masked rows, cols); got ",
              delta.sizes());
}

namespace {

template <typename scalar_t>
void distances_kernel(const std::vector<const scalar_t*>& hidden, const bool* mask_a, const bool* mask_b, float* out,
                      int64_t layers, int64_t pairs, int64_t tokens, int64_t width, DistanceKind kind) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, layers * pairs, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum_a(width), sum_b(width);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t layer = job / pairs, pair = job % pairs;
      const scalar_t* a = hidden[layer] + 2 * pair * tokens * width;
      const scalar_t* b = a + tokens * width;
      const bool* ma = mask_a + pair * tokens;
      const bool* mb = mask_b + pair * tokens;
      if (kind == DistanceKind::L2Tokens) {
        double total = 0;
        for (int64_t t = 0; t < tokens; ++t) {
          if (!(ma[t] && mb[t])) continue;
          const scalar_t* x = a + t * width;
          const scalar_t* y = b + t * width;
          acc_t s = 0;
          for (int64_t i = 0; i < width; ++i) {
            const acc_t d = static_cast<acc_t>(x[i]) - static_cast<acc_t>(y[i]);
            s += d * d;
          }
          total += s;
        }
        out[job] = static_cast<float>(std::sqrt(total));
        continue;
      }
      std::fill(sum_a.begin(), sum_a.end(), acc_t(0));
      std::fill(sum_b.begin(), sum_b.end(), acc_t(0));
      int64_t na = 0, nb = 0;
      for (int64_t t = 0; t < tokens; ++t) {
        if (ma[t]) {
          ++na;
          const scalar_t* x = a + t * width;
          for (int64_t i = 0; i < width; ++i) sum_a[i] += static_cast<acc_t>(x[i]);
        }
        if (mb[t]) {
          ++nb;
          const scalar_t* y = b + t * width;
          for (int64_t i = 0; i < width; ++i) sum_b[i] += static_cast<acc_t>(y[i]);
        }
      }
      const acc_t inv_a = acc_t(1) / static_cast<acc_t>(std::max<int64_t>(na, 1));
      const acc_t inv_b = acc_t(1) / static_cast<acc_t>(std::max<int64_t>(nb, 1));
      acc_t dot = 0, norm_a = 0, norm_b = 0, diff = 0;
      for (int64_t i = 0; i < width; ++i) {
        const acc_t x = sum_a[i] * inv_a, y = sum_b[i] * inv_b;
        dot += x * y;
        norm_a += x * x;
        norm_b += y * y;
        diff += (x - y) * (x - y);
      }
      out[job] = static_cast<float>(kind == DistanceKind::L2 ? std::sqrt(diff) : cosine_distance(dot, norm_a, norm_b));
    }
  });
}

// Masked rows: only the listed rows are visited (`rows[k]` in weight, row k or rows[k] in delta).
template <typename scalar_t>
void update_rows_kernel(scalar_t* weight, const scalar_t* delta, const int64_t* rows, int64_t count, int64_t cols,
                        bool compact, double alpha) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t a = static_cast<acc_t>(alpha);
  at::parallel_for(0, count, std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      scalar_t* w = weight + rows[k] * cols;
      const scalar_t* d = delta + (compact ? k : rows[k]) * cols;
      for (int64_t j = 0; j < cols; ++j) w[j] = static_cast<scalar_t>(static_cast<acc_t>(w[j]) + a * static_cast<acc_t>(d[j]));
    }
  });
}

// Element mask: masked-out elements are left as they are (not even rewritten).
template <typename scalar_t>
void update_elements_kernel(scalar_t* weight, const scalar_t* delta, const bool* mask, int64_t numel, double alpha) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t a = static_cast<acc_t>(alpha);
  at::parallel_for(0, numel, 32768, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (mask[i]) weight[i] = static_cast<scalar_t>(static_cast<acc_t>(weight[i]) + a * static_cast<acc_t>(delta[i]));
    }
  });
}

at::Tensor layer_distances_cpu(at::TensorList hidden_in, const at::Tensor& mask_a_in, const at::Tensor& mask_b_in,
                               c10::string_view kind_name) {
  check_distance_inputs(hidden_in, mask_a_in, mask_b_in);
  const DistanceKind kind = parse_kind(kind_name);
  std::vector<at::Tensor> hidden;  // contiguous views (copies only where a layer's states are not contiguous)
  for (const auto& h : hidden_in) hidden.push_back(h.contiguous());
  const at::Tensor mask_a = mask_a_in.contiguous(), mask_b = mask_b_in.contiguous();
  const int64_t layers = static_cast<int64_t>(hidden.size()), pairs = hidden[0].size(0) / 2;
  at::Tensor out = at::empty({layers, pairs}, hidden[0].options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden[0].scalar_type(), "dinm_layer_distances", [&] {
    std::vector<const scalar_t*> pointers;
    for (const auto& h : hidden) pointers.push_back(h.data_ptr<scalar_t>());
    distances_kernel<scalar_t>(pointers, mask_a.data_ptr<bool>(), mask_b.data_ptr<bool>(), out.data_ptr<float>(),
                               layers, pairs, hidden[0].size(1), hidden[0].size(2), kind);
  });
  return out;
}

void masked_update_cpu(at::Tensor& weight, const at::Tensor& delta_in, const c10::optional<at::Tensor>& mask_in,
                       double alpha) {
  check_update_inputs(weight, delta_in, mask_in);
  if (!mask_in.has_value()) {
    weight.add_(delta_in, alpha);  // ATen's vectorised kernel: one rounding per element
    return;
  }
  const at::Tensor delta = delta_in.contiguous(), mask = mask_in->contiguous();
  if (mask.sizes() == weight.sizes()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "dinm_masked_update", [&] {
      update_elements_kernel<scalar_t>(weight.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(),
                                       mask.data_ptr<bool>(), weight.numel(), alpha);
    });
    return;
  }
  const at::Tensor rows = mask.nonzero().reshape(-1).contiguous();
  const bool compact = delta.size(0) != weight.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "dinm_masked_update", [&] {
    update_rows_kernel<scalar_t>(weight.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(), rows.data_ptr<int64_t>(),
                                 rows.numel(), weight.size(1), compact, alpha);
  });
}

}  // namespace

TORCH_LIBRARY(dinm, m) {
  m.def("layer_distances(Tensor[] hidden, Tensor mask_a, Tensor mask_b, str kind) -> Tensor");
  m.def("masked_update(Tensor(a!) weight, Tensor delta, Tensor? mask, float alpha) -> ()");
}

TORCH_LIBRARY_IMPL(dinm, CPU, m) {
  m.impl("layer_distances", &layer_distances_cpu);
  m.impl("masked_update", &masked_update_cpu);
}

}  // namespace dinm
