// Python binding of the multi-tensor CUDA ops (kernels live in multi_tensor.cu).
#include <torch/extension.h>

#include <optional>
#include <vector>

namespace accel_zero_cuda {
void fused_adam(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                const std::vector<at::Tensor>& copies, double one_minus_beta1, double beta2,
                double one_minus_beta2, double eps, double neg_step_size, double bc2_sqrt, double decay, double l2, double inv_scale,
                const std::optional<at::Tensor>& found_inf);
void unscale_check_inf(const std::vector<at::Tensor>& tensors, double inv_scale,
                       at::Tensor found_inf);
at::Tensor l2norm(const std::vector<at::Tensor>& tensors);
}  // namespace accel_zero_cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "accel_zero multi-tensor CUDA ops (see accel_zero/ops.py)";
  m.def("fused_adam", &accel_zero_cuda::fused_adam);
  m.def("unscale_check_inf", &accel_zero_cuda::unscale_check_inf);
  m.def("l2norm", &accel_zero_cuda::l2norm);
}
