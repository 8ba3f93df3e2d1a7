"""python -m fastclr.evaluate and its protocols (fastclr/app/evaluate.py), each against an
independent computation on small data; python -m fastclr.export and fastclr.app.export.load_backbone against
torchvision loaded strictly; the bad inputs of both."""
import itertools
import json
import os
import signal
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastclr.app import checkpoint, config, eval_run, export, models, train
from fastclr.app import evaluate as ev

TINY = ["--epochs", "1", "--batch-size", "400", "--width", "4", "--image-size", "8",
        "--probe-epochs", "3", "--no-progress", "--knn-k", "20", "--deterministic"]
FAST = ["--no-progress", "--finetune-steps", "4", "--kmeans-restarts", "2", "--tsne-points", "120",
        "--label-fraction", "0.05,0.1", "--deterministic"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "tiny")
    train.main(TINY + ["--out", out])
    return out


def _folder_state(path):
    return {n: os.path.getmtime(os.path.join(path, n)) for n in os.listdir(path)}


# --- the protocols, each against an independent computation ---------------------------------------

def test_topk_accuracy_by_hand():
    scores = torch.randn(300, 12)
    labels = torch.randint(0, 12, (300,))
    acc = ev.topk_accuracy(scores, labels)
    order = scores.argsort(1, descending=True)
    for k in (1, 5):
        expect = np.mean([labels[i].item() in order[i, :k].tolist() for i in range(300)])
        assert acc[f"top{k}"] == pytest.approx(expect)
    assert acc["top5"] >= acc["top1"]
    assert ev.topk_accuracy(scores[:, :3], labels.clamp(max=2))["top5"] == 1.0  # k >= classes


def test_knn_sweep_slices_equal_separate_searches():
    g = torch.Generator().manual_seed(3)
    ftr, fte = torch.randn(257, 9, generator=g), torch.randn(41, 9, generator=g)
    ytr, yte = torch.randint(0, 6, (257,), generator=g), torch.randint(0, 6, (41,), generator=g)
    rows = ev.knn_sweep(ftr, ytr, fte, yte, 6, (3, 17, 50), (0.05, 0.5))
    assert [(r["k"], r["temperature"]) for r in rows] == list(itertools.product((3, 17, 50), (0.05, 0.5)))
    sim = F.normalize(fte.double(), dim=1) @ F.normalize(ftr.double(), dim=1).T
    for r in rows:  # brute force: the k most similar, each voting exp(sim / T)
        top = sim.topk(r["k"], dim=1)
        votes = torch.zeros(41, 6, dtype=torch.float64).scatter_add_(
            1, ytr[top.indices], (top.values / r["temperature"]).exp())
        assert r["top1"] == pytest.approx(ev.topk_accuracy(votes, yte)["top1"])
        assert r["top5"] == pytest.approx(ev.topk_accuracy(votes, yte)["top5"])
        assert r["top5"] >= r["top1"]


def test_knn_protocol_searches_the_backbone_once_and_equals_separate_searches(monkeypatch):
    g = torch.Generator().manual_seed(4)
    split = {"train": (torch.randn(230, 7, generator=g), torch.randint(0, 5, (230,), generator=g)),
             "test": (torch.randn(37, 7, generator=g), torch.randint(0, 5, (37,), generator=g))}
    split["head_train"], split["head_test"] = split["train"][0][:, :4], split["test"][0][:, :4]
    s = ev.Settings(knn_k=40, knn_temperature=0.07, knn_sweep_k=(5, 60), knn_sweep_temperature=(0.1,))
    searches, real = [], ev.knn_neighbours
    monkeypatch.setattr(ev, "knn_neighbours", lambda *a, **k: searches.append(a[2]) or real(*a, **k))
    out = ev.knn_protocol(split, 5, s)
    assert searches == [60, 60]  # the backbone's once (headline and sweep), the head's once
    monkeypatch.setattr(ev, "knn_neighbours", real)
    (ftr, ytr), (fte, yte) = split["train"], split["test"]
    alone = ev.topk_accuracy(ev.knn_predict(ftr, ytr, fte, 5, k=40, temperature=0.07), yte)
    assert (out["k"], out["top1"], out["top5"]) == (40, alone["top1"], alone["top5"])
    for name, (tr, te) in {"backbone": (ftr, fte), "head": (split["head_train"], split["head_test"])}.items():
        assert out["sweep"][name] == ev.knn_sweep(tr, ytr, te, yte, 5, (5, 60), (0.1,))
    with pytest.raises(ValueError, match="need k >= 1"):
        ev.knn_protocol(split, 5, ev.Settings(knn_k=0))


