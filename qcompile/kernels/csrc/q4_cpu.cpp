// q4_cpu: CPU decode kernels that read packed int4 weights directly (see qcompile/kernels/cpu_kernels.py).
//
//   q4_cpu::linear_w4a4(x_codes, w_packed, w_step, a_step, bias, out_dtype, force_scalar, w_values, w_mult)
//   q4_cpu::linear_w4a16(x, w_packed, w_step, bias, out_dtype, force_scalar, w_mult)
//   q4_cpu::hadamard(x, n, force_scalar)
//   q4_cpu::kron_factor(x, factor, inner, force_scalar)
//   q4_cpu::attention(query, key, value, attn_mask, is_causal, scale, force_scalar)
//
// Packed layout: uint8 [N, Kp = ceil(K/2)], byte j of row n holds code k=2j in its low nibble
// and k=2j+1 in its high nibble, 4-bit two's complement.
//
// A nibble's value comes from a 16-entry table (`w_values`, qcompile/kernels/formats.py): int4 two's
// complement by default, or a 4-bit float's integer values (E2M1 +-12, E3M0 +-64, E1M2 +-7).
//
// W4A4 (AVX512-VNNI): `vpdpbusd` multiplies unsigned bytes by signed bytes. A byte shuffle
// (`vpshufb`) looks each nibble up in the table shifted to be unsigned, value + offset with
// offset = -min(values) (8 for int4), so
//     sum_k (w + offset) * x = sum_k w * x + offset * sum_k x
// and the exact dot product is the vpdpbusd sum minus offset * sum(x) of the activation row. The
// activation codes are split once per call into even-k and odd-k int8 vectors (zero padded to
// a multiple of 64 bytes), matching the low and high nibbles of 64 weight bytes. A tile of
// NB weight columns is unpacked once per K step and used for MB activation rows held in
// registers, so weights stream from memory once per call. Epilogue in float32, in the same
// order as qcompile/kernels/reference.py::epilogue: float(acc) * (a_step * w_step[n]) + float(bias[n]).
//
// W4A16 (AVX512F): float32 FMA of the activation (even/odd split the same way) against the
// sign-extended nibbles converted to float32; then * w_step[n] + bias[n].
//
// Group multipliers (`w_mult`, uint8 [N, G], formats.py): the integer multiplied for weight
// (n, k) is value * w_mult[n, k / group], group = K / G a multiple of 32 k (16 packed bytes).
// W4A4 stays exact integer arithmetic. In a K step's 64 bytes each 128-bit lane holds 32 codes,
// one group's, so the VNNI tile looks a lane's nibbles up in the shifted table times the group's
// multiplier, (value + offset) * m, made by one 16-bit multiply a column and K step for all the
// rows; the rows' vpdpbusd work is the same as without multipliers, and the accumulators start
// at -offset * sum_g m_g * (sum of x over group g) (`vpdpwssd`) where the plain tile subtracts
// offset * sum(x). Exact while (max - min) * m <= 255, i.e. whenever value * m fits int8
// (formats.max_multiplier); columns with larger multipliers take the scalar loop, which sums
// each group and multiplies the sum by its multiplier. W4A16 multiplies the float nibbles of
// each 16-byte K step (32 codes, one group) by the group's multiplier (small integers, exact).
// Without w_mult every kernel runs the code it ran before.

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>
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
  const float* scale;     // a_step * w_step[n] (w4a4) or w_step[n] (w4a16), rounded once
  const float* bias;      // float32 [N] or nullptr
  float* out;
  int64_t n;
  const float* row_step = nullptr;  // w4a4 with a dynamic step per row: scale[n] is w_step[n]
  inline void store(int64_t r, int64_t c, float value) const {
    const float s = row_step ? row_step[r] * scale[c] : scale[c];  // a_step[m] * w_step[n], rounded once
    float v = value * s;
    if (bias) v = v + bias[c];
    out[r * n + c] = v;
  }
};

// ---- group multipliers --------------------------------------------------------------------------

constexpr int64_t kGroupAlign = 32;  // k a group holds is a multiple of this (formats.GROUP_ALIGN)

// w_mult of one call: row c's G multipliers start at mult + c * stride.
struct GroupMult {
  const uint8_t* mult = nullptr;  // uint8 [N, G], contiguous; nullptr without multipliers (or K = 0)
  int64_t groups = 0;             // G
  int64_t group_bytes = 0;        // packed bytes a group: K / G / 2, a multiple of 16
  int64_t stride = 0;             // bytes from a row to the next: G, or more in a padded copy
  const uint8_t* row(int64_t c) const { return mult + c * stride; }
};

// Checks `w_mult` (its values were checked by the q4:: ops) and keeps a contiguous copy in *keep.
GroupMult group_mult(const char* op, const c10::optional<at::Tensor>& w_mult, at::Tensor* keep, int64_t n,
                     int64_t k) {
  GroupMult g;
  if (!w_mult.has_value()) return g;
  const at::Tensor& t = *w_mult;
  TORCH_CHECK(t.scalar_type() == at::kByte && t.dim() == 2 && t.size(0) == n && t.size(1) >= 1, "q4_cpu::", op,
              ": argument 'w_mult' must be None or a uint8 tensor [N, G] = [", n,
              ", K / group] of group multipliers, got ", t.scalar_type(), " tensor of shape ", t.sizes());
  const int64_t groups = t.size(1);
  TORCH_CHECK(k % groups == 0 && (k / groups) % kGroupAlign == 0, "q4_cpu::", op,
              ": argument 'w_mult' must have G groups dividing K = ", k, " into groups of a multiple of ", kGroupAlign,
              " k, got G = ", groups);
  TORCH_CHECK(t.device().is_cpu(), "q4_cpu::", op, ": argument 'w_mult' must be on the CPU, got ", t.device());
  if (k == 0) return g;  // no products to multiply
  *keep = t.contiguous();
  g.mult = keep->data_ptr<uint8_t>();
  g.groups = groups;
  g.group_bytes = k / groups / 2;
  g.stride = groups;
  return g;
}

// ---- W4A4 --------------------------------------------------------------------------------------

// The weight's nibble table: values (signed) and, for vpdpbusd, values + offset (unsigned).
struct NibbleTable {
  int8_t value[16];
  uint8_t shifted[16];
  int32_t offset;
};

NibbleTable nibble_table(const c10::optional<c10::ArrayRef<int64_t>>& values) {
  NibbleTable t{};
  for (int i = 0; i < 16; ++i) {
    const int64_t v = values.has_value() ? (*values)[i] : (i < 8 ? i : i - 16);  // int4 two's complement
    TORCH_CHECK(v >= -128 && v <= 127, "q4_cpu::linear_w4a4: argument 'w_values' must hold int8 values, got ", v);
    t.value[i] = static_cast<int8_t>(v);
  }
  const int8_t lo = *std::min_element(t.value, t.value + 16);
  t.offset = -std::min<int32_t>(lo, 0);
  for (int i = 0; i < 16; ++i) {
    TORCH_CHECK(t.value[i] + t.offset <= 255, "q4_cpu::linear_w4a4: argument 'w_values' must span at most 255");
    t.shifted[i] = static_cast<uint8_t>(t.value[i] + t.offset);
  }
  return t;
}

