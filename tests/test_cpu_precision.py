"""bf16 on a CPU that emulates it is about 100x slower than float32: the run says so, and
:func:`prefl.training.precision.cpu_precision` picks the fast precision for this CPU."""

from __future__ import annotations

import pytest

from prefl.training import precision


@pytest.mark.parametrize("native", [True, False])
def test_cpu_precision_follows_the_cpu(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert precision.cpu_precision() == ("bf16-mixed" if native else "32-true")


def test_bf16_on_an_emulating_cpu_warns_with_the_fix(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match=r"precision=bf16-mixed on a CPU without native bf16"):
        assert precision.warn_if_slow_cpu_bf16("bf16-mixed", on_cpu=True)
    assert not precision.warn_if_slow_cpu_bf16("32-true", on_cpu=True)
    assert not precision.warn_if_slow_cpu_bf16("bf16-mixed", on_cpu=False)  # a GPU run


def test_bf16_on_a_native_cpu_does_not_warn(monkeypatch, recwarn):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert not precision.warn_if_slow_cpu_bf16("bf16-true", on_cpu=True)
    assert not [w for w in recwarn if "native bf16" in str(w.message)]
