"""Inference: evaluate / pseudo-labels / predict, the Segmenter, and loading from paths and the hub."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsss.api.hub import detect_backbone, from_pretrained, load_run
from wsss.api.predictor import MIN_SIDE, Segmenter
from wsss.commands.evaluate import run_evaluate
from wsss.commands.predict import run_predict
from wsss.commands.pseudo_labels import run_pseudo_labels
from wsss.config import load_config, to_dict
from wsss.core.registry import BACKBONES
from wsss.core.weights import CheckpointError
from wsss.data.io import load_mask
from wsss.engine.checkpoint import export_model
from wsss.methods import build_network
from wsss.model import WSSSNet

CFG = "cam_mit_tiny_synthetic"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from wsss.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("infer")
    data = root / "data"
    generate_synthetic(data, num_train=4, num_val=3, size=64, num_classes=6)
    over = [f"data.root={data}", f"out_dir={root / 'run'}", "data.num_train=4", "data.num_val=3",
            "data.size=64", "data.num_classes=6", "cam.scales=[1.0]", "par.num_iter=2"]
    cfg = load_config(CFG, over)
    torch.manual_seed(0)
    net = build_network(cfg, int(cfg.data.num_classes) - 1)
    from wsss.data.synthetic import class_names_for

    names = class_names_for(int(cfg.data.num_classes))
    meta = {"config": to_dict(cfg), "num_classes": int(cfg.data.num_classes), "class_names": names}
    export_model(net, meta, root / "run" / "model")
    return {"root": root, "data": data, "over": over, "cfg": cfg, "release": root / "run" / "model",
            "names": names}


def _recompute_miou(png_dir: Path, data: Path, names: list[str], c: int) -> list[float]:
    """Per-class IoU from the saved PNGs and the ground-truth masks, with plain loops."""
    tp, fp, fn = np.zeros(c), np.zeros(c), np.zeros(c)
    for name in names:
        pred = load_mask(png_dir / f"{name}.png", 256)
        gt = load_mask(data / "SegmentationClass" / f"{name}.png", 256)
        valid = gt != 255
        for k in range(c):
            tp[k] += ((pred == k) & (gt == k) & valid).sum()
            fp[k] += ((pred == k) & (gt != k) & valid).sum()
            fn[k] += ((pred != k) & (gt == k) & valid).sum()
    return [tp[k] / (tp[k] + fp[k] + fn[k]) if tp[k] + fp[k] + fn[k] > 0 else float("nan") for k in range(c)]


def test_evaluate_matches_saved_pngs(setup: dict) -> None:
    out = setup["root"] / "eval.json"
    res = run_evaluate(CFG, setup["release"], setup["over"], split="val", out=out, print_table=False)
    saved = json.loads(out.read_text())
    assert saved["_protocol"]["split"] == "val" and saved["_protocol"]["images"] == 3
    assert {"cam", "cam_par", "pseudo", "seg"} <= set(saved)
    png_dir = setup["root"] / "seg_pngs"
    summary = run_pseudo_labels(CFG, setup["release"], setup["over"], "val", png_dir, map_name="seg",
                                verbose=False)
    assert summary["written"] == 3
    names = sorted(p.stem for p in png_dir.glob("*.png"))
    iou = _recompute_miou(png_dir, setup["data"], names, int(setup["cfg"].data.num_classes))
    np.testing.assert_allclose(np.array(saved["seg"]["iou"], dtype=float), np.array(iou), rtol=1e-9)
    assert res["seg"]["miou"] == saved["seg"]["miou"]


def test_pseudo_labels_resumable(setup: dict) -> None:
    out = setup["root"] / "pl"
    s1 = run_pseudo_labels(CFG, setup["release"], setup["over"], "train", out, map_name="cam_par",
                           logits=True, logit_stride=4, verbose=False)
    assert s1["written"] == 4 and s1["skipped_existing"] == 0
    first = sorted(out.glob("*.png"))[0]
    z = np.load(first.with_suffix(".npz"))
    assert z["logits"].dtype == np.float16 and z["logits"].shape[-2:] == (16, 16)
    before = load_mask(first, 256)
    first.write_bytes(b"not a png")  # a corrupt PNG is redone
    s2 = run_pseudo_labels(CFG, setup["release"], setup["over"], "train", out, map_name="cam_par",
                           logits=True, verbose=False)
    assert s2["written"] == 1 and s2["skipped_existing"] == 3
    np.testing.assert_array_equal(load_mask(first, 256), before)
    assert Image.open(first).mode == "P"
    assert json.loads((out / "summary.json").read_text())["map"] == "cam_par"


def test_segmenter_inputs(setup: dict) -> None:
    seg = Segmenter.from_pretrained(setup["release"], device="cpu")
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)
    p_np = seg.predict(arr)
    p_pil = seg.predict(Image.fromarray(arr))
    p_t = seg.predict(torch.from_numpy(arr).permute(2, 0, 1).float() / 255)
    p_u8 = seg.predict(torch.from_numpy(arr).permute(2, 0, 1))
    for p in (p_pil, p_t, p_u8):
        np.testing.assert_array_equal(p.mask, p_np.mask)
    assert p_np.mask.shape == (40, 52) and p_np.mask.dtype == np.int64
    assert p_np.scores.shape == (5,) and p_np.cams.shape == (5, 40, 52)
    assert p_np.cams.min() >= 0 and p_np.cams.max() <= 1
    assert p_np.overlay().shape == (40, 52, 3) and p_np.overlay().dtype == np.uint8
    assert set(p_np.present()) <= set(setup["names"])
    batch = seg.predict_batch([arr, arr])
    np.testing.assert_array_equal(batch[1].mask, p_np.mask)
    one = seg.predict(arr, labels=[setup["names"][2]])
    assert set(np.unique(one.mask).tolist()) <= {0, 2}
    with pytest.raises(ValueError, match="unknown class name 'zebra'.*obj1"):
        seg.predict(arr, labels=["zebra"])


def test_predict_cli_with_corrupt_file(setup: dict, tmp_path: Path) -> None:
    import argparse

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(imgs / "a.jpg")
    Image.fromarray(rng.integers(0, 256, (36, 30, 3), dtype=np.uint8)).save(imgs / "b.png")
    (imgs / "bad.jpg").write_bytes(b"\xff\xd8garbage")
    from wsss.commands.predict import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["predict", "--checkpoint", str(setup["release"]), str(imgs), "--out",
                              str(tmp_path / "out"), "--device", "cpu"])
    assert args.fn(args) == 1
    for stem in ("a", "b"):
        m = load_mask(tmp_path / "out" / f"{stem}.png", 256)
        assert m.shape == ((32, 48) if stem == "a" else (36, 30))
        assert (tmp_path / "out" / f"{stem}_overlay.png").is_file()
        js = json.loads((tmp_path / "out" / f"{stem}.json").read_text())
        assert set(js["scores"]) == set(setup["names"][1:])
    assert not (tmp_path / "out" / "bad.png").exists()
    assert run_predict(setup["release"], [imgs / "a.jpg"], tmp_path / "out2", device="cpu") == 0


def test_load_run_and_wrong_architecture(setup: dict, tmp_path: Path) -> None:
    net, cfg, names = load_run(setup["root"] / "run")
    assert isinstance(net, WSSSNet) and names == setup["names"] and cfg.method == "cam"
    assert isinstance(from_pretrained(setup["release"]), WSSSNet)
    # a training checkpoint carrying the config of another architecture
    cfg2 = load_config("afa_mit_tiny_synthetic", setup["over"])
    state = {"iteration": 1, "model": net.state_dict(), "extra": {"config": to_dict(cfg2)}}
    torch.save(state, tmp_path / "ckpt_00000001.pt")
    with pytest.raises(CheckpointError, match="missing: aff_head"):
        load_run(tmp_path / "ckpt_00000001.pt")


def _sd(name: str, meta: bool = True, **kw: object) -> dict:
    """A backbone's state dict; on the meta device (shapes only) unless ``meta=False``."""
    import wsss.backbones.conformer as conformer
    import wsss.backbones.mit as mit
    import wsss.backbones.vit as vit
    from wsss.model import import_backbones

    import_backbones()
    if not meta:
        return BACKBONES.build(name, **kw).state_dict()
    # drop-path rates come from torch.linspace(...).item(), which meta tensors cannot give
    with pytest.MonkeyPatch.context() as mp, torch.device("meta"):
        for mod in (conformer, mit, vit):
            mp.setattr(mod, "dpr", lambda rate, depth: [0.0] * depth)
        return BACKBONES.build(name, **kw).state_dict()