// With kMult, each group's sum times its multiplier (a group of `w_mult`: gm.group_bytes bytes).
template <bool kMult>
void w4a4_scalar(const int8_t* xs, const int32_t* xsum, const uint8_t* w, int64_t m, int64_t kp, int64_t kpad,
                 int64_t n0, int64_t n1, const NibbleTable& table, const GroupMult& gm, const Epilogue& ep) {
  (void)xsum;
  const int64_t span = kMult ? gm.group_bytes : kp;  // bytes summed before multiplying: a group, or all
  for (int64_t c = n0; c < n1; ++c) {
    const uint8_t* row = w + c * kp;
    for (int64_t r = 0; r < m; ++r) {
      const int8_t* even = xs + r * 2 * kpad;
      const int8_t* odd = even + kpad;
      uint32_t total = 0;  // wraps like the reference's int64 sum cast to int32
      for (int64_t j0 = 0, g = 0; j0 < kp; j0 += span, ++g) {
        int32_t acc = 0;
        for (int64_t j = j0; j < j0 + span; ++j) {
          const int32_t lo = table.value[row[j] & 15];
          const int32_t hi = table.value[row[j] >> 4];
          acc += lo * even[j] + hi * odd[j];
        }
        total += kMult ? static_cast<uint32_t>(acc) * gm.row(c)[g] : static_cast<uint32_t>(acc);
      }
      ep.store(r, c, static_cast<float>(static_cast<int32_t>(total)));
    }
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) inline int32_t hsum_epi32(__m512i v) {
  return _mm512_reduce_add_epi32(v);
}

// One K step of a tile: MB activation rows (even and odd k) against NB columns' unpacked nibbles.
template <int MB, int NB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"), always_inline)) inline void dot_rows(
    __m512i (&acc)[MB][NB], const __m512i (&lo)[NB], const __m512i (&hi)[NB], const int8_t* xs, int64_t r0,
    int64_t kpad, int64_t off) {
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

// MB activation rows x NB weight columns, all of K, accumulators in registers.
template <int MB, int NB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void w4a4_tile_vnni(
    const int8_t* xs, const int32_t* xsum, const uint8_t* w, int64_t kp, int64_t kpad, int64_t r0, int64_t c0,
    const NibbleTable& table, const Epilogue& ep) {
  __m512i acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_si512();
  // the table in each 128-bit lane: vpshufb looks up within lanes
  const __m512i lut = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(table.shifted)));
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int64_t off = 0; off < kp; off += kChunk) {
    // the last step of a row reads only its own bytes; the masked-off bytes become nibbles of 0,
    // which meet the zero padding of the activation
    const __mmask64 mask = kp - off >= kChunk ? ~__mmask64(0) : (__mmask64(1) << (kp - off)) - 1;
    __m512i lo[NB], hi[NB];
    for (int j = 0; j < NB; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (c0 + j) * kp + off + kPrefetch), _MM_HINT_T0);
      const __m512i b = _mm512_maskz_loadu_epi8(mask, w + (c0 + j) * kp + off);
      lo[j] = _mm512_shuffle_epi8(lut, _mm512_and_si512(b, low4));
      hi[j] = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(b, 4), low4));
    }
    dot_rows<MB, NB>(acc, lo, hi, xs, r0, kpad, off);
  }
#pragma GCC unroll 4  // unrolled, the accumulators stay in registers (else GCC stores them every K step)
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j)
      ep.store(r0 + i, c0 + j, static_cast<float>(hsum_epi32(acc[i][j]) - table.offset * xsum[r0 + i]));
}

template <int NB>
void w4a4_rows_vnni(const int8_t* xs, const int32_t* xsum, const uint8_t* w, int64_t m, int64_t kp, int64_t kpad,
                    int64_t c0, const NibbleTable& table, const Epilogue& ep) {
  // rows in groups of 4: 4 x NB accumulators + 2 x NB unpacked weights + 2 activations fit the 32 zmm
  int64_t r = 0;
  for (; r + 4 <= m; r += 4) w4a4_tile_vnni<4, NB>(xs, xsum, w, kp, kpad, r, c0, table, ep);
  switch (m - r) {
    case 3: w4a4_tile_vnni<3, NB>(xs, xsum, w, kp, kpad, r, c0, table, ep); break;
    case 2: w4a4_tile_vnni<2, NB>(xs, xsum, w, kp, kpad, r, c0, table, ep); break;
    case 1: w4a4_tile_vnni<1, NB>(xs, xsum, w, kp, kpad, r, c0, table, ep); break;
    default: break;
  }
}

void w4a4_vnni(const int8_t* xs, const int32_t* xsum, const uint8_t* w, int64_t m, int64_t kp, int64_t kpad,
               int64_t n0, int64_t n1, const NibbleTable& table, const Epilogue& ep) {
  int64_t c = n0;
  for (; c + 4 <= n1; c += 4) w4a4_rows_vnni<4>(xs, xsum, w, m, kp, kpad, c, table, ep);
  for (; c < n1; ++c) w4a4_rows_vnni<1>(xs, xsum, w, m, kp, kpad, c, table, ep);
}

// With group multipliers: 128-bit lane b of a K step's 64 bytes holds codes 32b..32b+31 of its
// 128, one group's, and looks its nibbles up in the shifted table times the group's multiplier,
// (value + offset) * m: one 16-bit multiply of the table (its 16 bytes as 8 words) by m in every
// word, exact while (max - min) * m <= 255 (so whenever value * m fits int8, formats.py), a carry
// never crossing into the high byte. The rows' vpdpbusd work is the tile's above; the sum then
// holds offset * sum_g m_g * X_g too (X_g: the group's sum of x), which the accumulators start
// without: `vpdpwssd` of offset * m against -X per block of 32 k (32 blocks an instruction, int16:
// |X| <= 4096), before the K loop (after it, GCC reloads the accumulators from the stack).
struct MultStep {
  int64_t at;        // the step reads 4 bytes of a w_mult row from here: its groups', within the row
  uint8_t pick[64];  // vpshufb of the 4 bytes: lane b's words take its group's, zero-extended
};

struct MultChunk {  // 32 blocks of 32 k: their multipliers from the bytes of a row at [start, start + count)
  int64_t start;
  int32_t count;     // min(32, G - start)
  int16_t pick[32];  // vpermw: block t takes word (its group - start)
};

struct MultCall {
  GroupMult gm;                   // rows of at least 4 bytes (padded with zeros when G < 4)
  std::vector<uint8_t> padded;
  std::vector<MultStep> steps;    // one per K step of kChunk packed bytes
  std::vector<MultChunk> chunks;  // one per 32 blocks of 32 k
  std::vector<int16_t> xneg;      // [M, chunks, 32]: -(sum of x) of each block of 32 k (0 past K), times
  bool folded = false;            // ... offset where every product fits int16 (else the tile multiplies m by it)
  bool identity = false;          // group = 32 k: block t takes byte t (no vpermw)
  int64_t limit = 255;            // the largest multiplier with (max - min) * m <= 255
};

MultCall mult_call(const GroupMult& gm, const int8_t* x, int64_t m, int64_t k, int64_t kpad, int64_t n,
                   const NibbleTable& table) {
  MultCall mc;
  mc.gm = gm;
  if (gm.groups < 4) {  // every K step reads 4 bytes of a row: a copy with rows of 4 (zeros past G)
    mc.padded.assign(static_cast<size_t>(n * 4), 0);
    for (int64_t c = 0; c < n; ++c) std::memcpy(mc.padded.data() + c * 4, gm.row(c), static_cast<size_t>(gm.groups));
    mc.gm.mult = mc.padded.data();
    mc.gm.stride = 4;
  }
  // the group of each block of 32 k, counted without divisions (a decode call is a few µs), the last
  // group's past K: the padding of the last K step and of the last chunk (their codes meet x = 0)
  const int64_t per_block = gm.group_bytes * 2 / kGroupAlign, blocks = k / kGroupAlign;
  const int64_t nsteps = kpad / kChunk, nchunks = (blocks + 31) / 32;
  std::vector<int64_t> group_of(static_cast<size_t>(std::max(4 * nsteps, 32 * nchunks)));
  for (int64_t t = 0, g = 0, left = per_block; t < static_cast<int64_t>(group_of.size()); ++t) {
    group_of[t] = std::min(g, gm.groups - 1);
    if (--left == 0) ++g, left = per_block;
  }
  mc.steps.resize(static_cast<size_t>(nsteps));
  for (int64_t s = 0; s < nsteps; ++s) {
    MultStep& st = mc.steps[s];
    st.at = std::min(group_of[4 * s], std::max<int64_t>(gm.groups, 4) - 4);
    for (int b = 0; b < 4; ++b)
      for (int i = 0; i < 16; ++i) st.pick[16 * b + i] = i % 2 ? 0x80 : static_cast<uint8_t>(group_of[4 * s + b] - st.at);
  }
  mc.chunks.resize(static_cast<size_t>(nchunks));
  for (int64_t c = 0; c < nchunks; ++c) {
    MultChunk& ch = mc.chunks[c];
    ch.start = group_of[32 * c];
    ch.count = static_cast<int32_t>(std::min<int64_t>(32, gm.groups - ch.start));
    for (int t = 0; t < 32; ++t) ch.pick[t] = static_cast<int16_t>(group_of[32 * c + t] - ch.start);
  }
  mc.identity = per_block == 1;
  const int64_t per_row = static_cast<int64_t>(mc.chunks.size()) * 32;
  std::vector<int32_t> sums(static_cast<size_t>(m * per_row), 0);
  int32_t top = 0;
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      int32_t sum = 0;  // a local: a store through int32_t* could alias x (int8_t), chaining every add
      for (int64_t i = 0; i < kGroupAlign; ++i) sum += x[r * k + b * kGroupAlign + i];
      sums[r * per_row + b] = -sum;  // in [-4064, 4096]
      top = std::max(top, std::abs(sum));
    }
  }
  mc.folded = static_cast<int64_t>(top) * table.offset <= 32767;
  mc.xneg.resize(sums.size());
  for (size_t i = 0; i < sums.size(); ++i)
    mc.xneg[i] = static_cast<int16_t>(mc.folded ? sums[i] * table.offset : sums[i]);
  int32_t span = 0;
  for (const uint8_t v : table.shifted) span = std::max<int32_t>(span, v);
  if (span > 0) mc.limit = 255 / span;
  return mc;
}

