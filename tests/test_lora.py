"""The shared-A LoRA layer: tying, routing, gradients, and equality with plain PEFT LoRA per role."""
import pytest
import torch
import transformers

from lragent.train.lora import LoraSpec, inject_lora, lora_modules, lora_state, roles, set_shared_a_frozen

ROLES = ["planner", "actor", "reflector"]


def _model(base):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)


def _randomise_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            for b in m.lora_B:
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)


def test_shared_a_is_one_tensor_and_gets_gradients_from_every_role(tiny_base):
    model = _model(tiny_base)
    mods = inject_lora(model, LoraSpec(roles=ROLES, rank=4))
    _randomise_b(model)
    v = mods["model.layers.0.self_attn.v_proj"]
    q = mods["model.layers.0.self_attn.q_proj"]
    assert v.shared and len(v.lora_A) == 1 and len(v.lora_B) == 3
    assert not q.shared and len(q.lora_A) == 3
    # Every role reads the very same storage for A on a shared target.
    ptrs = {v.a(k).data_ptr() for k in range(3)}
    assert len(ptrs) == 1
    ids = torch.randint(5, 100, (3, 12))
    grads = []
    for k in range(3):  # the gradient of the shared A from each role alone is non-zero...
        model.zero_grad(set_to_none=True)
        with roles(model, torch.tensor([k])):
            model(input_ids=ids[k:k + 1]).logits.square().mean().backward()
        grads.append(v.lora_A[0].grad.clone())
        assert grads[-1].abs().sum() > 0
        # ...and the other roles' B receive none (so the optimizer leaves them untouched).
        assert all(v.lora_B[j].grad is None for j in range(3) if j != k)
    # A mixed batch: the shared A's gradient is the sum of the per-role gradients.
    model.zero_grad(set_to_none=True)
    with roles(model, torch.tensor([0, 1, 2])):
        model(input_ids=ids).logits.square().mean().backward()
    torch.testing.assert_close(v.lora_A[0].grad * 3, sum(grads), rtol=1e-4, atol=1e-7)
    assert all(v.lora_B[j].grad is not None for j in range(3))


def test_freeze_shared_a_blocks_its_gradient_only(tiny_base):
    model = _model(tiny_base)
    mods = inject_lora(model, LoraSpec(roles=ROLES, rank=4))
    _randomise_b(model)
    set_shared_a_frozen(model, True)
    with roles(model, torch.tensor([1])):
        model(input_ids=torch.randint(5, 100, (1, 8))).logits.sum().backward()
    assert mods["model.layers.1.self_attn.k_proj"].lora_A[0].grad is None
    assert mods["model.layers.1.self_attn.q_proj"].lora_A[1].grad is not None


@pytest.mark.parametrize("rslora", [False, True])
def test_each_role_equals_plain_peft(tiny_base, rslora):
    import peft

    spec = LoraSpec(roles=ROLES, rank=4, alpha=8, rslora=rslora,
                    targets=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"])
    model = _model(tiny_base)
    inject_lora(model, spec, seed=3)
    _randomise_b(model)
    state = lora_state(model, ROLES)
    ids = torch.randint(5, 150, (3, 17))
    with torch.no_grad(), roles(model, torch.tensor([0, 1, 2])):
        mixed = model(input_ids=ids).logits
    for k, role in enumerate(ROLES):
        ref = peft.get_peft_model(_model(tiny_base), peft.LoraConfig(
            r=4, lora_alpha=8, use_rslora=rslora, target_modules=spec.targets, lora_dropout=0.0))
        with torch.no_grad():
            for name, mod in ref.named_modules():
                if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                    path = name.removeprefix("base_model.model.")
                    a = state.get(f"{path}.lora_A", state.get(f"{path}.lora_A.{role}"))
                    mod.lora_A["default"].weight.copy_(a)
                    mod.lora_B["default"].weight.copy_(state[f"{path}.lora_B.{role}"])
            want = ref(input_ids=ids[k:k + 1]).logits
        assert (mixed[k:k + 1] - want).abs().max().item() <= 1e-5
        with torch.no_grad(), roles(model, torch.tensor([k])):
            alone = model(input_ids=ids[k:k + 1]).logits
        assert (alone - want).abs().max().item() <= 1e-5
    with torch.no_grad(), roles(model, None):  # adapters off == the base model
        base = model(input_ids=ids).logits
    torch.testing.assert_close(base, _model(tiny_base)(input_ids=ids).logits)


def test_targets_must_exist(tiny_base):
    with pytest.raises(ValueError, match="not Linear modules"):
        inject_lora(_model(tiny_base), LoraSpec(roles=ROLES, targets=["q_proj", "nope"], share_a=[]))


def test_one_role_gradients_equal_plain_peft(tiny_base):
    """Training one role through the shared-A layer computes PEFT's gradients for that role's A and B."""
    import peft

    spec = LoraSpec(roles=ROLES, rank=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = _model(tiny_base)
    inject_lora(model, spec, seed=5)
    _randomise_b(model, seed=6)
    state = lora_state(model, ROLES)
    ids = torch.randint(5, 150, (2, 15))
    k, role = 1, "actor"
    with roles(model, torch.tensor([k, k])):
        model(input_ids=ids, labels=ids).loss.backward()
    ref = peft.get_peft_model(_model(tiny_base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=spec.targets,
                                                                 lora_dropout=0.0))
    pairs = []
    for name, mod in ref.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            path = name.removeprefix("base_model.model.")
            with torch.no_grad():
                mod.lora_A["default"].weight.copy_(state.get(f"{path}.lora_A", state.get(f"{path}.lora_A.{role}")))
                mod.lora_B["default"].weight.copy_(state[f"{path}.lora_B.{role}"])
            pairs.append((path, mod))
    ref(input_ids=ids, labels=ids).loss.backward()
    ours = lora_modules(model)
    assert len(pairs) == len(ours) == 4 * 2
    for path, mod in pairs:
        m = ours[path]
        a_grad = m.lora_A[0].grad if m.shared else m.lora_A[k].grad
        torch.testing.assert_close(a_grad, mod.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(m.lora_B[k].grad, mod.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-7)
        assert m.lora_B[k].grad.abs().sum() > 0
