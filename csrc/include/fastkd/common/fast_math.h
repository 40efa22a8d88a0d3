// exp and log(1 + e) for the element loops. On the GPU they are CUDA's accurate expf/log1pf. On
// the CPU libm's expf/logf are scalar calls that stop `omp simd` loops from vectorising, so the
// host versions below are branch-free polynomials (plain selects, no intrinsics): any x86-64 or
// ARM compiler turns them into SIMD code, and they stay within a few ulp of libm.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "fastkd/common/host_device.h"

namespace fastkd {

FASTKD_HOST_DEVICE float bits_to_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
#endif
}

FASTKD_HOST_DEVICE uint32_t float_to_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t out;
  std::memcpy(&out, &x, sizeof(out));
  return out;
#endif
}

// e^x. Host: e^x = 2^k · e^r with k = round(x / ln 2), |r| ≤ ln 2 / 2, e^r by its Taylor series
// to r^7 (truncation < 1e-8 relative). Below -87 the result is 0 (true value < 2^-125: it never
// changes a sum that holds a 1 for the row maximum), above 88 it is +inf.
FASTKD_HOST_DEVICE float kd_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  float c = x < -87.0f ? -87.0f : x;
  c = c > 88.0f ? 88.0f : c;
  // Adding 1.5·2^23 rounds to the nearest integer in the default rounding mode.
  const float k = (c * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  // ln 2 split in two (Cody–Waite): k · ln2_hi is exact for |k| < 2^9.
  float r = c - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float two_k = bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(k) + 127) << 23);
  float out = p * two_k;
  out = x < -87.0f ? 0.0f : out;  // -inf lands here: exactly 0
  out = x > 88.0f ? std::numeric_limits<float>::infinity() : out;
  return x != x ? x : out;  // NaN stays NaN
#endif
}

// log(1 + e) for e in [0, 1], the only range log-add-exp needs. Host: with m = 1 + e brought into
// [√½, √2], log m = 2·atanh(s), s = (m − 1)/(m + 1), |s| ≤ 0.172, by its series to s^11.
FASTKD_HOST_DEVICE float kd_log1p_unit(float e) {
#if defined(__CUDA_ARCH__)
  return log1pf(e);
#else
  float m = 1.0f + e;
  const bool halve = m > 1.41421356f;
  m = halve ? 0.5f * m : m;
  const float s = (m - 1.0f) / (m + 1.0f);  // m − 1 is exact (Sterbenz)
  const float s2 = s * s;
  float p = 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return (halve ? 0.693147180559945309f : 0.0f) + 2.0f * s * p;
#endif
}

}  // namespace fastkd
