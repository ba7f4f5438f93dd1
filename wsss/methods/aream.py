"""AReAM (He et al., ACM MM 2023): re-activating attention against over-smoothing.

Per iteration, after a classification-only warm-up:
1. a no-grad multi-scale + flip pass collects the head-mean softmax attention of every layer it
   needs, reduced per layer as it is produced (never the whole (L, B, heads, N, N) stack);
2. the CAM (MCTformer: x class-to-patch attention of all layers) is refined by the fused
   *shallow* affinities [0, k), uniform or entropy-weighted, then summed over scales/flips,
   normalised and masked by the image labels;
3. PAR + high/low background scores give the pseudo label, and token-pair affinity labels;
4. the head-mean pre-softmax logits of the *deep* layers [k, L) are supervised with the
   sigmoid pos/neg affinity loss (mean over layers, uniform or entropy weights) x 0.1.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from wsss.core.param_rules import ParamRule, both, contains, no_decay
from wsss.core.registry import PARAM_RULES
from wsss.core.schema import MethodConfig, Rule, option
from wsss.methods.base import MapInput, Method, pass_mode, register_method, with_background
from wsss.model import NetOutput, WSSSNet, unwrap
from wsss.ops.attention import (
    aream_affinity_loss,
    attention_probs,
    class_token_attention,
    entropy_weights,
    fuse_layers,
    layer_logit_mean,
    online_entropy_weights,
    refine_by_affinity,
    slice_patches,
)
from wsss.ops.losses import seg_loss_bg_fg
from wsss.refine.labels import SAMPLING, affinity_labels, cam_to_label, oracle_affinity
from wsss.refine.par import ImageKernel


def _attention_probs(layer: int, logits: Tensor) -> Tensor:
    """attn_reduce: (B, heads, N, N) logits -> (B, N, N) head-mean attention over all keys (fp32)."""
    return attention_probs(logits)


WEIGHTINGS = ("uniform", "entropy_offline", "entropy_online")


@dataclass
class AReAMConfig(MethodConfig):
    """The ``aream`` section."""

    layer_index: int = option(7, Rule("int", 1))  # fuse [0, k) for pseudo labels, supervise [k, L)
    warmup_iters: int = option(1650)  # classification-only iterations (10 epochs of 165)
    aff_weight: float = option(0.1)
    seg_weight: float = option(0.0)  # an end-to-end seg head on AReAM labels (not in the paper)
    weighting: str = option("uniform", Rule("str", choices=WEIGHTINGS))
    entropy: list[float] | None = option(None, Rule("list", null=True, min_len=1))  # offline, L floats
    class_attention: bool = option(True)  # MCTformer: CAM x class-to-patch attention
    renormalize: bool = option(False)
    sampling: str = option("topleft", Rule("str", choices=SAMPLING))
    # background score of the refined maps ('refined', 'refined_par', the analysis' refined and
    # oracle rows); null: eval.bkg_score. Refinement spreads the CAM, so its calibrated value is
    # higher than the raw CAM's (as AFA's eval.aff_bkg_score for its propagated maps).
    bkg_score: float | None = option(None, Rule("float", 0.0, null=True))


@register_method
class AReAMMethod(Method):
    name = "aream"
    Config = AReAMConfig
    EXTRA_MAPS = ("refined", "refined_par")
    BKG_KEYS = {"cam": "eval.bkg_score", "cam_par": "eval.bkg_score", "refined": "aream.bkg_score",
                "refined_par": "aream.bkg_score"}
    OWN_PSEUDO = True
    PSEUDO_MAP = "refined_par"
    REFINED_MAP = "refined_par"
    # analysis: the CAM, refined by the fused attention, refined by the ground-truth affinity
    ORACLE_MAPS = tuple(f"{k}{p}" for k in ("cam", "refined", "oracle") for p in ("", "_par"))

    def __init__(self, cfg: Any, net: WSSSNet) -> None:
        super().__init__(cfg, net)
        self.r: AReAMConfig = self.opts  # type: ignore[assignment]
        bb = net.backbone
        # The layers on the final token grid (all of a ViT / Conformer, the last stage of a MiT):
        # layer_index splits them into shallow (fused for pseudo labels) and deep (supervised).
        self.layers = bb.final_grid_layers()
        self.L = len(self.layers)
        self.k = int(self.r.layer_index)
        if not 0 < self.k < self.L:
            raise ValueError(
                f"aream.layer_index must be in 1..{self.L - 1} for the {self.L} layers {self.layers}, "
                f"got {self.k}"
            )
        self.T = bb.num_prefix_tokens
        self.weighting = str(self.r.weighting)  # one of WEIGHTINGS (the section's Rule)
        ent = torch.ones(self.L)
        if self.weighting == "entropy_offline":
            if self.r.entropy is None or len(self.r.entropy) != self.L:
                raise ValueError(
                    f"aream.weighting=entropy_offline needs aream.entropy with {self.L} values "
                    f"(compute them with `wsss analyze --entropy`)"
                )
            ent = entropy_weights(torch.tensor(list(self.r.entropy), dtype=torch.float32))
        # Official: fusion weights 1 - ent on shallow layers, loss weights ent on deep layers.
        self.fusion_w = (1 - ent[: self.k]) if self.weighting == "entropy_offline" else torch.ones(self.k)
        self.loss_w = ent[self.k :] if self.weighting == "entropy_offline" else torch.ones(self.L - self.k)
        self.class_attention = bool(self.r.class_attention) and self.T > 1

    def shallow_layers(self) -> list[int]:
        return self.layers[: self.k]

    def deep_layers(self) -> list[int]:
        return self.layers[self.k :]

    @torch.no_grad()
    def score_cam(self, net: WSSSNet, x: Tensor, labels: Tensor, scales: list[float]) -> Tensor:
        """The refined CAM of the official inference (every final-grid layer, uniform weights: the
        'refined' map). A MiT's earlier stages have other grids: they are not fused."""
        return self.aream_cam(net, x, labels, self.layers, None, scales)

    # ----------------------------------------------------------------- CAM refined by attention
    def patch_affinities(self, affs: dict[int, Tensor], layers: list[int]) -> Tensor:
        """Patch blocks (l, n, Np, Np) of head-mean attentions over all tokens (n, N, N)."""
        renorm = bool(self.r.renormalize)
        return torch.stack([slice_patches(affs[i], self.T, renorm) for i in layers])

    def refined_cam_single(
        self,
        out_cam: Tensor,
        affs: dict[int, Tensor],
        grid: tuple[int, int],
        layers: list[int],
        weights: Tensor | None,
        affinity: Tensor | None = None,
    ) -> Tensor:
        """One pass: raw CAM (n, K, h, w) [x class attention] refined by the fused layers, or by
        ``affinity`` (n, Np, Np) rows = queries when given."""
        cam = out_cam
        if self.class_attention:
            cam = cam.relu() * class_token_attention([affs[i] for i in self.layers], self.T, grid)
        if affinity is None:
            stack = self.patch_affinities(affs, layers)
            affinity = fuse_layers(stack, None if weights is None else weights.to(stack))
        return refine_by_affinity(cam, affinity)

    @torch.no_grad()
    def aream_cam(
        self,
        net: WSSSNet,
        x: Tensor,
        labels: Tensor,
        layers: list[int],
        weights: Tensor | None,
        scales: list[float] | None = None,
        affinity: Callable[[tuple[int, int]], Tensor] | None = None,
        first: NetOutput | None = None,
    ) -> Tensor:
        """Multi-scale (+flip) CAM refined by fused attention, normalised, masked: (B, K, H, W).

        affinity: maps a token grid to an (n, Np, Np) affinity that replaces the fused attention
        (``wsss analyze``: the ground-truth ceiling). first: the training forward with the attention
        of ``layers`` as head-mean probabilities (:meth:`~wsss.methods.base.Method.forward_rows`),
        which stands in for the un-flipped forward at scale 1."""
        need = self._needed(layers)

        def refined(xs: Tensor) -> Tensor:
            out = self.label_forward(net, x, xs, first, attn_layers=need, attn_reduce=_attention_probs)
            return self.refine_output(out, labels, layers, weights, affinity)

        return self.fused_cam(refined, x, scales, keep=labels) * labels[..., None, None]

    def _needed(self, layers: list[int]) -> list[int]:
        """The layers whose attention refining with ``layers`` reads."""
        return self.layers if self.class_attention else sorted(set(layers))

    def refine_output(self, out: NetOutput, labels: Tensor, layers: list[int], weights: Tensor | None,
                      affinity: Callable[[tuple[int, int]], Tensor] | None = None) -> Tensor:
        """The raw CAM of one forward (n rows, attention of :meth:`_needed` captured as head-mean
        probabilities) refined by the fused ``layers`` (or by ``affinity``): (n, K, h, w)."""
        grid = out.grids[self._needed(layers)[-1]]
        w = weights
        if self.weighting == "entropy_online" and weights is None and affinity is None:
            w = self.online_weights(out.cam, out.attn, grid, labels)
        aff = None if affinity is None else affinity(grid)
        return self.refined_cam_single(out.cam, out.attn, grid, layers, w, aff)

    def online_weights(
        self, cam: Tensor, affs: dict[int, Tensor], grid: tuple[int, int], labels: Tensor
    ) -> Tensor:
        """Paper eq. 7-8 (an interpretation): per-image weights (n, k) from the current model."""
        n = cam.shape[0]
        lab = labels.repeat(n // labels.shape[0], 1)
        stack = self.patch_affinities(affs, self.shallow_layers())
        return 1 - online_entropy_weights(cam, stack, lab)

    # ----------------------------------------------------------------- training
    def training_step(
        self, net: nn.Module, batch: dict[str, Tensor], it: int
    ) -> tuple[Tensor, dict[str, float]]:
        x, labels = batch["image"], batch["labels"]
        box = batch.get("img_box")
        m = unwrap(net)
        T = self.T
        warm = it <= int(self.r.warmup_iters)
        seg_w = 0.0 if warm or m.seg_head is None else float(self.r.seg_weight)
        deep = [] if warm else self.deep_layers()
        # the label pass's layers too (as probabilities), when the training forward stands in for its
        # scale-1 rows; not when the pass reads a supervised layer (MCTformer's class attention)
        label_layers = [] if warm or not self.reuses_forward(m) else self._needed(self.shallow_layers())
        shallow = [] if set(label_layers) & set(deep) else label_layers

        def reduce(layer: int, z: Tensor) -> Tensor:
            return layer_logit_mean(z, T) if layer in deep else _attention_probs(layer, z)

        out, l_cls, logs = self.classify(net, x, labels, attn_layers=sorted(set(deep) | set(shallow)),
                                         attn_reduce=reduce, with_seg=seg_w > 0)
        if warm:
            return l_cls, logs
        image01 = self.par_image(x)
        first = self.forward_rows(m, out) if shallow else None
        with torch.no_grad(), pass_mode(m, self.mode):
            fw = None if self.weighting == "entropy_online" else self.fusion_w
            cam = self.aream_cam(m, x, labels, self.shallow_layers(), fw, first=first)
            pseudo = self.pseudo_label(image01, cam, labels, box)
        grid = out.grids[self.deep_layers()[-1]]
        target = affinity_labels(pseudo, grid, None, sampling=str(self.r.sampling))
        l_aff = aream_affinity_loss(
            [out.attn[i] for i in self.deep_layers()], target, self.loss_w.to(x.device)
        )
        loss = l_cls + float(self.r.aff_weight) * l_aff
        logs["aff"] = l_aff.item()
        if seg_w > 0:
            l_seg = seg_loss_bg_fg(out.seg, pseudo)
            loss = loss + seg_w * l_seg
            logs["seg"] = l_seg.item()
        return loss, logs

    # ----------------------------------------------------------------- evaluation
    def refined_bkg_score(self) -> float:
        """Background score of the refined maps: ``aream.bkg_score``, else ``eval.bkg_score``."""
        return self.bkg_score if self.r.bkg_score is None else float(self.r.bkg_score)

    def _eval_sets(self, want: Collection[str]) -> dict[str, tuple[list[int], Tensor | None]]:
        """The refined CAMs the maps in ``want`` read: name -> (layers, fusion weights)."""
        sets: dict[str, tuple[list[int], Tensor | None]] = {}
        if {"refined", "refined_par"} & set(want):
            sets["refined"] = (self.layers, None)
        if "pseudo" in want:
            fw = None if self.weighting == "entropy_online" else self.fusion_w
            sets["shallow"] = (self.shallow_layers(), fw)
        return sets

    def eval_capture(self, scale: float, want: set[str]) -> dict[str, Any]:
        """The attention the refined maps read, as head-mean probabilities, on every CAM forward."""
        sets = self._eval_sets(want)
        if not sets:
            return {}
        need = sorted({i for layers, _ in sets.values() for i in self._needed(layers)})
        return {"attn_layers": need, "attn_reduce": _attention_probs}

    def eval_keep(self, out: NetOutput, scale: float, labels: Tensor, want: set[str]) -> Any:
        """Each wanted refined CAM of this scale's forward (2B or B rows, before fusion)."""
        sets = self._eval_sets(want)
        if not sets or not out.attn:
            return None
        return {name: self.refine_output(out, labels, layers, w) for name, (layers, w) in sets.items()}

    @torch.no_grad()
    def extra_maps(self, net: WSSSNet, inp: MapInput, want: Collection[str]) -> dict[str, Tensor]:
        """'refined': CAM refined by the uniform mean of all layers (the official inference);
        'refined_par': the same after PAR; 'pseudo' (replacing the base one): the training rule
        (shallow fusion, high/low scores). From the evaluation's CAM forwards when they ran."""
        x, image01, labels, scales = inp.x, inp.image01, inp.labels, inp.scales
        bkg = self.refined_bkg_score()
        kept = inp.kept_all()
        cams: dict[str, Tensor] = {}
        for name, (layers, w) in self._eval_sets(want).items():
            if kept is None:
                cams[name] = self.aream_cam(net, x, labels, layers, w, scales)
            else:
                fused = self.fuse_cams([k[name] for k in kept], tuple(x.shape[-2:]), x.shape[0], keep=labels)
                cams[name] = fused * labels[..., None, None]
        maps: dict[str, Tensor] = {}
        if "refined" in want:
            maps["refined"] = cam_to_label(cams["refined"], labels, bkg_score=bkg)
        if "refined_par" in want:
            maps["refined_par"] = self.par_argmax(image01, with_background(cams["refined"], bkg), labels,
                                                  inp.kernel)
        if "pseudo" in want:
            maps["pseudo"] = self.pseudo_label(image01, cams["shallow"], labels, None)
        return maps

    # ------------------------------------------- analysis hooks (wsss.analysis.hooks protocols)
    @torch.no_grad()
    def oracle_batch(self, net: WSSSNet, x: Tensor, labels: Tensor, gt: Tensor
                     ) -> tuple[dict[str, Tensor], Tensor | None]:
        """The CAM, the CAM refined by the uniform mean of all final-grid layers (the official
        inference, the 'refined' map) and the CAM refined by the oracle affinity
        (:func:`oracle_affinity`, rows normalised to 1), each as is and after PAR."""
        sampling = str(self.r.sampling)

        def oracle(grid: tuple[int, int]) -> Tensor:
            same = oracle_affinity(affinity_labels(gt, grid, None, sampling=sampling))
            return same / same.sum(-1, keepdim=True).clamp(min=1)

        cams = {
            "cam": self.multiscale_cam(net, x, [1.0], keep=labels) * labels[..., None, None],
            "refined": self.aream_cam(net, x, labels, self.layers, None, [1.0]),
            "oracle": self.aream_cam(net, x, labels, self.layers, None, [1.0], affinity=oracle),
        }
        maps, kernel = {}, ImageKernel(self.par, x)  # every '*_par' map refines on x
        for k, cam in cams.items():
            bkg = self.bkg_score if k == "cam" else self.refined_bkg_score()
            maps[k] = cam_to_label(cam, labels, bkg_score=bkg)
            maps[f"{k}_par"] = self.par_argmax(x, with_background(cam, bkg), labels, kernel)
        return maps, None

    def oracle_protocol(self) -> dict[str, Any]:
        return {"bkg_score": self.bkg_score, "refined_bkg_score": self.refined_bkg_score(),
                "layers": list(self.layers),
                "oracle": "same-class token pairs, rows normalised to 1", "sampling": str(self.r.sampling)}


@PARAM_RULES.register("aream")
def aream_rules(head_mult: float = 10.0, no_decay_names: Iterable[str] = ("cls_token",),
                head_key: str = "head") -> list[ParamRule]:
    """AReAM Conformer ``get_param_groups``: ``head_mult`` for names containing "head"; no weight decay
    for 1-D parameters, biases and ``no_decay_names`` (Conformer's ``no_weight_decay``)."""
    nd, head = no_decay(no_decay_names), contains(head_key)
    return [ParamRule(both(head, nd), lr_mult=head_mult, weight_decay=0.0, name="head_no_decay"),
            ParamRule(head, lr_mult=head_mult, name="head"),
            ParamRule(nd, weight_decay=0.0, name="no_decay"),
            ParamRule(lambda _n, _p: True, name="decay")]


@PARAM_RULES.register("mctformer")
def mctformer_rules(no_decay_names: Iterable[str] = ("pos_embed", "cls_token")) -> list[ParamRule]:
    """MCTformer (timm ``create_optimizer``): no weight decay for 1-D parameters, biases and the
    ViT's ``no_weight_decay`` set (pos_embed, cls_token); one lr for everything."""
    return [ParamRule(no_decay(no_decay_names), weight_decay=0.0, name="no_decay"),
            ParamRule(lambda _n, _p: True, name="decay")]
