"""The aten decomposition of every sparse matmul op, which torch.onnx.export applies on its own."""

from __future__ import annotations

from torch._decomp import register_decomposition

from pyhwp.ops.autograd import MatmulPattern, torch_matmul


def register_matmul_decomposition(op, pattern: MatmulPattern) -> None:
    """Register `op` = torch_matmul(pattern, ...) in torch's global decomposition table.

    Only consumers that ask for that table use it. torch.onnx.export (dynamo) does, so a model
    with sparse layers exports as a decomposed graph: the kept values are scattered into a zero
    weight (ScatterND) before a dense Gemm; the exporter's optimizer folds the index arithmetic
    into int64 position initializers. torch.compile (Inductor) and torch.export /
    ExportedProgram.run_decompositions() keep the op, and with it the sparse kernel.
    """
    n = pattern.n_arrays

    def decomposition(x, *args, transpose_out=False, **extra):
        if len(args) > n + 1:  # graphs leave out transpose_out when it has its default
            transpose_out = args[n + 1]
        return torch_matmul(pattern, x, tuple(args[:n]), args[n], transpose_out)

    register_decomposition(op._opoverload)(decomposition)
