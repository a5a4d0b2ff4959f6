// q4_cpu: CPU decode kernels that read packed int4 weights directly (see kernels/cpu_kernels.py).
//
//   q4_cpu::linear_w4a4(x_codes, w_packed, w_step, a_step, bias, out_dtype, force_scalar)
//   q4_cpu::linear_w4a16(x, w_packed, w_step, bias, out_dtype, force_scalar)
//   q4_cpu::hadamard(x, n, force_scalar)
//
// Packed layout: uint8 [N, Kp = ceil(K/2)], byte j of row n holds code k=2j in its low nibble
// and k=2j+1 in its high nibble, 4-bit two's complement.
//
// W4A4 (AVX512-VNNI): `vpdpbusd` multiplies unsigned bytes by signed bytes. XOR with 0x88 turns
// both nibbles of a byte into code + 8 in 0..15 (unsigned), so
//     sum_k (w + 8) * x = sum_k w * x + 8 * sum_k x
// and the exact dot product is the vpdpbusd sum minus 8 * sum(x) of the activation row. The
// activation codes are split once per call into even-k and odd-k int8 vectors (zero padded to
// a multiple of 64 bytes), matching the low and high nibbles of 64 weight bytes. A tile of
// NB weight columns is unpacked once per K step and used for MB activation rows held in
// registers, so weights stream from memory once per call. Epilogue in float32, in the same
// order as kernels/reference.py::epilogue: float(acc) * (a_step * w_step[n]) + float(bias[n]).
//
// W4A16 (AVX512F): float32 FMA of the activation (even/odd split the same way) against the
// sign-extended nibbles converted to float32; then * w_step[n] + bias[n].

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kChunk = 64;  // packed bytes per K step (128 codes)
constexpr int64_t kPrefetch = 1024;  // bytes ahead in each weight row: DRAM latency (measured +25..50% at M=1)

int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// ---- argument checks (dtype and shape; values were checked by the q4:: ops that call these) ----

void check_common(const char* op, const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_step,
                  const c10::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  TORCH_CHECK(x.dim() >= 1, "q4_cpu::", op, ": argument 'x' must be a tensor [..., K], got a 0-dim tensor");
  TORCH_CHECK(w_packed.scalar_type() == at::kByte && w_packed.dim() == 2, "q4_cpu::", op,
              ": argument 'w_packed' must be a 2-D uint8 tensor [N, ceil(K/2)], got ", w_packed.scalar_type(),
              " tensor of shape ", w_packed.sizes());
  const int64_t k = x.size(-1);
  TORCH_CHECK(w_packed.size(1) == (k + 1) / 2, "q4_cpu::", op, ": argument 'w_packed' must have ceil(K/2) = ",
              (k + 1) / 2, " bytes a row for K = ", k, ", got ", w_packed.size(1));
  const int64_t n = w_packed.size(0);
  TORCH_CHECK(w_step.scalar_type() == at::kFloat && w_step.dim() == 1 && w_step.size(0) == n, "q4_cpu::", op,
              ": argument 'w_step' must be a float32 tensor of shape (", n, ",), got ", w_step.scalar_type(),
              " tensor of shape ", w_step.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(at::isFloatingType(bias->scalar_type()) && bias->dim() == 1 && bias->size(0) == n, "q4_cpu::", op,
                ": argument 'bias' must be None or a float tensor of shape (", n, ",), got ", bias->scalar_type(),
                " tensor of shape ", bias->sizes());
  }
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16, "q4_cpu::", op,
              ": argument 'out_dtype' must be float32, float16 or bfloat16, got ", out_dtype);
  for (const at::Tensor* t : {&x, &w_packed, &w_step}) {
    TORCH_CHECK(t->device().is_cpu(), "q4_cpu::", op, ": all tensors must be on the CPU, got one on ", t->device());
  }
  TORCH_CHECK(!bias.has_value() || bias->device().is_cpu(), "q4_cpu::", op, ": argument 'bias' must be on the CPU");
}

