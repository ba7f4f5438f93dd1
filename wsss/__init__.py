"""wsss: weakly-supervised semantic segmentation with transformers (AFA, AReAM, ToCo)."""

__version__ = "0.1.0"


def from_pretrained(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - lazy: see wsss.api.hub.from_pretrained
    """A trained model or a foreign backbone with its weights (:func:`wsss.api.hub.from_pretrained`)."""
    from wsss.api.hub import from_pretrained as _from_pretrained

    return _from_pretrained(*args, **kwargs)


def __getattr__(name: str) -> object:  # lazy: ``wsss.Segmenter`` (the class, so .from_pretrained works)
    if name == "Segmenter":
        from wsss.api.predictor import Segmenter

        return Segmenter
    raise AttributeError(f"module 'wsss' has no attribute {name!r}")
