"""AnyExperts vs static top-K on a synthetic multimodal batch, side by side.

The batch: image tokens (a few object patches with rich, varied content on a redundant
background: one low-norm vector per image plus a little noise) and text tokens (random
embeddings of a small vocabulary). The toy task: object and text tokens must go through a
fixed random nonlinear map (the "teacher"); background tokens only need a scaled copy of
themselves, which a `copy` virtual expert provides for free.

Both layers train for a few hundred Adam steps on fresh batches; AnyExperts runs its budget
controller at a lower real Avg-K than the static top-K. The table reports, on a held-out
batch: the task loss, the mean real experts per token (Avg-K) per token group, the
virtual share, load balance, the rows the GEMMs compute, and the time of one forward +
backward on the device present (CUDA if available, else CPU).

    PYTHONPATH=python python examples/layer_demo.py [--steps 300] [--seed 0]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from anyexperts_ops import presets
from anyexperts_ops.layer import AnyExpertsMoE

GROUPS = ("text", "image object", "image background")  # modality ids 0, 1, 2


def make_batch(g, *, images, patches, text, H, vocab, device, dtype):
    """x[T,H], target[T,H], group[T] (0 text, 1 image object, 2 image background)."""
    obj = torch.rand(images, patches, generator=g) < 0.25           # 25% object patches
    bg = 0.3 * torch.randn(images, 1, H, generator=g).expand(images, patches, H)
    img = torch.where(obj[..., None], torch.randn(images, patches, H, generator=g),
                      bg + 0.02 * torch.randn(images, patches, H, generator=g))
    txt = vocab[torch.randint(0, vocab.shape[0], (text,), generator=g)]
    x = torch.cat([txt, img.reshape(-1, H)])
    group = torch.cat([torch.zeros(text, dtype=torch.long),
                       torch.where(obj.reshape(-1), 1, 2)])
    return x.to(device, dtype), group.to(device)


def teacher_fn(H, g):
    A = torch.randn(H, 4 * H, generator=g) / H ** 0.5
    B = torch.randn(4 * H, H, generator=g) / (4 * H) ** 0.5

    def f(x, group):
        rich = torch.tanh(x @ A.to(x)) @ B.to(x)
        return torch.where((group == 2)[:, None], 0.5 * x, rich)
    return f


def timed_fwd_bwd(layer, x, group, reps):
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = []
    for i in range(reps + 2):
        sync()
        t0 = time.perf_counter()
        out, aux = layer(x, group)
        (out.float().square().mean() + aux.loss).backward()
        sync()
        if i >= 2:  # two warm-up runs
            times.append(time.perf_counter() - t0)
    layer.zero_grad(set_to_none=True)
    return statistics.median(times) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--static-k", type=int, default=8)
    ap.add_argument("--target-avg-k", type=float, default=6.0)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU intra-op threads (default 1: at these small shapes more threads "
                         "mostly add wake-up latency, badly so on a loaded machine)")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    H, Fw, N = 64, 64, 32
    shape = dict(images=4, patches=64, text=128, H=H, vocab=torch.randn(256, H, generator=g),
                 device=device, dtype=dtype)
    teacher = teacher_fn(H, g)

    K = args.static_k
    layers = {
        f"static top-{K}": AnyExpertsMoE(presets.static_topk(H, Fw, N, K, num_modalities=3),
                                         device=device, dtype=dtype),
        "AnyExperts": AnyExpertsMoE(presets.anyexperts(
            H, Fw, N, num_virtual=4, virtual_kinds=("zero", "copy", "const", "const"),
            k_min=K // 2, k_max=K + K // 2, target_avg_k=args.target_avg_k, num_modalities=3),
            device=device, dtype=dtype),
    }
    opts = {n: torch.optim.Adam(m.parameters(), lr=3e-3) for n, m in layers.items()}

    t0 = time.perf_counter()
    for step in range(args.steps):
        x, group = make_batch(g, **shape)
        y = teacher(x, group)
        for name, m in layers.items():
            out, aux = m(x, group)
            loss = (out.float() - y.float()).square().mean()
            opts[name].zero_grad(set_to_none=True)
            (loss + aux.loss).backward()
            opts[name].step()
    train_s = time.perf_counter() - t0

    x, group = make_batch(g, **shape)
    y = teacher(x, group)
    rows = []
    for name, m in layers.items():
        with torch.no_grad():
            out, aux = m(x, group)  # training mode: the routing used in training
            loss = float((out.float() - y.float()).square().mean())
        s = aux.stats.to_dict()
        if aux.routing.importance is not None:
            w = aux.routing.importance
            s["w_by_group"] = [float(w[group == k].mean()) for k in range(len(GROUPS))]
        ms = timed_fwd_bwd(m, x, group, reps=5)
        rows.append((name, loss, s, ms))

    T = x.shape[0]
    where = f"{device} ({dtype}" + (f", {torch.get_num_threads()} CPU thread(s))" if device == "cpu"
                                     else f", {torch.cuda.get_device_name()})")
    print(f"AnyExperts layer demo on {where}: {T} tokens "
          f"({shape['text']} text, {T - shape['text']} image), H={H}, F={Fw}, N={N}; "
          f"{args.steps} training steps ({train_s:.1f} s), seed {args.seed}")
    hdr = ["layer", "task loss", "Avg-K real", *(f"{gname}" for gname in GROUPS),
           "virtual share", "LB max/mean", "GEMM rows", "fwd+bwd ms"]
    print("| " + " | ".join(hdr) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(hdr) - 1)) + "|")
    for name, loss, s, ms in rows:
        per = [f"{v:.2f}" for v in s["modality_real"]]
        print(f"| {name} | {loss:.4f} | {s['real_per_token']:.2f} | " + " | ".join(per)
              + f" | {s['virtual_share']:.1%} | {s['load_imbalance']:.2f} | "
              f"{s['gemm_rows']} | {ms:.1f} |")
    base, ae = rows[0][2], rows[1][2]
    print(f"Group columns: mean real experts per token (text / image object / image "
          f"background). AnyExperts computes {ae['gemm_rows'] / base['gemm_rows']:.0%} of "
          f"static top-{K}'s GEMM rows.")
    print("AnyExperts mean importance w by group: " + ", ".join(
        f"{gname} {v:.3f}" for gname, v in zip(GROUPS, ae["w_by_group"])))


if __name__ == "__main__":
    main()
