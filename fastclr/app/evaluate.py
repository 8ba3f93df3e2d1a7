"""The protocols that judge a backbone's features, as the SimCLR literature does. Each is a
function of tensors (or of a backbone and a dataset), deterministic for a seed; the command that
runs them on a saved run is ``python -m fastclr.evaluate`` (fastclr/app/eval_run.py), and the
training loop's own evaluation calls the same functions.

- kNN (Wu et al. 2018; solo-learn's ``main_knn.py``): the ``k`` training features most
  cosine-similar to each held-out feature (``fastclr.knn_topk``: streamed over bank tiles, never
  the query x bank matrix) vote for their class with weight ``exp(sim / T)``; top-1 and top-5,
  over a k x T sweep on the backbone's and the head's features.
- Linear probe: the backbone frozen, features standardised with the training split's statistics,
  one linear layer trained with AdamW (cosine schedule); top-1, top-5, per-class precision,
  recall and F1, the confusion matrix.
- k-means (k = classes, several restarts) on the L2-normalised held-out features: NMI, ARI
  (scikit-learn's) and cluster accuracy (the best one-to-one matching of clusters to classes,
  ``scipy.optimize.linear_sum_assignment``).
- Few-label fine-tuning (the SimCLR paper's semi-supervised protocol): the whole network and a
  new linear classifier trained on a stratified, seeded fraction of the training labels
  (Nesterov SGD, no weight decay, crop and flip only); the same network from random
  initialisation on the same images is the comparison.
- t-SNE of the held-out features, coloured by class.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fastclr.similarity import knn_topk

from .augment import TorchSimCLRAugment

PROTOCOLS = ("knn", "linear", "kmeans", "finetune", "tsne")


@dataclass
class Settings:
    """Every protocol's settings (written into eval.json beside the figures)."""
    seed: int = 0
    knn_k: int = 200                   # the headline kNN figure's k and T
    knn_temperature: float = 0.1
    knn_sweep_k: tuple = (10, 20, 50, 100, 200)
    knn_sweep_temperature: tuple = (0.02, 0.05, 0.1, 0.2, 0.5)
    probe_epochs: int = 100
    probe_lr: float = 1e-2
    kmeans_restarts: int = 10
    label_fractions: tuple = (0.01, 0.1)
    finetune_steps: int = 300
    finetune_batch: int = 256
    finetune_lr: float = 0.05          # at finetune_batch images (scaled linearly below it)
    finetune_crop_scale: float = 0.5
    finetune_flip: float = 0.5
    bn_batches: int = 20               # forwards that re-estimate BatchNorm after fine-tuning
    tsne_points: int = 2000
    progress: bool = True


# --- features ---------------------------------------------------------------------------------

@torch.no_grad()
def extract_features(backbone: nn.Module, batches, *, mean, std, device, dtype=None,
                     channels_last: bool = False, size: int | None = None, desc: str | None = None,
                     progress: bool = False):
    """Backbone features of ``batches`` (an iterable of ``(uint8 (b, 3, H, W), labels)``), in eval
    mode, as float32 on ``device``; returns ``(features (N, F), labels (N,))``. With ``size``, a
    batch that is not 3 x size x size images is refused (the model was built for those)."""
    was_training = backbone.training
    backbone.eval()
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
    s = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
    feats, labels = [], []
    try:
        for x, y in tqdm(batches, desc=desc, unit="batch", leave=False, disable=not progress):
            if size is not None and tuple(x.shape[1:]) != (3, size, size):
                raise ValueError(f"the model takes 3 x {size} x {size} images; the data gives "
                                 f"{' x '.join(map(str, x.shape[1:]))}")
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
def embed(model: nn.Module, x: torch.Tensor, *, device, dtype=None, batch: int = 256) -> torch.Tensor:
    """The model's projections of normalised images ``x`` (float (N, 3, H, W)), in eval mode,
    L2-normalised: the embeddings the contrastive loss compares."""
    was_training = model.training
    model.eval()
    try:
        out = []
        for i in range(0, len(x), batch):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out.append(model(x[i:i + batch].to(device))[1].float())
    finally:
        model.train(was_training)
    return F.normalize(torch.cat(out), dim=1)