def test_classification_report_by_hand():
    g = torch.Generator().manual_seed(0)
    scores, labels = torch.randn(200, 4, generator=g), torch.randint(0, 4, (200,), generator=g)
    scores[labels == 2, 2] += 2  # one class easier than the rest
    r = ev.classification_report(scores, labels, 4)
    pred = scores.argmax(1)
    for c, row in enumerate(r["per_class"]):
        tp = ((pred == c) & (labels == c)).sum().item()
        assert row["precision"] == pytest.approx(tp / max((pred == c).sum().item(), 1))
        assert row["recall"] == pytest.approx(tp / (labels == c).sum().item())
        assert row["support"] == (labels == c).sum().item()
        assert r["confusion"][c] == [((labels == c) & (pred == p)).sum().item() for p in range(4)]
    assert r["per_class"][2]["f1"] > max(r["per_class"][c]["f1"] for c in (0, 1, 3))


def test_linear_probe_on_separable_clusters_and_shuffled_labels():
    centres = torch.randn(4, 16) * 5
    ytr, yte = torch.arange(200) % 4, torch.arange(80) % 4
    xtr, xte = centres[ytr] + torch.randn(200, 16), centres[yte] + torch.randn(80, 16)
    scores = ev.linear_probe(xtr, ytr, xte, 4, epochs=30, seed=1)
    assert ev.topk_accuracy(scores, yte)["top1"] == 1.0
    shuffled = ev.linear_probe(xtr, ytr[torch.randperm(200)], xte, 4, epochs=30, seed=1)
    assert ev.topk_accuracy(shuffled, yte)["top1"] < 0.6  # it learns from the labels
    assert torch.equal(scores, ev.linear_probe(xtr, ytr, xte, 4, epochs=30, seed=1))  # deterministic


def test_kmeans_on_known_clusters_and_cluster_accuracy_by_brute_force():
    centres = F.normalize(torch.randn(5, 32), dim=1) * 10
    labels = torch.arange(250) % 5
    x = centres[labels] + 0.05 * torch.randn(250, 32)
    r = ev.kmeans_protocol(x, labels, 5, ev.Settings(kmeans_restarts=3))
    assert r["nmi"] == pytest.approx(1.0) and r["ari"] == pytest.approx(1.0)
    assert r["cluster_accuracy"] == 1.0
    rng = np.random.default_rng(0)
    y, c = rng.integers(0, 4, 60), rng.integers(0, 4, 60)
    best = max(np.mean([perm[ci] == yi for yi, ci in zip(y, c)]) for perm in itertools.permutations(range(4)))
    assert ev.cluster_accuracy(y, c) == pytest.approx(best)


def test_few_label_subset_is_stratified_and_seeded():
    labels = np.repeat(np.arange(7), [30, 41, 55, 12, 90, 20, 33])
    idx = ev.few_label_subset(labels, 0.1, seed=4)
    counts = np.bincount(labels[idx], minlength=7)
    assert counts.tolist() == [round(0.1 * n) for n in np.bincount(labels)]
    assert np.array_equal(idx, ev.few_label_subset(labels, 0.1, seed=4))
    assert not np.array_equal(idx, ev.few_label_subset(labels, 0.1, seed=5))
    assert len(set(idx.tolist())) == len(idx)
    for bad, message in ((0.0, "in \\(0, 1\\)"), (1.0, "in \\(0, 1\\)"), (-0.1, "in \\(0, 1\\)"),
                         (0.02, "leaves class 3 without an image")):
        with pytest.raises(ValueError, match=message):
            ev.few_label_subset(labels, bad, seed=0)


