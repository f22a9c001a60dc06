"""The static GPU report. Its figures must come from the compiled binary: small kernels
defined here (a tl.dot matmul, a vectorizable copy, a kernel that must spill, a broken one)
go through the real CLI in a subprocess (compiling cannot happen under TRITON_INTERPRET=1,
which the test session sets), which also dumps the cubins; the test reads those with
cuobjdump itself and compares."""

import json
import os
import re
import subprocess
import sys

import pytest
import triton
import triton.language as tl

from tsfast.kernels import report


@triton.jit
def _tiny_matmul_kernel(A, B, Out, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tile = offs[:, None] * BLOCK + offs[None, :]
    a = tl.load(A + tile)  # A: (BLOCK, BLOCK) fp16, row-major
    b = tl.load(B + tile)  # B: (BLOCK, BLOCK) fp16, row-major
    tl.store(Out + tile, tl.dot(a, b).to(tl.float16))  # Out: (BLOCK, BLOCK) fp16


@triton.jit
def _copy_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n) * 2, mask=offs < n)  # X, Y: (n,) fp32


@triton.jit
def _spilling_kernel(X, Y, BLOCK: tl.constexpr):
    # One warp holds BLOCK values (hundreds per thread) live across a scan and a reduction.
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs)
    tl.store(Y + offs, x / tl.sum(x, 0) + tl.cumsum(x, 0))


@triton.jit
def _broken_kernel(X, BLOCK: tl.constexpr):
    tl.store(X + tl.arange(0, BLOCK), undefined_name)  # noqa: F821


_ALIGNED = {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]]}


def report_cases():
    """Read by the report when this file is passed with --module."""
    fp16 = {"A": "*fp16", "B": "*fp16", "Out": "*fp16", "BLOCK": "constexpr"}
    return [
        dict(name="tiny_matmul", fn=_tiny_matmul_kernel, signature=fp16, constexprs={"BLOCK": 64},
             num_warps=4, num_stages=1, config="B64-w4", shape="test", attrs=_ALIGNED),
        dict(name="copy", fn=_copy_kernel, signature={"X": "*fp32", "Y": "*fp32", "n": "i32", "BLOCK": "constexpr"},
             constexprs={"BLOCK": 1024}, num_warps=4, num_stages=1, config="B1024-w4", shape="test", attrs=_ALIGNED),
        dict(name="spilling", fn=_spilling_kernel, signature={"X": "*fp32", "Y": "*fp32", "BLOCK": "constexpr"},
             constexprs={"BLOCK": 8192}, num_warps=1, num_stages=1, config="B8192-w1", shape="test"),
        dict(name="broken", fn=_broken_kernel, signature={"X": "*fp32", "BLOCK": "constexpr"},
             constexprs={"BLOCK": 16}, num_warps=1, num_stages=1, config="B16", shape="test"),
    ]


