"""MoLEFFN: equal to the per-expert reference for every gate_mode and routing, forward and all
gradients; equal to the wrapped LlamaMLP at init; from_mlp shares and freezes; compile runs."""

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICES, assert_close, assert_equal

from mole_ext import MoLEFFN, load_balance_loss, reference as ref


def randomise_lora(m: MoLEFFN, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (m.gate_proj, m.up_proj, m.down_proj):
            p.lora_B.copy_(torch.randn(p.lora_B.shape, generator=g) * 0.2)
        m.router.weight.copy_(torch.randn(m.router.weight.shape, generator=g))
    return m


def reference_forward(m: MoLEFFN, x, training=False):
    proj = lambda p: ref.Projection(p.weight, p.bias, p.lora_A, p.lora_B)
    return ref.mole_ffn(x, m.router.weight, m.router.bias, proj(m.gate_proj), proj(m.up_proj), proj(m.down_proj),
                        m.scaling, m.act_fn, m.gate_mode, m.routing, m.dropout, training)


def trainable_grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gate_mode", ["prob", "none", "straight_through"])
@pytest.mark.parametrize("routing", ["top1", "dense"])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_matches_reference_forward_and_gradients(device, gate_mode, routing, k):
    torch.manual_seed(k)
    m = randomise_lora(MoLEFFN(24, 40, k, 4, 8.0, gate_mode=gate_mode, routing=routing)).to(device)
    x = torch.randn(3, 11, 24, device=device)
    up = torch.randn(3, 11, 24, device=device)

    xa = x.clone().requires_grad_()
    y = m(xa)
    (y * up).sum().backward()
    grads = trainable_grads(m)
    probs, expert = m.last_routing
    m.zero_grad()

    xb = x.clone().requires_grad_()
    y_ref, probs_ref, expert_ref = reference_forward(m, xb)
    (y_ref * up).sum().backward()
    grads_ref = trainable_grads(m)

    assert_close(y, y_ref, msg="output")
    assert_equal(expert, expert_ref, "expert")
    assert_close(probs, probs_ref, msg="probs")
    assert_close(xa.grad, xb.grad, atol=1e-5, msg="grad x")
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert_close(grads[name], grads_ref[name], atol=1e-5, msg=f"grad {name}")
    if gate_mode == "none" and routing == "top1":
        assert "router.weight" not in grads, "gate_mode='none': the task loss must not reach the router"
    elif k > 1:
        assert grads["router.weight"].abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_reference(device, dtype):
    m = randomise_lora(MoLEFFN(32, 48, 4, 8, 16.0)).to(device=device, dtype=dtype)
    x = torch.randn(2, 17, 32, device=device, dtype=dtype)
    y = m(x)
    y_ref, _, expert_ref = reference_forward(m, x)
    assert y.dtype == dtype
    assert_equal(m.last_routing.expert, expert_ref)
    assert m.last_routing.probs.dtype == torch.float32
    assert_close(y, y_ref, dtype=dtype)


def test_fresh_module_equals_wrapped_llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = LlamaConfig(hidden_size=32, intermediate_size=56, hidden_act="silu", num_attention_heads=4)
    mlp = LlamaMLP(cfg)
    x = torch.randn(2, 9, 32)
    for routing in ("top1", "dense"):
        m = MoLEFFN.from_mlp(mlp, num_experts=3, rank=4, alpha=8, routing=routing)
        assert_close(m(x), mlp(x), msg=routing)
    # shared, frozen base weights (no copy), LlamaMLP key names
    assert m.gate_proj.weight is mlp.gate_proj.weight and not mlp.gate_proj.weight.requires_grad
    assert m.down_proj.weight.data_ptr() == mlp.down_proj.weight.data_ptr()
    missing, unexpected = m.load_state_dict(mlp.state_dict(), strict=False)
    assert not unexpected
    assert set(missing) == {f"{p}.{w}" for p in ("gate_proj", "up_proj", "down_proj") for w in ("lora_A", "lora_B")} \
        | {"router.weight", "router.bias"}


def test_from_mlp_with_bias_and_custom_act():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = LlamaConfig(hidden_size=16, intermediate_size=24, hidden_act="gelu", mlp_bias=True, num_attention_heads=4)
    mlp = LlamaMLP(cfg)
    m = randomise_lora(MoLEFFN.from_mlp(mlp, 2, 4, 4.0))
    assert m.gate_proj.bias is mlp.gate_proj.bias
    x = torch.randn(13, 16)
    y_ref, _, _ = reference_forward(m, x)
    assert_close(m(x), y_ref)


def test_init_and_attributes():
    m = MoLEFFN(64, 96, 4, 8, 16.0, dropout=0.1, gate_mode="straight_through")
    assert m.scaling == 2.0 and m.num_experts == 4 and m.rank == 8
    assert m.gate_mode == "straight_through" and m.routing == "top1"
    assert m.gate_proj.lora_A.shape == (4, 8, 64) and m.gate_proj.lora_B.shape == (4, 96, 8)
    assert m.down_proj.lora_A.shape == (4, 8, 96) and m.down_proj.lora_B.shape == (4, 64, 8)
    assert m.router.weight.shape == (4, 64) and m.router.bias is not None
    assert not m.gate_proj.weight.requires_grad and m.gate_proj.lora_A.requires_grad
    assert torch.count_nonzero(m.up_proj.lora_B) == 0
    # PEFT's A init per expert: kaiming_uniform(a=sqrt(5)) on [r, in] -> U(-1/sqrt(in), 1/sqrt(in))
    bound = 1 / 64 ** 0.5
    a = m.gate_proj.lora_A
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    assert not torch.equal(a[0], a[1])


def test_k1_prob_gate_is_plain_lora():
    m = randomise_lora(MoLEFFN(16, 24, 1, 4, 8.0))
    with torch.no_grad():
        m.gate_proj.lora_A.normal_()
    x = torch.randn(10, 16)

    def lora(z, p):
        return F.linear(z, p.weight) + m.scaling * (z @ p.lora_A[0].T) @ p.lora_B[0].T

    plain = lora(F.silu(lora(x, m.gate_proj)) * lora(x, m.up_proj), m.down_proj)
    assert_close(m(x), plain)
    assert torch.all(m.last_routing.probs == 1)


def test_last_routing_and_balance_loss_train_router():
    m = randomise_lora(MoLEFFN(16, 24, 4, 4, 8.0, gate_mode="none"))
    x = torch.randn(2, 7, 16)
    m(x)
    probs, expert = m.last_routing
    assert probs.shape == (14, 4) and expert.shape == (14,) and expert.dtype == torch.int32
    assert probs.requires_grad
    mask = torch.ones(14, dtype=torch.bool)
    mask[-3:] = False
    loss = load_balance_loss(probs, expert, mask)
    loss.backward()
    assert m.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("routing", ["top1", "dense"])
def test_zero_tokens_and_one_token(routing):
    m = randomise_lora(MoLEFFN(8, 12, 3, 2, 2.0, routing=routing))
    y = m(torch.randn(0, 8, requires_grad=True))
    assert y.shape == (0, 8)
    y.sum().backward()
    x1 = torch.randn(1, 1, 8)
    y_ref, _, _ = reference_forward(m, x1)
    assert_close(m(x1), y_ref)


def test_dropout_only_in_training_and_only_on_lora_input():
    m = randomise_lora(MoLEFFN(16, 24, 3, 4, 8.0, dropout=0.5))
    x = torch.randn(40, 16)
    m.eval()
    y_ref, _, _ = reference_forward(m, x, training=False)
    assert_close(m(x), y_ref, msg="eval mode applies no dropout")
    m.train()
    torch.manual_seed(1)
    y1 = m(x)
    torch.manual_seed(2)
    y2 = m(x)
    assert not torch.allclose(y1, y2), "training-mode dropout must draw new masks"
    assert not torch.allclose(y1, y_ref)
    # With B = 0 the LoRA branch is zero, so dropout (on the LoRA input only) changes nothing.
    fresh = MoLEFFN(16, 24, 3, 4, 8.0, dropout=0.5).train()
    base = ref.base_ffn(x, fresh.gate_proj.weight, fresh.up_proj.weight, fresh.down_proj.weight)
    assert_close(fresh(x), base)


@pytest.mark.parametrize("kw,match", [
    (dict(gate_mode="soft"), "gate_mode must be one of"),
    (dict(routing="top2"), "routing must be one of"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(hidden_act="tanhh"), "hidden_act must be one of"),
])
def test_bad_constructor_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        MoLEFFN(8, 12, 2, 2, 4.0, **kw)
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
        MoLEFFN(8, 12, 2, 0, 4.0)
    with pytest.raises(ValueError, match="num_experts must be an int >= 1"):
        MoLEFFN(8, 12, 0, 2, 4.0)


def test_bad_forward_input():
    m = MoLEFFN(8, 12, 2, 2, 4.0)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., hidden_size=8\]"):
        m(torch.randn(3, 9))
    with pytest.raises(TypeError, match="mlp.gate_proj to be an nn.Linear"):
        MoLEFFN.from_mlp(torch.nn.Module(), 2, 2, 4.0)


