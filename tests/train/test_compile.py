"""`based train --compile`: the losses of the eager run, the same checkpoint keys, resume across compile on/off.

The fast tests compile with backend aot_eager (Dynamo and AOTAutograd: the graphs, graph breaks and
autograd that Inductor gets, without code generation); the `slow` one runs Inductor's C++ backend.
"""
import json

import pytest
import torch
import torch._dynamo
from safetensors.torch import load_file

import based.train.distributed as distributed
from based import BasedConfig, BasedForCausalLM
from based.cli import main
from based.train import train
from based.train.checkpoint import TRAINER_STATE, list_checkpoints

from .test_distributed import assert_close_rows, torchrun
from .test_trainer import cli_args, make_config, train_rows, val_rows

STEPS = 4


@pytest.fixture(autouse=True)
def aot_eager(monkeypatch):
    monkeypatch.setattr(distributed, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def config(out, small_corpus, small_tokenizer, **kw):
    return make_config(out, small_corpus, small_tokenizer, max_steps=STEPS, save_every=2, eval_every=2, **kw)


@pytest.fixture(scope="module")
def eager_run(tmp_path_factory, small_corpus, small_tokenizer):
    out = tmp_path_factory.mktemp("eager")
    train(config(out, small_corpus, small_tokenizer))
    return out


def assert_same_run(got, want) -> None:
    """Losses, gradient norms and validation losses within float tolerance."""
    for key in ("loss", "grad_norm"):
        assert_close_rows(train_rows(got), train_rows(want), key)
    assert_close_rows(val_rows(got), val_rows(want), "val_loss")


def checkpoint_keys(ckpt) -> tuple[list[str], list[str]]:
    """Parameter names of model.safetensors and of the saved AdamW state."""
    optim = torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=True)["optimizer"]
    return sorted(load_file(str(ckpt / "model.safetensors"))), sorted(optim["state"])


def test_compile_blocks_keeps_the_state_dict_keys():
    model = BasedForCausalLM(BasedConfig.from_preset("debug"))
    keys = list(model.state_dict())
    distributed.compile_blocks(model)
    assert list(model.state_dict()) == keys and not any("_orig_mod" in k for k in keys)
    assert all(block._compiled_call_impl is not None for block in model.transformer.layers)


def test_compiled_run_matches_eager(eager_run, small_corpus, small_tokenizer, tmp_path):
    cfg = config(tmp_path, small_corpus, small_tokenizer)
    assert main(["train", *cli_args(cfg), "--compile"]) == 0
    assert json.loads((tmp_path / "run.json").read_text())["compile"] is True
    assert_same_run(tmp_path, eager_run)
    for got, want in zip(list_checkpoints(tmp_path), list_checkpoints(eager_run), strict=True):
        assert checkpoint_keys(got) == checkpoint_keys(want)
        assert not any("_orig_mod" in k for k in checkpoint_keys(got)[0])
    BasedForCausalLM.from_pretrained(tmp_path)  # the exported model loads without compile


@pytest.mark.parametrize("first", [True, False], ids=["compiled-then-eager", "eager-then-compiled"])
def test_resume_across_compile_on_off(first, eager_run, small_corpus, small_tokenizer, tmp_path):
    train(config(tmp_path, small_corpus, small_tokenizer, stop_at=2, compile=first))
    train(config(tmp_path, small_corpus, small_tokenizer, resume=True, compile=not first))
    assert [r["step"] for r in train_rows(tmp_path)] == list(range(1, STEPS + 1))
    assert_same_run(tmp_path, eager_run)


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_compiled_blocks_under_ddp_and_fsdp(fsdp, eager_run, small_corpus, small_tokenizer, tmp_path, based_cache,
                                            monkeypatch):
    """Blocks compiled before DDP / FSDP2 wrap them (2 processes, gloo) train as one eager process does."""
    monkeypatch.setenv("BASED_COMPILE_BACKEND", "aot_eager")
    torchrun(config(tmp_path, small_corpus, small_tokenizer), based_cache, "--compile", *(["--fsdp"] if fsdp else []))
    assert_same_run(tmp_path, eager_run)


@pytest.mark.slow
def test_inductor_run_matches_eager(eager_run, small_corpus, small_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "COMPILE_BACKEND", "inductor")
    train(config(tmp_path, small_corpus, small_tokenizer, compile=True))
    assert_same_run(tmp_path, eager_run)
