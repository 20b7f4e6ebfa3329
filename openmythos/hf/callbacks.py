"""transformers `Trainer` callbacks for what our own trainer does between steps."""

from __future__ import annotations

import torch
import torch.distributed as dist
from transformers import TrainerCallback


class RouterBiasCallback(TrainerCallback):
    """Keeps the MoE's aux-loss-free balancing moving under transformers' `Trainer`.

    The router's bias moves after every optimizer step by the load of the tokens the step
    trained on; transformers' `Trainer` never calls that update, so without this callback the
    balancing stands still. The callback sums the `expert_load` of every training forward of the
    OpenMythos core (all micro-batches of a gradient accumulation), adds it over the ranks of a
    distributed run, and calls `update_router_bias` once per optimizer step, as `mythos train`
    does:

        Trainer(model, args, train_dataset=..., callbacks=[RouterBiasCallback()])
    """

    def __init__(self) -> None:
        self.core: torch.nn.Module | None = None
        self.load: torch.Tensor | None = None
        self._hook = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.on_train_end(args, state, control)  # a train() that raised left its hook behind
        # the core, found by its method: a trust_remote_code model has its own copy of the class
        self.core = next((m for m in model.modules() if hasattr(m, "update_router_bias")), None)
        if self.core is None:
            raise TypeError(f"RouterBiasCallback needs an OpenMythos model, got {type(model).__name__} "
                            "(no module with update_router_bias)")
        self.load = None
        self._hook = self.core.register_forward_hook(self._collect)

    def _collect(self, module, inputs, output) -> None:
        if module.training:  # not the Trainer's evaluation passes
            load = output.expert_load.detach()
            self.load = load if self.load is None else self.load + load

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.load is None:
            return
        load, self.load = self.load, None
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)  # every rank moves its bias by the global load
        self.core.update_router_bias(load)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
