"""torch.compile over the DiT and its fused kernels (custom ops in namespace flowpre).

The kernels run through the Triton interpreter on CPU (conftest.py), where Dynamo and
AOTAutograd see exactly what they see on a GPU: custom ops with fake implementations.
"""
import copy
import sys

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import flowpre.kernels  # noqa: F401 - registers the ops under torch.ops.flowpre
from flowpre.config import ConfigError, load_config
from flowpre.models.dit import build_dit, forward_mode_kernels
from flowpre.train.engine import compile_blocks

from helpers import free_port, launch, metrics, train

KERNELS = ["triton", "torch"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled code and its caches are per process: each test starts from none."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _dit(kernels, depth=2, text=False, time_inputs=1):
    """A small DiT with odd sizes (36 wide, 3 heads of 12, 9 tokens) and no zero weights:
    adaLN-Zero's zeros would hide every branch."""
    torch.manual_seed(0)
    extra = {"text_dim": 20, "text_tokens": 6} if text else {}
    model = build_dit(f"DiT-{depth}x36x3/4", 2, 12, 5, kernels=kernels, time_inputs=time_inputs, **extra)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model


def _inputs(text=False, batch=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 2, 12, 12, generator=g)
    sigma = torch.rand(batch, generator=g)
    cond = torch.randn(batch, 6, 20, generator=g) if text else torch.randint(0, 5, (batch,), generator=g)
    return x, sigma, cond


def _forward_backward(model, inputs):
    out = model(*inputs)
    out.pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kernels", KERNELS)
def test_block_and_dit_have_no_graph_breaks(kernels):
    """One block, and a 2-block DiT forward, trace as one graph each; the DiT's forward and
    backward also compile with fullgraph=True (which raises on any break)."""
    model = _dit(kernels)
    x, sigma, cond = _inputs()
    h = torch.randn(3, 9, 36)
    c = torch.randn(3, 36)
    block = model.blocks[0]
    explained = torch._dynamo.explain(block)(h, c, kernels)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    explained = torch._dynamo.explain(model)(x, sigma, cond)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons

    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    _, grads = _forward_backward(compiled, (x, sigma, cond))
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_text_dit_has_no_graph_breaks():
    """The text model's cross-attention runs the attention op with M != N."""
    model = _dit("triton", text=True)
    explained = torch._dynamo.explain(model)(*_inputs(text=True))
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation_checkpointing"])
def test_compiled_blocks_match_eager(kernels, checkpointing):
    """compile_blocks (what train.compile applies) against eager: outputs and every
    parameter's gradient, with and without activation checkpointing around the blocks."""
    eager = _dit(kernels, depth=3)
    inputs = _inputs()
    want_out, want_grads = _forward_backward(eager, inputs)
    model = copy.deepcopy(eager)
    model.zero_grad(set_to_none=True)
    model.activation_checkpointing = checkpointing
    counter = CompileCounterWithBackend("inductor")
    compile_blocks(model, backend=counter)
    for _ in range(2):  # the second step runs the cached code
        model.zero_grad(set_to_none=True)
        out, grads = _forward_backward(model, inputs)
        torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
        for name, g in want_grads.items():
            torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=name)
    # the first block's input has another layout (from the patch embedding); the rest share one graph
    assert 1 <= counter.frame_count <= 2
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in eager.named_parameters()]


def test_jvp_through_compiled_blocks_leaves_them_compiled():
    """MeanFlow's target takes a JVP through the student under forward_mode_kernels. Dynamo cannot
    trace under torch.func and would then skip the block's code for good; forward_mode_kernels
    runs the blocks eagerly instead, so the training forward after it still compiles."""
    model = _dit("torch", time_inputs=2)
    counter = CompileCounterWithBackend("eager")
    for block in model.blocks:
        block.compile(backend=counter)
    x, sigma, cond = _inputs()
    with forward_mode_kernels(model):
        _, tangent = torch.func.jvp(lambda z: model(z, sigma, cond, sigma_end=sigma / 2), (x,), (torch.ones_like(x),))
    assert torch.isfinite(tangent).all() and counter.frame_count == 0
    model(x, sigma, cond, sigma_end=sigma / 2).sum().backward()
    assert counter.frame_count >= 1


