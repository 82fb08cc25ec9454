"""Fused flow-matching loss: per-sample weighted MSE with per-group means.

pred, target: (B, ...) any trailing shape; weight: (B,) float; group: (B,) int64 in
[0, num_groups). Returns (total, group_losses):
  m_i           = mean over sample i's elements of (pred_i - target_i)^2
  total         = sum_i weight_i * m_i / B                       (differentiable)
  group_losses  = (num_groups,), mean of weight_i * m_i over the samples of each
                  group, 0 for an empty group                     (for logging, no grad)

Triton path: one pass over pred/target writes per-(sample, chunk) partial sums, and a
one-program kernel finishes m_i, total and group_losses from them in a fixed order
(deterministic, no atomics, no host sync). The backward is one pass writing
dpred = 2 (pred - target) weight_i / (B numel_i) * d_total.
pred and target may differ in dtype: a bf16 prediction is read as it is and accumulated
in fp32, so the caller need not make an fp32 copy of it first; dpred comes back in
pred's dtype, dtarget in target's.
The Triton path validates its inputs (ValueError naming the argument); the torch path
is the reference itself. total is fp32 (fp64 for float64 inputs, which exist for gradcheck); group_losses fp32.
Group ids are range-checked on CPU only; on CUDA an id outside [0, num_groups) is
silently left out of group_losses (checking would need a device sync). It still
counts in total.
"""
import torch
import triton
import triton.language as tl

from .backend import use_triton

MAX_GROUPS = 4096  # the finishing kernel keeps one accumulator per group in registers


def flow_loss_reference(pred, target, weight, group, num_groups):
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1) * weight.float()
    total = per_sample.sum() / pred.shape[0]
    with torch.no_grad():
        sums = torch.zeros(num_groups, device=pred.device).index_add_(0, group, per_sample.detach())
        counts = torch.bincount(group, minlength=num_groups).clamp_min(1)
        group_losses = sums / counts
    return total, group_losses


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _sq_err_kernel(P, T, PART, M, n_chunks, tiles_per_prog, BLOCK: tl.constexpr, ACC: tl.constexpr):
    # program (chunk, b): sum of squared errors over one contiguous chunk of sample b
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    base = b.to(tl.int64) * M
    acc = tl.zeros([BLOCK], dtype=ACC)
    for t in range(0, tiles_per_prog):
        idx = (chunk * tiles_per_prog + t) * BLOCK + tl.arange(0, BLOCK)
        ok = idx < M
        p = tl.load(P + base + idx, mask=ok, other=0.0).to(ACC)
        q = tl.load(T + base + idx, mask=ok, other=0.0).to(ACC)
        acc += (p - q) * (p - q)
    tl.store(PART + b * n_chunks + chunk, tl.sum(acc, axis=0))


