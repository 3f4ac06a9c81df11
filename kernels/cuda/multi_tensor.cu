// Multi-tensor CUDA ops: fused Adam/AdamW over fp32 master weights (with an
// optional bf16/fp16 model copy), gradient unscale + inf/nan check, and L2 norm.
//
// One launch covers a whole list of tensors: the host cuts every tensor into
// kChunk-element chunks and sends a table (tensor pointers, sizes, and for each
// chunk its tensor and start) to the device in one pinned, asynchronous copy;
// block b processes chunk b. Nothing here synchronises with the host.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <optional>
#include <utility>
#include <vector>

namespace accel_zero_cuda {

constexpr int64_t kChunk = 1 << 16;
constexpr int kThreads = 512;

// Layout of the table: ptrs[depth][n], numel[n], chunk_tensor[c], chunk_start[c].
struct Table {
  const int64_t* data;
  int n;
  int depth;
  int64_t chunks;
  __device__ void* ptr(int list, int t) const {
    return reinterpret_cast<void*>(data[list * n + t]);
  }
  __device__ int64_t numel(int t) const { return data[depth * n + t]; }
  __device__ int tensor_of(int64_t c) const {
    return static_cast<int>(data[(depth + 1) * n + c]);
  }
  __device__ int64_t start_of(int64_t c) const { return data[(depth + 1) * n + chunks + c]; }
};

// Builds the table for `lists` (all of length n, same device) and copies it to the device.
inline std::pair<at::Tensor, Table> make_table(const std::vector<std::vector<at::Tensor>>& lists) {
  const int depth = static_cast<int>(lists.size());
  const int n = static_cast<int>(lists[0].size());
  std::vector<int64_t> ct, cs;
  for (int t = 0; t < n; ++t) {
    const int64_t numel = lists[0][t].numel();
    for (int64_t s = 0; s < numel; s += kChunk) {
      ct.push_back(t);
      cs.push_back(s);
    }
  }
  const int64_t chunks = static_cast<int64_t>(ct.size());
  const int64_t len = depth * n + n + 2 * chunks;
  at::Tensor host = at::empty({std::max<int64_t>(len, 1)},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  for (int d = 0; d < depth; ++d) {
    for (int t = 0; t < n; ++t) {
      h[d * n + t] = reinterpret_cast<int64_t>(lists[d][t].defined() ? lists[d][t].data_ptr() : nullptr);
    }
  }
  for (int t = 0; t < n; ++t) h[depth * n + t] = lists[0][t].numel();
  for (int64_t c = 0; c < chunks; ++c) {
    h[(depth + 1) * n + c] = ct[c];
    h[(depth + 1) * n + chunks + c] = cs[c];
  }
  at::Tensor dev = host.to(
      at::TensorOptions().device(lists[0][0].device()).dtype(at::kLong), /*non_blocking=*/true);
  Table table{dev.data_ptr<int64_t>(), n, depth, chunks};
  return {dev, table};
}

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename T>
__device__ __forceinline__ float to_f(T x) {
  return static_cast<float>(x);
}
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
__device__ __forceinline__ float to_f<__half>(__half x) {
  return __half2float(x);
}

template <typename T>
__device__ __forceinline__ T from_f(float x) {
  return static_cast<T>(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_f<__half>(float x) {
  return __float2half_rn(x);
}

struct AdamScalars {
  float one_minus_beta1, beta2, one_minus_beta2, eps, neg_step_size, bc2_sqrt, decay, l2, inv_scale;
};

// lists: 0 params (fp32), 1 grads (G), 2 exp_avg, 3 exp_avg_sq, 4 copies (C, may be null).
template <typename G, typename C>
__global__ void adam_kernel(Table table, AdamScalars s, const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const int64_t c = blockIdx.x;
  const int t = table.tensor_of(c);
  const int64_t start = table.start_of(c);
  const int64_t end = imin(start + kChunk, table.numel(t));
  float* p = static_cast<float*>(table.ptr(0, t));
  const G* g = static_cast<const G*>(table.ptr(1, t));
  float* m = static_cast<float*>(table.ptr(2, t));
  float* v = static_cast<float*>(table.ptr(3, t));
  C* copy = table.depth > 4 ? static_cast<C*>(table.ptr(4, t)) : nullptr;
  const float omb1 = s.one_minus_beta1;
  const float omb2 = s.one_minus_beta2;
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    float gi = to_f(g[i]) * s.inv_scale;
    float pi = p[i];
    gi = __fmaf_rn(pi, s.l2, gi);
    pi = __fmul_rn(pi, s.decay);
    float mi = m[i];
    mi = __fmaf_rn(omb1, __fsub_rn(gi, mi), mi);
    float vi = v[i];
    vi = __fmaf_rn(__fmul_rn(omb2, gi), gi, __fmul_rn(vi, s.beta2));
    const float denom = __fadd_rn(__fdiv_rn(sqrtf(vi), s.bc2_sqrt), s.eps);
    pi = __fadd_rn(pi, __fdiv_rn(__fmul_rn(s.neg_step_size, mi), denom));
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if (copy != nullptr) copy[i] = from_f<C>(pi);
  }
}

template <typename T>
__global__ void unscale_kernel(Table table, float inv_scale, float* found_inf) {
  const int64_t c = blockIdx.x;
  const int t = table.tensor_of(c);
  const int64_t start = table.start_of(c);
  const int64_t end = imin(start + kChunk, table.numel(t));
  T* x = static_cast<T*>(table.ptr(0, t));
  bool bad = false;
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const float xi = to_f(x[i]);
    bad |= !isfinite(xi);
    x[i] = from_f<T>(xi * inv_scale);
  }
  if (bad) *found_inf = 1.0f;
}

template <typename T>
__global__ void sumsq_kernel(Table table, float* partial) {
  __shared__ float red[kThreads];
  const int64_t c = blockIdx.x;
  const int t = table.tensor_of(c);
  const int64_t start = table.start_of(c);
  const int64_t end = imin(start + kChunk, table.numel(t));
  const T* x = static_cast<const T*>(table.ptr(0, t));
  float acc = 0.0f;
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const float xi = to_f(x[i]);
    acc += xi * xi;
  }
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) red[threadIdx.x] += red[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[c] = red[0];
}

#define AZ_DISPATCH_FLOATING(DTYPE, NAME, ...)                                       \
  switch (DTYPE) {                                                                  \
    case at::kFloat: {                                                              \
      using NAME = float;                                                           \
      __VA_ARGS__();                                                                \
      break;                                                                        \
    }                                                                               \
    case at::kBFloat16: {                                                           \
      using NAME = __nv_bfloat16;                                                   \
      __VA_ARGS__();                                                                \
      break;                                                                        \
    }                                                                               \
    case at::kHalf: {                                                               \
      using NAME = __half;                                                          \
      __VA_ARGS__();                                                                \
      break;                                                                        \
    }                                                                               \
    default:                                                                        \
      TORCH_CHECK(false, "accel_zero cuda ops: unsupported dtype ", DTYPE,          \
                  " (use float32, bfloat16 or float16)");                           \
  }

void fused_adam(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                const std::vector<at::Tensor>& copies, double one_minus_beta1, double beta2,
                double one_minus_beta2, double eps, double neg_step_size, double bc2_sqrt, double decay, double l2, double inv_scale,
                const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<std::vector<at::Tensor>> lists{params, grads, exp_avgs, exp_avg_sqs};
  const bool has_copy = !copies.empty();
  if (has_copy) lists.push_back(copies);
  const auto made = make_table(lists);  // .first keeps the device table alive
  const Table table = made.second;
  if (table.chunks == 0) return;
  AdamScalars s{static_cast<float>(one_minus_beta1), static_cast<float>(beta2),
                static_cast<float>(one_minus_beta2), static_cast<float>(eps),           static_cast<float>(neg_step_size),
                static_cast<float>(bc2_sqrt),      static_cast<float>(decay),
                static_cast<float>(l2),            static_cast<float>(inv_scale)};
  const float* inf_ptr = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  const at::ScalarType copy_type = has_copy ? copies[0].scalar_type() : at::kBFloat16;
  AZ_DISPATCH_FLOATING(grads[0].scalar_type(), G, [&] {
    AZ_DISPATCH_FLOATING(copy_type, C, [&] {
      adam_kernel<G, C><<<static_cast<unsigned int>(table.chunks), kThreads, 0, stream>>>(table, s, inf_ptr);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void unscale_check_inf(const std::vector<at::Tensor>& tensors, double inv_scale,
                       at::Tensor found_inf) {
  if (tensors.empty()) return;
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  auto stream = at::cuda::getCurrentCUDAStream();
  // One launch per dtype: a table's kernel reads a single element type.
  for (at::ScalarType dt : {at::kFloat, at::kBFloat16, at::kHalf}) {
    std::vector<at::Tensor> same;
    for (const auto& t : tensors) {
      if (t.scalar_type() == dt && t.numel() > 0) same.push_back(t);
    }
    if (same.empty()) continue;
    const auto made = make_table({same});
    const Table table = made.second;
    AZ_DISPATCH_FLOATING(dt, T, [&] {
      unscale_kernel<T><<<static_cast<unsigned int>(table.chunks), kThreads, 0, stream>>>(
          table, static_cast<float>(inv_scale), found_inf.data_ptr<float>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor l2norm(const std::vector<at::Tensor>& tensors) {
  TORCH_CHECK(!tensors.empty(), "l2norm of an empty list");
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  auto stream = at::cuda::getCurrentCUDAStream();
  std::vector<at::Tensor> partials;
  for (at::ScalarType dt : {at::kFloat, at::kBFloat16, at::kHalf}) {
    std::vector<at::Tensor> same;
    for (const auto& t : tensors) {
      if (t.scalar_type() == dt && t.numel() > 0) same.push_back(t);
    }
    if (same.empty()) continue;
    const auto made = make_table({same});
    const Table table = made.second;
    at::Tensor partial = at::empty({table.chunks}, tensors[0].options().dtype(at::kFloat));
    AZ_DISPATCH_FLOATING(dt, T, [&] {
      sumsq_kernel<T><<<static_cast<unsigned int>(table.chunks), kThreads, 0, stream>>>(table, partial.data_ptr<float>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    partials.push_back(partial);
  }
  if (partials.empty()) return at::zeros({}, tensors[0].options().dtype(at::kFloat));
  return at::cat(partials).sum().sqrt();
}

}  // namespace accel_zero_cuda
