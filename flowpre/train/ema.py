"""fp32 exponential moving averages of the student (a fast and a slow one).

METHOD.md: both EMAs are fp32 whatever the training precision (a bf16 EMA with decay
0.999 stops moving: 0.001 * update falls below bf16's resolution), start as copies of
the student, are updated after every optimizer step, and may be restarted (student
copied in) every K steps.

ZeRO 0-2: every rank holds both EMAs in full (the student is whole on every rank, so
the update needs no communication).

ZeRO-3 (`sharded=True`): each EMA is itself a ZeRO-3 partitioned module, made with
deepspeed.zero.Init(module=...), so each rank stores only its partition (`ds_tensor`)
of every fp32 EMA parameter. DeepSpeed partitions a parameter by its element count and
the world size alone, so the EMA's partition of a parameter covers exactly the elements
of the student's: the update is an elementwise lerp of local shards, no communication.
A forward of an EMA (SCFM's targets, sample grids) gathers the parameters of one chunk
(a DiT block, the embedders, the final layer) at a time through forward hooks and
frees them afterwards, as the engine does for the student; it is collective, so every
rank must run the same EMA forwards. `state_dict` gathers chunk by chunk into full
tensors on rank 0 (checkpoints and export keep the full EMA); `load_state_dict` takes
full tensors and keeps each rank's slice, whatever world size wrote them.
"""
import copy

import torch

# _foreach_lerp_ with one weight per tensor (both EMAs in one call); older torch lacks it
_LERP_PER_TENSOR_WEIGHT = hasattr(torch.ops.aten._foreach_lerp_, "ScalarList")


def _chunks(module):
    """Modules whose parameters are gathered together: each element of a ModuleList or
    Sequential child, each other child, and the root for its own parameters."""
    for child in module.children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            yield from (m for m in child if any(True for _ in m.parameters()))
        elif any(True for _ in child.parameters()):
            yield child


class _GatherHooks:
    """Forward pre/post hooks that gather a chunk's partitioned parameters for its forward."""

    def __init__(self, module):
        import deepspeed
        self.gathered = deepspeed.zero.GatheredParameters
        self.open = {}
        for chunk in _chunks(module):
            self._hook(chunk, list(chunk.parameters()))
        own = list(module.parameters(recurse=False))
        if own:
            self._hook(module, own)

    def _hook(self, module, params):
        def pre(mod, args):
            ctx = self.gathered(params, modifier_rank=None)
            ctx.__enter__()
            self.open.setdefault(id(mod), []).append(ctx)

        def post(mod, args, out):
            self.open[id(mod)].pop().__exit__(None, None, None)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


