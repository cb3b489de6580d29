"""The explicit backend choice: validation, life without Triton, and compiled-mode kernels."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from longcat_sim.model.kernels.backend import check_backend, require_triton
from longcat_sim.model.kernels.permute import plan_permutation
from tests.kernels import requires_triton

REPO = Path(__file__).resolve().parents[2]


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_check_backend_names_the_choices() -> None:
    assert check_backend("torch") == "torch" and check_backend("triton") == "triton"
    with pytest.raises(ValueError, match=r"backend='torch' .* or backend='triton'"):
        check_backend("gpu")


@requires_triton
def test_cpu_tensors_need_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        require_triton(torch.zeros(1))
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        plan_permutation(torch.zeros(2, 1, dtype=torch.long), 1, backend="triton")


def test_kernels_import_and_run_without_triton() -> None:
    """With triton unimportable, the torch backend works and the triton one says why not."""
    result = run_python(
        """
        import sys
        sys.modules["triton"] = None  # any `import triton` now fails
        import torch
        from longcat_sim.model.kernels.combine import combine
        from longcat_sim.model.kernels.grouped_gemm import grouped_swiglu
        from longcat_sim.model.kernels.permute import permute
        from longcat_sim.model.kernels.router_topk import router_topk
        from longcat_sim.model.moe import MoE
        from longcat_sim.model.config import get_preset
        idx = torch.tensor([[0, 2], [1, 0]])
        x = torch.randn(2, 4)
        x_SD, perm = permute(x, idx, 2)
        y = grouped_swiglu(x_SD, torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 4, 3),
                           perm.counts_N)
        combine(x, y, torch.rand(2, 2), perm.row_of_slot_TK)
        router_topk(torch.randn(2, 3), torch.zeros(3), topk=2, n_routed=2,
                    routed_scaling_factor=1.0, scale_zero_expert_gates=True)
        MoE(get_preset("tiny"))(torch.randn(3, 64))
        try:
            permute(x, idx, 2, backend="triton")
        except RuntimeError as exc:
            print(exc)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "needs the triton package, which is not installed" in result.stdout


@pytest.mark.slow
@requires_triton
def test_kernels_compile_for_cuda(tmp_path: Path) -> None:
    """Ahead-of-time compile every kernel for sm_90 (no GPU needed): catches what only the
    compiler rejects and the interpreter accepts (non-constexpr globals, dtype mismatches)."""
    script = """
        import importlib.util, sys
        if importlib.util.find_spec("triton.backends.nvidia") is None:
            sys.exit(3)
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from longcat_sim.model.kernels import triton_combine as tc, triton_grouped_gemm as tg
        from longcat_sim.model.kernels import triton_permute as tp, triton_router_topk as tr

        def compile_for_h100(fn, sig, **opts):
            consts = {k: v for k, v in sig.items() if k.isupper()}  # constexpr names
            sig = {k: ("constexpr" if k in consts else v) for k, v in sig.items()}
            src = ASTSource(fn=fn, signature=sig, constexprs=consts)
            triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)

        i64 = "*i64"
        compile_for_h100(tc._combine_kernel, dict(
            x_ptr="*bf16", y_ptr="*bf16", gate_ptr="*fp32", row_ptr=i64, out_ptr="*bf16",
            num_tokens="i32", width="i32", TOPK=12, TOPK_PAD=16, BLOCK_T=4, BLOCK_D=1024,
        ), enable_fp_fusion=False)
        compile_for_h100(tr._router_topk_kernel, dict(
            logits_ptr="*fp32", bias_ptr="*fp32", scores_ptr="*fp32", idx_ptr=i64,
            gate_ptr="*fp32", counts_ptr="*i32", num_tokens="i32", num_experts="i32",
            n_routed="i32", scaling="fp32", TOPK=12, BLOCK_T=4, BLOCK_E=1024, SCALE_ZERO=False,
        ), enable_fp_fusion=False)
        compile_for_h100(tp._slot_rank_kernel, dict(
            idx_ptr=i64, rank_ptr="*i32", block_counts_ptr="*i32", num_slots="i32",
            n_routed="i32", BLOCK=128,
        ), enable_fp_fusion=False)
        compile_for_h100(tp._slot_row_kernel, dict(
            idx_ptr=i64, rank_ptr="*i32", base_ptr=i64, row_of_slot_ptr=i64, slot_ptr=i64,
            token_ptr=i64, num_slots="i32", n_routed="i32", topk="i32", BLOCK=128,
        ), enable_fp_fusion=False)
        compile_for_h100(tp._gather_rows_kernel, dict(
            src_ptr="*bf16", index_ptr=i64, out_ptr="*bf16", num_rows="i32", width="i32",
            BLOCK_R=4, BLOCK_D=1024,
        ), enable_fp_fusion=False)
        for dt, precision in (("bf16", "tf32"), ("fp32", "ieee")):
            tiles = dict(tile_expert_ptr=i64, tile_row_ptr=i64, tile_end_ptr=i64)
            blocks = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, UPCAST=False, DOT_PRECISION=precision)
            for swiglu in (True, False):  # gate/up, then down
                compile_for_h100(tg._expert_gemm_kernel, dict(
                    a_ptr=f"*{dt}", w_ptr=f"*{dt}", w2_ptr=f"*{dt}", **tiles,
                    out_ptr=f"*{dt}", pre_gate_ptr=f"*{dt}", pre_up_ptr=f"*{dt}",
                    depth="i32", n_cols="i32", SWIGLU=swiglu, **blocks,
                ), num_warps=4, num_stages=3, enable_fp_fusion=True)
        print("compiled")
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    result = run_python(script, env=env)
    if result.returncode == 3:
        pytest.skip("triton has no NVIDIA backend here")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled" in result.stdout
