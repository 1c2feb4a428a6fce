"""Compiling Triton kernels for an H100 (sm_90) on a machine without a GPU, for the fused ops' tests.

TRITON_INTERPRET=1 runs kernels as NumPy and so misses what only the compiler sees. Once imported, the
interpreter patches Triton for the whole process, so the compiling happens in a child: the test module run as
a script, where TRITON_INTERPRET is unset, printing {kernel: "ok" or the compiler's error} as its last line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def ptx_status(fn, signature: dict, constexprs: dict, options: dict) -> str:
    """"ok" if the @triton.jit fn compiles to PTX for sm_90 with an entry point, else the compiler's error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        ptx = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 64),
                             options=options).asm["ptx"]
    except Exception as e:  # noqa: BLE001 - reported per kernel
        return f"{type(e).__name__}: {e}"
    return "ok" if f".entry {fn.__name__}" in ptx else "no entry point in the PTX"


def signature(fn, constexprs: dict, ints=(), floats=(), pointers: dict | None = None) -> dict:
    """ptx_status's signature of fn: constexprs by name, `ints` i32, `floats` fp32, other arguments pointers
    (*fp32 unless `pointers` names another type)."""
    pointers = pointers or {}
    return {a: "constexpr" if a in constexprs else "i32" if a in ints else "fp32" if a in floats
            else pointers.get(a, "*fp32") for a in fn.arg_names}


def compile_in_child(script: str) -> dict:
    """Run `script` (a test module whose __main__ prints its ptx_status results as JSON) without
    TRITON_INTERPRET; its results. Skips where Triton has no NVIDIA backend."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def assert_compiles(script: str) -> None:
    """compile_in_child(script): every kernel it reports compiled ("ok")."""
    results = compile_in_child(script)
    assert results and all(v == "ok" for v in results.values()), results
