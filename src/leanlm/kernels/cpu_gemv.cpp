// Weight-only int8 / int4 matmuls for a few rows (decode), on CPU, with AVX-512 VNNI.
//
// Why: a decode step streams every weight once. Once the codes are int8 or int4 the model sits in a
// server CPU's large L3, so the step is bound by instructions per weight, not by DRAM. torch's packed
// kernels convert each code to float and do one FMA per weight lane (bfloat16 activations); VNNI's
// VPDPBUSD does 64 byte products per instruction. To keep float32-grade activations, each activation
// row is scaled to an integer and split into signed base-256 digits ("planes"): 3 planes (23 bits)
// for int8 weights, 2 planes (15 bits) for int4 weights, whose own error is far larger.
//
//   int8_mm(x[M,K] f32, codes[N,K] i8, scale[N] f32)                                  -> [M,N] f32
//   int4_mm(x[M,K] f32, packed[N,K/2] u8, scale[N,G] f16, zero[N,G] u8, group_size)  -> [M,N] f32
// int4 bytes hold column 2i in the low nibble and 2i+1 in the high one (leanlm's storage layout),
// w = (q - zero) * scale; the activation planes are split into even and odd columns instead of
// re-laying out the weights, so no second copy of the weights exists.
// A portable scalar path gives the same results where VNNI is missing (`simd()` says which is built).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#ifndef LEANLM_NAMESPACE  // the tests build the portable path a second time under another name
#define LEANLM_NAMESPACE leanlm
#endif

#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define LEANLM_VNNI 1
#endif

namespace {

#ifndef TILE_ROWS
#define TILE_ROWS 4
#endif
constexpr int64_t TILE = TILE_ROWS;  // output rows sharing each activation load
#ifndef PREFETCH_TILES
#define PREFETCH_TILES 2
#endif

// Activation rows as integers x_int = round(x / step), split into `planes` signed digits so that
// x_int = sum_p digit_p * 256^p (|x_int| <= 127 * 256^(planes-1)); rows padded with zeros to a multiple
// of 128. One step per row: even with a 500x outlier channel, 15 bits leave the other channels a
// rounding error below bfloat16's (the activation format of torch's kernels), and a step per block
// would cost an extra multiply per chunk (~15% of int4 decode). With `even_odd` (int4), each 128-column
// chunk is stored as [even columns | odd columns], the order in which a 64-byte load of packed codes
// yields its low and high nibbles.
struct Planes {
  int64_t planes, rows, width, groups;
  std::vector<int8_t> digits;     // [planes][rows][width]
  std::vector<double> step;       // [rows]
  std::vector<float> sums;        // [rows][groups]: sum of x_int over each group (exact below 2^24)
  std::vector<int64_t> total;     // [rows]: sum of x_int over the row

  const int8_t* plane(int64_t p, int64_t m) const { return digits.data() + (p * rows + m) * width; }
};

inline int64_t padded(int64_t k, bool even_odd) {  // where column k of a row lands in its plane
  if (!even_odd) return k;
  const int64_t c = k / 128 * 128, j = k % 128;
  return c + (j % 2) * 64 + j / 2;
}

float row_absmax(const float* x, int64_t K) {
  float amax = 0.f;
  int64_t k = 0;
#ifdef LEANLM_VNNI
  __m512 v = _mm512_setzero_ps();
  for (; k + 16 <= K; k += 16) v = _mm512_max_ps(v, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  amax = _mm512_reduce_max_ps(v);
#endif
  for (; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  return amax;
}

#ifdef LEANLM_VNNI
// 16 integers -> their digits, written to planes[p] + pos; returns their sum.
inline int64_t store_digits(__m512i v, int8_t* const* planes, int64_t nplanes, int64_t pos) {
  const int64_t sum = _mm512_reduce_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(v))) +
                      _mm512_reduce_add_epi64(_mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1)));
  const __m512i bias = _mm512_set1_epi32(128), byte = _mm512_set1_epi32(0xff);
  for (int64_t p = 0; p < nplanes; ++p) {
    const __m512i d = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(v, bias), byte), bias);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(planes[p] + pos), _mm512_cvtepi32_epi8(d));
    v = _mm512_srai_epi32(_mm512_sub_epi32(v, d), 8);
  }
  return sum;
}
#endif

