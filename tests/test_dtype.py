"""dtype=auto: bfloat16 where the device computes it natively, float32 elsewhere, recorded in the results."""

import os
import subprocess
import sys

import pytest
import torch

from lm_eval_dllm import loading
from lm_eval_dllm.loading import auto_dtype, load, native_bf16

CPU = torch.device("cpu")


@pytest.mark.parametrize("capability, flags, native", [
    ("AVX512", {"avx512f", "amx_bf16", "amx_tile"}, True),  # Sapphire Rapids and later: AMX
    ("AVX512", {"avx512f", "avx512_bf16"}, True),  # Cooper Lake, Zen 4
    ("AVX512", {"avx512f"}, False),  # Skylake-X: AVX-512 without bf16
    ("AVX2", {"avx2", "fma"}, False),  # the common laptop / cloud CPU
    ("AVX2", {"avx2", "amx_bf16", "avx512_bf16"}, False),  # ATEN_CPU_CAPABILITY=avx2 on an AMX CPU
])
def test_cpu_detection(monkeypatch, capability, flags, native):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(loading, "cpu_flags", lambda: flags)
    assert native_bf16(CPU) is native
    assert auto_dtype(CPU) == (torch.bfloat16 if native else torch.float32)


def test_cuda_needs_bf16_in_hardware(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert auto_dtype(torch.device("cuda")) == torch.float32  # emulated only (pre-Ampere): float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert auto_dtype(torch.device("cuda")) == torch.bfloat16


def test_mps_stays_float32(monkeypatch):
    monkeypatch.setattr(loading, "cpu_flags", lambda: {"amx_bf16"})
    assert auto_dtype(torch.device("mps")) == torch.float32


def test_cpu_flags_read_from_cpuinfo():
    flags = loading.cpu_flags()
    if os.path.exists("/proc/cpuinfo") and sys.platform == "linux" and os.uname().machine == "x86_64":
        assert "sse2" in flags  # every x86-64 CPU has it
    else:
        assert isinstance(flags, set)


def test_avx2_emulation_resolves_to_float32():
    """As a user emulates an AVX2-only CPU: torch honours ATEN_CPU_CAPABILITY, and so does auto."""
    env = os.environ | {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    code = "import torch; from lm_eval_dllm.loading import auto_dtype; print(auto_dtype(torch.device('cpu')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.split() == ["torch.float32"], out.stderr[-2000:]


@pytest.mark.parametrize("native, want", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_loads_what_the_hardware_computes(monkeypatch, tiny_ckpt, native, want):
    monkeypatch.setattr(loading, "native_bf16", lambda device: native)
    model, _, _ = load(str(tiny_ckpt), device="cpu")  # the checkpoint is stored in float32
    assert next(model.parameters()).dtype == want


@pytest.mark.slow
@pytest.mark.parametrize("native, want", [(True, "bfloat16"), (False, "float32")])
def test_results_json_records_the_resolved_dtype(monkeypatch, tiny_ckpt, task_manager, native, want):
    import lm_eval

    monkeypatch.setattr(loading, "native_bf16", lambda device: native)
    res = lm_eval.simple_evaluate(model="dllm", model_args=f"pretrained={tiny_ckpt},sampler=threshold",
                                  tasks=["modchain"], limit=1, task_manager=task_manager, device="cpu")
    assert res["config"]["dllm"]["dtype"] == want
    assert "dtype" not in res["config"]["model_args"]  # auto was asked: the record says what it meant


def test_explicit_bf16_on_a_cpu_without_it_warns(monkeypatch, tiny_ckpt, caplog):
    monkeypatch.setattr(loading, "native_bf16", lambda device: False)
    with caplog.at_level("WARNING", logger="lm_eval_dllm.loading"):
        model, _, _ = load(str(tiny_ckpt), dtype="bfloat16", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16  # asked for: kept
    assert "runs slower than float32" in caplog.text


def test_dtype_cpu_benchmark_checks_its_limit_and_tabulates_the_profile():
    from benchmarks.dtype_cpu import main, profile_table

    with pytest.raises(SystemExit, match="--limit 0; valid: a positive number of problems"):
        main(["--limit", "0"])
    ops = {"float32": {"aten::addmm": 10.0, "aten::gelu": 5.0}, "bfloat16": {"aten::addmm": 40.0, "aten::bmm": 8.0}}
    lines = profile_table(ops).splitlines()
    assert [x.split("|")[1].strip() for x in lines[2:]] == ["`aten::addmm`", "`aten::bmm`", "all ops"]
    cells = [[c.strip() for c in x.split("|")[2:4]] for x in lines[2:]]
    assert cells == [["10", "40"], ["0", "8"], ["15", "48"]]  # an op float32 never ran counts 0
