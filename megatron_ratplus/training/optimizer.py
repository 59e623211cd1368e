"""Optimizer and LR schedule behind one small interface for GPU and CPU.

On GPUs, and with --use-distributed-optimizer on CPU too (through megatron_ratplus/cpu_compat.py),
the optimizer is megatron-core's (``get_megatron_optimizer``: fp32 master weights, distributed
optimizer, its clipping) over models wrapped in megatron DDP. Elsewhere on CPU
:class:`TorchOptimizer` wraps ``torch.optim.AdamW`` with the same methods the loop uses:
``zero_grad``, ``step() -> (ok, grad_norm)``, ``param_groups``, and a ``sharded_state_dict`` for
megatron's dist_checkpointing. The LR schedule is megatron-core's ``OptimizerParamScheduler`` in
both cases.
"""

from __future__ import annotations

import math
from typing import List

import torch
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    optim_state_to_sharding_state,
)
from megatron.core.optimizer import distrib_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_ratplus.optional import log_fused_kernels
from megatron_ratplus.training.data_parallel import clip_grad_norm, uses_megatron_optimizer, zero_grads


def _param_groups(model_chunks, weight_decay: float):
    """Weight decay on matrices only (norm weights and other 1-D parameters are not decayed)."""
    decay, no_decay = [], []
    for chunk in model_chunks:
        for param in chunk.parameters():
            if param.requires_grad:
                (decay if param.dim() > 1 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay, "wd_mult": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0}]


class TorchOptimizer:
    """AdamW with megatron-style gradient clipping (CPU path); gradients arrive already reduced
    over data/context-parallel ranks (training/data_parallel.py).

    bf16 parameters (--bf16: megatron's Float16Module) get fp32 main copies, which AdamW updates
    and which are copied back into the bf16 parameters after each step, as megatron's
    Float16OptimizerWithFloat16Params does on GPU (it hard-codes CUDA, hence this). The main
    copies are saved with the optimizer state ("fp32_param"), so a resumed run continues from
    the same fp32 weights.
    """

    def __init__(self, model_chunks: List[torch.nn.Module], lr: float, weight_decay: float,
                 betas, eps: float, clip_grad: float):
        self.model_chunks = model_chunks
        groups = _param_groups(model_chunks, weight_decay)
        self.model_params = [p for group in groups for p in group["params"]]
        main = {id(p): p if p.dtype == torch.float32 else p.detach().float().requires_grad_()
                for p in self.model_params}
        for group in groups:
            group["params"] = [main[id(p)] for p in group["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
        self.clip_grad = clip_grad
        self.params = [main[id(p)] for p in self.model_params]  # the main parameter of each model parameter

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        zero_grads(self.model_chunks)

    def step(self):
        """Clip, then update; returns (updated, grad_norm). A non-finite norm skips the update."""
        for model, main in zip(self.model_params, self.params):
            if main is not model:
                main.grad = None if model.grad is None else model.grad.float()
        norm = float(clip_grad_norm(self.model_chunks, self.clip_grad if self.clip_grad > 0 else float("inf"),
                                    grads=[p.grad for p in self.params if p.grad is not None]))
        if not torch.isfinite(torch.tensor(norm)):
            return False, norm
        self.optimizer.step()
        with torch.no_grad():
            for model, main in zip(self.model_params, self.params):
                if main is not model:
                    model.copy_(main)
        return True, norm

    def step_count(self) -> int:
        """Optimizer updates applied so far (AdamW's per-parameter step counter)."""
        state = self.optimizer.state.get(self.params[0], {})
        return int(state["step"]) if "step" in state else 0

    def init_state(self) -> None:
        """Create AdamW's state tensors before any step, so a checkpoint can be loaded into them."""
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                self.optimizer.state[param] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(param),
                                               "exp_avg_sq": torch.zeros_like(param)}

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, metadata=None):
        """AdamW's moments (and fp32 main copies of bf16 parameters) sharded like their parameters;
        the scalar step count kept as one value. ``is_loading`` and ``metadata`` are megatron's
        optimizer interface; here :meth:`init_state` has already made the state a load fills, and
        the layout has no variants."""
        state = self.optimizer.state_dict()
        for index, (model, main) in enumerate(zip(self.model_params, self.params)):
            if main is not model:
                state["state"].setdefault(index, {})["fp32_param"] = main.detach()
        id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict, self.model_params)
        optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
        state["step"] = self.step_count()
        return state

    def load_state_dict(self, state) -> None:
        step = torch.tensor(float(state.pop("step")))
        with torch.no_grad():
            for index, param_state in state["state"].items():
                if "fp32_param" in param_state:
                    self.params[index].copy_(param_state.pop("fp32_param"))
                param_state["step"] = step.clone()
        self.optimizer.load_state_dict(state)


