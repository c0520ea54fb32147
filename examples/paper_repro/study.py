"""Training, evaluation and routing analysis of one model of the study."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from anyexperts_ops import presets

from data import (CLS, IMAGE, MODALITY_NAMES, QUESTION_NAMES, TEXT, VOCAB, Batch, CanvasDigits,
                  slice_batch)
from model import TinyVQA


@dataclass
class ModelSpec:
    name: str                      # e.g. "static_k4", "anyexperts_t3"
    kind: str                      # "static" | "anyexperts"
    k: int = 0                     # static K
    target: float = 0.0            # AnyExperts target Avg-K (real slots per token)
    overrides: dict = field(default_factory=dict)   # extra AnyExpertsConfig fields


@dataclass
class Hyper:
    hidden: int = 64
    ffn: int = 64
    experts: int = 8
    virtual: int = 4
    k_min: int = 1
    k_max: int = 8
    layers: int = 2
    heads: int = 4
    steps: int = 800
    batch: int = 64
    lr: float = 3e-3
    warmup: int = 30
    seed: int = 0
    eval_chunk: int = 512


def make_config(spec: ModelSpec, hp: Hyper):
    common = dict(num_modalities=3)
    if spec.kind == "static":
        return presets.static_topk(hp.hidden, hp.ffn, hp.experts, spec.k,
                                   **{**common, **spec.overrides})
    if spec.kind == "anyexperts":
        return presets.anyexperts(hp.hidden, hp.ffn, hp.experts, num_virtual=hp.virtual,
                                  k_min=hp.k_min, k_max=hp.k_max, target_avg_k=spec.target,
                                  **{**common, **spec.overrides})
    raise ValueError(spec.kind)


def build(spec: ModelSpec, hp: Hyper, data: CanvasDigits) -> TinyVQA:
    torch.manual_seed(hp.seed)
    return TinyVQA(make_config(spec, hp), data.num_patches, data.patch ** 2,
                   hidden=hp.hidden, heads=hp.heads, layers=hp.layers)


def train(model: TinyVQA, data: CanvasDigits, hp: Hyper, log_every: int = 100,
          verbose: bool = True, prefix: str = "") -> dict:
    gen = torch.Generator().manual_seed(hp.seed + 1)      # same data stream for every model
    opt = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=0.01)

    def lr_at(s):
        if s < hp.warmup:
            return hp.lr * (s + 1) / hp.warmup
        return hp.lr * 0.5 * (1 + math.cos(math.pi * (s - hp.warmup) / max(1, hp.steps - hp.warmup)))

    model.train()
    curve, t0 = [], time.perf_counter()
    run_loss = run_acc = 0.0
    for step in range(hp.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        b = data.sample(hp.batch, gen)
        logits, aux_loss, auxes = model(b.patches, b.text)
        task = F.cross_entropy(logits, b.answer)
        loss = task + aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run_loss += task.item()
        run_acc += (logits.argmax(-1) == b.answer).float().mean().item()
        if (step + 1) % log_every == 0 or step + 1 == hp.steps:
            n = (step % log_every) + 1
            real = float(np.mean([a.stats.real_per_token.item() for a in auxes]))
            pt = {"step": step + 1, "loss": run_loss / n, "train_acc": run_acc / n,
                  "avg_k_real": real, "seconds": time.perf_counter() - t0}
            curve.append(pt)
            run_loss = run_acc = 0.0
            if verbose:
                print(f"{prefix}step {pt['step']:5d} loss {pt['loss']:.3f} acc {pt['train_acc']:.3f} "
                      f"Avg-K {real:.2f} ({pt['seconds']:.0f}s)", flush=True)
    return {"curve": curve, "train_seconds": time.perf_counter() - t0}


@torch.no_grad()
def run_eval(model: TinyVQA, ev: Batch, chunk: int = 512):
    """Predictions and per-token routing: (pred [B], real [L,B,S], virt [L,B,S],
    importance [L,B,S] or None)."""
    model.eval()
    N = model.moes[0].config.num_experts
    preds, real, virt, imp = [], [], [], []
    for s in range(0, len(ev.answer), chunk):
        b = slice_batch(ev, slice(s, s + chunk))
        logits, _, auxes = model(b.patches, b.text)
        B, S = b.patches.shape[0], 1 + b.text.shape[1] + b.patches.shape[1]
        preds.append(logits.argmax(-1))
        ids = torch.stack([a.routing.ids for a in auxes]).long()          # [L, B*S, K]
        real.append((((ids >= 0) & (ids < N)).sum(-1)).reshape(len(auxes), B, S))
        virt.append(((ids >= N).sum(-1)).reshape(len(auxes), B, S))
        if auxes[0].routing.importance is not None:
            imp.append(torch.stack([a.routing.importance for a in auxes]).reshape(len(auxes), B, S))
    model.train()
    return (torch.cat(preds), torch.cat(real, 1).float(), torch.cat(virt, 1).float(),
            torch.cat(imp, 1) if imp else None)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def analyse(model: TinyVQA, ev: Batch, chunk: int = 512) -> tuple[dict, dict]:
    """(metrics, per-token arrays for the figures)."""
    pred, real, virt, imp = run_eval(model, ev, chunk)
    L = real.shape[0]
    tsl, isl = model.text_slice(), model.image_slice()
    correct = (pred == ev.answer).float()
    m: dict = {"accuracy": correct.mean().item(),
               "accuracy_by_question": {QUESTION_NAMES[q]: correct[ev.qtype == q].mean().item()
                                        for q in range(len(QUESTION_NAMES))}}
    # Avg-K real / virtual per modality (mean over layers and tokens)
    mod = model.modality
    def per_mod(x):
        return {MODALITY_NAMES[k]: x[:, :, mod == k].mean().item() for k in (IMAGE, TEXT, CLS)}
    m["avg_k_real"] = real.mean().item()
    m["avg_k_real_by_modality"] = per_mod(real)
    m["avg_k_virtual_by_modality"] = per_mod(virt)
    m["avg_k_real_by_layer_modality"] = [
        {MODALITY_NAMES[k]: real[l][:, mod == k].mean().item() for k in (IMAGE, TEXT, CLS)}
        for l in range(L)]
    # foreground (ink > 0) vs background image patches
    ink = ev.ink                                       # [B, P]
    fg = ink > 0
    r_img = real[:, :, isl]                            # [L, B, P]
    fgf = fg.float()
    m["foreground_patch_fraction"] = fgf.mean().item()
    m["real_per_fg_patch"] = r_img[:, fg].mean().item()
    m["real_per_bg_patch"] = r_img[:, ~fg].mean().item()
    m["real_share_on_fg"] = (r_img * fgf).sum().item() / max(r_img.sum().item(), 1e-9)
    m["real_per_fg_patch_by_layer"] = [r_img[l][fg].mean().item() for l in range(L)]
    m["real_per_bg_patch_by_layer"] = [r_img[l][~fg].mean().item() for l in range(L)]
    ink_np = ink.reshape(-1).numpy()
    m["corr_real_ink_pearson_by_layer"] = [_pearson(r_img[l].reshape(-1).numpy(), ink_np)
                                           for l in range(L)]
    # text: real slots and importance per word
    words = ev.text                                    # [B, 6]
    r_txt = real[:, :, tsl]
    m["real_per_word"] = {VOCAB[w]: r_txt[:, words == w].mean().item()
                          for w in words.unique().tolist()}
    arrays = {"pred": pred, "real": real, "virt": virt, "importance": imp}
    if imp is not None:
        i_img = imp[:, :, isl]
        m["corr_importance_ink_pearson_by_layer"] = [
            _pearson(i_img[l].reshape(-1).numpy(), ink_np) for l in range(L)]
        m["corr_importance_ink_spearman_by_layer"] = [
            _spearman(i_img[l].reshape(-1).numpy(), ink_np) for l in range(L)]
        m["importance_by_modality"] = per_mod(imp)
        # is image importance a per-patch signal or a per-example one? Share of the variance
        # of w over image tokens that lies between examples (1 = constant within an image),
        # and the per-image correlation with ink, averaged over images
        between, within_corr = [], []
        for l in range(L):
            x = i_img[l].double()                                    # [B, P]
            tot = x.var(unbiased=False).item()
            between.append(x.mean(1).var(unbiased=False).item() / tot if tot > 0 else float("nan"))
            xc = x - x.mean(1, keepdim=True)
            kc = ink.double() - ink.double().mean(1, keepdim=True)
            den = (xc.square().sum(1) * kc.square().sum(1)).sqrt()
            ok = den > 0
            within_corr.append(((xc * kc).sum(1)[ok] / den[ok]).mean().item() if ok.any()
                               else float("nan"))
        m["importance_image_between_example_variance_share_by_layer"] = between
        m["corr_importance_ink_within_image_by_layer"] = within_corr
        m["importance_image_by_digit_by_layer"] = [
            [i_img[l][ev.digit == d].mean().item() for d in range(10)] for l in range(L)]
        m["importance_image_by_question_by_layer"] = [
            {QUESTION_NAMES[q]: i_img[l][ev.qtype == q].mean().item()
             for q in range(len(QUESTION_NAMES))} for l in range(L)]
        m["importance_fg_bg_by_layer"] = [
            {"fg": i_img[l][fg].mean().item(), "bg": i_img[l][~fg].mean().item()}
            for l in range(L)]
        m["importance_per_word"] = {VOCAB[w]: imp[:, :, tsl][:, words == w].mean().item()
                                    for w in words.unique().tolist()}
        m["importance_bias_by_layer"] = [float(x.importance_bias) for x in model.moes]
    return m, arrays
