// Element types crossing the Python boundary as integer codes, and the kernels' compile-time
// element types: the storage type and branch-free conversions to and from float (round to
// nearest even), usable on the host inside `omp simd` loops and on the device, where they are
// CUDA's own conversions. The one set of fp16/bf16 converters of fastkd._C.
#pragma once

#include <cstdint>

#include "fastkd/common/contract.h"
#include "fastkd/common/fast_math.h"
#include "fastkd/common/host_device.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace fastkd {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Contract table (fastkd._C.contract()["dtype_codes"]); names as torch spells them.
inline constexpr NamedCode kDTypeCodes[] = {
    {"float32", static_cast<int>(DType::kFloat32)},
    {"float16", static_cast<int>(DType::kFloat16)},
    {"bfloat16", static_cast<int>(DType::kBFloat16)},
    {"float64", static_cast<int>(DType::kFloat64)},
};

template <DType D>
struct Element;

template <>
struct Element<DType::kFloat32> {
  using storage = float;
  FASTKD_HOST_DEVICE static float to_float(float v) { return v; }
  FASTKD_HOST_DEVICE static float from_float(float v) { return v; }
};

template <>
struct Element<DType::kBFloat16> {
  using storage = uint16_t;
  FASTKD_HOST_DEVICE static float to_float(uint16_t v) { return bits_to_float(static_cast<uint32_t>(v) << 16); }
  FASTKD_HOST_DEVICE static uint16_t from_float(float v) {
#if defined(__CUDA_ARCH__)
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
#else
    const uint32_t bits = float_to_bits(v);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);  // the rounding carry could turn NaN into inf
#endif
  }
};

template <>
struct Element<DType::kFloat16> {
  using storage = uint16_t;
  FASTKD_HOST_DEVICE static float to_float(uint16_t v) {
#if defined(__CUDA_ARCH__)
    return __half2float(__ushort_as_half(v));
#else
    // Normal, inf and NaN: move the 5-bit exponent into float position and rebias by 2^-112 (an
    // exact scaling). Subnormal: 0.5 + m·2^-24 formed by bits, minus 0.5 (exact).
    const uint32_t shifted = static_cast<uint32_t>(v) << 16;
    const uint32_t sign = shifted & 0x80000000u;
    const uint32_t two_w = shifted + shifted;  // drops the sign
    const float normal = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float subnormal = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
    return bits_to_float(sign | float_to_bits(two_w < (1u << 27) ? subnormal : normal));
#endif
  }
  FASTKD_HOST_DEVICE static uint16_t from_float(float v) {
#if defined(__CUDA_ARCH__)
    return __half_as_ushort(__float2half_rn(v));
#else
    // Integer-only rounding, so that no FMA contraction can change the result.
    const uint32_t bits = float_to_bits(v);
    const uint32_t sign = (bits >> 16) & 0x8000u;
    const uint32_t a = bits & 0x7FFFFFFFu;
    const uint32_t normal = (a - 0x38000000u + 0xFFFu + ((a >> 13) & 1u)) >> 13;  // rebias 127 → 15
    uint32_t shift = 126u - (a >> 23);  // subnormal halves: units of 2^-24
    shift = shift > 31u ? 31u : (shift == 0u ? 1u : shift);  // keeps the shifts below defined
    const uint32_t mantissa = (a & 0x7FFFFFu) | 0x800000u;
    uint32_t sub = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    sub += rest + (sub & 1u) > half ? 1u : 0u;  // to nearest, ties to even
    uint32_t out = a < 0x38800000u ? sub : normal;
    out = a >= 0x477FF000u ? 0x7C00u : out;  // 65520 and above round to inf
    out = a > 0x7F800000u ? 0x7E00u : out;   // NaN
    return static_cast<uint16_t>(sign | out);
#endif
  }
};

}  // namespace fastkd
