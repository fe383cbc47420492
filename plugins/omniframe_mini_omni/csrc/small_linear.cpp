// Small-batch bfloat16 linear layers for CPU decode steps: y = x @ w^T (+ bias).
//
// A decode step multiplies a few activation rows (2 per batch-parallel session, several
// sessions per engine step) by every weight matrix: matrix-vector work bound by reading the
// weights from memory. PyTorch's kernels read each weight once per activation row (or go
// through oneDNN's general GEMM); this one reads each weight row from memory once for all
// M <= 8 rows, accumulates in float32 and rounds to bfloat16 once (round to nearest even),
// like F.linear. Rows of w are split over ATen's intra-op threads.
//
// Code paths (chosen at run time with __builtin_cpu_supports, each function compiled with its
// own target attribute, so the file builds with any x86-64 compiler flags):
//   avx512bf16  AVX512-BF16 dot products (vdpbf16ps), 4 x 32 values per step.
//   avx512f     AVX-512F: bf16 widened to float32 in registers (a bf16 is the top half of a
//               float32: shift left 16 / mask the high half), float32 FMA; two weight rows
//               per pass over the activations (half the activation loads).
//   avx2        AVX2 + FMA: the same widening with 256-bit registers, one weight row at a
//               time.
// Within one path, row m's output does not depend on M (the rows sharing the pass): every
// row runs the same sequence of operations in the same order; rows are processed in register
// groups of at most 4 (avx2: 2), later groups re-reading the weight row from L1.
//
// Built at first use by omniframe_mini_omni.kernels (torch.utils.cpp_extension);
// `supported_paths()` says which paths this CPU runs, best first.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr int kMaxRows = 8;

// the dot-product bodies are inlined into the row loops: accumulators stay in registers
#define OMNI_INLINE inline __attribute__((always_inline))

// The first register group of each weight row prefetches the row kPrefetchRows ahead (into
// L1, a cache line per 64 bytes read): a core then streams ~20 % more bytes per second than
// with the hardware prefetchers alone (2-core Xeon, one thread). No effect on the results.
constexpr int64_t kPrefetchRows = 2;

// Rows [n0, n1) of w: out[m] = dot(x row m, w row n) for the M rows, then bias, rounding.
inline void store_row(const float* dots, int M, const uint16_t* bias, uint16_t* y, int64_t N,
                      int64_t n) {
  float b = 0.f;
  if (bias != nullptr) {
    uint32_t u = uint32_t(bias[n]) << 16;
    std::memcpy(&b, &u, 4);
  }
  for (int m = 0; m < M; ++m) {
    c10::BFloat16 out(dots[m] + b);  // round to nearest even
    y[m * N + n] = out.x;
  }
}

// ------------------------------------------------------------------ AVX512-BF16

#define OMNI_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

constexpr int kAcc = 4;     // independent accumulators per row (k split)
constexpr int kChunk = 32;  // bf16 values per 512-bit register

// dots of G rows of x (bf16, K apart) with one weight row; K % 32 == 0.
template <int G, bool PF>
OMNI_BF16 OMNI_INLINE void bf16_dots(const uint16_t* x, const uint16_t* row, int64_t K, float* out,
                                     const char* pf) {
  __m512 acc[G][kAcc];
  for (int m = 0; m < G; ++m)
    for (int a = 0; a < kAcc; ++a) acc[m][a] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + kChunk * kAcc <= K; k += kChunk * kAcc) {
    if constexpr (PF)
      for (int a = 0; a < kAcc; ++a) _mm_prefetch(pf + 2 * (k + kChunk * a), _MM_HINT_T0);
    for (int a = 0; a < kAcc; ++a) {
      __m512bh wv = (__m512bh)_mm512_loadu_si512(row + k + kChunk * a);
      for (int m = 0; m < G; ++m) {
        __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k + kChunk * a);
        acc[m][a] = _mm512_dpbf16_ps(acc[m][a], xv, wv);
      }
    }
  }
  for (; k < K; k += kChunk) {
    __m512bh wv = (__m512bh)_mm512_loadu_si512(row + k);
    for (int m = 0; m < G; ++m) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xv, wv);
    }
  }
  for (int m = 0; m < G; ++m) {
    __m512 s = acc[m][0];
    for (int a = 1; a < kAcc; ++a) s = _mm512_add_ps(s, acc[m][a]);
    out[m] = _mm512_reduce_add_ps(s);
  }
}

