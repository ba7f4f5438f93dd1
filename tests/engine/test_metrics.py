"""Confusion matrix, IoU protocols, threshold sweep, classification scores, 2-process all-reduce."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from wsss.engine.metrics import (
    ConfusionMatrix,
    SweepAccumulator,
    iou_scores,
    multilabel_f1,
    multilabel_map,
    threshold_sweep,
)


def naive_confusion(pred, gt, c, ignore=255):
    mat = [[0] * c for _ in range(c)]
    missed = [0] * c
    for p, g in zip(pred.reshape(-1).tolist(), gt.reshape(-1).tolist()):
        if g == ignore or not 0 <= g < c:
            continue
        if 0 <= p < c:
            mat[g][p] += 1
        else:
            missed[g] += 1
    return mat, missed


def naive_voc_scores(mat, missed):
    c = len(mat)
    tp = [mat[i][i] for i in range(c)]
    gt = [sum(mat[i]) + missed[i] for i in range(c)]
    pr = [sum(mat[j][i] for j in range(c)) for i in range(c)]
    iou = [tp[i] / (gt[i] + pr[i] - tp[i]) if gt[i] + pr[i] - tp[i] > 0 else math.nan for i in range(c)]
    present = [iou[i] for i in range(c) if gt[i] > 0]
    accs = [tp[i] / gt[i] for i in range(c) if gt[i] > 0]
    return {"iou": iou, "miou": sum(present) / len(present), "pixel_acc": sum(tp) / sum(gt),
            "mean_acc": sum(accs) / len(accs),
            "aream": sum(tp[i] / (gt[i] + pr[i] - tp[i] + 1e-10) for i in range(c)) / c}


def test_hand_computed():
    gt = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 3]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 255]])
    cm = ConfusionMatrix(4)
    cm.update(pred, gt)
    assert cm.matrix.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    s = cm.compute()
    # class 3: GT 1 pixel predicted as 255 (a miss), IoU 0/1; class 0: 1/(2+2-1); class 1: 2/3; class 2: 1/2
    assert s["iou"] == pytest.approx([1 / 3, 2 / 3, 1 / 2, 0.0])
    assert s["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2 + 0) / 4)
    assert s["pixel_acc"] == pytest.approx(4 / 7)


def test_absent_classes_voc_vs_aream():
    # class 2 only predicted (in no GT), class 3 absent everywhere
    gt = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 2, 1, 1])
    cm = ConfusionMatrix(4)
    cm.update(pred, gt)
    voc = cm.compute("voc")
    assert voc["iou"][2] == 0.0 and math.isnan(voc["iou"][3])
    assert voc["miou"] == pytest.approx((1 / 2 + 1) / 2)  # mean over GT classes 0, 1 only
    aream = cm.compute("aream")
    assert aream["miou"] == pytest.approx((1 / 2 + 1 + 0 + 0) / 4)


@pytest.mark.parametrize("shape,c", [((2, 5, 7), 3), ((9, 4), 5), ((3, 6, 6), 21)])
def test_random_against_naive(shape, c):
    g = torch.Generator().manual_seed(sum(shape) + c)
    gt = torch.randint(0, c, shape, generator=g)
    gt[torch.rand(shape, generator=g) < 0.2] = 255
    gt[gt == c - 1] = 0  # make the last class absent from the GT
    pred = torch.randint(0, c, shape, generator=g)
    pred[torch.rand(shape, generator=g) < 0.05] = 255
    cm = ConfusionMatrix(c)
    half = shape[0] // 2
    cm.update(pred[:half], gt[:half])
    cm.update(pred[half:], gt[half:])
    mat, missed = naive_confusion(pred, gt, c)
    assert cm.matrix.tolist() == mat
    ref = naive_voc_scores(mat, missed)
    s = cm.compute()
    for a, b in zip(s["iou"], ref["iou"]):
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b)
    assert s["miou"] == pytest.approx(ref["miou"])
    assert s["pixel_acc"] == pytest.approx(ref["pixel_acc"])
    assert s["mean_acc"] == pytest.approx(ref["mean_acc"])
    assert cm.compute("aream")["miou"] == pytest.approx(ref["aream"])


def test_against_torchmetrics():
    try:  # test-only oracle; a broken torchvision makes torchmetrics crash at import
        from torchmetrics.classification import MulticlassJaccardIndex
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"torchmetrics unavailable: {err}")
    torch.manual_seed(0)
    c = 6
    gt = torch.randint(0, c - 1, (3, 8, 9))  # class 5 absent from the GT
    gt[:, :2] = 255
    pred = torch.randint(0, c, (3, 8, 9))
    tm = MulticlassJaccardIndex(num_classes=c, average="none", ignore_index=255)
    ref = tm(pred, gt)
    cm = ConfusionMatrix(c)
    cm.update(pred, gt)
    iou = torch.tensor(cm.compute()["iou"], dtype=torch.float64)
    assert torch.allclose(iou.float(), ref, atol=1e-6)


def test_merge_state_reset():
    torch.manual_seed(1)
    a, b = ConfusionMatrix(3), ConfusionMatrix(3)
    gt, pred = torch.randint(0, 3, (2, 4, 4)), torch.randint(0, 3, (2, 4, 4))
    a.update(pred[0], gt[0])
    b.update(pred[1], gt[1])
    full = ConfusionMatrix(3)
    full.update(pred, gt)
    assert torch.equal(a.merge(b).matrix, full.matrix)
    c = ConfusionMatrix(3)
    c.load_state_dict(full.state_dict())
    assert torch.equal(c.matrix, full.matrix)
    c.reset()
    assert int(c.matrix.sum()) == 0


def test_iou_scores_batched_matches_single():
    torch.manual_seed(2)
    mats = torch.randint(0, 5, (4, 3, 3))
    mats[1, 2] = 0
    batched = iou_scores(mats)
    for i in range(4):
        single = iou_scores(mats[i])
        assert torch.allclose(batched["miou"][i], single["miou"], equal_nan=True)


# ------------------------------------------------------------------ threshold sweep


def naive_sweep_pred(cam, label, t):
    """AReAM evaluate.py on one image: prepend bg = t to the CAMs of present classes, np.argmax."""
    k, h, w = cam.shape
    keys = [i for i in range(k) if label[i] > 0]
    out = torch.zeros(h, w, dtype=torch.long)
    for y in range(h):
        for x in range(w):
            best, arg = t, 0
            for key in keys:
                if cam[key, y, x] > best:  # strict: the first maximum wins, background first
                    best, arg = float(cam[key, y, x]), key + 1
            out[y, x] = arg
    return out


@pytest.mark.parametrize("b,k,h,w", [(2, 3, 5, 4), (1, 5, 3, 6)])
def test_threshold_sweep_matches_naive(b, k, h, w):
    g = torch.Generator().manual_seed(b * 10 + k)
    cams = torch.rand(b, k, h, w, generator=g)
    cams = (cams * 10).round() / 10  # ties with the thresholds and between classes
    labels = (torch.rand(b, k, generator=g) < 0.6).float()
    labels[0, 0] = 1
    if b > 1:
        labels[1] = 0  # an image with no foreground label
    gt = torch.randint(0, k + 1, (b, h, w), generator=g)
    gt[:, 0, 0] = 255
    thresholds = torch.tensor([0.5, 0.1, 0.3, 0.0, 0.9, 1.0, 0.35])
    mats = threshold_sweep(cams, labels, gt, thresholds)
    assert mats.shape == (len(thresholds), k + 1, k + 1)
    for ti, t in enumerate(thresholds.tolist()):
        cm = ConfusionMatrix(k + 1)
        for i in range(b):
            cm.update(naive_sweep_pred(cams[i], labels[i], t), gt[i])
        assert torch.equal(mats[ti], cm.matrix), t
    # the list form (per-image CAMs) gives the same counts
    mats_list = threshold_sweep(list(cams), list(labels), list(gt), thresholds)
    assert torch.equal(mats_list, mats)


def test_sweep_accumulator_best():
    torch.manual_seed(3)
    k = 2
    gt = torch.zeros(1, 4, 4, dtype=torch.long)
    gt[0, :2] = 1
    cams = torch.zeros(1, k, 4, 4)
    cams[0, 0, :2] = 0.6  # class 1 region scores 0.6
    cams[0, 0, 2:] = 0.2  # background region scores 0.2 for class 1
    labels = torch.tensor([[1.0, 0.0]])
    acc = SweepAccumulator(k + 1, thresholds=[0.1, 0.3, 0.5, 0.7])
    acc.update(cams, labels, gt)
    r = acc.compute()
    assert r["best_threshold"] == pytest.approx(0.3)  # 0.3 and 0.5 are perfect; the first one wins
    # aream protocol: class 2 absent -> IoU 0 in the mean over 3 classes
    assert r["best_miou"] == pytest.approx(2 / 3, abs=1e-8)
    voc = SweepAccumulator(k + 1, thresholds=[0.1, 0.3, 0.5, 0.7], protocol="voc")
    voc.update(cams, labels, gt)
    assert voc.compute()["best_miou"] == pytest.approx(1.0)


# ------------------------------------------------------------------ classification scores


def test_f1_against_sklearn_and_hand():
    logits = torch.tensor([[1.0, -1.0, 2.0], [-1.0, -2.0, -3.0], [0.5, 0.5, -0.5]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    # per image: 2*1/(2+1)=2/3; 0 (no prediction); 1
    assert float(multilabel_f1(logits, labels)) == pytest.approx((2 / 3 + 0 + 1) / 3)
    sk = pytest.importorskip("sklearn.metrics")
    torch.manual_seed(4)
    logits = torch.randn(7, 5)
    labels = (torch.rand(7, 5) < 0.4).float()
    labels[:, 0] = 1
    ref = sk.f1_score(labels.numpy(), (logits > 0).int().numpy(), average="samples", zero_division=0)
    assert float(multilabel_f1(logits, labels)) == pytest.approx(ref)


def naive_ap(scores, labels):
    """sklearn's AP: sum over distinct thresholds of (R_n - R_{n-1}) * P_n."""
    pairs = list(zip(scores, labels))
    npos = sum(labels)
    ap, prev_r = 0.0, 0.0
    for thr in sorted(set(scores), reverse=True):
        sel = [y for s, y in pairs if s >= thr]
        tp = sum(sel)
        r, p = tp / npos, tp / len(sel)
        ap += (r - prev_r) * p
        prev_r = r
    return ap