__attribute__((target("avx512f,avx512bw"))) int64_t max_byte(const uint8_t* p, int64_t n) {
  __m512i top = _mm512_setzero_si512();
  for (int64_t i = 0; i < n; i += 64) {
    const __mmask64 mask = n - i >= 64 ? ~__mmask64(0) : (__mmask64(1) << (n - i)) - 1;
    top = _mm512_max_epu8(top, _mm512_maskz_loadu_epi8(mask, p + i));
  }
  alignas(64) uint8_t bytes[64];
  _mm512_store_si512(bytes, top);
  return *std::max_element(bytes, bytes + 64);
}

template <int MB, int NB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void w4a4_tile_vnni_mult(
    const int8_t* xs, const uint8_t* w, int64_t kp, int64_t kpad, int64_t r0, int64_t c0, const NibbleTable& table,
    const MultCall& mc, const Epilogue& ep) {
  __m512i acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_si512();
  // the accumulators start at -offset * sum_g m_g * X_g, 32 blocks of 32 k at a time
  const __m512i offset = _mm512_set1_epi16(static_cast<int16_t>(table.offset));
  const int64_t per_row = static_cast<int64_t>(mc.chunks.size()) * 32;
  for (size_t c = 0; c < mc.chunks.size(); ++c) {
    const MultChunk& ch = mc.chunks[c];
    const __m512i pick = _mm512_loadu_si512(ch.pick);
    const __mmask32 readable = ch.count == 32 ? ~__mmask32(0) : (__mmask32(1) << ch.count) - 1;
    __m512i om[NB];
    for (int j = 0; j < NB; ++j) {
      om[j] = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(readable, mc.gm.row(c0 + j) + ch.start));
      if (!mc.identity) om[j] = _mm512_permutexvar_epi16(pick, om[j]);
      if (!mc.folded) om[j] = _mm512_mullo_epi16(om[j], offset);  // <= 128 * 255: int16
    }
    for (int i = 0; i < MB; ++i) {
      const __m512i xneg = _mm512_loadu_si512(mc.xneg.data() + (r0 + i) * per_row + 32 * static_cast<int64_t>(c));
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpwssd_epi32(acc[i][j], om[j], xneg);
    }
  }
  const __m512i lut = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(table.shifted)));
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const uint8_t* wrow[NB];
  const uint8_t* mrow[NB];
  for (int j = 0; j < NB; ++j) {
    wrow[j] = w + (c0 + j) * kp;
    mrow[j] = mc.gm.row(c0 + j);
  }
  const MultStep* st = mc.steps.data();
  for (int64_t off = 0; off < kp; off += kChunk, ++st) {
    const __mmask64 mask = kp - off >= kChunk ? ~__mmask64(0) : (__mmask64(1) << (kp - off)) - 1;
    const __m512i pick = _mm512_loadu_si512(st->pick);
    __m512i lo[NB], hi[NB];
    for (int j = 0; j < NB; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(wrow[j] + off + kPrefetch), _MM_HINT_T0);
      const __m512i b = _mm512_maskz_loadu_epi8(mask, wrow[j] + off);
      // the step's 4 multiplier bytes in every 32 bits, then in each word of a lane its group's
      int32_t bytes;
      std::memcpy(&bytes, mrow[j] + st->at, 4);
      const __m512i lut_m = _mm512_mullo_epi16(lut, _mm512_shuffle_epi8(_mm512_set1_epi32(bytes), pick));
      lo[j] = _mm512_shuffle_epi8(lut_m, _mm512_and_si512(b, low4));
      hi[j] = _mm512_shuffle_epi8(lut_m, _mm512_and_si512(_mm512_srli_epi16(b, 4), low4));
    }
    dot_rows<MB, NB>(acc, lo, hi, xs, r0, kpad, off);
  }
#pragma GCC unroll 4  // unrolled, the accumulators stay in registers (else GCC stores them every K step)
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) ep.store(r0 + i, c0 + j, static_cast<float>(hsum_epi32(acc[i][j])));
}

template <int NB>
void w4a4_rows_vnni_mult(const int8_t* xs, const uint8_t* w, int64_t m, int64_t kp, int64_t kpad, int64_t c0,
                         const NibbleTable& table, const MultCall& mc, const Epilogue& ep) {
  int64_t r = 0;
  for (; r + 4 <= m; r += 4) w4a4_tile_vnni_mult<4, NB>(xs, w, kp, kpad, r, c0, table, mc, ep);
  switch (m - r) {
    case 3: w4a4_tile_vnni_mult<3, NB>(xs, w, kp, kpad, r, c0, table, mc, ep); break;
    case 2: w4a4_tile_vnni_mult<2, NB>(xs, w, kp, kpad, r, c0, table, mc, ep); break;
    case 1: w4a4_tile_vnni_mult<1, NB>(xs, w, kp, kpad, r, c0, table, mc, ep); break;
    default: break;
  }
}

void w4a4_vnni_mult(const int8_t* xs, const uint8_t* w, int64_t m, int64_t kp, int64_t kpad, int64_t n0, int64_t n1,
                    const NibbleTable& table, const MultCall& mc, const Epilogue& ep) {
  int64_t c = n0;
  for (; c + 4 <= n1; c += 4) w4a4_rows_vnni_mult<4>(xs, w, m, kp, kpad, c, table, mc, ep);
  for (; c < n1; ++c) w4a4_rows_vnni_mult<1>(xs, w, m, kp, kpad, c, table, mc, ep);
}

// ---- W4A16 -------------------------------------------------------------------------------------

template <bool kMult>
void w4a16_scalar(const float* xs, const uint8_t* w, int64_t m, int64_t kp, int64_t kpad, int64_t n0, int64_t n1,
                  const GroupMult& gm, const Epilogue& ep) {
  const int64_t span = kMult ? gm.group_bytes : kp;  // bytes sharing a multiplier: a group, or all
  for (int64_t c = n0; c < n1; ++c) {
    const uint8_t* row = w + c * kp;
    for (int64_t r = 0; r < m; ++r) {
      const float* even = xs + r * 2 * kpad;
      const float* odd = even + kpad;
      float acc = 0.f;
      for (int64_t j0 = 0, g = 0; j0 < kp; j0 += span, ++g) {
        const int mul = kMult ? gm.row(c)[g] : 1;
        for (int64_t j = j0; j < j0 + span; ++j) {
          const int8_t b = static_cast<int8_t>(row[j]);
          const int lo = static_cast<int8_t>(static_cast<uint8_t>(b << 4)) >> 4;
          const int hi = b >> 4;
          acc += even[j] * static_cast<float>(kMult ? lo * mul : lo);
          acc += odd[j] * static_cast<float>(kMult ? hi * mul : hi);
        }
      }
      ep.store(r, c, acc);
    }
  }
}

