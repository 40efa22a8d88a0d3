// Online (streaming) max / sum-exp state, shared by the CPU and CUDA kernels.
#pragma once

#include <cmath>

#include "fastkd/host_device.h"

namespace fastkd {

// Running max m and sum z = sum(exp(x - m)) of the values seen so far.
// m starts at a large negative finite value rather than -inf so that exp(m_old - m_new)
// never evaluates -inf - (-inf) = NaN when a row begins with masked (-inf) entries.
struct OnlineLogSumExp {
  float m = -1e30f;
  float z = 0.0f;

  FASTKD_HOST_DEVICE void add(float x) {
    if (x > m) {
      z = z * expf(m - x) + 1.0f;
      m = x;
    } else {
      z += expf(x - m);  // x = -inf adds exactly 0
    }
  }

  FASTKD_HOST_DEVICE void merge(const OnlineLogSumExp& other) {
    const float m_new = fmaxf(m, other.m);
    z = z * expf(m - m_new) + other.z * expf(other.m - m_new);
    m = m_new;
  }

  // -inf for an empty or fully masked row, as the definition demands.
  FASTKD_HOST_DEVICE float value() const { return m + logf(z); }
};

}  // namespace fastkd