def test_map_against_naive_and_sklearn():
    torch.manual_seed(5)
    scores = (torch.rand(6, 8) * 4).round() / 4  # ties
    labels = (torch.rand(6, 8) < 0.4).float()
    labels[0] = 0  # no positive: skipped by the "samples" average
    labels[1, 0] = 1
    rows = [naive_ap(scores[i].tolist(), labels[i].tolist()) for i in range(6) if labels[i].sum() > 0]
    assert float(multilabel_map(scores, labels)) == pytest.approx(sum(rows) / len(rows))
    cols = [naive_ap(scores[:, j].tolist(), labels[:, j].tolist())
            for j in range(8) if labels[:, j].sum() > 0]
    assert float(multilabel_map(scores, labels, average="macro")) == pytest.approx(sum(cols) / len(cols))
    sk = pytest.importorskip("sklearn.metrics")
    i = 1
    assert float(multilabel_map(scores[i : i + 1], labels[i : i + 1])) == pytest.approx(
        sk.average_precision_score(labels[i].numpy(), scores[i].numpy()))


# ------------------------------------------------------------------ DDP (gloo, 2 processes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, q) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(rank)
        gt, pred = torch.randint(0, 4, (2, 5, 5), generator=g), torch.randint(0, 4, (2, 5, 5), generator=g)
        cm = ConfusionMatrix(4)
        cm.update(pred, gt)
        cm.all_reduce()
        if rank == 0:
            q.put(cm.matrix.tolist())
    finally:
        dist.destroy_process_group()


