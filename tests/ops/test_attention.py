"""AReAM attention maths, the AFA affinity head and the Hellinger analysis against loop references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsss.analysis.hellinger import hellinger_distance_matrix, layer_hellinger
from wsss.heads.affinity import AffinityHead
from wsss.ops.attention import (
    aream_affinity_loss,
    attention_probs,
    class_token_attention,
    entropy_weights,
    fuse_layers,
    fusion_weights,
    layer_affinity,
    layer_entropy,
    layer_logit_mean,
    loss_weights,
    online_entropy_weights,
    refine_by_affinity,
)
from wsss.ops.losses import affinity_loss_logits


def _softmax_row(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def _head_mean_softmax_loop(logits):
    b, heads, n, _ = logits.shape
    out = torch.zeros(b, n, n, dtype=torch.float64)
    for i in range(b):
        for h in range(heads):
            for q in range(n):
                row = _softmax_row([float(v) for v in logits[i, h, q]])
                out[i, q] += torch.tensor(row, dtype=torch.float64)
    return out / heads


@pytest.mark.parametrize("b,heads,t,np_", [(1, 1, 1, 4), (2, 3, 2, 6), (2, 2, 0, 5)])
def test_layer_affinity_and_logit_mean_loops(b, heads, t, np_):
    torch.manual_seed(np_)
    n = t + np_
    logits = torch.randn(b, heads, n, n, dtype=torch.float64) * 2
    full = _head_mean_softmax_loop(logits)
    torch.testing.assert_close(attention_probs(logits), full)
    aff = layer_affinity(logits, t)
    torch.testing.assert_close(aff, full[:, t:, t:])
    # Not renormalised: each row sums to 1 minus its mass on the prefix tokens.
    torch.testing.assert_close(aff.sum(-1), 1 - full[:, t:, :t].sum(-1))
    if t:
        assert (aff.sum(-1) < 1 - 1e-6).all()
    ren = layer_affinity(logits, t, renormalize=True)
    torch.testing.assert_close(ren.sum(-1), torch.ones(b, np_, dtype=torch.float64))
    torch.testing.assert_close(ren, full[:, t:, t:] / full[:, t:, t:].sum(-1, keepdim=True))
    mean = torch.zeros(b, np_, np_, dtype=torch.float64)
    for h in range(heads):
        mean += logits[:, h, t:, t:]
    torch.testing.assert_close(layer_logit_mean(logits, t), mean / heads)


def test_attention_probs_bf16_upcasts():
    logits = torch.randn(1, 2, 5, 5).to(torch.bfloat16)
    out = attention_probs(logits)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.sum(-1), torch.ones(1, 5))


def test_class_token_attention_loop():
    torch.manual_seed(0)
    k, h, w, layers, b = 3, 2, 3, 4, 2
    n = k + h * w
    probs = [torch.rand(b, n, n, dtype=torch.float64) for _ in range(layers)]
    out = class_token_attention(probs, k, (h, w))
    assert out.shape == (b, k, h, w)
    for i in range(b):
        for c in range(k):
            for y in range(h):
                for x in range(w):
                    ref = sum(float(p[i, c, k + y * w + x]) for p in probs) / layers
                    assert abs(float(out[i, c, y, x]) - ref) < 1e-12
    torch.testing.assert_close(class_token_attention(torch.stack(probs), k, (h, w)), out)


def test_refine_direction_one_hot_gives_column():
    torch.manual_seed(1)
    h, w = 2, 3
    aff = torch.rand(2, h * w, h * w, dtype=torch.float64)
    for j in range(h * w):
        cam = torch.zeros(2, 1, h, w, dtype=torch.float64)
        cam.view(2, 1, -1)[:, 0, j] = 1.0
        out = refine_by_affinity(cam, aff)
        torch.testing.assert_close(out.reshape(2, -1), aff[:, :, j])  # column j of A
        out_t = refine_by_affinity(cam, aff, transpose=True)
        torch.testing.assert_close(out_t.reshape(2, -1), aff[:, j, :])  # row j (attnagg)


def test_refine_loop_random():
    torch.manual_seed(2)
    b, k, h, w = 2, 3, 2, 2
    cam = torch.randn(b, k, h, w, dtype=torch.float64)
    aff = torch.rand(b, h * w, h * w, dtype=torch.float64)
    out = refine_by_affinity(cam, aff)
    for i in range(b):
        for c in range(k):
            for q in range(h * w):
                ref = sum(float(aff[i, q, p]) * float(cam[i, c].flatten()[p]) for p in range(h * w))
                assert abs(float(out[i, c].flatten()[q]) - ref) < 1e-12


def test_fuse_layers_loops():
    torch.manual_seed(3)
    layers, b, n = 4, 2, 3
    affs = torch.rand(layers, b, n, n, dtype=torch.float64)
    torch.testing.assert_close(fuse_layers(affs), sum(affs[i] for i in range(layers)) / layers)
    w = torch.rand(layers, dtype=torch.float64)
    ref_k = sum(float(w[i]) * affs[i] for i in range(layers)) / layers
    torch.testing.assert_close(fuse_layers(list(affs), w), ref_k)
    torch.testing.assert_close(fuse_layers(affs, w, normalize="sum"), ref_k * layers / float(w.sum()))
    wb = torch.rand(b, layers, dtype=torch.float64)
    out = fuse_layers(affs, wb)
    out_s = fuse_layers(affs, wb, normalize="sum")
    for i in range(b):
        ref = sum(float(wb[i, layer]) * affs[layer, i] for layer in range(layers))
        torch.testing.assert_close(out[i], ref / layers)
        torch.testing.assert_close(out_s[i], ref / float(wb[i].sum()))
    with pytest.raises(ValueError):
        fuse_layers(affs, torch.rand(layers + 1))


def _entropy_loop(cam, affs, labels, eps=0.0):
    layers, b = affs.shape[:2]
    k = cam.shape[1]
    out = torch.zeros(layers, b, dtype=torch.float64)
    for layer in range(layers):
        for i in range(b):
            a = affs[layer, i]
            n = a.shape[0]
            s = [0.0] * n
            for c in range(k):
                if labels[i, c] == 0:
                    continue
                m = cam[i, c].flatten()
                for q in range(n):
                    s[q] += sum(float(a[q, p]) * float(m[p]) for p in range(n))
            p = _softmax_row(s)
            out[layer, i] = -sum(v * math.log2(v + eps) for v in p if v > 0 or eps)
    return out


@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_layer_entropy_loop(eps):
    torch.manual_seed(4)
    b, k, h, w, layers = 2, 3, 2, 3, 3
    cam = torch.randn(b, k, h, w, dtype=torch.float64) * 3
    affs = torch.rand(layers, b, h * w, h * w, dtype=torch.float64)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    out = layer_entropy(cam, affs, labels, eps=eps)
    assert out.shape == (layers, b)
    torch.testing.assert_close(out, _entropy_loop(cam, affs, labels, eps))
    # natural-log base rescales
    torch.testing.assert_close(layer_entropy(cam, affs, labels, base=math.e, eps=eps), out * math.log(2))


def test_layer_entropy_uniform_is_log2_np():
    np_ = 12
    cam = torch.rand(2, 3, 3, 4)
    affs = torch.full((2, 2, np_, np_), 1.0 / np_)  # every row uniform -> constant s
    out = layer_entropy(cam, affs, torch.ones(2, 3))
    torch.testing.assert_close(out, torch.full((2, 2), math.log2(np_)))
    # p = 0 entries (extreme logits) give 0, not NaN
    spiky = torch.zeros(1, 1, 1, 4)
    spiky[..., 0] = 1e4
    out = layer_entropy(spiky, torch.eye(4).expand(1, 1, 4, 4), torch.ones(1, 1))
    assert torch.isfinite(out).all() and float(out.abs().max()) < 1e-6


def test_entropy_weights_and_splits():
    mean = torch.tensor([3.0, 5.0, 4.0, 7.0])
    ent = entropy_weights(mean)
    torch.testing.assert_close(ent, torch.tensor([0.0, 0.5, 0.25, 1.0]))
    torch.testing.assert_close(fusion_weights(ent, 2), torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(loss_weights(ent, 2), torch.tensor([0.25, 1.0]))
    torch.testing.assert_close(loss_weights(ent, 2, mode="uniform"), torch.ones(2))
    torch.testing.assert_close(loss_weights(None, 3, mode="uniform", num_layers=5), torch.ones(2))
    per_image = entropy_weights(torch.tensor([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]]))
    torch.testing.assert_close(per_image, torch.tensor([[0.0, 0.5, 1.0], [0.5, 0.5, 0.5]]))


def test_online_entropy_weights():
    torch.manual_seed(5)
    b, k, h, w, layers = 2, 2, 2, 2, 3
    cam = torch.randn(b, k, h, w, dtype=torch.float64, requires_grad=True)
    affs = torch.rand(layers, b, h * w, h * w, dtype=torch.float64)
    labels = torch.ones(b, k, dtype=torch.float64)
    out = online_entropy_weights(cam, affs, labels)
    assert out.shape == (b, layers) and not out.requires_grad
    shifted = cam.detach() - cam.detach().amin((-2, -1), keepdim=True)
    norm = shifted / (shifted.amax((-2, -1), keepdim=True) + 1e-5)
    e = _entropy_loop(norm, affs, labels).T
    lo, hi = e.min(1, keepdim=True).values, e.max(1, keepdim=True).values
    ref = (e - lo) / (hi - lo)
    torch.testing.assert_close(out, ref)
    raw = online_entropy_weights(cam, affs, labels, normalized_cam=False)
    e_raw = _entropy_loop(cam.detach(), affs, labels).T
    torch.testing.assert_close(raw.argmax(1), e_raw.argmax(1))


def test_aream_affinity_loss_mean_and_sum():
    torch.manual_seed(6)
    b, n = 2, 5
    maps = {9: torch.randn(b, n, n), 7: torch.randn(b, n, n), 8: torch.randn(b, n, n)}
    target = torch.randint(0, 2, (b, n, n))
    target[torch.rand(b, n, n) < 0.2] = 255
    per = [affinity_loss_logits(maps[k], target) for k in (7, 8, 9)]
    torch.testing.assert_close(aream_affinity_loss(maps, target), sum(per) / 3)
    w = torch.tensor([0.2, 0.5, 1.0])
    torch.testing.assert_close(aream_affinity_loss(maps, target, w), sum(wi * p for wi, p in zip(w, per)) / 3)
    torch.testing.assert_close(
        aream_affinity_loss([maps[7], maps[8], maps[9]], target, w, reduction="sum"),
        sum(wi * p for wi, p in zip(w, per)),
    )


# ------------------------------------------------------------------ AFA head


def test_affinity_head_matches_manual_official_computation():
    torch.manual_seed(7)
    b, n, heads, dim = 2, 6, 4, 16
    attn = [torch.randn(b, heads, n, n, dtype=torch.float64) for _ in range(2)]  # scaled logits
    head = AffinityHead(in_channels=2 * heads, head_dims=[dim, dim]).double()
    out = head(attn)
    # Official: unscaled q k^T = scaled * sqrt(d); concat on channels; S + S^T; 1x1 conv; sigmoid; squeeze.
    s = torch.cat([a * math.sqrt(dim) for a in attn], 1)
    ref = torch.sigmoid(F.conv2d(s + s.transpose(2, 3), head.proj.weight, head.proj.bias)).squeeze(1)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out, out.transpose(1, 2))
    # per-pair loop for one entry
    i, j = 1, 4
    z = float(head.proj.bias.detach())
    for c in range(2 * heads):
        z += float(head.proj.weight.detach().view(-1)[c]) * float(s[0, c, i, j] + s[0, c, j, i])
    assert abs(float(out[0, i, j].detach()) - 1 / (1 + math.exp(-z))) < 1e-12
    no_unscale = AffinityHead(in_channels=2 * heads, unscale=False).double()
    no_unscale.load_state_dict(head.state_dict())
    s0 = torch.cat(attn, 1)
    ref0 = torch.sigmoid(F.conv2d(s0 + s0.transpose(2, 3), head.proj.weight, head.proj.bias)).squeeze(1)
    torch.testing.assert_close(no_unscale(attn), ref0)


def test_affinity_head_gradients_match_official_conv():
    """The head's own backward (channel sum) gives the gradients of the official conv formulation."""
    torch.manual_seed(11)
    b, n, heads, dim = 2, 5, 3, 16
    attn = [torch.randn(b, heads, n, n, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    head = AffinityHead(in_channels=2 * heads, head_dims=[dim, dim]).double()
    upstream = torch.randn(b, n, n, dtype=torch.float64)
    (head(attn) * upstream).sum().backward()
    got = [a.grad.clone() for a in attn] + [head.proj.weight.grad.clone(), head.proj.bias.grad.clone()]
    for t in (*attn, head.proj.weight, head.proj.bias):
        t.grad = None
    s = torch.cat([a * math.sqrt(dim) for a in attn], 1)
    ref = torch.sigmoid(F.conv2d(s + s.transpose(2, 3), head.proj.weight, head.proj.bias)).squeeze(1)
    (ref * upstream).sum().backward()
    want = [a.grad for a in attn] + [head.proj.weight.grad, head.proj.bias.grad]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    torch.autograd.gradcheck(lambda *a: head(list(a)), [a.detach().requires_grad_() for a in attn])


def test_affinity_head_init_and_errors():
    torch.manual_seed(8)
    stds = torch.stack([AffinityHead().proj.weight.detach().std() for _ in range(50)])
    assert abs(float(stds.mean()) - math.sqrt(1 / 3)) < 0.08  # kaiming a=sqrt(5), fan_out=1
    head = AffinityHead(head_dims=[64, 64])
    assert float(head.proj.bias.detach().abs()) <= 0.25  # default bias init bound 1/sqrt(16)
    with pytest.raises(ValueError):
        head([torch.randn(1, 8, 4, 4)])
    with pytest.raises(ValueError):
        AffinityHead()([torch.randn(1, 8, 4, 4)] * 2)
    out = head([torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4)])
    assert out.shape == (1, 4, 4) and out.dtype == torch.float32


def test_affinity_head_centred_logits_against_a_written_out_reference():
    """center=True: every channel's query row minus its mean over the keys, then the official head; the
    attention's softmax is unchanged by the centring, and so is the head's output under a per-row shift."""
    torch.manual_seed(12)
    b, n, heads, dim = 2, 5, 3, 16
    attn = [torch.randn(b, heads, n, n, dtype=torch.float64) for _ in range(2)]
    head = AffinityHead(in_channels=2 * heads, head_dims=[dim, dim], center=True).double()
    out = head(attn)
    w, bias = head.proj.weight.detach().view(-1), float(head.proj.bias.detach())
    s = torch.cat([a * math.sqrt(dim) for a in attn], 1)[0]  # (C, N, N), image 0
    for i in range(n):
        for j in range(n):
            z = bias
            for c in range(2 * heads):
                z += float(w[c]) * float(s[c, i, j] - s[c, i].mean() + s[c, j, i] - s[c, j].mean())
            assert abs(float(out[0, i, j].detach()) - 1 / (1 + math.exp(-z))) < 1e-12
    shifted = [a + torch.randn(b, heads, n, 1, dtype=torch.float64) * 10 for a in attn]
    torch.testing.assert_close(head(shifted), out)
    torch.autograd.gradcheck(lambda *a: head(list(a)), [a.detach().requires_grad_() for a in attn])


def test_affinity_head_zero_init_starts_at_one_half():
    head = AffinityHead(head_dims=[64, 64], init="zero")
    out = head([torch.randn(1, 8, 4, 4) * 50, torch.randn(1, 8, 4, 4) * 50])
    assert torch.equal(out, torch.full((1, 4, 4), 0.5))
    with pytest.raises(ValueError, match="init"):
        AffinityHead(init="xavier")


# ------------------------------------------------------------------ Hellinger


def _hellinger_direct(a, b):
    return math.sqrt(sum((math.sqrt(x) - math.sqrt(y)) ** 2 for x, y in zip(a, b))) / math.sqrt(2)


def test_hellinger_identical_and_disjoint_rows():
    probs = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.3, 0.7]]])
    h = hellinger_distance_matrix(probs)
    assert abs(float(h[0, 0, 1])) < 1e-6 and abs(float(h[0, 0, 2]) - 1.0) < 1e-6
    torch.testing.assert_close(h, h.transpose(1, 2))


