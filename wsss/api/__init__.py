"""The user-facing Python API above the engine: :mod:`~wsss.api.predictor` (``Segmenter``: image -> mask)
and :mod:`~wsss.api.hub` (loading trained models and foreign backbones from paths or the Hugging Face
hub). ``wsss.Segmenter`` and ``wsss.from_pretrained`` are these, imported on first use.
"""