// Row m of x (K columns), with `inv` = 1 / step.
void split_row(const float* xm, int64_t K, float inv, int64_t m, int64_t group, bool even_odd, Planes& out) {
  int8_t* dst[3];
  for (int64_t p = 0; p < out.planes; ++p) dst[p] = out.digits.data() + (p * out.rows + m) * out.width;
  float* sums = out.sums.data() + m * out.groups;
  int64_t k = 0;
#ifdef LEANLM_VNNI
  const __m512 scale = _mm512_set1_ps(inv);
  if (even_odd) {  // 32 columns at a time, 16 even then 16 odd; blocks and groups are multiples of 32
    const __m512i evens = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
    for (; k + 32 <= K; k += 32) {
      const __m512 a = _mm512_loadu_ps(xm + k), b = _mm512_loadu_ps(xm + k + 16);
      const __m512i ve = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_permutex2var_ps(a, evens, b), scale));
      const __m512i vo = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_permutex2var_ps(a, odds, b), scale));
      const int64_t isum = store_digits(ve, dst, out.planes, padded(k, true)) +
                           store_digits(vo, dst, out.planes, padded(k + 1, true));
      out.total[m] += isum;
      sums[k / group] += static_cast<float>(isum);
    }
  } else if (group % 16 == 0) {
    for (; k + 16 <= K; k += 16) {
      const int64_t isum = store_digits(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xm + k), scale)), dst,
                                        out.planes, k);
      out.total[m] += isum;
      sums[k / group] += static_cast<float>(isum);
    }
  }
#endif
  for (; k < K; ++k) {
    int64_t v = std::lrintf(xm[k] * inv);
    out.total[m] += v;
    sums[k / group] += static_cast<float>(v);
    for (int64_t p = 0; p < out.planes; ++p) {
      const int64_t d = ((v + 128) & 0xff) - 128;
      dst[p][padded(k, even_odd)] = static_cast<int8_t>(d);
      v = (v - d) >> 8;
    }
  }
}

Planes split_rows(const float* x, int64_t M, int64_t K, int64_t planes, int64_t group, bool even_odd) {
  const int64_t width = (K + 127) / 128 * 128;
  Planes out{planes, M, width, K / group, {}, {}, {}, {}};
  out.digits.assign(planes * M * width, 0);
  out.step.assign(M, 0.0);
  out.sums.assign(M * out.groups, 0.f);
  out.total.assign(M, 0);
  const float limit = 127.f * static_cast<float>(1 << (8 * (planes - 1)));
  for (int64_t m = 0; m < M; ++m) {
    const float amax = row_absmax(x + m * K, K);
    out.step[m] = amax > 0.f ? static_cast<double>(amax) / limit : 0.0;
    split_row(x + m * K, K, amax > 0.f ? limit / amax : 0.f, m, group, even_odd, out);
  }
  return out;
}

// x_int of row m, column k (scalar path).
inline int64_t value_at(const Planes& pl, int64_t m, int64_t k, bool even_odd) {
  int64_t v = 0;
  for (int64_t p = pl.planes - 1; p >= 0; --p) v = v * 256 + pl.plane(p, m)[padded(k, even_odd)];
  return v;
}

#ifdef LEANLM_VNNI
inline __mmask64 tail_mask(int64_t remaining_bytes) {
  return remaining_bytes >= 64 ? ~0ULL : ((1ULL << remaining_bytes) - 1);
}

// R rows of int8 codes against activation row m: 3 digit planes; VPDPBUSD wants unsigned bytes on
// one side, so the codes are offset by 128 (a sign-bit flip) and 128 * sum(x_int) taken off after.
template <int R>
void int8_rows(const Planes& pl, int64_t m, const int8_t* w, int64_t K, int64_t D[][3]) {
  __m512i acc[R][3];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = acc[r][2] = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 mask = tail_mask(K - k);
    const __m512i d0 = _mm512_loadu_si512(pl.plane(0, m) + k);
    const __m512i d1 = _mm512_loadu_si512(pl.plane(1, m) + k);
    const __m512i d2 = _mm512_loadu_si512(pl.plane(2, m) + k);
    for (int r = 0; r < R; ++r) {
      // masked-off bytes read as 0 (128 after the flip) against zero-padded digits: no effect
      // the next tile's bytes: rows this short end before the hardware prefetcher has caught on
      _mm_prefetch(reinterpret_cast<const char*>(w + (PREFETCH_TILES * R + r) * K + k), _MM_HINT_T0);
      const __m512i wu = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, w + r * K + k), flip);
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], wu, d0);
      acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], wu, d1);
      acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], wu, d2);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < 3; ++p) D[r][p] = _mm512_reduce_add_epi32(acc[r][p]);
}
#endif

