"""Hugging Face integration: after `import based` the Auto classes resolve our model type, and a saved
directory with its tokenizer loads in a fresh process with nothing but `import based` and transformers."""
import json
import subprocess
import sys

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from based import BasedConfig, BasedForCausalLM, BasedModel
from based.models.presets import PRESET_CONFIGS

FRESH = r"""
import json, sys
import torch
import based  # registers the "based" model type
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
ids = tok(["The capital of France is"], return_tensors="pt").input_ids
lm = AutoModelForCausalLM.from_pretrained(path).eval()
base = AutoModel.from_pretrained(path).eval()
with torch.no_grad():
    out = {"config": type(AutoConfig.from_pretrained(path)).__name__, "ids": ids.tolist(),
           "lm": type(lm).__name__, "base": type(base).__name__, "logits": lm(ids).logits[0, -1].tolist(),
           "hidden": base(ids).last_hidden_state[0, -1].tolist(),
           "generated": lm.generate(ids, max_new_tokens=6, do_sample=False)[0].tolist()}
print(json.dumps(out))
"""


def fresh_process(path):
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", FRESH, str(path)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_auto_classes_resolve_the_model_type():
    config = AutoConfig.for_model("based", **PRESET_CONFIGS["debug"])
    assert isinstance(config, BasedConfig)
    assert type(AutoModelForCausalLM.from_config(config)) is BasedForCausalLM
    assert type(AutoModel.from_config(config)) is BasedModel


def test_saved_directory_loads_and_generates_in_a_fresh_process(checkpoint):
    out = fresh_process(checkpoint)
    assert (out["config"], out["lm"], out["base"]) == ("BasedConfig", "BasedForCausalLM", "BasedModel")
    model = BasedForCausalLM.from_pretrained(checkpoint).eval()
    ids = torch.tensor(out["ids"])
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(out["logits"]), model(ids).logits[0, -1])
        torch.testing.assert_close(torch.tensor(out["hidden"]), model.transformer(ids).last_hidden_state[0, -1])
        for _ in range(6):  # greedy decoding by re-running the whole prefix
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert out["generated"] == ids[0].tolist()
