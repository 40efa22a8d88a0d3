// The streamed log-sum-exp of a row (the one online-softmax state of fastkd._C), shared by the
// logits and cross-entropy kernels on the CPU and the GPU.
#pragma once

#include <cmath>

#include "fastkd/common/fast_math.h"
#include "fastkd/common/host_device.h"

namespace fastkd {

// Running maxima start finite: exp(m_old − m_new) of two -inf would be NaN on masked prefixes.
constexpr float kNegStart = -1e30f;

FASTKD_HOST_DEVICE float max_f(float a, float b) { return a > b ? a : b; }
FASTKD_HOST_DEVICE float min_f(float a, float b) { return a < b ? a : b; }

FASTKD_HOST_DEVICE float log_acc(float z) { return logf(z); }
FASTKD_HOST_DEVICE double log_acc(double z) { return log(z); }

// Max and sum of exponentials of a streamed row, moved to a new maximum block by block. Acc is
// the sums' type: float on the GPU (each thread sums a few values, then a tree across threads),
// double on the CPU, where one thread adds a whole row's partial sums one after another.
template <class Acc>
struct LseStateT {
  float m = kNegStart;
  Acc z = 0;

  FASTKD_HOST_DEVICE void rescale(float m_new) {  // m_new ≥ m
    z *= kd_exp(m - m_new);
    m = m_new;
  }
  FASTKD_HOST_DEVICE void merge(const LseStateT& other) {
    const float m_new = max_f(m, other.m);
    z = z * kd_exp(m - m_new) + other.z * kd_exp(other.m - m_new);
    m = m_new;
  }
  FASTKD_HOST_DEVICE float log_sum() const { return static_cast<float>(log_acc(z)); }
};

}  // namespace fastkd
