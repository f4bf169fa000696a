"""Test-wide setup for the Triton kernels (tests/test_kernels.py).

Without a GPU the kernels can only run under Triton's interpreter, which `triton.jit` selects at decoration
time: TRITON_INTERPRET must be set before `groupclip.kernels.triton_ops` is first imported, i.e. here. The
kernels are only used on the CPU when a test forces them, so this changes nothing for the other tests.

With numpy 2.x the triton 3.6 interpreter fails on `range(0, N, BK)` with a runtime int N ("only
0-dimensional arrays can be converted to Python scalars"): give interpreted tensors an `__index__`.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton.runtime.interpreter as _ti

    _orig_patch = _ti._patch_lang_tensor
except (ImportError, AttributeError):  # no Triton, or a version without this private hook
    _orig_patch = None

if _orig_patch is not None and not getattr(_orig_patch, "_groupclip_index", False):

    def _patch_lang_tensor(tensor, scope):
        _orig_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _patch_lang_tensor._groupclip_index = True
    _ti._patch_lang_tensor = _patch_lang_tensor