// MB rows x NB columns; a K step is 16 packed bytes (32 codes), with kMult within one group, whose
// multiplier for column c0 + j is mult[j * G + group] (float32).
template <int MB, int NB, bool kMult>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void w4a16_tile_avx512(const float* xs, const uint8_t* w,
                                                                          int64_t kp, int64_t kpad, int64_t r0,
                                                                          int64_t c0, const GroupMult& gm,
                                                                          const float* mult, const Epilogue& ep) {
  __m512 acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t off = 0, group = 0, group_end = gm.group_bytes; off < kp; off += 16) {
    const __mmask16 mask = kp - off >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (kp - off)) - 1);
    if (kMult && off == group_end) ++group, group_end += gm.group_bytes;  // a group is a multiple of 16 bytes
    __m512 lo[NB], hi[NB];
    if ((off & (kChunk - 1)) == 0)  // one prefetch a cache line
      for (int j = 0; j < NB; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(w + (c0 + j) * kp + off + kPrefetch), _MM_HINT_T0);
    for (int j = 0; j < NB; ++j) {
      // each byte sign-extended to int32, then the nibbles sign-extended by shifts
      const __m512i b = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, w + (c0 + j) * kp + off));
      lo[j] = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(b, 28), 28));
      hi[j] = _mm512_cvtepi32_ps(_mm512_srai_epi32(b, 4));
      if constexpr (kMult) {  // code * multiplier: small integers, exact in float32
        const __m512 mul = _mm512_set1_ps(mult[j * gm.groups + group]);
        lo[j] = _mm512_mul_ps(lo[j], mul);
        hi[j] = _mm512_mul_ps(hi[j], mul);
      }
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

// The G multipliers of `count` rows of w_mult from row c0 as float32, row after row.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void multipliers_float(const GroupMult& gm, int64_t c0,
                                                                          int count, float* out) {
  for (int j = 0; j < count; ++j) {
    const uint8_t* row = gm.row(c0 + j);
    for (int64_t g = 0; g < gm.groups; g += 16) {
      const __mmask16 in = gm.groups - g >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (gm.groups - g)) - 1);
      const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(in, row + g)));
      _mm512_mask_storeu_ps(out + j * gm.groups + g, in, v);
    }
  }
}

template <int NB, bool kMult>
void w4a16_rows_avx512(const float* xs, const uint8_t* w, int64_t m, int64_t kp, int64_t kpad, int64_t c0,
                       const GroupMult& gm, float* mult, const Epilogue& ep) {
  if (kMult) multipliers_float(gm, c0, NB, mult);  // once for all the row tiles: a broadcast load a K step
  int64_t r = 0;
  for (; r + 4 <= m; r += 4) w4a16_tile_avx512<4, NB, kMult>(xs, w, kp, kpad, r, c0, gm, mult, ep);
  switch (m - r) {
    case 3: w4a16_tile_avx512<3, NB, kMult>(xs, w, kp, kpad, r, c0, gm, mult, ep); break;
    case 2: w4a16_tile_avx512<2, NB, kMult>(xs, w, kp, kpad, r, c0, gm, mult, ep); break;
    case 1: w4a16_tile_avx512<1, NB, kMult>(xs, w, kp, kpad, r, c0, gm, mult, ep); break;
    default: break;
  }
}

template <bool kMult>
void w4a16_avx512(const float* xs, const uint8_t* w, int64_t m, int64_t kp, int64_t kpad, int64_t n0, int64_t n1,
                  const GroupMult& gm, const Epilogue& ep) {
  std::vector<float> mult(kMult ? static_cast<size_t>(4 * gm.groups) : 0);  // a column tile's, as float32
  int64_t c = n0;
  for (; c + 4 <= n1; c += 4) w4a16_rows_avx512<4, kMult>(xs, w, m, kp, kpad, c, gm, mult.data(), ep);
  for (; c < n1; ++c) w4a16_rows_avx512<1, kMult>(xs, w, m, kp, kpad, c, gm, mult.data(), ep);
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
                       bool force_scalar, c10::optional<c10::ArrayRef<int64_t>> w_values,
                       const c10::optional<at::Tensor>& w_mult) {
  check_common("linear_w4a4", x_codes, w_packed, w_step, bias, out_dtype);
  TORCH_CHECK(!w_values.has_value() || w_values->size() == 16,
              "q4_cpu::linear_w4a4: argument 'w_values' must be None or 16 ints (each nibble's value), got ",
              w_values->size());
  const NibbleTable table = nibble_table(w_values);
  TORCH_CHECK(x_codes.scalar_type() == at::kChar, "q4_cpu::linear_w4a4: argument 'x_codes' must be an int8 tensor "
              "[..., K] of activation codes, got ", x_codes.scalar_type());
  const int64_t k = x_codes.size(-1), n = w_packed.size(0), kp = w_packed.size(1);
  const int64_t m = c10::multiply_integers(x_codes.sizes().begin(), x_codes.sizes().end() - 1);
  const bool per_row = a_step.dim() > 0;  // a dynamic step per row: [..., 1]
  TORCH_CHECK(a_step.scalar_type() == at::kFloat && (!per_row || (a_step.numel() == m && a_step.size(-1) == 1)),
              "q4_cpu::linear_w4a4: argument 'a_step' must be a 0-dim float32 tensor or one of shape [..., 1] "
              "(a step per row), got ", a_step.scalar_type(), " tensor of shape ", a_step.sizes());
  at::Tensor mult_keep;
  const GroupMult gm = group_mult("linear_w4a4", w_mult, &mult_keep, n, k);
  at::Tensor out32 = at::empty({m, n}, x_codes.options().dtype(at::kFloat));
  if (m == 0 || n == 0) return finish(out32, x_codes, n, out_dtype);

  const at::Tensor x = x_codes.contiguous(), w = w_packed.contiguous();
  const int64_t kpad = round_up(std::max<int64_t>(kp, 1), kChunk);
  const int8_t* xp = x.data_ptr<int8_t>();  // hoisted: data_ptr() checks the dtype at every call
  const std::vector<int8_t> xs = split_even_odd(xp, m, k, kpad);
  std::vector<int32_t> xsum(static_cast<size_t>(m), 0);
  for (int64_t r = 0; r < m; ++r) {
    int32_t sum = 0;  // a local: a store through int32_t* could alias x (int8_t), chaining every add
    for (int64_t i = 0; i < k; ++i) sum += xp[r * k + i];
    xsum[r] = sum;
  }
  // the epilogue's scale, rounded once to float32 like `a_step * w_step` in the reference (one
  // IEEE multiply each, here rather than an ATen op: a few µs a call at decode)
  const at::Tensor w_step32 = w_step.contiguous();
  const float* wsp = w_step32.data_ptr<float>();
  const at::Tensor rows32 = per_row ? a_step.contiguous() : at::Tensor();
  const float a = per_row ? 1.f : a_step.item<float>();
  std::vector<float> scale(static_cast<size_t>(n));
  for (int64_t c = 0; c < n; ++c) scale[c] = per_row ? wsp[c] : a * wsp[c];
  const at::Tensor bias32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const Epilogue ep{scale.data(), bias32.defined() ? bias32.data_ptr<float>() : nullptr, out32.data_ptr<float>(), n,
                    per_row ? rows32.data_ptr<float>() : nullptr};
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const bool vnni = has_vnni() && !force_scalar;
  const MultCall mc = vnni && gm.mult ? mult_call(gm, xp, m, k, kpad, n, table) : MultCall();
  over_columns(n, kp, [&](int64_t n0, int64_t n1) {
    // multipliers too large for the tables (the q4 ops refuse them) take the scalar loop
    if (vnni && gm.mult && max_byte(mc.gm.row(n0), (n1 - n0) * mc.gm.stride) <= mc.limit)
      w4a4_vnni_mult(xs.data(), wp, m, kp, kpad, n0, n1, table, mc, ep);
    else if (vnni && !gm.mult) w4a4_vnni(xs.data(), xsum.data(), wp, m, kp, kpad, n0, n1, table, ep);
    else if (gm.mult) w4a4_scalar<true>(xs.data(), xsum.data(), wp, m, kp, kpad, n0, n1, table, gm, ep);
    else w4a4_scalar<false>(xs.data(), xsum.data(), wp, m, kp, kpad, n0, n1, table, gm, ep);
  });
  return finish(out32, x_codes, n, out_dtype);
}

