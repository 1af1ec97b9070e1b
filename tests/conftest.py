"""Set-up for the whole test session.

Triton decorates its own standard library (``tl.zeros``, ``tl.cdiv``, …) when it is first imported,
in the mode ``TRITON_INTERPRET`` says then. torch imports Triton as a side effect (``torch._dynamo``)
long before a test module switches the interpreter on for its kernels, and an interpreted kernel
calling a compiled standard-library function fails ("Cannot call @triton.jit'd outside of the scope
of a kernel") — so whether the interpreter tests passed depended on which tests ran first. Without
a GPU the interpreter is the only way Triton runs here: import it in that mode before anything else
does. The variable itself is left unset; the modules that test kernels set it, and the ones that
test refusals without it unset it. On a GPU machine Triton is imported normally (compiled kernels).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    except ImportError:  # no Triton: its tests say so themselves
        pass
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous

from dsray import kernel_build, onednn  # noqa: E402  (after Triton, as the docstring says)


@pytest.fixture(params=kernel_build.cpu_isas() or ["none"])
def kernel_isa(request, monkeypatch):
    """Each instruction set this CPU runs dsray's CPU kernels on (``kernel_build.cpu_isas``), in turn:
    on an AVX512-BF16 machine the AVX2 build is held to the same reference as well. The kernels take
    every row count they are for, AMX or not (``onednn.takes`` is off; its own tests turn
    it on)."""
    monkeypatch.setattr(onednn, "amx", lambda: False)
    if request.param == "none":
        yield None
        return
    with kernel_build.using_isa(request.param):
        yield request.param
