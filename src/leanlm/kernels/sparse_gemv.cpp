// Activation-sparse matrix-vector product for batch-1 decode (TEAL-style activation sparsity).
//
//   sparse_gemv(x[K] f32, weight_t[K,N] f32, threshold[] f32, norms[K] f32) -> [N] f32
//   y = sum over k with |x_k| * norms_k > threshold of x_k * weight_t[k, :]
//
// The weight is stored transposed, so each surviving input's weights are one contiguous row and the
// bytes read drop with the sparsity. torch's route (nonzero + embedding_bag) costs 30-50 us of fixed
// overhead per call, more than the rows it skips save at these widths; here the selection and the
// sum are one pass: the surviving rows are split between threads, each summing whole rows into its
// own accumulator (long contiguous streams), and the partial sums are added at the end.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#ifndef LEANLM_NAMESPACE  // the tests build the portable path a second time under another name
#define LEANLM_NAMESPACE leanlm
#endif

#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t GROUP = 4;  // rows summed per pass over the accumulator: 1 load + 1 store per 4 FMAs

// acc[0:N) += sum_j v[j] * rows[j][0:N) for R rows, prefetching the next group's rows (`next`, may be
// null): the start of the next surviving row is something the hardware prefetcher cannot predict.
template <int R>
inline void axpy(float* acc, const float* const* rows, const float* v, int64_t N, const float* const* next) {
  int64_t n = 0;
#if defined(__AVX512F__)
  __m512 vv[R];
  for (int j = 0; j < R; ++j) vv[j] = _mm512_set1_ps(v[j]);
  for (; n + 16 <= N; n += 16) {
    __m512 a = _mm512_loadu_ps(acc + n);
    for (int j = 0; j < R; ++j) {
      if (next != nullptr) _mm_prefetch(reinterpret_cast<const char*>(next[j] + n), _MM_HINT_T0);
      a = _mm512_fmadd_ps(vv[j], _mm512_loadu_ps(rows[j] + n), a);
    }
    _mm512_storeu_ps(acc + n, a);
  }
#endif
  for (; n < N; ++n)
    for (int j = 0; j < R; ++j) acc[n] += v[j] * rows[j][n];
}

// Rows rows[lo:hi) of weight_t, weighted by x, summed into acc.
void sum_rows(float* acc, const float* w, const float* x, const std::vector<int64_t>& rows, int64_t lo, int64_t hi,
              int64_t N) {
  const float* ptr[2 * GROUP];
  float v[GROUP];
  int64_t i = lo;
  for (; i + GROUP <= hi; i += GROUP) {
    const bool ahead = i + 2 * GROUP <= hi;
    for (int64_t j = 0; j < (ahead ? 2 * GROUP : GROUP); ++j) ptr[j] = w + rows[i + j] * N;
    for (int64_t j = 0; j < GROUP; ++j) v[j] = x[rows[i + j]];
    axpy<GROUP>(acc, ptr, v, N, ahead ? ptr + GROUP : nullptr);
  }
  for (; i < hi; ++i) {
    ptr[0] = w + rows[i] * N;
    v[0] = x[rows[i]];
    axpy<1>(acc, ptr, v, N, nullptr);
  }
}

at::Tensor sparse_gemv(const at::Tensor& x, const at::Tensor& weight_t, const at::Tensor& threshold,
                       const at::Tensor& norms) {
  const char* op = "leanlm::sparse_gemv";
  TORCH_CHECK(x.device().is_cpu() && weight_t.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight_t.scalar_type() == at::kFloat && norms.scalar_type() == at::kFloat &&
              threshold.scalar_type() == at::kFloat, op, ": float32 tensors only");
  TORCH_CHECK(weight_t.dim() == 2 && weight_t.is_contiguous(), op, ": weight_t must be a contiguous [K, N] matrix");
  const int64_t K = weight_t.size(0), N = weight_t.size(1);
  TORCH_CHECK(x.numel() == K && x.is_contiguous(), op, ": x must hold one contiguous row of ", K, " values, got ", x.sizes());
  TORCH_CHECK(norms.numel() == K && norms.is_contiguous(), op, ": norms must hold ", K, " values");
  TORCH_CHECK(threshold.numel() == 1, op, ": threshold must be a single value");
  const float* xp = x.data_ptr<float>();
  const float* np = norms.data_ptr<float>();
  const float thr = threshold.data_ptr<float>()[0];
  std::vector<int64_t> rows;
  rows.reserve(K);
  for (int64_t k = 0; k < K; ++k)
    if (std::fabs(xp[k]) * np[k] > thr) rows.push_back(k);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(rows.size()) / 8));
  std::vector<float> partial(parts * N, 0.f);
  const float* wp = weight_t.data_ptr<float>();
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t lo = static_cast<int64_t>(rows.size()) * t / parts, hi = static_cast<int64_t>(rows.size()) * (t + 1) / parts;
      sum_rows(partial.data() + t * N, wp, xp, rows, lo, hi, N);
    }
  });
  at::Tensor y = at::empty({N}, x.options());
  float* yp = y.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) {
    float s = 0.f;
    for (int64_t t = 0; t < parts; ++t) s += partial[t * N + n];
    yp[n] = s;
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(LEANLM_NAMESPACE, m) {
  m.def("sparse_gemv(Tensor x, Tensor weight_t, Tensor threshold, Tensor norms) -> Tensor");
}

TORCH_LIBRARY_IMPL(LEANLM_NAMESPACE, CPU, m) {
  m.impl("sparse_gemv", &sparse_gemv);
}