@triton.jit
def _finish_kernel(PART, WEIGHT, GROUP, TOTAL, GROUPS, MEANS, B, M, n_chunks, G,
                   BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
                   ACC: tl.constexpr):
    # a single program: B is a batch size, so this is a few microseconds of work and
    # saves the half dozen tiny torch launches the reference's epilogue costs
    gs = tl.arange(0, BLOCK_G)
    g_sum = tl.zeros([BLOCK_G], dtype=ACC)
    g_cnt = tl.zeros([BLOCK_G], dtype=ACC)
    total = tl.zeros([BLOCK_B], dtype=ACC)
    for b0 in range(0, B, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        b_ok = bs < B
        s = tl.zeros([BLOCK_B], dtype=ACC)
        for k0 in range(0, n_chunks, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            mask = b_ok[:, None] & (ks < n_chunks)[None, :]
            s += tl.sum(tl.load(PART + bs[:, None] * n_chunks + ks[None, :], mask=mask, other=0.0), axis=1)
        m = s / M
        tl.store(MEANS + bs, m, mask=b_ok)
        wm = tl.load(WEIGHT + bs, mask=b_ok, other=0.0).to(ACC) * m
        total += wm
        grp = tl.load(GROUP + bs, mask=b_ok, other=-1)
        hit = grp[:, None] == gs[None, :]
        g_sum += tl.sum(tl.where(hit, wm[:, None], 0.0), axis=0)
        g_cnt += tl.sum(hit.to(ACC), axis=0)
    tl.store(TOTAL, tl.sum(total, axis=0) / B)
    mean_g = tl.where(g_cnt > 0, g_sum / tl.maximum(g_cnt, 1.0), 0.0)
    tl.store(GROUPS + gs, mean_g.to(GROUPS.dtype.element_ty), mask=gs < G)


@triton.jit
def _loss_bwd_kernel(P, T, WEIGHT, GRAD, DPRED, B, M, BLOCK: tl.constexpr, ACC: tl.constexpr):
    blk = tl.program_id(0)
    b = tl.program_id(1)
    idx = blk * BLOCK + tl.arange(0, BLOCK)
    ok = idx < M
    base = b.to(tl.int64) * M
    # d_total is read from device memory, so the backward never syncs with the host
    one = tl.full([], 1.0, ACC)
    coef = 2.0 * tl.load(WEIGHT + b).to(ACC) * tl.load(GRAD).to(ACC) / (one * B * M)
    p = tl.load(P + base + idx, mask=ok, other=0.0).to(ACC)
    q = tl.load(T + base + idx, mask=ok, other=0.0).to(ACC)
    tl.store(DPRED + base + idx, ((p - q) * coef).to(DPRED.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- launchers

def _acc_dtype(*dtypes):
    return (tl.float64, torch.float64) if torch.float64 in dtypes else (tl.float32, torch.float32)


def _block(M):
    block = min(4096, max(128, triton.next_power_of_2(M)))
    return block, (8 if block >= 4096 else 4)


def _check(pred, target, weight, group, num_groups):
    if pred.dim() < 2:
        raise ValueError(f"pred must be (B, ...) with at least one trailing dim, got shape {tuple(pred.shape)}")
    for name, t in (("pred", pred), ("target", target)):
        if t.dtype not in _FLOATS:
            raise ValueError(f"{name} has unsupported dtype {t.dtype}")
    if target.shape != pred.shape:
        raise ValueError(f"target shape {tuple(target.shape)} != pred shape {tuple(pred.shape)}")
    B = pred.shape[0]
    if pred.numel() == 0:  # the reference's mean over nothing is NaN; say why instead
        raise ValueError(f"pred has no elements (shape {tuple(pred.shape)}): a loss over no samples "
                         f"or no values per sample is undefined")
    if not weight.is_floating_point() or tuple(weight.shape) != (B,):
        raise ValueError(f"weight must be a float tensor of shape ({B},), got {weight.dtype} {tuple(weight.shape)}")
    if group.dtype != torch.int64 or tuple(group.shape) != (B,):
        raise ValueError(f"group must be an int64 tensor of shape ({B},), got {group.dtype} {tuple(group.shape)}")
    if not 1 <= num_groups <= MAX_GROUPS:
        raise ValueError(f"num_groups must be in [1, {MAX_GROUPS}], got {num_groups}")
    if group.is_cuda or torch.compiler.is_compiling():
        return  # a range check there would sync with the host (or break the graph)
    if int(group.min()) < 0 or int(group.max()) >= num_groups:
        raise ValueError(f"group ids must lie in [0, {num_groups}), got [{int(group.min())}, {int(group.max())}]")


_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _programs_wanted(device):
    if device.type == "cuda":
        return 8 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def flow_loss_forward(pred, target, weight, group, num_groups, total=None, group_losses=None, means=None):
    """Launch the forward kernels. Returns (total, group_losses, means) with means (B,)
    the unweighted per-sample MSE. Buffers passed in are written in full."""
    B = pred.shape[0]
    p, t = pred.reshape(B, -1).contiguous(), target.reshape(B, -1).contiguous()
    M = p.shape[1]
    acc_tl, acc_torch = _acc_dtype(pred.dtype, target.dtype)
    block, num_warps = _block(M)
    tiles = triton.cdiv(M, block)
    chunks_wanted = max(1, min(tiles, triton.cdiv(_programs_wanted(pred.device), B)))
    tiles_per_prog = triton.cdiv(tiles, chunks_wanted)
    n_chunks = triton.cdiv(tiles, tiles_per_prog)
    part = torch.empty((B, n_chunks), device=pred.device, dtype=acc_torch)
    _sq_err_kernel[(n_chunks, B)](p, t, part, M, n_chunks, tiles_per_prog,
                                  BLOCK=block, ACC=acc_tl, num_warps=num_warps)

    total = torch.empty((), device=pred.device, dtype=acc_torch) if total is None else total
    if group_losses is None:
        group_losses = torch.empty(num_groups, device=pred.device, dtype=torch.float32)
    means = torch.empty(B, device=pred.device, dtype=acc_torch) if means is None else means
    block_g = triton.next_power_of_2(num_groups)
    block_b = max(1, min(128, 4096 // block_g))
    # BLOCK_K <= 32: 128 samples x 64 chunks of partial sums spill registers (ptxas, sm_80 and sm_90)
    _finish_kernel[(1,)](part, weight.contiguous(), group.contiguous(), total, group_losses, means,
                         B, M, n_chunks, num_groups, BLOCK_B=block_b,
                         BLOCK_K=min(32, triton.next_power_of_2(n_chunks)), BLOCK_G=block_g,
                         ACC=acc_tl, num_warps=4)
    return total, group_losses, means


def flow_loss_backward(pred, target, weight, d_total, dpred=None):
    """dpred = 2 (pred - target) weight_i / (B numel_i) * d_total, shaped like pred."""
    B = pred.shape[0]
    p, t = pred.reshape(B, -1).contiguous(), target.reshape(B, -1).contiguous()
    M = p.shape[1]
    dpred = torch.empty_like(p) if dpred is None else dpred
    acc_tl, _ = _acc_dtype(pred.dtype, target.dtype)
    block, num_warps = _block(M)
    _loss_bwd_kernel[(triton.cdiv(M, block), B)](p, t, weight.contiguous(), d_total.contiguous(), dpred, B, M,
                                                 BLOCK=block, ACC=acc_tl, num_warps=num_warps)
    return dpred.view(pred.shape)


# ----------------------------------------------------------------------------- custom ops
# Registered with torch.library so torch.compile keeps them in its graph instead of
# breaking around them; the fake implementations mirror the launchers' outputs.

@torch.library.custom_op("flowpre::flow_loss_forward", mutates_args=())
def flow_loss_forward_op(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, group: torch.Tensor,
                         num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, group_losses, means): means (B,) is the unweighted per-sample MSE."""
    return flow_loss_forward(pred, target, weight, group, num_groups)


@flow_loss_forward_op.register_fake
def _(pred, target, weight, group, num_groups):
    acc = _acc_dtype(pred.dtype, target.dtype)[1]
    return (pred.new_empty((), dtype=acc), pred.new_empty((num_groups,), dtype=torch.float32),
            pred.new_empty(pred.shape[:1], dtype=acc))


@torch.library.custom_op("flowpre::flow_loss_backward", mutates_args=())
def flow_loss_backward_op(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                          d_total: torch.Tensor) -> torch.Tensor:
    return flow_loss_backward(pred, target, weight, d_total)


@flow_loss_backward_op.register_fake
def _(pred, target, weight, d_total):
    return pred.new_empty(pred.shape)


class FlowLoss(torch.autograd.Function):
    """The ops' autograd, in the setup_context style that torch.func transforms need.
    apply(pred, target, weight, group, num_groups) -> (total, group_losses, means);
    only total is differentiable."""

    @staticmethod
    def forward(pred, target, weight, group, num_groups):
        return flow_loss_forward_op(pred, target, weight, group, num_groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pred, target, weight, _, _ = inputs
        _, group_losses, means = output
        ctx.mark_non_differentiable(group_losses, means)
        ctx.save_for_backward(pred, target, weight, means)

    @staticmethod
    def backward(ctx, d_total, _d_groups, _d_means):
        pred, target, weight, means = ctx.saved_tensors
        need_pred, need_target, need_weight = ctx.needs_input_grad[:3]
        dpred = dtarget = dweight = None
        if need_pred or need_target:
            dpred = flow_loss_backward_op(pred, target, weight, d_total)
            dtarget = (-dpred).to(target.dtype) if need_target else None
            dpred = dpred if need_pred else None
        if need_weight:
            dweight = (means * d_total / pred.shape[0]).to(weight.dtype)
        return dpred, dtarget, dweight, None, None


def flow_loss(pred, target, weight, group, num_groups, backend="auto"):
    """(total, group_losses); pred and target may be any float dtypes (accumulated in fp32)."""
    if use_triton(backend, pred):
        _check(pred, target, weight, group, num_groups)
        total, group_losses, _ = FlowLoss.apply(pred, target, weight, group, num_groups)
        return total, group_losses
    return flow_loss_reference(pred, target, weight, group, num_groups)