def test_finetune_changes_a_copy_and_the_probe_changes_nothing():
    torch.manual_seed(0)
    model = models.build_model("resnet18", width=4, cifar_stem=True, image_size=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(20) % 2
    s = ev.Settings(finetune_steps=3, progress=False)
    net = ev.finetune(model.backbone, images, labels, 2, s, mean=(0.5,) * 3, std=(0.25,) * 3,
                      device=torch.device("cpu"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    tuned = net[0].state_dict()
    assert any(not torch.equal(before[f"backbone.{k}"], v) for k, v in tuned.items() if v.is_floating_point())
    again = ev.finetune(model.backbone, images, labels, 2, s, mean=(0.5,) * 3, std=(0.25,) * 3,
                        device=torch.device("cpu"))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in net.state_dict().items())


def test_recalibrated_batchnorm_is_the_average_of_the_batches():
    bn = torch.nn.BatchNorm2d(3, momentum=0.01)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), bn)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, 3, 4, 4, generator=g) * 3 + 1 for _ in range(5)]
    it = iter(xs)
    ev.recalibrate_batchnorm(net, lambda: next(it), 5)
    with torch.no_grad():
        ys = [net[0](x) for x in xs]
    torch.testing.assert_close(bn.running_mean, torch.stack([y.mean((0, 2, 3)) for y in ys]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([y.var((0, 2, 3)) for y in ys]).mean(0))
    assert bn.momentum == 0.01 and bn.num_batches_tracked == 5


# --- the command ---------------------------------------------------------------------------------

def test_evaluate_writes_every_protocol_and_is_deterministic(run_dir, tmp_path, capsys):
    out1, out2 = str(tmp_path / "a"), str(tmp_path / "b")
    r1 = eval_run.main([run_dir, "--protocols", "all", "--out", out1] + FAST)
    r2 = eval_run.main([run_dir, "--protocols", "all", "--out", out2] + FAST)
    printed = capsys.readouterr().out
    assert "kNN: top-1" in printed and "k-means: NMI" in printed
    assert sorted(os.listdir(out1)) == ["eval.json", "eval.md", "eval_confusion.png", "eval_tsne.png"]
    with open(os.path.join(out1, "eval.json")) as f:
        assert json.load(f) == json.loads(json.dumps(r1))
    res = r1["results"]
    assert set(res) == {"knn", "linear", "kmeans", "finetune", "tsne", "seconds"}
    assert set(res["knn"]["sweep"]) == {"backbone", "head"}
    assert res["linear"]["top5"] >= res["linear"]["top1"] and len(res["linear"]["per_class"]) == 10
    for frac in ("0.05", "0.1"):
        f = res["finetune"][frac]
        assert f["images"] == len(f["indices"]) and {"pretrained", "scratch"} <= set(f)
    for r in (r1, r2):  # timings differ; nothing else may
        r["results"].pop("seconds")
        for f in r["results"]["finetune"].values():
            f["pretrained"].pop("seconds"), f["scratch"].pop("seconds")
        r["results"]["tsne"].pop("png"), r.pop("checkpoint")
    assert r1 == r2
    with open(os.path.join(out1, "eval.md")) as f:
        md = f.read()
    assert "| kNN | top-1" in md and "## Linear probe, per class" in md


def test_random_init_and_transfer_are_named_apart(run_dir, tmp_path):
    out = str(tmp_path)
    floor = eval_run.main([run_dir, "--random-init", "--protocols", "knn", "--out", out] + FAST)
    transfer = eval_run.main([run_dir, "--dataset", "synthetic", "--protocols", "knn,kmeans",
                              "--out", out] + FAST)
    assert floor["model"] == "random init" and transfer["dataset"] == "synthetic"
    assert {"eval_random_init.json", "eval_synthetic.json"} <= set(os.listdir(out))
    trained = eval_run.main([run_dir, "--protocols", "knn", "--out", out] + FAST)
    assert trained["results"]["knn"]["top1"] != floor["results"]["knn"]["top1"]


def test_training_writes_the_same_report(run_dir):
    with open(os.path.join(run_dir, "eval.json")) as f:
        report = json.load(f)
    assert report["format"] == eval_run.EVAL_FORMAT and report["protocols"] == ["knn", "linear"]
    assert os.path.isfile(os.path.join(run_dir, "eval_confusion.png"))
    again = eval_run.main([run_dir, "--protocols", "knn,linear", "--out", run_dir + "_again",
                           "--no-progress"])
    for p in ("knn", "linear"):  # the same protocol, the same figures (no sweep in training)
        assert again["results"][p]["top1"] == report["results"][p]["top1"]


@pytest.mark.parametrize("argv, message", [
    (["{tmp}"], "is not a fastclr run folder"),
    (["{tmp}/nothing"], "does not exist"),
    (["{run}", "--protocols", "knn,umap"], "unknown protocol umap"),
    (["{run}", "--label-fraction", "0,0.1"], "every label fraction must be in \\(0, 1\\)"),
    (["{run}", "--label-fraction", "1.5"], "every label fraction must be in \\(0, 1\\)"),
    (["{run}", "--protocols", "finetune", "--label-fraction", "0.001"], "leaves class 0 without an image"),
    (["{run}", "--dataset", "cifar10"], "needs --data-dir"),
])
def test_bad_input_is_named(run_dir, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, run=run_dir) for a in argv]
    with pytest.raises((SystemExit, ValueError)) as info:
        eval_run.main(argv + ["--no-progress", "--out", str(tmp_path / "o")])
    import re
    text = str(info.value) + capsys.readouterr().err
    assert re.search(message, text), text
    assert not [n for n in os.listdir(tmp_path / "o") if n.startswith("eval")] if (tmp_path / "o").exists() else True


