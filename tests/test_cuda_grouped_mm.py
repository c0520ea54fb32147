"""grouped_mm and grouped_mm_wgrad on CUDA vs the fp64 reference (DESIGN.md section 3).

Covers the three CUDA paths of csrc/cuda/grouped_mm.cu: the CUTLASS SM90 grouped GEMM (bf16/
fp16 with K, N multiples of 8 on a compute capability 9.0 GPU), the CUTLASS SM80 grouped GEMM
(the same on any other GPU since Ampere; on an H100 the tests taking the `backend` fixture
also run it through ANYEXPERTS_GROUPED_MM_BACKEND=sm80) and the SIMT fallback (fp32, fp64,
odd K or N, older GPUs). Skips cleanly without a GPU or without the CUDA kernels.
"""
from __future__ import annotations

import os

import pytest
import torch

import anyexperts_ops
from anyexperts_ops import reference as ref
from conftest import assert_rel_norm, random_offsets, rel_norm


def _has_cuda_kernels() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("anyexperts::grouped_mm", "CUDA")
    except Exception:  # noqa: BLE001  (private API moved: let the tests run and tell)
        return True


pytestmark = pytest.mark.skipif(not _has_cuda_kernels(),
                                reason="needs a CUDA GPU and the CUDA build of anyexperts_ops")

# The schedule tests below force each SM90 schedule, and the `backend` fixture each path,
# through the overrides (csrc/cuda/grouped_mm.cu), which the dispatcher re-reads per call
# only when ANYEXPERTS_GROUPED_MM_TUNING_LIVE is 1 before the process's first grouped_mm call.
# Collection imports this module before any test runs; the overrides themselves stay unset
# outside the tests that set them, so every other test sees the default choice.
os.environ["ANYEXPERTS_GROUPED_MM_TUNING_LIVE"] = "1"

ops = torch.ops.anyexperts
DEV = "cuda"
LOW = (torch.bfloat16, torch.float16)
TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-12}


def is_sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.fixture(params=["auto", "sm80"])
def backend(request, monkeypatch):
    """The newest path grouped_mm may take (the override is re-read per call: see
    ANYEXPERTS_GROUPED_MM_TUNING_LIVE above). "sm80" runs the CUTLASS 2.x kernels where the
    SM90 ones would run; on an A100 both params take the same path."""
    if request.param == "sm80":
        if torch.cuda.get_device_capability() != (9, 0):
            pytest.skip("off Hopper, auto already takes the SM80 path (or none)")
        if request.node.callspec.params.get("dtype") in (torch.float32, torch.float64):
            pytest.skip("fp32/fp64 run the SIMT kernel on every backend")
    monkeypatch.setenv("ANYEXPERTS_GROUPED_MM_BACKEND", request.param)
    return request.param


def i32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEV)


def offsets_on_device(G: int, R: int, **kw) -> torch.Tensor:
    return random_offsets(G, R, **kw).to(DEV)


def make(R, K, N, G, dtype, transposed_b=False, scale=1.0):
    a = (torch.randn(R, K, device=DEV) * scale).to(dtype)
    if transposed_b:   # nn.Linear layout: [G,N,K] storage, used as its [G,K,N] transpose
        b = (torch.randn(G, N, K, device=DEV) * scale).to(dtype).transpose(1, 2)
    else:
        b = (torch.randn(G, K, N, device=DEV) * scale).to(dtype)
    return a, b


def ref64(a, b, offsets):
    return ref.grouped_mm(a.double(), b.double(), offsets)


def ref64_wgrad(a, dout, offsets):
    return ref.grouped_mm_wgrad(a.double(), dout.double(), offsets)


def check(out, expect64, dtype, what):
    assert out.dtype == dtype, f"{what}: dtype {out.dtype}"
    assert_rel_norm(out, expect64, what, tol=TOL[dtype])


def poison_cuda(*shapes, dtype):
    """Frees NaN-filled blocks, so a kernel that leaves output memory unwritten likely
    returns NaNs from the caching allocator."""
    blocks = [torch.full(s, float("nan"), dtype=dtype, device=DEV) for s in shapes]
    del blocks


def tail_of(offsets, R) -> int:
    return ref.group_spans(offsets, R)[-1][1] if offsets.numel() else 0


# ---- forward vs the fp64 reference -------------------------------------------------------

# (R, K, N, G): K, N multiples of 8 take the SM90 path for bf16/fp16 on H100/H200. For bf16
# the default runs ping-pong 64x256 when R/G <= 128, else ping-pong 128x128 when K <= 1024,
# else cooperative 128x256; fp16 runs the cooperative kernel always.
SHAPES = [
    (1, 8, 8, 1),             # pingpong 64x256
    (37, 16, 24, 3),          # pingpong 64x256
    (600, 64, 256, 4),        # pingpong 128x128, tile-sized N
    (1034, 72, 264, 5),       # pingpong 128x128, K and N past a tile edge
    (1000, 128, 96, 16),      # pingpong 64x256 (m_avg 62)
    (4096, 256, 512, 8),      # pingpong 128x128, several tiles per group
    (8192, 128, 128, 256),    # pingpong 64x256, G = 256
    (40000, 64, 64, 256),     # pingpong 128x128, G = 256
    (2100, 1088, 136, 3),     # cooperative (K > 1024), K and N past a tile edge
    (5000, 1536, 512, 8),     # cooperative, several tiles per group
    (8192, 8, 16, 5000),      # pingpong 64x256, G > 4096: offsets read from global memory
]