at::Tensor linear_w4a16(const at::Tensor& x_in, const at::Tensor& w_packed, const at::Tensor& w_step,
                        const c10::optional<at::Tensor>& bias, at::ScalarType out_dtype, bool force_scalar,
                        const c10::optional<at::Tensor>& w_mult) {
  check_common("linear_w4a16", x_in, w_packed, w_step, bias, out_dtype);
  TORCH_CHECK(at::isFloatingType(x_in.scalar_type()), "q4_cpu::linear_w4a16: argument 'x' must be a float tensor "
              "[..., K], got ", x_in.scalar_type());
  const int64_t k = x_in.size(-1), n = w_packed.size(0), kp = w_packed.size(1);
  const int64_t m = c10::multiply_integers(x_in.sizes().begin(), x_in.sizes().end() - 1);
  at::Tensor mult_keep;
  const GroupMult gm = group_mult("linear_w4a16", w_mult, &mult_keep, n, k);
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
    if (simd && gm.mult) w4a16_avx512<true>(xs.data(), wp, m, kp, kpad, n0, n1, gm, ep);
    else if (simd) w4a16_avx512<false>(xs.data(), wp, m, kp, kpad, n0, n1, gm, ep);
    else if (gm.mult) w4a16_scalar<true>(xs.data(), wp, m, kp, kpad, n0, n1, gm, ep);
    else w4a16_scalar<false>(xs.data(), wp, m, kp, kpad, n0, n1, gm, ep);
  });
  return finish(out32, x_in, n, out_dtype);
}

// ---- Walsh-Hadamard transform: the power-of-two factor of a rotation (qcompile/kernels/rotation.py) ----
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

// ---- one learned Kronecker factor of a rotation (qcompile/kernels/rotation.py, hadamard=False) ----------
//
// y[r, i, t] = sum_j x[r, j, t] * f[j, i] on x viewed as [rows, d, inner]: a factor of
// kron(F_1, ..., F_r) applied along its own axis. Each output sums j = 0..d-1 in order, a multiply
// and an add (no fused multiply-add: -ffp-contract=off), so every row gets the same bits at any
// number of rows (a prompt and a decode step agree) and the AVX512 code (16 outputs at once,
// along inner, or along i when inner is 1) gives the scalar loop's bits.

void kron_factor_scalar(const float* x, const float* f, float* y, int64_t d, int64_t inner) {
  for (int64_t i = 0; i < d; ++i) {
    for (int64_t t = 0; t < inner; ++t) {
      float acc = 0.0f;
      for (int64_t j = 0; j < d; ++j) acc = acc + x[j * inner + t] * f[j * d + i];
      y[i * inner + t] = acc;
    }
  }
}

__attribute__((target("avx512f"))) void kron_factor_avx512(const float* x, const float* f, float* y, int64_t d,
                                                           int64_t inner) {
  if (inner % 16 == 0) {  // 16 consecutive t: x rows contiguous, f[j, i] broadcast
    for (int64_t i = 0; i < d; ++i) {
      for (int64_t t = 0; t < inner; t += 16) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t j = 0; j < d; ++j)
          acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_loadu_ps(x + j * inner + t), _mm512_set1_ps(f[j * d + i])));
        _mm512_storeu_ps(y + i * inner + t, acc);
      }
    }
  } else {  // inner == 1, d % 16 == 0: 16 consecutive i, x[j] broadcast, f rows contiguous
    for (int64_t i = 0; i < d; i += 16) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t j = 0; j < d; ++j)
        acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_set1_ps(x[j]), _mm512_loadu_ps(f + j * d + i)));
      _mm512_storeu_ps(y + i, acc);
    }
  }
}

at::Tensor kron_factor(const at::Tensor& x, const at::Tensor& factor, int64_t inner, bool force_scalar) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() >= 1 && x.device().is_cpu(), "q4_cpu::kron_factor: argument "
              "'x' must be a float32 CPU tensor [..., K], got ", x.scalar_type(), " tensor of shape ", x.sizes());
  TORCH_CHECK(factor.scalar_type() == at::kFloat && factor.dim() == 2 && factor.size(0) == factor.size(1) &&
              factor.device().is_cpu(), "q4_cpu::kron_factor: argument 'factor' must be a float32 CPU tensor [d, d], "
              "got ", factor.scalar_type(), " tensor of shape ", factor.sizes());
  const int64_t d = factor.size(0);
  TORCH_CHECK(inner >= 1 && x.size(-1) % (d * inner) == 0, "q4_cpu::kron_factor: argument 'inner' must be >= 1 with "
              "d * inner (d = ", d, ") dividing K = ", x.size(-1), ", got ", inner);
  const at::Tensor xc = x.contiguous(), fc = factor.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t block = d * inner, blocks = y.numel() / block;
  const float* src = xc.data_ptr<float>();
  const float* f = fc.data_ptr<float>();
  float* dst = y.data_ptr<float>();
  const bool simd = has_avx512() && !force_scalar && (inner % 16 == 0 || (inner == 1 && d % 16 == 0));
  const int64_t grain = std::max<int64_t>(1, 16384 / (block * d));  // >= ~16K multiply-adds a task
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      if (simd) kron_factor_avx512(src + b * block, f, dst + b * block, d, inner);
      else kron_factor_scalar(src + b * block, f, dst + b * block, d, inner);
    }
  });
  return y;
}

// ---- attention ---------------------------------------------------------------------------------
//
// softmax(q k^T * scale + mask) v, computed so that every output row goes through the same float
// operations whatever else is in the call: how many query rows, how many keys past the row's
// last allowed one, which batch. So a prompt's row i and a decode step at position i (one query
// row against a cache of i + 1 keys, or a static cache of more, masked) give the same bits, and
// a quantized model's generate() rounds exactly like its no-cache forward. ATen's flash attention
// blocks queries and keys by the call's sizes: its rows round differently at each length.
//
// A row i: scores s_j = (q_i . k_j) * scale (+ the float mask's value) for the allowed keys j
// (the bool mask's True, the float mask's finite entries, j <= i when causal); m = max s_j;
// p_j = exp(s_j - m); l = sum p_j; out_i = (sum_j p_j v_j) / l, all in float32. Fixed orders:
//   q . k   lane t of 16 sums the products of d = t (mod 16) over d ascending (fma from 0), then
//           the lanes as a tree: (t, t+8), then (t, t+4), (t, t+2), (t, t+1) (tree16);
//   l       the same: lane t sums p_j of j = t (mod 16) over j ascending, then tree16;
//   p v     per output column, an fma chain over j ascending, keys with p_j = 0 skipped.
// Keys outside a row's allowed range add exact zeros or are skipped, so they change nothing.
// exp is Cephes' expf polynomial (a few ulp), in the same operations in both paths. The AVX512
// code and the scalar loop give the same bits (tested). A row with no allowed key is zeros.

constexpr float kExpMin = -87.0f;  // exp below this is 0 (2**-126 is the smallest normal float)
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;  // ln 2 = hi + lo, hi exact in few bits
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

