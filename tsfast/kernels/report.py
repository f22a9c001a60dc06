"""Static GPU report: compile every Triton kernel of tsfast for a GPU target on this machine
(no GPU needed) and read the resources from the binary, the way a GPU engineer reads a
profiler's resource report.

    uv run python -m tsfast.kernels.report [--arch sm_80,sm_90] [--json] [--kernel NAME]
                                           [--module M] [--dump DIR] [--list] [--jobs N]

Every module in tsfast/kernels that defines `report_cases() -> list[dict]` is imported; each
dict is one compilation:
    {"name": str, "fn": @triton.jit function, "signature": {arg: "*bf16" | "i32" | ...},
     "constexprs": {name: value}, "num_warps": int, "num_stages": int,
     "config": str, "shape": "gpt2" | "baby_gpu", "attrs": {(i,): [["tt.divisibility", 16]]}}
("attrs" is optional). Each case is compiled with triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32)) for each arch; sm_90 compiles as sm_90a (wgmma), which
Triton picks for capability 90. Then:
- registers, stack and local bytes (spills) and static shared memory: `cuobjdump -res-usage`;
  the dynamic shared memory Triton asks for at launch: the compiled kernel's metadata;
- tensor-core instructions (HMMA; HGMMA = wgmma on sm_90) and 128-bit global loads
  (LDG.E.128; LDGSTS...128 = cp.async, what pipelined matmuls use): `cuobjdump -sass`;
- occupancy: resident warps per SM from the register, shared-memory, warp and block limits
  of the arch (a kernel that needs more shared memory than a block may have shows 0).
A case or module that fails shows as an error row. Results are cached per process.

Compiling needs a process that imported Triton without TRITON_INTERPRET=1 (under the
interpreter even triton.language's own helpers are interpreter functions), so the CLI drops
that variable; tests run the report in a subprocess.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

# Per-SM limits from the CUDA C Programming Guide's compute-capability table: max resident
# warps and blocks, 32-bit registers, shared memory per SM and the most one block may use.
# CUDA reserves 1 KiB of shared memory per resident block; registers go to warps in 256s.
ARCH_LIMITS = {
    80: dict(gpu="A100", max_warps=64, max_blocks=32, regs=65536, smem=167936, smem_block=166912),
    86: dict(gpu="RTX 30xx/A10", max_warps=48, max_blocks=16, regs=65536, smem=102400, smem_block=101376),
    89: dict(gpu="L4/RTX 40xx", max_warps=48, max_blocks=24, regs=65536, smem=102400, smem_block=101376),
    90: dict(gpu="H100", max_warps=64, max_blocks=32, regs=65536, smem=233472, smem_block=232448),
}
_SMEM_RESERVED_PER_BLOCK = 1024
_REG_UNIT_PER_WARP = 256

_RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


@dataclass
class Row:
    module: str
    kernel: str
    config: str
    shape: str
    arch: str
    num_warps: int = 0
    registers: int = 0
    stack_bytes: int = 0
    local_bytes: int = 0
    spill_bytes: int = 0  # stack + local
    shared_bytes: int = 0  # static (cuobjdump) + dynamic (Triton's launch request)
    tensor_cores: str = "-"  # "HMMA", "HGMMA" or "-"
    ldg128: bool = False
    ldgsts128: bool = False
    blocks_per_sm: int = 0
    warps_per_sm: int = 0
    occupancy: float = 0.0  # warps_per_sm / max resident warps
    limiter: str = ""
    error: str | None = None


def parse_arch(text: str) -> int:
    """"sm_90", "sm_90a" or "90" -> 90."""
    m = re.fullmatch(r"(?:sm_)?(\d+)a?", text.strip().lower())
    if not m or int(m.group(1)) not in ARCH_LIMITS:
        known = ", ".join(f"sm_{cc}" for cc in ARCH_LIMITS)
        raise ValueError(f"unknown arch {text!r}: choose from {known} (sm_90a is sm_90)")
    return int(m.group(1))


def _tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def occupancy(registers: int, shared_bytes: int, num_warps: int, cc: int) -> tuple[int, str]:
    """(resident blocks per SM, the limit that binds) for one block of `num_warps` warps."""
    lim = ARCH_LIMITS[cc]
    if shared_bytes > lim["smem_block"]:
        return 0, f"smem>{lim['smem_block']}"
    regs_per_warp = -(-max(registers, 1) * 32 // _REG_UNIT_PER_WARP) * _REG_UNIT_PER_WARP
    limits = {
        "warps": lim["max_warps"] // num_warps,
        "blocks": lim["max_blocks"],
        "regs": (lim["regs"] // regs_per_warp) // num_warps,
        "smem": lim["smem"] // (shared_bytes + _SMEM_RESERVED_PER_BLOCK),
    }
    binding = min(limits, key=limits.get)
    return limits[binding], binding


def _read_cubin(cubin: bytes) -> tuple[dict, str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True)
    m = _RES_USAGE.search(res.stdout)
    if not m:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line:\n{res.stdout}")
    usage = dict(zip(("registers", "stack", "shared", "local"), map(int, m.groups()), strict=True))
    return usage, sass.stdout


def _jit_function(fn):
    """The JITFunction under @autotune / @heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    while not isinstance(fn, JITFunction) and type(fn).__name__ in ("Autotuner", "Heuristics"):
        fn = fn.fn
    if not isinstance(fn, JITFunction):
        why = (" (it was defined under TRITON_INTERPRET=1: run the report in a process without it)"
               if type(fn).__name__ == "InterpretedFunction" else "")
        raise TypeError(f"{type(fn).__name__} is not a @triton.jit function{why}")
    return fn


