"""HazyResearch/based conversion: a state dict in their names and shapes, at the debug size, converts to
a model whose logits equal a direct fp64 computation of their architecture written here from the maths."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from based import BasedConfig, BasedForCausalLM
from based.cli import main
from based.convert import (
    ConversionError,
    config_from_hazyresearch,
    config_to_hazyresearch,
    load_hazyresearch,
    read_state_dict,
    state_dict_to_hazyresearch,
)

D, N_INNER, HEADS, FEAT, VOCAB, PADDED, WINDOW = 64, 128, 4, 8, 250, 256, 8
THEIR_CONFIG = {
    "_target_": "based.models.gpt.GPT2MixerConfig",
    "n_embd": D, "n_layer": 4, "n_head": HEADS, "n_inner": N_INNER, "vocab_size": VOCAB,
    "pad_vocab_size_multiple": 8, "layer_norm_epsilon": 1e-5, "rms_norm": True, "activation_function": "swiglu",
    "max_position_embeddings": 0, "n_positions": 256, "rotary_emb_fraction": 1, "residual_in_fp32": True,
    "qkv_proj_bias": False, "out_proj_bias": False, "mlp_fc1_bias": False, "mlp_fc2_bias": False,
    "alt_mixer_layers": [1], "alt_mixer_2_layers": [2],
    "mixer": {"_target_": "based.models.mixers.convolution.BaseConv", "l_max": 256, "use_bias": True,
              "expand_proj": 4, "kernel_sizes": 3},
    "alt_mixer": {"_target_": "based.models.mixers.linear_attention.LinearAttention", "l_max": 256,
                  "feature_map": {"_target_": "based.models.mixers.linear_attention.TaylorExp", "input_dim": FEAT},
                  "feature_dim": FEAT, "num_heads": HEADS},
    "alt_mixer_2": {"_target_": "based.models.mixers.slide_attention.SlidingAttention", "window_size": WINDOW,
                    "num_heads": HEADS, "causal": True},
}


def their_state_dict(seed=0) -> dict[str, torch.Tensor]:
    """Random weights with their names and shapes (BaseConv: in_proj d -> 4d with bias, conv [2d, 1, 3]
    without bias, out_proj 2d -> d with bias; linear attention q/k to heads*feature_dim; fused Wqkv)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, std=0.2: torch.randn(*shape, generator=g) * std  # noqa: E731
    emb = r(PADDED, D, std=0.5)
    sd = {"transformer.embeddings.word_embeddings.weight": emb, "lm_head.weight": emb.clone(),
          "transformer.ln_f.weight": 1 + r(D, std=0.1)}
    mixers = {
        0: {"in_proj.weight": r(4 * D, D), "in_proj.bias": r(4 * D), "conv.conv.weight": r(2 * D, 1, 3, std=0.5),
            "out_proj.weight": r(D, 2 * D), "out_proj.bias": r(D)},
        1: {"proj_q.weight": r(HEADS * FEAT, D, std=0.4), "proj_k.weight": r(HEADS * FEAT, D, std=0.4),
            "proj_v.weight": r(D, D), "out_proj.weight": r(D, D)},
        2: {"Wqkv.weight": r(3 * D, D, std=0.4), "out_proj.weight": r(D, D)},
    }
    mixers[3] = {k: r(*v.shape) for k, v in mixers[0].items()}
    for i in range(4):
        p = f"transformer.layers.{i}."
        sd.update({p + "norm1.weight": 1 + r(D, std=0.1), p + "norm2.weight": 1 + r(D, std=0.1),
                   p + "mlp.fc1.weight": r(2 * N_INNER, D), p + "mlp.fc2.weight": r(D, N_INNER)})
        sd.update({p + "mixer." + k: v for k, v in mixers[i].items()})
    return sd


