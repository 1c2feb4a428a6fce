"""The keywords transformers' causal LMs accept (output_hidden_states, return_dict, inputs_embeds, use_cache)
behave as in LlamaForCausalLM, and gradient_checkpointing_enable() recomputes blocks with equal gradients."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from based import BasedConfig, BasedForCausalLM
from based.generation import InferenceState


def build(name="debug"):
    torch.manual_seed(0)
    return BasedForCausalLM(BasedConfig.from_preset(name)).eval()


def tiny_llama():
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=4)
    return LlamaForCausalLM(config).eval()


def structure(out):
    return [type(o).__name__ if not isinstance(o, tuple) else f"tuple[{len(o)}]" for o in out]


@pytest.fixture(params=["debug", "transformer-debug"])
def model(request):
    return build(request.param)


def test_return_dict_false_and_hidden_states_have_llamas_layout(model):
    ids = torch.randint(0, 256, (2, 9))
    llama = tiny_llama()
    kw = dict(labels=ids, return_dict=False, output_hidden_states=True)
    ours, theirs = model(ids, **kw), llama(ids, use_cache=False, **kw)
    n = model.config.n_layer
    assert structure(ours) == ["Tensor", "Tensor", f"tuple[{n + 1}]"]
    assert structure(theirs) == ["Tensor", "Tensor", f"tuple[{llama.config.num_hidden_layers + 1}]"]
    loss, logits, hidden = ours
    full = model(ids, labels=ids)
    torch.testing.assert_close((loss, logits), (full.loss, full.logits))
    # First the embeddings, last the final norm's output (the last hidden state), as in Llama.
    torch.testing.assert_close(hidden[0], model.transformer.embeddings(ids))
    torch.testing.assert_close(hidden[-1], model.transformer(ids).last_hidden_state)
    torch.testing.assert_close(hidden[2], model.transformer.layers[1](hidden[1]))
    assert structure(model(ids, return_dict=False)) == ["Tensor"]
    base = model.transformer(ids, output_hidden_states=True)
    assert len(base.hidden_states) == n + 1 and len(model.transformer(ids, return_dict=False)) == 1


def test_inputs_embeds_replace_input_ids(model):
    ids = torch.randint(0, 256, (2, 9))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    out = model(inputs_embeds=embeds, labels=ids)
    torch.testing.assert_close(out.logits, model(ids).logits)
    out.loss.backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(ids, inputs_embeds=embeds)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model()
    with pytest.raises(ValueError, match=r"inputs_embeds must be \[batch, seq_len, \d+\]"):
        model(inputs_embeds=embeds[..., :3])


@pytest.mark.parametrize("cache_kwarg", ["cache", "past_key_values"])
def test_use_cache_returns_a_state_the_next_call_continues(model, cache_kwarg):
    ids = torch.randint(0, 256, (2, 12))  # longer than the debug preset's window
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :10], use_cache=True)
        assert out.logits.shape == (2, 10, 256)
        torch.testing.assert_close(out.logits, full[:, :10], rtol=1e-4, atol=1e-4)
        assert isinstance(out.cache, InferenceState)
        cache = out.cache
        for t in (10, 11):  # one token a call, as Llama's cache is used
            out = model(ids[:, t : t + 1], **{cache_kwarg: cache})
            assert out.logits.shape == (2, 1, 256) and out.cache is cache
            torch.testing.assert_close(out.logits[:, 0], full[:, t], rtol=1e-4, atol=1e-4)
        # Tuples carry the cache as Llama's do: (logits, cache).
        assert structure(model(ids[:, :3], use_cache=True, return_dict=False)) == ["Tensor", "InferenceState"]
    assert model(ids).cache is None  # off by default (documented): a training forward fills no state


def test_output_attentions_is_refused():
    with pytest.raises(ValueError, match="output_attentions is not supported"):
        build()(torch.zeros(1, 3, dtype=torch.long), output_attentions=True)


def grads(model, ids):
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name, reentrant", [("debug", False), ("transformer-debug", False), ("debug", True)])
def test_gradient_checkpointing_recomputes_blocks_with_equal_gradients(name, reentrant):
    model = build(name).train()
    ids = torch.randint(0, 256, (2, 24))
    calls = []
    for block in model.transformer.layers:
        block.register_forward_pre_hook(lambda *a: calls.append(1))  # the recompute may stop before the end
    plain = grads(model, ids)
    assert len(calls) == model.config.n_layer
    assert model.supports_gradient_checkpointing
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert model.is_gradient_checkpointing
    calls.clear()
    checkpointed = grads(model, ids)
    assert len(calls) == 2 * model.config.n_layer  # each block ran again in the backward
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(model.parameters()))
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], rtol=1e-5, atol=1e-7, msg=k)
    with torch.no_grad():  # nothing to recompute without a backward; decoding is untouched
        calls.clear()
        model(ids)
        assert len(calls) == model.config.n_layer
    model.gradient_checkpointing_disable()
    calls.clear()
    grads(model, ids)
    assert len(calls) == model.config.n_layer


PORTABLE = r"""
import json, sys
assert "based" not in sys.modules, "based was imported before the load"
import torch
from transformers import AutoConfig, AutoModelForCausalLM

path = sys.argv[1]
sys.modules["based"] = None  # as if the package were not installed: import based raises ImportError
try:
    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    missing = None
except ImportError as e:
    missing = str(e)
del sys.modules["based"]
assert "based" not in sys.modules
config = AutoConfig.from_pretrained(path, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits[0, -1]
print(json.dumps({"missing": missing, "config": type(config).__name__, "model": type(model).__module__ + "." +
                  type(model).__name__, "logits": logits.tolist(), "based_imported": "based" in sys.modules}))
"""


def test_a_saved_model_loads_with_trust_remote_code_where_based_was_never_imported(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from based.models.modeling import REMOTE_CODE_FILE

    model = build()
    model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == (
        "modeling_based.BasedForCausalLM")
    assert (tmp_path / "ckpt" / REMOTE_CODE_FILE).is_file()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "OMP_NUM_THREADS": "1", "BASED_LM_EVAL_PLUGIN": "0"}
    result = subprocess.run([sys.executable, "-c", PORTABLE, str(tmp_path / "ckpt")], capture_output=True, text=True,
                            env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert "pip install based" in out["missing"]
    assert out["config"] == "BasedConfig" and out["model"] == "based.models.modeling.BasedForCausalLM"
    assert out["based_imported"]
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(out["logits"]), model(torch.tensor([[1, 2, 3, 4]])).logits[0, -1])
