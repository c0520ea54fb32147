"""Shared test machinery: per-test seeding, random routing inputs, fast oracles, comparisons.

Seeding: every test draws a fresh random seed (torch and `random` are seeded with it)
unless ANYEXPERTS_TEST_SEED is set, in which case every test uses that seed. A failing
test's report names its seed, so `ANYEXPERTS_TEST_SEED=<seed> pytest <test id>` replays it.
"""
from __future__ import annotations

import contextlib
import math
import os
import random

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import anyexperts_ops  # noqa: F401  (registers torch.ops.anyexperts)
from anyexperts_ops import reference as ref

_ENV_SEED = "ANYEXPERTS_TEST_SEED"
_current_seed: int | None = None
_failed_seeds: list[tuple[str, int]] = []

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def dispatch_to(to: str):
    """"kernel": the CPU kernels; "fake": the same calls traced by a FakeTensorMode, which
    turns the CPU inputs into fake tensors and runs the fake implementations."""
    return (contextlib.nullcontext() if to == "kernel"
            else FakeTensorMode(allow_non_fake_inputs=True))


# ---- seeding --------------------------------------------------------------------------

def current_seed() -> int | None:
    return _current_seed


def _seed_tag() -> str:
    return f" [{_ENV_SEED}={_current_seed}]"


@pytest.fixture(autouse=True)
def _seed_everything(request):
    global _current_seed
    env = os.environ.get(_ENV_SEED)
    seed = int(env) if env else random.SystemRandom().randrange(2**31)
    _current_seed = seed
    request.node._anyexperts_seed = seed
    random.seed(seed)
    torch.manual_seed(seed)
    yield seed
    _current_seed = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    seed = getattr(item, "_anyexperts_seed", None)
    if rep.failed and seed is not None:
        rep.sections.append(("anyexperts seed",
                             f"reproduce with {_ENV_SEED}={seed} pytest '{item.nodeid}'"))
        _failed_seeds.append((item.nodeid, seed))


def pytest_report_header(config):
    env = os.environ.get(_ENV_SEED)
    return (f"anyexperts: fixed seed {_ENV_SEED}={env}" if env else
            f"anyexperts: fresh random seed per test (set {_ENV_SEED} to fix it)")


def pytest_terminal_summary(terminalreporter):
    if _failed_seeds:
        terminalreporter.section("anyexperts seeds of failed tests")
        for nodeid, seed in _failed_seeds:
            terminalreporter.write_line(f"{_ENV_SEED}={seed} {nodeid}")


@pytest.fixture
def one_thread():
    """For files of tiny shapes (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    intra-op threads only add wake-up latency there, which on a loaded 2-core CI machine costs
    ~20 ms per parallel op. Restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def gen(_seed_everything) -> torch.Generator:
    """A CPU generator seeded with this test's seed (so ANYEXPERTS_TEST_SEED replays it)."""
    return torch.Generator().manual_seed(_seed_everything)


def bench_subprocess_env() -> dict:
    """Environment for running a bench/ script in a subprocess on the package this test
    process imported (installed, or python/ through PYTHONPATH)."""
    env = dict(os.environ)
    py = os.path.dirname(os.path.dirname(os.path.abspath(anyexperts_ops.__file__)))
    env["PYTHONPATH"] = py + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# ---- random inputs --------------------------------------------------------------------

def randint(lo: int, hi: int, shape, dtype=torch.int32) -> torch.Tensor:
    """Uniform integers in [lo, hi] (inclusive)."""
    return torch.randint(lo, hi + 1, tuple(shape), dtype=torch.int64).to(dtype)


def distinct_logits(T: int, E: int, dtype=torch.float64, gap: float = 0.25) -> torch.Tensor:
    """Logits whose values in each row are at least ~gap apart: the ranking is stable under
    the small perturbations of gradcheck."""
    if T == 0 or E == 0:
        return torch.zeros(T, E, dtype=dtype)
    perm = torch.argsort(torch.rand(T, E), dim=1).to(torch.float64)
    noise = (torch.rand(T, E, dtype=torch.float64) - 0.5) * gap * 0.2
    return ((perm - E / 2) * gap + noise).to(dtype)


