"""The fused LM head (tidpo.LMHead / FusedLogits): every op and loss from hidden states, against the materialised
head computed in float64 (values and gradients w.r.t. the hidden states and, when trained, the head).

The truth is always ``tidpo.reference`` on ``head.logits(hidden)`` in float64: plain torch, no tiles, no online
softmax, no folded gradients.
"""

from __future__ import annotations

import pytest
import torch

import tidpo
from tests.conftest import IGNORE, assert_rel_close, assert_within_torch_error, max_err
from tidpo import reference as R
from tidpo.ops import FusedLogits, LMHead

HEADS = {"plain": {}, "scale": {"scale": 0.3}, "softcap": {"softcap": 4.0}, "both": {"scale": 2.5, "softcap": 3.0}}


def make_case(rows=4, length=9, hidden=12, vocab=37, *, dtype=torch.float32, bias=True, trained=False,
              seed=0, head_kw=None):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, length, hidden, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g, dtype=torch.float64) * 0.7).to(dtype).requires_grad_(trained)
    b = (torch.randn(vocab, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_(trained) if bias else None
    labels = torch.randint(0, vocab, (rows, length), generator=g)
    labels[0, :3] = IGNORE  # a prompt
    labels[1] = IGNORE  # a fully masked row
    labels[:, -1] = IGNORE  # padding
    return h, LMHead(w, b, **(head_kw or {})), labels


def _leaves(h, head):
    return [x for x in (h, head.weight, head.bias) if x is not None and x.requires_grad]


def _grads(value, leaves, seed=1):
    g = torch.randn(value.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.autograd.grad((value * g.to(value.device, value.dtype)).sum(), leaves)


def _float64(h, head):
    """The same inputs in float64, fresh leaves: the reference computation."""
    h64 = h.detach().double().requires_grad_(h.requires_grad)
    w64 = head.weight.detach().double().requires_grad_(head.weight.requires_grad)
    b64 = None if head.bias is None else head.bias.detach().double().requires_grad_(head.bias.requires_grad)
    return h64, LMHead(w64, b64, scale=head.scale, softcap=head.softcap)


# ----------------------------------------------------------------------------------------------------------
# ops


@pytest.mark.parametrize("head_kw", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("trained", [False, True], ids=["frozen", "trained"])
@pytest.mark.parametrize("chunk", [5, 37, None], ids=["chunk5", "chunk37", "default"])
def test_logps_match_the_materialised_head_fp32(head_kw, trained, chunk):
    h, head, labels = make_case(trained=trained, head_kw=head_kw)
    ours = tidpo.token_logps(head(h), labels, chunk_size=chunk)
    h64, head64 = _float64(h, head)
    truth = R.token_logps(head64.logits(h64), labels)
    assert_rel_close(ours, truth, 1e-5, "logps")
    assert (ours[labels == IGNORE] == 0).all()
    for a, b, name in zip(_grads(ours, _leaves(h, head)), _grads(truth, _leaves(h64, head64)), "hWb", strict=False):
        assert_rel_close(a, b, 1e-5, f"d logps / d {name}")


@pytest.mark.parametrize("direction", ["ref||policy", "policy||ref"])
@pytest.mark.parametrize("head_kw", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("trained", [False, True], ids=["frozen", "trained"])
def test_kl_matches_the_materialised_heads_fp32(direction, head_kw, trained):
    h, head, labels = make_case(trained=trained, head_kw=head_kw)
    # The reference: other hidden states and another (frozen) head, as a separate reference model has.
    h_ref, ref_head, _ = make_case(seed=3, head_kw=head_kw)
    h_ref, ref_head = h_ref.detach(), ref_head.detach()
    pair = (ref_head(h_ref), head(h)) if direction == "ref||policy" else (head(h), ref_head(h_ref))
    ours = tidpo.token_kl(*pair, labels, chunk_size=6)
    h64, head64 = _float64(h, head)
    r64 = LMHead(ref_head.weight.double(), ref_head.bias.double(), scale=ref_head.scale,
                 softcap=ref_head.softcap).logits(h_ref.double())
    p64, q64 = (r64, head64.logits(h64)) if direction == "ref||policy" else (head64.logits(h64), r64)
    truth = R.token_kl(p64, q64, labels)
    assert_rel_close(ours, truth, 1e-5, "kl")
    for a, b, name in zip(_grads(ours, _leaves(h, head)), _grads(truth, _leaves(h64, head64)), "hWb", strict=False):
        assert_rel_close(a, b, 1e-5, f"d kl / d {name}")


def test_kl_of_identical_inputs_is_exactly_zero():
    h, head, labels = make_case()
    kl = tidpo.token_kl(head(h).detach(), head(h), labels)
    assert (kl == 0).all()
    (grad,) = torch.autograd.grad(kl.sum(), h)
    assert grad.abs().max() < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_the_materialised_heads_own_error(dtype):
    """bf16 / fp16 hidden states and head: the fused ops are no further from float64 than the materialised
    head in that dtype (its logits rounded to the dtype) is."""
    h, head, labels = make_case(rows=4, length=16, hidden=64, vocab=300, dtype=dtype, head_kw={"softcap": 8.0})
    h64, head64 = _float64(h, head)
    truth = R.token_logps(head64.logits(h64), labels)
    ours = tidpo.token_logps(head(h), labels, chunk_size=64)
    torch_in_dtype = tidpo.token_logps(head.logits(h), labels)
    assert_within_torch_error(ours, truth, torch_in_dtype, what="logps")
    (g_ours,) = _grads(ours, [h])
    (g_truth,) = _grads(truth, [h64])
    (g_torch,) = _grads(torch_in_dtype, [h])
    assert_within_torch_error(g_ours, g_truth, g_torch, what="d logps / d hidden")


def test_bf16_operands_give_fp32_products_over_many_vocabulary_tiles():
    """The matmuls take bf16 operands (as the materialised head's) but their products are not rounded to bf16,
    neither as logits nor per tile before the sums over the vocabulary (65 tiles here): the log-probs equal the
    float64 computation on the same bf16 values to fp32 precision, ~1000x closer than bf16 logits would be."""
    h, head, labels = make_case(rows=4, length=16, hidden=64, vocab=4099, dtype=torch.bfloat16)
    h64, head64 = _float64(h, head)
    truth = R.token_logps(head64.logits(h64), labels)
    assert_rel_close(tidpo.token_logps(head(h), labels, chunk_size=64), truth, 1e-5, "bf16 logps")
    assert max_err(tidpo.token_logps(head.logits(h), labels), truth) > 1e-3  # what rounded logits give


def test_bf16_autocast_runs_the_tiles_in_bf16_like_the_materialised_head():
    h, head, labels = make_case(rows=2, length=8, hidden=32, vocab=200)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = tidpo.token_logps(head(h), labels)
        torch_autocast = tidpo.token_logps(head.logits(h), labels)
    h64, head64 = _float64(h, head)
    truth = R.token_logps(head64.logits(h64), labels)
    fp32 = tidpo.token_logps(head(h), labels)
    assert max_err(ours, fp32) > 1e-4  # the matmul did run in bf16 ...
    assert_within_torch_error(ours, truth, torch_autocast, what="autocast logps")  # ... as the materialised one


def test_packed_and_padded_layouts_and_int32_labels_agree():
    h, head, labels = make_case()
    padded = tidpo.token_logps(head(h), labels)
    packed = tidpo.token_logps(head(h.reshape(-1, h.shape[-1])), labels.reshape(-1).int())
    assert torch.equal(padded.reshape(-1), packed)
    one_row = tidpo.token_logps(head(h.reshape(1, -1, h.shape[-1])), labels.reshape(1, -1))
    assert torch.equal(one_row.reshape(-1), packed)


def test_ignored_positions_are_exact_zeros_whatever_their_hidden_states_hold():
    h, head, labels = make_case()
    poisoned = h.detach().clone()
    poisoned[labels == IGNORE] = torch.nan
    poisoned.requires_grad_()
    logps = tidpo.token_logps(head(poisoned), labels)
    kl = tidpo.token_kl(head(poisoned.detach()), head(poisoned), labels)
    assert torch.isfinite(logps).all() and torch.isfinite(kl).all()
    assert (logps[labels == IGNORE] == 0).all() and (kl[labels == IGNORE] == 0).all()
    (grad,) = torch.autograd.grad(logps.sum() + kl.sum(), poisoned)
    assert (grad[labels == IGNORE] == 0).all() and torch.isfinite(grad).all()


def test_a_masked_vocabulary_through_the_bias_follows_the_minus_inf_rules():
    h, head, labels = make_case(rows=2, length=5, vocab=11)
    bias = head.bias.detach().clone()
    bias[3] = -torch.inf
    labels[labels == 3] = 4
    masked = LMHead(head.weight, bias)
    logps = tidpo.token_logps(masked(h), labels, chunk_size=4)
    truth = R.token_logps(masked.logits(h.detach()).double(), labels)
    assert_rel_close(logps, truth, 1e-5, "logps with a -inf bias entry")
    # KL(p || q) with q_v = 0 where p_v > 0 is +inf; with p_v = 0 the entry contributes 0.
    assert torch.isinf(tidpo.token_kl(head(h), masked(h), labels)[labels != IGNORE]).all()
    kl = tidpo.token_kl(masked(h), head(h), labels, chunk_size=4)
    assert_rel_close(kl, R.token_kl(masked.logits(h.detach()).double(), head.logits(h.detach()).double(), labels),
                     1e-5, "kl with p_v = 0 entries")


def test_gradcheck_float64_frozen_and_trained():
    for trained in (False, True):
        h, head, labels = make_case(rows=2, length=4, hidden=5, vocab=9, dtype=torch.float64, trained=trained,
                                    head_kw={"softcap": 2.0, "scale": 1.5})
        inputs = tuple(_leaves(h, head))

        def logps(*xs, head=head, labels=labels, trained=trained):
            hh, *rest = xs
            w = rest[0] if trained else head.weight
            b = rest[1] if trained else head.bias
            return tidpo.token_logps(LMHead(w, b, scale=1.5, softcap=2.0)(hh), labels, chunk_size=4)

        assert torch.autograd.gradcheck(logps, inputs)


def test_fused_logits_refuse_what_they_cannot_be():
    h, head, labels = make_case()
    with pytest.raises(ValueError, match=r"hidden has size 12 .* \[V, H\] = \(37, 12\)|weight is"):
        LMHead(torch.randn(37, 5))(h)
    with pytest.raises(ValueError, match="softcap must be a finite number > 0"):
        LMHead(head.weight, softcap=0.0)
    with pytest.raises(ValueError, match=r"bias must be a \[V\] = \[37\] tensor"):
        LMHead(head.weight, torch.zeros(3))
    with pytest.raises(TypeError, match="both be logits tensors or both FusedLogits"):
        tidpo.token_kl(head(h), head.logits(h), labels)
    with pytest.raises(RuntimeError, match="backend='triton' was requested for FusedLogits"):
        tidpo.token_logps(head(h), labels, backend="triton")
    with pytest.raises(ValueError, match="only be reshaped in its leading dimensions"):
        head(h).reshape(-1, 5)
    bad = labels.clone()
    bad[0, 5] = 37
    with pytest.raises(ValueError, match="outside \\[0, 37\\)"):
        tidpo.token_logps(head(h), bad)


# ----------------------------------------------------------------------------------------------------------
# losses


def _loss_cases(policy, ref, labels, weights, anchor_pair):
    """``{name: callable(policy_logits, ref_logits, anchor_logits, anchor_ref_logits) -> output}``."""
    packing = None
    return {
        "dpo": lambda p, r, a, ar: tidpo.dpo_loss(p, labels, ref_logits=r),
        "ipo": lambda p, r, a, ar: tidpo.dpo_loss(p, labels, ref_logits=r, loss_type="ipo"),
        "hinge": lambda p, r, a, ar: tidpo.dpo_loss(p, labels, ref_logits=r, loss_type="hinge"),
        "tdpo1": lambda p, r, a, ar: tidpo.tdpo_loss(p, r, labels, variant=1, packing=packing),
        "tdpo2": lambda p, r, a, ar: tidpo.tdpo_loss(p, r, labels, variant=2),
        "tis_dpo": lambda p, r, a, ar: tidpo.tis_dpo_loss(p, labels, weights, ref_logits=r),
        "tis_dpo_token_level": lambda p, r, a, ar: tidpo.tis_dpo_loss(p, labels, weights, ref_logits=r,
                                                                      token_level=True),
        "ti_dpo": lambda p, r, a, ar: tidpo.ti_dpo_loss(
            p, r, labels, weights, gamma=0.5, anchor=tidpo.TripletAnchor(a, anchor_pair[2], ref_logits=ar)),
    }


@pytest.mark.parametrize("name", ["dpo", "ipo", "hinge", "tdpo1", "tdpo2", "tis_dpo", "tis_dpo_token_level",
                                  "ti_dpo"])
def test_every_loss_from_hidden_states_matches_the_materialised_head(name):
    h, head, labels = make_case(rows=4, length=7, head_kw={"softcap": 5.0})
    h_ref = make_case(rows=4, length=7, seed=2)[0].detach()
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(4)) + 0.5
    h_anchor, _, anchor_labels = make_case(rows=2, length=5, seed=5)
    h_anchor_ref = make_case(rows=2, length=5, seed=6)[0].detach()
    anchor_labels[1, :2] = IGNORE
    run = _loss_cases(None, None, labels, weights, (None, None, anchor_labels))[name]
    fused = run(head(h), head(h_ref), head(h_anchor), head(h_anchor_ref))
    materialised = run(head.logits(h), head.logits(h_ref), head.logits(h_anchor), head.logits(h_anchor_ref))
    assert_rel_close(fused.loss, materialised.loss, 1e-5, f"{name} loss")
    for key in ("rewards/chosen", "rewards/rejected"):
        assert_rel_close(fused.metrics[key], materialised.metrics[key], 1e-5, key)
    for a, b in zip(torch.autograd.grad(fused.loss, [h, h_anchor], allow_unused=True),
                    torch.autograd.grad(materialised.loss, [h, h_anchor], allow_unused=True), strict=True):
        if b is None:
            assert a is None or (a == 0).all()
            continue
        assert_rel_close(a, b, 1e-5, f"{name} d loss / d hidden")


def test_packed_loss_from_hidden_states_matches_the_padded_one():
    h, head, labels = make_case(rows=4, length=7)
    h_ref = make_case(rows=4, length=7, seed=2)[0].detach()
    padded = tidpo.tdpo_loss(head(h), head(h_ref), labels)
    lengths = torch.full((4,), 7)
    packing = tidpo.SequencePacking.from_cu_seqlens(torch.cat([torch.zeros(1, dtype=torch.long),
                                                               lengths.cumsum(0)]), 28)
    packed = tidpo.tdpo_loss(head(h.reshape(1, 28, -1)), head(h_ref.reshape(28, -1)), labels.reshape(-1),
                             packing=packing)
    assert_rel_close(packed.loss, padded.loss, 1e-6, "packed vs padded")


# ----------------------------------------------------------------------------------------------------------
# heads read from models


def _tiny(model_type: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=97, hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                  **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type, extra, expected", [
    ("gemma2", {"final_logit_softcapping": 2.0}, {"softcap": 2.0}),
    ("cohere", {"logit_scale": 0.25}, {"scale": 0.25}),
    ("granite", {"logits_scaling": 4.0}, {"scale": 0.25}),
    ("llama", {}, {}),
])
def test_heads_read_from_models_give_the_models_logits(model_type, extra, expected):
    model = _tiny(model_type, **extra)
    head = LMHead.from_model(model)
    assert head.scale == expected.get("scale", 1.0) and head.softcap == expected.get("softcap")
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids).last_hidden_state
        logits = model(input_ids=ids).logits
    assert isinstance(head(hidden), FusedLogits)
    torch.testing.assert_close(head(hidden).materialize(), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_a_lora_adapter_on_the_head_is_refused():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny("llama"), LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    with pytest.raises(ValueError, match=r"peft\S*Linear, not a plain nn.Linear .*fused_lm_head=False"):
        LMHead.from_model(model)
    assert LMHead.from_model(get_peft_model(_tiny("llama"), LoraConfig(r=2, target_modules=["q_proj"]))).scale == 1.0


# ----------------------------------------------------------------------------------------------------------
# GPU: the same checks at a realistic vocabulary (skipped without CUDA)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("trained", [False, True], ids=["frozen", "trained"])
def test_gpu_logps_and_kl_against_float64(dtype, trained):
    h, head, labels = make_case(rows=4, length=128, hidden=256, vocab=32003, dtype=dtype, trained=trained,
                                head_kw={"softcap": 30.0})
    h = h.detach().cuda().requires_grad_()
    head = LMHead(head.weight.detach().cuda().requires_grad_(trained),
                  head.bias.detach().cuda().requires_grad_(trained), softcap=head.softcap)
    labels = labels.cuda()
    h64, head64 = _float64(h, head)
    h_ref = torch.randn(h.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(7)).to(dtype)
    cases = {  # fused, float64 truth, the materialised head in the input dtype
        "logps": (lambda hh, hd: tidpo.token_logps(hd(hh), labels),
                  lambda hh, hd: R.token_logps(hd.logits(hh), labels),
                  lambda hh, hd: tidpo.token_logps(hd.logits(hh), labels)),
        "kl": (lambda hh, hd: tidpo.token_kl(hd.detach()(h_ref), hd(hh), labels),
               lambda hh, hd: R.token_kl(hd.detach().logits(h_ref.double()), hd.logits(hh), labels),
               lambda hh, hd: tidpo.token_kl(hd.detach().logits(h_ref), hd.logits(hh), labels)),
    }
    for name, (fused, truth_fn, materialised_fn) in cases.items():
        ours, truth = fused(h, head), truth_fn(h64, head64)
        g_ours, g_truth = _grads(ours, _leaves(h, head)), _grads(truth, _leaves(h64, head64))
        if dtype == torch.float32:
            assert_rel_close(ours, truth, 1e-5, name)
            for a, b in zip(g_ours, g_truth, strict=True):
                assert_rel_close(a, b, 1e-5, f"d {name}")
            continue
        materialised = materialised_fn(h, head)
        assert_within_torch_error(ours, truth, materialised, what=name)
        for a, b, c in zip(g_ours, g_truth, _grads(materialised, _leaves(h, head)), strict=True):
            assert_within_torch_error(a, b, c, what=f"d {name}")
