"""The fused LoRA gated MLP computes what PEFT + transformers compute, keeps less for backward, and steps aside
whenever it would not compute the same thing."""

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from mi_tune.fused import GatedLoraMLP, fuse_gated_mlps, unfuse_gated_mlps

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_LAYERS, HIDDEN, INTER = 3, 32, 96


def tiny_peft(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=120, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=N_LAYERS,
                      num_attention_heads=4, num_key_value_heads=2)
    # adapters on blocks 0..L-2, the final block frozen, as mi_tune trains
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=PROJ,
                                                             layers_to_transform=list(range(N_LAYERS - 1))))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; a nonzero B makes every LoRA term count
            torch.nn.init.normal_(p, std=0.2)
    return model.train()


def loss_and_grads(model, ids, mask):
    model.zero_grad()
    hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    loss = (hidden * torch.linspace(-1, 1, hidden.shape[-1])).sin().sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 120, (4, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding
    return ids, mask


def saved_bytes(fn) -> int:
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_mlp_matches_peft_forward_and_gradients(checkpointing):
    model = tiny_peft()
    if checkpointing:
        model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, mask = batch()
    ref_loss, ref = loss_and_grads(model, ids, mask)
    assert fuse_gated_mlps(model) == N_LAYERS
    calls = []
    original = GatedLoraMLP.forward
    GatedLoraMLP.forward = staticmethod(lambda *a: calls.append(1) or original(*a))
    try:
        loss, got = loss_and_grads(model, ids, mask)
    finally:
        GatedLoraMLP.forward = staticmethod(original)
    assert len(calls) == N_LAYERS * (2 if checkpointing else 1)  # the fused op ran in every block (twice: recomputed)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert ref.keys() == got.keys()
    mlp_lora = [n for n in ref if "mlp" in n and "lora" in n]
    assert len(mlp_lora) == 2 * 3 * (N_LAYERS - 1)  # A and B of gate/up/down in the adapted blocks
    for name in ref:
        scale = ref[name].abs().max().item()
        assert scale > 0, name
        assert (got[name] - ref[name]).abs().max().item() <= 1e-5 * scale, name
    unfuse_gated_mlps(model)
    again, _ = loss_and_grads(model, ids, mask)
    assert again.item() == ref_loss.item()


def test_fused_mlp_keeps_two_fewer_intermediates_per_block():
    model = tiny_peft()
    ids, mask = batch()
    run = lambda: model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1].sum()  # noqa: E731
    _, plain = saved_bytes(run)
    fuse_gated_mlps(model)
    _, fused = saved_bytes(run)
    one = ids.numel() * INTER * 4  # one float32 (tokens x intermediate) tensor
    # PEFT keeps gate, silu(gate), up and (for down's LoRA) their product; the fused op keeps gate and up.
    # The frozen final block has no LoRA on down, so there the product is not kept either way: one fewer.
    assert plain - fused >= (2 * (N_LAYERS - 1) + 1) * one * 0.9, (plain, fused)


def test_fused_mlp_with_lora_dropout_matches_the_same_masks():
    """Dropout > 0: the fused op draws keep-masks with rand_like in the order gate, up, down; a plain-autograd
    reference drawing the same masks must give the same output and gradients."""
    model = tiny_peft(dropout=0.3)
    mlp = model.base_model.model.model.layers[0].mlp
    x = torch.randn(2, 5, HIDDEN, requires_grad=True)
    fuse_gated_mlps(model)
    torch.manual_seed(11)
    y = mlp(x)
    (y.sin().sum()).backward()
    got = {n: p.grad.clone() for n, p in mlp.named_parameters() if p.requires_grad} | {"x": x.grad.clone()}

    mlp.zero_grad()
    x.grad = None
    torch.manual_seed(11)
    x2 = x.reshape(-1, HIDDEN)

    def proj(layer, inp):
        keep = torch.rand_like(inp) >= 0.3
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        return F.linear(inp, layer.base_layer.weight) + (inp * keep / 0.7) @ a.t() @ b.t() * layer.scaling["default"]

    h = F.silu(proj(mlp.gate_proj, x2)) * proj(mlp.up_proj, x2)
    ref_y = proj(mlp.down_proj, h).reshape(2, 5, HIDDEN)
    (ref_y.sin().sum()).backward()
    ref = {n: p.grad.clone() for n, p in mlp.named_parameters() if p.requires_grad} | {"x": x.grad.clone()}
    assert torch.allclose(y, ref_y, atol=1e-6)
    assert len(ref) == 7
    for name in ref:
        assert torch.allclose(got[name], ref[name], atol=1e-5, rtol=1e-5), name
    # and dropout really dropped: in eval mode (no dropout) the output differs
    mlp.eval()
    with torch.enable_grad():
        assert not torch.allclose(mlp(x), y)


def test_fused_mlp_steps_aside_when_it_would_differ():
    model = tiny_peft()
    ids, mask = batch()
    ref_loss, _ = loss_and_grads(model, ids, mask)
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids, attention_mask=mask).logits
    fuse_gated_mlps(model)
    calls = []
    original = GatedLoraMLP.forward
    GatedLoraMLP.forward = staticmethod(lambda *a: calls.append(1) or original(*a))
    try:
        with torch.no_grad():  # inference: the module's own forward
            model(input_ids=ids, attention_mask=mask)
        assert calls == []
        with model.disable_adapter():  # adapters off: the fused op runs base-only and matches the base model
            off = model(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(off, base, atol=1e-5)
        n = len(calls)
        two = copy.deepcopy(model)
        two.add_adapter("second", LoraConfig(r=2, target_modules=PROJ, layers_to_transform=list(range(N_LAYERS - 1))))
        two.base_model.set_adapter(["default", "second"])  # two active adapters: plain PEFT forward in blocks 0..L-2
        two(input_ids=ids, attention_mask=mask)
        assert len(calls) == n + 1  # only the final block (no adapters, frozen) went through the fused op
    finally:
        GatedLoraMLP.forward = staticmethod(original)
    again, _ = loss_and_grads(model, ids, mask)
    assert again.item() == pytest.approx(ref_loss.item(), rel=1e-6)


def test_recipe_switch_turns_fusion_off():
    from mi_tune.config import LoraSettings
    from mi_tune.modeling import LoadedModel, add_adapters
    from mi_tune.sources import ModelLocation

    def adapted(fused):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1))
        loaded = LoadedModel(model=model, tokenizer=None, kind="decoder", num_blocks=2, dtype=torch.float32, device=torch.device("cpu"),
                             location=ModelLocation(path="tiny", gguf_file=None, revision=None, is_local=True, spec="tiny"))
        peft = add_adapters(loaded, LoraSettings(fused_mlp=fused, target_modules=PROJ))
        return sum("forward" in m.__dict__ for m in peft.modules())

    assert adapted(True) == 2 and adapted(False) == 0


def test_unfusable_projections_are_left_alone():
    dora = get_peft_model(LlamaForCausalLM(LlamaConfig(vocab_size=120, hidden_size=HIDDEN, intermediate_size=INTER,
                                                       num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2)),
                          LoraConfig(r=4, use_dora=True, target_modules=PROJ, layers_to_transform=list(range(N_LAYERS - 1))))
    assert fuse_gated_mlps(dora) == 1  # only the final block, which has no (DoRA) adapters


def test_quantized_base_is_left_alone():
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    from .conftest import TINY

    model = LlamaForCausalLM.from_pretrained(TINY, quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map={"": "cpu"})
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=PROJ))
    assert fuse_gated_mlps(peft) == 0  # bitsandbytes Linear4bit bases: the plain PEFT forward, and the log says nothing