def routing_inputs(T: int, E: int, k_max: int, *, dtype=torch.float32, wild: bool = False,
                   ties: bool = False):
    """(logits[T,E], slots[T] int32, max_virtual[T] int32).

    slots in [0, k_max], max_virtual in [0, slots]; with `wild`, both also take values out
    of range (negative, above k_max / above slots) that the op must clamp. With `ties`,
    logits are small integers, so rows hold many equal values."""
    if ties:
        logits = randint(-2, 2, (T, E), torch.float32).to(dtype)
    else:
        logits = (torch.randn(T, E) * 2).to(dtype)
    if wild:
        slots = randint(-3, k_max + 3, (T,))
        max_virtual = randint(-3, k_max + 3, (T,))
    else:
        slots = randint(0, k_max, (T,))
        max_virtual = (torch.rand(T) * (slots.to(torch.float32) + 1)).floor().to(torch.int32)
    return logits, slots, max_virtual


def random_ids(T: int, K: int, num_real: int, *, masked: float = 0.25,
               bad: bool = True) -> torch.Tensor:
    """ids[T,K] int32: real ids in [0, num_real), plus a `masked` share of -1 and, with
    `bad`, ids the op must mask: virtual (>= num_real), large, and negative below -1."""
    ids = randint(0, max(num_real - 1, 0), (T, K))
    r = torch.rand(T, K)
    ids = torch.where(r < masked, torch.full_like(ids, -1), ids)
    if bad:
        junk = torch.tensor([-7, -2, num_real, num_real + 1, num_real + 5, 2**31 - 1,
                             -2**31], dtype=torch.int32)
        pick = junk[torch.randint(0, len(junk), (T, K))]
        ids = torch.where(r < masked / 3, pick, ids)
    return ids.contiguous()


def virtual_inputs(T: int, H: int, K: int, num_real: int, *, dtype=torch.float32,
                   device="cpu"):
    """add_virtual's inputs: (out, x, ids, weights, num_real, sources, const_vectors) with
    virtual experts of every code (zero -1, copy -2, const rows 0 and 1) and codes the op
    must ignore (a const row past C, an unknown negative), ids over real, virtual, -1 and
    junk values."""
    sources = torch.tensor([-1, -2, 0, 1, 2, -5, -2], dtype=torch.int32)  # C = 2: 2 is junk
    M = sources.shape[0]
    ids = randint(-1, num_real + M - 1, (T, K))
    junk = torch.tensor([num_real + M, 2**31 - 1, -2**31, -3], dtype=torch.int32)
    r = torch.rand(T, K)
    ids = torch.where(r < 0.1, junk[torch.randint(0, len(junk), (T, K))], ids)
    wdt = torch.float64 if dtype == torch.float64 else torch.float32
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in (
        torch.randn(T, H, dtype=dtype), torch.randn(T, H, dtype=dtype), ids.contiguous(),
        torch.rand(T, K, dtype=wdt), num_real, sources, torch.randn(2, H, dtype=dtype)))


def poisoned(fn, *args):
    """Runs fn once to learn its outputs, refills their memory with NaN / garbage through
    the caching allocator, then runs fn again: stale memory shows up as NaN or garbage."""
    outs = fn(*args)
    specs = [(o.shape, o.dtype, o.device) for o in (outs if isinstance(outs, tuple) else (outs,))]
    del outs
    blocks = [torch.full(s, float("nan") if d.is_floating_point else 0x7F7F7F7F, dtype=d,
                         device=dev) for s, d, dev in specs]
    del blocks
    return fn(*args)


