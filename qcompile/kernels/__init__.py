"""The q4 custom ops (torch.library) and their kernels: CPU integer, Triton, and plain-torch references.

    int4         the packed int4 weight format: pack_int4 / unpack_int4 / quantize_weight_per_channel
    formats      number formats of codes: int, and the 4-bit floats E2M1 / E3M0 / E1M2 (LLM-FP4)
    ops          torch.ops.q4.{quantize_per_tensor, dequantize_per_tensor, dequantize_weight_int4,
                 linear_w4a4, linear_w4a16, linear_w4a4_triton, linear_w4a4_tiled}: schemas, fake impls, CPU integer
                 kernels, the CUDA kernel of linear_w4a4 (Triton) (import it to register them)
    cpu_kernels  torch.ops.q4_cpu: C++ decode kernels (AVX512-VNNI) reading packed int4 weights,
                 built on first use (csrc/q4_cpu.cpp)
    checks       argument checks shared by the ops and the Triton launchers (KernelArgumentError)
    rotation     q4.rotate: Kronecker-factored Hadamard-like rotations, and their ATen decomposition
    triton_gemm  Triton GEMMs over packed 4-bit weights: W4A4/W4A8/FP4, W4A16 (imported on first use)
    triton_tiled_gemm  the tuned Triton W4A4 GEMM over the tiled weight layout: split-K at decode,
                 tile configs per shape class (imported on first use)
    gpu_layout   the tiled GPU layout of a packed weight (K-major, chunk-interleaved nibbles)
    triton_norm  Triton RMSNorm / LayerNorm fused with the static activation quantize
    reference    plain-torch twins of every op and kernel (an independent integer route)
"""
