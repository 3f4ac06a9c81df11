// AVX2 + FMA + F16C body of the CPU Adam update (8 floats per step). Chosen at
// run time by cpu_adam.cpp when AVX-512 is missing; see adam_common.h for why
// only C headers and internal functions may appear here.
#include <immintrin.h>

#include "adam_common.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace accel_zero_adam {
namespace {

inline __m256 load_grad8(const void* g, int dtype, int64_t i) {
  if (dtype == kBF16) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(g) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  if (dtype == kF16) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(g) + i));
    return _mm256_cvtph_ps(h);
  }
  return _mm256_loadu_ps(static_cast<const float*>(g) + i);
}

inline __m128i to_bf16x8(__m256 p) {
  __m256i u = _mm256_castps_si256(p);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(p, p, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0xFFFF), nan);
  // Values are < 0x10000, so unsigned saturation never triggers.
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

}  // namespace

namespace {

// Instantiated per gradient and copy dtype so the element loop has no dtype
// branches (those are dispatched once per range below).
template <int GradDType, int CopyDType>
void range(const AdamArgs& a, const TensorRefs& t, int64_t begin, int64_t end) {
  const __m256 beta2 = _mm256_set1_ps(a.beta2);
  const __m256 omb1 = _mm256_set1_ps(a.one_minus_beta1);
  const __m256 omb2 = _mm256_set1_ps(a.one_minus_beta2);
  const __m256 eps = _mm256_set1_ps(a.eps);
  const __m256 nss = _mm256_set1_ps(a.neg_step_size);
  const __m256 bc2 = _mm256_set1_ps(a.bc2_sqrt);
  const __m256 decay = _mm256_set1_ps(a.decay);
  const __m256 l2 = _mm256_set1_ps(a.l2);
  const __m256 inv_scale = _mm256_set1_ps(a.inv_scale);
  const bool use_l2 = a.l2 != 0.0f;
  const bool use_decay = a.decay != 1.0f;
  const bool scale = a.inv_scale != 1.0f;
  // One 8-float vector per call, two per iteration: the structure of the AVX-512
  // body (where independent chains measured faster), not measured on an AVX2 CPU.
  auto update = [&](int64_t i) {
    __m256 g = load_grad8(t.grad, GradDType, i);
    if (scale) g = _mm256_mul_ps(g, inv_scale);
    __m256 p = _mm256_loadu_ps(t.param + i);
    if (use_l2) g = _mm256_fmadd_ps(p, l2, g);
    if (use_decay) p = _mm256_mul_ps(p, decay);
    __m256 m = _mm256_loadu_ps(t.exp_avg + i);
    m = _mm256_fmadd_ps(omb1, _mm256_sub_ps(g, m), m);
    __m256 v = _mm256_loadu_ps(t.exp_avg_sq + i);
    v = _mm256_fmadd_ps(_mm256_mul_ps(omb2, g), g, _mm256_mul_ps(v, beta2));
    __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v), bc2), eps);
    p = _mm256_add_ps(p, _mm256_div_ps(_mm256_mul_ps(nss, m), denom));
    _mm256_storeu_ps(t.param + i, p);
    _mm256_storeu_ps(t.exp_avg + i, m);
    _mm256_storeu_ps(t.exp_avg_sq + i, v);
    if constexpr (CopyDType == kBF16) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(t.copy) + i), to_bf16x8(p));
    } else if constexpr (CopyDType == kF16) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(t.copy) + i),
                       _mm256_cvtps_ph(p, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  };
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    update(i);
    update(i + 8);
  }
  for (; i + 8 <= end; i += 8) update(i);
  adam_scalar_range(a, t, i, end);
}

}  // namespace

void adam_range_avx2(const AdamArgs& a, const TensorRefs& t, int64_t begin, int64_t end) {
  using Fn = void (*)(const AdamArgs&, const TensorRefs&, int64_t, int64_t);
  static constexpr Fn table[3][3] = {
      {range<kF32, kNone>, range<kF32, kBF16>, range<kF32, kF16>},
      {range<kBF16, kNone>, range<kBF16, kBF16>, range<kBF16, kF16>},
      {range<kF16, kNone>, range<kF16, kBF16>, range<kF16, kF16>},
  };
  const int copy = a.copy_dtype == kNone ? 0 : a.copy_dtype;  // kBF16 = 1, kF16 = 2
  table[a.grad_dtype][copy](a, t, begin, end);
}

// Auto-vectorised under this unit's target pragma.
void probe_range_avx2(float* p, const float* g, float* m, float* v, uint16_t* c, int64_t begin,
                        int64_t end) {
  probe_scalar_range(p, g, m, v, c, begin, end);
}

}  // namespace accel_zero_adam

#pragma GCC pop_options