def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    m = randomise_lora(MoLEFFN(16, 24, 3, 4, 8.0))
    x = torch.randn(2, 5, 16)
    eager = m(x)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    xc = x.clone().requires_grad_()
    out = compiled(xc)
    assert_close(out, eager)
    out.sum().backward()
    assert xc.grad is not None and m.gate_proj.lora_A.grad is not None
    assert_equal(m.last_routing.expert, torch.ops.mole_ext.router_top1(
        F.linear(x.reshape(-1, 16), m.router.weight, m.router.bias))[1])


@pytest.mark.slow
def test_torch_compile_inductor_runs():
    torch._dynamo.reset()
    m = randomise_lora(MoLEFFN(16, 24, 3, 4, 8.0))
    x = torch.randn(4, 16)
    assert_close(torch.compile(m)(x), m(x))


def test_every_trainable_parameter_gets_a_gradient_even_for_unused_experts():
    """DDP/FSDP reduce the same parameter set on every rank: an expert that no token of this
    rank's batch reached must still get a (zero) gradient, never None."""
    m = randomise_lora(MoLEFFN(16, 24, 4, 4, 8.0))
    with torch.no_grad():
        m.router.bias.copy_(torch.tensor([0.0, 0.0, 50.0, 0.0]))  # every token -> expert 2
    m(torch.randn(9, 16)).sum().backward()
    assert torch.all(m.last_routing.expert == 2)
    for name, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
    for proj in (m.gate_proj, m.up_proj, m.down_proj):
        for e in (0, 1, 3):
            assert_equal(proj.lora_A.grad[e], torch.zeros_like(proj.lora_A.grad[e]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("routing", ["top1", "dense"])
def test_autocast_bf16_matches_reference_and_routes_in_float32(routing, device):
    """Mixed precision: float32 module under bf16 autocast (how Trainer runs bf16 on GPU)."""
    m = randomise_lora(MoLEFFN(32, 48, 3, 8, 16.0, routing=routing)).to(device)
    x = torch.randn(2, 9, 32).to(device).requires_grad_(True)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = m(x)
        y_ref, probs_ref, expert_ref = reference_forward(m, x.detach())
    assert y.dtype == torch.bfloat16
    # the router ignores autocast: identical float32 routing to the float32 reference outside it
    _, probs32, expert32 = reference_forward(m, x.detach())
    assert m.last_routing.probs.dtype == torch.float32
    assert_equal(m.last_routing.expert, expert32)
    assert_close(m.last_routing.probs, probs32)
    assert_close(y.float(), reference_forward(m, x.detach())[0], dtype=torch.bfloat16, atol=5e-2, rtol=5e-2)
    y.float().sum().backward()
    assert m.gate_proj.lora_A.grad.dtype == torch.float32 and m.gate_proj.lora_A.grad.abs().sum() > 0
    assert x.grad is not None and m.router.weight.grad is not None


class SingleLoRAFFN(torch.nn.Module):
    """The baseline of issue 4's memory rule: the frozen FFN with one plain LoRA per projection,
    computed the way PEFT does (base linear + lora_B(lora_A(x)) * scaling)."""

    def __init__(self, m: MoLEFFN, dropout: float = 0.0):
        super().__init__()
        self.m, self.dropout = m, dropout
        self.a = torch.nn.ParameterDict({n: torch.nn.Parameter(getattr(m, n).lora_A[0].detach().clone())
                                         for n in ("gate_proj", "up_proj", "down_proj")})
        self.b = torch.nn.ParameterDict({n: torch.nn.Parameter(getattr(m, n).lora_B[0].detach().clone())
                                         for n in ("gate_proj", "up_proj", "down_proj")})

    def forward(self, x):
        def proj(z, n):
            z_lora = F.dropout(z, self.dropout, self.training) if self.dropout else z
            return F.linear(z, getattr(self.m, n).weight) + F.linear(F.linear(z_lora, self.a[n]), self.b[n]) * self.m.scaling

        return proj(F.silu(proj(x, "gate_proj")) * proj(x, "up_proj"), "down_proj")


def saved_bytes_per_token(module, d, autocast=False, n1=64, n2=192, device="cpu"):
    """Bytes autograd saves for the backward per token: the difference of two token counts, so
    parameters (and their casts) cancel; each storage counts once however many nodes save it."""
    def measure(n):
        # An intermediate, as in a model: autocast caches its casts of leaves (not of intermediates).
        x = torch.randn(n, d, device=device, requires_grad=True) * 1.0
        storages = {}

        def pack(t):
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            module(x)
        return sum(storages.values())

    return (measure(n2) - measure(n1)) / (n2 - n1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("gate_mode", ["prob", "none", "straight_through"])
def test_saved_activations_at_most_single_lora_plus_routing_state(autocast, gate_mode, device):
    """Issue 4: a MoLE FFN saves no more for the backward than a single-LoRA FFN of the same
    rank, plus O(N K) routing state. One extra [N, d] tensor (x in token order next to x sorted,
    or a float32 copy of x for the router) is 4 d = 512 bytes per token here and fails this."""
    d, m, k = 128, 160, 4
    mole = randomise_lora(MoLEFFN(d, m, k, 8, 16.0, gate_mode=gate_mode)).to(device)
    single = SingleLoRAFFN(mole)
    mole_b = saved_bytes_per_token(mole, d, autocast, device=device)
    single_b = saved_bytes_per_token(single, d, autocast, device=device)
    routing_state = 8 * (k + 8)  # probs, expert, sorted_token, gate values and their indices, in 8-byte words
    assert mole_b <= single_b + routing_state, (mole_b, single_b)
    # and the measurement sees activations at all: at least the SwiGLU's [N, m] tensors
    assert single_b >= 3 * m * (2 if autocast else 4)


@pytest.mark.parametrize("autocast", [False, True])
def test_saved_activations_with_lora_dropout(autocast):
    """With LoRA dropout the LoRA saves drop(x) instead of x, as PEFT's does; MoLE then keeps x
    (in expert order) for one more reason, the router weight's gradient: one [N, d] tensor above
    the single-LoRA FFN, in x's dtype, plus the routing state. This pins that cost down."""
    d, m, k = 128, 160, 4
    mole = randomise_lora(MoLEFFN(d, m, k, 8, 16.0, dropout=0.1)).train()
    single = SingleLoRAFFN(mole, dropout=0.1).train()
    mole_b = saved_bytes_per_token(mole, d, autocast)
    single_b = saved_bytes_per_token(single, d, autocast)
    routing_state = 8 * (k + 8)
    assert mole_b <= single_b + 4 * d + routing_state, (mole_b, single_b)