@pytest.mark.parametrize("name", ["mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5", "mit_tiny",
                                  "vit_tiny", "vit_small", "vit_base", "conformer_s", "conformer_ti"])
def test_detect_backbone_sizes(name: str) -> None:
    assert detect_backbone(_sd(name)) == (name, {})


def test_detect_foreign_layouts() -> None:
    sd = _sd("mit_b1")
    assert detect_backbone({f"encoder.{k}": v for k, v in sd.items()})[0] == "mit_b1"  # AFA checkpoint
    assert detect_backbone({"head.weight": torch.empty(1000, 512, device="meta"), **sd})[0] == "mit_b1"
    mct = _sd("mctformer_v2_small", num_classes=20)
    assert detect_backbone(mct) == ("mctformer_v2_small", {"num_classes": 20})
    with pytest.raises(CheckpointError, match="cannot tell"):
        detect_backbone({"foo.weight": torch.zeros(2)})


def test_from_pretrained_foreign_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    sd = _sd("mit_tiny", meta=False)
    torch.save({"state_dict": sd}, tmp_path / "mit.pth")
    bb = from_pretrained(tmp_path / "mit.pth")
    assert type(bb).__name__ == "MixVisionTransformer"
    torch.testing.assert_close(bb.state_dict()["patch_embed1.proj.weight"], sd["patch_embed1.proj.weight"])
    vit = _sd("vit_micro", meta=False, img_size=64, patch_size=8)
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file({k: v.contiguous() for k, v in vit.items()}, hf / "model.safetensors")
    (hf / "config.json").write_text("{}")
    bb = from_pretrained(hf)
    torch.testing.assert_close(bb.state_dict()["pos_embed"], vit["pos_embed"])
    conf = _sd("conformer_micro", meta=False)
    torch.save(conf, tmp_path / "conformer.pth")
    assert detect_backbone(conf)[0] == "conformer_micro"
    assert type(from_pretrained(tmp_path / "conformer.pth")).__name__ == "Conformer"