def test_files_that_are_not_runs(tmp_path, run_dir):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello")
    with pytest.raises(SystemExit, match="fastclr.evaluate: .* is not a checkpoint"):
        eval_run.main([str(junk)])
    other = tmp_path / "other.pt"
    torch.save({"format": "fastclr-checkpoint-1", "model": {}}, other)
    with pytest.raises(SystemExit, match="another version of fastclr"):
        eval_run.main([str(other)])
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(SystemExit, match="not a fastclr training checkpoint"):
        eval_run.main([str(other)])


def test_data_the_model_cannot_take(run_dir, tmp_path, monkeypatch):
    real = eval_run.data_mod.eval_batches

    def one_channel(ds, split, size, **kw):
        for x, y in real(ds, split, size, **kw):
            yield x[:, :1], y
    monkeypatch.setattr(eval_run.data_mod, "eval_batches", one_channel)
    with pytest.raises(SystemExit, match="does not fit the model: the model takes 3 x 8 x 8 images; "
                                         "the data gives 1 x 8 x 8"):
        eval_run.main([run_dir, "--out", str(tmp_path), "--no-progress"])
    assert not [n for n in os.listdir(tmp_path) if n.startswith((".eval", "eval"))]


def test_ctrl_c_leaves_the_run_folder_as_it_was(run_dir, monkeypatch, capsys):
    before = _folder_state(run_dir)
    real = ev.kmeans_protocol

    def interrupted(*a, **kw):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **kw)
    monkeypatch.setattr(ev, "kmeans_protocol", interrupted)
    with pytest.raises(SystemExit) as info:
        eval_run.main([run_dir, "--protocols", "knn,linear,kmeans", "--no-progress"])
    assert info.value.code == 128 + signal.SIGINT
    assert "is as it was" in capsys.readouterr().err
    assert _folder_state(run_dir) == before