template <int M>
OMNI_BF16 void bf16_rows(const uint16_t* x, const uint16_t* w, const uint16_t* bias,
                         uint16_t* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  float dots[kMaxRows];
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* row = w + n * K;
    const char* pf = reinterpret_cast<const char*>(row + kPrefetchRows * K);
    if constexpr (M <= 4) {
      bf16_dots<M, true>(x, row, K, dots, pf);
    } else {
      bf16_dots<4, true>(x, row, K, dots, pf);
      bf16_dots<M - 4, false>(x + 4 * K, row, K, dots + 4, nullptr);
    }
    store_row(dots, M, bias, y, N, n);
  }
}

// ------------------------------------------------------------------ AVX-512F (no BF16)

#define OMNI_F512 __attribute__((target("avx512f")))

// x (M*K bf16) -> float32, each 32-value chunk stored as [16 even | 16 odd] values, the
// order the weight chunks are widened in below.
OMNI_F512 void widen_x512(const uint16_t* x, float* xf, int64_t n) {
  const __m512i hi = _mm512_set1_epi32(int(0xFFFF0000u));
  for (int64_t i = 0; i < n; i += 32) {
    __m512i v = _mm512_loadu_si512(x + i);
    _mm512_storeu_si512(xf + i, _mm512_slli_epi32(v, 16));
    _mm512_storeu_si512(xf + i + 16, _mm512_and_si512(v, hi));
  }
}

// dots of G rows of xf with NW (1 or 2) weight rows; per (row, weight row) two accumulators
// (even / odd values), summed over 32-value chunks in order.
template <int G, int NW, bool PF>
OMNI_F512 OMNI_INLINE void f512_dots(const float* xf, const uint16_t* row, int64_t K, float* out,
                                     const char* pf) {
  const __m512i hi = _mm512_set1_epi32(int(0xFFFF0000u));
  __m512 acc[NW][G][2];
  for (int j = 0; j < NW; ++j)
    for (int m = 0; m < G; ++m) acc[j][m][0] = acc[j][m][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512 we[NW], wo[NW];
    for (int j = 0; j < NW; ++j) {
      if constexpr (PF) _mm_prefetch(pf + 2 * (j * K + k), _MM_HINT_T0);
      __m512i wv = _mm512_loadu_si512(row + j * K + k);
      we[j] = _mm512_castsi512_ps(_mm512_slli_epi32(wv, 16));
      wo[j] = _mm512_castsi512_ps(_mm512_and_si512(wv, hi));
    }
    for (int m = 0; m < G; ++m) {
      __m512 xe = _mm512_loadu_ps(xf + m * K + k);
      __m512 xo = _mm512_loadu_ps(xf + m * K + k + 16);
      for (int j = 0; j < NW; ++j) {
        acc[j][m][0] = _mm512_fmadd_ps(xe, we[j], acc[j][m][0]);
        acc[j][m][1] = _mm512_fmadd_ps(xo, wo[j], acc[j][m][1]);
      }
    }
  }
  for (int j = 0; j < NW; ++j)
    for (int m = 0; m < G; ++m)
      out[j * kMaxRows + m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[j][m][0], acc[j][m][1]));
}

template <int M, int NW>
OMNI_F512 OMNI_INLINE void f512_block(const float* xf, const uint16_t* row, int64_t K,
                                      float* dots) {
  const char* pf = reinterpret_cast<const char*>(row + kPrefetchRows * K);
  if constexpr (M <= 4) {
    f512_dots<M, NW, true>(xf, row, K, dots, pf);
  } else {
    f512_dots<4, NW, true>(xf, row, K, dots, pf);
    f512_dots<M - 4, NW, false>(xf + 4 * K, row, K, dots + 4, nullptr);
  }
}

