"""Held-out measurements of a language-model student (`kdstore.lm_training`): the --eval version's checks, and
perplexity, next-token accuracy, KL to the teacher and top-1 agreement over a `TokenTargetDataset`."""

from __future__ import annotations

import math

import torch
from torch import nn

from kdstore.device import autocast
from kdstore.errors import ConfigError, arg
from kdstore.lm_data import TokenTargetDataset, collate
from kdstore.lm_losses import IGNORE, hard_nll, sampled_kl, topk_kl
from kdstore.lm_students import lm_logits
from kdstore.store import Version, open_version
from kdstore.store.remote import resolve_any


def eval_version(ref: str, training: Version, vocab_size: int, seq_len: int) -> Version:
    """The --eval version, checked against the training version: per-token targets over the same vocabulary and
    tokenizer, in rows no longer than the training rows."""
    v = open_version(resolve_any(ref))
    t = v.manifest["targets"]
    if t.get("kind") != "tokens":
        raise ConfigError(f"{arg('eval')} {v.ref}: holds {t.get('kind', 'classification')} targets; expected a "
                          "per-token version of held-out text labeled by the same teacher")
    if int(t["vocab_size"]) != vocab_size or int(t["seq_len"]) > seq_len:
        raise ConfigError(f"{arg('eval')} {v.ref}: targets over {t['vocab_size']} ids in rows of {t['seq_len']}; "
                          f"expected {vocab_size} ids in rows of at most {seq_len} (held-out text "
                          "labeled by the same teacher)")
    fp = [x["tokenizer"].get("vocab_sha256") for x in (v.manifest["teachers"][0], training.manifest["teachers"][0])
          if isinstance(x.get("tokenizer"), dict)]
    if len(fp) == 2 and fp[0] != fp[1]:
        raise ConfigError(f"{arg('eval')} {v.ref}: its tokenizer's vocabulary (sha256 {fp[0][:12]}) is not the "
                          f"training version's ({fp[1][:12]}); label the held-out text with the same teacher")
    return v


@torch.no_grad()
def measure(model: nn.Module, ds: TokenTargetDataset, batch_size: int, device: torch.device,
            precision: str) -> dict[str, float]:
    """Mean NLL and perplexity on the true next tokens, next-token accuracy, KL(teacher || student) at T = 1 over
    the target positions (exact against the stored top-k rebuild, else the unbiased sampled estimate), and with a
    top-k the top-1 agreement with the teacher. Leaves `model` in training mode."""
    model.eval()
    nll = kl = correct = agree = 0.0
    n_tok = n_pos = 0
    topk = False
    for a in range(0, len(ds), batch_size):
        b = {k: v.to(device) for k, v in collate([ds[i] for i in range(a, min(a + batch_size, len(ds)))]).items()}
        with autocast(device, precision):
            logits = lm_logits(model, b["input_ids"])
        flat = logits.float().reshape(-1, logits.shape[-1])
        lab, tm = b["labels"].reshape(-1), b["target_mask"].reshape(-1).bool()
        counted = lab != IGNORE
        nll += float(hard_nll(flat, lab)[counted].sum())
        correct += float((flat.argmax(-1) == lab)[counted].sum())
        n_tok += int(counted.sum())
        topk = "topk_values" in b
        if topk:
            kk = b["topk_values"].shape[-1]
            per = topk_kl(flat, b["topk_values"].reshape(-1, kk), b["topk_indices"].reshape(-1, kk),
                          b["logsumexp"].reshape(-1), b["tail_logmass"].reshape(-1))
            agree += float((flat.argmax(-1) == b["topk_indices"].reshape(-1, kk)[:, 0])[tm].sum())
        else:
            kk = b["sample_ids"].shape[-1]
            per = sampled_kl(flat, b["sample_ids"].reshape(-1, kk), b["sample_counts"].reshape(-1, kk),
                             b["sample_logprobs"].reshape(-1, kk))
        kl += float(per[tm].sum())
        n_pos += int(tm.sum())
    model.train()
    mean = nll / max(n_tok, 1)
    out = {"nll": mean, "perplexity": math.exp(min(mean, 700.0)), "accuracy": correct / max(n_tok, 1),
           "kl_teacher": kl / max(n_pos, 1), "tokens": n_tok}
    if topk:
        out["teacher_agreement"] = agree / max(n_pos, 1)
    return out