def _run_report(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.run([sys.executable, "-m", "tsfast.kernels.report", *args],
                          capture_output=True, text=True, env=env, timeout=600)


def _cuobjdump(flag, path):
    return subprocess.run([report._tool("cuobjdump"), flag, path], capture_output=True, text=True,
                          check=True).stdout


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    dump = tmp_path_factory.mktemp("cubins")
    done = _run_report("--module", __file__, "--arch", "sm_80,sm_90a", "--json", "--dump", str(dump))
    assert done.returncode == 1, done.stderr  # 1: the broken kernel's error rows
    rows = {(r["kernel"], r["arch"]): r for r in json.loads(done.stdout)}
    return rows, dump


def test_figures_come_from_the_cubin(tiny_report):
    rows, dump = tiny_report
    for (kernel, arch), row in rows.items():
        if kernel == "broken":
            continue
        cubin = next(dump.glob(f"test_report-{kernel}-*-{arch}.cubin"))
        usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", _cuobjdump("-res-usage", str(cubin)))
        regs, stack, _, local = map(int, usage.groups())
        assert regs > 0 and row["registers"] == regs
        assert row["spill_bytes"] == stack + local
        sass = _cuobjdump("-sass", str(cubin))
        assert row["ldg128"] == ("LDG.E.128" in sass)
        assert row["tensor_cores"] == ("HGMMA" if "HGMMA" in sass else "HMMA" if "HMMA" in sass else "-")


def test_what_the_kernels_should_show(tiny_report):
    rows, _ = tiny_report
    assert rows["tiny_matmul", "sm_80"]["tensor_cores"] == "HMMA"
    assert rows["tiny_matmul", "sm_90"]["tensor_cores"] == "HGMMA"
    assert rows["tiny_matmul", "sm_90"]["shared_bytes"] > 0  # wgmma reads its operands from smem
    assert rows["copy", "sm_80"]["ldg128"] and rows["copy", "sm_80"]["tensor_cores"] == "-"
    assert rows["spilling", "sm_80"]["spill_bytes"] > 0 and rows["spilling", "sm_90"]["spill_bytes"] > 0
    assert rows["tiny_matmul", "sm_80"]["spill_bytes"] == 0
    for row in rows.values():
        if row["error"] is None:
            assert 0 < row["warps_per_sm"] <= 64 and row["warps_per_sm"] % row["num_warps"] == 0


def test_a_broken_kernel_is_an_error_row_not_a_crash(tiny_report):
    rows, _ = tiny_report
    assert "undefined_name" in rows["broken", "sm_80"]["error"]
    assert rows["broken", "sm_80"]["registers"] == 0
    assert len(rows) == 8


def test_parse_arch():
    assert report.parse_arch("sm_80") == 80
    assert report.parse_arch("sm_90a") == report.parse_arch("90") == 90
    with pytest.raises(ValueError, match="unknown arch 'sm_75'.*sm_80"):
        report.parse_arch("sm_75")


@pytest.mark.parametrize(
    "regs, smem, warps, cc, blocks, limit",
    [
        (32, 0, 4, 80, 16, "warps"),  # 64 warps / 4
        (168, 40960, 4, 80, 3, "regs"),  # 168*32 = 5376 regs a warp: 12 warps
        (128, 98304, 4, 90, 2, "smem"),  # 233472 // (98304 + 1024)
        (64, 200000, 8, 80, 0, "smem>166912"),  # more than one A100 block may have
        (16, 0, 1, 80, 32, "blocks"),
        (255, 0, 8, 86, 1, "regs"),  # 255 -> 8192 regs a warp: 8 warps
    ],
)
def test_occupancy(regs, smem, warps, cc, blocks, limit):
    assert report.occupancy(regs, smem, warps, cc) == (blocks, limit)


def test_table_shows_error_rows():
    ok = report.Row(module="m", kernel="k", config="c", shape="gpt2", arch="sm_80", num_warps=4,
                    registers=96, spill_bytes=8, shared_bytes=1024, tensor_cores="HMMA", ldg128=True,
                    warps_per_sm=20, occupancy=20 / 64, limiter="regs")
    bad = report.Row(module="m", kernel="k2", config="c", shape="gpt2", arch="sm_90", error="CompilationError: x")
    lines = report.format_table([ok, bad]).splitlines()
    assert lines[0].split()[:4] == ["kernel", "config", "shape", "arch"]
    assert re.search(r"k\s+c\s+gpt2\s+sm_80\s+96\s+8\s+1024\s+HMMA\s+yes\s+-\s+20 \(31%\)\s+regs", lines[2])
    assert "ERROR CompilationError: x" in lines[3]


@pytest.mark.slow
def test_cli_compiles_a_real_kernel_case():
    listed = _run_report("--list")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    first = listed.stdout.split()[1]
    done = _run_report("--kernel", first, "--arch", "sm_80", "--json", "--jobs", "1")
    rows = json.loads(done.stdout)
    assert rows and all(r["kernel"].startswith(first) and r["error"] is None and r["registers"] > 0 for r in rows), done.stdout
