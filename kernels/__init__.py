"""The q4 custom ops (torch.library) and their kernels: CPU integer, Triton, and plain-torch references.

    int4       the packed int4 weight format: pack_int4 / unpack_int4 / quantize_weight_per_channel
    ops        torch.ops.q4.{quantize_per_tensor, dequantize_per_tensor, dequantize_weight_int4,
               linear_w4a4}: schemas, fake impls, CPU integer kernels (import it to register them)
    reference  plain-torch twins of every op (an independent integer route) and fake_quant_linear_ref
"""
