"""tsfast: train GPT models on TinyStories fast, with Triton kernels behind a torch fallback.

Importing tsfast never imports Triton, launches a kernel or touches the network.
"""

__version__ = "0.1.0"