void int8_block(const Planes& pl, const int8_t* w, const float* scale, int64_t K, int64_t N, int64_t begin,
                int64_t end, float* y) {
  for (int64_t m = 0; m < pl.rows; ++m) {
    for (int64_t n = begin; n < end;) {
      int64_t dot[TILE] = {};
      int64_t rows = std::min(TILE, end - n);
#ifdef LEANLM_VNNI
      const int64_t offset = 128 * pl.total[m];
      int64_t D[TILE][3] = {};
      if (rows == TILE) {
        int8_rows<TILE>(pl, m, w + n * K, K, D);
      } else {
        rows = 1;
        int8_rows<1>(pl, m, w + n * K, K, D);
      }
      for (int64_t r = 0; r < rows; ++r) dot[r] = D[r][0] + 256 * D[r][1] + 65536 * D[r][2] - offset;
#else
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t k = 0; k < K; ++k) dot[r] += value_at(pl, m, k, false) * w[(n + r) * K + k];
#endif
      for (int64_t r = 0; r < rows; ++r)
        y[m * N + n + r] = static_cast<float>(static_cast<double>(dot[r]) * pl.step[m] * scale[n + r]);
      n += rows;
    }
  }
}

// How group scales map onto the 16 int32 lanes of a 128-column chunk (lane i sums columns 8i..8i+7).
struct GroupLayout {
  int64_t group, groups;  // group size, groups per row
  bool lanes_split;       // groups of 32 or 64: one chunk holds several; otherwise one group per chunk
};

#ifdef LEANLM_VNNI
// R rows of packed int4 codes against activation row m: sum over chunks of scale * (x_int . q), minus
// sum over groups of scale * zero * (sum of x_int over the group). `scale` and `scaled_zero` hold the R
// rows' group scales and scale * zero as float32.
template <int R>
void int4_rows(const Planes& pl, int64_t m, const uint8_t* w, const float* scale, const float* scaled_zero,
               int64_t K, const GroupLayout& g, float* out) {
  __m512 tot[R];
  for (int r = 0; r < R; ++r) tot[r] = _mm512_setzero_ps();
  const __m512i nib = _mm512_set1_epi8(0x0f);
  alignas(64) int32_t idx[16];
  for (int i = 0; i < 16; ++i) idx[i] = g.lanes_split ? static_cast<int32_t>(8 * i / g.group) : 0;
  const __m512i lane_group = _mm512_load_si512(idx);
  const int64_t half = K / 2;
  for (int64_t c = 0; c * 128 < K; ++c) {
    const int8_t* p0 = pl.plane(0, m) + c * 128;
    const int8_t* p1 = pl.plane(1, m) + c * 128;
    const __m512i e0 = _mm512_loadu_si512(p0), o0 = _mm512_loadu_si512(p0 + 64);
    const __m512i e1 = _mm512_loadu_si512(p1), o1 = _mm512_loadu_si512(p1 + 64);
    const __mmask64 mask = tail_mask(half - c * 64);
    const int64_t g0 = c * 128 / g.group;
    const __mmask16 smask = static_cast<__mmask16>((1u << std::min<int64_t>(g.groups - g0, 16)) - 1);
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (PREFETCH_TILES * R + r) * half + c * 64), _MM_HINT_T0);
      const __m512i b = _mm512_maskz_loadu_epi8(mask, w + r * half + c * 64);
      const __m512i lo = _mm512_and_si512(b, nib), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), nib);
      __m512i a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, e1);
      a = _mm512_slli_epi32(_mm512_dpbusd_epi32(a, hi, o1), 8);
      a = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(a, lo, e0), hi, o0);
      const float* s = scale + r * g.groups + g0;
      const __m512 sv = g.lanes_split ? _mm512_permutexvar_ps(lane_group, _mm512_maskz_loadu_ps(smask, s))
                                      : _mm512_set1_ps(*s);
      tot[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), sv, tot[r]);
    }
  }
  // the zero points, 16 groups per step, in the same accumulator: one reduction per row
  const float* gsum = pl.sums.data() + m * g.groups;
  for (int64_t j = 0; j < g.groups; j += 16) {
    const __mmask16 gmask = static_cast<__mmask16>((1u << std::min<int64_t>(g.groups - j, 16)) - 1);
    const __m512 sums = _mm512_maskz_loadu_ps(gmask, gsum + j);
    for (int r = 0; r < R; ++r)
      tot[r] = _mm512_fnmadd_ps(_mm512_maskz_loadu_ps(gmask, scaled_zero + r * g.groups + j), sums, tot[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(tot[r]);
}
#endif

void int4_block(const Planes& pl, const uint8_t* w, const c10::Half* scale, const uint8_t* zero,
                const GroupLayout& g, int64_t K, int64_t N, int64_t begin, int64_t end, float* y) {
  const int64_t half = K / 2;
  // this task's scales and scale * zero as float32, converted once
  std::vector<float> sf((end - begin) * g.groups), sz(sf.size());
  for (int64_t i = 0; i < static_cast<int64_t>(sf.size()); ++i) {
    sf[i] = static_cast<float>(scale[begin * g.groups + i]);
    sz[i] = sf[i] * static_cast<float>(zero[begin * g.groups + i]);
  }
  for (int64_t m = 0; m < pl.rows; ++m) {
    for (int64_t n = begin; n < end;) {
      float dot[TILE] = {};
      int64_t rows = std::min(TILE, end - n);
      const float* s = sf.data() + (n - begin) * g.groups;
      const float* z = sz.data() + (n - begin) * g.groups;
#ifdef LEANLM_VNNI
      if (rows == TILE) {
        int4_rows<TILE>(pl, m, w + n * half, s, z, K, g, dot);
      } else {
        rows = 1;
        int4_rows<1>(pl, m, w + n * half, s, z, K, g, dot);
      }
#else
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t k = 0; k < K; ++k) {
          const uint8_t b = w[(n + r) * half + k / 2];
          const int64_t q = (k % 2) ? (b >> 4) : (b & 0x0f);
          dot[r] += static_cast<float>(q * value_at(pl, m, k, true)) * s[r * g.groups + k / g.group];
        }
        for (int64_t j = 0; j < g.groups; ++j) dot[r] -= z[r * g.groups + j] * pl.sums[m * g.groups + j];
      }
#endif
      for (int64_t r = 0; r < rows; ++r) y[m * N + n + r] = static_cast<float>(dot[r] * pl.step[m]);
      n += rows;
    }
  }
}

