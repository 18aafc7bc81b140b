"""Llama 3.2 Vision (mllama) on ggml: the parts built so far (image preparation)."""