def build_optimizer(model_chunks, args):
    """megatron-core's optimizer where :func:`uses_megatron_optimizer`, else TorchOptimizer (chunks
    from data_parallel.wrap_model; ``args``: a TrainingConfig)."""
    if uses_megatron_optimizer(args.use_distributed_optimizer):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        log_fused_kernels()  # Adam from TE, else apex, else torch: megatron decides, we report it once

        config = OptimizerConfig(
            optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
            clip_grad=args.clip_grad, bf16=args.bf16, params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
            use_distributed_optimizer=args.use_distributed_optimizer)
        return MegatronOptimizerAdapter(get_megatron_optimizer(config, model_chunks), model_chunks)
    return TorchOptimizer(model_chunks, args.lr, args.weight_decay, (args.adam_beta1, args.adam_beta2),
                          args.adam_eps, args.clip_grad)


class MegatronOptimizerAdapter:
    """megatron-core's optimizer over DDP-wrapped chunks, seen through TorchOptimizer's interface."""

    def __init__(self, optimizer, model_chunks):
        self.optimizer, self.model_chunks = optimizer, model_chunks

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        zero_grads(self.model_chunks)
        self.optimizer.zero_grad()

    def step(self):
        """megatron's step (ChainedOptimizer.step: prepare, norm, clip, update) with the NaN policy
        in it: megatron skips only when an fp16 grad scaler finds an inf, so with bf16 or fp32 (no
        scaler) it would update with non-finite gradients. A non-finite global norm skips the
        update here, as TorchOptimizer does (docs/DESIGN.md §9)."""
        optimizer = self.optimizer
        if optimizer.prepare_grads():  # an fp16 grad scaler found an inf
            return False, float("nan")
        norm = float(optimizer.get_grad_norm())
        if not math.isfinite(norm):
            return False, norm
        for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
            params = inner.get_parameters()
            if params and inner.config.clip_grad > 0.0:
                clip_grad_by_total_norm_fp32(params, max_norm=inner.config.clip_grad, total_norm=norm)
        return bool(optimizer.step_with_ready_grads()), norm

    def init_state(self) -> None:
        """Give megatron's distributed optimizer an Adam state for a load to fill. Where Adam is
        torch's (no TE or apex: CPU, bare GPU images) its state, step count included, exists only
        after a step, and megatron's ``state_dict`` asserts on it; megatron's own helper takes a
        zero-gradient step on the main weights, which the load then overwrites. The other
        optimizers build their state while loading."""
        if distrib_optimizer.HAVE_APEX_OR_TE:
            return
        for inner in self._distributed():
            if not inner.optimizer.state:
                inner._init_optimizer_states_with_dummy_values()

    def _distributed(self) -> list:
        """megatron's DistributedOptimizers inside the (chained) optimizer."""
        return [inner for inner in getattr(self.optimizer, "chained_optimizers", [self.optimizer])
                if isinstance(inner, distrib_optimizer.DistributedOptimizer)]

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, metadata=None):
        """``metadata``: the checkpoint's (checkpoint.SHARDED_METADATA); it picks the distributed
        optimizer's layout, the same on save and load."""
        return self.optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading, metadata=metadata)

    def load_state_dict(self, state) -> None:
        """Without autograd: fp32 parameters' main weights in the distributed optimizer are views
        of the model's leaf parameters, which megatron copies into in place."""
        with torch.no_grad():
            self.optimizer.load_state_dict(state)
        if not distrib_optimizer.HAVE_APEX_OR_TE:
            # With torch's Adam, megatron's load leaves each parameter's step count at the one
            # init_state's step made and puts the saved count in the param groups: restore it,
            # or Adam's bias correction restarts (a resumed run would differ from an uninterrupted one).
            for inner in self._distributed():
                for group in inner.optimizer.param_groups:
                    for param in group["params"]:
                        inner.optimizer.state[param]["step"] = torch.tensor(float(group["step"]))


def build_scheduler(optimizer, args) -> OptimizerParamScheduler:
    """Linear warmup then cosine (or linear/constant) decay to --min-lr, one step per iteration
    (``args``: a TrainingConfig)."""
    train_iters = args.train_iters
    warmup = int(round(args.lr_warmup_fraction * train_iters))
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else args.lr, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=max(1, train_iters), lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=max(1, train_iters),
        wd_incr_style="constant", override_opt_param_scheduler=args.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=not args.override_opt_param_scheduler)
