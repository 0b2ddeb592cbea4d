// newllm::matvec_f16(x, w) -> x @ w.float().t(): x (N, I) float32, w (O, I) float16, y (N, O)
// float32, accumulated in float32. Built by newllm/half_weights.py on first use (x86-64 with
// AVX2, FMA and F16C). Meant for decode steps, where N is a few rows and the product's time is
// the weight's bytes over memory bandwidth: the weight is read once, in half the bytes of
// float32, front to back (one sequential stream, which the hardware prefetchers follow; blocks
// of rows read side by side measured slower from DRAM), eight values at a time converted in
// registers. A row (at most a few KiB) stays in L1 while it meets every row of x.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdint>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 load_half8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline float half_to_float(uint16_t h) {
  return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));
}

// dot(x[0:I], w[0:I]) with four accumulators (FMA latency), then the 8-wide and scalar tails
inline float dot(const float* x, const uint16_t* w, int64_t I) {
  const int64_t I32 = I - I % 32, I8 = I - I % 8;
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
         a3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i < I32; i += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), load_half8(w + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), load_half8(w + i + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 16), load_half8(w + i + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 24), load_half8(w + i + 24), a3);
  }
  for (; i < I8; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), load_half8(w + i), a0);
  float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < I; ++i) s += x[i] * half_to_float(w[i]);
  return s;
}

at::Tensor matvec_f16(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "matvec_f16: x and w must be 2-D, got ", x.dim(),
              "-D and ", w.dim(), "-D");
  TORCH_CHECK(x.size(1) == w.size(1), "matvec_f16: x has ", x.size(1), " columns, w has ",
              w.size(1));
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kHalf,
              "matvec_f16: x must be float32 and w float16");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "matvec_f16: CPU tensors only");
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = w.contiguous();
  const int64_t N = xc.size(0), I = xc.size(1), O = wc.size(0);
  at::Tensor y = at::empty({N, O}, xc.options());
  const float* X = xc.data_ptr<float>();
  const uint16_t* W = reinterpret_cast<const uint16_t*>(wc.data_ptr<at::Half>());
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, O, 64, [&](int64_t o_begin, int64_t o_end) {
    for (int64_t o = o_begin; o < o_end; ++o)
      for (int64_t n = 0; n < N; ++n) Y[n * O + o] = dot(X + n * I, W + o * I, I);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(newllm, m) { m.def("matvec_f16(Tensor x, Tensor w) -> Tensor"); }
TORCH_LIBRARY_IMPL(newllm, CPU, m) { m.impl("matvec_f16", &matvec_f16); }