def random_offsets(G: int, R: int, *, tail: bool = True, empty: float = 0.3) -> torch.Tensor:
    """Monotone end offsets for G groups in [0, R]; some groups empty; with `tail`, the
    last offset stops short of R (rows after it belong to no group)."""
    if G == 0:
        return torch.zeros(0, dtype=torch.int32)
    hi = R - (R // 5 if tail and R > 4 else 0)
    cuts = torch.sort(torch.randint(0, hi + 1, (G,))).values
    empty_mask = torch.rand(G) < empty
    # An empty group repeats the previous end.
    out, prev = [], 0
    for g in range(G):
        end = prev if bool(empty_mask[g]) else int(cuts[g])
        end = max(end, prev)
        out.append(end)
        prev = end
    return torch.tensor(out, dtype=torch.int32)


# ---- fast vectorized oracles (validated against reference.py in test_oracles) ----------

def fast_ranking(logits: torch.Tensor) -> torch.Tensor:
    """[T,E] int64 candidate order: logit descending, ties to lower index, NaN last."""
    v = logits.detach().double()
    nan = torch.isnan(v)
    v = torch.where(nan, torch.full_like(v, -math.inf), v)
    o1 = torch.sort(v, dim=1, descending=True, stable=True).indices
    o2 = torch.sort(nan.gather(1, o1).to(torch.uint8), dim=1, stable=True).indices
    return o1.gather(1, o2)


def fast_segmented_topk(logits, slots, max_virtual, k_max, num_real, norm="none"):
    T, E = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    order = fast_ranking(logits)
    want = slots.long().clamp(min=0).clamp(max=k_max)
    cap = torch.minimum(max_virtual.long().clamp(min=0), want)
    is_virt = order >= num_real
    vcount = torch.cumsum(is_virt.long(), dim=1)
    ok = ~is_virt | (vcount <= cap[:, None])
    pos = torch.cumsum(ok.long(), dim=1)
    taken = ok & (pos <= want[:, None])
    buf = torch.full((T, k_max + 1), -1, dtype=torch.int64)
    idx = torch.where(taken, pos - 1, torch.full_like(pos, k_max))
    buf.scatter_(1, idx, torch.where(taken, order, torch.full_like(order, -1)))
    ids = buf[:, :k_max]
    ids = torch.where(ids >= 0, ids, torch.full_like(ids, -1))
    live = ids >= 0
    zero = torch.zeros((), dtype=acc)

    def at_ids(per_candidate):
        return per_candidate.gather(1, ids.clamp(min=0)) if E else torch.zeros_like(ids, dtype=acc)

    if norm == "none":
        return ids.to(torch.int32), torch.where(live, at_ids(torch.softmax(logits.to(acc), -1)), zero)
    # p / sum p over the set as a softmax of the logits over it, NaN where p is, as
    # reference.py writes it
    in_set = live & (ids < num_real) if norm == "real" else live
    share = torch.softmax(torch.where(in_set, at_ids(logits.to(acc)), float("-inf")), dim=1)
    p = at_ids(torch.softmax(logits.to(acc), -1))
    return ids.to(torch.int32), torch.where(in_set, torch.where(p.isnan(), p, share), zero)


def fast_permute(x, ids, num_real, align):
    T, K = ids.shape
    H = x.shape[1]
    R = T * K + num_real * (align - 1)
    flat = ids.reshape(-1).long()
    live = (flat >= 0) & (flat < num_real)
    key = torch.where(live, flat, torch.full_like(flat, num_real))
    counts = torch.bincount(key, minlength=num_real + 1)[:num_real]
    padded = (counts + align - 1) // align * align
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    order = torch.sort(key, stable=True).indices
    skey = key[order]
    n_live = int(live.sum())
    first = torch.cumsum(counts, 0) - counts
    lo = order[:n_live]
    ek = skey[:n_live]
    rank = torch.arange(n_live) - first[ek]
    rows = starts[ek] + rank
    slot_rows = torch.full((T * K,), -1, dtype=torch.int64)
    slot_rows[lo] = rows
    x_perm = x.new_zeros((R, H))
    x_perm[rows] = x[lo // max(K, 1)]
    return x_perm, ends.to(torch.int32), slot_rows.view(T, K).to(torch.int32)


# ---- comparisons ----------------------------------------------------------------------

def _first_mismatch(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    ne = (a != b) & ~(torch.isnan(a) & torch.isnan(b)) if a.is_floating_point() else a != b
    idx = ne.nonzero()
    if len(idx) == 0:
        return "no mismatch"
    i = tuple(idx[0].tolist())
    return f"{len(idx)} mismatches; first at {i}: got {a[i].item()}, expected {b[i].item()}"


def assert_exact(actual: torch.Tensor, expected: torch.Tensor, what: str = "",
                 equal_nan: bool = False):
    """Bitwise equality (dtype, shape and values), NaN == NaN only with equal_nan."""
    expected = torch.as_tensor(expected)
    assert actual.dtype == expected.dtype, (
        f"{what}: dtype {actual.dtype}, expected {expected.dtype}{_seed_tag()}")
    assert actual.shape == expected.shape, (
        f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}{_seed_tag()}")
    a, b = actual.detach().cpu(), expected.detach().cpu()
    ok = torch.equal(a, b) if not equal_nan else bool(
        ((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
    assert ok, f"{what}: {_first_mismatch(a, b)}{_seed_tag()}"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "",
                 rtol: float = 1e-5, atol: float | None = None, equal_nan: bool = False):
    """fp32-level closeness: rtol relative, atol defaults to rtol * max|expected| (so
    cancellation near zero is measured against the tensor's scale)."""
    a = actual.detach().cpu()
    b = expected.detach().cpu().to(a.dtype) if expected.dtype != a.dtype else expected.detach().cpu()
    assert a.shape == b.shape, (
        f"{what}: shape {tuple(a.shape)}, expected {tuple(b.shape)}{_seed_tag()}")
    if atol is None:
        finite = b[torch.isfinite(b)]
        scale = float(finite.abs().max()) if finite.numel() else 0.0
        atol = rtol * max(scale, 1e-30)
    try:
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=equal_nan)
    except AssertionError as e:
        raise AssertionError(f"{what}: {e}{_seed_tag()}") from None


def rel_norm(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, b = actual.detach().double().cpu(), expected.detach().double().cpu()
    den = float(torch.linalg.vector_norm(b))
    num = float(torch.linalg.vector_norm(a - b))
    return num / den if den > 0 else num


def assert_rel_norm(actual, expected, what: str = "", tol: float = 1e-2):
    """Low-precision check: ||actual - expected|| / ||expected|| < tol (expected in fp64)."""
    assert actual.shape == expected.shape, (
        f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}{_seed_tag()}")
    assert torch.isfinite(actual).all(), f"{what}: non-finite values{_seed_tag()}"
    err = rel_norm(actual, expected)
    assert err < tol, f"{what}: relative norm error {err:.3e} >= {tol}{_seed_tag()}"


def check_float(actual, expected64, dtype, what=""):
    """Compares an op's output against an fp64 (or same-precision) reference by dtype:
    fp64 and fp32 elementwise to 1e-5 relative, bf16/fp16 by relative norm < 1e-2."""
    if dtype in (torch.float32, torch.float64):
        assert_close(actual, expected64.to(dtype), what)
    else:
        assert_rel_norm(actual, expected64, what)


def poison_allocator(*shapes_dtypes, device="cpu"):
    """Allocates NaN-filled blocks of the given sizes on `device` and frees them, so that an
    op which returns uninitialised memory from the allocator is likely to return NaNs."""
    blocks = [torch.full(s, float("nan"), dtype=d, device=device) for s, d in shapes_dtypes
              if d.is_floating_point]
    blocks += [torch.full(s, -12345, dtype=d, device=device) for s, d in shapes_dtypes
               if not d.is_floating_point]
    del blocks


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

__all__ = ["ref", "requires_cuda"]
