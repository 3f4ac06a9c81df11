// Python binding, run-time ISA dispatch and OpenMP split of the CPU Adam op.
//
// step() updates a list of tensors in one call: the tensors are cut into
// fixed-size chunks and the chunks spread over OpenMP threads (static schedule,
// so each thread walks contiguous memory and the hardware prefetchers keep up).
// Pointers come in as integers from accel_zero/cpu_adam.py, which validates
// dtypes, sizes and contiguity; no torch headers, so the op builds in seconds.
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "adam_common.h"

namespace py = pybind11;
using namespace accel_zero_adam;

namespace {

using RangeFn = void (*)(const AdamArgs&, const TensorRefs&, int64_t, int64_t);

void scalar_range(const AdamArgs& a, const TensorRefs& t, int64_t b, int64_t e) {
  adam_scalar_range(a, t, b, e);
}

bool has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

std::string best_isa() {
  if (has_avx512()) return "avx512";
  if (has_avx2()) return "avx2";
  return "scalar";
}

RangeFn range_fn(const std::string& isa) {
  if (isa == "avx512") {
    if (!has_avx512()) throw std::invalid_argument("this CPU has no AVX-512 (F/BW/VL/DQ)");
    return adam_range_avx512;
  }
  if (isa == "avx2") {
    if (!has_avx2()) throw std::invalid_argument("this CPU has no AVX2+FMA+F16C");
    return adam_range_avx2;
  }
  if (isa == "scalar") return scalar_range;
  throw std::invalid_argument("unknown ISA '" + isa + "' (use avx512, avx2 or scalar)");
}

constexpr int64_t kChunk = 1 << 15;  // elements; 128 KiB of each fp32 array

struct Chunk {
  int32_t tensor;
  int64_t begin;
  int64_t end;
};

void step(const std::vector<uintptr_t>& params, const std::vector<uintptr_t>& grads,
          const std::vector<uintptr_t>& exp_avgs, const std::vector<uintptr_t>& exp_avg_sqs,
          const std::vector<uintptr_t>& copies, const std::vector<int64_t>& numels,
          const std::vector<int>& grad_dtypes, const std::vector<int>& copy_dtypes,
          const std::vector<float>& neg_step_sizes, const std::vector<float>& bc2_sqrts,
          float one_minus_beta1, float beta2, float one_minus_beta2, float eps, float decay,
          float l2, float inv_scale,
          int threads, const std::string& isa) {
  const size_t n = params.size();
  if (grads.size() != n || exp_avgs.size() != n || exp_avg_sqs.size() != n ||
      copies.size() != n || numels.size() != n || grad_dtypes.size() != n ||
      copy_dtypes.size() != n || neg_step_sizes.size() != n || bc2_sqrts.size() != n) {
    throw std::invalid_argument("cpu_adam.step: per-tensor lists differ in length");
  }
  RangeFn fn = range_fn(isa.empty() ? best_isa() : isa);
  std::vector<AdamArgs> args(n);
  std::vector<TensorRefs> refs(n);
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (size_t k = 0; k < n; ++k) {
    // 1 - beta comes from Python (rounded from double, as torch rounds its
    // python-float scalars), not 1.0f - beta1f, which differs in the last bits.
    args[k] = AdamArgs{1.0f - one_minus_beta1, one_minus_beta1, beta2, one_minus_beta2,
                       eps, neg_step_sizes[k], bc2_sqrts[k], decay,
                       l2, inv_scale, grad_dtypes[k], copy_dtypes[k]};
    refs[k] = TensorRefs{reinterpret_cast<float*>(params[k]),
                         reinterpret_cast<const void*>(grads[k]),
                         reinterpret_cast<float*>(exp_avgs[k]),
                         reinterpret_cast<float*>(exp_avg_sqs[k]),
                         reinterpret_cast<void*>(copies[k])};
    for (int64_t b = 0; b < numels[k]; b += kChunk) {
      chunks.push_back(Chunk{static_cast<int32_t>(k), b, std::min(numels[k], b + kChunk)});
    }
    total += numels[k];
  }
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  if (threads <= 0) threads = omp_get_max_threads();
  if (nchunks < 2 || total < 4 * kChunk) threads = 1;
  py::gil_scoped_release release;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t c = 0; c < nchunks; ++c) {
    const Chunk& ch = chunks[c];
    fn(args[ch.tensor], refs[ch.tensor], ch.begin, ch.end);
  }
}

using ProbeFn = void (*)(float*, const float*, float*, float*, uint16_t*, int64_t, int64_t);

void probe_scalar(float* p, const float* g, float* m, float* v, uint16_t* c, int64_t b, int64_t e) {
  probe_scalar_range(p, g, m, v, c, b, e);
}

// Same chunking and threads as step(), arithmetic reduced to one add per array.
void bandwidth_probe(uintptr_t p, uintptr_t g, uintptr_t m, uintptr_t v, uintptr_t copy,
                     int64_t n, int threads, const std::string& isa) {
  const std::string which = isa.empty() ? best_isa() : isa;
  range_fn(which);  // validates the ISA against this CPU
  ProbeFn fn = which == "avx512" ? probe_range_avx512
               : which == "avx2" ? probe_range_avx2
                                 : probe_scalar;
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  if (threads <= 0) threads = omp_get_max_threads();
  py::gil_scoped_release release;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t b = c * kChunk;
    fn(reinterpret_cast<float*>(p), reinterpret_cast<const float*>(g), reinterpret_cast<float*>(m),
       reinterpret_cast<float*>(v), reinterpret_cast<uint16_t*>(copy), b, std::min(n, b + kChunk));
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "accel_zero CPU Adam (see accel_zero/cpu_adam.py for the optimizer)";
  m.def("step", &step, "Adam/AdamW update of a list of fp32 tensors");
  m.def("bandwidth_probe", &bandwidth_probe,
        "memory-bound pass over Adam's bytes (benchmark reference)");
  m.def("best_isa", &best_isa, "widest instruction set this CPU supports");
  m.def("max_threads", [] { return omp_get_max_threads(); });
}
