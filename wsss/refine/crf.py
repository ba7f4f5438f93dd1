"""Dense CRF post-processing with ``pydensecrf2`` (optional extra ``wsss[crf]``).

The package installs the module ``pydensecrf``; it is imported lazily, so the rest of wsss works
without it. Inputs are numpy arrays (torch tensors are accepted and a tensor is returned).
No torch import at module level: worker processes of :func:`crf_batch` start quickly.

Parameter presets (official code):
* ``afa``: AFA ``test_msc_flip.py`` — softmax unary, Gaussian sxy 3 compat 3, bilateral sxy 64 srgb 5
  compat 4, 10 iterations.
* ``aream``: AReAM ``tools/dcrf.crf_inference`` — Gaussian sxy 3 compat 3, bilateral sxy 80 srgb 13
  compat 10 (both sxy divided by ``scale_factor``), 10 iterations.
* ``label``: ``crf_inference_label`` (AFA and AReAM) — label unary with gt_prob 0.7, Gaussian sxy 3
  compat 3, bilateral sxy 50 srgb 5 compat 10, 10 iterations.
* ``mctformer_seg``: the seg-stage test CRF of AReAM/MCTformer — Gaussian sxy 4 compat 3, bilateral
  sxy 83 srgb 5 compat 3.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

INSTALL_HINT = "install with pip install 'wsss[crf]' (needs a C++ compiler)"


class CRFUnavailableError(ImportError):
    """pydensecrf2 is not installed."""


def _densecrf() -> Any:
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as err:
        raise CRFUnavailableError(f"dense CRF needs the pydensecrf2 package: {INSTALL_HINT}") from err
    return dcrf


def crf_available() -> bool:
    try:
        _densecrf()
    except CRFUnavailableError:
        return False
    return True


@dataclass(frozen=True)
class CRFParams:
    iters: int = 10
    pos_sxy: float = 3.0
    pos_compat: float = 3.0
    bi_sxy: float = 64.0
    bi_srgb: float = 5.0
    bi_compat: float = 4.0


CRF_PRESETS: dict[str, CRFParams] = {
    "afa": CRFParams(10, 3.0, 3.0, 64.0, 5.0, 4.0),
    "aream": CRFParams(10, 3.0, 3.0, 80.0, 13.0, 10.0),
    "label": CRFParams(10, 3.0, 3.0, 50.0, 5.0, 10.0),
    "mctformer_seg": CRFParams(10, 4.0, 3.0, 83.0, 5.0, 3.0),
}


def _to_numpy(x: Any) -> tuple[np.ndarray, bool]:
    if hasattr(x, "detach"):  # a torch tensor; torch itself is not imported here
        return x.detach().cpu().numpy(), True
    return np.asarray(x), False


def _check_image(image: np.ndarray, h: int, w: int) -> np.ndarray:
    if image.shape != (h, w, 3):
        raise ValueError(f"image must be (H, W, 3) = ({h}, {w}, 3), got {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 RGB, got {image.dtype}")
    return np.ascontiguousarray(image)


def _run(image: np.ndarray, unary: np.ndarray, n_labels: int, p: CRFParams) -> np.ndarray:
    """Mean-field inference. unary (n_labels, H*W) float32 energies -> Q (n_labels, H, W) float32."""
    dcrf = _densecrf()
    h, w = image.shape[:2]
    d = dcrf.DenseCRF2D(w, h, n_labels)
    d.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    d.addPairwiseGaussian(sxy=p.pos_sxy, compat=p.pos_compat)
    d.addPairwiseBilateral(sxy=p.bi_sxy, srgb=p.bi_srgb, rgbim=np.copy(image), compat=p.bi_compat)
    q = d.inference(int(p.iters))
    return np.asarray(q, dtype=np.float32).reshape(n_labels, h, w)


def dense_crf(image: Any, probs: Any, iters: int = 10, pos_sxy: float = 3.0, pos_compat: float = 3.0,
              bi_sxy: float = 64.0, bi_srgb: float = 5.0, bi_compat: float = 4.0, clip: float = 1e-5) -> Any:
    """Dense CRF on class probabilities.

    image: uint8 RGB (H, W, 3). probs: (C, H, W) probabilities (softmax over C). Unary energy =
    ``-log(clip(probs, clip, 1))`` (pydensecrf ``unary_from_softmax``). Defaults: the AFA test preset.
    Returns the refined marginals Q (C, H, W) float32 (a tensor when ``probs`` is a tensor).
    """
    p_np, is_tensor = _to_numpy(probs)
    if p_np.ndim != 3:
        raise ValueError(f"probs must be (C, H, W), got {p_np.shape}")
    c, h, w = p_np.shape
    img = _check_image(_to_numpy(image)[0], h, w)
    unary = -np.log(np.clip(p_np.astype(np.float32), clip, 1.0)).reshape(c, -1)
    q = _run(img, unary, c, CRFParams(iters, pos_sxy, pos_compat, bi_sxy, bi_srgb, bi_compat))
    if is_tensor:
        import torch

        return torch.from_numpy(q).to(probs.device)
    return q


def crf_preset(image: Any, probs: Any, preset: str = "afa", scale_factor: float = 1.0) -> Any:
    """:func:`dense_crf` with a named preset; ``scale_factor`` divides both sxy (AReAM ``crf_inference``)."""
    if preset not in CRF_PRESETS:
        raise ValueError(f"unknown CRF preset '{preset}'; known: {sorted(CRF_PRESETS)}")
    p = CRF_PRESETS[preset]
    return dense_crf(image, probs, p.iters, p.pos_sxy / scale_factor, p.pos_compat, p.bi_sxy / scale_factor,
                     p.bi_srgb, p.bi_compat)


def crf_inference(image: Any, probs: Any, iters: int = 10, scale_factor: float = 1.0) -> Any:
    """AReAM ``crf_inference``: (C, H, W) probabilities -> refined (C, H, W)."""
    p = CRF_PRESETS["aream"]
    return dense_crf(image, probs, iters, p.pos_sxy / scale_factor, p.pos_compat, p.bi_sxy / scale_factor,
                     p.bi_srgb, p.bi_compat)


def label_unary(labels: np.ndarray, n_labels: int, gt_prob: float = 0.7) -> np.ndarray:
    """Unary energies of a hard label map (H, W) -> (n_labels, H*W) float32: ``-log(gt_prob)`` for the
    given label, ``-log((1 - gt_prob) / (n_labels - 1))`` for every other one (every value, 0 included,
    is a real label: pydensecrf ``zero_unsure=False``)."""
    if not 0.0 < gt_prob < 1.0:
        raise ValueError("gt_prob must be in (0, 1)")
    flat = labels.reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= n_labels):
        raise ValueError(f"labels must lie in [0, {n_labels}); map ignore values first")
    u = np.full((n_labels, flat.size), -np.log((1.0 - gt_prob) / (n_labels - 1)), dtype=np.float32)
    u[flat, np.arange(flat.size)] = -np.log(gt_prob)
    return u


def crf_inference_label(image: Any, labels: Any, n_labels: int, iters: int = 10, gt_prob: float = 0.7,
                        params: CRFParams | None = None) -> Any:
    """``crf_inference_label``: refine a label map (H, W) in [0, n_labels) -> label map (H, W) int64."""
    lab, is_tensor = _to_numpy(labels)
    h, w = lab.shape
    img = _check_image(_to_numpy(image)[0], h, w)
    p = replace(params or CRF_PRESETS["label"], iters=iters)
    out = _run(img, label_unary(lab, n_labels, gt_prob), n_labels, p).argmax(0).astype(np.int64)
    if is_tensor:
        import torch

        return torch.from_numpy(out).to(labels.device)
    return out


def _crf_job(args: tuple[np.ndarray, np.ndarray, CRFParams]) -> np.ndarray:
    image, probs, p = args
    return dense_crf(image, probs, p.iters, p.pos_sxy, p.pos_compat, p.bi_sxy, p.bi_srgb, p.bi_compat)


def crf_batch(images: Sequence[Any], probs_list: Sequence[Any], workers: int | None = None,
              params: CRFParams | str = "afa", mp_context: str = "spawn") -> list[np.ndarray]:
    """:func:`dense_crf` over many images with a process pool (the CRF is single-threaded C++).

    images: uint8 (H_i, W_i, 3); probs_list: (C_i, H_i, W_i). workers: processes (default: CPU count;
    <= 1 runs in this process). Returns numpy (C_i, H_i, W_i) float32 marginals in input order.
    ``spawn`` workers avoid forking a process that holds OpenMP / CUDA state.
    """
    p = CRF_PRESETS[params] if isinstance(params, str) else params
    _densecrf()  # fail early, in the caller, with the install hint
    jobs = [(_to_numpy(i)[0], _to_numpy(q)[0], p) for i, q in zip(images, probs_list, strict=True)]
    n = min(workers if workers is not None else (mp.cpu_count() or 1), len(jobs))
    if n <= 1:
        return [_crf_job(j) for j in jobs]
    with ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context(mp_context)) as pool:
        return list(pool.map(_crf_job, jobs))
