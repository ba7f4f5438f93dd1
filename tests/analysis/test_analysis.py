"""wsss.analysis.analyze: per-layer statistics against slow loop references, the dataset pass, the CLI."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from wsss.analysis.analyze import entropy_override
from wsss.analysis.loading import load_model
from wsss.analysis.probes import affinity_query_maps
from wsss.analysis.statistics import (
    analysis_layers,
    analyze_dataset,
    column_concentration,
    layer_statistics,
    normalize_variants,
)
from wsss.commands.analyze import add_parser
from wsss.config import load_config
from wsss.data.build import build_dataset
from wsss.data.synthetic import generate_synthetic
from wsss.engine.checkpoint import export_model
from wsss.methods import build_network


def _cfg(name: str, root) -> object:
    over = [f"data.root={root}", "data.size=64", "data.crop_size=64"]
    if name.startswith("aream"):
        over.append("model.backbone_kwargs.img_size=64")
    return load_config(name, over)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    generate_synthetic(root, num_train=4, num_val=3, size=64, num_classes=6)
    return root


@pytest.fixture(scope="module")
def aream_net(data_root):
    torch.manual_seed(0)
    cfg = _cfg("aream_mctformer_micro_synthetic", data_root)
    return build_network(cfg, 5).eval(), cfg


@pytest.fixture(scope="module")
def afa_net(data_root):
    torch.manual_seed(0)
    cfg = _cfg("afa_mit_tiny_synthetic", data_root)
    return build_network(cfg, 5).eval(), cfg


def _probs(net, x, layer):
    """Head-mean softmax (B, N, N) of one layer, from the unreduced logits."""
    out = net.forward_cam(x, [layer])
    return out.attn[layer].softmax(-1).mean(1)


def test_layer_statistics_matches_loops(aream_net):
    net, _ = aream_net
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 48)
    labels = torch.tensor([[1.0, 0, 1, 0, 0], [0, 0, 0, 0, 1]])
    t = net.backbone.num_prefix_tokens
    layers = list(range(net.backbone.num_layers))
    with torch.no_grad():
        st = layer_statistics(net, x, labels, layers, class_attention=True, keep_example=True)
        raw = net.forward_cam(x).cam
        probs = [_probs(net, x, i) for i in layers]
    b, k, h, w = st.cam.shape
    assert (h, w) == st.grid == (4, 6)
    npatch = h * w
    # Class-attention CAM: ReLU CAM x mean over all layers of the class-to-patch rows.
    cls = sum(p[:, :t, t:] for p in probs) / len(layers)
    for bi in range(b):
        for c in range(k):
            for i in range(npatch):
                ref = max(float(raw[bi, c].flatten()[i]), 0.0) * float(cls[bi, c, i])
                assert math.isclose(float(st.cam[bi, c].flatten()[i]), ref, rel_tol=1e-4, abs_tol=1e-6)
    assert st.refined.shape == (len(layers), b, k, h, w)
    cam = st.cam.reshape(b, k, npatch).double()
    for li in (0, len(layers) - 1):
        a = probs[li][:, t:, t:].double()
        for bi in range(b):
            for c in range(k):
                for i in range(npatch):
                    ref = sum(float(a[bi, i, j]) * float(cam[bi, c, j]) for j in range(npatch))
                    got = float(st.refined[li, bi, c].flatten()[i])
                    assert math.isclose(got, ref, rel_tol=1e-4, abs_tol=1e-6)
        # Hellinger: mean over patch query pairs of ||sqrt(a_i) - sqrt(a_j)|| / sqrt 2 (full rows).
        full = probs[li][:, t:, :].double()
        for bi in range(b):
            d = [float(torch.linalg.vector_norm(full[bi, i].sqrt() - full[bi, j].sqrt()) / math.sqrt(2))
                 for i in range(npatch) for j in range(i + 1, npatch)]
            assert math.isclose(float(st.hellinger[li, bi]), sum(d) / len(d), rel_tol=1e-6, abs_tol=1e-9)
        # Entropy (docs/methods/aream.md section 6.2): ReLU CAM of the GT classes, refined, summed,
        # softmax, base 2.
        for bi in range(b):
            s = [sum(float(a[bi, i, j]) * max(float(raw[bi, c].flatten()[j]), 0.0) * float(labels[bi, c])
                     for j in range(npatch) for c in range(k)) for i in range(npatch)]
            m = max(s)
            z = sum(math.exp(v - m) for v in s)
            p = [math.exp(v - m) / z for v in s]
            ref = -sum(q * math.log2(q) for q in p if q > 0)
            assert math.isclose(float(st.entropy[li, bi]), ref, rel_tol=1e-5)
        # Column mass over patch queries and example affinity.
        assert torch.allclose(st.col_mass[li].double(), a.sum(1), atol=1e-6)
        assert torch.allclose(st.example[li].double(), a[0], atol=1e-6)
        assert torch.allclose(st.example_heads[li].mean(0).double(), a[0], atol=1e-6)  # heads average to it
    assert ((st.hellinger >= 0) & (st.hellinger <= 1)).all()
    assert st.hellinger_heads.shape == (len(layers), b, net.backbone.num_heads[0])
    assert st.example_heads.shape == (len(layers), net.backbone.num_heads[0], npatch, npatch)
    assert ((st.entropy >= 0) & (st.entropy <= math.log2(npatch) + 1e-6)).all()


def test_mit_layers_and_afa(afa_net):
    from wsss.methods import build_method

    net, cfg = afa_net
    x = torch.randn(1, 3, 64, 64)
    layers, grids, note = analysis_layers(net, x)
    last = grids[net.backbone.num_layers - 1]
    assert layers == [i for i in range(net.backbone.num_layers) if grids[i] == last]
    assert layers[-1] == net.backbone.num_layers - 1 and len(layers) < net.backbone.num_layers
    assert "skipped" in note
    st = layer_statistics(net, x, torch.ones(1, 5), layers)
    assert st.refined.shape[0] == len(layers) and st.example is None
    method = build_method(cfg, net)
    maps = affinity_query_maps(method, net, x, query=5)
    assert maps["grid"] == grids[layers[-1]] and maps["query"] == (5 // maps["grid"][1], 5 % maps["grid"][1])
    row = net.forward_cam(x, heads=["aff_head"]).heads["aff_head"][0, 5]
    assert torch.allclose(maps["affinity"].flatten(), row, atol=1e-6)
    assert math.isclose(float(maps["mhsa"].sum()), 1.0, rel_tol=1e-5)  # no prefix tokens: rows sum to 1
    hw = method.head_weights(net)
    assert len(hw["weights"]) == len(hw["heads"]) == net.aff_head.in_channels
    assert hw["weights"] == net.aff_head.proj.weight.flatten().tolist()


def test_normalize_and_concentration():
    torch.manual_seed(2)
    cams = torch.randn(3, 2, 4, 5, 6)
    labels = torch.tensor([[1.0, 0, 1, 1], [0, 1, 0, 0]])
    out = normalize_variants(cams, (10, 12), (9, 11), labels)
    assert out.shape == (3, 2, 4, 9, 11)
    assert out.min() >= 0 and out.max() < 1
    assert (out[:, 0, 1] == 0).all() and (out[:, 1, 0] == 0).all()
    # Hand case: 20 tokens, top 5% = 1 column holding 5 of 24.
    mass = torch.ones(1, 1, 20)
    mass[0, 0, 3] = 5.0
    assert math.isclose(float(column_concentration(mass)), 5 / 24, rel_tol=1e-6)
    assert math.isclose(float(column_concentration(torch.ones(1, 1, 20))), 0.05, rel_tol=1e-6)
    assert entropy_override([1.5, 2.0]) == "aream.weighting=entropy_offline aream.entropy=[1.5,2]"


def test_analyze_dataset_and_fused_linearity(aream_net, data_root):
    net, cfg = aream_net
    ds = build_dataset(cfg.data, split="val", train=False)
    res = analyze_dataset(net, ds, 6, cfg, batch_size=2)
    assert res.images == 3 and res.layers == list(range(net.backbone.num_layers))
    s = res.summary
    for key in ("hellinger", "entropy"):
        assert len(s[key]["mean"]) == len(res.layers)
        assert all(q1 <= med <= q3 for q1, med, q3 in zip(s[key]["q1"], s[key]["median"], s[key]["q3"]))
    ref = s["refinement"]
    assert set(ref) == {"cam", "fused", "_summary", *(f"layer_{i}" for i in res.layers)}
    for name, r in ref.items():
        if not name.startswith("_"):
            assert 0 <= r["best_miou"] <= 1 and r["best_miou"] == max(r["miou"])
    assert ref["_summary"]["best_layer"] in res.layers
    assert res.example["affinity"].shape == (len(res.layers), 64, 64)


def _parse(argv):
    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers())
    return p.parse_args(["analyze", *argv])


def test_cli_writes_files(aream_net, afa_net, data_root, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    aream_extra = ["--entropy", "--resize", "48"]
    for (net, cfg), name, extra in ((aream_net, "aream_mctformer_micro_synthetic", aream_extra),
                                    (afa_net, "afa_mit_tiny_synthetic", [])):
        names = ["bg"] + [f"c{i}" for i in range(5)]
        meta = {"config": dict_cfg(cfg), "num_classes": 6, "class_names": names}
        model_dir = export_model(net, meta, tmp_path / name / "model")
        loaded, _, names = load_model(model_dir)
        assert names is not None and len(names) == 6
        for a, b in zip(loaded.state_dict().values(), net.state_dict().values()):
            assert torch.equal(a, b)
        out = tmp_path / name / "analysis"
        over = [f"data.root={data_root}", "data.size=64"]
        if name.startswith("aream"):
            over.append("model.backbone_kwargs.img_size=64")
        args = _parse([name, *over, "--checkpoint", str(model_dir), "--out", str(out), "--max-images", "2",
                       "--device", "cpu", *extra])
        assert args.fn(args) == 0
        data = json.loads((out / "analysis.json").read_text())
        for f in data["plots"].values():
            assert (out / f).is_file() and (out / f).read_bytes()[:4] == b"\x89PNG"
        assert data["protocol"]["images"] == 2
        assert data["protocol"]["resize"] == (48 if name.startswith("aream") else None)
        if name.startswith("aream"):
            assert (out / "aream_entropy.yaml").is_file()
            assert "aream.entropy=[" in capsys.readouterr().out
            line = data["entropy"]["override"].split()
            cfg2 = load_config(name, line)
            assert len(cfg2.aream.entropy) == net.backbone.num_layers
        else:
            assert {"affinity_query", "affinity_head_weights"} <= set(data["plots"])
            assert "query" in data["learned_affinity"]
        assert {"layer_cams", "affinity_heads"} <= set(data["plots"])


def dict_cfg(cfg):
    from wsss.config import to_dict

    return to_dict(cfg)


def test_pair_agreement_matches_loops():
    from wsss.analysis.oracle import pair_agreement

    g = torch.Generator().manual_seed(3)
    aff = torch.rand(2, 7, 7, generator=g)
    target = torch.randint(0, 3, (2, 7, 7), generator=g)
    target[target == 2] = 255
    background = torch.rand(2, 7, generator=g) < 0.6
    ref = [0.0] * 8
    for b in range(2):
        for i in range(7):
            for j in range(7):
                t, a = int(target[b, i, j]), float(aff[b, i, j])
                if t == 255:
                    continue
                ref[0 if t == 1 else 2] += a
                ref[1 if t == 1 else 3] += 1
                ref[4] += float((a > 0.5) == (t == 1))
                ref[5] += 1
                if t == 1 and not background[b, i]:
                    ref[6] += a
                    ref[7] += 1
    assert torch.allclose(pair_agreement(aff, target, background), torch.tensor(ref, dtype=torch.float64))
    without = pair_agreement(aff, target)
    assert torch.equal(without[:6], torch.tensor(ref[:6], dtype=torch.float64)) and not without[6:].any()
    perfect = pair_agreement((target == 1).float(), target, background)
    assert perfect[0] == perfect[1] and perfect[2] == 0 and perfect[4] == perfect[5]
    assert perfect[6] == perfect[7]


def test_affinity_quality_oracle(afa_net, data_root, monkeypatch):
    from wsss.analysis.oracle import oracle_quality as affinity_quality
    from wsss.methods import build_method
    from wsss.refine.labels import affinity_labels

    net, cfg = afa_net
    ds = build_dataset(cfg.data, split="val", train=False)
    method = build_method(cfg, net)
    net.train()
    kernels: list[tuple[int, ...]] = []
    kernel = method.par._kernel
    monkeypatch.setattr(method.par, "_kernel", lambda img: kernels.append(tuple(img.shape)) or kernel(img))
    q = affinity_quality(method, net, ds, 6, max_images=2)
    monkeypatch.undo()
    assert len(kernels) == 2  # cam_par, learned_par and oracle_par share one PAR kernel per image
    assert net.training and method.flip == bool(cfg.cam.flip)  # both restored
    net.eval()
    assert q["protocol"]["images"] == 2 and q["pairs"]["pairs"] > 0
    assert 0 <= q["pairs"]["accuracy"] <= 1
    assert set(q["miou"]) == {"cam_par", "learned_par", "oracle_par"}
    assert all(0 <= v <= 1 for v in q["miou"].values())
    # a model whose learned affinity IS the ground truth: both paths agree exactly
    real, masks = net.forward_cam, {}
    for i in range(2):
        masks[ds[i]["image"].sum().item()] = ds[i]["mask"][None]

    def oracle_forward(x, layers=(), attn_reduce=None, heads=(), feature_layers=()):
        out = real(x, layers, attn_reduce, heads, feature_layers)
        if "aff_head" in out.heads:
            grid = out.grids[net.aff_head.attn_layers[-1]]
            win = method.window(grid, x.device)
            t = affinity_labels(masks[x[0].sum().item()], grid, win, sampling="topleft")
            out.heads["aff_head"] = (t == 1).float()
        return out

    monkeypatch.setattr(net, "forward_cam", oracle_forward)
    q2 = affinity_quality(method, net, ds, 6, max_images=2)
    assert q2["miou"]["learned_par"] == pytest.approx(q2["miou"]["oracle_par"])
    assert q2["pairs"]["accuracy"] == 1.0
    assert q2["pairs"]["mean_same_class_foreground"] == 1.0  # the synthetic images have objects


def test_refinement_quality_oracle(aream_net, data_root):
    from wsss.analysis.oracle import oracle_quality as refinement_quality
    from wsss.methods import build_method
    net, cfg = aream_net
    ds = build_dataset(cfg.data, split="val", train=False)
    method = build_method(cfg, net)
    q = refinement_quality(method, net, ds, 6, max_images=2)
    assert set(q["miou"]) == {f"{k}{p}" for k in ("cam", "refined", "oracle") for p in ("", "_par")}
    assert all(0 <= v <= 1 for v in q["miou"].values()) and method.flip == bool(cfg.cam.flip)
    # the affinity override replaces the fused attention: given that same attention it changes nothing
    from wsss.methods.aream import _attention_probs
    from wsss.ops.attention import fuse_layers

    x, labels = ds[0]["image"][None], ds[0]["labels"][None]
    method.flip = False
    try:
        out = net.forward_cam(x, method.layers, _attention_probs)
        fused = fuse_layers(method.patch_affinities(out.attn, method.layers))
        a = method.aream_cam(net, x, labels, method.layers, None, [1.0])
        b = method.aream_cam(net, x, labels, method.layers, None, [1.0], affinity=lambda g: fused)
        eye = torch.eye(fused.shape[-1])[None]
        c = method.aream_cam(net, x, labels, method.layers, None, [1.0], affinity=lambda g: eye)
    finally:
        method.flip = bool(cfg.cam.flip)
    # float32 rounding only: a and b run the same ops on separately allocated tensors, and the CPU
    # kernels' results depend on the memory alignment (up to ~2e-5 here on maps in [0, 1])
    assert torch.allclose(a, b, atol=1e-4) and (a - c).abs().max() > 1e-2


def test_square_resized_view(data_root):
    from wsss.analysis.loading import SquareResized

    ds = build_dataset(_cfg("afa_mit_tiny_synthetic", data_root).data, split="val", train=False)
    view = SquareResized(ds, 40)
    s, orig = view[1], ds[1]
    assert s["image"].shape == (3, 40, 40) and s["mask"].shape == (40, 40) and s["mask"].dtype == torch.long
    assert set(s["mask"].unique().tolist()) <= set(orig["mask"].unique().tolist())
    assert torch.equal(s["labels"], orig["labels"]) and len(view) == len(ds)
    assert view.num_classes == ds.num_classes
    with pytest.raises(ValueError, match="resize"):
        SquareResized(ds, 8)


def test_class_heat_matches_loops():
    from wsss.analysis.plots import class_heat
    from wsss.analysis.statistics import NORM_EPS

    g = torch.Generator().manual_seed(2)
    cam = torch.randn(3, 4, 5, generator=g)
    labels = torch.tensor([1.0, 0.0, 1.0])
    heat = class_heat(cam, labels, (4, 5))
    for i in range(4):
        for j in range(5):
            best = 0.0
            for k in range(3):
                if labels[k] == 0:
                    continue
                c = cam[k].relu()
                v = (c[i, j] - c.min()) / (c.max() - c.min() + NORM_EPS)
                best = max(best, float(v))
            assert heat[i, j] == pytest.approx(best, abs=1e-6)
    assert class_heat(cam, labels, (8, 10)).shape == (8, 10)


def test_analysis_hooks_are_protocols_not_method_members(afa_net, aream_net):
    """``Method`` serves training and map prediction: the analysis hooks are the protocols of
    wsss.analysis.hooks, which AFA (both) and AReAM (the oracle replay) implement, no other method."""
    from wsss.analysis.hooks import LearnedAffinity, OracleRefinement
    from wsss.core.registry import METHODS
    from wsss.methods import build_method, import_methods
    from wsss.methods.base import Method

    members = {OracleRefinement: ("ORACLE_MAPS", "oracle_batch", "oracle_protocol"),
               LearnedAffinity: ("affinity_probe", "head_weights")}
    assert not [m for names in members.values() for m in names if hasattr(Method, m)]
    import_methods()
    for name in METHODS.names():
        cls = METHODS.get(name)
        has = {p: all(hasattr(cls, m) for m in names) for p, names in members.items()}
        assert has[OracleRefinement] == (name in ("afa", "aream")), name
        assert has[LearnedAffinity] == (name == "afa"), name
    afa = build_method(afa_net[1], afa_net[0])
    aream = build_method(aream_net[1], aream_net[0])
    assert isinstance(afa, OracleRefinement) and isinstance(afa, LearnedAffinity)
    assert isinstance(aream, OracleRefinement) and not isinstance(aream, LearnedAffinity)
    with pytest.raises(ValueError, match="learns no affinity"):
        affinity_query_maps(aream, aream_net[0], torch.zeros(1, 3, 64, 64))