inline float exp_scalar(float x) {
  if (!(x >= kExpMin)) return 0.0f;
  const float n = std::nearbyint(x * kLog2e);
  float r = std::fmaf(n, -kLn2Hi, x);
  r = std::fmaf(n, -kLn2Lo, r);
  float p = kExpPoly[0];
  for (int i = 1; i < 6; ++i) p = std::fmaf(p, r, kExpPoly[i]);
  const float y = std::fmaf(p, r * r, r) + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return y * two_n;
}

__attribute__((target("avx512f"))) inline __m512 exp_avx512(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpMin), _CMP_GE_OQ);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-kLn2Hi), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(-kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(live, y, _mm512_castsi512_ps(bits));
}

inline float tree16(const float* v) {
  float t8[8], t4[4], t2[2];
  for (int i = 0; i < 8; ++i) t8[i] = v[i] + v[i + 8];
  for (int i = 0; i < 4; ++i) t4[i] = t8[i] + t8[i + 4];
  for (int i = 0; i < 2; ++i) t2[i] = t4[i] + t4[i + 2];
  return t2[0] + t2[1];
}

// The call: tensors, sizes and strides (in elements; q, k, v over batch, head, length; the
// mask, expanded to [batch, heads, lq, lk], over all four).
struct AttentionCall {
  const float* q;
  const float* k;
  const float* v;
  float* out;
  const char* mask;  // nullptr: none
  int64_t mask_elem;  // bytes an element
  bool mask_is_bool, causal;
  int64_t h, hk, lq, lk, d, dv;
  int64_t qs[3], ks[3], vs[3], ms[4];
  float scale;
};

// One query row: where its q, keys, values, mask row and output start; its allowed keys lie in
// [lo, hi).
struct AttentionRow {
  const float* q;
  const float* k;
  const float* v;
  const char* mask;
  float* out;
  int64_t i, lo, hi;
};

inline float neg_inf() { return -std::numeric_limits<float>::infinity(); }

// Whether key j is allowed for the row, and the float mask's value to add (0 without one).
inline bool allowed(const AttentionCall& c, const AttentionRow& row, int64_t j, float* add) {
  *add = 0.0f;
  if (j < row.lo || j >= row.hi || (c.causal && j > row.i)) return false;
  if (row.mask == nullptr) return true;
  const char* e = row.mask + j * c.ms[3] * c.mask_elem;
  if (c.mask_is_bool) return *reinterpret_cast<const bool*>(e);
  *add = *reinterpret_cast<const float*>(e);
  return *add != neg_inf();
}

// The row's allowed range: [first allowed key, last allowed key + 1), empty when none.
void find_range(const AttentionCall& c, AttentionRow* row) {
  int64_t lo = 0, hi = c.causal ? std::min(c.lk, row->i + 1) : c.lk;
  row->lo = lo, row->hi = hi;  // allowed() reads them
  if (row->mask != nullptr && c.mask_is_bool && c.ms[3] == 1) {  // HF's mask: a plain scan of the bytes
    const char* m = row->mask;
    while (lo < hi && !m[lo]) ++lo;
    while (hi > lo && !m[hi - 1]) --hi;
  } else {
    float add;
    while (lo < hi && !allowed(c, *row, lo, &add)) ++lo;
    while (hi > lo && !allowed(c, *row, hi - 1, &add)) --hi;
  }
  row->lo = lo, row->hi = hi;
}

// Scalar path. Scores of the row's chunks into buf (-inf where not allowed); returns their max.
float row_scores_scalar(const AttentionCall& c, const AttentionRow& row, float* buf) {
  float m = neg_inf();
  for (int64_t j0 = row.lo / 16 * 16; j0 < row.hi; j0 += 16) {
    for (int64_t t = 0; t < 16; ++t) {
      float lane[16] = {0};
      if (j0 + t < row.hi) {
        const float* k = row.k + (j0 + t) * c.ks[2];
        for (int64_t d0 = 0; d0 < c.d; d0 += 16) {
          for (int64_t l = 0; l < 16; ++l) {
            const bool in = d0 + l < c.d;
            lane[l] = std::fmaf(in ? row.q[d0 + l] : 0.0f, in ? k[d0 + l] : 0.0f, lane[l]);
          }
        }
      }
      float add;
      const float s = tree16(lane);
      buf[j0 + t] = allowed(c, row, j0 + t, &add) ? s * c.scale + add : neg_inf();
      m = std::max(m, buf[j0 + t]);
    }
  }
  return m;
}

// p = exp(s - m) over the row's chunks, in place; returns l = sum p (lane t: j = t mod 16, tree16).
float row_softmax_scalar(const AttentionRow& row, float* buf, float m) {
  float lane[16] = {0};
  for (int64_t j0 = row.lo / 16 * 16; j0 < row.hi; j0 += 16) {
    for (int64_t t = 0; t < 16; ++t) {
      buf[j0 + t] = exp_scalar(buf[j0 + t] - m);
      lane[t] = lane[t] + buf[j0 + t];
    }
  }
  return tree16(lane);
}

// out_r = sum_j p_r[j] v_j / l_r for the tile's rows, each over its own range, keys of p = 0 skipped.
void tile_values_scalar(const AttentionCall& c, const AttentionRow* rows, int nrows, float* const* p,
                        const float* l) {
  for (int r = 0; r < nrows; ++r) {
    const AttentionRow& row = rows[r];
    for (int64_t col = 0; col < c.dv; ++col) row.out[col] = 0.0f;
    for (int64_t j = row.lo; j < row.hi; ++j) {
      if (p[r][j] == 0.0f) continue;
      const float* v = row.v + j * c.vs[2];
      for (int64_t col = 0; col < c.dv; ++col) row.out[col] = std::fmaf(p[r][j], v[col], row.out[col]);
    }
    for (int64_t col = 0; col < c.dv; ++col) row.out[col] = row.out[col] / l[r];
  }
}

// AVX512 path: the same values, bit for bit.

