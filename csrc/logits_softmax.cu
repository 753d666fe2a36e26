// From-logits forward (logsumexp + target logit) and backward (grad * (onehot - softmax)).
//
// One block per row. A row is read as a scalar head up to the first 128-byte boundary, 16-byte
// vectors (kUnroll of them in flight per thread), and a scalar tail, so any vocab size and any
// row alignment work. Both passes are memory bound: forward reads the row once (online max and
// sum-exp per thread, then warp and block reductions), backward reads and writes it once.
#include "logits_softmax.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

namespace nca {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// 16 bytes of T: 4 float32 or 8 half/bfloat16, loaded and stored as one vector.
template <typename T>
struct alignas(16) Vec {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// Columns [0, head) and [tail, vocab) are scalar; [head, tail) is nvec 16-byte vectors starting on a
// 128-byte line, so that each warp's 512-byte access covers whole lines even when rows are not
// aligned (odd vocab sizes). vectorize=false makes the whole row scalar (used when input and
// output rows differ in alignment).
template <typename T>
struct RowSplit {
  int64_t head, nvec, tail;

  __device__ RowSplit(const void* row, int64_t vocab, bool vectorize) {
    constexpr int64_t kLine = 128 / sizeof(T);
    const int64_t skew = static_cast<int64_t>(reinterpret_cast<uintptr_t>(row) % 128) / sizeof(T);
    head = vectorize ? min(vocab, (kLine - skew) % kLine) : vocab;
    nvec = (vocab - head) / Vec<T>::kSize;
    tail = head + nvec * Vec<T>::kSize;
  }
};

// (max, sum of exp(x - max)) of a set of values; the empty set is (-inf, 0).
struct MaxSum {
  float m = -INFINITY;
  float s = 0.f;

  __device__ __forceinline__ void merge(float m2, float s2) {
    const float mx = fmaxf(m, m2);
    if (mx == -INFINITY) return;  // both empty (or all -inf)
    s = s * __expf(m - mx) + s2 * __expf(m2 - mx);
    m = mx;
  }

  template <int N>
  __device__ __forceinline__ void add(const float (&x)[N]) {
    float vmax = x[0];
#pragma unroll
    for (int i = 1; i < N; ++i) vmax = fmaxf(vmax, x[i]);
    const float mx = fmaxf(m, vmax);
    if (mx == -INFINITY) return;
    float sum = s * __expf(m - mx);
#pragma unroll
    for (int i = 0; i < N; ++i) sum += __expf(x[i] - mx);
    m = mx;
    s = sum;
  }
};

// Block-wide merge of every thread's MaxSum; the result is valid in thread 0.
__device__ __forceinline__ MaxSum block_reduce(MaxSum acc) {
  __shared__ float shared_m[kWarps], shared_s[kWarps];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    acc.merge(__shfl_xor_sync(0xffffffffu, acc.m, off), __shfl_xor_sync(0xffffffffu, acc.s, off));
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    shared_m[warp] = acc.m;
    shared_s[warp] = acc.s;
  }
  __syncthreads();
  MaxSum out;
  if (warp == 0) {
    if (lane < kWarps) out.merge(shared_m[lane], shared_s[lane]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      out.merge(__shfl_xor_sync(0xffffffffu, out.m, off), __shfl_xor_sync(0xffffffffu, out.s, off));
    }
  }
  return out;
}

// f(j) for the row's scalar columns, [0, head) and [tail, vocab), strided over the block.
template <typename T, typename F>
__device__ __forceinline__ void for_each_scalar(const RowSplit<T>& split, int64_t vocab, F&& f) {
  for (int64_t j = threadIdx.x; j < split.head; j += kThreads) f(j);
  for (int64_t j = split.tail + threadIdx.x; j < vocab; j += kThreads) f(j);
}

// f(i, v) for each 16-byte vector v = vrow[i], i < nvec, strided over the block; every thread has
// kUnroll loads in flight before it calls f on them.
template <typename T, typename F>
__device__ __forceinline__ void for_each_vector(const Vec<T>* vrow, int64_t nvec, F&& f) {
  for (int64_t base = threadIdx.x; base < nvec; base += kThreads * kUnroll) {
    Vec<T> v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + u * kThreads < nvec) v[u] = vrow[base + u * kThreads];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + u * kThreads < nvec) f(base + u * kThreads, v[u]);
    }
  }
}

// grid: (n_sel,), block: (kThreads,).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ logits, int64_t stride, int64_t vocab, const int64_t* __restrict__ index,
                   const int64_t* __restrict__ targets, float* __restrict__ lse, float* __restrict__ tgt) {
  using V = Vec<T>;
  const int64_t n = blockIdx.x;
  const T* row = logits + (index ? index[n] : n) * stride;
  const RowSplit<T> split(row, vocab, true);
  MaxSum acc;
  for_each_scalar(split, vocab, [&](int64_t j) { acc.add<1>({to_float(row[j])}); });
  for_each_vector(reinterpret_cast<const V*>(row + split.head), split.nvec, [&](int64_t, const V& v) {
    float x[V::kSize];
#pragma unroll
    for (int i = 0; i < V::kSize; ++i) x[i] = to_float(v.v[i]);
    acc.add(x);
  });
  acc = block_reduce(acc);
  if (threadIdx.x == 0) {
    lse[n] = acc.m + logf(acc.s);
    tgt[n] = to_float(row[targets[n]]);
  }
}

