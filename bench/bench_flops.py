"""Benchmark 3: onnxruntime GFLOP/s on the shipped model vs numpy float32 matmul GFLOP/s.

    python -m bench.bench_flops [--model serving_models/pneumonia] [--batch 64] [--threads 0]

FLOPs are counted from the ONNX graph after shape inference: 2*MACs for Conv, Gemm and MatMul (other ops are
ignored, so the model's GFLOP/s is slightly understated). Both sides use the same thread count.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from bench.common import DEFAULT_MODEL, machine, table
from xray_core.package import load_metadata, resolve_version_dir
from xray_core.package import open_session as load_session


def count_flops(model_path: str, batch: int) -> int:
    import onnx
    from onnx import numpy_helper, shape_inference

    model = onnx.load(model_path)
    size = model.graph.input[0].type.tensor_type.shape.dim
    for d in (model.graph.input[0].type.tensor_type.shape.dim[0],):
        d.dim_value = batch
    model = shape_inference.infer_shapes(model)
    shapes = {}
    for vi in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        shapes[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    inits = {i.name: numpy_helper.to_array(i).shape for i in model.graph.initializer}
    shapes.update({k: list(v) for k, v in inits.items()})
    flops = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            w = shapes[node.input[1]]  # (M, C/group, kh, kw)
            out = shapes[node.output[0]]  # (N, M, H, W)
            flops += 2 * int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            a, out = shapes[node.input[0]], shapes[node.output[0]]
            flops += 2 * int(np.prod(out)) * int(a[-1])
    del size
    return flops


def ort_gflops(model_path: str, size: int, batch: int, threads: int, flops: int, repeats: int = 20) -> float:
    session = load_session(model_path, threads)
    x = np.random.default_rng(0).random((batch, size, size, 1), dtype=np.float32)
    session.run(["probability"], {"image": x})
    t0 = time.perf_counter()
    for _ in range(repeats):
        session.run(["probability"], {"image": x})
    return flops * repeats / (time.perf_counter() - t0) / 1e9


def numpy_gflops(n: int = 2048, repeats: int = 10) -> float:
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    b = np.random.default_rng(1).random((n, n), dtype=np.float32)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = all cores)")
    args = p.parse_args(argv)
    vdir = resolve_version_dir(args.model)
    meta = load_metadata(vdir)
    model_path = os.path.join(vdir, "model.onnx")
    size = meta.image_size
    flops = count_flops(model_path, args.batch)
    ort = ort_gflops(model_path, size, args.batch, args.threads, flops)
    mm = numpy_gflops()
    print(f"machine: {machine()}; model {meta.model_id}: {flops / args.batch / 1e6:.1f} MFLOP/image")
    print(table(["what", "GFLOP/s"], [["onnxruntime, batch %d" % args.batch, ort], ["numpy float32 matmul 2048", mm]]))
    print(f"onnxruntime / matmul: {ort / mm:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