def reference_logits(sd: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Their forward pass in fp64, from the definitions (BASED paper; REFERENCE.md)."""
    W = {k: v.double() for k, v in sd.items()}

    def rms(x, w):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    def swiglu(x, p):  # fc1 -> [value, gate]; value * silu(gate)
        value, gate = (x @ W[p + "fc1.weight"].T).chunk(2, -1)
        return (value * F.silu(gate)) @ W[p + "fc2.weight"].T

    def base_conv(x, p):  # y = out_proj(silu(causal depthwise conv_3(u1)) * u2)
        u1, u2 = (x @ W[p + "in_proj.weight"].T + W[p + "in_proj.bias"]).chunk(2, -1)
        w = W[p + "conv.conv.weight"][:, 0]  # [C, K], tap K-1 on the current token
        K = w.shape[1]
        conv = sum(w[:, j] * F.pad(u1, (0, 0, K - 1 - j, 0))[:, : u1.shape[1]] for j in range(K))
        return (F.silu(conv) * u2) @ W[p + "out_proj.weight"].T + W[p + "out_proj.bias"]

    def linear_attn(x, p):  # y_t = sum_{s<=t} K(q_t, k_s) v_s / sum_{s<=t} K(q_t, k_s), K = 1 + s + s^2/2
        B, T, _ = x.shape
        q = (x @ W[p + "proj_q.weight"].T).view(B, T, HEADS, FEAT).transpose(1, 2)
        k = (x @ W[p + "proj_k.weight"].T).view(B, T, HEADS, FEAT).transpose(1, 2)
        v = (x @ W[p + "proj_v.weight"].T).view(B, T, HEADS, -1).transpose(1, 2)
        s = q @ k.transpose(-1, -2) / math.sqrt(FEAT)
        a = (1 + s + s * s / 2) * torch.ones(T, T, dtype=s.dtype).tril()
        y = (a @ v) / (a.sum(-1, keepdim=True) + 1e-12)
        return y.transpose(1, 2).reshape(B, T, -1) @ W[p + "out_proj.weight"].T

    def sliding(x, p):  # softmax attention over keys t - WINDOW//2 .. t, rotary on the whole head
        B, T, _ = x.shape
        hd = D // HEADS
        q, k, v = (x @ W[p + "Wqkv.weight"].T).view(B, T, 3, HEADS, hd).unbind(2)
        angle = torch.arange(T, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, hd, 2) / hd)
        cos, sin = angle.cos()[:, None], angle.sin()[:, None]  # [T, 1, hd/2]

        def rotate(t):  # pairs (i, i + hd/2)
            a, b = t[..., : hd // 2], t[..., hd // 2 :]
            return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

        q, k, v = rotate(q).transpose(1, 2), rotate(k).transpose(1, 2), v.transpose(1, 2)
        t, s = torch.arange(T)[:, None], torch.arange(T)[None]
        visible = (s <= t) & (t - s <= WINDOW // 2)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~visible, float("-inf"))
        y = scores.softmax(-1) @ v
        return y.transpose(1, 2).reshape(B, T, D) @ W[p + "out_proj.weight"].T

    mixer = {0: base_conv, 1: linear_attn, 2: sliding, 3: base_conv}
    x = W["transformer.embeddings.word_embeddings.weight"][ids]
    for i in range(4):
        p = f"transformer.layers.{i}."
        x = x + mixer[i](rms(x, W[p + "norm1.weight"]), p + "mixer.")
        x = x + swiglu(rms(x, W[p + "norm2.weight"]), p + "mlp.")
    x = rms(x, W["transformer.ln_f.weight"])
    return (x @ W["lm_head.weight"].T)[..., :VOCAB]


def write_theirs(path, sd=None, config=None, name="pytorch_model.bin"):
    path.mkdir(parents=True, exist_ok=True)
    sd = their_state_dict() if sd is None else sd
    if name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items() if k != "lm_head.weight"}, path / name)
    else:
        torch.save(sd, path / name)
    (path / "config.json").write_text(json.dumps(config or THEIR_CONFIG))
    return path / name, path / "config.json"


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_config_mapping():
    config = config_from_hazyresearch(THEIR_CONFIG)
    assert config.mixer_types == ["base_conv", "linear_attn", "sliding_window", "base_conv"]
    assert (config.d_model, config.mlp_inner, config.padded_vocab_size) == (D, N_INNER, PADDED)
    assert config.window_size == WINDOW // 2 + 1  # FlashAttention (W // 2, 0): W // 2 back plus itself
    assert config.feature_map == "full" and config.la_eps == 1e-12 and config.conv_expand == 2
    assert config_from_hazyresearch({**THEIR_CONFIG, "alt_mixer_2": {"window_size": 256}}).window_size == 129


def test_converted_logits_equal_the_reference_maths(tmp_path):
    weights, config = write_theirs(tmp_path / "theirs")
    model = load_hazyresearch(weights, config)
    ids = torch.randint(0, VOCAB, (2, 24))  # longer than the window (5 tokens)
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 24, VOCAB)
    assert rel_err(logits, reference_logits(their_state_dict(), ids)) < 1e-5
    # Their conv has no bias: ours is zero.
    assert not model.transformer.layers[0].mixer.conv.bias.any()


def test_the_compact_feature_map_gives_the_same_logits(tmp_path):
    weights, config = write_theirs(tmp_path / "theirs")
    full = load_hazyresearch(weights, config)
    compact = BasedForCausalLM(full.config.__class__(**{**full.config.to_dict(), "feature_map": "compact"})).eval()
    compact.load_state_dict(full.state_dict())
    ids = torch.randint(0, VOCAB, (1, 30))
    with torch.no_grad():
        assert rel_err(compact(ids).logits, full(ids).logits) < 1e-5


def test_cli_round_trip_is_exact(tmp_path, capsys):
    weights, config = write_theirs(tmp_path / "theirs", name="model.safetensors")
    ours, back = tmp_path / "ours", tmp_path / "back"
    assert main(["convert", "--from", "hazyresearch", "--checkpoint", str(weights), "--config", str(config),
                 "--out", str(ours)]) == 0
    assert json.loads(capsys.readouterr().out)["mixer_types"][1] == "linear_attn"
    model = BasedForCausalLM.from_pretrained(ours).eval()
    ids = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        assert rel_err(model(ids).logits, reference_logits(their_state_dict(), ids)) < 1e-5
    assert main(["convert", "--to", "hazyresearch", "--checkpoint", str(ours), "--out", str(back)]) == 0
    exported = read_state_dict(back / "pytorch_model.bin")
    original = their_state_dict()
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)
    again = config_from_hazyresearch(json.loads((back / "config.json").read_text())).to_dict()
    skip = {"architectures", "_name_or_path", "dtype", "auto_map"}  # auto_map: where our code is, not a field
    assert {k: v for k, v in again.items() if k not in skip} == {
        k: v for k, v in model.config.to_dict().items() if k not in skip
    }


def test_our_model_exports_and_reimports_exactly(tmp_path):
    model = BasedForCausalLM(config_from_hazyresearch(THEIR_CONFIG))
    with torch.no_grad():
        model.transformer.layers[3].mixer.conv.bias.zero_()  # layer 0 keeps a bias their default conv lacks
    sd = state_dict_to_hazyresearch(model)
    assert "transformer.layers.0.mixer.conv.conv.bias" in sd and "transformer.layers.3.mixer.conv.conv.bias" not in sd
    weights, config = write_theirs(tmp_path, sd, config_to_hazyresearch(model.config))
    again = load_hazyresearch(weights, config)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_a_checkpoint_of_another_architecture_names_the_keys(tmp_path):
    llama = {"model.embed_tokens.weight": torch.zeros(PADDED, D),
             "model.layers.0.self_attn.q_proj.weight": torch.zeros(D, D)}
    weights, config = write_theirs(tmp_path, llama)
    with pytest.raises(ConversionError) as e:
        load_hazyresearch(weights, config)
    msg = str(e.value)
    assert "missing keys: transformer.embeddings.word_embeddings.weight" in msg
    assert "unexpected keys: embed_tokens.weight, layers.0.self_attn.q_proj.weight" in msg


def test_bad_shapes_and_unsupported_config_are_named(tmp_path):
    sd = their_state_dict()
    sd["transformer.layers.1.mixer.proj_q.weight"] = torch.zeros(3 * FEAT, D)
    weights, config = write_theirs(tmp_path / "a", sd)
    with pytest.raises(ConversionError, match=r"proj_q.weight \(24, 64\) \(expected \(32, 64\)\)"):
        load_hazyresearch(weights, config)
    with pytest.raises(ConversionError, match="rotary_emb_fraction=0.5"):
        config_from_hazyresearch({**THEIR_CONFIG, "rotary_emb_fraction": 0.5})
    with pytest.raises(ConversionError, match="no 'n_inner' field"):
        config_from_hazyresearch({k: v for k, v in THEIR_CONFIG.items() if k != "n_inner"})
    performer = config_from_hazyresearch(THEIR_CONFIG).to_dict() | {"feature_map": "performer"}
    with pytest.raises(ConversionError, match="only the Taylor maps"):
        config_to_hazyresearch(BasedConfig(**performer))
    sd = their_state_dict()
    sd["lm_head.weight"] = torch.zeros(PADDED, D)
    weights, config = write_theirs(tmp_path / "b", sd)
    with pytest.raises(ConversionError, match="untied"):
        load_hazyresearch(weights, config)


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="checkpoint file not found"):
        main(["convert", "--from", "hazyresearch", "--checkpoint", str(tmp_path / "x.bin"),
              "--config", str(tmp_path / "config.json"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="config file not found"):
        main(["convert", "--from", "hazyresearch", "--checkpoint", str(write_theirs(tmp_path / "t")[0]),
              "--config", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o")])
    # Before: torch's dozen-line "Weights only load failed ... file an issue" message.
    (tmp_path / "junk.bin").write_bytes(b"not a pickle")
    with pytest.raises(SystemExit) as e:
        main(["convert", "--from", "hazyresearch", "--checkpoint", str(tmp_path / "junk.bin"),
              "--config", str(tmp_path / "t" / "config.json"), "--out", str(tmp_path / "o")])
    message = str(e.value.code)
    assert f"{tmp_path / 'junk.bin'} is not a PyTorch checkpoint (torch.load: UnpicklingError: Unsupported operand" \
        in message and "\n" not in message and "weights_only" not in message, message
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"^based convert: .*empty.bin is empty, not a PyTorch checkpoint"):
        main(["convert", "--from", "hazyresearch", "--checkpoint", str(tmp_path / "empty.bin"),
              "--config", str(tmp_path / "t" / "config.json"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"^based convert: config .* is a folder: pass their config.json file"):
        main(["convert", "--from", "hazyresearch", "--checkpoint", str(tmp_path / "t" / "pytorch_model.bin"),
              "--config", str(tmp_path), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("config, match", [
    # Before: AttributeError: 'list' object has no attribute 'get'.
    ([THEIR_CONFIG], "the config must be a JSON object of fields, not a list"),
    ("based", "the config must be a JSON object of fields, not a str"),
    # Before: the messages named no file.
    ({k: v for k, v in THEIR_CONFIG.items() if k != "n_embd"}, "config has no 'n_embd' field"),
    ({**THEIR_CONFIG, "n_layer": "4"}, "config field n_layer='4' is not supported: expected a positive int"),
    ({**THEIR_CONFIG, "mixer": ["BaseConv"]}, "config field mixer must be an object, got ['BaseConv']"),
    ({**THEIR_CONFIG, "mixer": {**THEIR_CONFIG["mixer"], "expand_proj": "4"}}, "mixer.expand_proj='4' is not supp"),
    ({**THEIR_CONFIG, "alt_mixer_layers": 1}, "alt_mixer_layers must be a list of layer indices, got 1"),
    # Before: a layer index past n_layer was ignored (that layer converted as BaseConv).
    ({**THEIR_CONFIG, "alt_mixer_layers": [1, 9]}, "must index layers 0 .. n_layer - 1 = 3"),
    ({**THEIR_CONFIG, "n_inner": "wide"}, "mlp_hidden_size must be a positive int, got 'wide'"),
])
def test_a_config_that_is_not_theirs_is_one_line_naming_it(tmp_path, config, match):
    weights, _ = write_theirs(tmp_path / "theirs")
    (tmp_path / "bad.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as e:
        main(["convert", "--from", "hazyresearch", "--checkpoint", str(weights), "--config", str(tmp_path / "bad.json"),
              "--out", str(tmp_path / "o")])
    message = str(e.value.code)
    assert message.startswith(f"based convert: {tmp_path / 'bad.json'}: ") and match in message, message
    assert "\n" not in message and not (tmp_path / "o").exists()


def test_a_mismatched_checkpoint_names_both_files(tmp_path):
    weights, config = write_theirs(tmp_path / "theirs", {"transformer.ln_f.weight": torch.ones(D)})
    with pytest.raises(ConversionError, match=f"^{weights} with {config}: the checkpoint does not match"):
        load_hazyresearch(weights, config)
    sd = {k: (v * 100).long() for k, v in their_state_dict().items()}
    weights, config = write_theirs(tmp_path / "ints", sd)
    with pytest.raises(ConversionError, match="holds torch.int64 embeddings, not floating-point weights"):
        load_hazyresearch(weights, config)


def _tokenizer(vocab_size):
    """A word-level tokenizer of exactly vocab_size tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "</s>"] + [f"w{i}" for i in range(vocab_size - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="[UNK]")


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_before_writing(tmp_path):
    # Before: saved beside the model with exit 0; its ids past vocab_size index no embedding row.
    weights, config = write_theirs(tmp_path / "theirs")
    _tokenizer(320).save_pretrained(tmp_path / "big")
    _tokenizer(VOCAB).save_pretrained(tmp_path / "fits")
    base = ["convert", "--from", "hazyresearch", "--checkpoint", str(weights), "--config", str(config)]
    with pytest.raises(SystemExit, match=r"^based convert: --tokenizer .*big has 320 tokens but the model's vocabulary "
                       rf"only {VOCAB}: pass the tokenizer the model was trained with$"):
        main([*base, "--tokenizer", str(tmp_path / "big"), "--out", str(tmp_path / "ours")])
    assert not (tmp_path / "ours").exists()
    assert main([*base, "--tokenizer", str(tmp_path / "fits"), "--out", str(tmp_path / "ours")]) == 0
    with pytest.raises(SystemExit, match=rf"--tokenizer .*big has 320 tokens but the model's vocabulary only {VOCAB}"):
        main(["convert", "--to", "hazyresearch", "--checkpoint", str(tmp_path / "ours"), "--tokenizer",
              str(tmp_path / "big"), "--out", str(tmp_path / "back")])
    assert not (tmp_path / "back").exists()


def test_a_damaged_tokenizer_is_one_line_naming_the_file(tmp_path):
    # Before: KeyError 'added_tokens' (a traceback) for a tokenizer.json holding {}.
    weights, config = write_theirs(tmp_path / "theirs")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        main(["convert", "--from", "hazyresearch", "--checkpoint", str(weights), "--config", str(config),
              "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "o")])
    message = str(e.value.code)
    assert f"{tmp_path / 'tok' / 'tokenizer.json'} is not a tokenizer file" in message and "\n" not in message
    assert not (tmp_path / "o").exists()


def test_converting_into_the_source_folder_or_a_file_is_refused(tmp_path):
    # Before: `convert --to hazyresearch --checkpoint DIR --out DIR` exited 0 after replacing DIR/config.json
    # with their layout, so DIR no longer loaded; --out an existing file was "[Errno 17] File exists".
    weights, config = write_theirs(tmp_path / "theirs")
    ours = tmp_path / "ours"
    assert main(["convert", "--from", "hazyresearch", "--checkpoint", str(weights), "--config", str(config),
                 "--out", str(ours)]) == 0
    before = {p.name: p.read_bytes() for p in ours.iterdir()} | {"theirs": config.read_bytes()}
    with pytest.raises(SystemExit, match=r"^based convert: --out .*ours is the folder the checkpoint is read from"):
        main(["convert", "--to", "hazyresearch", "--checkpoint", str(ours), "--out", str(ours)])
    with pytest.raises(SystemExit, match=r"^based convert: --out .*theirs is the folder the checkpoint is read from"):
        main(["convert", "--from", "hazyresearch", "--checkpoint", str(weights), "--out", str(weights.parent)])
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match=r"^based convert: --out .*file is an existing file, not a folder"):
        main(["convert", "--to", "hazyresearch", "--checkpoint", str(ours), "--out", str(tmp_path / "file")])
    # Another model's folder, of either layout (it was overwritten, exit 0, and no longer loaded), and --config
    # beside --to (it was ignored).
    with pytest.raises(SystemExit, match=r"^based convert: --out .*theirs already holds a checkpoint"):
        main(["convert", "--to", "hazyresearch", "--checkpoint", str(ours), "--out", str(tmp_path / "theirs")])
    other = tmp_path / "other"
    assert main(["convert", "--from", "hazyresearch", "--checkpoint", str(weights), "--config", str(config),
                 "--out", str(other)]) == 0
    with pytest.raises(SystemExit, match=r"^based convert: --out .*other already holds a checkpoint"):
        main(["convert", "--from", "hazyresearch", "--checkpoint", str(weights), "--config", str(config),
              "--out", str(other)])
    with pytest.raises(SystemExit, match=r"^based convert: --config is read only with --from hazyresearch"):
        main(["convert", "--to", "hazyresearch", "--checkpoint", str(ours), "--config", str(config),
              "--out", str(tmp_path / "new")])
    assert {p.name: p.read_bytes() for p in ours.iterdir()} | {"theirs": config.read_bytes()} == before
    BasedForCausalLM.from_pretrained(ours)


def test_their_lightning_layout_with_metric_counters_converts(tmp_path):
    # Their Lightning checkpoints: every weight under "model." and torchmetrics counters beside them,
    # without the prefix. Before, the prefix was only stripped when every key had it.
    sd = {f"model.{k}": v for k, v in their_state_dict().items()}
    sd |= {"train_metrics.num-tokens.count": torch.tensor(7.0), "val_metrics.num-tokens.count": torch.tensor(3.0),
           "test_metrics.num-tokens.count": torch.tensor(1.0)}
    weights, config = write_theirs(tmp_path, {"state_dict": sd})
    ids = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        assert rel_err(load_hazyresearch(weights, config)(ids).logits, reference_logits(their_state_dict(), ids)) < 1e-5
    both = {**sd, "transformer.ln_f.weight": torch.ones(D)}
    weights, config = write_theirs(tmp_path / "both", both)
    with pytest.raises(ConversionError, match="both with and without the model. prefix: model.transformer.ln_f"):
        load_hazyresearch(weights, config)


def test_the_fixed_decay_buffer_is_checked_and_dropped(tmp_path):
    # based-1b's layout: fixed_decay adds transformer.decay.decay [n_head], a function of the config that
    # none of the three mixers reads (see the module doc).
    decay = torch.log(1 - 2 ** (-5 - torch.arange(HEADS, dtype=torch.float)))
    config = {**THEIR_CONFIG, "fixed_decay": True, "decay_const": -5}
    weights, config_path = write_theirs(tmp_path / "a", {**their_state_dict(), "transformer.decay.decay": decay},
                                        config, name="model.safetensors")
    ids = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        logits = load_hazyresearch(weights, config_path)(ids).logits
    assert rel_err(logits, reference_logits(their_state_dict(), ids)) < 1e-5
    weights, config_path = write_theirs(tmp_path / "b", {**their_state_dict(), "transformer.decay.decay": decay[:2]},
                                        config)
    with pytest.raises(ConversionError, match=r"transformer.decay.decay has shape \(2,\): expected \[n_head\] = \[4\]"):
        load_hazyresearch(weights, config_path)
    # Without fixed_decay the buffer is not theirs either: still an unexpected key.
    weights, config_path = write_theirs(tmp_path / "c", {**their_state_dict(), "transformer.decay.decay": decay})
    with pytest.raises(ConversionError, match="unexpected keys: transformer.decay.decay"):
        load_hazyresearch(weights, config_path)


@pytest.mark.parametrize("content", [b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":"])
def test_a_truncated_or_empty_safetensors_file_is_one_line(tmp_path, content, capsys):
    theirs = tmp_path / "theirs"
    write_theirs(theirs)
    (theirs / "model.safetensors").write_bytes(content)
    with pytest.raises(SystemExit, match="model.safetensors is not a readable safetensors file"):
        main(["convert", "--from", "hazyresearch", "--checkpoint", str(theirs / "model.safetensors"),
              "--config", str(theirs / "config.json"), "--out", str(tmp_path / "o")])