def compile_case(case: dict, cc: int, module: str = "", dump_dir: str | None = None) -> Row:
    """Compile one case for compute capability `cc` and read its resources; with `dump_dir`,
    also write the cubin there."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = Row(module=module, kernel=case.get("name", "?"), config=case.get("config", ""),
              shape=case.get("shape", ""), arch=f"sm_{cc}", num_warps=case.get("num_warps", 4))
    try:
        fn = _jit_function(case["fn"])
        src = ASTSource(fn=fn, signature=case["signature"], constexprs=case.get("constexprs"),
                        attrs=case.get("attrs"))
        options = {"num_warps": row.num_warps, "num_stages": case.get("num_stages", 3)}
        kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
        usage, sass = _read_cubin(kernel.asm["cubin"])
    except Exception as e:  # shown as an error row: one broken case must not hide the rest
        row.error = _one_line(e)
        return row
    if dump_dir:
        name = re.sub(r"[^\w.-]+", "_", f"{module}-{row.kernel}-{row.config}-{row.shape}-{row.arch}")
        with open(os.path.join(dump_dir, name + ".cubin"), "wb") as f:
            f.write(kernel.asm["cubin"])
    row.registers = usage["registers"]
    row.stack_bytes, row.local_bytes = usage["stack"], usage["local"]
    row.spill_bytes = usage["stack"] + usage["local"]
    row.shared_bytes = usage["shared"] + int(kernel.metadata.shared)
    row.tensor_cores = "HGMMA" if "HGMMA" in sass else "HMMA" if "HMMA" in sass else "-"
    row.ldg128 = re.search(r"\bLDG\.E[.\w]*\.128\b", sass) is not None
    row.ldgsts128 = re.search(r"\bLDGSTS\.E[.\w]*\.128\b", sass) is not None
    row.blocks_per_sm, row.limiter = occupancy(row.registers, row.shared_bytes, row.num_warps, cc)
    row.warps_per_sm = row.blocks_per_sm * row.num_warps
    row.occupancy = row.warps_per_sm / ARCH_LIMITS[cc]["max_warps"]
    return row


def _import(module: str):
    """A module by dotted name, or by the path of a .py file."""
    if not module.endswith(".py"):
        return importlib.import_module(module)
    spec = importlib.util.spec_from_file_location(os.path.basename(module)[:-3], module)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def discover(kernel: str | None = None, modules: list[str] | None = None):
    """(module name, case) for every report case of `modules` (default: every module of
    tsfast.kernels), and error rows for the modules that fail to import or to list their
    cases. `kernel` keeps the cases whose module or case name starts with it."""
    if modules is None:
        import tsfast.kernels as package

        modules = [f"{package.__name__}.{info.name}" for info in pkgutil.iter_modules(package.__path__)
                   if info.name != "report"]
    cases, errors = [], []
    for module in modules:
        short = os.path.basename(module)[:-3] if module.endswith(".py") else module.rsplit(".", 1)[-1]
        try:
            mod = _import(module)
            listed = mod.report_cases() if hasattr(mod, "report_cases") else []
        except Exception as e:
            if kernel is None or short.startswith(kernel):
                errors.append(Row(module=short, kernel=short, config="", shape="", arch="",
                                  error=_one_line(e)))
            continue
        for case in listed:
            if kernel is None or short.startswith(kernel) or case.get("name", "").startswith(kernel):
                cases.append((short, case))
    return cases, errors


def _one_line(e: Exception) -> str:
    """The exception's type and its most telling line (Triton puts the source position
    first and the message last)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip() and set(ln.strip()) != {"^"}]
    text = lines[0] if len(lines) <= 1 else f"{lines[0]} {lines[-1]}"
    return f"{type(e).__name__}: {text}"[:300]


