"""DeepSeekMoE FFN (Dai et al. 2024) with aux-loss-free load balancing (Wang et al. 2024,
DeepSeek-V3): fine-grained routed experts chosen top-k per token, plus always-on shared experts.

Suffixes: N tokens, K experts per token, E experts, D model dim, F expert hidden dim.
The balancing bias is a buffer, not a parameter: it shifts which experts are selected and is
moved by `update_bias` from measured loads; gate weights come from the unbiased scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from openmythos.config import MythosConfig
from openmythos.model.layers import SwiGLU, compute_dtype


class MoE(nn.Module):
    def __init__(self, cfg: MythosConfig):
        super().__init__()
        E, D, Fd = cfg.n_experts, cfg.dim, cfg.expert_dim
        self.n_experts, self.top_k, self.score = E, cfg.n_experts_per_tok, cfg.router_score
        self.bias_rate = cfg.router_bias_rate
        self.balance_weight = cfg.balance_loss_weight
        self.router = nn.Linear(D, E, bias=False)
        self.register_buffer("router_bias", torch.zeros(E, dtype=torch.float32))
        # experts stacked into (E, ...) tensors: one parameter each, so FSDP shards them whole
        self.w_gate = nn.Parameter(torch.empty(E, Fd, D))
        self.w_up = nn.Parameter(torch.empty(E, Fd, D))
        self.w_down = nn.Parameter(torch.empty(E, D, Fd))
        # n shared experts of width F*K are one SwiGLU of width n*F*K: the sum splits exactly
        n_shared = cfg.n_shared_experts * cfg.shared_expert_dim
        self.shared = SwiGLU(D, n_shared) if n_shared else None

    def _apply(self, fn, recurse: bool = True) -> MoE:
        # nn.Module's hook behind .to(), .half(), .bfloat16() and .to_empty(): they cast every
        # floating buffer, but the bias moves in steps of router_bias_rate (1e-3), which bf16
        # doubles once |bias| passes 0.25 and loses from 0.5, so it keeps its fp32 values (the
        # scores it shifts are fp32 anyway) and only follows the device
        bias = self.router_bias
        super()._apply(fn, recurse)
        moved = self.router_bias
        self.router_bias = moved.float() if bias.is_meta or moved.is_meta else bias.float().to(moved.device)
        return self

    def init_weights(self, std: float = 0.02) -> None:
        for w in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(w, std=std)
        self.router_bias.zero_()

    def route(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns expert ids (N, K), gate weights (N, K) and the unbiased scores (N, E). The
        gates are the chosen scores normalised over the K; with one expert per token, the score
        itself (normalised, the gate would be 1 and the router would get no gradient)."""
        # in fp32 under autocast too: bf16 logits put the scores ~4e-3 off at init, coarser than the
        # bias steps (1e-3), and more as the logits grow
        with torch.autocast(x_ND.device.type, enabled=False):
            exact = compute_dtype(x_ND.dtype)
            logits_NE = F.linear(x_ND.to(exact), self.router.weight.to(exact))
        scores_NE = logits_NE.softmax(-1) if self.score == "softmax" else logits_NE.sigmoid()
        idx_NK = (scores_NE + self.router_bias).topk(self.top_k, dim=-1).indices
        gates_NK = scores_NE.gather(-1, idx_NK)
        if self.top_k > 1:
            gates_NK = gates_NK / gates_NK.sum(-1, keepdim=True)
        return idx_NK, gates_NK, scores_NE

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the output (N, D), the per-expert load (E,) and the balance loss (scalar)."""
        N, K = x_ND.shape[0], self.top_k
        idx_NK, gates_NK, scores_NE = self.route(x_ND)
        # a scatter, not bincount: its output size does not depend on the data (torch.compile)
        load_E = idx_NK.new_zeros(self.n_experts).index_add_(
            0, idx_NK.flatten(), torch.ones_like(idx_NK.flatten()))
        # sort the N*K assignments by expert so that each expert's tokens form one contiguous slice
        order_M = idx_NK.flatten().argsort(stable=True)  # M = N*K
        positions_M = torch.arange(len(order_M), device=order_M.device)
        inverse_M = torch.empty_like(order_M).scatter_(0, order_M, positions_M)  # not a 2nd sort
        x_MD = _gather_rows(x_ND, order_M // K, inverse_M, K)
        y_MD = _grouped_swiglu(x_MD, load_E, self.w_gate, self.w_up, self.w_down).to(x_ND.dtype)
        # unsort (the inverse permutation), then weight and sum each token's K rows
        y_NKD = _gather_rows(y_MD, inverse_M, order_M, 1).view(N, K, -1)
        out_ND = (y_NKD * gates_NK.to(x_ND.dtype).unsqueeze(-1)).sum(1)
        if self.shared is not None:
            out_ND = out_ND + self.shared(x_ND)
        return out_ND, load_E, self._balance_loss(load_E, scores_NE)

    def _balance_loss(self, load_E: torch.Tensor, scores_NE: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.balance_weight):
            return scores_NE.new_zeros(())
        frac_E = load_E.to(scores_NE.dtype) / load_E.sum()  # fp64 in an fp64 model
        prob_E = (scores_NE / scores_NE.sum(-1, keepdim=True)).mean(0)
        return self.balance_weight * self.n_experts * (frac_E * prob_E).sum()

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor) -> None:
        """Aux-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded ones."""
        load_E = load_E.to(self.router_bias.device, torch.float32)
        self.router_bias += self.bias_rate * torch.sign(load_E.mean() - load_E)


class _GatherRows(torch.autograd.Function):
    """x[index] for the dispatch permutations, with the backward written as a gather too:
    grad[inverse] summed over each token's `group` copies. Autograd's own backward of an index is
    an accumulating scatter, which the CPU runs on one thread."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, group: int):
        ctx.save_for_backward(inverse)
        ctx.group = group
        return x[index]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        grad = grad[inverse]
        if ctx.group > 1:
            grad = grad.view(-1, ctx.group, grad.shape[-1]).sum(1)
        return grad, None, None, None