template <int M>
OMNI_F512 void f512_rows(const float* xf, const uint16_t* w, const uint16_t* bias, uint16_t* y,
                         int64_t K, int64_t N, int64_t n0, int64_t n1) {
  float dots[2 * kMaxRows];
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) {
    f512_block<M, 2>(xf, w + n * K, K, dots);
    store_row(dots, M, bias, y, N, n);
    store_row(dots + kMaxRows, M, bias, y, N, n + 1);
  }
  if (n < n1) {
    f512_block<M, 1>(xf, w + n * K, K, dots);
    store_row(dots, M, bias, y, N, n);
  }
}

// ------------------------------------------------------------------ AVX2 + FMA

#define OMNI_AVX2 __attribute__((target("avx2,fma")))

// as widen_x512 with 16-value chunks: [8 even | 8 odd]
OMNI_AVX2 void widen_x256(const uint16_t* x, float* xf, int64_t n) {
  const __m256i hi = _mm256_set1_epi32(int(0xFFFF0000u));
  for (int64_t i = 0; i < n; i += 16) {
    __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xf + i), _mm256_slli_epi32(v, 16));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xf + i + 8), _mm256_and_si256(v, hi));
  }
}

OMNI_AVX2 OMNI_INLINE float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// dots of G (<= 2) rows; per row 4 accumulators: even/odd values of two 16-value chunks.
template <int G, bool PF>
OMNI_AVX2 OMNI_INLINE void f256_dots(const float* xf, const uint16_t* row, int64_t K, float* out,
                                     const char* pf) {
  const __m256i hi = _mm256_set1_epi32(int(0xFFFF0000u));
  __m256 acc[G][4];
  for (int m = 0; m < G; ++m)
    for (int a = 0; a < 4; ++a) acc[m][a] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {  // K % 32 == 0: no tail
    if constexpr (PF) _mm_prefetch(pf + 2 * k, _MM_HINT_T0);
    for (int c = 0; c < 2; ++c) {
      __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k + 16 * c));
      __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(wv, 16));
      __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(wv, hi));
      for (int m = 0; m < G; ++m) {
        const float* xp = xf + m * K + k + 16 * c;
        acc[m][2 * c] = _mm256_fmadd_ps(_mm256_loadu_ps(xp), we, acc[m][2 * c]);
        acc[m][2 * c + 1] = _mm256_fmadd_ps(_mm256_loadu_ps(xp + 8), wo, acc[m][2 * c + 1]);
      }
    }
  }
  for (int m = 0; m < G; ++m) {
    __m256 s = _mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]),
                             _mm256_add_ps(acc[m][2], acc[m][3]));
    out[m] = hsum256(s);
  }
}

template <int M>
OMNI_AVX2 void f256_rows(const float* xf, const uint16_t* w, const uint16_t* bias, uint16_t* y,
                         int64_t K, int64_t N, int64_t n0, int64_t n1) {
  float dots[kMaxRows];
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* row = w + n * K;
    const char* pf = reinterpret_cast<const char*>(row + kPrefetchRows * K);
    if constexpr (M == 1) {
      f256_dots<1, true>(xf, row, K, dots, pf);
    } else {
      f256_dots<2, true>(xf, row, K, dots, pf);
      int m = 2;
      for (; m + 2 <= M; m += 2) f256_dots<2, false>(xf + m * K, row, K, dots + m, nullptr);
      if (m < M) f256_dots<1, false>(xf + m * K, row, K, dots + m, nullptr);
    }
    store_row(dots, M, bias, y, N, n);
  }
}

// ------------------------------------------------------------------ dispatch

enum class Path { kBf16, kF512, kF256 };

bool cpu_has(Path p) {
  switch (p) {
    case Path::kBf16:
      return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
    case Path::kF512:
      return __builtin_cpu_supports("avx512f");
    case Path::kF256:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }
  return false;
}

const char* path_name(Path p) {
  switch (p) {
    case Path::kBf16: return "avx512bf16";
    case Path::kF512: return "avx512f";
    case Path::kF256: return "avx2";
  }
  return "?";
}

constexpr Path kPaths[] = {Path::kBf16, Path::kF512, Path::kF256};