def test_hub_offline_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    t0 = time.time()
    with pytest.raises(FileNotFoundError, match="some-org/no-such-model.*local path"):
        from_pretrained("some-org/no-such-model")
    assert time.time() - t0 < 5


def test_batched_evaluation_equals_one_image_at_a_time(setup: dict) -> None:
    """batch_size / num_workers change the speed, not the result: confusion-matrix mIoU and the written
    pseudo labels equal those of one image per forward."""
    kw = {"print_table": False, "scales": [1.0, 0.5], "flip": True}
    one = run_evaluate(CFG, setup["release"], setup["over"], split="train", out=setup["root"] / "e1.json",
                       batch_size=1, num_workers=0, **kw)
    many = run_evaluate(CFG, setup["release"], setup["over"], split="train", out=setup["root"] / "e4.json",
                        batch_size=4, num_workers=1, **kw)
    assert many["_protocol"]["batch_size"] == 4 and many["_protocol"]["images_per_s"] > 0
    for name in ("cam", "cam_par", "pseudo", "seg"):
        np.testing.assert_allclose(np.array(many[name]["iou"], dtype=float),
                                   np.array(one[name]["iou"], dtype=float), atol=1e-4)
    dirs = {bs: setup["root"] / f"pl_bs{bs}" for bs in (1, 3)}
    for bs, d in dirs.items():
        run_pseudo_labels(CFG, setup["release"], setup["over"], "train", d, map_name="pseudo",
                          verbose=False, batch_size=bs)
    for png in sorted(dirs[1].glob("*.png")):
        a, b = load_mask(png, 256), load_mask(dirs[3] / png.name, 256)
        assert (a != b).mean() < 1e-3  # float rounding of a batched matmul may flip a rare tie


def test_same_size_batches_groups_by_size() -> None:
    from wsss.engine.evaluate import same_size_batches

    sizes = [(8, 8), (8, 12), (8, 8), (8, 8), (8, 12)]
    data = [{"image": torch.zeros(3, *hw), "labels": torch.zeros(2),
             "mask": torch.zeros(hw, dtype=torch.long), "img_box": torch.tensor([0, hw[0], 0, hw[1]]),
             "size": torch.tensor(hw), "name": str(i)}
            for i, hw in enumerate(sizes)]
    batches = list(same_size_batches(data, [0, 1, 2, 3, 4], batch_size=3))
    assert [b["name"] for b in batches] == [["0", "2"], ["1"], ["3"], ["4"]]
    assert all(b["image"].shape[-2:] == b["mask"].shape[-2:] for b in batches)
    with pytest.raises(ValueError, match="batch_size"):
        next(same_size_batches(data, [0], batch_size=0))


