"""How the local stack launches vLLM on a CPU."""

from __future__ import annotations

from onpolicy.stack.vllm import cpu_dtype, cpu_thread_env


def test_bfloat16_only_where_the_cpu_computes_it(tmp_path):
    avx2 = tmp_path / "avx2"
    avx2.write_text("flags\t\t: fpu sse2 avx avx2 fma\n")
    zen4 = tmp_path / "zen4"
    zen4.write_text("flags\t\t: avx2 avx512f avx512_bf16\n")
    assert cpu_dtype("auto", avx2) == "float32"
    assert cpu_dtype("auto", zen4) == "bfloat16"
    assert cpu_dtype("auto", tmp_path / "missing") == "float32"
    assert cpu_dtype("float16", avx2) == "float16"


def test_all_threads_binds_every_allowed_cpu_and_reserves_none():
    assert cpu_thread_env("all", {0, 1}) == {
        "VLLM_CPU_OMP_THREADS_BIND": "0-1",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }
    bind = cpu_thread_env("all", {3, 0, 1, 2, 7, 9, 10})["VLLM_CPU_OMP_THREADS_BIND"]
    assert bind == "0-3,7,9-10"
    assert cpu_thread_env("all", {5})["VLLM_CPU_OMP_THREADS_BIND"] == "5"
    assert cpu_thread_env("auto") == {"VLLM_CPU_OMP_THREADS_BIND": "auto"}