// The activation split by parity of k, zero padded to kpad entries each: row m is
// [even k (kpad) | odd k (kpad)]. T is int8 (codes) or float.
template <typename T>
std::vector<T> split_even_odd(const T* x, int64_t m, int64_t k, int64_t kpad) {
  std::vector<T> out(static_cast<size_t>(m * 2 * kpad), T(0));
  for (int64_t r = 0; r < m; ++r) {
    const T* src = x + r * k;
    T* even = out.data() + r * 2 * kpad;
    T* odd = even + kpad;
    for (int64_t i = 0; i < k; ++i) (i % 2 ? odd : even)[i / 2] = src[i];
  }
  return out;
}

// Final float32 values of rows [0, m) and columns [n0, n1) into out (float32, row stride n).
struct Epilogue {
  const float* scale;  // a_step * w_step[n] (w4a4) or w_step[n] (w4a16), rounded once
  const float* bias;   // float32 [N] or nullptr
  float* out;
  int64_t n;
  inline void store(int64_t r, int64_t c, float value) const {
    float v = value * scale[c];
    if (bias) v = v + bias[c];
    out[r * n + c] = v;
  }
};

// ---- W4A4 --------------------------------------------------------------------------------------

void w4a4_scalar(const int8_t* xs, const int32_t* xsum, const uint8_t* w, int64_t m, int64_t kp, int64_t kpad,
                 int64_t n0, int64_t n1, const Epilogue& ep) {
  (void)xsum;
  for (int64_t c = n0; c < n1; ++c) {
    const uint8_t* row = w + c * kp;
    for (int64_t r = 0; r < m; ++r) {
      const int8_t* even = xs + r * 2 * kpad;
      const int8_t* odd = even + kpad;
      int32_t acc = 0;
      for (int64_t j = 0; j < kp; ++j) {
        const int8_t b = static_cast<int8_t>(row[j]);
        const int32_t lo = static_cast<int8_t>(static_cast<uint8_t>(b << 4)) >> 4;  // sign-extend low nibble
        const int32_t hi = b >> 4;                                                   // arithmetic shift
        acc += lo * even[j] + hi * odd[j];
      }
      ep.store(r, c, static_cast<float>(acc));
    }
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) inline int32_t hsum_epi32(__m512i v) {
  return _mm512_reduce_add_epi32(v);
}

// MB activation rows x NB weight columns, all of K, accumulators in registers.
template <int MB, int NB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void w4a4_tile_vnni(
    const int8_t* xs, const int32_t* xsum, const uint8_t* w, int64_t kp, int64_t kpad, int64_t r0, int64_t c0,
    const Epilogue& ep) {
  __m512i acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x88));
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int64_t off = 0; off < kp; off += kChunk) {
    // the last step of a row reads only its own bytes; the masked-off bytes become nibbles of 8,
    // which meet the zero padding of the activation
    const __mmask64 mask = kp - off >= kChunk ? ~__mmask64(0) : (__mmask64(1) << (kp - off)) - 1;
    __m512i lo[NB], hi[NB];
    for (int j = 0; j < NB; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (c0 + j) * kp + off + kPrefetch), _MM_HINT_T0);
      const __m512i b = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, w + (c0 + j) * kp + off), flip);
      lo[j] = _mm512_and_si512(b, low4);
      hi[j] = _mm512_and_si512(_mm512_srli_epi16(b, 4), low4);
    }
    for (int i = 0; i < MB; ++i) {
      const int8_t* even = xs + (r0 + i) * 2 * kpad + off;
      const __m512i xe = _mm512_loadu_si512(even);
      const __m512i xo = _mm512_loadu_si512(even + kpad);
      for (int j = 0; j < NB; ++j) {
        acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], lo[j], xe);
        acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], hi[j], xo);
      }
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j)
      ep.store(r0 + i, c0 + j, static_cast<float>(hsum_epi32(acc[i][j]) - 8 * xsum[r0 + i]));
}