template <int M>
void run(Path p, const uint16_t* x, const float* xf, const uint16_t* w, const uint16_t* bias,
         uint16_t* y, int64_t K, int64_t N) {
  // at least 64 rows per thread: fewer is not worth a wake-up
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    switch (p) {
      case Path::kBf16: bf16_rows<M>(x, w, bias, y, K, N, n0, n1); break;
      case Path::kF512: f512_rows<M>(xf, w, bias, y, K, N, n0, n1); break;
      case Path::kF256: f256_rows<M>(xf, w, bias, y, K, N, n0, n1); break;
    }
  });
}

}  // namespace

std::vector<std::string> supported_paths() {
  std::vector<std::string> out;
  for (Path p : kPaths)
    if (cpu_has(p)) out.emplace_back(path_name(p));
  return out;
}

bool available() { return !supported_paths().empty(); }

int64_t max_rows() { return kMaxRows; }

// x (M, K) bf16 contiguous, M in 1..8; w (N, K) bf16 contiguous; bias (N) bf16 or None;
// path: one of supported_paths().
torch::Tensor small_linear(const torch::Tensor& x, const torch::Tensor& w,
                           const c10::optional<torch::Tensor>& bias, const std::string& path) {
  Path p = Path::kBf16;
  bool known = false;
  for (Path q : kPaths)
    if (path == path_name(q)) p = q, known = true;
  TORCH_CHECK(known, "small_linear: unknown code path '", path,
              "' (one of avx512bf16, avx512f, avx2)");
  TORCH_CHECK(cpu_has(p), "small_linear: this CPU cannot run the ", path,
              " path; it runs: ", c10::Join(", ", supported_paths()));
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "small_linear: x and w must be 2-D, got ",
              x.dim(), "-D and ", w.dim(), "-D");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "small_linear: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16,
              "small_linear: bfloat16 only, got x ", x.scalar_type(), " and w ",
              w.scalar_type(), " (use F.linear for other dtypes)");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "small_linear: contiguous inputs only");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K, "small_linear: x is (", M, ", ", K, "), w is ", w.sizes());
  TORCH_CHECK(K % kChunk == 0 && K > 0, "small_linear: K must be a positive multiple of 32, got ",
              K);
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "small_linear: 1 to ", kMaxRows, " rows, got ", M,
              " (split larger batches)");
  const uint16_t* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->is_contiguous() &&
                    bias->dim() == 1 && bias->numel() == N,
                "small_linear: bias must be a contiguous bfloat16 vector of ", N);
    bp = reinterpret_cast<const uint16_t*>(bias->data_ptr());
  }
  auto y = torch::empty({M, N}, x.options());
  if (N == 0) return y;
  auto xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  auto wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  auto yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  torch::Tensor xf;  // widened activations for the float32 paths
  const float* xfp = nullptr;
  if (p != Path::kBf16) {
    xf = torch::empty({M * K}, x.options().dtype(at::kFloat));
    auto f = xf.data_ptr<float>();
    if (p == Path::kF512)
      widen_x512(xp, f, M * K);
    else
      widen_x256(xp, f, M * K);
    xfp = f;
  }
  switch (M) {
    case 1: run<1>(p, xp, xfp, wp, bp, yp, K, N); break;
    case 2: run<2>(p, xp, xfp, wp, bp, yp, K, N); break;
    case 3: run<3>(p, xp, xfp, wp, bp, yp, K, N); break;
    case 4: run<4>(p, xp, xfp, wp, bp, yp, K, N); break;
    case 5: run<5>(p, xp, xfp, wp, bp, yp, K, N); break;
    case 6: run<6>(p, xp, xfp, wp, bp, yp, K, N); break;
    case 7: run<7>(p, xp, xfp, wp, bp, yp, K, N); break;
    default: run<8>(p, xp, xfp, wp, bp, yp, K, N); break;
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "whether this CPU runs any of the kernel's code paths");
  m.def("supported_paths", &supported_paths, "the code paths this CPU runs, best first");
  m.def("max_rows", &max_rows, "most activation rows per call");
  m.def("small_linear", &small_linear, "y = x @ w.T (+ bias) for 1 to 8 bfloat16 rows",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("bias") = pybind11::none(),
        pybind11::arg("path") = std::string("avx512bf16"));
}