class DualEma:
    def __init__(self, student, fast_decay=0.99, slow_decay=0.999, restart_every=0, sharded=False):
        """`student` must not be partitioned yet: build before deepspeed.initialize."""
        self.decays = {"fast": fast_decay, "slow": slow_decay}
        self.restart_every = restart_every
        self.sharded = sharded
        self.nets = {k: copy.deepcopy(student).float().requires_grad_(False).eval() for k in self.decays}
        if sharded:
            import deepspeed
            # Init reads a full DeepSpeed config; only the stage matters for partitioning
            world = torch.distributed.get_world_size()
            cfg = {"train_batch_size": world, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
            for net in self.nets.values():
                deepspeed.zero.Init(module=net, dtype=torch.float32, config_dict_or_path=cfg)
                _GatherHooks(net)

    @property
    def fast(self):
        return self.nets["fast"]

    @property
    def slow(self):
        return self.nets["slow"]

    def local_bytes(self):
        """Bytes of EMA parameters this rank stores (both EMAs)."""
        if self.sharded:
            return sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for n in self.nets.values()
                       for p in n.parameters())
        return sum(p.numel() * p.element_size() for n in self.nets.values() for p in n.parameters())

    @staticmethod
    def _storage(p):
        """The tensor this rank updates: the local partition under ZeRO-3, else the parameter."""
        return p.ds_tensor if hasattr(p, "ds_tensor") else p.data

    @torch.no_grad()
    def update(self, student, step, zero3=False):
        """Call after optimizer step `step` (1-based) with the engine's module.

        Both EMAs in one multi-tensor op over the student's parameters (or, under ZeRO-3,
        the local shards of both): one fp32 view of the student feeds the two lerps, and
        one set of foreach launches does the work two did before."""
        if zero3 != self.sharded:
            raise RuntimeError(f"DualEma(sharded={self.sharded}) updated with zero3={zero3}")
        restart = self.restart_every > 0 and step % self.restart_every == 0
        src = [self._storage(p).float() for p in student.parameters()]
        dst = []
        for net in self.nets.values():
            mine = [self._storage(p) for p in net.parameters()]
            if len(mine) != len(src) or any(d.shape != s.shape for d, s in zip(mine, src)):
                raise RuntimeError("EMA and student parameters are partitioned differently")
            dst += mine
        sources = src * len(self.nets)
        if restart:
            torch._foreach_copy_(dst, sources)
        elif _LERP_PER_TENSOR_WEIGHT:
            weights = [1.0 - decay for decay in self.decays.values() for _ in src]
            torch._foreach_lerp_(dst, sources, weights)
        else:  # torch before the ScalarList overload: one call per EMA
            for i, decay in enumerate(self.decays.values()):
                torch._foreach_lerp_(dst[i * len(src):(i + 1) * len(src)], src, 1.0 - decay)

    def state_dict(self):
        """Full fp32 tensors; under ZeRO-3 a collective call, and only rank 0 gets them ({} elsewhere)."""
        if not self.sharded:
            return {k: net.state_dict() for k, net in self.nets.items()}
        import deepspeed
        rank = torch.distributed.get_rank()
        out = {k: {} for k in self.nets}
        for key, net in self.nets.items():
            named = list(net.named_parameters())
            for i in range(0, len(named), 16):  # bounded memory: a few parameters at a time
                part = named[i:i + 16]
                with deepspeed.zero.GatheredParameters([p for _, p in part], modifier_rank=None):
                    if rank == 0:
                        out[key].update({n: p.detach().to("cpu", copy=True) for n, p in part})
            if rank == 0:  # buffers are not partitioned
                out[key].update({n: b.detach().cpu().clone() for n, b in net.named_buffers()
                                 if n in net.state_dict()})
        return out if rank == 0 else {}

    @torch.no_grad()
    def load_state_dict(self, state):
        if not self.sharded:
            for k, net in self.nets.items():
                net.load_state_dict(state[k])
            return
        rank = torch.distributed.get_rank()
        for key, net in self.nets.items():
            full = state[key]
            missing = [n for n, _ in net.named_parameters() if n not in full]
            if missing:
                raise KeyError(f"EMA {key}: the checkpoint lacks {missing[:3]}")
            for name, p in net.named_parameters():
                flat = full[name].reshape(-1)
                if flat.numel() != p.ds_numel:
                    raise ValueError(f"EMA {key}: {name} has {flat.numel()} elements in the checkpoint, "
                                     f"{p.ds_numel} in the model")
                local = p.ds_tensor
                piece = flat[rank * local.numel():(rank + 1) * local.numel()]
                local.zero_()
                local[:piece.numel()].copy_(piece)

    def distance_to(self, student, zero3=False):
        """Relative L2 distance of each EMA to the student (a health signal for logging).
        Under ZeRO-3 from the local partitions, then summed over ranks."""
        with torch.no_grad():
            s = [self._storage(p).float() for p in student.parameters()]
            sums = [sum(x.pow(2).sum() for x in s)]
            for net in self.nets.values():
                e = [self._storage(p) for p in net.parameters()]
                sums.append(sum((a - b).pow(2).sum() for a, b in zip(e, s)))
            sums = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in sums])
            if self.sharded and torch.distributed.get_world_size() > 1:
                torch.distributed.all_reduce(sums)
        norm = max(float(sums[0]), 1e-30)
        return {k: float((sums[i + 1] / norm) ** 0.5) for i, k in enumerate(self.nets)}
