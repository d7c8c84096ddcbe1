"""Every module of the package imports on its own (no hidden import cycles or missing deps)."""

import importlib
import pkgutil
import subprocess
import sys

import pytest

import prefl

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(prefl.__path__, prefix="prefl.")
    if m.name != "prefl.__main__"
)


def test_package_has_modules():
    assert {"prefl.cli", "prefl.functional", "prefl.data.datamodule", "prefl.modules.sft"} <= set(
        MODULES
    )


@pytest.mark.parametrize("name", MODULES)
def test_module_imports_first(name):
    """Import ``name`` with no other prefl module loaded, so an import cycle that only bites when
    this module comes first shows up (third-party packages stay cached: this stays fast)."""
    ours = {m: mod for m, mod in sys.modules.items() if m == "prefl" or m.startswith("prefl.")}
    for loaded in ours:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    finally:  # the session's own copies back, and no fresh copy left beside them
        for fresh in [m for m in sys.modules if m == "prefl" or m.startswith("prefl.")]:
            del sys.modules[fresh]
        sys.modules.update(ours)


def test_public_api():
    for name in prefl.__all__:
        assert getattr(prefl, name) is not None
    from prefl.functional import masked_mean, sequence_logps  # noqa: F401

    assert importlib.import_module("prefl.losses").sft_loss is not None


def test_functional_and_losses_import_only_torch():
    code = (
        "import sys, prefl.functional, prefl.losses.sft\n"
        "bad = [m for m in ('lightning', 'transformers', 'datasets') if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