__attribute__((target("avx512f"))) inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// q . k for keys [j0, j0 + count) (count <= 16; the other lanes 0): tree16 of each key's lane
// sums, all 16 at once by a transposing network that adds the same pairs as tree16.
__attribute__((target("avx512f"))) __m512 scores16_avx512(const AttentionCall& c, const AttentionRow& row, int64_t j0,
                                                          int64_t count) {
  // 16 accumulators, named: an array of 16 vectors would live on the stack (GCC does not split
  // aggregates that large into registers). Keys past `count` load nothing (masked loads do not
  // touch memory) and stay 0.
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0, a9 = a0,
         a10 = a0, a11 = a0, a12 = a0, a13 = a0, a14 = a0, a15 = a0;
  const int64_t ks = c.ks[2];
  for (int64_t d0 = 0; d0 < c.d; d0 += 16) {
    const __mmask16 in = first_lanes(c.d - d0);
    const __m512 qv = _mm512_maskz_loadu_ps(in, row.q + d0);
    const float* k = row.k + j0 * ks + d0;
#define Q4_KEY(t) a##t = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(t < count ? in : __mmask16(0), k + t * ks), a##t)
    Q4_KEY(0); Q4_KEY(1); Q4_KEY(2); Q4_KEY(3); Q4_KEY(4); Q4_KEY(5); Q4_KEY(6); Q4_KEY(7);
    Q4_KEY(8); Q4_KEY(9); Q4_KEY(10); Q4_KEY(11); Q4_KEY(12); Q4_KEY(13); Q4_KEY(14); Q4_KEY(15);
#undef Q4_KEY
  }
  const __m512 acc[16] = {a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15};
  __m512 w[8], x[4], y[2];
  for (int u = 0; u < 8; ++u) {  // lanes 0-7: key 2u's (t, t+8) sums; lanes 8-15: key 2u+1's
    const __m512 a = acc[2 * u], b = acc[2 * u + 1];
    w[u] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  for (int u = 0; u < 4; ++u) {  // 128-bit block b: key 4u+b's (t, t+4) sums
    const __m512 a = w[2 * u], b = w[2 * u + 1];
    x[u] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  for (int u = 0; u < 2; ++u) {  // block b: key 8u+b's (t, t+2) sums in lanes 0-1, key 8u+4+b's in 2-3
    const __m512 a = x[2 * u], b = x[2 * u + 1];
    y[u] = _mm512_add_ps(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  const __m512 z = _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], _MM_SHUFFLE(2, 0, 2, 0)),  // block b lane g: key 4g+b
                                 _mm512_shuffle_ps(y[0], y[1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_permutexvar_ps(_mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), z);
}

// The allowed lanes of keys [j0, j0 + 16) and the float mask's values (0 elsewhere / without one).
__attribute__((target("avx512f"))) __mmask16 allowed16_avx512(const AttentionCall& c, const AttentionRow& row,
                                                              int64_t j0, __m512* add) {
  const __mmask16 range = static_cast<__mmask16>(first_lanes(row.hi - j0) & ~first_lanes(row.lo - j0));
  *add = _mm512_setzero_ps();
  if (row.mask == nullptr) return range;  // causal: hi <= i + 1 already
  if (c.ms[3] == 1 && c.mask_is_bool) {
    alignas(16) uint8_t bytes[16] = {0};
    if (range == 0xFFFF) std::memcpy(bytes, row.mask + j0, 16);
    else for (int t = 0; t < 16; ++t) if ((range >> t) & 1) bytes[t] = row.mask[j0 + t];
    const __m512i b32 = _mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(bytes)));
    return range & _mm512_test_epi32_mask(b32, b32);
  }
  if (c.ms[3] == 1) {
    *add = _mm512_maskz_loadu_ps(range, reinterpret_cast<const float*>(row.mask) + j0);
    return range & _mm512_cmp_ps_mask(*add, _mm512_set1_ps(neg_inf()), _CMP_NEQ_UQ);
  }
  alignas(64) float values[16];
  __mmask16 ok = 0;
  for (int t = 0; t < 16; ++t) {
    if (allowed(c, row, j0 + t, &values[t])) ok |= static_cast<__mmask16>(1u << t);
  }
  *add = _mm512_load_ps(values);
  return ok;
}

__attribute__((target("avx512f"))) float row_scores_avx512(const AttentionCall& c, const AttentionRow& row,
                                                           float* buf) {
  __m512 m = _mm512_set1_ps(neg_inf());
  const __m512 scale = _mm512_set1_ps(c.scale);
  for (int64_t j0 = row.lo / 16 * 16; j0 < row.hi; j0 += 16) {
    const __m512 s = scores16_avx512(c, row, j0, std::min<int64_t>(16, row.hi - j0));
    __m512 add;
    const __mmask16 ok = allowed16_avx512(c, row, j0, &add);
    const __m512 v = _mm512_mask_add_ps(_mm512_set1_ps(neg_inf()), ok, _mm512_mul_ps(s, scale), add);
    _mm512_storeu_ps(buf + j0, v);
    m = _mm512_max_ps(m, v);
  }
  return _mm512_reduce_max_ps(m);
}

__attribute__((target("avx512f"))) float row_softmax_avx512(const AttentionRow& row, float* buf, float m) {
  __m512 lane = _mm512_setzero_ps();
  const __m512 mv = _mm512_set1_ps(m);
  for (int64_t j0 = row.lo / 16 * 16; j0 < row.hi; j0 += 16) {
    const __m512 p = exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(buf + j0), mv));
    _mm512_storeu_ps(buf + j0, p);
    lane = _mm512_add_ps(lane, p);
  }
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, lane);
  return tree16(lanes);
}

// Columns [col0, col0 + 64) of out_r = sum_j p_r[j] v_j / l_r, j in [lo, hi): 4 accumulators a row
// (named: GCC keeps arrays of vectors this large on the stack), each value loaded once for all the
// rows; a row whose p is 0 at a key leaves its accumulators as they are (masked fma), as alone.
#define Q4_ROW_ACC(r) __m512 r##0 = _mm512_setzero_ps(), r##1 = r##0, r##2 = r##0, r##3 = r##0
#define Q4_ROW_FMA(r, pr)                                            \
  do {                                                               \
    const float pj = (pr)[j];                                        \
    const __mmask16 live = pj != 0.0f ? __mmask16(0xFFFF) : 0;      \
    const __m512 pv = _mm512_set1_ps(pj);                            \
    r##0 = _mm512_mask3_fmadd_ps(pv, v0, r##0, live);                \
    r##1 = _mm512_mask3_fmadd_ps(pv, v1, r##1, live);                \
    r##2 = _mm512_mask3_fmadd_ps(pv, v2, r##2, live);                \
    r##3 = _mm512_mask3_fmadd_ps(pv, v3, r##3, live);                \
  } while (0)
