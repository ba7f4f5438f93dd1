"""The ``wsss`` commands, one module each: its sub-parser (``add_parser(sub)``) and the function that
runs it (``cmd_<name>(args)``, with the Python entry point it calls, e.g. ``run_evaluate``).

``train``, ``evaluate``, ``pseudo_labels``, ``calibrate``, ``predict``, ``analyze``, ``report``, ``demo``;
``common`` holds what several of them share. :mod:`wsss.cli` assembles the parser from them. The commands
are the top layer: nothing else in wsss imports them (``tests/test_layering.py``).
"""