# ----------------------------------------------------------------------------- opcheck
# The ops carry no autograd formula of their own (the autograd.Functions beside them call
# the forward and backward ops), so opcheck's autograd-registration test does not apply.
OPCHECK = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
OPS = torch.ops.flowpre


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_attention(dtype):
    q, k, v = _randn(2, 3, 13, 24, dtype=dtype), _randn(2, 3, 7, 24, dtype=dtype, seed=1), \
        _randn(2, 3, 7, 24, dtype=dtype, seed=2)
    scale = 24 ** -0.5
    torch.library.opcheck(OPS.flash_attention_forward, (q, k, v, scale), test_utils=OPCHECK)
    out, lse = OPS.flash_attention_forward(q, k, v, scale)
    dout = _randn(*out.shape, dtype=dtype, seed=3)
    torch.library.opcheck(OPS.flash_attention_backward, (q, k, v, out, lse, dout, scale),
                          test_utils=OPCHECK)


@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                             (torch.bfloat16, torch.bfloat16)])
def test_opcheck_adaln(dtype, out_dtype):
    """bf16 out from fp32 x is what autocast asks for; y is the (bf16 under autocast) branch output."""
    x, y = _randn(3, 17, 40, dtype=dtype), _randn(3, 17, 40, dtype=out_dtype, seed=1)
    gate, shift, scale = (_randn(3, 40, dtype=dtype, seed=s) for s in (2, 3, 4))
    torch.library.opcheck(OPS.adaln_modulate_forward, (x, shift, scale, 1e-6, out_dtype), test_utils=OPCHECK)
    out, mean, rstd = OPS.adaln_modulate_forward(x, shift, scale, 1e-6, out_dtype)
    dout = _randn(*out.shape, dtype=out_dtype, seed=5)
    torch.library.opcheck(OPS.adaln_modulate_backward, (x, scale, mean, rstd, dout), test_utils=OPCHECK)

    torch.library.opcheck(OPS.gated_residual_adaln_forward, (x, y, gate, shift, scale, 1e-6, out_dtype),
                          test_utils=OPCHECK)
    h, out, mean, rstd = OPS.gated_residual_adaln_forward(x, y, gate, shift, scale, 1e-6, out_dtype)
    dh = _randn(*h.shape, dtype=dtype, seed=6)
    torch.library.opcheck(OPS.gated_residual_adaln_backward, (h, y, gate, scale, mean, rstd, dh, dout),
                          test_utils=OPCHECK)


@pytest.mark.parametrize("pred_dtype,target_dtype", [(torch.float32, torch.float32),
                                                     (torch.bfloat16, torch.float32),
                                                     (torch.bfloat16, torch.bfloat16)])
def test_opcheck_flow_loss(pred_dtype, target_dtype):
    pred, target = _randn(5, 3, 7, dtype=pred_dtype), _randn(5, 3, 7, dtype=target_dtype, seed=1)
    weight, group = torch.rand(5) + 0.5, torch.tensor([0, 2, 1, 0, 2])
    torch.library.opcheck(OPS.flow_loss_forward, (pred, target, weight, group, 3), test_utils=OPCHECK)
    d_total = torch.tensor(1.3)
    torch.library.opcheck(OPS.flow_loss_backward, (pred, target, weight, d_total), test_utils=OPCHECK)


# ----------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from flowpre.data.shards import write_shards

    out = tmp_path_factory.mktemp("digits")
    write_shards("digits", out, shard_size=200, split="train", limit=800)
    return str(out / "train-*.tar")


@pytest.mark.slow  # about 2 minutes: two 2-rank launches
def test_zero2_two_ranks_trains_compiled_like_eager(tmp_path, digits):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    losses = {}
    for compiled in (True, False):
        run = tmp_path / f"compile_{compiled}"
        launch(torchrun + [str(free_port())], run, digits, "deepspeed.zero_stage=2", "train.max_steps=4",
               f"train.compile={str(compiled).lower()}")
        losses[compiled] = torch.tensor([m["loss"] for m in metrics(run)], dtype=torch.float64)
        assert (run / "model.safetensors").is_file()
    assert len(losses[True]) == 4 and torch.isfinite(losses[True]).all()
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=0)
    assert not torch.allclose(losses[True][0], losses[True][-1])  # it trained


def test_compile_with_zero3_is_refused(tmp_path, digits):
    """Refused before anything runs, by both key names (from the file and from the command line)."""
    with pytest.raises(ConfigError, match=r"train\.compile.*deepspeed\.zero_stage=3"):
        load_config(None, ["train.compile=true", "deepspeed.zero_stage=3"])
    assert load_config(None, ["train.compile=true", "deepspeed.zero_stage=2"]).train.compile
    r = train(tmp_path / "run", digits, "train.compile=true", "deepspeed.zero_stage=3", check=False)
    assert r.returncode != 0 and "train.compile" in r.stderr and "deepspeed.zero_stage=3" in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
