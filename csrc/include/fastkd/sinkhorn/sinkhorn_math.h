// The log-domain Sinkhorn update of fastkd/backends/torch_sinkhorn.py, written once for the CPU
// and CUDA kernels. Internal form (finite potentials where a marginal has zero mass):
//   u_i = log a_i + f̃_i/ε (−inf where a_i = 0),  v_j = log b_j + g̃_j/ε,  cs = C/ε
//   column step  L_j = lse_i(u_i − cs_ij),  v_j = log b_j − L_j   (g̃ = −ε·L)
//   row step     R_i = lse_j(v_j − cs_ij),  u_i = log a_i − R_i   (f̃ = −ε·R)
// An lse is taken in two passes, a maximum then Σ exp(x − max); these functions are its pieces,
// so each kernel can lay the passes out over its own memory (CPU: SIMD rows, CUDA: warps/threads).
#pragma once

#include <cmath>

#include "fastkd/common/fast_math.h"
#include "fastkd/common/host_device.h"

namespace fastkd {

// log of a marginal entry; −inf marks an absent (zero-mass) row or column.
FASTKD_HOST_DEVICE float sinkhorn_log_mass(float mass) { return mass > 0.0f ? logf(mass) : -INFINITY; }

FASTKD_HOST_DEVICE float sinkhorn_max(float x, float y) { return x > y ? x : y; }

// The shift of an lse whose terms may all be −inf (an all-absent column): 0 there, so the sum is
// 0 and the lse −inf, never NaN from −inf − (−inf).
FASTKD_HOST_DEVICE float sinkhorn_lse_shift(float top) { return top == -INFINITY ? 0.0f : top; }

// One term of Σ exp(x − shift) with x = scaling − cs (scaling is u_i or v_j); exactly 0 for −inf.
FASTKD_HOST_DEVICE float sinkhorn_lse_term(float scaling, float cs, float shift) {
  return kd_exp(scaling - cs - shift);
}

FASTKD_HOST_DEVICE float sinkhorn_lse_finish(float sum, float shift) { return logf(sum) + shift; }

// The new log-scaling of a row (column) from its lse: log mass − lse, −inf off the support.
FASTKD_HOST_DEVICE float sinkhorn_log_scaling(float mass, float log_mass, float lse) {
  return mass > 0.0f ? log_mass - lse : -INFINITY;
}

// |Σ_i P_ij − b_j| of the plan the last row step made: its column sum is b_j·exp(L_new_j − L_j),
// free from the next column step.
FASTKD_HOST_DEVICE float sinkhorn_column_error(float mass, float log_mass, float lse_new, float lse_old) {
  const float col_sum = mass > 0.0f ? kd_exp(log_mass + lse_new - lse_old) : 0.0f;
  return fabsf(col_sum - mass);
}

// Whether a problem iterates again after `it` iterations. A NaN error keeps running (the
// comparison is false), as POT does; tol < 0 runs exactly max_iter iterations.
FASTKD_HOST_DEVICE bool sinkhorn_keeps_running(int it, int max_iter, float err, float tol) {
  return it < max_iter && (err > tol || err != err);
}

// P_ij = exp(u_i + v_j − cs_ij); 0 on absent rows and columns.
FASTKD_HOST_DEVICE float sinkhorn_plan_entry(float u, float v, float cs) { return kd_exp(u + v - cs); }

}  // namespace fastkd
