"""The MQAR model layouts: figure 2's ("paper", Zoology's configs) and the earlier "conv_hybrid"."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from based.layers import H3, BaseConv, Hyena, Mamba, Mamba2
from based.mqar.model import MQARModel, ZoologyBaseConv, mqar_config
from based.mqar.sweeps import FIGURE2_MODELS
from based.mqar.train import MQARRun, MQARTask


@pytest.mark.parametrize("mixer,layers", [
    ("mamba", (Mamba, Mamba)), ("mamba2", (Mamba2, Mamba2)), ("h3", (H3, H3)), ("hyena", (Hyena, Hyena)),
    ("linear_attn", (ZoologyBaseConv, nn.Module)), ("attention", (ZoologyBaseConv, nn.Module)),
])
def test_paper_layout_per_family(mixer, layers):
    model = MQARModel(mqar_config(mixer, 64, 100, 64))
    assert [type(m) for m in model.mixers][0] is layers[0] and isinstance(model.mixers[1], layers[1])
    norm = nn.LayerNorm if mixer not in ("mamba", "mamba2") else type(model.norms[0])
    assert all(isinstance(n, norm) for n in model.norms) and isinstance(model.ln_f, nn.LayerNorm)
    assert model.head(torch.zeros(64)).shape == (100,) and model.embeddings.weight is not None  # tied head


@pytest.mark.parametrize("mixer", ["attention", "sliding_window"])
def test_paper_attention_has_no_rotary(mixer):
    """Zoology's MHA and SlidingAttn have no position encoding (the BaseConv before them gives positions);
    the earlier conv_hybrid layout keeps the LM's rotary attention."""
    assert MQARModel(mqar_config(mixer, 64, 100, 64)).mixers[1].rotary is None
    assert MQARModel(mqar_config(mixer, 64, 100, 64, layout="conv_hybrid")).mixers[1].rotary is not None


def test_paper_h3_is_figure2s():
    model = MQARModel(mqar_config("h3", 128, 100, 64))
    h3 = model.mixers[1]
    assert (h3.d_state, h3.head_dim) == (32, 2)  # N = d_model / 4, head_dim 2
    assert model.state_size(64) == 2 * 128 * 2 * 32  # two layers of H * P^2 * N


def test_conv_hybrid_layout_is_kept():
    model = MQARModel(mqar_config("h3", 64, 100, 64, layout="conv_hybrid", h3_state_size=16))
    assert isinstance(model.mixers[0], BaseConv) and isinstance(model.mixers[1], H3)
    assert model.mixers[1].head_dim == 1 and model.state_size(64) == 64 * 16  # the mixer under test only


def test_bad_layout_is_named():
    with pytest.raises(ValueError, match="layout must be one of"):
        mqar_config("h3", 64, 100, layout="zoology")


def test_transformer_block_form():
    """x = x + mixer(ln1(x)); x = x + ln2(x) (Zoology's identity state mixer); ln_f at the end."""
    torch.manual_seed(0)
    model = MQARModel(mqar_config("hyena", 16, 50, 16))
    with torch.no_grad():
        for n in (*model.norms, *model.norms2, model.ln_f):
            n.weight.normal_()
            n.bias.normal_()
    ids = torch.randint(0, 50, (2, 16))
    x = model.embeddings(ids)
    for norm, mixer, norm2 in zip(model.norms, model.mixers, model.norms2):
        x = x + mixer(norm(x))
        x = x + norm2(x)
    torch.testing.assert_close(model.hidden(ids), model.ln_f(x))


def test_paper_init():
    torch.manual_seed(0)
    hyena = MQARModel(mqar_config("hyena", 256, 100, 64))
    lin = hyena.mixers[0].in_proj
    assert abs(lin.weight.std().item() - 0.02) < 0.002 and not lin.bias.any()
    assert abs(hyena.mixers[0].filter.mlp[2].weight.std().item() - 0.02) < 0.003  # the filter's MLP too
    assert abs(hyena.mixers[1].out_proj.weight.std().item() - 0.01) < 0.001  # 0.02 / sqrt(2 * n_layer)
    h3 = MQARModel(mqar_config("h3", 256, 100, 64)).mixers[0]
    assert abs(h3.out_proj.weight.std().item() - 0.02) < 0.002  # Zoology's output_linear: not rescaled
    mamba = MQARModel(mqar_config("mamba", 64, 100, 64)).mixers[0]
    bound = 1 / math.sqrt(mamba.d_inner) / math.sqrt(2)  # kaiming-uniform(a = sqrt 5) / sqrt(n_layer)
    assert mamba.out_proj.weight.abs().max() <= bound and mamba.out_proj.weight.abs().max() > 0.9 * bound
    assert mamba.in_proj.weight.abs().max() > 0.9 / math.sqrt(64)  # torch's default, not N(0, 0.02)


def test_every_figure2_model_builds_and_runs_forward():
    seen = set()
    for mixer, d, kwargs in FIGURE2_MODELS:
        if mixer in seen:
            continue
        seen.add(mixer)
        model = MQARModel(mqar_config(mixer, d, 64, 32, **kwargs))
        assert model(torch.randint(0, 64, (1, 32))).shape == (1, 32, 64)


def test_run_layout_is_a_recorded_field():
    task = (MQARTask(16, 2, 4),)
    paper, hybrid = (MQARRun("h3", 32, 1e-3, train=task, test=task, layout=lay) for lay in ("paper", "conv_hybrid"))
    assert paper.to_dict()["layout"] == "paper" and paper.run_id != hybrid.run_id
    assert hybrid.model_name.endswith("layout=conv_hybrid") and "layout" not in paper.model_name
    assert MQARModel(paper.config()).layout == "paper" and MQARModel(hybrid.config()).layout == "conv_hybrid"


@pytest.mark.slow  # about 15 s on an idle core, 50 s on a loaded one
def test_paper_layout_learns_mqar():
    """Figure 2's Based model solves a small MQAR task (600 steps of batch 32; measured 0.97 at step 500)."""
    from based.mqar.train import train_mqar

    run = MQARRun("linear_attn", 64, 3e-3, {"feature_dim": 16}, train=(MQARTask(64, 4, 600 * 32),),
                  test=(MQARTask(64, 4, 256),), vocab_size=256, epochs=1, batch_size=32)
    assert run.layout == "paper"
    row = train_mqar(run)
    assert row["accuracy"]["T64_kv4"] > 0.8, row