template <int NB>
void w4a4_rows_vnni(const int8_t* xs, const int32_t* xsum, const uint8_t* w, int64_t m, int64_t kp, int64_t kpad,
                    int64_t c0, const Epilogue& ep) {
  // rows in groups of 4: 4 x NB accumulators + 2 x NB unpacked weights + 2 activations fit the 32 zmm
  int64_t r = 0;
  for (; r + 4 <= m; r += 4) w4a4_tile_vnni<4, NB>(xs, xsum, w, kp, kpad, r, c0, ep);
  switch (m - r) {
    case 3: w4a4_tile_vnni<3, NB>(xs, xsum, w, kp, kpad, r, c0, ep); break;
    case 2: w4a4_tile_vnni<2, NB>(xs, xsum, w, kp, kpad, r, c0, ep); break;
    case 1: w4a4_tile_vnni<1, NB>(xs, xsum, w, kp, kpad, r, c0, ep); break;
    default: break;
  }
}

void w4a4_vnni(const int8_t* xs, const int32_t* xsum, const uint8_t* w, int64_t m, int64_t kp, int64_t kpad,
               int64_t n0, int64_t n1, const Epilogue& ep) {
  int64_t c = n0;
  for (; c + 4 <= n1; c += 4) w4a4_rows_vnni<4>(xs, xsum, w, m, kp, kpad, c, ep);
  for (; c < n1; ++c) w4a4_rows_vnni<1>(xs, xsum, w, m, kp, kpad, c, ep);
}

// ---- W4A16 -------------------------------------------------------------------------------------

void w4a16_scalar(const float* xs, const uint8_t* w, int64_t m, int64_t kp, int64_t kpad, int64_t n0, int64_t n1,
                  const Epilogue& ep) {
  for (int64_t c = n0; c < n1; ++c) {
    const uint8_t* row = w + c * kp;
    for (int64_t r = 0; r < m; ++r) {
      const float* even = xs + r * 2 * kpad;
      const float* odd = even + kpad;
      float acc = 0.f;
      for (int64_t j = 0; j < kp; ++j) {
        const int8_t b = static_cast<int8_t>(row[j]);
        const int lo = static_cast<int8_t>(static_cast<uint8_t>(b << 4)) >> 4;
        const int hi = b >> 4;
        acc += even[j] * static_cast<float>(lo);
        acc += odd[j] * static_cast<float>(hi);
      }
      ep.store(r, c, acc);
    }
  }
}

// MB rows x NB columns; a K step is 16 packed bytes (32 codes).
template <int MB, int NB>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void w4a16_tile_avx512(const float* xs, const uint8_t* w,
                                                                          int64_t kp, int64_t kpad, int64_t r0,
                                                                          int64_t c0, const Epilogue& ep) {
  __m512 acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t off = 0; off < kp; off += 16) {
    const __mmask16 mask = kp - off >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (kp - off)) - 1);
    __m512 lo[NB], hi[NB];
    if ((off & (kChunk - 1)) == 0)  // one prefetch a cache line
      for (int j = 0; j < NB; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(w + (c0 + j) * kp + off + kPrefetch), _MM_HINT_T0);
    for (int j = 0; j < NB; ++j) {
      // each byte sign-extended to int32, then the nibbles sign-extended by shifts
      const __m512i b = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, w + (c0 + j) * kp + off));
      lo[j] = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(b, 28), 28));
      hi[j] = _mm512_cvtepi32_ps(_mm512_srai_epi32(b, 4));
    }
    for (int i = 0; i < MB; ++i) {
      const float* even = xs + (r0 + i) * 2 * kpad + off;
      const __m512 xe = _mm512_loadu_ps(even);
      const __m512 xo = _mm512_loadu_ps(even + kpad);
      for (int j = 0; j < NB; ++j) {
        acc[i][j] = _mm512_fmadd_ps(xe, lo[j], acc[i][j]);
        acc[i][j] = _mm512_fmadd_ps(xo, hi[j], acc[i][j]);
      }
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) ep.store(r0 + i, c0 + j, _mm512_reduce_add_ps(acc[i][j]));
}

