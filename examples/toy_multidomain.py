"""A MoLEFFN learns a toy multi-domain regression (the README's quickstart, runnable).

Three "domains" draw inputs from different regions of the space and want different
corrections on top of one frozen base FFN. A single LoRA has to compromise; MoLE with three
experts can give each domain its own. Prints the task loss, the balance loss and, per domain,
which experts its tokens are routed to.

    python examples/toy_multidomain.py [--steps 300]
"""

import argparse

import torch

from mole_ext import MoLEFFN, load_balance_loss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--experts", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    d, m, domains, n = 32, 64, 3, 96
    centers = torch.randn(domains, d) * 3
    targets = [torch.randn(d, d) * 0.3 for _ in range(domains)]  # each domain's correction

    ffn = MoLEFFN(d, m, num_experts=args.experts, rank=4, alpha=8, gate_mode="prob")
    opt = torch.optim.AdamW([p for p in ffn.parameters() if p.requires_grad], lr=3e-3)

    def batch():
        dom = torch.randint(0, domains, (n,))
        x = centers[dom] + torch.randn(n, d)
        with torch.no_grad():
            y = ffn.gate_proj.weight.new_zeros(n, d)
            base = ffn.down_proj.weight @ (torch.nn.functional.silu(ffn.gate_proj.weight @ x.T) *
                                           (ffn.up_proj.weight @ x.T))
            for k in range(domains):
                y[dom == k] = (base.T + x @ targets[k])[dom == k]
        return x, y, dom

    for step in range(1, args.steps + 1):
        x, y, dom = batch()
        out = ffn(x)
        task = torch.nn.functional.mse_loss(out, y)
        balance = load_balance_loss(*ffn.last_routing)
        (task + 0.01 * balance).backward()
        opt.step()
        opt.zero_grad()
        if step % 50 == 0 or step == 1:
            print(f"step {step:4d}  task loss {task.item():.4f}  balance loss {balance.item():.3f}")

    with torch.no_grad():
        x, _, dom = batch()
        ffn(x)
        expert = ffn.last_routing.expert
        print("share of each domain's tokens per expert:")
        for k in range(domains):
            share = torch.bincount(expert[dom == k].long(), minlength=args.experts).float()
            share = share / share.sum().clamp_min(1)
            print(f"  domain {k}: " + "  ".join(f"e{e}={s:.2f}" for e, s in enumerate(share.tolist())))


if __name__ == "__main__":
    main()
