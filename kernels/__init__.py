"""The q4 custom ops (torch.library) and their kernels: CPU integer, Triton, and plain-torch references."""
