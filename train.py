# `uv run train.py` reads this block (PEP 723) and sets up an environment with only what
# training needs; add an extra with `--with`, e.g. `uv run --with 'tinystories-fast[hf]' train.py`.
# /// script
# requires-python = ">=3.11"
# dependencies = ["tinystories-fast"]
#
# [tool.uv.sources]
# tinystories-fast = { path = ".", editable = true }
# ///
"""Train a GPT on TinyStories: `uv run train.py --help` lists the flags.

    uv run train.py                                  # tiny on a CPU, baby_gpu on a CUDA GPU
    uv run train.py --config gpt2 --kernels triton
    torchrun --standalone --nproc_per_node=8 train.py --config gpt2
"""

import os
import sys

# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other work, spinning
# threads made training steps up to 6x slower (measured on 2 busy cores). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tsfast.train.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