# --- export ----------------------------------------------------------------------------------------

def _checkpoint(tmp_path, extra):
    """A run's checkpoint at initialisation (no training needed to test the export)."""
    base = TINY if "--backbone" not in extra else [a for a in TINY if a not in ("--width", "4")]
    run_config = config.parse_args(base + ["--out", str(tmp_path / "run")] + extra)
    torch.manual_seed(1)
    model = run_config.build_model(10)
    path = str(tmp_path / "checkpoint.pt")
    checkpoint.save_checkpoint(path, {"format": checkpoint.CKPT_FORMAT, "config": run_config.to_dict(),
                                      "model": model.state_dict(),
                                 "run": {"epoch": 0, "step": 0}})
    return path, model


def _torchvision_twin(name, cifar_stem):
    """The README's recipe: torchvision's model, the classifier Identity, the stem as fastclr's."""
    import torchvision
    from torch import nn
    net = torchvision.models.get_model(name, weights=None)
    if name.startswith("resnet"):
        net.fc = nn.Identity()
        if cifar_stem:
            net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    else:  # mobilenet_v3_small
        net.classifier[3] = nn.Identity()
        if cifar_stem:
            net.features[0][0].stride = (1, 1)
    return net.eval()


@pytest.mark.parametrize("extra, fmt, cifar", [
    (["--width", "64"], "pt", True),
    (["--width", "64", "--cifar-stem", "off", "--image-size", "32"], "safetensors", False),
    (["--backbone", "mobilenet_v3_small"], "safetensors", True),
])
def test_export_loads_strictly_into_torchvision(tmp_path, extra, fmt, cifar):
    name = extra[1] if extra[0] == "--backbone" else "resnet18"
    path, model = _checkpoint(tmp_path, extra)
    out = str(tmp_path / f"backbone.{fmt}")
    export.main([path, "--out", out])
    arch, state = export.read_export(out)
    assert arch["cifar_stem"] == cifar
    twin = _torchvision_twin(name, cifar)
    twin.load_state_dict(state, strict=True)
    x = torch.randn(3, 3, arch["image_size"], arch["image_size"])
    model.eval()
    with torch.no_grad():
        expect = model.backbone(x)
        torch.testing.assert_close(twin(x), expect, rtol=0, atol=0)
        loaded = export.load_backbone(out)
        torch.testing.assert_close(loaded(x), expect, rtol=0, atol=0)
    assert loaded.out_features == expect.shape[1] == arch["out_features"] and not loaded.training


def test_export_of_a_narrow_resnet_and_of_the_supervised_baseline(tmp_path):
    path, model = _checkpoint(tmp_path, ["--loss", "supervised"])
    out = str(tmp_path / "b.pt")
    export.main([path, "--out", out])
    loaded = export.load_backbone(out)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval().backbone(x), rtol=0, atol=0)
    assert loaded.architecture["width"] == 4 and loaded.architecture["trained_with"] == "supervised"


