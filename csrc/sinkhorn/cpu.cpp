// CPU kernel of the batched log-domain Sinkhorn forward (fastkd/backends/torch_sinkhorn.py's
// iteration, with the shared math of sinkhorn/sinkhorn_math.h). OpenMP over problems, dynamically
// scheduled because each problem stops on its own; one thread runs all iterations of a problem.
// The cost is converted once to a contiguous fp32 C/ε tile: per problem into the thread's buffer,
// or, when shared by the batch, once for all threads. Both half-steps walk that tile row by row,
// so every inner loop is a contiguous `omp simd` loop:
//   row step     R_i = lse_j(v_j − cs_ij): a max then a sum along row i;
//   column step  L_j = lse_i(u_i − cs_ij): per-column maxima, then per-column sums, over the rows.
// Absent (zero-mass) rows are skipped by the column step: their terms are exactly 0.
// Extra memory: one n·m fp32 tile per thread (batched cost) or one in all (shared cost), O(n + m)
// vectors per thread. A batch smaller than the thread count leaves threads idle.
#include <cmath>
#include <cstdint>
#include <vector>

#include "fastkd/common/dispatch.h"
#include "fastkd/common/threads.h"
#include "fastkd/sinkhorn/sinkhorn.h"
#include "fastkd/sinkhorn/sinkhorn_math.h"

namespace fastkd {
namespace {

template <DType D>
void load_scaled_cost(const SinkhornArgs& args, int64_t problem, float inv_eps, float* cs) {
  using storage = typename Element<D>::storage;
  const storage* base = static_cast<const storage*>(args.cost.data) + problem * args.cost.stride_b;
  for (int64_t i = 0; i < args.n; ++i) {
    const storage* row = base + i * args.cost.stride_n;
    float* out = cs + i * args.m;
    const int64_t stride = args.cost.stride_m;
#pragma omp simd
    for (int64_t j = 0; j < args.m; ++j) out[j] = Element<D>::to_float(row[j * stride]) * inv_eps;
  }
}

// The vectors of one problem, reused across the problems a thread runs.
struct Workspace {
  std::vector<float> la, u, R;            // (n)
  std::vector<float> lb, v, L, L_new;     // (m)
  std::vector<float> col_max, col_sum;    // (m)
  std::vector<float> tile;                // (n·m): this problem's C/ε (batched cost only)
  Workspace(int64_t n, int64_t m, bool own_tile)
      : la(n), u(n), R(n), lb(m), v(m), L(m), L_new(m), col_max(m), col_sum(m), tile(own_tile ? n * m : 0) {}
};

// lse_j(v_j − cs_ij) over one row.
inline float row_lse(const float* v, const float* row, int64_t m) {
  float top = -INFINITY;
#pragma omp simd reduction(max : top)
  for (int64_t j = 0; j < m; ++j) top = sinkhorn_max(top, v[j] - row[j]);
  const float shift = sinkhorn_lse_shift(top);
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < m; ++j) sum += sinkhorn_lse_term(v[j], row[j], shift);
  return sinkhorn_lse_finish(sum, shift);
}

// L_j = lse_i(u_i − cs_ij) for every column, into L.
void column_lse(const float* u, const float* cs, int64_t n, int64_t m, Workspace& w, float* L) {
  float* col_max = w.col_max.data();
  float* col_sum = w.col_sum.data();
  for (int64_t j = 0; j < m; ++j) col_max[j] = -INFINITY;
  for (int64_t i = 0; i < n; ++i) {
    if (u[i] == -INFINITY) continue;
    const float ui = u[i];
    const float* row = cs + i * m;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) col_max[j] = sinkhorn_max(col_max[j], ui - row[j]);
  }
  for (int64_t j = 0; j < m; ++j) {
    col_max[j] = sinkhorn_lse_shift(col_max[j]);
    col_sum[j] = 0.0f;
  }
  for (int64_t i = 0; i < n; ++i) {
    if (u[i] == -INFINITY) continue;
    const float ui = u[i];
    const float* row = cs + i * m;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) col_sum[j] += sinkhorn_lse_term(ui, row[j], col_max[j]);
  }
  for (int64_t j = 0; j < m; ++j) L[j] = sinkhorn_lse_finish(col_sum[j], col_max[j]);
}