void check_inputs(const at::Tensor& x, const at::Tensor& w, int64_t width, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), op,
              ": x must be a contiguous float32 [M, K] matrix, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == width, op,
              ": weight codes must be contiguous [N, ", width, "], got ", w.sizes());
  // int32 lanes accumulate at most K/64 products of 4 bytes each: far below 2^31 up to this K
  TORCH_CHECK(x.size(1) <= 65536, op, ": K = ", x.size(1), " is above the supported 65536");
}

// Rows per task such that each task streams at least ~48 KB of codes: smaller tasks cost more to
// schedule than they save.
int64_t grain(int64_t bytes_per_row) { return std::max<int64_t>(TILE, (49152 / bytes_per_row + TILE - 1) / TILE * TILE); }

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale) {
  check_inputs(x, codes, x.size(1), "leanlm::int8_mm");
  TORCH_CHECK(codes.scalar_type() == at::kChar, "leanlm::int8_mm: codes must be int8");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == N,
              "leanlm::int8_mm: scale must be float32 with one value per output row (", N, ")");
  const Planes pl = split_rows(x.data_ptr<float>(), M, K, 3, K, false);
  at::Tensor y = at::empty({M, N}, x.options());
  const int8_t* wp = codes.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, grain(K), [&](int64_t begin, int64_t end) { int8_block(pl, wp, sp, K, N, begin, end, yp); });
  return y;
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                   const at::Tensor& zero, int64_t group_size) {
  const int64_t K = x.size(1);
  TORCH_CHECK(K % 32 == 0, "leanlm::int4_mm: K = ", K, " must be a multiple of 32");
  check_inputs(x, packed, K / 2, "leanlm::int4_mm");
  TORCH_CHECK(packed.scalar_type() == at::kByte, "leanlm::int4_mm: packed codes must be uint8");
  const bool whole = group_size == K;
  TORCH_CHECK(whole || ((group_size == 32 || group_size == 64 || group_size % 128 == 0) && K % group_size == 0),
              "leanlm::int4_mm: group_size ", group_size, " must be 32, 64, a multiple of 128 or K (", K,
              "), and divide K");
  const int64_t M = x.size(0), N = packed.size(0), G = K / group_size;
  TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.is_contiguous() && scale.numel() == N * G,
              "leanlm::int4_mm: scale must be contiguous float16 [", N, ", ", G, "]");
  TORCH_CHECK(zero.scalar_type() == at::kByte && zero.is_contiguous() && zero.numel() == N * G,
              "leanlm::int4_mm: zero must be contiguous uint8 [", N, ", ", G, "]");
  const Planes pl = split_rows(x.data_ptr<float>(), M, K, 2, group_size, true);
  const GroupLayout layout{group_size, G, group_size < 128};
  at::Tensor y = at::empty({M, N}, x.options());
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const c10::Half* sp = scale.data_ptr<c10::Half>();
  const uint8_t* zp = zero.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, grain(K / 2), [&](int64_t begin, int64_t end) {
    int4_block(pl, wp, sp, zp, layout, K, N, begin, end, yp);
  });
  return y;
}

bool has_vnni() {
#ifdef LEANLM_VNNI
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(LEANLM_NAMESPACE, m) {
  m.def("int8_mm(Tensor x, Tensor codes, Tensor scale) -> Tensor");
  m.def("int4_mm(Tensor x, Tensor packed, Tensor scale, Tensor zero, int group_size) -> Tensor");
  m.def("simd() -> bool", &has_vnni);
}

TORCH_LIBRARY_IMPL(LEANLM_NAMESPACE, CPU, m) {
  m.impl("int8_mm", &int8_mm);
  m.impl("int4_mm", &int4_mm);
}
