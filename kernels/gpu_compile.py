"""Compile the Triton kernels for NVIDIA GPUs on a machine without one (CI on CPU).

    from dsa_rag.kernels import gpu_compile as gc
    res = gc.compile_case(gc.case("indexer/v32/fp8/prefill"), 90)   # dict: ok, error, shared, regs, spills...

How: the launchers' own `plan()` (kernels/<op>/triton.py) builds the exact kernel arguments and
constexprs of a real call, for every entry of the launcher's per-architecture config table
(`configs()`: the default, and the alternatives DSA_KERNEL_AUTOTUNE=1 may pick; rows `<case>#alt<i>`)
and, for sparse_mla decode, the split-K launch sized by the arch's SM count (SM_COUNT), on `meta`-device tensors (shapes/strides/dtypes, no memory) and a given
`dispatch.Target`; Triton's own JIT binder turns them into the signature, constexprs and
alignment attributes a launch would specialize on (ints == 1 become constexprs, 16-divisible
ints/pointers get tt.divisibility); then `triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))` runs the whole pipeline (TTIR -> TTGIR -> LLVM -> PTX ->
cubin) with the ptxas bundled in the triton wheel (triton/backends/nvidia/bin/ptxas, and
ptxas-blackwell for sm_90+). No GPU or CUDA driver is involved. The ptxas log (`-v`: registers,
spill stores/loads, stack) is captured via TRITON_DUMP_PTXAS_LOG's knob; shared memory is the
compiled kernel's `metadata.shared` (Triton allocates all of it dynamically; ptxas reports 0
static). Under TRITON_INTERPRET=1 (the kernel tests) `@triton.jit` returns interpreter functions:
we rebuild a JITFunction from `.fn` and switch `knobs.runtime.interpret` off during the compile.

Used by tests/kernels/test_compile_gpu.py (a subset, CI) and benchmarks/kernels_compile.py (the
full matrix, report in benchmarks/results/kernels_compile.{json,md}).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re

import torch

from dsa_rag.kernels.dispatch import Target

# Max dynamic shared memory per block (opt-in), bytes: sm_80 (A100) 163 KB, sm_90 (H100) and
# sm_100 (B200) 227 KB (CUDA programming guide, compute capability table).
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}
# Spill bound (bytes of spill stores per thread) for a configuration the dispatch can choose.
# 0 would be ideal; the V3.2 sparse_mla forward with BLOCK_H=64 (sm_80, sm_100) keeps a [64, 512]
# fp32 accumulator and the online-softmax state in 8 warps' registers (>= 200 regs/thread of
# live data vs a 255 cap), so ptxas may spill a little there (sm_90 uses DV_SPLIT=2: 0 spills); a few hundred bytes of spill per
# thread hit L1 and cost a few % (FlashAttention-style kernels tolerate that), while kilobytes
# mean the tile does not fit and the config must change. 1024 B separates the two; the measured
# figures are in benchmarks/results/kernels_compile.md.
SPILL_LIMIT = 1024
MAX_REGS = 255
# SMs of the reference GPU of each arch (A100, H100 SXM, B200): sizes the decode split
# (kernels/sparse_mla/decode.py), so a decode case compiles the split launch a real call makes.
SM_COUNT = {80: 108, 86: 84, 89: 128, 90: 132, 100: 148}


@dataclasses.dataclass(frozen=True)
class Case:
    """One launch the dispatch can make: op, model shape, dtype, phase (decode: T = B rows of one
    query each; op "sparse_mla_combine": the decode split's combine kernel)."""

    name: str
    op: str  # "indexer" | "sparse_mla"
    dtype: torch.dtype
    T: int
    S: int
    H: int
    D: int
    v_dim: int = 0  # sparse_mla
    K: int = 2048  # sparse_mla indices per row
    score: str = "relu"  # indexer
    k_scale: bool = True  # indexer
    gated: bool = True  # False: reported only (the default dispatch does not pick Triton for it)


def cases() -> list[Case]:
    """The matrix: dsa-tiny (model/weights/dsa-tiny/config.json), V3.2 and GLM-5 (32-head
    indexer) shapes, prefill (a 2048-query chunk; the indexer's first 16384-key block, as
    indexer_topk launches it) and decode (T=1), FP8 / bf16 / fp16; fp32 only as ungated rows."""
    bf16, fp16, fp8, f32 = torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float32
    out = []
    for model, H, D, dtypes, score in (
        ("tiny", 8, 64, (bf16,), "mixture"),  # dsa-tiny: softmax_mixture = the mixture kernel
        ("v32", 64, 128, (fp8, bf16), "relu"),
        ("glm5", 32, 128, (fp8, bf16), "relu"),
        ("d16", 4, 16, (fp8,), "relu"),  # a head dim of 16 (tests use it): finding 1, FP8 needs K >= 32
    ):
        for dt in dtypes:
            dn = {bf16: "bf16", fp8: "fp8"}[dt]
            for phase, T, S in (("prefill", 2048, 32768), ("decode", 1, 32768)):
                out.append(Case(f"indexer/{model}/{dn}/{phase}", "indexer", dt, T, S, H, D, score=score,
                                k_scale=dt == fp8))
    out.append(Case("indexer/v32/fp32/prefill", "indexer", f32, 2048, 32768, 64, 128, k_scale=False, gated=False))
    for model, H, D, v in (("tiny", 8, 144, 128), ("tiny-mha", 1, 80, 32), ("v32", 128, 576, 512)):
        for dt in ((bf16, fp16) if model == "v32" else (bf16,)):
            dn = {bf16: "bf16", fp16: "fp16"}[dt]
            # decode = B=1 (T=1), decode-B64 = one call of 64 decode rows: both small grids, so the
            # launch is the split-K one (kernels/sparse_mla/decode.py) with the arch's SM count
            phases = (("prefill", 4096), ("decode", 1)) + ((("decode-B64", 64),) if model != "tiny-mha" else ())
            for phase, T in phases:
                K = 256 if model.startswith("tiny") else 2048
                out.append(Case(f"sparse_mla/{model}/{dn}/{phase}", "sparse_mla", dt, T, 65536, H, D, v, K))
    out.append(Case("sparse_mla/v32/fp32/prefill", "sparse_mla", f32, 4096, 65536, 128, 576, 512, gated=False))
    for model, H, v, T, splits in (("tiny", 8, 128, 1, 2), ("v32", 128, 512, 1, 16), ("v32", 128, 512, 64, 2)):
        out.append(Case(f"sparse_mla_combine/{model}/bf16/decode-B{T}", "sparse_mla_combine", bf16, T, splits, H,
                        0, v, K=splits))  # S field = the split count
    return out


def case(name: str) -> Case:
    return next(c for c in cases() if c.name == name)


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _configs(mod, op: str, c: Case, dtype, target: Target) -> list:
    """The launcher's config table for case `c` (an older launcher without `configs`: its one config)."""
    if op == "indexer":
        return mod.configs(c.D, dtype, target) if hasattr(mod, "configs") else [None]
    return mod.configs(c.H, c.v_dim, c.D, c.dtype, target) if hasattr(mod, "configs") else [None]


def variants(c: Case, target: Target, modules: dict | None = None) -> int:
    """How many configs the launcher's table holds for case `c` on `target` (all are compiled)."""
    if c.op == "sparse_mla_combine":
        return 1
    return len(launch_of(c, target, modules, variant=None))


def launch_of(c: Case, target: Target, modules: dict | None = None, variant: int | None = 0):
    """(kernel, args, kwargs) of the launch the op makes for case `c` on `target` with entry
    `variant` of the launcher's config table (0 = the default; None: the table itself), from the
    launcher's own _prep/plan. `modules` swaps in other launcher modules (benchmarks/kernels_compile.py
    --ref: an older version with the same plan() interface)."""
    if c.op == "indexer":
        from dsa_rag.kernels.indexer import triton as mod
        mod = (modules or {}).get("indexer", mod)
        q, k = _meta(c.T, c.H, c.D, dtype=c.dtype), _meta(c.S, c.D, dtype=c.dtype)
        w, ks = _meta(c.T, c.H), (_meta(c.S) if c.k_scale else None)
        q, k, w, cast = mod._prep(q, k, w, target)
        table = _configs(mod, "indexer", c, q.dtype, target)
        if variant is None:
            return table
        T_CHUNK, S_BLOCK = 2048, 16384  # indexer_topk's CUDA chunking (first launch of a call)
        t1, s_hi = min(c.T, T_CHUNK), min(c.S, S_BLOCK)
        buf = _meta(T_CHUNK, S_BLOCK)
        extra = (table[variant],) if table[variant] is not None else ()
        grid, args, kwargs = mod.plan(q, k, w, ks, buf, c.S - c.T, 0, t1, 0, s_hi, cast, c.score, target, *extra)
        return mod._logits_kernel, args, kwargs
    if c.op == "sparse_mla_combine":
        from dsa_rag.kernels.sparse_mla import decode
        o_part, lse_part = _meta(c.T, c.S, c.H, c.v_dim), _meta(c.T, c.S, c.H)
        grid, args, kwargs = decode.combine_plan(o_part, lse_part, _meta(c.T, c.H, c.v_dim, dtype=c.dtype),
                                                 _meta(c.T, c.H))
        return decode._combine_kernel, args, kwargs
    from dsa_rag.kernels.sparse_mla import triton as mod
    mod = (modules or {}).get("sparse_mla", mod)
    table = _configs(mod, "sparse_mla", c, c.dtype, target)
    if variant is None:
        return table
    q, kv = _meta(c.T, c.H, c.D, dtype=c.dtype), _meta(c.S, c.D, dtype=c.dtype)
    idx = _meta(c.T, c.K, dtype=torch.int32)
    out, lse = _meta(c.T, c.H, c.v_dim, dtype=c.dtype), _meta(c.T, c.H)
    cfg = table[variant]
    if cfg is None:  # an older launcher: plan() picks its one config, no decode split
        grid, args, kwargs = mod.plan(q, kv, idx, out, lse, c.v_dim, 0.1, target)
        return mod._fwd_kernel, args, kwargs
    programs = c.T * -(-c.H // cfg["BLOCK_H"]) * cfg["DV_SPLIT"]
    splits, _ = mod.decode.split_plan(programs, c.K, cfg["BLOCK_K"], target)
    if splits > 1:  # the split launch writes fp32 partials [T, splits, H, v] (decode.partials)
        out, lse = _meta(c.T, splits, c.H, c.v_dim), _meta(c.T, splits, c.H)
    grid, args, kwargs = mod.plan(q, kv, idx, out, lse, c.v_dim, 0.1, target, cfg, splits)
    return mod._fwd_kernel, args, dict(kwargs, NUM_SPLITS=splits)


@contextlib.contextmanager
def _compile_mode():
    from triton import knobs
    saved = (knobs.runtime.interpret, knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile)
    knobs.runtime.interpret, knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = False, True, True
    try:
        yield
    finally:
        knobs.runtime.interpret, knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved


def compile_launch(kernel, args, kwargs, arch: int):
    """triton.compile of `kernel` specialized on (args, kwargs) exactly as a launch would be, for
    sm_<arch>. Returns (CompiledKernel, ptxas -v log). Raises Triton's compile errors."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    jf = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(jf.signature, jf.params, backend)
    kwargs = dict(kwargs, debug=False)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jf._pack_args(backend, kwargs, bound, spec, opts)
    log = io.StringIO()
    with _compile_mode(), contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(jf, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    return compiled, log.getvalue()


def parse_ptxas(log: str) -> dict:
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.findall(r"(\d+) bytes stack frame", log)
    return dict(regs=int(regs[-1]) if regs else None,
                spill_stores=int(spills[-1][0]) if spills else None,
                spill_loads=int(spills[-1][1]) if spills else None,
                stack=int(stack[-1]) if stack else None)


def mma_shapes(ptx: str) -> list[str]:
    """Distinct tensor-core instructions in the PTX (wgmma on sm_90, mma.sync on sm_80, tcgen05.mma on sm_100)."""
    found = re.findall(r"(wgmma\.mma_async\.sync\.aligned\.m\d+n\d+k\d+\.[\w.]+|(?<!w)mma\.sync\.aligned\.m\d+n\d+k\d+[\w.]*|tcgen05\.mma\.[\w.:]+)", ptx)
    return sorted(set(found))


def mma_counts(ptx: str) -> dict:
    """How many times each tensor-core instruction shape appears in the PTX text (the loop body is
    emitted once, so for a kernel with one dot loop: instructions per iteration per warp; e.g.
    V3.2 sparse_mla QK^T over D = 576: 36 k-steps of k16 per N tile)."""
    found = re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)|(?<!w)mma\.sync\.aligned\.(m\d+n\d+k\d+)", ptx)
    out: dict = {}
    for a, b in found:
        out[a or b] = out.get(a or b, 0) + 1
    return dict(sorted(out.items()))


def target_for(arch: int) -> Target:
    return Target("cuda", (arch // 10, arch % 10), SM_COUNT.get(arch, 132))


def case_name(c: Case, variant: int) -> str:
    """Row name: the case, `#alt<i>` for entry i > 0 of the launcher's config table."""
    return c.name if variant == 0 else f"{c.name}#alt{variant}"


def compile_case(c: Case, arch: int, modules: dict | None = None, keep=False, variant: int = 0) -> dict:
    """Compile case `c` (config table entry `variant`) for sm_<arch>; dict with ok, error, shared,
    regs, spills, mma, limits, violations."""
    target = target_for(arch)
    res = dict(case=case_name(c, variant), arch=f"sm_{arch}", gated=c.gated, ok=False, error=None)
    try:
        kernel, args, kwargs = launch_of(c, target, modules, variant)
        res["config"] = {k: v for k, v in kwargs.items() if k.isupper() or k.startswith("num_")}
        kwargs = {k: v for k, v in kwargs.items() if k != "NUM_SPLITS"}  # reported only, not a kernel arg
        compiled, log = compile_launch(kernel, args, kwargs, arch)
    except Exception as exc:  # noqa: BLE001 - every compile failure is a finding
        msg = str(exc).strip().splitlines()
        key = [ln for ln in msg if "K >=" in ln or "error" in ln.lower() or "Error" in ln]
        res["error"] = f"{type(exc).__name__}: {(key or msg or [''])[-1][:300]}"
        return res
    res.update(ok=True, shared=compiled.metadata.shared, smem_limit=SMEM_LIMIT[arch], **parse_ptxas(log),
               mma=mma_shapes(compiled.asm["ptx"]), mma_count=mma_counts(compiled.asm["ptx"]))
    viol = []
    if res["shared"] > res["smem_limit"]:
        viol.append(f"shared {res['shared']} B > {res['smem_limit']} B")
    if (res["spill_stores"] or 0) > SPILL_LIMIT:
        viol.append(f"spill stores {res['spill_stores']} B > {SPILL_LIMIT} B")
    res["violations"] = viol
    if keep:
        res["compiled"] = compiled
    return res


def launch_report(kernel, args, kwargs, arch: int, **fields) -> dict:
    """`fields` plus the compile of one launch for sm_<arch>: ok / error, the launch's config
    (constexprs and num_*), shared memory, ptxas registers and spills, mma shapes and counts, TTGIR
    stores to shared memory inside loops and int32 row-offset multiplies in the TTIR. For kernels
    outside the Case matrix (their compile tests build the launch with the module's own plan())."""
    r = dict(fields, arch=arch, config={k: v for k, v in kwargs.items() if k.isupper() or k.startswith("num_")})
    try:
        compiled, log = compile_launch(kernel, args, kwargs, arch)
    except Exception as exc:  # noqa: BLE001 - reported by the caller's test
        return dict(r, ok=False, error=f"{type(exc).__name__}: {str(exc).strip()[-300:]}")
    ptx = compiled.asm["ptx"]
    return dict(r, ok=True, shared=compiled.metadata.shared, **parse_ptxas(log), mma=mma_shapes(ptx),
                mma_count=mma_counts(ptx), loop_smem_stores=loop_smem_stores(compiled.asm["ttgir"]),
                i32_offset_muls=i32_offset_muls(compiled.asm["ttir"]))


def reports_from_child(script: str) -> list[dict]:
    """Run `script` (a compile test file whose __main__ prints a JSON list of launch_report dicts
    as its last line) in a child process without TRITON_INTERPRET: the interpreter, once imported,
    breaks the real compiler in the same process."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, script], env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# --- TTIR check: query-row offsets in int64 --------------------------------------------------

def i32_offset_muls(ttir: str) -> list[str]:
    """`arith.muli` lines of the TTIR that multiply a value derived from tl.program_id(0) (the
    query row / query tile axis of both kernels) by one derived from a `stride_*` argument in
    i32: those wrap once t * stride >= 2^31. Empty when every such offset is computed in i64."""
    taint_pid, taint_stride, bad = set(), set(), []
    for line in ttir.splitlines():
        m = re.match(r"\s*(%[\w.#]+)(?::\d+)? = ([\w.]+)\s*(.*)", line)
        if not m:
            continue
        res, op, rest = m.groups()
        body = rest.split(" loc(")[0]
        operands = re.findall(r"%[\w.#]+", body.split(" : ")[0] if op != "tt.get_program_id" else "")
        if op == "tt.get_program_id" and body.startswith("x"):
            taint_pid.add(res)
        if any(o in taint_pid for o in operands):
            taint_pid.add(res)
        if any(o in taint_stride or o.startswith("%stride_") for o in operands):
            taint_stride.add(res)
        if op == "arith.muli" and res in taint_pid and res in taint_stride:
            rtype = body.rsplit(" : ", 1)[-1]
            if not re.search(r"\bi64\b|xi64>", rtype):
                bad.append(line.strip().split(" loc(")[0])
    return bad


def loop_smem_stores(ttgir: str) -> int:
    """Register -> shared-memory stores (`ttg.local_alloc %value`, `ttg.local_store`) inside scf.for
    bodies of the TTGIR: a loop-invariant operand staged there is re-stored on every iteration
    (the FP8 indexer's key tile, once per head, before fix 4). cp.async copies (pipelined loads)
    are not counted."""
    n, depth = 0, 0
    for line in ttgir.splitlines():
        if depth == 0 and "scf.for" in line and line.rstrip().endswith("{"):
            depth = 1
            continue
        if depth:
            if re.search(r"ttg\.local_alloc %|ttg\.local_store ", line):
                n += 1
            depth += line.count("{") - line.count("}")
    return n


# --- BEFORE figures: the launchers of a git revision without plan()/launch_config ------------

def modules_from_ref(ref: str) -> dict:
    """Launcher modules of git revision `ref` (read-only `git show`) with plan()/_prep adapters
    transcribing that revision's launch logic when it predates launch_config (HEAD before this
    change: indexer BLOCK_D = max(16, D), FP8 DOT_CAST 0 on sm_89+ else 1 (in-register bf16),
    fp32 IEEE dots; sparse_mla the same block sizes as now)."""
    import importlib.util
    import pathlib
    import subprocess
    import tempfile
    import types

    import triton

    root = pathlib.Path(__file__).resolve().parents[1]
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="kernels_ref_"))
    mods = {}
    for op in ("indexer", "sparse_mla"):
        src = subprocess.run(["git", "show", f"{ref}:kernels/{op}/triton.py"], cwd=root, check=True,
                             capture_output=True, text=True).stdout
        path = tmp / f"ref_{op}_triton.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location(f"ref_{op}_triton", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        if hasattr(mod, "plan"):
            mods[op] = mod
            continue
        ad = types.SimpleNamespace()
        if op == "indexer":
            def _prep(q, k, w, target, mod=mod):
                fp8 = q.dtype.itemsize == 1
                cast = (0 if target.fp8_dot else 1) if fp8 else 0
                if not fp8 and q.dtype != k.dtype:
                    q, k = q.float(), k.float()
                return q, k, w.float(), cast

            def plan(q, k, w, k_scale, out, start_pos, t0, t1, s_lo, s_hi, cast, score, target):
                T, H, D = q.shape
                qs, ws = q[t0:t1], w[t0:t1]
                ks = k_scale if k_scale is not None else w
                args = (qs, k, ws, ks, out, t1 - t0, H, D, start_pos + t0, s_lo, s_hi,
                        qs.stride(0), qs.stride(1), k.stride(0), ws.stride(0), out.stride(0))
                kw = dict(HAS_KS=k_scale is not None, DOT_CAST=cast, IEEE=q.dtype == torch.float32,
                          MIXTURE=score == "mixture", BLOCK_T=64, BLOCK_S=64,
                          BLOCK_D=max(16, triton.next_power_of_2(D)), num_warps=4, num_stages=2)
                return None, args, kw
            ad._prep, ad.plan, ad._logits_kernel = _prep, plan, mod._logits_kernel
        else:
            def plan(q, kv, indices, out, lse, v_dim, scale, target):
                from dsa_rag.kernels.sparse_mla.triton import launch_config
                T, H, D = q.shape
                cfg = launch_config(H, v_dim, D, q.dtype, target)  # same block logic at HEAD
                args = (q, kv, indices, out, lse, H, indices.shape[1], v_dim, D - v_dim, kv.shape[0], scale * 1.4426950408889634,
                        q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), out.stride(0), out.stride(1), lse.stride(0))
                return None, args, cfg
            ad.plan, ad._fwd_kernel = plan, mod._fwd_kernel
        mods[op] = ad
    return mods


def run_matrix(names=None, archs=(90, 80), ref=None, ttir_check=False, subprocess_ok=True,
               all_variants=True) -> list[dict]:
    """compile_case over cases x archs x the launchers' config-table entries (all_variants=False:
    the defaults only). Under TRITON_INTERPRET=1 (or `subprocess_ok` and a parent
    that imported triton in interpreter mode) the work runs in a child process without it: the
    interpreter patches triton.language globally while a jit function runs, which breaks the
    compiler in the same process (and the compile would disturb later interpreter tests)."""
    import json
    import os
    import subprocess
    import sys

    if os.environ.get("TRITON_INTERPRET") == "1":
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        cmd = [sys.executable, "-m", "dsa_rag.kernels.gpu_compile", "--archs", ",".join(map(str, archs))]
        if names:
            cmd += ["--cases", ",".join(names)]
        if ref:
            cmd += ["--ref", ref]
        if ttir_check:
            cmd += ["--ttir-check"]
        if not all_variants:
            cmd += ["--defaults-only"]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    modules = modules_from_ref(ref) if ref else None
    todo = [c for c in cases() if names is None or c.name in names]
    results = []
    for c in todo:
        for arch in archs:
            try:
                n = variants(c, target_for(arch), modules)
            except Exception:  # noqa: BLE001 - compile_case reports the failure of entry 0
                n = 1
            for v in range(n if all_variants else 1):
                r = compile_case(c, arch, modules, keep=ttir_check, variant=v)
                compiled = r.pop("compiled", None)
                if ttir_check and compiled is not None:
                    r["i32_offset_muls"] = i32_offset_muls(compiled.asm["ttir"])
                    r["loop_smem_stores"] = loop_smem_stores(compiled.asm["ttgir"])
                results.append(r)
    return results


def main(argv=None):
    import argparse
    import json
    import os

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    ap = argparse.ArgumentParser(description="compile the Triton kernels for NVIDIA targets (no GPU needed)")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--archs", default="90,80")
    ap.add_argument("--ref", default=None, help="git revision of kernels/*/triton.py to compile instead")
    ap.add_argument("--ttir-check", action="store_true")
    ap.add_argument("--defaults-only", action="store_true", help="only each config table's first entry")
    a = ap.parse_args(argv)
    names = [n for n in a.cases.split(",") if n] or None
    res = run_matrix(names, tuple(int(x) for x in a.archs.split(",")), a.ref, a.ttir_check,
                     all_variants=not a.defaults_only)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