@pytest.mark.parametrize("transposed_b", [False, True], ids=["b", "bT"])
@pytest.mark.parametrize("dtype", [*LOW, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "R{}_K{}_N{}_G{}".format(*s))
def test_forward_matches_reference(backend, shape, dtype, transposed_b):
    R, K, N, G = shape
    a, b = make(R, K, N, G, dtype, transposed_b)
    offsets = offsets_on_device(G, R)
    poison_cuda((R, N), dtype=dtype)
    out = ops.grouped_mm(a, b, offsets)
    assert out.shape == (R, N) and out.device.type == "cuda"
    check(out, ref64(a, b, offsets), dtype, f"grouped_mm {shape} {dtype}")
    assert (out[tail_of(offsets, R):] == 0).all(), "rows past the last offset must be zero"


@pytest.mark.parametrize("dtype", [*LOW, torch.float32, torch.float64], ids=str)
def test_fallback_odd_sizes(dtype):
    # K, N not multiples of 8: TMA cannot take them, every dtype runs the SIMT kernel.
    R, K, N, G = 203, 20, 36, 6
    for transposed_b in (False, True):
        a, b = make(R, K, N, G, dtype, transposed_b)
        offsets = offsets_on_device(G, R)
        out = ops.grouped_mm(a, b, offsets)
        check(out, ref64(a, b, offsets), dtype, f"fallback {dtype} bT={transposed_b}")
        assert (out[tail_of(offsets, R):] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_group_patterns(backend, dtype):
    R, K, N, G = 640, 64, 128, 8
    a, b = make(R, K, N, G, dtype)
    patterns = {
        "all empty": [0] * G,
        "all rows in one group": [0, 0, 0, R, R, R, R, R],
        "all rows in the last group": [0] * (G - 1) + [R],
        "all rows in the first group": [R] * G,
        "single rows": list(range(1, G + 1)),
        "tail only after group 0": [5] + [5] * (G - 1),
        "non-monotone": [100, 50, 300, 200, 640, 10, 600, 640],
        "negative and beyond": [-5, 40, -1, 700, 2**31 - 1, -2**31, 3, 900],
    }
    for name, values in patterns.items():
        offsets = i32(values)
        out = ops.grouped_mm(a, b, offsets)
        expect = ref64(a, b, offsets)
        assert rel_norm(out, expect) < TOL[dtype] or float(expect.abs().max()) == 0, name
        assert (out[tail_of(offsets, R):] == 0).all(), name
        if float(expect.abs().max()) == 0:
            assert (out == 0).all(), name


def offsets_going_back(G: int, R: int, past_end: bool) -> torch.Tensor:
    """End offsets that fall back below earlier ends and jump past later ones, so that a
    group's end (the running max of the offsets) differs from its own offset across the
    16-offset slices the prepare kernels' threads scan (grouped_mm_prepare.cuh): monotone
    offsets would give every end from a thread's own slice, right even with the scan's
    carry between threads broken. Without `past_end` every offset stays below R * 7/8, so
    rows past the last group remain."""
    off = random_offsets(G, R, empty=0.1).long()
    dips = torch.rand(G) < 0.15
    off[dips] = torch.randint(-R, R // 2, (int(dips.sum()),))
    spikes = torch.rand(G) < 0.03
    top = R + R // 4 if past_end else R * 7 // 8
    off[spikes] = torch.randint(R // 2, top, (int(spikes.sum()),))
    off[torch.randperm(G)[0]] = -2**31
    if past_end:
        off[torch.randperm(G)[0]] = 2**31 - 1
    off[min(15, G - 1)] = R * 3 // 4   # end of thread 0's slice: groups after it empty for a while
    return off.to(torch.int32).to(DEV)


# G = 33 and 300 stay within the scan's first warp, 1000 and 4096 cross warps; 4097 takes
# the path without the scan.
@pytest.mark.parametrize("G", [33, 300, 1000, 4096, 4097])
def test_offsets_going_back_across_threads(backend, G):
    R, K, N = 8192, 16, 32
    a, b = make(R, K, N, G, torch.bfloat16)
    dout = torch.randn(R, N, device=DEV).to(torch.bfloat16)
    for trial in range(3):
        offsets = offsets_going_back(G, R, past_end=trial == 0)
        spans = ref.group_spans(offsets, R)
        assert sum(e > s for s, e in spans) < G, "some groups must be empty"
        assert trial == 0 or tail_of(offsets, R) < R, "rows past the last group must remain"
        poison_cuda((R, N), (G, K, N), dtype=torch.bfloat16)
        out = ops.grouped_mm(a, b, offsets)
        check(out, ref64(a, b, offsets), torch.bfloat16, f"grouped_mm G={G} trial {trial}")
        assert (out[tail_of(offsets, R):] == 0).all(), "rows past the last group's end are zero"
        db = ops.grouped_mm_wgrad(a, dout, offsets)
        check(db, ref64_wgrad(a, dout, offsets), torch.bfloat16, f"wgrad G={G} trial {trial}")
        empty = torch.tensor([e == s for s, e in spans], device=DEV)
        assert (db[empty] == 0).all(), "empty groups' db is exactly zero"


def test_single_group(backend):
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        a, b = make(777, 128, 192, 1, dtype)
        for end in (777, 500, 0):
            offsets = i32([end])
            out = ops.grouped_mm(a, b, offsets)
            if end:
                check(out, ref64(a, b, offsets), dtype, f"G=1 end={end}")
            assert (out[end:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_poisoned_rows_outside_groups(backend, dtype):
    # Rows of a that belong to no group hold NaN / huge values: no kernel may read them
    # into a product (TMA bounds each group's rows; the fallback masks them).
    R, K, N, G = 1024, 64, 128, 6
    a, b = make(R, K, N, G, dtype)
    offsets = i32([100, 100, 300, 301, 600, 700])
    a[700:800] = float("nan")
    a[800:] = 1e30
    expect = ref64(a, b, offsets)
    poison_cuda((R, N), dtype=dtype)
    out = ops.grouped_mm(a, b, offsets)
    assert (out[700:] == 0).all(), "tail rows must be exactly zero"
    assert torch.isfinite(out).all()
    check(out[:700], expect[:700], dtype, "rows of the groups")


def test_large_groups_and_rows_past_end(backend):
    # Mixtral-like proportions, shrunk: few experts with many rows, skewed loads.
    R, K, N, G = 6000, 512, 1024, 8
    a, b = make(R, K, N, G, torch.bfloat16, transposed_b=True)
    sizes = torch.tensor([2500, 1200, 800, 0, 600, 300, 100, 20])
    offsets = torch.cumsum(sizes, 0).to(torch.int32).to(DEV)
    out = ops.grouped_mm(a, b, offsets)
    check(out, ref64(a, b, offsets), torch.bfloat16, "skewed groups")
    assert (out[int(sizes.sum()):] == 0).all()


# ---- layouts and strides ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_strided_operands(backend, dtype):
    R, K, N, G = 333, 64, 80, 5
    offsets = offsets_on_device(G, R)
    base_a = torch.randn(R, 2 * K, device=DEV).to(dtype)
    cases = {
        "a with padded rows": (base_a[:, :K], torch.randn(G, K, N, device=DEV).to(dtype)),
        "a column-major": (torch.randn(K, R, device=DEV).to(dtype).t(),
                           torch.randn(G, K, N, device=DEV).to(dtype)),
        "b strided columns": (torch.randn(R, K, device=DEV).to(dtype),
                              torch.randn(G, K, 2 * N, device=DEV).to(dtype)[:, :, ::2]),
        "b with padded rows": (torch.randn(R, K, device=DEV).to(dtype),
                               torch.randn(G, K, N + 8, device=DEV).to(dtype)[:, :, :N]),
        "b groups permuted": (torch.randn(R, K, device=DEV).to(dtype),
                              torch.randn(K, G, N, device=DEV).to(dtype).transpose(0, 1)),
        "b broadcast over groups": (torch.randn(R, K, device=DEV).to(dtype),
                                    torch.randn(1, K, N, device=DEV).to(dtype).expand(G, K, N)),
    }
    for name, (a, b) in cases.items():
        out = ops.grouped_mm(a, b, offsets)
        check(out, ref64(a, b, offsets), dtype, name)


def test_misaligned_pointers(backend):
    # Storage offsets that break 16-byte alignment: copied for TMA (SM90) or read as is
    # (fallback); either way the result is right.
    R, K, N, G = 130, 32, 48, 3
    offsets = offsets_on_device(G, R)
    flat_a = torch.randn(R * K + 1, device=DEV).to(torch.bfloat16)
    a = flat_a[1:].view(R, K)
    flat_b = torch.randn(G * K * N + 3, device=DEV).to(torch.bfloat16)
    b = flat_b[3:].view(G, K, N)
    assert a.data_ptr() % 16 != 0 and b.data_ptr() % 16 != 0
    out = ops.grouped_mm(a, b, offsets)
    check(out, ref64(a, b, offsets), torch.bfloat16, "misaligned a and b")
    db = ops.grouped_mm_wgrad(a, out, offsets)
    check(db, ref64_wgrad(a, out, offsets), torch.bfloat16, "misaligned wgrad")


def test_offsets_non_contiguous(backend):
    R, K, N, G = 200, 16, 16, 4
    a, b = make(R, K, N, G, torch.bfloat16)
    off = torch.stack([i32([30, 90, 90, 150]), i32([0, 0, 0, 0])], 1).reshape(-1)[::2]
    assert not off.is_contiguous()
    out = ops.grouped_mm(a, b, off)
    check(out, ref64(a, b, off.contiguous()), torch.bfloat16, "strided offsets")


def test_empty_shapes():
    a, b = make(0, 16, 8, 2, torch.bfloat16)
    assert ops.grouped_mm(a, b, i32([0, 0])).shape == (0, 8)
    a, b = make(9, 16, 8, 0, torch.bfloat16)
    out = ops.grouped_mm(a, b, torch.zeros(0, dtype=torch.int32, device=DEV))
    assert out.shape == (9, 8) and (out == 0).all()
    a, b = make(9, 0, 8, 2, torch.bfloat16)
    out = ops.grouped_mm(a, b, i32([4, 9]))
    assert out.shape == (9, 8) and (out == 0).all()
    db = ops.grouped_mm_wgrad(torch.zeros(0, 8, device=DEV, dtype=torch.bfloat16),
                              torch.zeros(0, 16, device=DEV, dtype=torch.bfloat16), i32([0, 0]))
    assert db.shape == (2, 8, 16) and (db == 0).all()
    db = ops.grouped_mm_wgrad(torch.randn(5, 8, device=DEV), torch.randn(5, 16, device=DEV),
                              torch.zeros(0, dtype=torch.int32, device=DEV))
    assert db.shape == (0, 8, 16)


# ---- every SM90 schedule, raster order and swizzle (tuning overrides) ---------------------

# kScheduleNames in csrc/cuda/grouped_mm.cu (tests/test_bench_grouped_mm.py checks the list).
SM90_SCHEDULES = (
    "cooperative_128x256_2x1",
    "pingpong_64x256_1x1",
    "cooperative_128x128_1x2",
    "cooperative_256x128_2x1",
    "pingpong_128x128_1x2",
)
TUNING_VARS = ("ANYEXPERTS_GROUPED_MM_SCHEDULE", "ANYEXPERTS_GROUPED_MM_RASTER",
               "ANYEXPERTS_GROUPED_MM_SWIZZLE")

needs_sm90 = pytest.mark.skipif(not is_sm90(), reason="SM90 kernels: needs compute capability 9.0")


@pytest.fixture
def tuning(monkeypatch):
    """tuning(schedule, raster, swizzle) sets the overrides (None: unset) for this test and
    checks that the dispatcher re-reads them per call."""
    def set_(schedule=None, raster=None, swizzle=None):
        for var, val in zip(TUNING_VARS, (schedule, raster, swizzle)):
            if val is None:
                monkeypatch.delenv(var, raising=False)
            else:
                monkeypatch.setenv(var, str(val))

    if os.environ.get("ANYEXPERTS_GROUPED_MM_TUNING_LIVE") != "1":
        pytest.skip("ANYEXPERTS_GROUPED_MM_TUNING_LIVE is not 1 in this process")
    set_("__not_a_schedule__")
    a, b = make(16, 16, 16, 2, torch.bfloat16)
    with pytest.raises(RuntimeError, match="ANYEXPERTS_GROUPED_MM_SCHEDULE"):
        ops.grouped_mm(a, b, i32([8, 16]))
    set_()
    return set_


# (R, K, N, G) and how rows are spread: "random" (random_offsets: ~30% empty groups, rows
# past the last offset), "tiny" (groups of 0, 1, 2 or 3 rows), "ragged" (groups from empty
# to several tiles, none a tile multiple).
SCHEDULE_CASES = [
    ((1, 8, 8, 1), "random"),
    ((37, 16, 24, 3), "random"),
    ((1034, 72, 264, 5), "random"),        # K, N past a tile edge
    ((4096, 256, 512, 8), "random"),       # several tiles per group in M and N
    ((8192, 128, 128, 256), "random"),     # G = 256, short groups
    ((64, 64, 136, 32), "tiny"),
    ((3000, 64, 392, 9), "ragged"),
]


def case_offsets(G, R, spread):
    if spread == "random":
        return offsets_on_device(G, R)
    if spread == "tiny":
        sizes = [g % 4 for g in range(G)]          # 0, 1, 2, 3, 0, 1, ...
    else:
        sizes = [0, 1, 127, 129, 300, 0, 513, 777, 1000][:G]
    ends = torch.tensor(sizes).cumsum(0)
    assert int(ends[-1]) <= R
    return ends.to(torch.int32).to(DEV)


@needs_sm90
@pytest.mark.parametrize("transposed_b", [False, True], ids=["b", "bT"])
@pytest.mark.parametrize("case", SCHEDULE_CASES,
                         ids=lambda c: "R{}_K{}_N{}_G{}_".format(*c[0]) + c[1])
@pytest.mark.parametrize("schedule", SM90_SCHEDULES)
def test_every_schedule_matches_reference(tuning, schedule, case, transposed_b):
    (R, K, N, G), spread = case
    a, b = make(R, K, N, G, torch.bfloat16, transposed_b)
    offsets = case_offsets(G, R, spread)
    tuning(schedule)
    poison_cuda((R, N), dtype=torch.bfloat16)
    out = ops.grouped_mm(a, b, offsets)
    check(out, ref64(a, b, offsets), torch.bfloat16, f"{schedule} {case} bT={transposed_b}")
    assert (out[tail_of(offsets, R):] == 0).all(), "rows past the last offset must be zero"


RASTER_SWIZZLE = [("auto", 1), ("along_m", 1), ("along_n", 1), ("heuristic", 1), ("along_m", 2),
                  ("along_n", 2), ("along_m", 4), ("along_n", 8)]


@needs_sm90
@pytest.mark.parametrize("transposed_b", [False, True], ids=["b", "bT"])
@pytest.mark.parametrize("raster_swizzle", RASTER_SWIZZLE, ids=lambda rs: f"{rs[0]}_sw{rs[1]}")
@pytest.mark.parametrize("schedule", SM90_SCHEDULES)
def test_raster_and_swizzle_match_reference(tuning, schedule, raster_swizzle, transposed_b):
    # Ragged groups whose tile counts are not multiples of the swizzle: the scheduler pads
    # each group's tile grid, and the padding tiles must not write anything.
    raster, swizzle = raster_swizzle
    R, K, N, G = 3000, 64, 392, 9
    a, b = make(R, K, N, G, torch.bfloat16, transposed_b)
    offsets = case_offsets(G, R, "ragged")
    tuning(schedule, raster, swizzle)
    poison_cuda((R, N), dtype=torch.bfloat16)
    out = ops.grouped_mm(a, b, offsets)
    check(out, ref64(a, b, offsets), torch.bfloat16, f"{schedule} {raster} sw{swizzle}")
    assert (out[tail_of(offsets, R):] == 0).all()


@needs_sm90
@pytest.mark.parametrize("schedule", SM90_SCHEDULES)
def test_every_schedule_autograd_and_fp16(tuning, schedule):
    # dgrad runs grouped_mm with the other B layout under the same override; fp16 has one
    # kernel compiled and runs it whatever the override names.
    R, K, N, G = 700, 64, 96, 6
    offsets = offsets_on_device(G, R)
    tuning(schedule, "along_n", 2)
    for dtype in (torch.bfloat16, torch.float16):
        a = torch.randn(R, K, device=DEV).to(dtype).requires_grad_()
        w = torch.randn(G, N, K, device=DEV).to(dtype).requires_grad_()
        out = anyexperts_ops.grouped_mm(a, w.transpose(1, 2), offsets)
        grad = torch.randn_like(out)
        out.backward(grad)
        a64 = a.detach().double().requires_grad_()
        w64 = w.detach().double().requires_grad_()
        out64 = ref.grouped_mm(a64, w64.transpose(1, 2), offsets)
        out64.backward(grad.double())
        check(out, out64, dtype, f"{schedule} {dtype} out")
        check(a.grad, a64.grad, dtype, f"{schedule} {dtype} grad a")
        check(w.grad, w64.grad, dtype, f"{schedule} {dtype} grad w")


def cutlass_kernels(fn):
    """The names of the CUTLASS kernels one call of fn launches (skips the test when the
    profiler reports none)."""
    from torch.profiler import ProfilerActivity, profile
    fn()   # one-time kernel setup outside the profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = {e.name for e in prof.events() if "GemmUniversal" in e.name or
               "device_kernel" in e.name}
    if not kernels:
        pytest.skip("the profiler reported no CUTLASS kernel names")
    return frozenset(kernels)


@needs_sm90
@pytest.mark.parametrize("shape,expected", [
    ((256, 1088, 128, 4), "pingpong_64x256_1x1"),        # rows per group <= 128
    ((2048, 1024, 128, 4), "pingpong_128x128_1x2"),      # K <= 1024
    ((2048, 1088, 128, 4), "cooperative_128x256_2x1"),   # otherwise
], ids=["short_groups", "short_k", "long_k"])
def test_default_schedule_by_shape(tuning, monkeypatch, shape, expected):
    # select_forward_schedule's choice, seen as the kernel the default runs (on the SM90
    # path: a backend override would run one kernel whatever the schedule).
    monkeypatch.delenv("ANYEXPERTS_GROUPED_MM_BACKEND", raising=False)
    R, K, N, G = shape
    a, b = make(R, K, N, G, torch.bfloat16, transposed_b=True)
    offsets = offsets_on_device(G, R)
    default = cutlass_kernels(lambda: ops.grouped_mm(a, b, offsets))
    kind = "Pingpong" if expected.startswith("pingpong") else "Cooperative"
    if any("WarpSpecialized" in k for k in default):
        assert any(kind in k for k in default), (default, expected)
    tuning(expected)
    assert default == cutlass_kernels(lambda: ops.grouped_mm(a, b, offsets)), (default, expected)


@needs_sm90
def test_overrides_pick_distinct_kernels(tuning):
    # Each schedule name runs its own CUTLASS kernel (the override is not silently ignored).
    R, K, N, G = 1024, 64, 128, 4
    a, b = make(R, K, N, G, torch.bfloat16, transposed_b=True)
    offsets = offsets_on_device(G, R)
    names = {}
    for schedule in SM90_SCHEDULES:
        tuning(schedule)
        names[schedule] = cutlass_kernels(lambda: ops.grouped_mm(a, b, offsets))
    assert len(set(names.values())) == len(SM90_SCHEDULES), names
    for schedule, kernels in names.items():
        kind = "Pingpong" if schedule.startswith("pingpong") else "Cooperative"
        if any("WarpSpecialized" in k for k in kernels):
            assert any(kind in k for k in kernels), (schedule, kernels)


@needs_sm90
def test_unknown_override_values_raise(tuning):
    a, b = make(64, 32, 16, 2, torch.bfloat16)
    off = i32([10, 64])
    for i, value in enumerate(("cooperative_64x64", "along_k", "3")):
        values = [None, None, None]
        values[i] = value
        tuning(*values)
        with pytest.raises(RuntimeError, match=TUNING_VARS[i]):
            ops.grouped_mm(a, b, off)
    tuning("auto", "heuristic", 1)
    check(ops.grouped_mm(a, b, off), ref64(a, b, off), torch.bfloat16, "auto/heuristic/1")
    tuning("auto", "auto", 1)   # "auto" names the default choice (select_forward_scheduling)
    check(ops.grouped_mm(a, b, off), ref64(a, b, off), torch.bfloat16, "auto/auto/1")
    tuning("pingpong")     # the short names of the two original schedules still work
    check(ops.grouped_mm(a, b, off), ref64(a, b, off), torch.bfloat16, "pingpong")


# ---- input validation ---------------------------------------------------------------------

def test_rejects_bad_inputs():
    a, b = make(64, 32, 16, 2, torch.bfloat16)
    off = i32([10, 64])
    with pytest.raises(RuntimeError, match="same dtype"):
        ops.grouped_mm(a, b.half(), off)
    with pytest.raises(RuntimeError, match="int32"):
        ops.grouped_mm(a, b, off.long())
    with pytest.raises(RuntimeError, match="same device"):
        ops.grouped_mm(a, b, off.cpu())
    with pytest.raises(RuntimeError, match="same device"):
        ops.grouped_mm(a, b.cpu(), off)
    with pytest.raises(RuntimeError, match="agree on K"):
        ops.grouped_mm(a[:, :24], b, off)
    with pytest.raises(RuntimeError, match="one entry per group"):
        ops.grouped_mm(a, b, i32([10, 20, 64]))
    with pytest.raises(RuntimeError, match="3-D"):
        ops.grouped_mm(a, b[0], off)
    with pytest.raises(RuntimeError, match="float16, bfloat16, float32 or float64"):
        ops.grouped_mm(a.to(torch.int32), b.to(torch.int32), off)
    dout = torch.randn(64, 16, device=DEV).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="same dtype"):
        ops.grouped_mm_wgrad(a, dout.float(), off)
    with pytest.raises(RuntimeError, match="same rows"):
        ops.grouped_mm_wgrad(a, dout[:63], off)
    with pytest.raises(RuntimeError, match="int32"):
        ops.grouped_mm_wgrad(a, dout, off.to(torch.int16))


# ---- grouped_mm_wgrad ---------------------------------------------------------------------

WGRAD_SHAPES = [
    (1, 8, 8, 1),
    (250, 64, 256, 5),
    (517, 72, 264, 6),
    (3000, 256, 128, 12),
    (8192, 64, 64, 256),
    (8192, 8, 16, 5000),      # G > 4096 (offsets from global memory), most groups empty
]


@pytest.mark.parametrize("dtype", [*LOW, torch.float32], ids=str)
@pytest.mark.parametrize("shape", WGRAD_SHAPES, ids=lambda s: "R{}_K{}_N{}_G{}".format(*s))
def test_wgrad_matches_reference(backend, shape, dtype):
    R, K, N, G = shape
    a = torch.randn(R, K, device=DEV).to(dtype)
    dout = torch.randn(R, N, device=DEV).to(dtype)
    offsets = offsets_on_device(G, R)
    tail = tail_of(offsets, R)
    a[tail:] = float("nan")      # rows in no group must not be read
    dout[tail:] = float("nan")
    poison_cuda((G, K, N), dtype=dtype)
    db = ops.grouped_mm_wgrad(a, dout, offsets)
    assert db.shape == (G, K, N) and db.dtype == dtype
    expect = ref64_wgrad(torch.nan_to_num(a, nan=0.0), torch.nan_to_num(dout, nan=0.0), offsets)
    check(db, expect, dtype, f"wgrad {shape} {dtype}")
    for g, (s, e) in enumerate(ref.group_spans(offsets, R)):
        if e == s:
            assert (db[g] == 0).all(), f"empty group {g} must be exactly zero"


def test_wgrad_fallback_odd_sizes_and_fp64():
    R, K, N, G = 150, 12, 20, 5
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        a = torch.randn(R, K, device=DEV).to(dtype)
        dout = torch.randn(R, N, device=DEV).to(dtype)
        offsets = offsets_on_device(G, R)
        db = ops.grouped_mm_wgrad(a, dout, offsets)
        check(db, ref64_wgrad(a, dout, offsets), dtype, f"wgrad fallback {dtype}")


@pytest.mark.parametrize("G", [64, 1025])
def test_wgrad_problem_order_changes_no_bit(backend, monkeypatch, G):
    """Largest group first (the default) and index order (ANYEXPERTS_GROUPED_MM_WGRAD_ORDER=
    index) hand the same problems to the GEMM in another order: the same bits. G = 1025 is
    past the ranked groups (index order either way)."""
    R, K, N = 6000, 64, 128
    a = torch.randn(R, K, device=DEV).to(torch.bfloat16)
    dout = torch.randn(R, N, device=DEV).to(torch.bfloat16)
    sizes = torch.randint(0, 3 * R // G, (G,))
    sizes[torch.randperm(G)[: G // 4]] = 0
    sizes[torch.randperm(G)[:3]] = R // 8   # ties among the largest
    offsets = sizes.cumsum(0).clamp(max=R).to(torch.int32).to(DEV)
    results = {}
    for order in ("index", "largest_first", "auto"):
        monkeypatch.setenv("ANYEXPERTS_GROUPED_MM_WGRAD_ORDER", order)
        poison_cuda((G, K, N), dtype=torch.bfloat16)
        results[order] = ops.grouped_mm_wgrad(a, dout, offsets)
    assert torch.equal(results["index"], results["largest_first"])
    assert torch.equal(results["auto"], results["largest_first"])
    check(results["auto"], ref64_wgrad(a, dout, offsets), torch.bfloat16, f"wgrad order G={G}")
    if torch.cuda.get_device_capability()[0] >= 8:   # a tensor-core path reads the variable
        monkeypatch.setenv("ANYEXPERTS_GROUPED_MM_WGRAD_ORDER", "smallest_first")
        with pytest.raises(RuntimeError, match="ANYEXPERTS_GROUPED_MM_WGRAD_ORDER"):
            ops.grouped_mm_wgrad(a, dout, offsets)


def test_wgrad_strided_inputs(backend):
    R, K, N, G = 300, 64, 96, 4
    offsets = offsets_on_device(G, R)
    a = torch.randn(K, R, device=DEV).to(torch.bfloat16).t()           # column-major
    dout = torch.randn(R, 2 * N, device=DEV).to(torch.bfloat16)[:, :N]  # padded rows
    db = ops.grouped_mm_wgrad(a, dout, offsets)
    check(db, ref64_wgrad(a, dout, offsets), torch.bfloat16, "strided wgrad")


# ---- autograd -----------------------------------------------------------------------------

# bf16 forward/dgrad: pingpong 64x256 both; pingpong 128x128 both; cooperative forward
# (K > 1024) and pingpong 128x128 dgrad (K = N = 96).
@pytest.mark.parametrize("R,K", [(300, 64), (1400, 64), (1400, 1088)], ids=lambda v: str(v))
@pytest.mark.parametrize("transposed_b", [False, True], ids=["b", "bT"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_autograd_matches_reference(backend, dtype, transposed_b, R, K):
    N, G = 96, 6
    offsets = offsets_on_device(G, R)
    a0 = torch.randn(R, K, device=DEV).to(dtype)
    store0 = (torch.randn(G, N, K, device=DEV) if transposed_b
              else torch.randn(G, K, N, device=DEV)).to(dtype)
    grad = torch.randn(R, N, device=DEV).to(dtype)
    results = []
    for fn, cast in ((anyexperts_ops.grouped_mm, lambda t: t),
                     (ref.grouped_mm, lambda t: t.double())):
        a = cast(a0).clone().requires_grad_()
        store = cast(store0).clone().requires_grad_()
        b = store.transpose(1, 2) if transposed_b else store
        out = fn(a, b, offsets)
        out.backward(cast(grad))
        results.append((out, a.grad, store.grad))
    (out, da, dstore), (out64, da64, dstore64) = results
    check(out, out64, dtype, "out")
    check(da, da64, dtype, "grad a")
    check(dstore, dstore64, dtype, "grad b")
    tail = tail_of(offsets, R)
    assert (da[tail:] == 0).all(), "rows after the last group get zero grad"
    for g, (s, e) in enumerate(ref.group_spans(offsets, R)):
        if e == s:
            assert (dstore[g] == 0).all(), f"empty group {g}: zero weight grad"


@pytest.mark.parametrize("region", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_runs_the_low_precision_kernel(backend, region):
    """In a CUDA autocast region fp32 operands are cast to the region's dtype and run the
    bf16/fp16 kernels (not the fp32 fallback): the same bits as calling them on cast inputs."""
    R, K, N, G = 512, 128, 96, 5
    offsets = offsets_on_device(G, R)
    a = torch.randn(R, K, device=DEV)
    b = torch.randn(G, N, K, device=DEV).transpose(1, 2)
    dout = torch.randn(R, N, device=DEV)
    with torch.autocast("cuda", dtype=region):
        out = anyexperts_ops.grouped_mm(a, b, offsets)
        db = anyexperts_ops.grouped_mm_wgrad(a, dout, offsets)
    assert out.dtype == db.dtype == region
    assert torch.equal(out, anyexperts_ops.grouped_mm(a.to(region), b.to(region), offsets))
    assert torch.equal(db, anyexperts_ops.grouped_mm_wgrad(a.to(region), dout.to(region),
                                                           offsets))


def test_gradcheck_fp64_cuda():
    R, K, N, G = 11, 3, 4, 3
    offsets = i32([3, 3, 8])
    a = torch.randn(R, K, dtype=torch.float64, device=DEV, requires_grad=True)
    b = torch.randn(G, N, K, dtype=torch.float64, device=DEV, requires_grad=True)
    fn = lambda a, b: anyexperts_ops.grouped_mm(a, b.transpose(1, 2), offsets)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a, b), eps=1e-6, atol=1e-8)


# ---- opcheck --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_opcheck(backend, dtype):
    R, K, N, G = 96, 32, 48, 4
    a, b = make(R, K, N, G, dtype, transposed_b=True)
    offsets = i32([20, 20, 60, 90])
    a.requires_grad_()
    torch.library.opcheck(ops.grouped_mm.default, (a, b, offsets))
    dout = torch.randn(R, N, device=DEV).to(dtype)
    torch.library.opcheck(ops.grouped_mm_wgrad.default, (a.detach(), dout, offsets))


# ---- CUDA graphs ------------------------------------------------------------------------------

# bf16 on SM90: pingpong 128x128, pingpong 64x256, cooperative (K > 1024)
@pytest.mark.parametrize("G,K", [(8, 64), (32, 64), (8, 1088)], ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_graph_capture(backend, dtype, G, K):
    # The kernels read offsets on the device only: capture once, then change offsets and
    # inputs in place and replay; the replay must follow the new values.
    R, N = 1536, 128
    a, b = make(R, K, N, G, dtype, transposed_b=True)
    dout = torch.randn(R, N, device=DEV).to(dtype)
    offsets = offsets_on_device(G, R)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):   # warm-up outside capture (one-time kernel setup)
        for _ in range(2):
            ops.grouped_mm(a, b, offsets)
            ops.grouped_mm_wgrad(a, dout, offsets)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.grouped_mm(a, b, offsets)
        db = ops.grouped_mm_wgrad(a, dout, offsets)
    for trial in range(3):
        offsets.copy_(offsets_on_device(G, R, tail=trial != 1))
        a.copy_(torch.randn(R, K, device=DEV).to(dtype))
        dout.copy_(torch.randn(R, N, device=DEV).to(dtype))
        graph.replay()
        torch.cuda.synchronize()
        check(out, ref64(a, b, offsets), dtype, f"graph replay {trial}")
        assert (out[tail_of(offsets, R):] == 0).all()
        check(db, ref64_wgrad(a, dout, offsets), dtype, f"graph replay wgrad {trial}")


# ---- determinism ------------------------------------------------------------------------------

def test_deterministic(backend):
    R, K, N, G = 2048, 128, 256, 8
    a, b = make(R, K, N, G, torch.bfloat16)
    offsets = offsets_on_device(G, R)
    out1 = ops.grouped_mm(a, b, offsets)
    out2 = ops.grouped_mm(a, b, offsets)
    assert torch.equal(out1, out2)
    w1 = ops.grouped_mm_wgrad(a, out1, offsets)
    w2 = ops.grouped_mm_wgrad(a, out1, offsets)
    assert torch.equal(w1, w2)


@pytest.mark.skipif(not is_sm90(), reason="SM90 path: needs compute capability 9.0")
def test_sm90_matches_fallback():
    # The same bf16 problem through the CUTLASS kernel (K, N multiples of 8) and through
    # the SIMT fallback (one column and row of zero padding removed again): both must agree
    # with each other about as well as each agrees with the fp64 reference.
    R, K, N, G = 2000, 64, 128, 10
    a, b = make(R, K, N, G, torch.bfloat16)
    offsets = offsets_on_device(G, R)
    fast = ops.grouped_mm(a, b, offsets)
    a_odd = torch.cat([a, torch.zeros(R, 1, device=DEV, dtype=a.dtype)], 1)
    b_odd = torch.cat([b, torch.zeros(G, 1, N, device=DEV, dtype=b.dtype)], 1)
    slow = ops.grouped_mm(a_odd, b_odd, offsets)   # K = 65: fallback
    expect = ref64(a, b, offsets)
    check(fast, expect, torch.bfloat16, "sm90")
    check(slow, expect, torch.bfloat16, "fallback")
    assert rel_norm(fast, slow.double()) < 1e-2


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 8,
                    reason="SM80 path: needs compute capability 8.0 or more")
def test_sm80_path_runs_and_matches_default(monkeypatch):
    # On an H100 the default is SM90: forcing sm80 must change the kernel (the launch trace
    # shows a CUTLASS 2.x GemmGrouped kernel) and keep the result within the tolerance.
    R, K, N, G = 1500, 128, 192, 7
    a, b = make(R, K, N, G, torch.bfloat16, transposed_b=True)
    offsets = offsets_on_device(G, R)
    default = ops.grouped_mm(a, b, offsets)
    monkeypatch.setenv("ANYEXPERTS_GROUPED_MM_BACKEND", "sm80")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        forced = ops.grouped_mm(a, b, offsets)
        torch.cuda.synchronize()
    names = " ".join(e.name for e in prof.events())
    if not names:
        pytest.skip("the profiler recorded no kernel names here")
    assert "GemmGrouped" in names, "the sm80 override must run the CUTLASS 2.x kernel"
    expect = ref64(a, b, offsets)
    check(forced, expect, torch.bfloat16, "sm80")
    assert rel_norm(forced, default.double()) < 1e-2


def test_backend_override(monkeypatch):
    a, b = make(64, 16, 16, 2, torch.bfloat16)
    offsets = i32([30, 64])
    monkeypatch.setenv("ANYEXPERTS_GROUPED_MM_BACKEND", "simt")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = ops.grouped_mm(a, b, offsets)
        torch.cuda.synchronize()
    names = " ".join(e.name for e in prof.events())
    assert "fallback_grouped_mm_kernel" in names or not names, "simt: the SIMT kernel runs"
    assert "cutlass" not in names, "simt: no CUTLASS kernel may run"
    check(out, ref64(a, b, offsets), torch.bfloat16, "simt")
    monkeypatch.setenv("ANYEXPERTS_GROUPED_MM_BACKEND", "sm81")
    with pytest.raises(RuntimeError, match="ANYEXPERTS_GROUPED_MM_BACKEND='sm81'"):
        ops.grouped_mm(a, b, offsets)
