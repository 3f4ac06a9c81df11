// Shared by every translation unit of the CPU Adam op.
//
// Only C headers and static inline functions live here: the per-ISA units
// include this file and are compiled for AVX-512 / AVX2, and nothing with
// external linkage may be compiled twice for different ISAs (the linker would
// keep one copy at random and an AVX-512 copy could run on an AVX2 machine).
#pragma once

#include <stdint.h>

namespace accel_zero_adam {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kNone = -1 };

// Hyper-parameters of one tensor's update, already folded into the constants
// the element loop needs (computed in double in Python, rounded once to float,
// exactly like torch.optim.AdamW does with its python-float scalars).
struct AdamArgs {
  float beta1;
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float eps;
  float neg_step_size;   // -lr / bias_correction1
  float bc2_sqrt;        // sqrt(bias_correction2)
  float decay;           // 1 - lr * weight_decay (AdamW); 1 when off
  float l2;              // weight_decay for classic Adam (added to the gradient); 0 when off
  float inv_scale;       // multiplies the gradient before anything else
  int grad_dtype;        // DType of grad
  int copy_dtype;        // DType of copy, or kNone
};

struct TensorRefs {
  float* param;
  const void* grad;
  float* exp_avg;
  float* exp_avg_sq;
  void* copy;
};

static inline uint32_t f32_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return u;
}

static inline float bits_f32(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even; NaN -> 0xFFFF like torch's vectorised fp32->bf16 cast.
static inline uint16_t f32_to_bf16(float f) {
  if (f != f) return 0xFFFF;  // what torch's vectorised CPU cast writes for NaN
  uint32_t u = f32_bits(f);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

static inline float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

// IEEE half conversions without F16C (Maratea's FP16 algorithms, as used by c10::Half).
static inline uint16_t f32_to_f16(float f) {
  const float scale_to_inf = bits_f32(0x77800000u);   // 2^112
  const float scale_to_zero = bits_f32(0x08800000u);  // 2^-110
  float base = (__builtin_fabsf(f) * scale_to_inf) * scale_to_zero;
  const uint32_t w = f32_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits_f32((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

static inline float f16_to_f32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = 0xE0u << 23;
  const float exp_scale = bits_f32(0x7800000u);  // 2^-112
  const float normalized = bits_f32((two_w >> 4) + exp_offset) * exp_scale;
  const uint32_t magic_mask = 126u << 23;
  const float magic_bias = 0.5f;
  const float denormalized = bits_f32((two_w >> 17) | magic_mask) - magic_bias;
  const uint32_t denormalized_cutoff = 1u << 27;
  const uint32_t result =
      sign | (two_w < denormalized_cutoff ? f32_bits(denormalized) : f32_bits(normalized));
  return bits_f32(result);
}

static inline float load_grad(const void* g, int dtype, int64_t i) {
  if (dtype == kBF16) return bf16_to_f32(static_cast<const uint16_t*>(g)[i]);
  if (dtype == kF16) return f16_to_f32(static_cast<const uint16_t*>(g)[i]);
  return static_cast<const float*>(g)[i];
}

// The element update, in torch.optim.AdamW's order of operations and with its
// roundings: torch's CPU kernels fuse `grad.add(param, alpha)`, `lerp_` and
// `addcmul_` into FMAs, so we do too (measured bit for bit against torch 2.13).
static inline void adam_scalar_range(const AdamArgs& a, const TensorRefs& t, int64_t begin,
                                     int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    float g = load_grad(t.grad, a.grad_dtype, i) * a.inv_scale;
    float p = t.param[i];
    if (a.l2 != 0.0f) g = __builtin_fmaf(p, a.l2, g);
    p = p * a.decay;
    float m = t.exp_avg[i];
    m = __builtin_fmaf(a.one_minus_beta1, g - m, m);
    float v = t.exp_avg_sq[i];
    v = __builtin_fmaf(a.one_minus_beta2 * g, g, v * a.beta2);
    float denom = __builtin_sqrtf(v) / a.bc2_sqrt + a.eps;
    p = p + (a.neg_step_size * m) / denom;
    t.param[i] = p;
    t.exp_avg[i] = m;
    t.exp_avg_sq[i] = v;
    if (a.copy_dtype == kBF16) {
      static_cast<uint16_t*>(t.copy)[i] = f32_to_bf16(p);
    } else if (a.copy_dtype == kF16) {
      static_cast<uint16_t*>(t.copy)[i] = f32_to_f16(p);
    }
  }
}

// A memory-bound pass touching exactly Adam's bytes (4 fp32 arrays read, 3
// written, optionally a 16-bit copy written), for the bandwidth bound of benchmarks.
static inline void probe_scalar_range(float* p, const float* g, float* m, float* v, uint16_t* c,
                                      int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float gi = g[i];
    const float pi = p[i] + gi;
    p[i] = pi;
    m[i] = m[i] + gi;
    v[i] = v[i] + gi;
    if (c != nullptr) c[i] = static_cast<uint16_t>(f32_bits(pi) >> 16);
  }
}

void adam_range_avx512(const AdamArgs& a, const TensorRefs& t, int64_t begin, int64_t end);
void adam_range_avx2(const AdamArgs& a, const TensorRefs& t, int64_t begin, int64_t end);
void probe_range_avx512(float* p, const float* g, float* m, float* v, uint16_t* c, int64_t begin,
                        int64_t end);
void probe_range_avx2(float* p, const float* g, float* m, float* v, uint16_t* c, int64_t begin,
                      int64_t end);

}  // namespace accel_zero_adam