@pytest.mark.parametrize("full_rows", [True, False])
def test_hellinger_matmul_matches_direct(full_rows):
    torch.manual_seed(9)
    probs = torch.rand(2, 5, 7, dtype=torch.float64).softmax(-1)
    if not full_rows:
        probs = probs[..., 2:]  # sub-distributions (rows sum < 1)
    h = hellinger_distance_matrix(probs)
    for b in range(2):
        for i in range(5):
            for j in range(5):
                ref = _hellinger_direct(probs[b, i].tolist(), probs[b, j].tolist())
                assert abs(float(h[b, i, j]) - ref) < 1e-6


@pytest.mark.parametrize("t,np_,chunk", [(1, 6, 4), (0, 5, 1024), (3, 4, 1)])
def test_layer_hellinger_pair_mean(t, np_, chunk):
    torch.manual_seed(10)
    n = t + np_
    probs = torch.randn(2, n, n, dtype=torch.float64).mul(3).softmax(-1)
    out = layer_hellinger(probs, t, chunk_size=chunk)
    patch = layer_hellinger(probs, t, keys="patch", chunk_size=chunk)
    ren = layer_hellinger(probs, t, keys="patch", renormalize=True, chunk_size=chunk)
    for b in range(2):
        rows = probs[b, t:]
        pairs = [(i, j) for i in range(np_) for j in range(i + 1, np_)]
        ref = sum(_hellinger_direct(rows[i].tolist(), rows[j].tolist()) for i, j in pairs) / len(pairs)
        assert abs(float(out[b]) - ref) < 1e-6
        sub = rows[:, t:]
        ref_p = sum(_hellinger_direct(sub[i].tolist(), sub[j].tolist()) for i, j in pairs) / len(pairs)
        assert abs(float(patch[b]) - ref_p) < 1e-6
        nrm = sub / sub.sum(-1, keepdim=True)
        ref_r = sum(_hellinger_direct(nrm[i].tolist(), nrm[j].tolist()) for i, j in pairs) / len(pairs)
        assert abs(float(ren[b]) - ref_r) < 1e-6
    per_head = layer_hellinger(torch.stack([probs, probs], 1), t, chunk_size=chunk)
    assert per_head.shape == (2, 2)
    torch.testing.assert_close(per_head[:, 0], out)
    identical = torch.full((1, n, n), 1.0 / n, dtype=torch.float64)
    assert float(layer_hellinger(identical, t)) < 1e-6
