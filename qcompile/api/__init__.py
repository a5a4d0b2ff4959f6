"""The user API: quantize / save / load, explain, the pass-test helper. Built on the backend."""
