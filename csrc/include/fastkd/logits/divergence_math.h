// The divergences of fastkd/divergences.py, written once for the CPU and CUDA kernels: streamed
// normalisers, the shifted one-pass KL accumulator, and each divergence's per-element loss, aux
// and gradient terms. Element math in fp32 and in log space: log-probabilities are formed as
// (x − max) − log_sum, never x − (max + log_sum), which would round away ±1e4 logits' precision.
#pragma once

#include <cmath>
#include <cstdint>

#include "fastkd/common/fast_math.h"
#include "fastkd/common/host_device.h"
#include "fastkd/common/lse_state.h"
#include "fastkd/logits/contract.h"

namespace fastkd {

// The divergence and its parameters as the kernels take them (DivergenceSpec in divergences.py):
// code is a Divergence; param is beta for jsd, the skew for skew_*; log_param / log1m_param are
// log(param), log(1 − param).
struct DivergenceParams {
  int code;
  float inv_temperature;
  float param;
  float log_param;
  float log1m_param;
};

FASTKD_HOST_DEVICE float sign_f(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f); }

// log(e^x + e^y) = top + log(1 + e^(bottom − top)); -inf when both are -inf (no NaN).
FASTKD_HOST_DEVICE float log_add_exp(float x, float y) {
  const float top = max_f(x, y);
  const float safe_top = top == -INFINITY ? 0.0f : top;
  return top + kd_log1p_unit(kd_exp(min_f(x, y) - safe_top));
}

// (x − max) − log_sum: a log-probability from the row statistics.
FASTKD_HOST_DEVICE float log_prob(float x, float row_max, float log_sum) { return (x - row_max) - log_sum; }

// One-pass KL(a ‖ b) of two streamed rows ("a" weights the sum: the teacher for forward KL, the
// student for reverse KL). acc = Σ e^(a − m_a)·((a − m_a) − (b − m_b)) stays relative to the
// running maxima, so the loss acc/z_a + log z_b − log z_a never subtracts two large
// log-sum-exps. Usage: rescale to maxima covering the next values, then add them.
template <class Acc>
struct ShiftedKlStateT {
  LseStateT<Acc> a;
  LseStateT<Acc> b;
  Acc acc = 0;

  FASTKD_HOST_DEVICE void rescale(float m_a_new, float m_b_new) {
    const float shift_a = a.m - m_a_new;
    acc = kd_exp(shift_a) * (acc + (shift_a - (b.m - m_b_new)) * a.z);
    a.rescale(m_a_new);
    b.rescale(m_b_new);
  }
  FASTKD_HOST_DEVICE void merge(const ShiftedKlStateT& other) {
    ShiftedKlStateT moved = other;
    const float m_a_new = max_f(a.m, other.a.m);
    const float m_b_new = max_f(b.m, other.b.m);
    rescale(m_a_new, m_b_new);
    moved.rescale(m_a_new, m_b_new);
    a.z += moved.a.z;
    b.z += moved.b.z;
    acc += moved.acc;
  }
  FASTKD_HOST_DEVICE float loss() const { return static_cast<float>(acc / a.z + log_acc(b.z) - log_acc(a.z)); }
};

// One element's contributions to (z_a, z_b, acc) of a ShiftedKlState at maxima m_a, m_b.
FASTKD_HOST_DEVICE void kl_element_terms(float x_a, float x_b, float m_a, float m_b, float& w,
                                         float& e_b, float& term) {
  w = kd_exp(x_a - m_a);
  e_b = kd_exp(x_b - m_b);
  const float diff = (x_a - m_a) - (x_b - m_b);
  term = w > 0.0f ? w * diff : 0.0f;  // a masked (-inf) in a: 0·inf counts as 0
}

// log M of the mixture divergences: M = param·p + (1 − param)·q for jsd and skew_forward_kl,
// M = param·q + (1 − param)·p for skew_reverse_kl.
template <int DIV>
FASTKD_HOST_DEVICE float mixture_log(float lq, float lp, const DivergenceParams& k) {
  if (DIV == kSkewReverseKl) return log_add_exp(lq + k.log_param, lp + k.log1m_param);
  return log_add_exp(lp + k.log_param, lq + k.log1m_param);
}

// q·p/M in log space; 0 where q or p is exactly 0.
FASTKD_HOST_DEVICE float q_p_over_m(float lq, float lp, float lm) {
  return (lq > -INFINITY && lp > -INFINITY) ? kd_exp(lq + lp - lm) : 0.0f;
}

// weight·log_ratio with the 0·log 0 = 0 convention.
FASTKD_HOST_DEVICE float weighted(float weight, float value) { return weight > 0.0f ? weight * value : 0.0f; }

// Second-pass terms of the two-pass divergences (jsd, skew_*, tvd): one element's share of the
// row loss and of the gradient constant aux.
template <int DIV>
FASTKD_HOST_DEVICE void two_pass_terms(float lq, float lp, const DivergenceParams& k, float& loss_term,
                                       float& aux_term) {
  const float q = kd_exp(lq);
  const float p = kd_exp(lp);
  if (DIV == kTvd) {
    loss_term = 0.5f * fabsf(p - q);
    aux_term = 0.5f * q * sign_f(q - p);
    return;
  }
  const float lm = mixture_log<DIV>(lq, lp, k);
  if (DIV == kJsd) {
    const float kl_q_m = weighted(q, lq - lm);
    loss_term = k.param * weighted(p, lp - lm) + (1.0f - k.param) * kl_q_m;
    aux_term = kl_q_m;
  } else if (DIV == kSkewForwardKl) {
    loss_term = weighted(p, lp - lm);
    aux_term = q_p_over_m(lq, lp, lm);
  } else {  // kSkewReverseKl
    loss_term = weighted(q, lq - lm);
    aux_term = loss_term + (1.0f - k.param) * q_p_over_m(lq, lp, lm);
  }
}

// ∂L_row/∂s_j of the scaled student logits s = student / T, from the log-probabilities and the
// row's aux (divergences.grad_scaled_student).
template <int DIV>
FASTKD_HOST_DEVICE float grad_scaled_student(float lq, float lp, float aux, const DivergenceParams& k) {
  const float q = kd_exp(lq);
  if (DIV == kForwardKl) return q - kd_exp(lp);
  if (DIV == kReverseKl) return weighted(q, lq - lp - aux);
  if (DIV == kTvd) return q * (0.5f * sign_f(q - kd_exp(lp)) - aux);
  const float lm = mixture_log<DIV>(lq, lp, k);
  if (DIV == kJsd) return (1.0f - k.param) * weighted(q, lq - lm - aux);
  if (DIV == kSkewForwardKl) return (1.0f - k.param) * (q * aux - q_p_over_m(lq, lp, lm));
  return weighted(q, lq - lm - aux) + (1.0f - k.param) * q_p_over_m(lq, lp, lm);  // kSkewReverseKl
}

// torch.nn.functional.kl_div's pointwise term target·(log target − input), 0 where the target
// probability is 0 (even against input = -inf), NaN where it is negative (as in PyTorch); and
// that probability, −∂term/∂input.
FASTKD_HOST_DEVICE float kl_div_target_prob(float target, bool log_target) {
  return log_target ? kd_exp(target) : target;
}
FASTKD_HOST_DEVICE float kl_div_term(float input, float target, bool log_target) {
  const float prob = kl_div_target_prob(target, log_target);
  const float log_prob_t = log_target ? target : logf(target);
  return prob == 0.0f ? 0.0f : prob * (log_prob_t - input);
}

}  // namespace fastkd