template <int NB>
void w4a16_rows_avx512(const float* xs, const uint8_t* w, int64_t m, int64_t kp, int64_t kpad, int64_t c0,
                       const Epilogue& ep) {
  int64_t r = 0;
  for (; r + 4 <= m; r += 4) w4a16_tile_avx512<4, NB>(xs, w, kp, kpad, r, c0, ep);
  switch (m - r) {
    case 3: w4a16_tile_avx512<3, NB>(xs, w, kp, kpad, r, c0, ep); break;
    case 2: w4a16_tile_avx512<2, NB>(xs, w, kp, kpad, r, c0, ep); break;
    case 1: w4a16_tile_avx512<1, NB>(xs, w, kp, kpad, r, c0, ep); break;
    default: break;
  }
}

void w4a16_avx512(const float* xs, const uint8_t* w, int64_t m, int64_t kp, int64_t kpad, int64_t n0, int64_t n1,
                  const Epilogue& ep) {
  int64_t c = n0;
  for (; c + 4 <= n1; c += 4) w4a16_rows_avx512<4>(xs, w, m, kp, kpad, c, ep);
  for (; c < n1; ++c) w4a16_rows_avx512<1>(xs, w, m, kp, kpad, c, ep);
}

// ---- dispatch ----------------------------------------------------------------------------------

bool has_vnni() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return yes;
}

bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return yes;
}

// Output [..., N] in out_dtype from a float32 [M, N] buffer (the cast rounds like Tensor.to).
at::Tensor finish(at::Tensor out32, const at::Tensor& x, int64_t n, at::ScalarType out_dtype) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(n);
  if (out_dtype != at::kFloat) out32 = out32.to(out_dtype);
  return out32.view(shape);
}

// Columns split among threads; each task takes whole tiles of 4 columns so the split does not
// fall back to single-column tiles in the middle.
template <typename F>
void over_columns(int64_t n, int64_t kp, F&& body) {
  const int64_t tiles = (n + 3) / 4;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(kp, 1));  // >= ~16 KB of weights a task
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) { body(t0 * 4, std::min(n, t1 * 4)); });
}

at::Tensor linear_w4a4(const at::Tensor& x_codes, const at::Tensor& w_packed, const at::Tensor& w_step,
                       const at::Tensor& a_step, const c10::optional<at::Tensor>& bias, at::ScalarType out_dtype,
                       bool force_scalar) {
  check_common("linear_w4a4", x_codes, w_packed, w_step, bias, out_dtype);
  TORCH_CHECK(x_codes.scalar_type() == at::kChar, "q4_cpu::linear_w4a4: argument 'x_codes' must be an int8 tensor "
              "[..., K] of activation codes, got ", x_codes.scalar_type());
  TORCH_CHECK(a_step.scalar_type() == at::kFloat && a_step.dim() == 0,
              "q4_cpu::linear_w4a4: argument 'a_step' must be a 0-dim float32 tensor, got ", a_step.scalar_type(),
              " tensor of shape ", a_step.sizes());
  const int64_t k = x_codes.size(-1), n = w_packed.size(0), kp = w_packed.size(1);
  const int64_t m = c10::multiply_integers(x_codes.sizes().begin(), x_codes.sizes().end() - 1);
  at::Tensor out32 = at::empty({m, n}, x_codes.options().dtype(at::kFloat));
  if (m == 0 || n == 0) return finish(out32, x_codes, n, out_dtype);

  const at::Tensor x = x_codes.contiguous(), w = w_packed.contiguous();
  const int64_t kpad = round_up(std::max<int64_t>(kp, 1), kChunk);
  const int8_t* xp = x.data_ptr<int8_t>();  // hoisted: data_ptr() checks the dtype at every call
  const std::vector<int8_t> xs = split_even_odd(xp, m, k, kpad);
  std::vector<int32_t> xsum(static_cast<size_t>(m), 0);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t i = 0; i < k; ++i) xsum[r] += xp[r * k + i];
  // the epilogue's scale, rounded once to float32 like `a_step * w_step` in the reference (one
  // IEEE multiply each, here rather than an ATen op: a few µs a call at decode)
  const at::Tensor w_step32 = w_step.contiguous();
  const float* wsp = w_step32.data_ptr<float>();
  const float a = a_step.item<float>();
  std::vector<float> scale(static_cast<size_t>(n));
  for (int64_t c = 0; c < n; ++c) scale[c] = a * wsp[c];
  const at::Tensor bias32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const Epilogue ep{scale.data(), bias32.defined() ? bias32.data_ptr<float>() : nullptr, out32.data_ptr<float>(), n};
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const bool vnni = has_vnni() && !force_scalar;
  over_columns(n, kp, [&](int64_t n0, int64_t n1) {
    if (vnni) w4a4_vnni(xs.data(), xsum.data(), wp, m, kp, kpad, n0, n1, ep);
    else w4a4_scalar(xs.data(), xsum.data(), wp, m, kp, kpad, n0, n1, ep);
  });
  return finish(out32, x_codes, n, out_dtype);
}