def alignment_uniformity(z1: torch.Tensor, z2: torch.Tensor) -> dict:
    """Wang & Isola (2020) of L2-normalised embeddings of two views of the same images:
    alignment E ||z1 - z2||^2 over the pairs (lower: views closer), uniformity
    log E exp(-2 ||z_i - z_j||^2) over distinct images of the first view (lower: spread wider)."""
    align = (z1 - z2).pow(2).sum(1).mean()
    sq = torch.cdist(z1.double(), z1.double()).pow(2)
    off = ~torch.eye(len(z1), dtype=torch.bool, device=z1.device)
    uniform = torch.logsumexp(-2 * sq[off], 0) - math.log(max(int(off.sum()), 1))
    return {"alignment": float(align), "uniformity": float(uniform)}


@torch.no_grad()
def head_features(head: nn.Module, features: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    """The head's output (the projection) for backbone ``features``, in eval mode."""
    was_training = head.training
    head.eval()
    try:
        return torch.cat([head(features[i:i + batch]).float() for i in range(0, len(features), batch)])
    finally:
        head.train(was_training)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict:
    """``{"top1": ..., "top5": ...}`` of class ``scores`` (N, C); top-k with k >= C is 1."""
    out = {}
    for k in ks:
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices
        out[f"top{k}"] = (top == labels[:, None]).any(1).float().mean().item()
    return out


# --- kNN --------------------------------------------------------------------------------------

@torch.no_grad()
def knn_neighbours(train_features, test_features, k: int, *, chunk=None, impl="auto"):
    """(similarities, indices) of each test feature's ``k`` nearest training features, best first
    (k capped at the bank size)."""
    k = min(k, train_features.shape[0])
    return knn_topk(test_features.float(), train_features.float(), k, impl=impl, chunk=chunk)


def knn_vote(sim, idx, train_labels, num_classes: int, temperature: float) -> torch.Tensor:
    """Class scores (Q, C): each neighbour's vote ``exp(sim / T)`` for its class."""
    w = (sim.float() / temperature).exp()
    scores = torch.zeros(sim.shape[0], num_classes, device=sim.device)
    return scores.scatter_add_(1, train_labels[idx], w)


@torch.no_grad()
def knn_predict(train_features, train_labels, test_features, num_classes: int, *, k: int = 200,
                temperature: float = 0.1, chunk: int | None = None, impl: str = "auto"):
    """Class scores (Q, C) of a temperature-weighted cosine kNN vote (k is capped at the bank
    size)."""
    _check_knn(k, temperature)
    sim, idx = knn_neighbours(train_features, test_features, k, chunk=chunk, impl=impl)
    return knn_vote(sim, idx, train_labels, num_classes, temperature)


def _check_knn(k: int, temperature: float) -> None:
    if k < 1 or temperature <= 0:
        raise ValueError(f"knn: need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")


def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes: int, *,
                 k: int = 200, temperature: float = 0.1) -> float:
    scores = knn_predict(train_features, train_labels, test_features, num_classes, k=k,
                         temperature=temperature)
    return (scores.argmax(1) == test_labels).float().mean().item()


def knn_sweep(train_features, train_labels, test_features, test_labels, num_classes: int,
              ks, temperatures, neighbours=None) -> list:
    """Top-1/top-5 for every (k, T): one neighbour search at the largest k (or ``neighbours``,
    ``knn_neighbours``' result at a k at least that large), sliced -- the neighbours come best
    first, so the first k of them are the k nearest."""
    sim, idx = neighbours or knn_neighbours(train_features, test_features, max(ks))
    rows = []
    for k in sorted(set(min(k, sim.shape[1]) for k in ks)):
        for t in temperatures:
            scores = knn_vote(sim[:, :k], idx[:, :k], train_labels, num_classes, t)
            rows.append({"k": k, "temperature": t, **topk_accuracy(scores, test_labels)})
    return rows


def knn_protocol(split: dict, num_classes: int, s: Settings, *, sweep: bool = True) -> dict:
    """The headline kNN (backbone, ``s.knn_k``, ``s.knn_temperature``) and the sweep over k x T on
    the backbone's and (when ``split`` has them) the head's features. The backbone's neighbours
    are searched once, at the largest k either needs."""
    _check_knn(s.knn_k, s.knn_temperature)
    (ftr, ytr), (fte, yte) = split["train"], split["test"]
    sim, idx = knn_neighbours(ftr, fte, max((s.knn_k, *s.knn_sweep_k)) if sweep else s.knn_k)
    k = min(s.knn_k, sim.shape[1])
    scores = knn_vote(sim[:, :k], idx[:, :k], ytr, num_classes, s.knn_temperature)
    out = {"k": k, "temperature": s.knn_temperature, **topk_accuracy(scores, yte)}
    if sweep:
        out["sweep"] = {"backbone": knn_sweep(ftr, ytr, fte, yte, num_classes, s.knn_sweep_k,
                                              s.knn_sweep_temperature, neighbours=(sim, idx))}
        if "head_train" in split:
            out["sweep"]["head"] = knn_sweep(split["head_train"], ytr, split["head_test"], yte,
                                             num_classes, s.knn_sweep_k, s.knn_sweep_temperature)
    return out