// grid: (rows,), block: (kThreads,). `in` and `out` may alias, so no __restrict__.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const T* logits, int64_t stride, T* out, int64_t out_stride, int64_t vocab,
                    const int64_t* __restrict__ pos, const int64_t* __restrict__ targets,
                    const float* __restrict__ lse, const float* __restrict__ grad) {
  using V = Vec<T>;
  const int64_t r = blockIdx.x;
  const int64_t n = pos ? pos[r] : r;
  const T* in = logits + r * stride;
  T* dst = out + r * out_stride;
  const bool same_skew = reinterpret_cast<uintptr_t>(in) % 16 == reinterpret_cast<uintptr_t>(dst) % 16;
  const RowSplit<T> split(dst, vocab, same_skew);
  V* vdst = reinterpret_cast<V*>(dst + split.head);

  if (n < 0) {  // row outside the selection: zero
    for_each_scalar(split, vocab, [&](int64_t j) { dst[j] = from_float<T>(0.f); });
    V zero;
#pragma unroll
    for (int i = 0; i < V::kSize; ++i) zero.v[i] = from_float<T>(0.f);
    for (int64_t i = threadIdx.x; i < split.nvec; i += kThreads) vdst[i] = zero;
    return;
  }

  const float g = grad[n], shift = lse[n];
  const int64_t y = targets[n];
  auto value = [&](int64_t j, float x) { return (j == y ? g : 0.f) - g * __expf(x - shift); };
  for_each_scalar(split, vocab, [&](int64_t j) { dst[j] = from_float<T>(value(j, to_float(in[j]))); });
  for_each_vector(reinterpret_cast<const V*>(in + split.head), split.nvec, [&](int64_t i, V v) {
    const int64_t j0 = split.head + i * V::kSize;
#pragma unroll
    for (int k = 0; k < V::kSize; ++k) v.v[k] = from_float<T>(value(j0 + k, to_float(v.v[k])));
    vdst[i] = v;
  });
}

template <typename T>
cudaError_t launch_forward(const void* logits, int64_t stride, int64_t vocab, const int64_t* index,
                           const int64_t* targets, int64_t n_sel, float* lse, float* tgt, cudaStream_t stream) {
  forward_kernel<T><<<static_cast<unsigned>(n_sel), kThreads, 0, stream>>>(
      static_cast<const T*>(logits), stride, vocab, index, targets, lse, tgt);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const void* logits, int64_t stride, void* out, int64_t out_stride, int64_t vocab,
                            int64_t rows, const int64_t* pos, const int64_t* targets, const float* lse,
                            const float* grad, cudaStream_t stream) {
  backward_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      static_cast<const T*>(logits), stride, static_cast<T*>(out), out_stride, vocab, pos, targets, lse, grad);
  return cudaGetLastError();
}

constexpr int64_t kMaxGrid = 2147483647;  // gridDim.x limit

}  // namespace

cudaError_t logits_forward(DType dtype, const void* logits, int64_t stride, int64_t vocab, const int64_t* index,
                           const int64_t* targets, int64_t n_sel, float* lse, float* tgt, cudaStream_t stream) {
  if (n_sel <= 0 || vocab <= 0) return cudaSuccess;
  if (n_sel > kMaxGrid) return cudaErrorInvalidConfiguration;
  switch (dtype) {
    case DType::kFloat32: return launch_forward<float>(logits, stride, vocab, index, targets, n_sel, lse, tgt, stream);
    case DType::kFloat16: return launch_forward<__half>(logits, stride, vocab, index, targets, n_sel, lse, tgt, stream);
    case DType::kBFloat16:
      return launch_forward<__nv_bfloat16>(logits, stride, vocab, index, targets, n_sel, lse, tgt, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t logits_backward(DType dtype, const void* logits, int64_t stride, void* out, int64_t out_stride,
                            int64_t vocab, int64_t rows, const int64_t* pos, const int64_t* targets, const float* lse,
                            const float* grad, cudaStream_t stream) {
  if (rows <= 0 || vocab <= 0) return cudaSuccess;
  if (rows > kMaxGrid) return cudaErrorInvalidConfiguration;
  switch (dtype) {
    case DType::kFloat32:
      return launch_backward<float>(logits, stride, out, out_stride, vocab, rows, pos, targets, lse, grad, stream);
    case DType::kFloat16:
      return launch_backward<__half>(logits, stride, out, out_stride, vocab, rows, pos, targets, lse, grad, stream);
    case DType::kBFloat16:
      return launch_backward<__nv_bfloat16>(logits, stride, out, out_stride, vocab, rows, pos, targets, lse, grad,
                                            stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace nca
