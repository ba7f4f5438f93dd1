"""The test suite, one package per package of ``wsss/`` (``tests/backbones/`` for ``wsss/backbones/``, ...);
tests that span the whole library stay here. Every folder is a package, so a test module's import name
is its full dotted path (``tests.backbones.test_vit``) and two files of the same name in different
folders cannot collide; shared fixtures and helpers live in ``tests/conftest.py``
(``from tests.conftest import tiny_overrides``)."""
