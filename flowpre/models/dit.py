"""Diffusion Transformer (DiT) with adaLN-Zero conditioning, predicting flow velocity.

Read top to bottom: embedders, the block, the final layer, the model, the size registry.
The model sees (x_sigma, sigma, condition) and nothing else; sigma in [0, 1] is scaled
by 1000 for the sinusoidal embedder (the range its frequencies were designed for).
With time_inputs=2 the DiT also takes the jump's end sigma_end (METHOD.md section 8): the
jump length sigma - sigma_end goes through its own embedder (last layer zero-initialised,
so a new two-time model computes what the one-time model computes) and is added to the
conditioning vector; sigma_end = sigma asks for the instantaneous velocity.
The condition is a class id, or for text models (text_dim > 0) the frozen text
encoder's output [pooled; tokens] (flowpre/text.py): the pooled vector joins the adaLN
conditioning, the token states are attended to by a cross-attention in every block, all
but the all-zero rows, which are padding.

Every LayerNorm + modulate, residual gate and attention call goes through
flowpre.kernels so that one switch (`kernels`: auto | triton | torch) picks the fused
Triton kernels or their PyTorch references for the whole network.
"""
import contextlib
import math

import numpy as np
import torch
import torch.nn as nn
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from flowpre import kernels as K

# --- embedders ---------------------------------------------------------------------


class TimestepEmbedder(nn.Module):
    """sigma (B,) -> (B, hidden): sinusoidal features of 1000*sigma, then an MLP."""

    def __init__(self, hidden, freq_dim=256, scale=1000.0):
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, sigma):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
        # fp32 at least: float64 stays float64 (the finite-difference checks of d/dsigma need it)
        sigma = sigma.to(torch.promote_types(sigma.dtype, torch.float32))
        args = self.scale * sigma[:, None] * freqs[None].to(sigma.dtype)  # (B, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """class id (B,) -> (B, hidden). Id `num_classes` is the null class used for CFG."""

    def __init__(self, num_classes, hidden):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, labels):
        return self.table(labels)