at::Tensor linear_w4a16(const at::Tensor& x_in, const at::Tensor& w_packed, const at::Tensor& w_step,
                        const c10::optional<at::Tensor>& bias, at::ScalarType out_dtype, bool force_scalar) {
  check_common("linear_w4a16", x_in, w_packed, w_step, bias, out_dtype);
  TORCH_CHECK(at::isFloatingType(x_in.scalar_type()), "q4_cpu::linear_w4a16: argument 'x' must be a float tensor "
              "[..., K], got ", x_in.scalar_type());
  const int64_t k = x_in.size(-1), n = w_packed.size(0), kp = w_packed.size(1);
  const int64_t m = c10::multiply_integers(x_in.sizes().begin(), x_in.sizes().end() - 1);
  at::Tensor out32 = at::empty({m, n}, x_in.options().dtype(at::kFloat));
  if (m == 0 || n == 0) return finish(out32, x_in, n, out_dtype);

  const at::Tensor x = x_in.to(at::kFloat).contiguous(), w = w_packed.contiguous();
  const int64_t kpad = round_up(std::max<int64_t>(kp, 1), 16);
  const std::vector<float> xs = split_even_odd(x.data_ptr<float>(), m, k, kpad);
  const at::Tensor bias32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor scale = w_step.contiguous();
  const Epilogue ep{scale.data_ptr<float>(), bias32.defined() ? bias32.data_ptr<float>() : nullptr,
                    out32.data_ptr<float>(), n};
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const bool simd = has_avx512() && !force_scalar;
  over_columns(n, kp, [&](int64_t n0, int64_t n1) {
    if (simd) w4a16_avx512(xs.data(), wp, m, kp, kpad, n0, n1, ep);
    else w4a16_scalar(xs.data(), wp, m, kp, kpad, n0, n1, ep);
  });
  return finish(out32, x_in, n, out_dtype);
}

// ---- Walsh-Hadamard transform: the power-of-two factor of a rotation (kernels/rotation.py) ----
//
// y = x @ (H_n / sqrt(n)) on every block of n consecutive floats of x, H_n the Sylvester
// Hadamard matrix (symmetric): log2(n) passes of butterflies (a, b) -> (a + b, a - b), then one
// multiply by 1/sqrt(n). n log2(n) additions a block instead of the n * n multiply-adds of a
// GEMM with H_n. The AVX512 code runs the passes with h < 16 inside each 16-float vector
// (v' = swap_h(v) + sign_h * v) and computes every value with the same two operands as the
// scalar loop, so both give the same bits.

void hadamard_scalar(const float* src, float* v, int64_t n, float norm) {
  std::memcpy(v, src, static_cast<size_t>(n) * sizeof(float));
  for (int64_t h = 1; h < n; h *= 2) {
    for (int64_t i = 0; i < n; i += 2 * h) {
      for (int64_t j = i; j < i + h; ++j) {
        const float a = v[j], b = v[j + h];
        v[j] = a + b;
        v[j + h] = a - b;
      }
    }
  }
  for (int64_t j = 0; j < n; ++j) v[j] *= norm;
}