# --- linear probe -----------------------------------------------------------------------------

def linear_probe(train_features, train_labels, test_features, num_classes: int, *,
                 epochs: int = 100, batch_size: int = 256, lr: float = 1e-2,
                 weight_decay: float = 1e-4, seed: int = 0, progress: bool = False) -> torch.Tensor:
    """Class scores (logits) on ``test_features`` of a linear classifier trained on frozen,
    standardised ``train_features``. Deterministic for a seed."""
    device = train_features.device
    mu = train_features.mean(0, keepdim=True)
    sd = train_features.std(0, keepdim=True).clamp_min(1e-6)
    xtr, xte = (train_features - mu) / sd, (test_features - mu) / sd
    g = torch.Generator(device="cpu").manual_seed(seed)
    clf = _seeded_linear(xtr.shape[1], num_classes, g).to(device)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=weight_decay)
    n = xtr.shape[0]
    batch_size = min(batch_size, n)
    steps = epochs * (n // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    with torch.enable_grad():
        for _ in tqdm(range(epochs), desc="linear probe", unit="epoch", leave=False, disable=not progress):
            perm = torch.randperm(n, generator=g).to(device)
            for i in range(n // batch_size):
                idx = perm[i * batch_size:(i + 1) * batch_size]
                loss = F.cross_entropy(clf(xtr[idx]), train_labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    with torch.no_grad():
        return clf(xte)


def _seeded_linear(fan_in: int, classes: int, g: torch.Generator) -> nn.Linear:
    """nn.Linear with PyTorch's default weight range, drawn from ``g``, zero bias."""
    clf = nn.Linear(fan_in, classes)
    with torch.no_grad():
        bound = 1 / math.sqrt(fan_in)
        clf.weight.copy_(torch.rand(clf.weight.shape, generator=g) * 2 * bound - bound)
        clf.bias.zero_()
    return clf


def classification_report(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Top-1/top-5, per-class precision / recall / F1 / support and the confusion matrix
    (rows: true class), with scikit-learn's metrics."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
    y, p = labels.cpu().numpy(), scores.argmax(1).cpu().numpy()
    classes = list(range(num_classes))
    prec, rec, f1, support = precision_recall_fscore_support(y, p, labels=classes, zero_division=0)
    return {**topk_accuracy(scores, labels),
            "per_class": [{"class": c, "precision": float(prec[c]), "recall": float(rec[c]),
                           "f1": float(f1[c]), "support": int(support[c])} for c in classes],
            "macro_f1": float(np.mean(f1)),
            "confusion": confusion_matrix(y, p, labels=classes).tolist()}


def linear_protocol(split: dict, num_classes: int, s: Settings) -> dict:
    (ftr, ytr), (fte, yte) = split["train"], split["test"]
    scores = linear_probe(ftr, ytr, fte, num_classes, epochs=s.probe_epochs, lr=s.probe_lr,
                          seed=s.seed, progress=s.progress)
    return {"epochs": s.probe_epochs, **classification_report(scores, yte, num_classes)}


# --- clustering -------------------------------------------------------------------------------

def cluster_accuracy(labels, clusters) -> float:
    """Accuracy of the best one-to-one assignment of clusters to classes (Hungarian matching)."""
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics.cluster import contingency_matrix
    table = contingency_matrix(labels, clusters)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / table.sum())


def kmeans_protocol(features: torch.Tensor, labels: torch.Tensor, num_classes: int, s: Settings) -> dict:
    """k-means with k = classes on the L2-normalised features: NMI, ARI, cluster accuracy."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
    x = F.normalize(features.float(), dim=1).cpu().numpy().astype(np.float64)
    y = labels.cpu().numpy()
    clusters = KMeans(n_clusters=num_classes, n_init=s.kmeans_restarts, random_state=s.seed).fit_predict(x)
    return {"k": num_classes, "restarts": s.kmeans_restarts,
            "nmi": float(normalized_mutual_info_score(y, clusters)),
            "ari": float(adjusted_rand_score(y, clusters)),
            "cluster_accuracy": cluster_accuracy(y, clusters)}


# --- few-label fine-tuning ----------------------------------------------------------------------

def few_label_subset(labels, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a stratified ``fraction`` of ``labels``: round(fraction x n_c) images of
    every class c, drawn with ``seed``. Refuses a fraction outside (0, 1) or one that leaves a
    class without an image."""
    if not 0 < fraction < 1:
        raise ValueError(f"--label-fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = int(round(fraction * len(members)))
        if n == 0:
            raise ValueError(f"--label-fraction {fraction} leaves class {int(c)} without an image "
                             f"({len(members)} images x {fraction} rounds to 0); use a larger fraction")
        picked.append(rng.choice(members, n, replace=False))
    return np.sort(np.concatenate(picked))


def finetune(backbone: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
             s: Settings, *, mean, std, device, desc: str = "fine-tune") -> nn.Module:
    """``backbone`` (a copy: the argument is left as it was) and a new linear classifier trained
    together on ``images`` (uint8 (n, 3, H, W), the few labelled ones): Nesterov SGD with
    momentum 0.9, no weight decay, cosine schedule over ``s.finetune_steps``, random crop and flip
    only; then the BatchNorm statistics re-estimated (``recalibrate_batchnorm``). Returns
    ``nn.Sequential(backbone, classifier)``, in eval mode."""
    torch.manual_seed(s.seed)
    g = torch.Generator(device="cpu").manual_seed(s.seed)
    model = nn.Sequential(copy.deepcopy(backbone),
                          _seeded_linear(backbone.out_features, num_classes, g)).to(device).train()
    aug = TorchSimCLRAugment(images.shape[-1], mean=mean, std=std, colour=False, blur=False,
                             scale=(s.finetune_crop_scale, 1.0), flip=s.finetune_flip)
    batch = min(s.finetune_batch, len(images))
    lr = s.finetune_lr * batch / s.finetune_batch
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / s.finetune_steps)))
    aug_gen = torch.Generator(device=device).manual_seed(s.seed)
    images, labels = images.to(device), labels.to(device)
    order = torch.empty(0, dtype=torch.long)
    for _ in tqdm(range(s.finetune_steps), desc=desc, unit="step", leave=False, disable=not s.progress):
        if len(order) < batch:
            order = torch.cat([order, torch.randperm(len(images), generator=g)])
        idx, order = order[:batch].to(device), order[batch:]
        (x,) = aug(images[idx], generator=aug_gen, views=1)
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    recalibrate_batchnorm(model, lambda: aug(images[torch.randint(len(images), (batch,), generator=g)
                                                    .to(device)], generator=aug_gen, views=1)[0],
                          s.bn_batches)
    return model.eval()


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batch, batches: int) -> None:
    """BatchNorm running statistics as the plain average over ``batches`` forwards of
    ``batch()`` in train mode (no weight changes). A few hundred steps leave running statistics
    near their initial values where the layers' momentum is small (torchvision's MobileNetV3 and
    EfficientNets use 0.01): evaluated with those, a network trained from scratch predicts one
    class."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or batches < 1:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    try:
        for _ in range(batches):
            model(batch())
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum


# --- t-SNE ------------------------------------------------------------------------------------

def tsne_map(features: torch.Tensor, labels: torch.Tensor, s: Settings) -> tuple:
    """(2-D points, their classes): the t-SNE map of at most ``s.tsne_points`` features, drawn
    with the seed."""
    from sklearn.manifold import TSNE
    keep = np.sort(np.random.default_rng(s.seed).permutation(len(features))[:s.tsne_points])
    x = F.normalize(features.float(), dim=1).cpu().numpy()[keep]
    xy = TSNE(n_components=2, init="pca", perplexity=min(30.0, (len(x) - 1) / 3),
              random_state=s.seed).fit_transform(x)
    return xy, labels.cpu().numpy()[keep]


def scatter_plot(path: str, xy: np.ndarray, y: np.ndarray, title: str) -> None:
    """A PNG of 2-D points coloured by class."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 6))
    points = ax.scatter(xy[:, 0], xy[:, 1], c=y, cmap="tab10" if y.max() < 10 else "tab20", s=6)
    if y.max() < 20:
        ax.legend(*points.legend_elements(), title="class", fontsize=7, loc="best")
    ax.set(title=title, xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def confusion_plot(path: str, confusion, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay
    c = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(6, 5.5))
    ConfusionMatrixDisplay(c).plot(ax=ax, include_values=len(c) <= 20, colorbar=False)
    ax.set(title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
