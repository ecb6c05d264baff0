"""Sparse models under torch.compile, torch.export, ONNX export (onnxruntime) and DDP (gloo)."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from sparse_models import DEVICES, PATTERNS, SPARSE_NAMES, TinyNet, sparse_tiny_net, supported_dtype

# Deprecation warnings torch 2.13 raises inside its own compile/export machinery (not from pyhwp).
TORCH_INTERNAL_WARNINGS = [
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.slow
@TORCH_INTERNAL_WARNINGS[1]
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_compile_fullgraph_matches_eager_forward_and_backward(pattern, device):
    torch._dynamo.reset()
    dtype = supported_dtype(pattern, device)
    model, _, _ = sparse_tiny_net(pattern, dtype=dtype, device=device)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break raises
    g = torch.Generator().manual_seed(1)
    for batch in (3, 3):  # the second call reuses the compiled graph
        x = TinyNet().input(batch, g, dtype, device)
        compiled(x).square().sum().backward()
        got = _grads(model)
        model.zero_grad()
        y = model(x)
        y.square().sum().backward()
        want = _grads(model)
        model.zero_grad()
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), y, rtol=1e-5, atol=1e-6)
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-5, msg=n)


@TORCH_INTERNAL_WARNINGS[0]
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_export_keeps_the_sparse_op_and_matches_eager(pattern, device):
    dtype = supported_dtype(pattern, device)
    model, _, _ = sparse_tiny_net(pattern, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(2)
    x = TinyNet().input(3, g, dtype, device)
    ep = torch.export.export(model, (x,))  # static: pyhwp.conv2d runs one GEMM per image
    assert any(str(n.target).startswith("pyhwp.") for n in ep.graph.nodes)
    assert any(str(n.target).startswith("pyhwp.") for n in ep.run_decompositions().graph.nodes)
    x = TinyNet().input(3, g, dtype, device)
    with torch.no_grad():  # eager CSR convs sum per kernel tap, exported ones run im2col: rounding
        torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-5, atol=1e-6)
    # A dynamic batch through the linear layers alone.
    head = model.head
    h = torch.randn(3, 200, generator=g, dtype=dtype).to(device)
    ep = torch.export.export(head, (h,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    for b in (2, 7):
        h = torch.randn(b, 200, generator=g, dtype=dtype).to(device)
        with torch.no_grad():  # eager CSR reads its sliced-ELL copy on AVX-512 CPUs: rounding
            exact = pattern != "csr" or device != "cpu"
            torch.testing.assert_close(ep.module()(h), head(h), rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6)


@pytest.mark.slow
@TORCH_INTERNAL_WARNINGS[0]
@pytest.mark.parametrize("pattern", PATTERNS)
def test_onnx_export_runs_in_onnxruntime(pattern, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, dense, _ = sparse_tiny_net(pattern)
    model.eval()
    x = TinyNet().input(3, torch.Generator().manual_seed(3), torch.float32, "cpu")
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    program.save(str(tmp_path / "model.onnx"))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), options, providers=["CPUExecutionProvider"])
    for batch in (3,):
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-5, atol=1e-5)
    # A decomposed graph: kept values scattered into a zero weight, then a dense product; no
    # initializer is a dense weight.
    graph = program.model_proto.graph
    ops = {node.op_type for node in graph.node}
    assert "ScatterND" in ops and ops & {"Gemm", "MatMul"}, ops
    from onnx import numpy_helper

    stored = [torch.from_numpy(numpy_helper.to_array(i).copy()).reshape(-1) for i in graph.initializer]
    for name in SPARSE_NAMES:
        w = dense.get_submodule(name).weight.detach().reshape(-1)
        assert not any(t.shape == w.shape and torch.equal(t, w) for t in stored), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, pattern: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, _, masks = sparse_tiny_net(pattern, seed=0)
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9, weight_decay=0.1)
        g = torch.Generator().manual_seed(100 + rank)  # each rank sees its own data
        for _ in range(5):
            loss = (ddp(TinyNet().input(4, g)) - 1).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.save({"state": model.state_dict(), "masks": masks,
                    "dense": {n: model.get_submodule(n).weight.to_dense() for n in SPARSE_NAMES}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_gloo_two_processes_keep_masks_identical(tmp_path):
    import torch.multiprocessing as mp

    start, _, _ = sparse_tiny_net("csr", seed=0)
    mp.spawn(_ddp_worker, args=(2, _free_port(), "csr", str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["state"].keys() == r1["state"].keys()
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    for name in SPARSE_NAMES:
        for r in (r0, r1):
            w, mask = r["dense"][name], r["masks"][name]
            assert torch.equal(w != 0, mask), name  # same mask on both ranks, pruned still zero
        assert not torch.equal(r0["dense"][name], start.get_submodule(name).weight.to_dense()), name
