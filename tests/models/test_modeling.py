"""BasedForCausalLM: loss, gradients, init, save/load, Auto classes, bad input, decode state."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from based import BasedConfig, BasedForCausalLM, BasedModel


def build(name="debug", **overrides):
    return BasedForCausalLM(BasedConfig.from_preset(name, **overrides)).eval()


@pytest.fixture(params=["debug", "transformer-debug"])
def model(request):
    return build(request.param)


def tokens(B=2, T=24, vocab=256):
    return torch.randint(0, vocab, (B, T))


def test_loss_is_shifted_cross_entropy(model):
    ids = tokens()
    labels = ids.clone()
    labels[0, 5:9] = -100
    out = model(ids, labels=labels)
    assert out.logits.shape == (2, 24, 256)
    manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, 256), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)
    assert model(ids).loss is None
    # Random init predicts close to uniformly.
    assert abs(out.loss.item() - math.log(256)) < 0.5


def test_logits_cover_the_real_vocabulary_only():
    model = build(vocab_size=250)
    assert model.lm_head.weight.shape[0] == 256  # padded to a multiple of 8
    assert model(tokens(vocab=250)).logits.shape[-1] == 250


def test_backward_gives_finite_gradients_everywhere(model):
    model.train()
    model(tokens(), labels=tokens()).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_embeddings_are_tied(model):
    assert model.lm_head.weight is model.transformer.embeddings.word_embeddings.weight


def test_init():
    model = build("debug", n_layer=8, mixer_types=["base_conv", "linear_attn", "sliding_window", "base_conv"] * 2)
    std = model.config.initializer_range
    depth_scaled = std / math.sqrt(2 * 8)
    for block in model.transformer.layers:
        for name, p in block.named_parameters():
            if name in ("mixer.out_proj.weight", "mlp.fc2.weight"):
                assert abs(p.std().item() / depth_scaled - 1) < 0.15, name
            elif name in ("mixer.Wqkv.weight", "mixer.proj_q.weight", "mixer.in_proj.weight", "mlp.fc1.weight"):
                assert abs(p.std().item() / std - 1) < 0.1, name
            elif name.endswith("norm1.weight") or name.endswith("norm2.weight"):
                assert torch.equal(p, torch.ones_like(p))
            elif name in ("mixer.in_proj.bias", "mixer.out_proj.bias"):
                assert torch.equal(p, torch.zeros_like(p))
            elif name == "mixer.conv.weight":  # PyTorch's default conv init, as in the reference
                assert p.abs().max() <= 1 / math.sqrt(3) and p.std() > 0.1
    emb = model.transformer.embeddings.word_embeddings.weight
    assert abs(emb.std().item() / std - 1) < 0.05


def test_save_load_round_trip(model, tmp_path):
    ids = tokens()
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "model.safetensors"}
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "based" and saved["mixer_types"] == model.config.mixer_types
    loaded = BasedForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.lm_head.weight is loaded.transformer.embeddings.word_embeddings.weight


def test_auto_classes_load_a_saved_model(tmp_path):
    model = build()
    model.save_pretrained(tmp_path)
    ids = tokens()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), BasedConfig)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(auto, BasedForCausalLM)
    assert torch.equal(auto(ids).logits, model(ids).logits)
    base = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(base, BasedModel)
    torch.testing.assert_close(base(ids).last_hidden_state, model.transformer(ids).last_hidden_state)


def test_foreign_config_is_rejected(tmp_path):
    build().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type='llama', not 'based'"):
        BasedForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type='llama'"):
        BasedConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "ids, match",
    [
        (torch.tensor([[1, 2, 256]]), r"token id 256 is outside the vocabulary \[0, 256\)"),
        (torch.tensor([[1, -3, 2]]), r"token id -3 is outside the vocabulary \[0, 256\)"),
        (torch.zeros(2, 0, dtype=torch.long), "input_ids is empty"),
        (torch.tensor([1, 2, 3]), r"input_ids must be \[batch, seq_len\]"),
        (torch.tensor([[1.0, 2.0]]), "integer token ids"),
    ],
)
def test_bad_input_ids(ids, match):
    with pytest.raises(ValueError, match=match):
        build()(ids)


def test_labels_must_match_input_shape():
    with pytest.raises(ValueError, match="labels shape"):
        build()(tokens(T=8), labels=tokens(T=7))


@torch.no_grad()
def test_prefill_then_decode_equals_forward(model):
    """Teacher-forced decoding over several windows reproduces the parallel forward's logits."""
    window = model.config.window_size  # 16 in debug
    ids = tokens(T=4 * window)
    full = model(ids).logits
    state = model.allocate_inference_cache(2, max_seq_len=ids.shape[1])
    prompt = window // 2 + 3
    logits = [model(ids[:, :prompt], state=state).logits]
    for t in range(prompt, ids.shape[1]):
        logits.append(model.step(ids[:, t], state, torch.full((2,), t)).unsqueeze(1))
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-4, atol=1e-4)


def test_state_size_constant_for_based_linear_for_transformer():
    based, transformer = build("debug"), build("transformer-debug")
    w = based.config.window_size
    assert based.state_size(w) == based.state_size(10 * w) == based.state_size(100_000)
    assert based.state_size(w // 2) < based.state_size(w)  # the window is still filling
    d, n = transformer.config.d_model, transformer.config.n_layer
    for L in (1, 1000, 100_000):
        assert transformer.state_size(L) == 2 * d * n * L


def test_inference_state_bytes():
    based, transformer = build("debug"), build("transformer-debug")
    sizes = {L: based.inference_state_bytes(L, batch_size=4, dtype=torch.bfloat16) for L in (1_000, 10_000, 100_000)}
    assert len(set(sizes.values())) == 1
    state = based.allocate_inference_cache(4, dtype=torch.bfloat16)
    assert sizes[1_000] == sum(t.numel() * t.element_size() for s in state for t in s)
    assert transformer.inference_state_bytes(2000) == 2 * transformer.inference_state_bytes(1000)
    d, n = transformer.config.d_model, transformer.config.n_layer
    assert transformer.inference_state_bytes(1000, batch_size=2, dtype=torch.bfloat16) == 2 * 2 * d * n * 1000 * 2


def test_meta_device_build_allocates_nothing():
    with torch.device("meta"):
        model = BasedForCausalLM(BasedConfig.from_preset("1.3b"))
    assert all(p.is_meta for p in model.parameters())
    assert model.inference_state_bytes(100_000, dtype=torch.bfloat16) < 20e6  # BASED 1.3b: ~14.6 MB a sequence
