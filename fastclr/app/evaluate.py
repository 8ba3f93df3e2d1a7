"""Evaluation of a backbone's features: a weighted kNN classifier and a linear probe.

- kNN (Wu et al. 2018, as lightly's and solo-learn's monitors): the ``k`` training features most
  cosine-similar to each held-out feature (``fastclr.knn_topk``: streamed over bank tiles, never
  the query x bank matrix) vote for their class with weight ``exp(sim / T)``.
- Linear probe: the backbone frozen, features standardised with the training split's statistics,
  one linear layer trained with Adam (cosine schedule) on the device, top-1 on the held-out split.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def extract_features(backbone: nn.Module, batches, *, mean, std, device, dtype=None,
                     channels_last: bool = False):
    """Backbone features of ``batches`` (an iterable of ``(uint8 (b, 3, H, W), labels)``), in eval
    mode, as float32 on ``device``; returns ``(features (N, F), labels (N,))``."""
    was_training = backbone.training
    backbone.eval()
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
    s = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
    feats, labels = [], []
    try:
        for x, y in batches:
            x = (x.to(device, non_blocking=True).float() - m) / s
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                f = backbone(x)
            feats.append(f.float())
            labels.append(y.to(device))
    finally:
        backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_predict(train_features, train_labels, test_features, num_classes: int, *, k: int = 200,
                temperature: float = 0.1, chunk: int | None = None, impl: str = "auto"):
    """Class scores (Q, C) of a temperature-weighted cosine kNN vote (k is capped at the bank
    size)."""
    from fastclr.similarity import knn_topk
    if k < 1 or temperature <= 0:
        raise ValueError(f"knn: need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    k = min(k, train_features.shape[0])
    sim, idx = knn_topk(test_features.float(), train_features.float(), k, impl=impl, chunk=chunk)
    w = (sim.float() / temperature).exp()
    scores = torch.zeros(test_features.shape[0], num_classes, device=test_features.device)
    scores.scatter_add_(1, train_labels[idx], w)
    return scores


def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes: int, *,
                 k: int = 200, temperature: float = 0.1) -> float:
    scores = knn_predict(train_features, train_labels, test_features, num_classes, k=k,
                         temperature=temperature)
    return (scores.argmax(1) == test_labels).float().mean().item()


def linear_probe(train_features, train_labels, test_features, test_labels, num_classes: int, *,
                 epochs: int = 100, batch_size: int = 256, lr: float = 1e-2,
                 weight_decay: float = 1e-4, seed: int = 0) -> float:
    """Top-1 on the held-out split of a linear classifier on frozen features. Deterministic for
    a given seed."""
    device = train_features.device
    mu = train_features.mean(0, keepdim=True)
    sd = train_features.std(0, keepdim=True).clamp_min(1e-6)
    xtr, xte = (train_features - mu) / sd, (test_features - mu) / sd
    g = torch.Generator(device="cpu").manual_seed(seed)
    clf = nn.Linear(xtr.shape[1], num_classes).to(device)
    with torch.no_grad():
        bound = 1 / math.sqrt(xtr.shape[1])
        clf.weight.copy_(torch.rand(clf.weight.shape, generator=g) * 2 * bound - bound)
        clf.bias.zero_()
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=weight_decay)
    n = xtr.shape[0]
    batch_size = min(batch_size, n)
    steps = epochs * (n // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(n, generator=g).to(device)
            for i in range(n // batch_size):
                idx = perm[i * batch_size:(i + 1) * batch_size]
                loss = F.cross_entropy(clf(xtr[idx]), train_labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    with torch.no_grad():
        return (clf(xte).argmax(1) == test_labels).float().mean().item()
