"""Static cost of leanlm's 2:4 kernel on NVIDIA GPUs, measured without one: SASS instructions per weight.

Every candidate tile is compiled ahead of time with triton's own ptxas for sm_80 and sm_90
(`kernels.sparse24.compile_for`), disassembled with cuobjdump, and its main loop (the backward
branch's body) counted. A decode tile must expand the compressed
weight in fewer instructions than the bytes it saves take to arrive; this shows how many it takes,
and the registers and stack each tile needs (a spill shows as stack). It is not a speed: that needs a
GPU (`gpu_sparse24.py`).
    python benchmarks/sass_sparse24.py [--arch 80 90] [--dtype fp16] [--limit N] [--out ...json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import triton

from leanlm.kernels import sparse24 as kernel

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([str(TOOLS / "cuobjdump"), flag, f.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(f.name)


def main_loop(sass: str) -> list[str]:
    """The instructions of the innermost loop: the body of the shortest backward branch."""
    code = [(int(a, 16), text.strip()) for a, text in INSTRUCTION.findall(sass)]
    loops = []
    for address, text in code:
        target = re.search(r"\bBRA\s+(0x[0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    if not loops:
        raise RuntimeError("no loop found in the SASS")
    start, end = min(loops, key=lambda span: span[1] - span[0])
    return [text for address, text in code if start <= address <= end and not text.startswith("NOP")]


def measure(config: kernel.TileConfig, arch: int, dtype: str) -> dict:
    compiled = kernel.compile_for(config, arch, dtype)
    loop = main_loop(cuobjdump(compiled.asm["cubin"], "-sass"))
    usage = re.search(r"REG:(\d+).*?STACK:(\d+)", cuobjdump(compiled.asm["cubin"], "-res-usage"))
    ops = Counter(re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0] for text in loop)
    per_weight = config.num_warps * 32 / (config.block_n * config.block_k)  # threads over a k-step's weights
    return {"tile": f"{config.block_m}x{config.block_n}x{config.block_k}", "split_k": config.split_k,
            "warps": config.num_warps, "stages": config.num_stages, "swap_ab": config.swap_ab,
            "prefetch": config.prefetch, "arch": arch,
            "dtype": dtype, "instructions_per_weight": round(len(loop) * per_weight, 2),
            "tensor_core_per_weight": round((ops["HMMA"] + ops["HGMMA"]) * per_weight, 3),
            "registers": int(usage.group(1)), "stack_bytes": int(usage.group(2)),
            "shared_bytes": compiled.metadata.shared}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 512], help="candidate lists to measure")
    parser.add_argument("--limit", type=int, help="only the first N candidates of each list (a quick check)")
    parser.add_argument("--out", default="benchmarks/results/sass_sparse24.json")
    args = parser.parse_args()
    rows = []
    print(f"{'arch':>4} {'tile':>11} {'split':>5} {'warps':>5} {'stages':>6} {'swap':>5} {'prefetch':>8} "
          f"{'instr/weight':>12} {'regs':>4} {'stack':>5}")
    for arch in args.arch:
        for count in args.rows:
            for config in kernel.candidates(count)[:args.limit]:
                if config.expand_first:  # no loop: one tile per program, then cuBLAS
                    continue
                row = measure(config, arch, args.dtype)
                rows.append(row)
                print(f"{arch:>4} {row['tile']:>11} {row['split_k']:>5} {row['warps']:>5} {row['stages']:>6} "
                      f"{str(row['swap_ab']):>5} {str(row['prefetch']):>8} {row['instructions_per_weight']:>12} "
                      f"{row['registers']:>4} {row['stack_bytes']:>5}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"triton": triton.__version__, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