def test_export_and_load_refuse_what_they_cannot_use(tmp_path, run_dir):
    with pytest.raises(SystemExit, match="fastclr.export: .* is not a fastclr run folder"):
        export.main([str(tmp_path), "--out", str(tmp_path / "b.pt")])
    with pytest.raises(ValueError, match="a training checkpoint: export its backbone"):
        export.load_backbone(os.path.join(run_dir, "checkpoint.pt"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ValueError, match="not a fastclr backbone export|neither"):
        export.load_backbone(str(junk))
    damaged = tmp_path / "damaged"
    export.main([run_dir, "--out", str(damaged / "good.pt")])
    cut = damaged / "cut.pt"
    cut.write_bytes((damaged / "good.pt").read_bytes()[:3000])
    with pytest.raises(ValueError, match=r"cannot read .*cut\.pt \(truncated"):
        export.load_backbone(str(cut))
    other_zip = damaged / "other.pt"
    with zipfile.ZipFile(other_zip, "w") as z:
        z.writestr("readme.txt", "not a model")
    with pytest.raises(ValueError, match=r"cannot read .*other\.pt \(truncated, or a zip file"):
        export.load_backbone(str(other_zip))
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(SystemExit, match="fastclr.export: cannot write .*a_file/b.pt"):
        export.main([run_dir, "--out", str(a_file / "b.pt")])
    with pytest.raises(SystemExit, match="fastclr.evaluate: cannot write to the output folder"):
        eval_run.main([run_dir, "--out", str(a_file / "eval")])
    assert sorted(os.listdir(tmp_path)) == ["a_file", "damaged", "junk.safetensors"]


# --- kNN against brute force ------------------------------------------------------------------

def test_knn_matches_brute_force(seed):
    train, test = torch.randn(300, 12), torch.randn(40, 12)
    labels = torch.randint(0, 5, (300,))
    k, t = 17, 0.07
    scores = ev.knn_predict(train, labels, test, 5, k=k, temperature=t, chunk=7)
    sim = F.normalize(test, dim=1) @ F.normalize(train, dim=1).T
    expect = torch.zeros(40, 5)
    for q in range(40):
        top = sim[q].argsort(descending=True)[:k]
        for j in top:
            expect[q, labels[j]] += torch.exp(sim[q, j] / t)
    torch.testing.assert_close(scores, expect, rtol=1e-4, atol=1e-5)


def test_knn_on_separable_clusters(seed):
    centres = torch.randn(4, 16) * 5
    ytr, yte = torch.arange(200) % 4, torch.arange(80) % 4
    xtr, xte = centres[ytr] + torch.randn(200, 16), centres[yte] + torch.randn(80, 16)
    assert ev.knn_accuracy(xtr, ytr, xte, yte, 4, k=20) == 1.0
    # the linear probe on the same data: tests/test_ev.py


def test_pixel_features_by_hand(run_dir, tmp_path):
    """--features pixels: the protocols on the normalised pixels themselves (the baseline row),
    kNN against a computation from the dataset's arrays; fine-tuning is skipped, said so."""
    from fastclr.app import data
    out = str(tmp_path)
    r = eval_run.main([run_dir, "--features", "pixels", "--protocols", "knn,finetune", "--out", out] + FAST)
    assert r["model"] == "pixels" and "eval_pixels.json" in os.listdir(out)
    assert "finetune" in r["results"]["skipped"] and "finetune" not in r["results"]
    ds = data.load_dataset("digits")  # the tiny run's views are 8 px: the digits' own size
    mean, std = (np.asarray(v, np.float64) for v in (ds.mean, ds.std))

    def pixels(images):
        return ((images / 255.0 - mean) / std).reshape(len(images), -1)
    xtr, xte = (pixels(x) for x in (ds.train_images, ds.test_images))
    xtr, xte = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (xtr, xte))
    sim = xte @ xtr.T
    k, t = r["results"]["knn"]["k"], r["results"]["knn"]["temperature"]
    top = np.argsort(-sim, axis=1)[:, :k]
    votes = np.zeros((len(xte), 10))
    for i, row in enumerate(top):
        np.add.at(votes[i], ds.train_labels[row], np.exp(sim[i, row] / t))
    by_hand = float((votes.argmax(1) == ds.test_labels).mean())
    assert k == 20 and abs(r["results"]["knn"]["top1"] - by_hand) <= 1 / len(xte)
    with pytest.raises(SystemExit, match="no network to initialise"):
        eval_run.main([run_dir, "--features", "pixels", "--random-init", "--out", out] + FAST)


def test_validation_split_is_evaluated_instead_of_the_test_split(run_dir, tmp_path):
    r = eval_run.main([run_dir, "--validation", "300", "--protocols", "linear", "--out", str(tmp_path)] + FAST)
    assert r["split"].startswith("validation: 300 of the 1437 training images")
    assert np.asarray(r["results"]["linear"]["confusion"]).sum() == 300  # not the 360 test images
