// Small-batch bfloat16 linear layers for CPU decode steps: y = x @ w^T (+ bias).
//
// A decode step of batch-parallel Mini-Omni multiplies 1 or 2 activation rows by every weight
// matrix: matrix-vector work bound by reading the weights from memory. PyTorch's kernels read
// each weight once per activation row (or go through oneDNN's general GEMM); this one reads
// each weight row once for all M <= 4 rows, with AVX512-BF16 dot products (vdpbf16ps) and
// float32 accumulation, rows split over ATen's intra-op threads. The result is rounded to
// bfloat16 once (round to nearest even), like F.linear.
//
// Built at first use by omniframe_mini_omni.kernels (torch.utils.cpp_extension); the kernel is
// compiled for AVX512-BF16 and `available()` says whether this CPU can run it.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace {

constexpr int kAcc = 4;       // independent accumulators per row (k split)
constexpr int kChunk = 32;    // bf16 values per 512-bit register

#define OMNI_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

// rows [n0, n1) of w (N, K) against the M rows of x (M, K); K % 32 == 0.
template <int M>
OMNI_TARGET void rows_kernel(const uint16_t* x, const uint16_t* w, const uint16_t* bias,
                             uint16_t* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* row = w + n * K;
    __m512 acc[M][kAcc];
    for (int m = 0; m < M; ++m)
      for (int a = 0; a < kAcc; ++a) acc[m][a] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + kChunk * kAcc <= K; k += kChunk * kAcc) {
      for (int a = 0; a < kAcc; ++a) {
        __m512bh wv = (__m512bh)_mm512_loadu_si512(row + k + kChunk * a);
        for (int m = 0; m < M; ++m) {
          __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k + kChunk * a);
          acc[m][a] = _mm512_dpbf16_ps(acc[m][a], xv, wv);
        }
      }
    }
    for (; k < K; k += kChunk) {
      __m512bh wv = (__m512bh)_mm512_loadu_si512(row + k);
      for (int m = 0; m < M; ++m) {
        __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xv, wv);
      }
    }
    float b = 0.f;
    if (bias != nullptr) {
      uint32_t u = uint32_t(bias[n]) << 16;
      std::memcpy(&b, &u, 4);
    }
    for (int m = 0; m < M; ++m) {
      __m512 s = acc[m][0];
      for (int a = 1; a < kAcc; ++a) s = _mm512_add_ps(s, acc[m][a]);
      c10::BFloat16 out(_mm512_reduce_add_ps(s) + b);  // round to nearest even
      y[m * N + n] = out.x;
    }
  }
}

template <int M>
void run(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y, int64_t K,
         int64_t N) {
  // at least 64 rows per thread: fewer is not worth a wake-up
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    rows_kernel<M>(x, w, bias, y, K, N, n0, n1);
  });
}

}  // namespace

bool available() { return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw"); }

// x (M, K) bf16 contiguous, M in 1..4; w (N, K) bf16 contiguous; bias (N) bf16 or None.
torch::Tensor small_linear(const torch::Tensor& x, const torch::Tensor& w,
                           const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(available(), "small_linear: this CPU has no AVX512-BF16");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "small_linear: x and w must be 2-D");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16,
              "small_linear: bfloat16 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "small_linear: contiguous inputs only");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K, "small_linear: x is (", M, ", ", K, "), w is ", w.sizes());
  TORCH_CHECK(K % kChunk == 0, "small_linear: K must be a multiple of 32, got ", K);
  TORCH_CHECK(M >= 1 && M <= 4, "small_linear: 1 to 4 rows, got ", M);
  const uint16_t* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->is_contiguous() &&
                    bias->numel() == N,
                "small_linear: bias must be a contiguous bfloat16 vector of ", N);
    bp = reinterpret_cast<const uint16_t*>(bias->data_ptr());
  }
  auto y = torch::empty({M, N}, x.options());
  auto xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  auto wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  auto yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  switch (M) {
    case 1: run<1>(xp, wp, bp, yp, K, N); break;
    case 2: run<2>(xp, wp, bp, yp, K, N); break;
    case 3: run<3>(xp, wp, bp, yp, K, N); break;
    default: run<4>(xp, wp, bp, yp, K, N); break;
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "whether this CPU runs the AVX512-BF16 kernel");
  m.def("small_linear", &small_linear, "y = x @ w.T (+ bias) for 1 to 4 bfloat16 rows");
}
