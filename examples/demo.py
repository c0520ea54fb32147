"""The op pipeline on a synthetic batch, checked against the pure-PyTorch reference.

segmented_topk -> permute -> grouped_mm (gate/up) -> SwiGLU -> grouped_mm (down) -> unpermute,
on CUDA if present, else the CPU. Prints the routing it produced and the error vs reference.
"""
import argparse
import time

import torch

import anyexperts_ops as ae
from anyexperts_ops import reference as ref


def pipeline(mod, x, logits, slots, max_virtual, w_gate_up, w_down, k_max, num_real, align):
    ids, weights = mod.segmented_topk(logits, slots, max_virtual, k_max, num_real, "selected")
    x_perm, offsets, slot_rows = mod.permute(x, ids, num_real, align)
    h = mod.swiglu(mod.grouped_mm(x_perm, w_gate_up, offsets), offsets)
    y_perm = mod.grouped_mm(h, w_down, offsets)
    return mod.unpermute(y_perm, slot_rows, weights), ids, offsets


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(args.seed)
    T, H, Fw, N, M, k_min, k_max, align = args.tokens, 256, 512, 16, 4, 2, 8, 8
    rho_num, rho_den = 1, 5  # rho_max = 0.2, as an exact fraction

    # Importance: a third of the tokens matter (high w), the rest are filler (low w).
    w = torch.where(torch.rand(T, generator=g) < 1 / 3, 0.7 + 0.3 * torch.rand(T, generator=g),
                    0.3 * torch.rand(T, generator=g))
    slots = torch.round(k_min + w * (k_max - k_min)).clamp(k_min, k_max).to(torch.int32)
    max_virtual = (slots * rho_num) // rho_den
    logits = torch.randn(T, N + M, generator=g)
    logits[:, N:] += 2.0 * (1 - 2 * w).unsqueeze(1)  # IAR: important tokens avoid virtual slots
    x = torch.randn(T, H, generator=g)
    w_gate_up = torch.randn(N, 2 * Fw, H, generator=g).transpose(1, 2) / H ** 0.5  # nn.Linear layout
    w_down = torch.randn(N, H, Fw, generator=g).transpose(1, 2) / Fw ** 0.5

    inputs = [t.to(device) for t in (x.to(dtype), logits, slots, max_virtual,
                                     w_gate_up.to(dtype), w_down.to(dtype))]
    pipeline(ae, *inputs, k_max, N, align)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out, ids, offsets = pipeline(ae, *inputs, k_max, N, align)
    if device == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3
    expect, _, _ = pipeline(ref, x.double(), logits, slots, max_virtual, w_gate_up.double(),
                            w_down.double(), k_max, N, align)
    err = ((out.double().cpu() - expect).norm() / expect.norm()).item()

    ids = ids.cpu()
    real = ((ids >= 0) & (ids < N)).sum(1).double()
    virtual = (ids >= N).sum(1).double()
    rows = int(offsets[-1])
    print(f"anyexperts_ops demo on {device} ({dtype}), seed {args.seed}")
    print(f"| {'tokens':>6} | {'experts':>9} | {'slots/token':>11} | {'real/token':>10} "
          f"| {'virtual/token':>13} | {'GEMM rows':>9} | {'top-8 rows':>10} | {'rel. error':>10} "
          f"| {'time ms':>7} |")
    print(f"| {T:>6} | {f'{N}+{M}v':>9} | {slots.double().mean():>11.2f} | {real.mean():>10.2f} "
          f"| {virtual.mean():>13.2f} | {rows:>9} | {T * k_max:>10} | {err:>10.2e} | {ms:>7.2f} |")
    assert err < 1e-2, f"pipeline differs from the reference: relative error {err:.3e}"
    print(f"GEMM rows are {rows / (T * k_max):.0%} of a static top-{k_max}'s "
          f"(real slots plus padding to multiples of {align}); output matches the reference.")


if __name__ == "__main__":
    main()