def test_batched_pseudo_labels_scored_with_skipped_ones(setup: dict) -> None:
    """With batches of several images, the summary's scores (labels written in batches plus those kept
    from a previous run) equal the IoU recomputed from the PNGs by loops, uncertain pixels counted wrong."""
    out = setup["root"] / "pl_scored"
    kw = {"map_name": "pseudo", "verbose": False, "batch_size": 3, "num_workers": 0}
    run_pseudo_labels(CFG, setup["release"], setup["over"], "train", out, **kw)
    for png in sorted(out.glob("*.png"))[:2]:
        png.unlink()
    s = run_pseudo_labels(CFG, setup["release"], setup["over"], "train", out, **kw)
    assert (s["written"], s["skipped_existing"], s["batch_size"]) == (2, 2, 3)
    names = sorted(p.stem for p in out.glob("*.png"))
    iou = _recompute_miou(out, setup["data"], names, int(setup["cfg"].data.num_classes))
    np.testing.assert_allclose(np.array(s["scores"]["iou_uncertain_wrong"], dtype=float), np.array(iou),
                               rtol=1e-9)
    assert 0 < s["scores"]["coverage"] <= 1
    bad = setup["root"] / "pl_bad"
    with pytest.raises(ValueError, match="--batch-size must be >= 1"):
        run_pseudo_labels(CFG, setup["release"], setup["over"], "train", bad, map_name="pseudo", batch_size=0)
    assert not bad.exists()  # refused before the folder and its manifest were written


@pytest.mark.parametrize("method_name", ["cam", "afa"])
def test_multiscale_seg_shares_the_cam_forwards(setup: dict, method_name: str) -> None:
    """With msc_seg the 'seg' map equals the multi-scale (+flip) seg computed on its own (AFA test_msc_flip
    written out here), and the backbone runs once per scale for the CAM and the seg map together."""
    import torch.nn.functional as F

    from wsss.engine.evaluate import predict_maps
    from wsss.methods import build_method

    cfg = load_config(f"{method_name}_mit_tiny_synthetic", setup["over"] + ["model.seg_head.enabled=true"])
    torch.manual_seed(1)
    net = build_network(cfg, int(cfg.data.num_classes) - 1).eval()
    method = build_method(cfg, net)
    g = torch.Generator().manual_seed(2)
    image, labels = torch.rand(2, 3, 96, 80, generator=g), torch.tensor([[1.0, 0, 1, 0, 0], [0, 1, 0, 0, 0]])
    scales = [1.0, 0.5, 1.5]
    calls = []
    hook = net.backbone.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    with torch.no_grad():
        shared = predict_maps(method, net, image, labels, scales, True, maps=["cam", "seg"], msc_seg=True)
    hook.remove()
    assert sorted(calls) == sorted((4, 3, int(s * 96), int(s * 80)) for s in scales)
    with torch.no_grad():
        best = None
        for s in scales:
            xs = F.interpolate(image, size=(int(s * 96), int(s * 80)), mode="bilinear", align_corners=False)
            seg = net(torch.cat([xs, xs.flip(-1)]), with_seg=True, heads=False).seg
            seg = F.interpolate((seg[:2] + seg[2:].flip(-1)) / 2, size=(96, 80), mode="bilinear",
                                align_corners=False)
            best = seg if best is None else torch.maximum(best, seg)
        alone = predict_maps(method, net, image, labels, scales, True, maps=["cam"])
    assert torch.equal(shared["seg"], best.argmax(1))
    assert torch.equal(shared["cam"], alone["cam"])


@pytest.mark.parametrize("config", ["afa_mit_tiny_synthetic", "aream_mit_tiny_synthetic",
                                    "aream_mctformer_micro_synthetic", "toco_vit_micro_synthetic"])
