"""Damaged or mismatched checkpoints in `based generate`, `based eval` and `based convert --to`: one line that
names the file and what is wrong, a non-zero exit, never random weights or a traceback."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from based import BasedConfig, BasedForCausalLM
from based.cli import main
from tests.eval.conftest import build_tokenizer

NORM = "transformer.layers.0.norm1.weight"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A BPE checkpoint (vocabulary 320) with its tokenizer, and a corpus for eval."""
    path = tmp_path_factory.mktemp("ckpt")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    BasedForCausalLM(BasedConfig.from_preset("debug", vocab_size=len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "corpus.txt").write_text("The capital of France is Paris.\n" * 20)
    return path


@pytest.fixture
def ckpt(saved, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(saved, copy)
    return copy


def generate(ckpt, capsys, *extra):
    code = main(["generate", "--checkpoint", str(ckpt), "--prompt", "The capital", "--max-new-tokens", "2", *extra])
    captured = capsys.readouterr()
    return code, captured.err


def evaluate(ckpt, tmp_path):
    return main(["eval", "--checkpoint", str(ckpt), "--task", "perplexity", "--data", str(ckpt / "corpus.txt"),
                 "--max-length", "16", "--no-progress", "--out", str(tmp_path / "eval")])


def convert_to(ckpt, tmp_path):
    return main(["convert", "--to", "hazyresearch", "--checkpoint", str(ckpt), "--out", str(tmp_path / "theirs")])


def edit_weights(ckpt, edit):
    sd = load_file(ckpt / "model.safetensors")
    edit(sd)
    save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})


def one_line_error(run, match):
    """run() exits through SystemExit (eval, convert) or returns 2 (generate); either way one line."""
    with pytest.raises(SystemExit) as e:
        run()
    message = str(e.value.code)
    assert match in message and "\n" not in message, message


def test_the_intact_checkpoint_works(ckpt, capsys, tmp_path):
    code, err = generate(ckpt, capsys)
    assert code == 0, err
    assert evaluate(ckpt, tmp_path) == 0
    assert convert_to(ckpt, tmp_path) == 0


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.pop(NORM), f"missing tensors: {NORM}"),
    (lambda sd: sd.update(extra=torch.zeros(3)), "unexpected tensors: extra"),
    (lambda sd: sd.update({NORM: torch.zeros(5)}), f"wrong shape: {NORM} (5,) (config.json says (64,))"),
])
def test_missing_unexpected_or_misshapen_tensors_are_named(ckpt, capsys, tmp_path, edit, match):
    # Before: a missing tensor was left at its random initialisation with exit 0.
    edit_weights(ckpt, edit)
    code, err = generate(ckpt, capsys)
    assert code == 2 and match in err and f"the weights in {ckpt}" in err and err.count("\n") == 1, err
    one_line_error(lambda: evaluate(ckpt, tmp_path), match)
    one_line_error(lambda: convert_to(ckpt, tmp_path), match)


@pytest.mark.parametrize("cut", [0, 100, -10])
def test_an_empty_or_truncated_safetensors_file_is_named(ckpt, capsys, tmp_path, cut):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[:cut])
    match = f"{ckpt / 'model.safetensors'} is not a readable safetensors file"
    code, err = generate(ckpt, capsys)
    assert code == 2 and match in err and err.count("\n") == 1, err
    one_line_error(lambda: evaluate(ckpt, tmp_path), match)
    one_line_error(lambda: convert_to(ckpt, tmp_path), match)


@pytest.mark.parametrize("text, match", [
    ('{"model_type": "based", "d_model": ', "config.json is not valid JSON"),
    ("[1, 2]", "config.json must hold a JSON object of config fields, not a list"),
    (None, "n_layer must be a positive int, got -1"),
])
def test_an_invalid_config_is_named(ckpt, capsys, tmp_path, text, match):
    if text is None:
        text = json.dumps({**json.loads((ckpt / "config.json").read_text()), "n_layer": -1})
    (ckpt / "config.json").write_text(text)
    code, err = generate(ckpt, capsys)
    assert code == 2 and match in err and "config.json" in err and err.count("\n") == 1, err
    one_line_error(lambda: evaluate(ckpt, tmp_path), match)


def test_a_bpe_checkpoint_without_its_tokenizer_is_refused(ckpt, capsys):
    # Before: it fell back to byte ids and printed garbage.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (ckpt / name).unlink()
    code, err = generate(ckpt, capsys)
    assert code == 2 and "has no tokenizer.json" in err and "vocabulary of 320 tokens is not bytes (256)" in err


def test_a_prompt_that_is_not_utf8_is_refused(ckpt, capsys):
    prompt = b"caf\xe9".decode("utf-8", "surrogateescape")  # how Python hands over a Latin-1 argv
    code = main(["generate", "--checkpoint", str(ckpt), "--prompt", prompt, "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "--prompt is not valid UTF-8 text" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("name, content, match", [
    # Before: tokenizers' "expected value at line 1 column 1" traceback, naming no file.
    ("tokenizer.json", "garbage", "tokenizer.json is not a tokenizer file: it is not valid JSON"),
    ("tokenizer.json", "", "tokenizer.json is not a tokenizer file: it is empty"),
    ("tokenizer.json", '{"version": "1.0"}', 'tokenizer.json is not a tokenizer file: it has no "model" object'),
    # Before: "Expecting value: line 1 column 1 (char 0)", naming no file.
    ("tokenizer_config.json", "{not json", "tokenizer_config.json is not a tokenizer file: it is not valid JSON"),
    ("tokenizer_config.json", "[]", "tokenizer_config.json is not a tokenizer file: it holds a JSON list"),
    ("tokenizer.json", None, "tokenizer.json is a folder, not a tokenizer file"),
])
def test_a_damaged_tokenizer_file_is_named(ckpt, capsys, name, content, match):
    (ckpt / name).unlink()
    if content is None:
        (ckpt / name).mkdir()
    else:
        (ckpt / name).write_text(content)
    code, err = generate(ckpt, capsys)
    assert code == 2 and f"{ckpt / name} " in err and match in err and err.count("\n") == 1, err


def test_a_tokenizer_the_rust_library_refuses_is_named(ckpt, capsys):
    # Valid JSON with a model object of the wrong shape: tokenizers' own message, with the file named.
    (ckpt / "tokenizer_config.json").unlink()
    (ckpt / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 3}}')
    code, err = generate(ckpt, capsys)
    assert code == 2 and f"{ckpt / 'tokenizer.json'} is not a usable tokenizer (" in err and err.count("\n") == 1, err


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(ckpt, capsys):
    # Before: refused only when the prompt happened to encode to an id past the vocabulary.
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "vocab_size": 300}))
    edit_weights(ckpt, lambda sd: sd.update({k: v[:304] for k, v in sd.items() if v.shape[0] == 320}))
    code, err = generate(ckpt, capsys)
    assert code == 2 and f"the tokenizer in {ckpt} has 320 tokens but the model's vocabulary only 300" in err, err


def test_a_weights_file_given_for_its_folder_is_named(ckpt, capsys):
    # Before: "checkpoint directory not found" for a file that exists.
    code, err = generate(ckpt / "model.safetensors", capsys)
    assert code == 2 and "model.safetensors is a file: pass the directory that holds it and its config.json" in err
