"""Hand-written Triton kernels, one file per op family.

Lives at `tsfast.kernels` (not a top-level `kernels`) because that import name belongs to
the Hugging Face `kernels` package. Nothing here is imported by `import tsfast`; the
dispatch layer (`tsfast.ops`) imports a kernel module on first use.
"""