#define Q4_ROW_STORE(r, out, l)                                                      \
  do {                                                                               \
    const __m512 lv = _mm512_set1_ps(l);                                             \
    _mm512_mask_storeu_ps((out) + col0, in0, _mm512_div_ps(r##0, lv));               \
    _mm512_mask_storeu_ps((out) + col0 + 16, in1, _mm512_div_ps(r##1, lv));          \
    _mm512_mask_storeu_ps((out) + col0 + 32, in2, _mm512_div_ps(r##2, lv));          \
    _mm512_mask_storeu_ps((out) + col0 + 48, in3, _mm512_div_ps(r##3, lv));          \
  } while (0)

// rows: 1 or 4 (a tile of 2 or 3 rows passes zero weights and scratch outputs for the rest)
template <int R>
__attribute__((target("avx512f"))) void values64_avx512(const float* values, int64_t sv, int64_t dv,
                                                        const float* const* p, float* const* out, const float* l,
                                                        int64_t col0, int64_t lo, int64_t hi) {
  static_assert(R == 1 || R == 4, "values64_avx512: 1 or 4 rows");
  const __mmask16 in0 = first_lanes(dv - col0), in1 = first_lanes(dv - col0 - 16), in2 = first_lanes(dv - col0 - 32),
                  in3 = first_lanes(dv - col0 - 48);
  Q4_ROW_ACC(a);
  Q4_ROW_ACC(b);
  Q4_ROW_ACC(c);
  Q4_ROW_ACC(d);
  for (int64_t j = lo; j < hi; ++j) {
    const float* v = values + j * sv + col0;
    const __m512 v0 = _mm512_maskz_loadu_ps(in0, v), v1 = _mm512_maskz_loadu_ps(in1, v + 16),
                 v2 = _mm512_maskz_loadu_ps(in2, v + 32), v3 = _mm512_maskz_loadu_ps(in3, v + 48);
    Q4_ROW_FMA(a, p[0]);
    if (R == 4) {
      Q4_ROW_FMA(b, p[1]);
      Q4_ROW_FMA(c, p[2]);
      Q4_ROW_FMA(d, p[3]);
    }
  }
  Q4_ROW_STORE(a, out[0], l[0]);
  if (R == 4) {
    Q4_ROW_STORE(b, out[1], l[1]);
    Q4_ROW_STORE(c, out[2], l[2]);
    Q4_ROW_STORE(d, out[3], l[3]);
  }
}
#undef Q4_ROW_ACC
#undef Q4_ROW_FMA
#undef Q4_ROW_STORE

// p of each row is 0 outside its own chunks within [lo, hi) (tile_values_avx512 clears it there).
void tile_values_avx512(const AttentionCall& c, const AttentionRow* rows, int nrows, float* const* p,
                        const float* l, int64_t lo, int64_t hi, float* zeros, float* scratch) {
  const float* pp[4];
  float* out[4];
  float ll[4];
  for (int r = 0; r < 4; ++r) {
    pp[r] = r < nrows ? p[r] : zeros;
    out[r] = r < nrows ? rows[r].out : scratch;
    ll[r] = r < nrows ? l[r] : 1.0f;
  }
  for (int64_t col0 = 0; col0 < c.dv; col0 += 64) {
    if (nrows == 1) values64_avx512<1>(rows[0].v, c.vs[2], c.dv, pp, out, ll, col0, lo, hi);
    else values64_avx512<4>(rows[0].v, c.vs[2], c.dv, pp, out, ll, col0, lo, hi);
  }
}

constexpr int kTileRows = 4;  // query rows sharing each value load

// Rows [i0, i0 + nrows) of one (batch, head); buf: (kTileRows + 1) x round_up(lk, 16) + dv floats,
// the last round_up(lk, 16) + dv of them zeros.
void attention_tile(const AttentionCall& c, int64_t bi, int64_t head, int64_t i0, int nrows, bool simd, float* buf) {
  const int64_t kh = head / (c.h / c.hk), stride = round_up(c.lk, 16);
  AttentionRow rows[kTileRows];
  float* p[kTileRows];
  float l[kTileRows];
  int live = 0;  // rows with an allowed key, first; the others are zeros
  for (int r = 0; r < nrows; ++r) {
    AttentionRow row;
    row.i = i0 + r;
    row.q = c.q + bi * c.qs[0] + head * c.qs[1] + row.i * c.qs[2];
    row.k = c.k + bi * c.ks[0] + kh * c.ks[1];
    row.v = c.v + bi * c.vs[0] + kh * c.vs[1];
    row.mask = c.mask == nullptr ? nullptr
                                 : c.mask + (bi * c.ms[0] + head * c.ms[1] + row.i * c.ms[2]) * c.mask_elem;
    row.out = c.out + ((bi * c.h + head) * c.lq + row.i) * c.dv;
    find_range(c, &row);
    float* pr = buf + live * stride;
    const float m = row.lo == row.hi ? neg_inf() : simd ? row_scores_avx512(c, row, pr) : row_scores_scalar(c, row, pr);
    if (m == neg_inf()) {
      for (int64_t col = 0; col < c.dv; ++col) row.out[col] = 0.0f;
      continue;
    }
    l[live] = simd ? row_softmax_avx512(row, pr, m) : row_softmax_scalar(row, pr, m);
    p[live] = pr;
    rows[live++] = row;
  }
  if (live == 0) return;
  if (!simd) {
    tile_values_scalar(c, rows, live, p, l);
    return;
  }
  int64_t lo = rows[0].lo / 16 * 16, hi = round_up(rows[0].hi, 16);  // the rows' chunks, together
  for (int r = 1; r < live; ++r) {
    lo = std::min(lo, rows[r].lo / 16 * 16);
    hi = std::max(hi, round_up(rows[r].hi, 16));
  }
  for (int r = 0; r < live; ++r) {  // p = 0 outside the row's own chunks (inside them: exp(-inf) = 0)
    std::fill(p[r] + lo, p[r] + rows[r].lo / 16 * 16, 0.0f);
    std::fill(p[r] + round_up(rows[r].hi, 16), p[r] + hi, 0.0f);
  }
  float* zeros = buf + kTileRows * stride;  // stride floats of 0, then dv of scratch output
  tile_values_avx512(c, rows, live, p, l, lo, std::min(hi, c.lk), zeros, zeros + stride);
}

at::Tensor attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                     const c10::optional<at::Tensor>& attn_mask, bool is_causal, c10::optional<double> scale,
                     bool force_scalar) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"query", &q_in}, {"key", &k_in},
                                {"value", &v_in}}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 4, "q4_cpu::attention: argument '", name,
                "' must be a float32 tensor [batch, heads, length, dim], got ", t->scalar_type(), " tensor of shape ",
                t->sizes());
    TORCH_CHECK(t->device().is_cpu(), "q4_cpu::attention: argument '", name, "' must be on the CPU, got ",
                t->device());
  }
  const int64_t b = q_in.size(0), h = q_in.size(1), lq = q_in.size(2), d = q_in.size(3);
  const int64_t hk = k_in.size(1), lk = k_in.size(2), dv = v_in.size(3);
  TORCH_CHECK(k_in.size(0) == b && v_in.size(0) == b && k_in.size(3) == d && v_in.size(1) == hk &&
                  v_in.size(2) == lk && hk >= 1 && h % hk == 0,
              "q4_cpu::attention: key ", k_in.sizes(), " and value ", v_in.sizes(), " must match query ",
              q_in.sizes(), ": the same batch, key and value the same heads (dividing the query's) and length, key "
              "the query's dim");
  // the last dim contiguous (rows of q, k, v read as float vectors); other strides as they come
  const at::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  const at::Tensor k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const at::Tensor v = v_in.stride(3) == 1 ? v_in : v_in.contiguous();
  at::Tensor mask;
  if (attn_mask.has_value()) {
    TORCH_CHECK(attn_mask->scalar_type() == at::kBool || attn_mask->scalar_type() == at::kFloat,
                "q4_cpu::attention: argument 'attn_mask' must be a bool or float32 tensor, got ",
                attn_mask->scalar_type());
    TORCH_CHECK(attn_mask->device().is_cpu(), "q4_cpu::attention: argument 'attn_mask' must be on the CPU");
    mask = attn_mask->expand({b, h, lq, lk});  // a view: broadcast dims get stride 0
  }
  at::Tensor out = at::empty({b, h, lq, dv}, q.options());
  if (out.numel() == 0) return out;
  AttentionCall c;
  c.q = q.data_ptr<float>();
  c.k = k.data_ptr<float>();
  c.v = v.data_ptr<float>();
  c.out = out.data_ptr<float>();
  c.mask = mask.defined() ? static_cast<const char*>(mask.data_ptr()) : nullptr;
  c.mask_elem = mask.defined() ? static_cast<int64_t>(mask.element_size()) : 0;
  c.mask_is_bool = mask.defined() && mask.scalar_type() == at::kBool;
  c.causal = is_causal;
  c.h = h, c.hk = hk, c.lq = lq, c.lk = lk, c.d = d, c.dv = dv;
  for (int i = 0; i < 3; ++i) c.qs[i] = q.stride(i), c.ks[i] = k.stride(i), c.vs[i] = v.stride(i);
  for (int i = 0; i < 4; ++i) c.ms[i] = mask.defined() ? mask.stride(i) : 0;
  c.scale = static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(d)));
  const bool simd = has_avx512() && !force_scalar;
  const int64_t tiles = (lq + kTileRows - 1) / kTileRows;
  at::parallel_for(0, b * h * tiles, 1, [&](int64_t t0, int64_t t1) {
    // kTileRows rows of p, a row of zeros, a scratch output row
    std::vector<float> buf(static_cast<size_t>((kTileRows + 1) * round_up(lk, 16) + dv), 0.0f);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i0 = t % tiles * kTileRows;
      attention_tile(c, t / (h * tiles), t / tiles % h, i0, static_cast<int>(std::min<int64_t>(kTileRows, lq - i0)),
                     simd, buf.data());
    }
  });
  return out;
}

std::string isa() { return has_vnni() ? "avx512vnni" : "scalar"; }

}  // namespace

TORCH_LIBRARY(q4_cpu, m) {
  m.def("linear_w4a4(Tensor x_codes, Tensor w_packed, Tensor w_step, Tensor a_step, Tensor? bias, "
        "ScalarType out_dtype, bool force_scalar=False, int[]? w_values=None, Tensor? w_mult=None) -> Tensor");
  m.def("linear_w4a16(Tensor x, Tensor w_packed, Tensor w_step, Tensor? bias, ScalarType out_dtype, "
        "bool force_scalar=False, Tensor? w_mult=None) -> Tensor");
  m.def("hadamard(Tensor x, int n, bool force_scalar=False) -> Tensor");
  m.def("kron_factor(Tensor x, Tensor factor, int inner, bool force_scalar=False) -> Tensor");
  m.def("attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, bool is_causal=False, "
        "float? scale=None, bool force_scalar=False) -> Tensor");
  m.def("isa() -> str", [] { return isa(); });
}

TORCH_LIBRARY_IMPL(q4_cpu, CPU, m) {
  m.impl("linear_w4a4", &linear_w4a4);
  m.impl("linear_w4a16", &linear_w4a16);
  m.impl("hadamard", &hadamard);
  m.impl("kron_factor", &kron_factor);
  m.impl("attention", &attention);
}