def _gather_rows(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, group: int) -> torch.Tensor:
    """x[index]; through _GatherRows only when a gradient will flow back (a Function call costs
    more than the gather itself at decode sizes)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _GatherRows.apply(x, index, inverse, group)
    return x[index]


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def _grouped_swiglu(x_MD: torch.Tensor, load_E: torch.Tensor, w_gate: torch.Tensor,
                    w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """SwiGLU of each expert on its contiguous slice of the expert-sorted rows x_MD.

    Three kernels, one computation:
    - `torch._grouped_mm` where the device takes it (CUDA: bf16 on sm90+): the slice ends stay on
      the device, so nothing waits on the host;
    - under torch.compile otherwise: the `openmythos::expert_swiglu` custom op, opaque to the
      compiler, so the slice sizes (data) never break the graph;
    - eager on the CPU: a loop over the experts' slices, every product a plain (counted) mm; the
      one host sync for the slice sizes costs nothing there.
    """
    dtype = _autocast_dtype(x_MD.device) or x_MD.dtype  # autocast covers neither custom kernel
    x_MD = x_MD.to(dtype)
    w_gate, w_up, w_down = (w.to(dtype) for w in (w_gate, w_up, w_down))
    if _grouped_mm_works(x_MD):
        ends_E = load_E.cumsum(0).to(torch.int32)
        h_MF = F.silu(torch._grouped_mm(x_MD, w_gate.transpose(1, 2), offs=ends_E))
        h_MF = h_MF * torch._grouped_mm(x_MD, w_up.transpose(1, 2), offs=ends_E)
        return torch._grouped_mm(h_MF, w_down.transpose(1, 2), offs=ends_E)
    if torch.compiler.is_compiling():
        return expert_swiglu(x_MD, load_E, w_gate, w_up, w_down)[0]
    if torch.is_grad_enabled() and w_gate.requires_grad:
        # unbind, not w[e]: each w[e] would backprop a full (E, ...) zero tensor per expert
        w_gate, w_up, w_down = w_gate.unbind(0), w_up.unbind(0), w_down.unbind(0)
    # split, not a slice per expert: each slice's backward would be a full (M, D) zero tensor
    outs = []
    for e, x_e in enumerate(x_MD.split(load_E.tolist())):
        if x_e.shape[0]:  # in decode most experts get no token
            outs.append((F.silu(x_e @ w_gate[e].T) * (x_e @ w_up[e].T)) @ w_down[e].T)
    return torch.cat(outs)


_GROUPED_MM_OK: dict[tuple[str, torch.dtype], bool] = {}


def _grouped_mm_works(x: torch.Tensor) -> bool:
    """torch._grouped_mm on x's device and dtype: accelerators only (on the CPU it is a loop of
    mm, and its compile-time shape check wants bf16), probed once with a tiny product."""
    if x.device.type == "cpu" or not hasattr(torch, "_grouped_mm"):
        return False
    key = (x.device.type, x.dtype)
    if key not in _GROUPED_MM_OK:
        try:
            a = torch.ones(4, 8, device=x.device, dtype=x.dtype)
            b = torch.ones(2, 8, 8, device=x.device, dtype=x.dtype)
            ends = torch.tensor([1, 4], device=x.device, dtype=torch.int32)
            _GROUPED_MM_OK[key] = bool((torch._grouped_mm(a, b, offs=ends) == 8).all())
        except (RuntimeError, NotImplementedError):
            _GROUPED_MM_OK[key] = False
    return _GROUPED_MM_OK[key]


# ---- the custom op torch.compile sees: (M, D) rows in, (M, D) out, whatever the split


@torch.library.custom_op("openmythos::expert_swiglu", mutates_args=())
def expert_swiglu(x_MD: torch.Tensor, load_E: torch.Tensor, w_gate: torch.Tensor,
                  w_up: torch.Tensor, w_down: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns y (M, D) and, for the backward pass, the gate and up projections (M, F)."""
    gate_MF = x_MD.new_empty(x_MD.shape[0], w_gate.shape[1])
    up_MF = torch.empty_like(gate_MF)
    y_MD = x_MD.new_empty(x_MD.shape[0], w_down.shape[1])
    end = 0
    for e, n in enumerate(load_E.tolist()):
        if n:
            rows = slice(end, end + n)
            torch.mm(x_MD[rows], w_gate[e].T, out=gate_MF[rows])
            torch.mm(x_MD[rows], w_up[e].T, out=up_MF[rows])
            torch.mm(F.silu(gate_MF[rows]) * up_MF[rows], w_down[e].T, out=y_MD[rows])
            end += n
    return y_MD, gate_MF, up_MF


