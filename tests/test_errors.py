"""Invalid inputs raise RuntimeError with a message naming the op and the argument
(the messages of csrc/include/anyexperts/checks.h), from the CPU kernels and, message for
message, from the fake implementations (python/anyexperts_ops/checks.py) that torch.compile
and meta tensors run instead."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import assert_exact, dispatch_to, requires_cuda

ops = torch.ops.anyexperts
I32, I64, F32 = torch.int32, torch.int64, torch.float32


def z(*shape, dtype=F32, device="cpu"):
    return torch.zeros(shape, dtype=dtype, device=device)


def topk(logits=None, slots=None, mv=None, k_max=2, num_real=3, norm="none"):
    logits = z(4, 5) if logits is None else logits
    slots = z(4, dtype=I32) if slots is None else slots
    mv = z(4, dtype=I32) if mv is None else mv
    return lambda: ops.segmented_topk(logits, slots, mv, k_max, num_real, norm)


def topk_bwd(gw=None, logits=None, ids=None, num_real=3, norm="none"):
    gw = z(4, 2) if gw is None else gw
    logits = z(4, 5) if logits is None else logits
    ids = z(4, 2, dtype=I32) if ids is None else ids
    return lambda: ops.segmented_topk_backward(gw, logits, ids, num_real, norm)


def perm(x=None, ids=None, num_real=3, align=1):
    x = z(4, 6) if x is None else x
    ids = z(4, 2, dtype=I32) if ids is None else ids
    return lambda: ops.permute(x, ids, num_real, align)


def gmm(a=None, b=None, off=None):
    a = z(10, 4) if a is None else a
    b = z(3, 4, 5) if b is None else b
    off = z(3, dtype=I32) if off is None else off
    return lambda: ops.grouped_mm(a, b, off)


def wgrad(a=None, dout=None, off=None):
    a = z(10, 4) if a is None else a
    dout = z(10, 5) if dout is None else dout
    off = z(3, dtype=I32) if off is None else off
    return lambda: ops.grouped_mm_wgrad(a, dout, off)


def unperm(y=None, rows=None, w=None):
    y = z(12, 6) if y is None else y
    rows = z(4, 3, dtype=I32) if rows is None else rows
    w = z(4, 3) if w is None else w
    return lambda: ops.unpermute(y, rows, w)


def unperm_bwd(g=None, y=None, rows=None, w=None):
    g = z(4, 6) if g is None else g
    y = z(12, 6) if y is None else y
    rows = z(4, 3, dtype=I32) if rows is None else rows
    w = z(4, 3) if w is None else w
    return lambda: ops.unpermute_backward(g, y, rows, w)


def swiglu(gu=None, off=None):
    gu = z(10, 8) if gu is None else gu
    off = z(3, dtype=I32) if off is None else off
    return lambda: ops.swiglu(gu, off)


def swiglu_bwd(g=None, gu=None, off=None):
    g = z(10, 4) if g is None else g
    gu = z(10, 8) if gu is None else gu
    off = z(3, dtype=I32) if off is None else off
    return lambda: ops.swiglu_backward(g, gu, off)


def hsm(x=None, a=None):
    x = z(4, 6) if x is None else x
    a = z(4) if a is None else a
    return lambda: ops.hsm(x, a)


def hsm_bwd(g=None, x=None, a=None):
    g = z(4, 6) if g is None else g
    x = z(4, 6) if x is None else x
    a = z(4) if a is None else a
    return lambda: ops.hsm_backward(g, x, a)


FLOATS = "must be float16, bfloat16, float32 or float64"
A_DTYPE = "a must be float32 (or float64 with float64 data)"
NORM_MSG = "norm must be 'none', 'selected' or 'real', got 'softmax'"

CASES = {
    # segmented_topk
    "topk-logits-dtype": (topk(logits=z(4, 5, dtype=I32)), f"segmented_topk: logits {FLOATS}"),
    "topk-logits-rank": (topk(logits=z(4, 5, 1)), "segmented_topk: logits must be 2-D, got 3-D"),
    "topk-slots-dtype": (topk(slots=z(4, dtype=I64)), "segmented_topk: slots must be int32"),
    "topk-slots-rank": (topk(slots=z(4, 1, dtype=I32)), "segmented_topk: slots must be 1-D"),
    "topk-mv-dtype": (topk(mv=z(4)), "segmented_topk: max_virtual must be int32"),
    "topk-slots-len": (topk(slots=z(3, dtype=I32)),
                       "segmented_topk: slots and max_virtual must have one entry per token"),
    "topk-mv-len": (topk(mv=z(5, dtype=I32)),
                    "segmented_topk: slots and max_virtual must have one entry per token"),
    "topk-kmax": (topk(k_max=-1), "segmented_topk: k_max must be >= 0, got -1"),
    "topk-kmax-int32": (topk(k_max=2**31), "segmented_topk: k_max must fit in int32"),
    "topk-num-real-neg": (topk(num_real=-1), "segmented_topk: num_real must be in [0, E]"),
    "topk-num-real-big": (topk(num_real=6), "segmented_topk: num_real must be in [0, E]"),
    "topk-norm": (topk(norm="softmax"), f"segmented_topk: {NORM_MSG}"),
    # segmented_topk_backward
    "topkb-gw-shape": (topk_bwd(gw=z(4, 3)),
                       "segmented_topk_backward: grad_weights must have the shape of ids"),
    "topkb-gw-dtype": (topk_bwd(gw=z(4, 2, dtype=I32)),
                       f"segmented_topk_backward: grad_weights {FLOATS}"),
    "topkb-logits-dtype": (topk_bwd(logits=z(4, 5, dtype=I64)),
                           f"segmented_topk_backward: logits {FLOATS}"),
    "topkb-ids-dtype": (topk_bwd(ids=z(4, 2, dtype=I64)),
                        "segmented_topk_backward: ids must be int32"),
    "topkb-ids-rows": (topk_bwd(gw=z(3, 2), ids=z(3, 2, dtype=I32)),
                       "segmented_topk_backward: ids must have one row per token"),
    "topkb-num-real": (topk_bwd(num_real=9), "segmented_topk_backward: num_real must be in [0, E]"),
    "topkb-norm": (topk_bwd(norm="softmax"), NORM_MSG),
    # permute
    "permute-x-dtype": (perm(x=z(4, 6, dtype=I32)), f"permute: x {FLOATS}"),
    "permute-x-rank": (perm(x=z(4)), "permute: x must be 2-D, got 1-D"),
    "permute-ids-dtype": (perm(ids=z(4, 2, dtype=I64)), "permute: ids must be int32"),
    "permute-ids-rank": (perm(ids=z(4, dtype=I32)), "permute: ids must be 2-D, got 1-D"),
    "permute-ids-rows": (perm(ids=z(5, 2, dtype=I32)), "permute: ids must have one row per token"),
    "permute-num-real": (perm(num_real=-1), "permute: num_real must be >= 0, got -1"),
    "permute-align": (perm(align=0), "permute: align must be >= 1, got 0"),
    "permute-R-int32": (perm(num_real=2, align=2**30 + 1), "must fit in int32"),
    # num_real * (align - 1) overflows int64 (a wrapped R must not size the output)
    "permute-R-overflow": (perm(num_real=2, align=2**63 - 1), "R = T*K + num_real*(align-1)"),
    "permute-R-wraps-small": (perm(num_real=4, align=2**62 + 1), "R = T*K + num_real*(align-1)"),
    "permute-num-real-int32": (perm(num_real=2**31), "permute: num_real must fit in int32"),
    # grouped_mm
    "gmm-a-dtype": (gmm(a=z(10, 4, dtype=I32)), f"grouped_mm: a {FLOATS}"),
    "gmm-a-rank": (gmm(a=z(10, 4, 1)), "grouped_mm: a must be 2-D, got 3-D"),
    "gmm-b-rank": (gmm(b=z(4, 5)), "grouped_mm: b must be 3-D, got 2-D"),
    "gmm-off-dtype": (gmm(off=z(3, dtype=I64)), "grouped_mm: offsets must be int32"),
    "gmm-off-rank": (gmm(off=z(3, 1, dtype=I32)), "grouped_mm: offsets must be 1-D"),
    "gmm-ab-dtype": (gmm(b=z(3, 4, 5, dtype=torch.bfloat16)),
                     "grouped_mm: a and b must have the same dtype"),
    "gmm-K": (gmm(b=z(3, 5, 4)), "grouped_mm: a[R,K] and b[G,K,N] must agree on K"),
    "gmm-G": (gmm(off=z(2, dtype=I32)), "grouped_mm: offsets must have one entry per group"),
    "gmm-G-long": (gmm(off=z(4, dtype=I32)), "grouped_mm: offsets must have one entry per group"),
    # grouped_mm_wgrad
    "wgrad-a-dtype": (wgrad(a=z(10, 4, dtype=I32)), f"grouped_mm_wgrad: a {FLOATS}"),
    "wgrad-dout-rank": (wgrad(dout=z(10, 5, 1)), "grouped_mm_wgrad: dout must be 2-D"),
    "wgrad-off-dtype": (wgrad(off=z(3, dtype=I64)), "grouped_mm_wgrad: offsets must be int32"),
    "wgrad-dtype": (wgrad(dout=z(10, 5, dtype=torch.float64)),
                    "grouped_mm_wgrad: a and dout must have the same dtype"),
    "wgrad-rows": (wgrad(dout=z(9, 5)), "grouped_mm_wgrad: a and dout must have the same rows"),
    "wgrad-rows-more": (wgrad(dout=z(11, 5)),
                        "grouped_mm_wgrad: a and dout must have the same rows"),
    # swiglu
    "swiglu-gu-dtype": (swiglu(gu=z(10, 8, dtype=I32)), f"swiglu: gu {FLOATS}"),
    "swiglu-gu-rank": (swiglu(gu=z(10, 8, 1)), "swiglu: gu must be 2-D, got 3-D"),
    "swiglu-gu-odd": (swiglu(gu=z(10, 7)), "swiglu: gu must be [R, 2F] ([gate | up]), got an odd width 7"),
    "swiglu-off-dtype": (swiglu(off=z(3, dtype=I64)), "swiglu: offsets must be int32"),
    "swiglu-off-rank": (swiglu(off=z(3, 1, dtype=I32)), "swiglu: offsets must be 1-D"),
    # swiglu_backward
    "swiglub-g-shape": (swiglu_bwd(g=z(10, 8)), "swiglu_backward: grad_h must be [R, F] = [10, 4]"),
    "swiglub-g-rows": (swiglu_bwd(g=z(9, 4)), "swiglu_backward: grad_h must be [R, F] = [10, 4]"),
    "swiglub-g-dtype": (swiglu_bwd(g=z(10, 4, dtype=torch.bfloat16)),
                        "swiglu_backward: grad_h must have gu's dtype"),
    "swiglub-g-int": (swiglu_bwd(g=z(10, 4, dtype=I32)), f"swiglu_backward: grad_h {FLOATS}"),
    "swiglub-gu-odd": (swiglu_bwd(gu=z(10, 9)), "swiglu_backward: gu must be [R, 2F]"),
    "swiglub-off-dtype": (swiglu_bwd(off=z(3, dtype=I64)), "swiglu_backward: offsets must be int32"),
    # hsm
    "hsm-x-dtype": (hsm(x=z(4, 6, dtype=I32)), f"hsm: x {FLOATS}"),
    "hsm-x-rank": (hsm(x=z(4, 6, 1)), "hsm: x must be 2-D, got 3-D"),
    "hsm-x-complex": (hsm(x=z(4, 6, dtype=torch.complex64)), f"hsm: x {FLOATS}, got ComplexFloat"),
    "hsm-a-rank": (hsm(a=z(4, 1)), "hsm: a must be 1-D, got 2-D"),
    "hsm-a-len": (hsm(a=z(5)), "hsm: a must have one entry per row of x (4), got 5"),
    "hsm-a-bf16": (hsm(x=z(4, 6, dtype=torch.bfloat16), a=z(4, dtype=torch.bfloat16)),
                   f"hsm: {A_DTYPE}, got BFloat16"),
    "hsm-a-fp64-on-fp32": (hsm(a=z(4, dtype=torch.float64)), f"hsm: {A_DTYPE}, got Double"),
    "hsm-a-int": (hsm(a=z(4, dtype=I32)), f"hsm: {A_DTYPE}"),
    # hsm_backward
    "hsmb-g-shape": (hsm_bwd(g=z(4, 5)),
                     "hsm_backward: grad must have x's shape [4, 6], got [4, 5]"),
    "hsmb-g-dtype": (hsm_bwd(g=z(4, 6, dtype=torch.float64)),
                     "hsm_backward: grad must have x's dtype Float, got Double"),
    "hsmb-g-int": (hsm_bwd(g=z(4, 6, dtype=I32)), f"hsm_backward: grad {FLOATS}"),
    "hsmb-x-rank": (hsm_bwd(x=z(24)), "hsm_backward: x must be 2-D, got 1-D"),
    "hsmb-a-len": (hsm_bwd(a=z(3)), "hsm_backward: a must have one entry per row of x"),
    "hsmb-a-dtype": (hsm_bwd(a=z(4, dtype=torch.float16)), f"hsm_backward: {A_DTYPE}"),
    # unpermute
    "unperm-y-dtype": (unperm(y=z(12, 6, dtype=I64)), f"unpermute: y {FLOATS}"),
    "unperm-y-rank": (unperm(y=z(12)), "unpermute: y must be 2-D, got 1-D"),
    "unperm-rows-dtype": (unperm(rows=z(4, 3, dtype=I64)), "unpermute: slot_rows must be int32"),
    "unperm-rows-rank": (unperm(rows=z(4, dtype=I32), w=z(4)), "unpermute: slot_rows must be 2-D"),
    "unperm-w-shape": (unperm(w=z(4, 2)), "unpermute: weights must have the shape of slot_rows"),
    "unperm-w-bf16": (unperm(w=z(4, 3, dtype=torch.bfloat16)),
                      "unpermute: weights must be float32 (or float64 with float64 data)"),
    "unperm-w-fp64-on-fp32": (unperm(w=z(4, 3, dtype=torch.float64)),
                              "unpermute: weights must be float32 (or float64 with float64 data)"),
    # unpermute_backward
    "unpermb-g-shape": (unperm_bwd(g=z(4, 5)), "unpermute_backward: grad_out must be [T, H]"),
    "unpermb-g-dtype": (unperm_bwd(g=z(4, 6, dtype=torch.float64)),
                        "unpermute_backward: grad_out must have y's dtype"),
    "unpermb-g-int": (unperm_bwd(g=z(4, 6, dtype=I32)), f"unpermute_backward: grad_out {FLOATS}"),
    "unpermb-w-shape": (unperm_bwd(w=z(4, 2)), "weights must have the shape of slot_rows"),
}


@pytest.mark.parametrize("to", ["kernel", "fake"])
@pytest.mark.parametrize("case", list(CASES))
def test_invalid_input_raises_clear_error(case, to):
    call, message = CASES[case]
    with pytest.raises(RuntimeError, match=re.escape(message)), dispatch_to(to):
        call()


@pytest.mark.parametrize("to", ["kernel", "fake"])
def test_valid_defaults_do_not_raise(to):
    """The builders above are valid without their one wrong argument (so each case fails
    for the reason it names)."""
    with dispatch_to(to):
        for call in (topk(), topk_bwd(), perm(), gmm(), wgrad(), swiglu(), swiglu_bwd(), hsm(),
                     hsm_bwd(), unperm(), unperm_bwd()):
            call()


@pytest.mark.parametrize("to", ["kernel", "fake"])
def test_int32_limits_are_inclusive(to):
    """Sizes that ids, slot rows and offsets index must fit in int32: 2^31 - 1 itself is
    accepted, one more is not. Zero-size tensors keep the accepted calls cheap (T = 0 for
    k_max; H = 0 for permute, whose R rows are then empty)."""
    limit = 2**31 - 1
    with dispatch_to(to):
        ids, w = topk(logits=z(0, 5), slots=z(0, dtype=I32), mv=z(0, dtype=I32), k_max=limit)()
        assert tuple(ids.shape) == (0, limit) and tuple(w.shape) == (0, limit)
        # T*K = 8 live slots on expert 0, padded to align: R = 8 + (align - 1) = 2^31 - 1.
        x_perm, offsets, slot_rows = perm(x=z(4, 0), num_real=1, align=limit - 7)()
        assert tuple(x_perm.shape) == (limit, 0)
        if to == "kernel":
            assert_exact(offsets, torch.tensor([limit - 7], dtype=I32), "offsets")
            assert_exact(slot_rows, torch.arange(8, dtype=I32).view(4, 2), "slot_rows")
    with pytest.raises(RuntimeError, match=re.escape("R = T*K + num_real*(align-1) must fit")), \
            dispatch_to(to):
        perm(x=z(4, 0), num_real=1, align=limit - 6)()
    with pytest.raises(RuntimeError, match=re.escape("k_max must fit in int32")), dispatch_to(to):
        topk(logits=z(0, 5), slots=z(0, dtype=I32), mv=z(0, dtype=I32), k_max=limit + 1)()


def test_errors_through_python_wrappers_and_autograd():
    import anyexperts_ops as ae
    x = torch.zeros(4, 6, requires_grad=True)
    with pytest.raises(RuntimeError, match=re.escape("permute: ids must be int32")):
        ae.permute(x, torch.zeros(4, 2, dtype=I64), 3, 8)
    with pytest.raises(RuntimeError, match=re.escape(f"hsm: {A_DTYPE}")):
        ae.hsm(x, torch.zeros(4, dtype=torch.bfloat16, requires_grad=True))
    with pytest.raises(RuntimeError, match=re.escape(f"segmented_topk: {NORM_MSG}")):
        ae.segmented_topk(torch.zeros(4, 5, requires_grad=True), z(4, dtype=I32),
                          z(4, dtype=I32), 2, 3, "softmax")


def test_grouped_mm_row_limit_is_exact_in_the_fakes():
    """a may have 2^31 - 1 rows but not 2^31 (grouped_mm and grouped_mm_wgrad), on meta
    tensors: the kernels would allocate the outputs."""
    b = torch.empty(2, 4, 5, device="meta")
    off = torch.empty(2, dtype=I32, device="meta")
    for rows, ok in ((2**31 - 1, True), (2**31, False)):
        a = torch.empty(rows, 4, device="meta")
        for name, call in (("grouped_mm", lambda: ops.grouped_mm(a, b, off)),
                           ("grouped_mm_wgrad",
                            lambda: ops.grouped_mm_wgrad(a, torch.empty(rows, 5, device="meta"),
                                                         off))):
            if ok:
                call()
            else:
                with pytest.raises(RuntimeError,
                                   match=re.escape(f"{name}: a must have fewer than 2^31 rows")):
                    call()


# ---- device mismatch: CPU with a meta tensor (the fakes' checks) or with CUDA -----------

DEVICE_CASES = {
    "segmented_topk": (lambda d: topk(slots=z(4, dtype=I32, device=d)),
                       "segmented_topk: logits and slots must be on the same device"),
    "permute": (lambda d: perm(ids=z(4, 2, dtype=I32, device=d)),
                "permute: x and ids must be on the same device"),
    "grouped_mm": (lambda d: gmm(off=z(3, dtype=I32, device=d)),
                   "grouped_mm: a and offsets must be on the same device"),
    "grouped_mm_wgrad": (lambda d: wgrad(dout=z(10, 5, device=d)),
                         "grouped_mm_wgrad: a and dout must be on the same device"),
    "swiglu": (lambda d: swiglu(off=z(3, dtype=I32, device=d)),
               "swiglu: gu and offsets must be on the same device"),
    "swiglu_backward": (lambda d: swiglu_bwd(g=z(10, 4, device=d)),
                        "swiglu_backward: gu and grad_h must be on the same device"),
    "hsm": (lambda d: hsm(a=z(4, device=d)), "hsm: x and a must be on the same device"),
    "hsm_backward": (lambda d: hsm_bwd(g=z(4, 6, device=d)),
                     "hsm_backward: x and grad must be on the same device"),
    "unpermute": (lambda d: unperm(rows=z(4, 3, dtype=I32, device=d)),
                  "unpermute: y and slot_rows must be on the same device"),
    "add_virtual": (lambda d: lambda: torch.ops.anyexperts.add_virtual(
                        z(4, 6), z(4, 6), z(4, 3, dtype=I32, device=d), z(4, 3), 2,
                        z(3, dtype=I32), z(2, 6)),
                    "add_virtual: out and ids must be on the same device"),
}


@pytest.mark.parametrize("device", ["meta", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("op", list(DEVICE_CASES))
def test_device_mismatch(op, device):
    """A meta tensor among CPU ones dispatches to the fake, which must raise rather than
    return uninitialised CPU memory; a CUDA one to the CUDA kernel's checks."""
    build, message = DEVICE_CASES[op]
    with pytest.raises(RuntimeError, match=re.escape(message + f", got cpu and {device}")):
        build(device)()


def test_library_load_failure_says_how_to_rebuild():
    """A compiled library that cannot load (a torch other than the one it was built against)
    raises an ImportError naming the fix, not only the loader's message."""
    code = ("import sys; sys.modules['anyexperts_ops._C'] = None\n"
            "try:\n    import anyexperts_ops\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120).stdout
    assert "failed to load" in out and "--no-build-isolation" in out, out
    assert torch.__version__ in out, out


def test_unbuilt_checkout_says_how_to_build(tmp_path):
    """A package folder without a compiled library (a checkout's python/ before any build)
    says so, rather than blaming the torch version."""
    import anyexperts_ops
    src = os.path.dirname(anyexperts_ops.__file__)
    shutil.copytree(src, tmp_path / "anyexperts_ops", ignore=shutil.ignore_patterns("_C.*"))
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "try:\n    import anyexperts_ops\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path).stdout
    assert "no compiled library" in out and "dev_build.sh" in out, out
