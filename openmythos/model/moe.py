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
from openmythos.model.layers import SwiGLU


class MoE(nn.Module):
    def __init__(self, cfg: MythosConfig):
        super().__init__()
        E, D, Fd = cfg.n_experts, cfg.dim, cfg.expert_dim
        self.n_experts, self.top_k, self.score = E, cfg.n_experts_per_tok, cfg.router_score
        self.bias_rate = cfg.router_bias_rate
        self.balance_weight = cfg.balance_loss_weight
        self.router = nn.Linear(D, E, bias=False)
        self.register_buffer("router_bias", torch.zeros(E))
        # experts stacked into (E, ...) tensors: one parameter each, so FSDP shards them whole
        self.w_gate = nn.Parameter(torch.empty(E, Fd, D))
        self.w_up = nn.Parameter(torch.empty(E, Fd, D))
        self.w_down = nn.Parameter(torch.empty(E, D, Fd))
        # n shared experts of width F*K are one SwiGLU of width n*F*K: the sum splits exactly
        n_shared = cfg.n_shared_experts * cfg.shared_expert_dim
        self.shared = SwiGLU(D, n_shared) if n_shared else None

    def init_weights(self, std: float = 0.02) -> None:
        for w in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(w, std=std)
        self.router_bias.zero_()

    def route(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns expert ids (N, K), gate weights (N, K) and the unbiased scores (N, E)."""
        logits_NE = self.router(x_ND).float()
        scores_NE = logits_NE.softmax(-1) if self.score == "softmax" else logits_NE.sigmoid()
        idx_NK = (scores_NE + self.router_bias).topk(self.top_k, dim=-1).indices
        gates_NK = scores_NE.gather(-1, idx_NK)
        gates_NK = gates_NK / gates_NK.sum(-1, keepdim=True)
        return idx_NK, gates_NK, scores_NE

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the output (N, D), the per-expert load (E,) and the balance loss (scalar)."""
        idx_NK, gates_NK, scores_NE = self.route(x_ND)
        load_E = torch.bincount(idx_NK.flatten(), minlength=self.n_experts)
        # one pass: sort the N*K assignments by expert, run each expert on its contiguous slice
        order = idx_NK.flatten().argsort(stable=True)
        token = order // self.top_k
        x_sorted = x_ND[token]
        outs = []
        for e, x_e in enumerate(x_sorted.split(load_E.tolist())):  # the call's only host sync
            if x_e.shape[0]:
                h = F.silu(x_e @ self.w_gate[e].T) * (x_e @ self.w_up[e].T)
                outs.append(h @ self.w_down[e].T)
        y_sorted = torch.cat(outs) * gates_NK.flatten()[order].unsqueeze(-1).to(x_ND.dtype)
        out_ND = torch.zeros_like(x_ND).index_add(0, token, y_sorted)
        if self.shared is not None:
            out_ND = out_ND + self.shared(x_ND)
        return out_ND, load_E, self._balance_loss(load_E, scores_NE)

    def _balance_loss(self, load_E: torch.Tensor, scores_NE: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.balance_weight):
            return scores_NE.new_zeros(())
        frac_E = load_E.float() / load_E.sum()
        prob_E = (scores_NE / scores_NE.sum(-1, keepdim=True)).mean(0)
        return self.balance_weight * self.n_experts * (frac_E * prob_E).sum()

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor) -> None:
        """Aux-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded ones."""
        load_E = load_E.to(self.router_bias.device, torch.float32)
        self.router_bias += self.bias_rate * torch.sign(load_E.mean() - load_E)


def reference_moe(moe: MoE, x_ND: torch.Tensor) -> torch.Tensor:
    """A plain per-token, per-expert loop: the parity reference for the grouped dispatch."""
    idx_NK, gates_NK, _ = moe.route(x_ND)
    out = torch.zeros_like(x_ND)
    for n in range(x_ND.shape[0]):
        for k in range(moe.top_k):
            e = int(idx_NK[n, k])
            h = F.silu(moe.w_gate[e] @ x_ND[n]) * (moe.w_up[e] @ x_ND[n])
            out[n] += gates_NK[n, k].to(x_ND.dtype) * (moe.w_down[e] @ h)
    return out if moe.shared is None else out + moe.shared(x_ND)
