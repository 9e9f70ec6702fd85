"""setup.py's -fno-trapping-math lets gcc vectorise the AVX2 and SSE2 clones of the
elementwise loops (benchmarks/vecmath.py measures how much); it must not change a bit of what
they compute. The passes of ``_vecmath.h`` are built for AVX2 (the clone whose code changed
most) with setup.py's flags and without that one, and their outputs compared."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _vecmath():
    spec = importlib.util.spec_from_file_location("vecmath", ROOT / "benchmarks" / "vecmath.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the clones compared are x86-64's")
def test_no_trapping_math_keeps_every_bit_of_the_avx2_passes(tmp_path):
    vm = _vecmath()
    cc = vm.compiler()
    assert cc, "no C compiler: the kernels' build needs one too"
    assert "-fno-trapping-math" in vm.FLAGS and "-fno-trapping-math" not in vm.REFERENCE
    # x86-64-v3 code only runs on a CPU with AVX2; the baseline build shows the same property
    march = "x86-64-v3" if {"avx2", "fma"} <= vm.cpu_flags() else "x86-64"
    ours = vm.run(vm.build(cc, march, vm.FLAGS, tmp_path / "ours"))
    ref = vm.run(vm.build(cc, march, vm.REFERENCE, tmp_path / "reference"))
    assert set(ours) == set(ref) and len(ours) == 6
    assert {k: v["hash"] for k, v in ours.items()} == {k: v["hash"] for k, v in ref.items()}
