"""AReAM wiring: which parameters the deep-layer affinity loss reaches, the shallow/deep split, the
refined maps' background score and the refined CAM (checked against a written-out loop)."""

from __future__ import annotations

import pytest
import torch

from tests.methods._learning import VIT_MICRO, assert_learns
from wsss.config import load_config
from wsss.methods import build_method, build_network
from wsss.ops.attention import aream_affinity_loss, layer_logit_mean


def _grad_norm(p: torch.nn.Parameter) -> float:
    return 0.0 if p.grad is None else float(p.grad.abs().sum())


def test_aream_loss_reaches_deep_attention_only() -> None:
    """The deep-layer affinity loss trains q/k of the supervised layers (and everything below), but
    not the MLP of the last block, whose output no supervised logit depends on."""
    torch.manual_seed(0)
    cfg = load_config("aream_mctformer_micro_synthetic", ["model.backbone_kwargs.img_size=64"])
    net = build_network(cfg, 5)
    method = build_method(cfg, net)
    deep = method.deep_layers()
    assert deep == list(range(4, 6)) and method.shallow_layers() == list(range(4))
    x = torch.randn(2, 3, 64, 64)
    out = net(x, deep, lambda layer, z: layer_logit_mean(z, net.backbone.num_prefix_tokens), with_seg=False)
    n = out.attn[deep[0]].shape[-1]
    target = torch.randint(0, 2, (2, n, n))
    aream_affinity_loss([out.attn[i] for i in deep], target).backward()
    blocks = net.backbone.blocks
    assert _grad_norm(blocks[5].attn.qkv.weight) > 0 and _grad_norm(blocks[4].attn.qkv.weight) > 0
    assert _grad_norm(blocks[0].attn.qkv.weight) > 0  # shallower blocks feed the deep ones
    assert _grad_norm(blocks[5].mlp.fc1.weight) == 0
    assert _grad_norm(net.cam_head.classifier.weight) == 0


def test_aream_refined_maps_use_their_own_background_score() -> None:
    """aream.bkg_score thresholds the refined maps (null: eval.bkg_score); the raw CAM keeps eval's."""
    from wsss.methods.base import MapInput
    from wsss.refine.labels import cam_to_label

    torch.manual_seed(0)
    cfg = load_config("aream_mctformer_micro_synthetic", ["model.backbone_kwargs.img_size=64"])
    net = build_network(cfg, 5).eval()
    x, labels = torch.rand(2, 3, 64, 64), torch.tensor([[1.0, 0, 1, 0, 0], [0, 1, 0, 0, 0]])
    method = build_method(cfg, net)
    assert method.refined_bkg_score() == float(cfg.eval.bkg_score)
    refined = method.aream_cam(net, x, labels, method.layers, None, [1.0])
    seen = set()
    for score in (0.05, 0.6):
        cfg.aream.bkg_score = score
        method = build_method(cfg, net)
        maps = method.extra_maps(net, MapInput(x, labels, refined, [1.0]), {"refined"})
        assert torch.equal(maps["refined"], cam_to_label(refined, labels, bkg_score=score))
        seen.add(int((maps["refined"] == 0).sum()))
    assert len(seen) == 2  # the score changed the background


def _aream(layer_index: int | None = None):
    over = ["model.backbone_kwargs.img_size=64"]
    if layer_index is not None:
        over.append(f"aream.layer_index={layer_index}")
    cfg = load_config("aream_mctformer_micro_synthetic", over)
    net = build_network(cfg, 5)
    return cfg, net, build_method(cfg, net)