def test_ddp_all_reduce_confusion_matrix():
    expected = ConfusionMatrix(4)
    for rank in range(2):
        g = torch.Generator().manual_seed(rank)
        gt, pred = torch.randint(0, 4, (2, 5, 5), generator=g), torch.randint(0, 4, (2, 5, 5), generator=g)
        expected.update(pred, gt)
    ctx = tmp.get_context("spawn")
    last_err: Exception | None = None
    for _attempt in range(2):  # mp.spawn rarely aborts on its first run on CPU-only hosts: one retry
        q = ctx.SimpleQueue()
        try:
            tmp.spawn(_ddp_worker, args=(2, _free_port(), q), nprocs=2, join=True)
            assert q.get() == expected.matrix.tolist()
            return
        except tmp.ProcessRaisedException as err:
            last_err = err
        except tmp.ProcessExitedException as err:
            last_err = err
    raise AssertionError(f"DDP test failed twice: {last_err}")


def naive_mistakes(pred, gt, c, ignore=255):
    """Per ground-truth class: (the other class its pixels are predicted as most often, lowest index on
    ties, or None; that class's pixels over all the class's valid pixels, None without any)."""
    rows = [[0] * (c + 1) for _ in range(c)]
    for p, g in zip(pred.reshape(-1).tolist(), gt.reshape(-1).tolist()):
        if g == ignore or not 0 <= g < c:
            continue
        rows[g][p if 0 <= p < c else c] += 1
    out = []
    for g in range(c):
        best, who = 0, None
        for p in range(c):
            if p != g and rows[g][p] > best:
                best, who = rows[g][p], p
        total = sum(rows[g])
        out.append((who, best / total if total else None))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_most_mistaken_against_naive(seed):
    """compute()'s mistaken_for / mistaken_share against a loop over the pixels, with ignored ground
    truth, out-of-range predictions (in a row's total, never a mistake's class), a class predicted
    perfectly (no mistake: None) and a class absent from the ground truth."""
    g = torch.Generator().manual_seed(seed)
    c = 5
    gt = torch.randint(0, c - 1, (3, 9, 11), generator=g)  # class c-1 absent from the ground truth
    pred = torch.randint(0, c, gt.shape, generator=g)
    pred[gt == 2] = 2  # class 2 always right
    pred[torch.rand(gt.shape, generator=g) < 0.1] = 255
    gt[torch.rand(gt.shape, generator=g) < 0.1] = 255
    cm = ConfusionMatrix(c)
    cm.update(pred, gt)
    s = cm.compute()
    ref = naive_mistakes(pred, gt, c)
    assert s["mistaken_for"] == [w for w, _ in ref]
    for got, (_, want) in zip(s["mistaken_share"], ref):
        assert (got is None and want is None) or got == pytest.approx(want)
    assert s["mistaken_for"][2] is None and s["mistaken_share"][2] == 0.0
    assert s["mistaken_for"][c - 1] is None and s["mistaken_share"][c - 1] is None


def test_most_mistaken_hand_case():
    """A face labelled as body on 3 of its 4 pixels: face -> body, 75%; a class without ground-truth
    pixels (predicted once): no mistake, NaN share."""
    from wsss.engine.metrics import most_mistaken

    # rows: bg, face, body, cat (columns + out of range)
    counts = torch.tensor([[4, 0, 0, 1, 0], [0, 1, 3, 0, 0], [1, 0, 2, 0, 1], [0, 0, 0, 0, 0]])
    index, share = most_mistaken(counts)
    assert index.tolist() == [3, 2, 0, -1]
    assert share[:3].tolist() == pytest.approx([0.2, 0.75, 0.25]) and math.isnan(share[3])
