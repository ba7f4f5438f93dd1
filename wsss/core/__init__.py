"""The bottom layer: what every other layer may use and that imports nothing of wsss.

``registry`` (name -> builder registries: backbones, methods, parameter rules), ``schema`` (what a config
key may hold: :class:`~wsss.core.schema.Rule`, method config sections), ``param_rules`` (the optimiser's
parameter groups of the official recipes) and ``weights`` (reading and loading foreign or released
weights safely; the training state of a run is :mod:`wsss.engine.checkpoint`).
"""
