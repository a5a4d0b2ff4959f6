"""The q4 torch.compile backend."""