_cache: dict[tuple, Row] = {}
_tasks: list[tuple[str, dict, int]] = []  # read by forked workers
_dump_dir: str | None = None


def _cache_key(module: str, case: dict, cc: int) -> tuple:
    return (module, id(case["fn"]), case.get("name"), case.get("config"), case.get("shape"),
            repr(sorted(case["signature"].items())), repr(sorted((case.get("constexprs") or {}).items())),
            repr(case.get("attrs")), case.get("num_warps"), case.get("num_stages"), cc)


def _compile_task(i: int) -> dict:
    module, case, cc = _tasks[i]
    return asdict(compile_case(case, cc, module, _dump_dir))


def collect(cases: list[tuple[str, dict]], archs: list[int], jobs: int = 1,
            dump_dir: str | None = None) -> list[Row]:
    """Compile every (case, arch), `jobs` at a time (forked workers), reusing this process's
    earlier results (except when dumping cubins)."""
    global _tasks, _dump_dir
    todo = [(m, c, cc) for m, c in cases for cc in archs if dump_dir or _cache_key(m, c, cc) not in _cache]
    _dump_dir = dump_dir
    if jobs > 1 and len(todo) > 1 and "fork" in multiprocessing.get_all_start_methods():
        _tasks = todo
        with multiprocessing.get_context("fork").Pool(min(jobs, len(todo))) as pool:
            done = [Row(**d) for d in pool.map(_compile_task, range(len(todo)))]
        _tasks = []
    else:
        done = [compile_case(c, cc, m, dump_dir) for m, c, cc in todo]
    for (m, c, cc), row in zip(todo, done, strict=True):
        _cache[_cache_key(m, c, cc)] = row
    return [_cache[_cache_key(m, c, cc)] for m, c in cases for cc in archs]


_HEADER = ("kernel", "config", "shape", "arch", "regs", "spill B", "smem B", "TC", "LDG.128",
           "LDGSTS.128", "warps/SM", "limit")


def format_table(rows: list[Row]) -> str:
    """One line per row, columns as wide as their widest cell; errors after the arch."""
    cells = []
    for r in rows:
        head = [r.kernel, r.config, r.shape, r.arch]
        if r.error:
            cells.append((head, f"ERROR {r.error}"))
            continue
        cells.append((head + [str(r.registers), str(r.spill_bytes), str(r.shared_bytes), r.tensor_cores,
                              "yes" if r.ldg128 else "-", "yes" if r.ldgsts128 else "-",
                              f"{r.warps_per_sm} ({r.occupancy:.0%})", r.limiter], None))
    widths = [max([len(h)] + [len(c[i]) for c, _ in cells if i < len(c)]) for i, h in enumerate(_HEADER)]
    header = "  ".join(h.ljust(w) for h, w in zip(_HEADER, widths, strict=True)).rstrip()
    lines = [header, "-" * len(header)]
    for row_cells, error in cells:
        line = "  ".join(c.ljust(w) for c, w in zip(row_cells, widths, strict=False))
        lines.append((f"{line}  {error}" if error else line).rstrip())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tsfast.kernels.report", description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_80,sm_90", help="comma-separated targets (default sm_80,sm_90)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    ap.add_argument("--kernel", default=None, help="only modules or cases whose name starts with this")
    ap.add_argument("--module", action="append", default=None,
                    help="report on this module (dotted name or .py path) instead of tsfast.kernels; repeatable")
    ap.add_argument("--dump", default=None, metavar="DIR", help="also write each cubin into DIR")
    ap.add_argument("--list", action="store_true", help="list the cases without compiling")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: CPU count)")
    args = ap.parse_args(argv)
    try:
        archs = [parse_arch(a) for a in args.arch.split(",") if a.strip()]
    except ValueError as e:
        ap.error(str(e))
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cases, errors = discover(args.kernel, args.module)
    if not cases and not errors:
        print(f"no report cases found{f' for {args.kernel!r}' if args.kernel else ''}", file=sys.stderr)
        return 1
    if args.list:
        for module, case in cases:
            print(f"{module:<16} {case.get('name', '?'):<28} {case.get('config', ''):<28} {case.get('shape', '')}")
        for row in errors:
            print(f"{row.module:<16} ERROR {row.error}")
        return 1 if errors else 0
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
    rows = errors + collect(cases, archs, jobs=args.jobs, dump_dir=args.dump)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=1))
    else:
        print(format_table(rows))
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    # The interpreter replaces @triton.jit functions with ones that cannot be compiled.
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