def _ref_refined(cam, affs, all_layers, layers, weights, t, grid, transpose=False):
    """R(k, i) = sum_j A[i, j] M(k, j), one pixel pair at a time (docs/methods/aream.md 4-5):
    M(k, j) = relu(CAM(k, j)) x the mean over all layers of the class-k-token-to-patch-j attention,
    A[i, j] = (1 / l) sum over the l fused layers of w_l x attention of patch i to patch j."""
    n_, k_ = cam.shape[:2]
    h, w = grid
    npatch = h * w
    out = torch.zeros(n_, k_, h, w, dtype=torch.float64)
    for b in range(n_):
        m = [[max(float(cam[b, k, j // w, j % w]), 0.0)
              * sum(float(affs[i][b, k, t + j]) for i in all_layers) / len(all_layers)
              for j in range(npatch)] for k in range(k_)]
        for i in range(npatch):
            for j in range(npatch):
                q, key = (j, i) if transpose else (i, j)
                a = sum((1.0 if weights is None else float(weights[n])) * float(affs[lay][b, t + q, t + key])
                        for n, lay in enumerate(layers)) / len(layers)
                for k in range(k_):
                    out[b, k, i // w, i % w] += a * m[k][j]
    return out


def test_aream_refined_cam_single_matches_a_loop_over_patch_pairs() -> None:
    """refined_cam_single on random head-mean attentions (K class tokens first) and a random raw CAM:
    the CAM x class-to-patch attention, refined by the fused patch attention of the chosen layers,
    with uniform and with given fusion weights."""
    torch.manual_seed(0)
    _, _, method = _aream(layer_index=2)
    t, grid = method.T, (3, 3)
    assert t == 5 and method.class_attention
    n = t + 9
    affs = {i: torch.rand(2, n, n, dtype=torch.float64).softmax(-1) for i in method.layers}
    cam = torch.randn(2, 5, *grid, dtype=torch.float64)
    shallow = method.shallow_layers()
    for weights in (None, torch.tensor([0.3, 1.2], dtype=torch.float64)):
        got = method.refined_cam_single(cam, affs, grid, shallow, weights)
        ref = _ref_refined(cam, affs, method.layers, shallow, weights, t, grid)
        torch.testing.assert_close(got, ref)
        # the reference tells the transposed affinity (sum_j A[j, i] M(j)) apart
        assert not torch.allclose(got, _ref_refined(cam, affs, method.layers, shallow, weights, t, grid,
                                                    transpose=True))
    got = method.refined_cam_single(cam, affs, grid, method.layers, None)  # the 'refined' map: all layers
    torch.testing.assert_close(got, _ref_refined(cam, affs, method.layers, method.layers, None, t, grid))


def test_aream_layer_index_splits_shallow_fusion_from_deep_supervision(monkeypatch) -> None:
    """aream.layer_index = k: the pseudo label's CAM fuses layers [0, k), the affinity loss gets the
    logits of layers [k, L) and its target is the token-pair label of the pseudo label (a loop over
    pairs, no window; the pseudo label is replaced by a random one with 255s to test the wiring)."""
    import wsss.methods.aream as aream_module

    torch.manual_seed(0)
    cfg, net, method = _aream(layer_index=2)
    assert method.layers == list(range(6))
    assert method.shallow_layers() == [0, 1] and method.deep_layers() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="layer_index"):
        _aream(layer_index=6)
    labels = torch.tensor([[1.0, 0, 1, 0, 0], [0, 1, 0, 0, 0]])
    x = torch.rand(2, 3, 64, 64)
    label = torch.randint(0, 3, (2, 64, 64))
    label[label == 2] = 255
    seen: dict = {}
    real_cam = method.aream_cam

    def cam_spy(net_, x_, labels_, layers, weights, *a, **kw):
        seen["layers"] = list(layers)
        return real_cam(net_, x_, labels_, layers, weights, *a, **kw)

    def loss_spy(attn, target, weights=None):
        seen["attn"], seen["target"] = attn, target
        return aream_affinity_loss(attn, target, weights)

    monkeypatch.setattr(method, "aream_cam", cam_spy)
    monkeypatch.setattr(method, "pseudo_label", lambda *a: label)
    monkeypatch.setattr(aream_module, "aream_affinity_loss", loss_spy)
    loss, logs = method.training_step(net, {"image": x, "labels": labels}, int(cfg.aream.warmup_iters) + 1)
    assert torch.isfinite(loss) and "aff" in logs
    assert seen["layers"] == [0, 1] and len(seen["attn"]) == 4
    # the supervised logits are those of layers 2..5: the head-mean pre-softmax patch block
    out = net(x, [2, 3, 4, 5], lambda layer, z: layer_logit_mean(z, method.T), with_seg=False)
    for got, i in zip(seen["attn"], [2, 3, 4, 5]):
        torch.testing.assert_close(got, out.attn[i])
    target = seen["target"]
    h = w = 8  # patch size 8 on 64 x 64
    ref = torch.empty(2, h * w, h * w, dtype=torch.long)
    for b in range(2):
        tok = [int(label[b, (i // w) * 64 // h, (i % w) * 64 // w]) for i in range(h * w)]
        for i in range(h * w):
            for j in range(h * w):
                ref[b, i, j] = 255 if 255 in (tok[i], tok[j]) else int(tok[i] == tok[j])
    assert torch.equal(target, ref)


def test_aream_learns(learning_set, tmp_path) -> None:
    """120 iterations (seed 0; affinity and seg losses after 60) of ToCo's from-scratch ViT micro (blocks
    0-3 fused, 4-5 supervised): the losses fall and refined_par rises over the untrained network's.
    Measured over seeds 0/1/2: cls last/first 0.74/0.75/0.76, aff 0.94/0.95/0.94, seg 0.77/0.92/0.83;
    refined_par +0.020/+0.102/+0.017 (0.128->0.148, 0.076->0.177, 0.128->0.145), the swept refined
    CAM +0.025/+0.066/+0.059. The smallest gains are modest (the MiT of the shipped config:
    +0.017/+0.003/+0.040): margins half of them; the affinity loss falls slowly (at most 97 %)."""
    assert_learns("aream_mit_tiny_synthetic", "refined_par", learning_set, tmp_path, 120,
                  {"cls": 0.85, "aff": 0.97, "seg": 0.95}, gain=0.008, best_gain=0.012, backbone=VIT_MICRO,
                  **{"aream.warmup_iters": 60, "aream.layer_index": 4})


def test_aream_label_pass_reuses_the_training_forward(monkeypatch) -> None:
    """The refined CAM of the pseudo label with the training forward (its shallow attention captured as
    head-mean probabilities) standing in for the un-flipped scale-1 forward equals the full label pass;
    the training step passes that forward when its layers are not supervised ones."""
    from tests.methods._reuse import CASES, label_pass_case
    from tests.methods._reuse import LABELS as labels
    from wsss.methods.base import pass_mode
    from wsss.ops.attention import attention_probs

    torch.manual_seed(0)
    for scales, flip in CASES:
        method, net, x, first = label_pass_case(
            "aream_mit_tiny_synthetic", scales, flip,
            forward=lambda m: {"attn_layers": m.shallow_layers(),
                               "attn_reduce": lambda layer, z: attention_probs(z)})
        shallow = method.shallow_layers()
        with torch.no_grad(), pass_mode(net, method.mode):
            got = method.aream_cam(net, x, labels, shallow, None, first=first)
            ref = method.aream_cam(net, x, labels, shallow, None)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)  # batch composition: rounding
    seen: dict = {}
    real_cam = method.aream_cam

    def cam_spy(*a, **kw):
        seen["first"] = kw.get("first")
        return real_cam(*a, **kw)

    monkeypatch.setattr(method, "aream_cam", cam_spy)
    method.training_step(net, {"image": x, "labels": labels}, int(method.r.warmup_iters) + 1)
    assert seen["first"] is not None and set(shallow) <= set(seen["first"].attn)