def test_every_map_from_one_forward_per_scale(setup: dict, config: str) -> None:
    """A method's own maps read its evaluation's CAM forwards (eval_capture / eval_keep): every map
    equals the one computed with forwards of its own (MapInput without ``kept``), and the backbone
    runs once per scale (plus, for ToCo, nothing: its auxiliary CAM rides on the same forwards)."""
    from wsss.methods import build_method
    from wsss.methods.base import MapInput

    size = 64 if "vit" in config or "mctformer" in config else 96
    over = [f"data.num_classes={setup['cfg'].data.num_classes}", "par.num_iter=2"]
    if "vit" in config:
        over += ["model.backbone_kwargs.img_size=64"]
    cfg = load_config(config, over)
    torch.manual_seed(3)
    net = build_network(cfg, int(cfg.data.num_classes) - 1).eval()
    method = build_method(cfg, net)
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, size, size, generator=g)
    labels = torch.tensor([[1.0, 0, 1, 0, 0], [0, 0, 0, 1, 0]])
    scales, names = [1.0, 0.75], [m for m in method.map_names(net) if m != "seg"]
    calls: list[tuple[int, ...]] = []
    hook = net.backbone.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    kernels: list[tuple[int, ...]] = []
    kernel = method.par._kernel
    method.par._kernel = lambda img: kernels.append(tuple(img.shape)) or kernel(img)
    with torch.no_grad():
        shared = method.predict(net, x, labels, scales, True, maps=names)
    hook.remove()
    del method.par._kernel
    assert len(calls) == len(scales)
    # every '*_par' map refines on x: one PAR kernel at full size (pseudo labels: their own size)
    assert kernels.count(tuple(x.shape)) == 1
    own = set(names) - set(method.MAPS) | ({"pseudo"} if method.OWN_PSEUDO else set())
    assert own, "the method has maps of its own"
    with torch.no_grad(), method.flipping(True):
        cam = method.multiscale_cam(net, x, scales, keep=labels) * labels[..., None, None]
        alone = method.extra_maps(net, MapInput(x, labels, cam, scales), own)
    for name in own:
        assert (shared[name] != alone[name]).float().mean() < 1e-3, name  # batched rows: rare ties


@pytest.mark.parametrize("scales", [[1.0, 0.5], [0.75]])
def test_segmenter_one_forward_per_scale(setup: dict, scales: list[float]) -> None:
    """The Segmenter's class scores, CAMs and seg logits come from one forward per scale (plus one for
    the scores when 1.0 is not a scale), equal to computing each on its own."""
    seg = Segmenter.from_pretrained(setup["release"], device="cpu")
    net, method = seg.net, seg.method
    x = torch.rand(2, 3, 64, 80, generator=torch.Generator().manual_seed(5))
    calls: list[tuple[int, ...]] = []
    hook = net.backbone.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    with torch.no_grad():
        scores, _, cams, logits = seg._score_maps(x, None, scales, True)
    hook.remove()
    assert len(calls) == len(scales) + (1.0 not in scales)
    with torch.no_grad(), method.flipping(True):
        xp, _ = net.pad(x, min_size=MIN_SIDE)
        torch.testing.assert_close(scores, net(xp, with_seg=False, heads=False).logits[0].sigmoid())
        torch.testing.assert_close(cams, method.multiscale_cam(net, xp, scales)[..., :64, :80])
        torch.testing.assert_close(logits, method.multiscale_segment(net, xp, scales, True)[..., :64, :80])


def test_seg_label_and_scores_from_one_pass(setup: dict) -> None:
    """The 'seg' label and its saved scores come from one multi-scale pass: the label is the scores'
    argmax, the backbone runs once per scale."""
    from wsss.engine.evaluate import label_and_scores

    seg = Segmenter.from_pretrained(setup["release"], device="cpu")
    x = torch.rand(2, 3, 64, 80, generator=torch.Generator().manual_seed(6))
    calls: list[tuple[int, ...]] = []
    hook = seg.net.backbone.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    label, scores = label_and_scores(seg.method, seg.net, x, torch.ones(2, 5), "seg", [1.0, 0.5], True, True)
    hook.remove()
    assert len(calls) == 2 and scores.shape[-2:] == (64, 80)
    assert torch.equal(label, scores.argmax(1))


def test_max_images_writes_labels_spread_over_the_split(setup: dict, tmp_path: Path) -> None:
    from wsss.data.build import build_dataset

    names = build_dataset(setup["cfg"].data, split="train", train=False).names
    out = tmp_path / "two"
    summary = run_pseudo_labels(CFG, setup["release"], setup["over"], "train", out, max_images=2,
                                verbose=False)
    assert summary["images"] == 2 and len(names) == 4
    assert sorted(p.stem for p in out.glob("*.png")) == sorted([names[0], names[2]])  # not the first two