class TextEmbedder(nn.Module):
    """[pooled; tokens] (B, 1+L, text_dim) -> adaLN vector (B, hidden), context (B, L, hidden)."""

    def __init__(self, text_dim, hidden):
        super().__init__()
        self.pooled = nn.Sequential(nn.Linear(text_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.context = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(approximate="tanh"),
                                     nn.Linear(hidden, hidden))

    def forward(self, text):
        return self.pooled(text[:, 0]), self.context(text[:, 1:])


def sincos_pos_embed(hidden, grid):
    """Fixed 2-D sin-cos position embedding, (grid*grid, hidden)."""
    def one_axis(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    ys, xs = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    emb = np.concatenate([one_axis(hidden // 2, ys), one_axis(hidden // 2, xs)], axis=1)
    return torch.from_numpy(emb).float()


# --- transformer block ----------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x, backend):
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        out = K.attention(q, k, v, backend=backend)  # (B, H, N, D)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


# Logit given to a padding key: exp(-1000) is 0 in every float format, and -1000 * sqrt(D)
# (the channel value before the kernel's 1/sqrt(D) scale) still fits in fp16.
PADDING_LOGIT = -1000.0


def padding_key_bias(keep):
    """(B, L) bool, True for text tokens to attend to -> (B, 1, L, 1) logits: 0 or PADDING_LOGIT."""
    return torch.where(keep, 0.0, PADDING_LOGIT)[:, None, :, None]


class CrossAttention(nn.Module):
    """Image tokens (B, N, C) attend to the text context (B, L, C), through the same
    attention kernel as self-attention (it takes M queries against N keys).

    The fused kernel takes no mask, so padding is masked with one extra head channel:
    every query gets a 1 there and every key its bias (0 to keep, PADDING_LOGIT * sqrt(D) to
    drop), so q.k gains exactly the bias and a padding key's softmax weight is 0; values get
    a 0 there, and the channel is cut from the output. The scale stays 1/sqrt(D). The result
    equals masked attention on every backend (Triton, SDPA), gradients included, for one
    channel more (D + 1 is split 64 + 16 in the kernel, not padded to 128)."""

    def __init__(self, hidden, heads):
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.proj = nn.Linear(hidden, hidden), nn.Linear(hidden, 2 * hidden), nn.Linear(hidden, hidden)

    def forward(self, x, context, key_bias, backend):  # key_bias (B, 1, L, 1) from padding_key_bias
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.kv(context), "b l (two h d) -> two b h l d", two=2, h=self.heads)
        D = q.shape[-1]
        q = torch.cat([q, q.new_ones(*q.shape[:3], 1)], dim=-1)
        k = torch.cat([k, (key_bias * math.sqrt(D)).to(k.dtype).expand(*k.shape[:3], 1)], dim=-1)
        v = torch.cat([v, v.new_zeros(*v.shape[:3], 1)], dim=-1)
        out = K.attention(q, k, v, scale=1.0 / math.sqrt(D), backend=backend)[..., :D]  # (B, H, N, D)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class Mlp(nn.Module):
    def __init__(self, hidden, ratio=4.0):
        super().__init__()
        inner = int(hidden * ratio)
        self.fc1, self.act, self.fc2 = nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero block: the conditioning sets shift/scale/gate of both sub-layers, and
    the gates start at zero so every block starts as the identity."""

    def __init__(self, hidden, heads, mlp_ratio=4.0, cross_attention=False):
        super().__init__()
        self.attn = Attention(hidden, heads)
        self.mlp = Mlp(hidden, mlp_ratio)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        # Text models: cross-attention first, so the fused residual + LayerNorm between
        # self-attention and MLP stays one kernel. Its output projection starts at zero
        # (set in DiT.initialize), keeping the block an identity at initialisation.
        self.cross = CrossAttention(hidden, heads) if cross_attention else None
        self.cross_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6) if cross_attention else None

    def forward(self, x, c, backend, context=None, key_bias=None):  # x (B, N, C), c (B, C), context (B, L, C)
        if self.cross is not None:
            x = x + self.cross(self.cross_norm(x), context, key_bias, backend)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=1)  # each (B, C)
        h = K.adaln_modulate(x, shift1, scale1, backend=backend)
        # residual of the attention branch fused with the MLP branch's LayerNorm + modulate
        x, h = K.gated_residual_adaln(x, self.attn(h, backend), gate1, shift2, scale2, backend=backend)
        return x + gate2[:, None] * self.mlp(h)


class FinalLayer(nn.Module):
    def __init__(self, hidden, patch, out_channels):
        super().__init__()
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, patch * patch * out_channels)

    def forward(self, x, c, backend):
        shift, scale = self.ada(c).chunk(2, dim=1)
        return self.linear(K.adaln_modulate(x, shift, scale, backend=backend))  # (B, N, p*p*C)


# --- the model ------------------------------------------------------------------------


class DiT(nn.Module):
    def __init__(self, in_channels=4, image_size=32, patch=2, hidden=384, depth=12, heads=6,
                 num_classes=1000, mlp_ratio=4.0, kernels="auto", step_levels=0, text_dim=0, text_tokens=0,
                 time_inputs=1, jump_scale=1000.0, sigma_scale=1000.0):
        super().__init__()
        if time_inputs not in (1, 2):
            raise ValueError(f"time_inputs must be 1 or 2, got {time_inputs!r}")
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not divisible by the patch size {patch}")
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {heads} heads")
        self.in_channels, self.out_channels = in_channels, in_channels
        self.image_size, self.patch, self.hidden, self.heads, self.depth = image_size, patch, hidden, heads, depth
        self.num_classes, self.mlp_ratio, self.kernels = num_classes, mlp_ratio, kernels
        self.step_levels, self.time_inputs, self.jump_scale = step_levels, time_inputs, float(jump_scale)
        self.sigma_scale = float(sigma_scale)
        self.text_dim, self.text_tokens = text_dim, text_tokens  # text models: cond is (B, text_tokens, text_dim)
        self.activation_checkpointing = False  # set by the engine (train.activation_checkpointing)
        self.grid = image_size // patch

        self.patch_embed = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch)
        # sigma's top frequency, 1000 rad per unit as in DiT; MeanFlow's target h du/dt amplifies
        # fast sigma features as it does fast jump features (model.sigma_scale, fashion_flowmaps.md)
        self.t_embed = TimestepEmbedder(hidden, scale=self.sigma_scale)
        self.y_embed = TextEmbedder(text_dim, hidden) if text_dim else LabelEmbedder(num_classes, hidden)
        # step-size input d = 2^-level, only for the Shortcut Models baseline
        self.d_embed = nn.Embedding(step_levels, hidden) if step_levels else None
        # two-time models: the jump length sigma - sigma_end, embedded like sigma but with its own
        # frequency scale: MeanFlow's target holds h du/dt, which multiplies a feature of frequency w
        # by about h w, so features much faster than 1/h feed back on themselves (fashion_flowmaps.md)
        self.jump_embed = TimestepEmbedder(hidden, scale=self.jump_scale) if time_inputs == 2 else None
        self.register_buffer("pos_embed", sincos_pos_embed(hidden, self.grid)[None], persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden, heads, mlp_ratio, bool(text_dim)) for _ in range(depth)])
        self.final = FinalLayer(hidden, patch, self.out_channels)
        self.initialize()

    @property
    def null_class(self):
        """The CFG null condition of class models; text models take the encoder's (TextEncoder.null)."""
        return None if self.text_dim else self.num_classes

    def initialize(self):
        def xavier(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.apply(xavier)
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        if not self.text_dim:
            nn.init.normal_(self.y_embed.table.weight, std=0.02)
        if self.d_embed is not None:
            nn.init.normal_(self.d_embed.weight, std=0.02)
        for lin in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        if self.jump_embed is not None:  # zero output: a new two-time model is the one-time model
            nn.init.normal_(self.jump_embed.mlp[0].weight, std=0.02)
            nn.init.zeros_(self.jump_embed.mlp[2].weight)
        # adaLN-Zero: modulation and output start at zero
        for block in self.blocks:
            nn.init.zeros_(block.ada[-1].weight)
            nn.init.zeros_(block.ada[-1].bias)
            if block.cross is not None:
                nn.init.zeros_(block.cross.proj.weight)
                nn.init.zeros_(block.cross.proj.bias)
        for lin in (self.final.ada[-1], self.final.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def unpatchify(self, x):  # (B, N, p*p*C) -> (B, C, H, W)
        return rearrange(x, "b (gh gw) (ph pw c) -> b c (gh ph) (gw pw)", gh=self.grid, ph=self.patch, pw=self.patch)

    def forward(self, x, sigma, cond, step_level=None, sigma_end=None):
        """x (B, C, H, W), sigma (B,) in [0, 1], cond (B,) class ids or, for text models,
        (B, text_tokens, text_dim) encoder output -> velocity (B, C, H, W).

        step_level (B,) int: d = 2^-level, for models built with step_levels > 0 only.
        sigma_end (B,) <= sigma: where the jump ends, for models built with time_inputs=2 only;
        the output is then the average velocity over [sigma_end, sigma]."""
        if x.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"DiT expects inputs (B, {self.in_channels}, {self.image_size}, {self.image_size}), "
                             f"got {tuple(x.shape)}")
        h = rearrange(self.patch_embed(x), "b c gh gw -> b (gh gw) c") + self.pos_embed.to(x.dtype)  # (B, N, hidden)
        context = key_bias = None
        if self.text_dim:
            if cond.shape[1:] != (self.text_tokens, self.text_dim):
                raise ValueError(f"text DiT expects cond (B, {self.text_tokens}, {self.text_dim}), got {tuple(cond.shape)}")
            # an all-zero token row is padding (flowpre/text.py zeroes BERT's): left out of cross-attention
            key_bias = padding_key_bias(cond[:, 1:].ne(0).any(-1))
            pooled, context = self.y_embed(cond.to(h.dtype))  # (B, hidden), (B, L, hidden)
            c = self.t_embed(sigma) + pooled
        else:
            c = self.t_embed(sigma) + self.y_embed(cond)  # (B, hidden)
        if (self.d_embed is None) != (step_level is None):
            raise ValueError("step_level must be given exactly when the model has a step-size embedder")
        if self.d_embed is not None:
            c = c + self.d_embed(step_level)
        if (self.jump_embed is None) != (sigma_end is None):
            raise ValueError("sigma_end must be given exactly when the model has two time inputs (time_inputs=2)")
        if self.jump_embed is not None:
            c = c + self.jump_embed(sigma - sigma_end)
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, c, self.kernels, context, key_bias, use_reentrant=False)
            else:
                h = block(h, c, self.kernels, context, key_bias)
        return self.unpatchify(self.final(h, c, self.kernels))

    def forward_flops(self):
        """Matmul FLOPs of one forward pass for one image (2 per multiply-add).

        Per block and token: qkv 3h^2, proj h^2, MLP 2*r*h^2 multiply-adds; attention
        2*N*h (scores and values). Plus patch embedding, final layer and the per-image
        conditioning MLPs. Elementwise work is left out, as is usual for MFU.
        Text models add per block q and output projections (2 N h^2), k/v of the L context
        tokens (2 L h^2) and attention 2 N L h, plus the context and pooled MLPs
        ((L + 1) (t h + h^2)); the frozen text encoder runs once per batch and is not counted.
        """
        N, h, r, d = self.grid ** 2, self.hidden, self.mlp_ratio, self.depth
        per_block = N * (4 + 2 * r) * h * h + 2 * N * N * h + 6 * h * h
        patch_io = N * h * self.patch ** 2 * (self.in_channels + self.out_channels)
        cond = (256 * h + h * h) * (1 + (self.time_inputs == 2)) + 2 * h * h
        if self.text_dim:
            L, t = self.text_tokens - 1, self.text_dim
            per_block += 2 * N * h * h + 2 * L * h * h + 2 * N * L * h
            cond += (L + 1) * (t * h + h * h)
        return 2 * (d * per_block + patch_io + cond)

    def sampling_inputs(self, num_steps, batch):
        """Extra inputs for an N-step sampler: the step-size level log2(N) when the model has one."""
        if self.d_embed is None:
            return {}
        level = min(max(round(math.log2(num_steps)), 0), self.step_levels - 1)
        return {"step_level": torch.full((batch,), level, dtype=torch.long, device=self.pos_embed.device)}

    def config(self):
        return {"in_channels": self.in_channels, "image_size": self.image_size, "patch": self.patch,
                "hidden": self.hidden, "depth": self.depth, "heads": self.heads,
                "num_classes": self.num_classes, "mlp_ratio": self.mlp_ratio, "step_levels": self.step_levels,
                "text_dim": self.text_dim, "text_tokens": self.text_tokens, "time_inputs": self.time_inputs,
                **({"jump_scale": self.jump_scale} if self.time_inputs == 2 else {}),
                # files at the usual scale stay as they were before the key existed
                **({"sigma_scale": self.sigma_scale} if self.sigma_scale != 1000.0 else {})}


def upgrade_config(config):
    """A model config completed with the keys files may leave out: sigma_scale (written only
    when it is not 1000) and jump_scale (two-time models before model.jump_scale embedded the
    jump like sigma, at 1000). Compare configs through this."""
    config = {"sigma_scale": 1000.0, **config}
    if config.get("time_inputs") == 2 and "jump_scale" not in config:
        config["jump_scale"] = 1000.0
    return config


@contextlib.contextmanager
def forward_mode_kernels(model):
    """Run `model` where forward-mode AD (torch.func.jvp, MeanFlow's target) has rules: the
    fused Triton kernels when they serve the model (attention by its flash-style JVP kernel,
    adaLN by its explicit tangent), else the PyTorch references with attention on SDPA's math
    path (SDPA's fused CPU/CUDA kernels have no forward-mode rule).
    Compiled blocks (train.compile) run eagerly here: Dynamo refuses to trace under torch.func
    transforms, and a block it gave up on once stays uncompiled for the training forwards too."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    saved = getattr(model, "kernels", None)  # None: not a DiT (an analytic field in tests)
    param = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    fused = saved is not None and param is not None and K.use_triton(saved, param)
    if saved is not None and not fused:
        model.kernels = "torch"
    try:
        with sdpa_kernel(SDPBackend.MATH), torch.compiler.set_stance("force_eager"):
            yield model
    finally:
        if saved is not None:
            model.kernels = saved


# --- sizes ------------------------------------------------------------------------------

# (depth, hidden, heads), as in the DiT paper
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DIT_MODELS = [f"DiT-{size}/{patch}" for size in DIT_SIZES for patch in (2, 4, 8)]


def build_dit(name, in_channels, image_size, num_classes, kernels="auto", step_levels=0, text_dim=0, text_tokens=0,
              time_inputs=1, jump_scale=1000.0, sigma_scale=1000.0):
    """`DiT-S/2` ... `DiT-XL/8`; also `DiT-<depth>x<hidden>x<heads>/<patch>` for small custom models."""
    try:
        size, patch = name.removeprefix("DiT-").split("/")
        patch = int(patch)
        if size in DIT_SIZES:
            depth, hidden, heads = DIT_SIZES[size]
        else:
            depth, hidden, heads = (int(v) for v in size.split("x"))
    except ValueError:
        raise ValueError(f"unknown model name {name!r}: use one of {DIT_MODELS} or DiT-<depth>x<hidden>x<heads>/<patch>")
    return DiT(in_channels, image_size, patch, hidden, depth, heads, num_classes, kernels=kernels,
               step_levels=step_levels, text_dim=text_dim, text_tokens=text_tokens, time_inputs=time_inputs,
               jump_scale=jump_scale, sigma_scale=sigma_scale)