@expert_swiglu.register_fake
def _(x_MD, load_E, w_gate, w_up, w_down):
    gate_MF = x_MD.new_empty(x_MD.shape[0], w_gate.shape[1])
    return x_MD.new_empty(x_MD.shape[0], w_down.shape[1]), gate_MF, torch.empty_like(gate_MF)


@torch.library.custom_op("openmythos::expert_swiglu_backward", mutates_args=())
def expert_swiglu_backward(dy_MD: torch.Tensor, x_MD: torch.Tensor, gate_MF: torch.Tensor,
                           up_MF: torch.Tensor, load_E: torch.Tensor, w_gate: torch.Tensor,
                           w_up: torch.Tensor, w_down: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dx_MD = torch.zeros_like(x_MD)
    dgate, dup, ddown = torch.zeros_like(w_gate), torch.zeros_like(w_up), torch.zeros_like(w_down)
    end = 0
    for e, n in enumerate(load_E.tolist()):
        if n:
            rows = slice(end, end + n)
            x, g, u, dy = x_MD[rows], gate_MF[rows], up_MF[rows], dy_MD[rows]
            act = F.silu(g)
            ddown[e] = dy.T @ (act * u)
            dh = dy @ w_down[e]
            dg = torch.ops.aten.silu_backward(dh * u, g)
            du = dh * act
            dgate[e], dup[e] = dg.T @ x, du.T @ x
            dx_MD[rows] = dg @ w_gate[e] + du @ w_up[e]
            end += n
    return dx_MD, dgate, dup, ddown


@expert_swiglu_backward.register_fake
def _(dy_MD, x_MD, gate_MF, up_MF, load_E, w_gate, w_up, w_down):
    return (torch.empty_like(x_MD), torch.empty_like(w_gate), torch.empty_like(w_up),
            torch.empty_like(w_down))


def _expert_swiglu_setup(ctx, inputs, output) -> None:
    x_MD, load_E, w_gate, w_up, w_down = inputs
    ctx.save_for_backward(x_MD, output[1], output[2], load_E, w_gate, w_up, w_down)


def _expert_swiglu_grad(ctx, dy_MD, _dgate, _dup):
    x_MD, gate_MF, up_MF, load_E, w_gate, w_up, w_down = ctx.saved_tensors
    dx, dgate, dup, ddown = expert_swiglu_backward(dy_MD.contiguous(), x_MD, gate_MF, up_MF,
                                                   load_E, w_gate, w_up, w_down)
    return dx, None, dgate, dup, ddown


expert_swiglu.register_autograd(_expert_swiglu_grad, setup_context=_expert_swiglu_setup)

