// How a model's raw logits x become the logits of the softmax, per side, before the temperature
// (fastkd/logit_transforms.py, the definition): y = scale·x, then y = softcap·tanh(y/softcap)
// when softcap > 0 (−inf stays −inf), then optionally z = (y − mean)/(std + eps) with the row's
// sample std (divisor V − 1). Written once for the CPU and CUDA kd_rows kernels.
#pragma once

#include <cmath>
#include <cstdint>

#include "fastkd/common/fast_math.h"
#include "fastkd/common/host_device.h"

namespace fastkd {

// One side's scale and soft-cap (softcap 0: none).
struct SideTransform {
  float scale;
  float softcap;
};

// The transforms of one kd_rows call; the identity is {{1, 0}, {1, 0}, 0, eps}.
struct LogitTransforms {
  SideTransform student;
  SideTransform teacher;
  int standardize;  // 0 or 1
  float eps;        // added to the std (standardize only)
};

FASTKD_HOST_DEVICE bool side_is_identity(const SideTransform& side) {
  return side.scale == 1.0f && side.softcap == 0.0f;
}

FASTKD_HOST_DEVICE bool transforms_logits(const LogitTransforms& tr) {
  return tr.standardize != 0 || !side_is_identity(tr.student) || !side_is_identity(tr.teacher);
}

// tanh(u). Host: odd polynomial to u^7 below |u| = 0.125 (error < 2e-9 relative), else
// (1 − e)/(1 + e) with e = exp(−2|u|); branch-free so `omp simd` loops vectorise. GPU: tanhf.
FASTKD_HOST_DEVICE float kd_tanh(float u) {
#if defined(__CUDA_ARCH__)
  return tanhf(u);
#else
  const float a = fabsf(u);
  const float e = kd_exp(-2.0f * a);
  const float big = (1.0f - e) / (1.0f + e);
  const float u2 = u * u;
  const float small = a * (1.0f + u2 * (-1.0f / 3.0f + u2 * (2.0f / 15.0f + u2 * (-17.0f / 315.0f))));
  const float t = a < 0.125f ? small : big;
  return u < 0.0f ? -t : t;
#endif
}

// The per-element map of one side in a kernel: out = (cap(x·scale) − shift)·mul, where
// shift = mean and mul = inv_temperature/(std + eps) under standardize, else shift = 0 and
// mul = inv_temperature. inv_cap = 1/softcap (0 when there is no cap).
struct RowTransform {
  float scale;
  float softcap;
  float inv_cap;
  float shift;
  float mul;
};

FASTKD_HOST_DEVICE RowTransform row_transform(const SideTransform& side, float shift, float mul) {
  return RowTransform{side.scale, side.softcap, side.softcap > 0.0f ? 1.0f / side.softcap : 0.0f, shift, mul};
}

// cap(scale·x): the scaled and soft-capped logit, −inf kept.
FASTKD_HOST_DEVICE float scale_and_cap(float x, const RowTransform& tr) {
  const float y = x * tr.scale;
  if (tr.softcap > 0.0f) return x == -INFINITY ? x : tr.softcap * kd_tanh(y * tr.inv_cap);
  return y;
}

FASTKD_HOST_DEVICE float apply_transform(float x, const RowTransform& tr) {
  return (scale_and_cap(x, tr) - tr.shift) * tr.mul;
}

// d cap(scale·x)/dx = scale·(1 − tanh²(scale·x/softcap)); 0 at x = −inf (a masked entry).
FASTKD_HOST_DEVICE float scale_and_cap_derivative(float x, const RowTransform& tr) {
  if (!(tr.softcap > 0.0f)) return tr.scale;
  const float t = kd_tanh(x * tr.scale * tr.inv_cap);
  return x == -INFINITY ? 0.0f : tr.scale * (1.0f - t * t);
}

// The standardisation's chain rule, per element, from G = ∂L/∂z (z the standardised logit):
// ∂L/∂y_j = r·(G_j − mean(G)) − z_j·Σ(G·z)/((V − 1)·σ), r = 1/(σ + eps), the second term 0 where
// σ = 0 (logit_transforms.backward, with c·Σ(G·c)·r² = z·Σ(G·z)). The row constants:
struct StandardizeGrad {
  float r;         // 1/(σ + eps)
  float mean_g;    // mean(G)
  float through;   // Σ(G·z)/((V − 1)·σ), or 0
};

FASTKD_HOST_DEVICE StandardizeGrad standardize_grad(double sum_g, double sum_gz, float std, float eps,
                                                    int64_t n_cols) {
  const double denominator = static_cast<double>(n_cols > 1 ? n_cols - 1 : 1) * std;
  return StandardizeGrad{1.0f / (std + eps), static_cast<float>(sum_g / static_cast<double>(n_cols)),
                         std > 0.0f ? static_cast<float>(sum_gz / denominator) : 0.0f};
}

FASTKD_HOST_DEVICE float standardize_chain(float g, float z, const StandardizeGrad& k) {
  return k.r * (g - k.mean_g) - z * k.through;
}

}  // namespace fastkd