void solve_problem(const SinkhornArgs& args, const SinkhornOutputs& out, int64_t k, const float* cs,
                   Workspace& w) {
  const int64_t n = args.n, m = args.m;
  const float eps = args.eps;
  const float* a = args.a + k * n;
  const float* b = args.b + k * m;
  float *la = w.la.data(), *u = w.u.data(), *R = w.R.data();
  float *lb = w.lb.data(), *v = w.v.data(), *L = w.L.data(), *L_new = w.L_new.data();
  float* f_hist = args.save_history ? out.f_hist + k * args.max_iter * n : nullptr;
  float* g_hist = args.save_history ? out.g_hist + k * args.max_iter * m : nullptr;

  for (int64_t i = 0; i < n; ++i) {
    la[i] = sinkhorn_log_mass(a[i]);
    u[i] = a[i] > 0.0f ? 0.0f : -INFINITY;  // POT's f = 0 start; absent rows stay out of step 1
    R[i] = 0.0f;
  }
  for (int64_t j = 0; j < m; ++j) lb[j] = sinkhorn_log_mass(b[j]);
  column_lse(u, cs, n, m, w, L);
  for (int64_t j = 0; j < m; ++j) v[j] = sinkhorn_log_scaling(b[j], lb[j], L[j]);
  if (g_hist != nullptr)
    for (int64_t j = 0; j < m; ++j) g_hist[j] = -eps * L[j];

  int it = 0;
  float err = INFINITY;
  bool running = true;
  while (running) {
    for (int64_t i = 0; i < n; ++i) {
      R[i] = row_lse(v, cs + i * m, m);
      u[i] = sinkhorn_log_scaling(a[i], la[i], R[i]);
    }
    if (f_hist != nullptr)
      for (int64_t i = 0; i < n; ++i) f_hist[it * n + i] = -eps * R[i];
    ++it;
    column_lse(u, cs, n, m, w, L_new);
    float e = 0.0f;
    for (int64_t j = 0; j < m; ++j) e += sinkhorn_column_error(b[j], lb[j], L_new[j], L[j]);
    err = e;
    running = sinkhorn_keeps_running(it, args.max_iter, err, args.tol);
    if (running) {  // a stopping problem keeps the L its last row step used: rows stay exact
      for (int64_t j = 0; j < m; ++j) {
        L[j] = L_new[j];
        v[j] = sinkhorn_log_scaling(b[j], lb[j], L[j]);
      }
      if (g_hist != nullptr)
        for (int64_t j = 0; j < m; ++j) g_hist[it * m + j] = -eps * L[j];
    }
  }

  float* f = out.f + k * n;
  float* g = out.g + k * m;
  for (int64_t j = 0; j < m; ++j) g[j] = -eps * L[j];
  // value = Σ P·(f̃ + g̃), value_linear = Σ P·C, summed in double (n·m fp32 terms).
  double value = 0.0, value_linear = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    f[i] = -eps * R[i];
    float* plan_row = args.return_plan ? out.plan + (k * n + i) * m : nullptr;
    if (u[i] == -INFINITY) {
      if (plan_row != nullptr)
        for (int64_t j = 0; j < m; ++j) plan_row[j] = 0.0f;
      continue;
    }
    const float ui = u[i], fi = f[i];
    const float* row = cs + i * m;
    double row_value = 0.0, row_linear = 0.0;
#pragma omp simd reduction(+ : row_value, row_linear)
    for (int64_t j = 0; j < m; ++j) {
      const float p = sinkhorn_plan_entry(ui, v[j], row[j]);
      row_linear += p * (row[j] * eps);
      row_value += p * (fi + g[j]);
    }
    if (plan_row != nullptr)
      for (int64_t j = 0; j < m; ++j) plan_row[j] = sinkhorn_plan_entry(ui, v[j], row[j]);
    value += row_value;
    value_linear += row_linear;
  }
  out.value[k] = static_cast<float>(value);
  out.value_linear[k] = static_cast<float>(value_linear);
  out.n_iter[k] = it;
  out.err[k] = err;
}

template <DType D>
void run(const SinkhornArgs& args, const SinkhornOutputs& out, int n_threads) {
  const float inv_eps = 1.0f / args.eps;
  const bool shared = args.cost.stride_b == 0;
  std::vector<float> shared_tile;
  if (shared) {  // read and scaled once for the whole batch
    shared_tile.resize(args.n * args.m);
    load_scaled_cost<D>(args, 0, inv_eps, shared_tile.data());
  }
#pragma omp parallel num_threads(n_threads)
  {
    Workspace w(args.n, args.m, !shared);
#pragma omp for schedule(dynamic, 1)
    for (int64_t k = 0; k < args.n_problems; ++k) {
      const float* cs = shared_tile.data();
      if (!shared) {
        load_scaled_cost<D>(args, k, inv_eps, w.tile.data());
        cs = w.tile.data();
      }
      solve_problem(args, out, k, cs, w);
    }
  }
}

}  // namespace

void sinkhorn_forward_cpu(const SinkhornArgs& args, const SinkhornOutputs& out, int n_threads) {
  check_sinkhorn_args(args, out);
  if (args.n_problems == 0) return;
  const int threads = resolve_threads(n_threads);
  dispatch_dtype(args.cost.dtype, [&](auto tag) { run<decltype(tag)::value>(args, out, threads); });
}

}  // namespace fastkd