__attribute__((target("avx512f"))) void hadamard_avx512(const float* src, float* v, int64_t n, float norm) {  // n >= 16
  __m512i swap[4];
  __m512 sign[4];
  for (int s = 0; s < 4; ++s) {
    alignas(64) int32_t idx[16];
    alignas(64) float sg[16];
    for (int i = 0; i < 16; ++i) {
      idx[i] = i ^ (1 << s);
      sg[i] = (i & (1 << s)) ? -1.0f : 1.0f;
    }
    swap[s] = _mm512_load_si512(idx);
    sign[s] = _mm512_load_ps(sg);
  }
  for (int64_t i = 0; i < n; i += 16) {
    __m512 x = _mm512_loadu_ps(src + i);
    for (int s = 0; s < 4; ++s) x = _mm512_add_ps(_mm512_permutexvar_ps(swap[s], x), _mm512_mul_ps(sign[s], x));
    _mm512_storeu_ps(v + i, x);
  }
  for (int64_t h = 16; h < n; h *= 2) {
    for (int64_t i = 0; i < n; i += 2 * h) {
      for (int64_t j = i; j < i + h; j += 16) {
        const __m512 a = _mm512_loadu_ps(v + j), b = _mm512_loadu_ps(v + j + h);
        _mm512_storeu_ps(v + j, _mm512_add_ps(a, b));
        _mm512_storeu_ps(v + j + h, _mm512_sub_ps(a, b));
      }
    }
  }
  const __m512 scale = _mm512_set1_ps(norm);
  for (int64_t j = 0; j < n; j += 16) _mm512_storeu_ps(v + j, _mm512_mul_ps(_mm512_loadu_ps(v + j), scale));
}

at::Tensor hadamard(const at::Tensor& x, int64_t n, bool force_scalar) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() >= 1, "q4_cpu::hadamard: argument 'x' must be a float32 "
              "tensor [..., K], got ", x.scalar_type(), " tensor of shape ", x.sizes());
  TORCH_CHECK(n >= 1 && (n & (n - 1)) == 0 && x.size(-1) % n == 0, "q4_cpu::hadamard: argument 'n' must be a power "
              "of two dividing K = ", x.size(-1), ", got ", n);
  TORCH_CHECK(x.device().is_cpu(), "q4_cpu::hadamard: argument 'x' must be on the CPU, got ", x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t blocks = y.numel() / n;
  const float* src = xc.data_ptr<float>();
  float* dst = y.data_ptr<float>();
  const float norm = static_cast<float>(1.0 / std::sqrt(static_cast<double>(n)));
  const bool simd = n >= 16 && has_avx512() && !force_scalar;
  const int64_t grain = std::max<int64_t>(1, 16384 / n);  // >= ~64 KB of floats a task
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      if (simd) hadamard_avx512(src + b * n, dst + b * n, n, norm);
      else hadamard_scalar(src + b * n, dst + b * n, n, norm);
    }
  });
  return y;
}

std::string isa() { return has_vnni() ? "avx512vnni" : "scalar"; }

}  // namespace

TORCH_LIBRARY(q4_cpu, m) {
  m.def("linear_w4a4(Tensor x_codes, Tensor w_packed, Tensor w_step, Tensor a_step, Tensor? bias, "
        "ScalarType out_dtype, bool force_scalar=False) -> Tensor");
  m.def("linear_w4a16(Tensor x, Tensor w_packed, Tensor w_step, Tensor? bias, ScalarType out_dtype, "
        "bool force_scalar=False) -> Tensor");
  m.def("hadamard(Tensor x, int n, bool force_scalar=False) -> Tensor");
  m.def("isa() -> str", [] { return isa(); });
}

TORCH_LIBRARY_IMPL(q4_cpu, CPU, m) {
  m.impl("linear_w4a4", &linear_w4a4);
  m.impl("linear_w4a16", &linear_w4a16);
  m.impl("hadamard", &hadamard);
}
