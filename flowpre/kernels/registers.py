"""Registers, spills and occupancy of a Triton kernel on a GPU this machine may not have.

A kernel is compiled ahead of time for an NVIDIA arch with the ptxas that ships in
triton's wheel, and cuobjdump reads the cubin's resource usage; no GPU, driver or
CUDA toolkit is needed. Memory-bound kernels live or die by occupancy (the loads a
streaming multiprocessor keeps in flight), and occupancy is set by registers per
thread, so this is the first thing to check before a kernel change reaches a GPU.

    resources(kernel, args, constexprs, num_warps, arch=90)
      -> {"registers", "stack_bytes", "shared_bytes", "blocks_per_sm", "warps_per_sm",
          "global_loads_by_bytes"}
    resident_programs(compiled, num_warps): the same occupancy for a kernel compiled on
      the GPU (flowpre/kernels/adaln.py sizes its backward grid with it)

args gives each runtime argument as a launch would: a pointer as its type ("*bf16"),
taken to be 16-byte aligned like every torch allocation, an integer or float as its
value. Triton's JIT specialises on those values (integers divisible by 16 are marked
so, which is what lets it vectorise loads), and so does this compile: without that the
same kernel comes out with 2-byte loads and different register counts.

Triton kernels keep no local arrays, so a non-zero stack frame is registers spilled to
local memory: slow, and the thing to rule out first.
"""
import os
import re
import subprocess
import tempfile

import triton

# Per streaming multiprocessor (CUDA occupancy calculator figures): sm_80 A100, sm_90 H100/H200.
SM_LIMITS = {80: dict(registers=65536, warps=64, blocks=32, shared=164 * 1024),
             90: dict(registers=65536, warps=64, blocks=32, shared=228 * 1024)}
_REG_UNIT = 256  # registers are allocated per warp in units of 256


def _tool(name):
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise RuntimeError(f"{path} is missing: this triton wheel does not bundle the NVIDIA tools")
    return path


def available():
    """Whether this triton install can compile for NVIDIA offline (it bundles ptxas)."""
    try:
        _tool("ptxas")
        _tool("cuobjdump")
        return True
    except RuntimeError:
        return False


def occupancy(registers, shared_bytes, num_warps, arch=90):
    """Resident programs (thread blocks) per SM, by registers, warps, blocks and shared memory."""
    lim = SM_LIMITS[arch]
    per_warp = -(-registers * 32 // _REG_UNIT) * _REG_UNIT
    by_regs = lim["registers"] // (per_warp * num_warps)
    by_shared = lim["shared"] // shared_bytes if shared_bytes else lim["blocks"]
    return min(lim["blocks"], lim["warps"] // num_warps, by_regs, by_shared)


def _specialise(fn, args, constexprs):
    """signature, constexprs and attributes as triton's JIT derives them from argument values."""
    missing = set(fn.arg_names) - set(args) - set(constexprs)
    unknown = (set(args) | set(constexprs)) - set(fn.arg_names)
    if missing or unknown:
        raise ValueError(f"{fn.__name__}: missing arguments {sorted(missing)}, unknown {sorted(unknown)}")
    signature, consts, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(fn.arg_names):
        value = args.get(name)
        if name in constexprs:
            signature[name] = "constexpr"
        elif isinstance(value, str):  # a pointer
            signature[name], attrs[(i,)] = value, [["tt.divisibility", 16]]
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{fn.__name__}: argument {name} must be a pointer type string, an int or a float")
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:  # the JIT turns 1 into a constant
            signature[name], consts[name] = "constexpr", 1
        else:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, consts, attrs


def compile_offline(kernel, args, constexprs, num_warps, arch=90, num_stages=3):
    """Compile `kernel` (a @triton.jit function) for sm_`arch` as a launch with `args` would."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel  # an autotuner or heuristics wrapper holds the jit function as .fn
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        if not hasattr(fn, "fn"):
            raise TypeError(f"{kernel!r} is not a compiled @triton.jit kernel (is TRITON_INTERPRET set?)")
        fn = fn.fn
    signature, consts, attrs = _specialise(fn, args, constexprs)
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                       attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def resources(kernel, args, constexprs, num_warps, arch=90, num_stages=3):
    """Registers, stack, shared memory, occupancy and load widths of compile_offline's result."""
    compiled = compile_offline(kernel, args, constexprs, num_warps, arch, num_stages)
    registers, stack, shared = _cubin_usage(compiled)
    blocks = occupancy(registers, shared, num_warps, arch)
    return {"registers": registers, "stack_bytes": stack, "shared_bytes": shared,
            "blocks_per_sm": blocks, "warps_per_sm": blocks * num_warps,
            "global_loads_by_bytes": _load_widths(compiled.asm["ptx"])}


def resident_programs(compiled, num_warps):
    """Programs of a compiled kernel (what a launch or .warmup returns) that fit on one SM at once."""
    registers, _, shared = _cubin_usage(compiled)
    arch = compiled.metadata.target.arch
    return occupancy(registers, shared, num_warps, arch if arch in SM_LIMITS else 90)


def _cubin_usage(compiled):
    """(registers per thread, stack bytes, shared bytes) of a compiled kernel, read by cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if not found:
        raise RuntimeError(f"no resource usage in cuobjdump's output for {compiled.metadata.name}:\n{usage}")
    registers, stack, shared, local = (int(v) for v in found.groups())
    # Triton's dynamic shared memory is in the metadata, not the cubin
    return registers, stack + local, max(shared, compiled.metadata.shared)


def _load_widths(ptx):
    """{bytes per thread per instruction: count} of the global loads in the PTX; 16 is a
    fully vectorised load, 2 a lone bf16 (an alignment Triton could not prove)."""
    widths = {}
    for ins in re.findall(r"\bld\.global[.\w:]*", ptx):
        parts = ins.split(".")
        lanes = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        bits = next((int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bfus]\d+", p)), 0)
        widths[lanes * bits // 8] = widths.get(lanes * bits // 8, 0) + 1
    return dict(sorted(widths.items()))
