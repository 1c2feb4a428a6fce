"""The trainer on the CPU: outputs, exact resume (also after SIGKILL) and every bad input of issue 5."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import based.train.trainer as trainer_mod
from based import BasedConfig, BasedForCausalLM
from based.cli import main
from based.data.corpus import DataError
from based.train import TrainConfig, TrainError, train
from based.train.checkpoint import CheckpointError, list_checkpoints, read_checkpoint
from based.train.metrics import read_metrics

STEPS = 40


def make_config(out, corpus, tokenizer, **overrides) -> TrainConfig:
    """A tiny debug-preset run: 40 steps of 4 x 32 tokens, eval and checkpoint every 8 steps; 4 warm-up steps,
    fewer in a shorter run (a warm-up longer than the run is refused)."""
    values = dict(out=str(out), preset="debug", data=str(corpus), tokenizer=str(tokenizer), seq_len=32,
                  batch_size=4, max_steps=STEPS, lr=3e-3, eval_every=8, save_every=8, eval_tokens=32 * 16,
                  progress=False, sample_tokens=8)
    values.update(overrides)
    values.setdefault("warmup", min(4, values["max_steps"]))
    return TrainConfig(**values)


def cli_args(cfg: TrainConfig) -> list[str]:
    args = []
    for key in ("out", "preset", "data", "tokenizer", "seq_len", "batch_size", "max_steps", "warmup", "lr",
                "eval_every", "save_every", "eval_tokens"):
        args += [f"--{key.replace('_', '-')}", str(getattr(cfg, key))]
    return args + ["--no-progress"]


def train_rows(out) -> list[dict]:
    return [r for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r]


def val_rows(out) -> list[dict]:
    return [r for r in read_metrics(Path(out) / "metrics.jsonl") if "val_loss" in r]


def weights(path) -> dict:
    return BasedForCausalLM.from_pretrained(path).state_dict()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_corpus, small_tokenizer):
    """One uninterrupted run of STEPS steps: the yardstick of every resume test."""
    out = tmp_path_factory.mktemp("reference")
    summary = train(make_config(out, small_corpus, small_tokenizer))
    return out, summary


def test_run_outputs(reference, small_tokenizer):
    out, summary = reference
    rows = train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["tokens"] == r["step"] * 4 * 32 for r in rows)
    assert {"lr", "grad_norm", "tokens_per_s", "mfu", "time"} <= set(rows[0]) and rows[0]["mfu"] is None  # CPU
    assert rows[0]["loss"] == pytest.approx(torch.log(torch.tensor(512.0)).item(), abs=0.3)  # uniform at init
    assert sum(r["loss"] for r in rows[-5:]) / 5 < rows[0]["loss"] - 0.5  # it learns
    vals = val_rows(out)
    assert [r["step"] for r in vals] == [8, 16, 24, 32, 40]
    assert vals[-1]["val_loss"] < vals[0]["val_loss"] and vals[-1]["val_ppl"] == pytest.approx(
        torch.exp(torch.tensor(vals[-1]["val_loss"])).item(), rel=1e-6)
    assert summary["val_loss"] == vals[-1]["val_loss"] and summary["sample"].startswith("The")
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in list_checkpoints(out)] == ["step-0000024", "step-0000032", "step-0000040"]  # keep 3
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_final_model_and_tokenizer_load_from_out(reference):
    from transformers import AutoTokenizer

    out, _ = reference
    model = BasedForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 512  # from the tokenizer, not the preset's 256
    last = list_checkpoints(out)[-1]
    for k, v in weights(last).items():
        assert torch.equal(v, model.state_dict()[k]), k
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    ids = tok("The value of", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], 512)
    assert AutoTokenizer.from_pretrained(str(last), local_files_only=True).get_vocab() == tok.get_vocab()


def test_stop_and_resume_is_bit_identical(reference, small_corpus, small_tokenizer, tmp_path):
    ref, _ = reference
    train(make_config(tmp_path, small_corpus, small_tokenizer, stop_at=13))
    assert list_checkpoints(tmp_path)[-1].name == "step-0000013" and train_rows(tmp_path)[-1]["step"] == 13
    train(make_config(tmp_path, small_corpus, small_tokenizer, resume=True))
    run = json.loads((tmp_path / "run.json").read_text())
    assert (run["start_step"], run["changes"]) == (13, [])  # --stop-at and --resume are no change of settings
    for a, b in zip(train_rows(tmp_path), train_rows(ref), strict=True):
        assert (a["step"], a["loss"], a["lr"], a["grad_norm"]) == (b["step"], b["loss"], b["lr"], b["grad_norm"])
    assert val_rows(tmp_path) == val_rows(ref)
    ref_weights = weights(ref)
    for k, v in weights(tmp_path).items():
        assert torch.equal(v, ref_weights[k]), k


def test_sigkill_then_resume_matches(reference, small_corpus, small_tokenizer, tmp_path, based_cache):
    ref, _ = reference
    cfg = make_config(tmp_path, small_corpus, small_tokenizer, save_every=5)
    env = {**os.environ, "BASED_CACHE": str(based_cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "based", "train", *cli_args(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not any(r["step"] >= 12 for r in train_rows(tmp_path)):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.005)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    killed_at = train_rows(tmp_path)[-1]["step"]
    assert killed_at < STEPS and list_checkpoints(tmp_path)  # stopped mid-run, after a checkpoint
    train(make_config(tmp_path, small_corpus, small_tokenizer, save_every=5, resume=True))
    assert [r["loss"] for r in train_rows(tmp_path)] == [r["loss"] for r in train_rows(ref)]
    assert val_rows(tmp_path) == val_rows(ref)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, small_corpus, small_tokenizer):
    """Two steps with a checkpoint after each: copied by the tests that break it."""
    out = tmp_path_factory.mktemp("short")
    train(make_config(out, small_corpus, small_tokenizer, max_steps=2, save_every=1))
    return out


def test_resume_with_another_config_is_refused(short_run, small_corpus, small_tokenizer, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(short_run, out)
    with pytest.raises(CheckpointError, match=r"another config \(.*n_layer: 4 in the checkpoint, 5 now"):
        train(make_config(out, small_corpus, small_tokenizer, preset="transformer-debug", max_steps=4, resume=True))


def test_corrupt_checkpoint_is_reported(short_run, small_corpus, small_tokenizer, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(short_run, out)
    f = list_checkpoints(out)[-1] / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"step-0000002 is corrupt or incomplete.*delete that folder"):
        train(make_config(out, small_corpus, small_tokenizer, max_steps=4, resume=True))
    shutil.rmtree(list_checkpoints(out)[-1])  # as the message says: then step 1 resumes
    (list_checkpoints(out)[-1] / "trainer.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="step-0000001 is corrupt"):
        read_checkpoint(list_checkpoints(out)[-1])


def test_checkpoint_files_that_load_but_hold_something_else(short_run, small_corpus, small_tokenizer, tmp_path):
    # Each failed with a KeyError / AttributeError traceback (or blamed the tokenizer) instead of a one-line error.
    def saved_state(edit):
        state = torch.load(short_run / "checkpoints" / "step-0000002" / "trainer.pt", weights_only=True)
        edit(state)
        return state

    breaks = {
        "trainer.pt holds a list, not a trainer state": lambda ckpt: torch.save([1, 2], ckpt / "trainer.pt"),
        "trainer.pt lacks optimizer, rng, samples_seen": lambda ckpt: torch.save({}, ckpt / "trainer.pt"),
        "trainer.pt lacks step": lambda ckpt: torch.save(saved_state(lambda s: s.pop("step")), ckpt / "trainer.pt"),
        "config.json holds a JSON list, not an object": lambda ckpt: (ckpt / "config.json").write_text("[1]"),
        ": the checkpoint's scheduler or RNG state is corrupt": lambda ckpt: torch.save(
            saved_state(lambda s: s.update(scheduler=5)), ckpt / "trainer.pt"),
    }
    for i, (message, damage) in enumerate(breaks.items()):
        out = tmp_path / f"run{i}"
        shutil.copytree(short_run, out)
        damage(list_checkpoints(out)[-1])
        with pytest.raises(CheckpointError, match=r"step-0000002.*" + message.replace("(", r"\(") + ".*delete that"):
            train(make_config(out, small_corpus, small_tokenizer, max_steps=4, resume=True))


def test_out_and_peak_flops_refused_before_training(tmp_path, monkeypatch):
    # --out '' trained into the working folder; --peak-flops nan / -1 / 0 / inf logged NaN or negative MFUs.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"^error: --out must name a folder \(got an empty string\)$"):
        main(["train", "--out", ""])
    with pytest.raises(ValueError, match="out must name a folder"):
        TrainConfig(out="").resolved()
    for bad in ("nan", "-1", "0", "inf"):
        # One check, TrainConfig's (the CLI had a second one): its message, one line, names the flag.
        with pytest.raises(SystemExit, match=r"^error: peak_flops must be > 0 and finite \(FLOP/s per device\), "
                                             r"got [^\n]*: give a positive --peak-flops, or leave it out[^\n]*$"):
            main(["train", "--out", str(tmp_path / "run"), "--peak-flops", bad])
        with pytest.raises(ValueError, match="peak_flops must be > 0 and finite"):
            TrainConfig(out="run", peak_flops=float(bad)).resolved()
    assert list(tmp_path.iterdir()) == []


def test_warmup_longer_than_the_run_is_refused(tmp_path, monkeypatch):
    # --warmup 50 --max-steps 10 trained on silently, the LR never reaching --lr.
    monkeypatch.chdir(tmp_path)
    message = (r"warmup=50 is longer than the run, max_steps=10: the learning rate would never reach --lr; lower "
               r"--warmup to at most --max-steps, or raise --max-steps$")
    with pytest.raises(SystemExit, match="^error: " + message):  # a str code: exit status 1
        main(["train", "--out", str(tmp_path / "run"), "--warmup", "50", "--max-steps", "10"])
    with pytest.raises(ValueError, match="^" + message):
        TrainConfig(out="run", warmup=50, max_steps=10).resolved()
    assert list(tmp_path.iterdir()) == []
    # As long as the run is fine (the LR peaks at the last step); a default warm-up is cut to a short run.
    assert TrainConfig(out="run", warmup=10, max_steps=10).resolved().warmup == 10
    assert TrainConfig(out="run", max_steps=10).resolved().warmup == 10
    assert TrainConfig(out="run", preset="360m", max_steps=50).resolved().warmup == 50
    assert TrainConfig(out="run").resolved().warmup == 30


def test_existing_run_needs_resume(short_run, small_corpus, small_tokenizer):
    with pytest.raises(TrainError, match="already holds checkpoints .*pass --resume"):
        train(make_config(short_run, small_corpus, small_tokenizer, max_steps=2))


def test_finished_run_resumes_to_nothing(short_run, small_corpus, small_tokenizer, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(short_run, out)
    assert train(make_config(out, small_corpus, small_tokenizer, max_steps=2, resume=True))["step"] == 2


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(small_corpus, small_tokenizer, tmp_path, monkeypatch):
    real_loss, calls = trainer_mod._loss, []

    def loss_nan_at_step_6(model, x, y, reduction="mean", loss_fn=trainer_mod.cross_entropy):
        loss = real_loss(model, x, y, reduction, loss_fn)
        if reduction == "mean":
            calls.append(1)
            if len(calls) == 6:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(trainer_mod, "_loss", loss_nan_at_step_6)
    with pytest.raises(TrainError, match=r"loss is nan .* at step 6: .*last good checkpoint is .*step-0000004 .*"
                                         r"a lower --lr, which applies from the resumed step on"):
        train(make_config(tmp_path, small_corpus, small_tokenizer, max_steps=10, save_every=2))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000002", "step-0000004"]
    assert train_rows(tmp_path)[-1]["step"] == 5
    monkeypatch.setattr(trainer_mod, "_loss", real_loss)
    train(make_config(tmp_path, small_corpus, small_tokenizer, max_steps=10, save_every=2, resume=True))
    assert [r["step"] for r in train_rows(tmp_path)] == list(range(1, 11))


def test_nan_loss_before_any_checkpoint_says_to_start_again(small_corpus, small_tokenizer, tmp_path, monkeypatch):
    # The message told to "resume from it with --resume" when no checkpoint existed.
    real_loss = trainer_mod._loss
    monkeypatch.setattr(trainer_mod, "_loss", lambda *a, **k: real_loss(*a, **k) * float("nan"))
    with pytest.raises(TrainError, match=r"at step 1: .*; no checkpoint was written yet \(start again with a lower "
                                         r"--lr\)$"):
        train(make_config(tmp_path, small_corpus, small_tokenizer))


def test_bad_data_and_tokenizer(small_corpus, small_tokenizer, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        train(make_config(tmp_path / "a", tmp_path / "missing.jsonl", small_tokenizer))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("\n")
    with pytest.raises(DataError, match="holds no text"):
        train(make_config(tmp_path / "b", tmp_path / "empty", small_tokenizer))
    (tmp_path / "tiny.txt").write_text("A corpus of a few words.")
    with pytest.raises(DataError, match="fewer than one sequence"):
        train(make_config(tmp_path / "c", tmp_path / "tiny.txt", small_tokenizer, seq_len=256))
    with pytest.raises(DataError, match="tokenizer folder .* does not exist"):
        train(make_config(tmp_path / "d", small_corpus, tmp_path / "no-tokenizer"))


def test_forced_vocab_smaller_than_the_tokenizer(small_corpus, small_tokenizer, tmp_path):
    config = tmp_path / "model.json"
    config.write_text(json.dumps({"preset": "debug", "vocab_size": 256}))
    with pytest.raises(DataError, match="the tokenizer has 512 tokens but .*model.json sets vocab_size=256"):
        train(make_config(tmp_path / "run", small_corpus, small_tokenizer, preset=None, config=str(config)))
    config.write_text(json.dumps({"preset": "debug", "vocab_size": 1000, "d_model": 32}))
    built = trainer_mod.build_model_config(TrainConfig(out="x", config=str(config)).resolved(), 512)
    assert (built.vocab_size, built.d_model, built.n_layer) == (1000, 32, 4)


def test_cli_reports_errors_without_a_traceback(small_tokenizer, tmp_path):
    with pytest.raises(SystemExit, match=r"^error: corpus .*missing does not exist"):
        main(["train", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "missing"),
              "--tokenizer", str(small_tokenizer)])
    with pytest.raises(SystemExit, match="positive int"):
        main(["train", "--out", str(tmp_path / "run"), "--max-steps", "0"])


def test_grad_accum_matches_one_big_batch(small_corpus, small_tokenizer, tmp_path):
    # 2 micro-steps of 2 sequences see the same 4 sequences per step as 1 micro-step of 4.
    train(make_config(tmp_path / "big", small_corpus, small_tokenizer, max_steps=3, save_every=3))
    train(make_config(tmp_path / "acc", small_corpus, small_tokenizer, max_steps=3, save_every=3, batch_size=2,
                      grad_accum=2))
    big, acc = train_rows(tmp_path / "big"), train_rows(tmp_path / "acc")
    assert [r["tokens"] for r in acc] == [r["tokens"] for r in big]
    for a, b in zip(acc, big, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_hf_generate_and_pipeline_stop_at_eos_without_set_up(reference):
    # Training writes bos / eos / pad ids into config.json and generation_config.json and saves the
    # tokenizer with a pad token: generate() and a batched pipeline then stop at eos with no arguments.
    from transformers import AutoTokenizer, pipeline

    out, _ = reference
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    eos = tok.eos_token_id
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    for saved in (config, generation):
        assert (saved["bos_token_id"], saved["eos_token_id"], saved["pad_token_id"]) == (eos, eos, eos)
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_based.BasedForCausalLM"  # trust_remote_code
    assert (out / "modeling_based.py").is_file()
    assert tok.pad_token_id == eos
    model = BasedForCausalLM.from_pretrained(out).eval()
    calls = []

    def eos_from_the_third_token(module, args, logits):
        calls.append(1)
        if len(calls) >= 3:
            logits = logits.clone()
            logits[..., eos] = 1e4
            return logits

    model.lm_head.register_forward_hook(eos_from_the_third_token)
    ids = tok("Return the", return_tensors="pt").input_ids
    new = model.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:].tolist()
    assert len(new) == 3 and new[-1] == eos and eos not in new[:-1] and len(calls) == 3
    calls.clear()
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    prompts = ["The value", "Return the number of items in"]
    rows = pipe(prompts, batch_size=2, max_new_tokens=20, do_sample=False, return_tensors=True)
    assert len(calls) == 3  # one batch (left-padded with the pad token), stopped at eos, 17 tokens early
    for prompt, [row] in zip(prompts, rows, strict=True):
        generated = row["generated_token_ids"]
        assert generated[-1] == eos and eos not in generated[-3:-1]
        assert tok.decode(generated, skip_special_tokens=True).startswith(prompt)


def test_hf_generate_batches_prompts_padded_by_the_saved_tokenizer(reference):
    # Before: the saved tokenizer padded on the right, and model.generate(**tok(prompts, padding=True)) raised
    # "attention_mask must be left-padded" unless the user set padding_side="left" first.
    from transformers import AutoTokenizer

    out, _ = reference
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok.padding_side == "left"
    model = BasedForCausalLM.from_pretrained(out).eval()
    prompts = ["The value", "Return the number of items in"]
    batch = tok(prompts, padding=True, return_tensors="pt")
    rows = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch.input_ids.shape[1]:]
    for prompt, row in zip(prompts, rows, strict=True):
        ids = tok(prompt, return_tensors="pt").input_ids
        alone = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:]
        assert row[: len(alone)].tolist() == alone.tolist()


def test_trained_tokenizer_carries_the_default_chat_template(reference):
    # `based serve` renders chat requests with the tokenizer's template; training writes the server's default,
    # so transformers' apply_chat_template (and any client that reads tokenizer_config.json) renders the same.
    from transformers import AutoTokenizer

    from based.serve.text import default_chat_template, render_chat

    out, _ = reference
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok.chat_template == default_chat_template()
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == render_chat(default_chat_template(), messages, tok.eos_token, tok.bos_token)
    assert text == f"<|system|>\nBe terse.{tok.eos_token}\n<|user|>\nHi{tok.eos_token}\n<|assistant|>\n"


def test_killed_between_the_final_checkpoint_and_the_export(small_corpus, small_tokenizer, tmp_path, monkeypatch):
    real_export = trainer_mod._export

    def killed_at_the_final_export(ckpt, out):
        if ckpt.name == "step-0000003":
            raise KeyboardInterrupt  # the process dies here: step 3 is saved, OUT still holds step 2
        real_export(ckpt, out)

    monkeypatch.setattr(trainer_mod, "_export", killed_at_the_final_export)
    with pytest.raises(KeyboardInterrupt):
        train(make_config(tmp_path, small_corpus, small_tokenizer, max_steps=3, save_every=2))
    newest = list_checkpoints(tmp_path)[-1]
    assert newest.name == "step-0000003" and not trainer_mod.is_exported(newest, tmp_path)
    monkeypatch.setattr(trainer_mod, "_export", real_export)
    assert train(make_config(tmp_path, small_corpus, small_tokenizer, max_steps=3, save_every=2, resume=True))[
        "step"] == 3
    assert trainer_mod.is_exported(newest, tmp_path)
    newest_weights = weights(newest)
    for k, v in weights(tmp_path).items():
        assert torch.equal(v, newest_weights[k]), k


def test_optimizer_flags_on_resume_apply_and_are_recorded(small_corpus, small_tokenizer, tmp_path, capsys):
    first = make_config(tmp_path, small_corpus, small_tokenizer, max_steps=6, stop_at=3, save_every=3)
    train(first)
    train(make_config(tmp_path, small_corpus, small_tokenizer, max_steps=6, save_every=3, resume=True, lr=1e-3,
                      weight_decay=0.05))
    assert "--resume: from step 4 on, lr 0.003 -> 0.001, weight_decay 0.1 -> 0.05" in capsys.readouterr().out
    factor = trainer_mod.lr_schedule(4, 6, 0.1)
    lrs = {r["step"]: r["lr"] for r in train_rows(tmp_path)}
    assert lrs[3] == pytest.approx(3e-3 * factor(2), rel=1e-12)  # before the resume: the first run's
    for step in (4, 5, 6):
        assert lrs[step] == pytest.approx(1e-3 * factor(step - 1), rel=1e-12), step
    run = json.loads((tmp_path / "run.json").read_text())
    assert (run["lr"], run["weight_decay"], run["start_step"]) == (1e-3, 0.05, 3)
    assert run["changes"] == [{"step": 3, "changed": {"lr": [3e-3, 1e-3], "weight_decay": [0.1, 0.05]}}]
    _, state, _ = read_checkpoint(list_checkpoints(tmp_path)[-1])
    assert [g["weight_decay"] for g in state["optimizer"]["param_groups"]] == [0.05, 0.0]
    assert state["train_config"]["lr"] == 1e-3


def test_bad_model_config_files(small_corpus, small_tokenizer, tmp_path):
    config = tmp_path / "model.json"
    cfg = make_config(tmp_path / "run", small_corpus, small_tokenizer, preset=None, config=str(config)).resolved()
    for text, match in (
        ('{"preset": "debug", "d_modle": 32}', r"unknown field 'd_modle' \(did you mean 'd_model'\?\); valid fields: "),
        ("[1, 2]", r"holds a JSON list; it must be an object of BasedConfig fields"),
        ('{"d_model": 32', r"cannot read model config .*model.json \(--config\)"),
    ):
        config.write_text(text)
        with pytest.raises(TrainError, match=match):
            trainer_mod.build_model_config(cfg, 512)
    config.write_text('{"windw_size": 64}')
    with pytest.raises(SystemExit, match=r"^error: model config .*model.json \(--config\): unknown field 'windw_size' "
                                         r"\(did you mean 'window_size'\?\)"):
        main(["train", "--out", str(tmp_path / "run"), "--config", str(config), "--data", str(small_corpus),
              "--tokenizer", str(small_tokenizer)])
    assert not (tmp_path / "run").exists()  # a refused run leaves no empty folder behind
    # A config.json written by training (model_type, architectures, transformers_version, ...) is accepted.
    saved = json.loads(json.dumps(BasedConfig.from_preset("debug", vocab_size=512).to_dict()))
    config.write_text(json.dumps(saved))
    assert trainer_mod.build_model_config(cfg, 512).d_model == 64


def test_seq_len_past_the_positional_limit_is_refused(small_corpus, small_tokenizer, tmp_path):
    config = tmp_path / "model.json"
    config.write_text(json.dumps({"preset": "transformer-debug", "max_position_embeddings": 24}))
    with pytest.raises(TrainError, match=r"--seq-len 32 exceeds this model's max_position_embeddings=24 .*lower "
                                         r"--seq-len to at most 24, or raise max_position_embeddings with --config"):
        train(make_config(tmp_path / "run", small_corpus, small_tokenizer, preset=None, config=str(config)))


def test_out_that_is_a_file_and_allocation_failures(small_corpus, small_tokenizer, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SystemExit, match=r"^error: --out .*file is an existing file, not a folder"):
        main(["train", "--out", str(tmp_path / "file"), "--data", str(small_corpus), "--tokenizer",
              str(small_tokenizer)])
    with pytest.raises(SystemExit, match=r"^error: --out .*file/run is under .*file, a file, not a folder"):
        main(["train", "--out", str(tmp_path / "file" / "run"), "--data", str(small_corpus)])
    def cuda_out_of_memory(*args, **kwargs):  # what CUDA raises (no GPU here)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    import numpy as np

    # The CPU allocator's and numpy's real failures: 128 TiB and 8 PiB cannot be allocated anywhere.
    for name, allocation_fails in (("cuda", cuda_out_of_memory), ("cpu", lambda *a, **k: torch.empty(2**45)),
                                   ("numpy", lambda *a, **k: np.empty(2**50))):
        monkeypatch.setattr(trainer_mod, "_loss", allocation_fails)
        with pytest.raises(TrainError, match=r"out of memory at step 1 on cpu with --batch-size 4 \(x --seq-len 32\): "
                                             r"lower --batch-size"):
            train(make_config(tmp_path / name, small_corpus, small_tokenizer))
    monkeypatch.setattr(trainer_mod, "_loss", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="^shape mismatch$"):  # other errors are not reported as memory
        train(make_config(tmp_path / "other", small_corpus, small_tokenizer))


@pytest.mark.xfail(not BasedForCausalLM.supports_gradient_checkpointing, strict=True,
                   reason="gradient_checkpointing_enable() is being added to based/models/modeling.py")
def test_grad_checkpointing_trains_the_same(small_corpus, small_tokenizer, tmp_path, monkeypatch):
    made = []

    class Recorded(BasedForCausalLM):
        def __init__(self, config):
            super().__init__(config)
            made.append(self)

    train(make_config(tmp_path / "plain", small_corpus, small_tokenizer, max_steps=2, save_every=2))
    monkeypatch.setattr(trainer_mod, "BasedForCausalLM", Recorded)
    assert main(["train", *cli_args(make_config(tmp_path / "ckpt", small_corpus, small_tokenizer, max_steps=2,
                                                save_every=2)), "--grad-checkpointing"]) == 0
    # the trained model (not the one loaded for the sample) recomputes its blocks
    assert any(getattr(m, "gradient_checkpointing", False) for m in made[0].modules())
    assert json.loads((tmp_path / "ckpt" / "run.json").read_text())["grad_checkpointing"]
    for a, b in zip(train_rows(tmp_path / "ckpt"), train_rows(tmp_path / "plain"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
