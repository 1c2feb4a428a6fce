"""lm-evaluation-harness: the "based" model's three request types against direct computations, the shipped
recall tasks and tiny local tasks through lm_eval.simple_evaluate, and the `based-lm-eval` wrapper CLI."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from based import BasedConfig, BasedForCausalLM
from based.eval import evaluate_perplexity, evaluate_recall, generate_until, load_examples

from .conftest import TEXT

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from based.eval.harness import TASKS_DIR, BasedLM, main  # noqa: E402

MAX_LENGTH = 16


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return BasedForCausalLM(BasedConfig.from_preset("debug", vocab_size=len(tokenizer))).eval()


@pytest.fixture(scope="module")
def lm(model, tokenizer):
    return BasedLM(pretrained=model, tokenizer=tokenizer, batch_size=3, max_length=MAX_LENGTH)


def request(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def direct_logprob(model, context_ids, continuation_ids):
    ids = torch.tensor(context_ids + continuation_ids)[-(MAX_LENGTH + 1):]
    with torch.no_grad():
        logits = model(ids[None, :-1]).logits[0, -len(continuation_ids):]
    return F.log_softmax(logits.double(), -1).gather(-1, torch.tensor(continuation_ids)[:, None]).sum().item()


def test_loglikelihood_matches_a_direct_forward(lm, model, tokenizer):
    pairs = [("The capital of France is", " Paris"), ("Name:", " Alice. Phone: 555-0100."), ("", "Rome"),
             ("The capital of Italy is Rome." * 5, " The capital")]  # the last one is cut to MAX_LENGTH
    results = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs])
    eos = tokenizer.eos_token_id
    for (context, continuation), (ll, _) in zip(pairs, results):
        whole = tokenizer.encode(context + continuation)
        ctx = tokenizer.encode(context) if context else [eos]
        cont = whole[len(ctx):] if context else whole
        assert ll == pytest.approx(direct_logprob(model, ctx, cont), rel=1e-4, abs=1e-4)


def test_is_greedy(lm, model, tokenizer):
    ctx = tokenizer.encode("The capital of France is")
    with torch.no_grad():
        best = model(torch.tensor([ctx])).logits[0, -1].argmax().item()
    other = (best + 1) % len(tokenizer)
    results = lm._loglikelihood_tokens([(None, ctx, [best]), (None, ctx, [other])], disable_tqdm=True)
    assert [greedy for _, greedy in results] == [True, False]


def test_loglikelihood_rolling_equals_our_perplexity(lm, model, tokenizer):
    texts = [TEXT[0] * 3, TEXT[1]]
    lls = lm.loglikelihood_rolling([request("loglikelihood_rolling", t) for t in texts])
    for text, ll in zip(texts, lls):
        # Disjoint windows of MAX_LENGTH tokens after an EOS prefix: stride = max_length.
        ref = evaluate_perplexity(model, tokenizer, [text], MAX_LENGTH, MAX_LENGTH, progress=False)
        assert -ll == pytest.approx(ref["loss"] * ref["tokens"], rel=1e-5)


def test_generate_until_uses_stop_strings_and_budget(lm, model, tokenizer):
    greedy = {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}
    stop_at_e = {"until": ["e"], "max_gen_toks": 4, "do_sample": False}
    reqs = [request("generate_until", "Name:", greedy), request("generate_until", "Phone:", stop_at_e),
            request("generate_until", "The capital of", greedy)]
    texts = lm.generate_until(reqs)
    for req, text in zip(reqs, texts):
        prompt, kwargs = req.args
        stops = [*kwargs["until"], "<|endoftext|>"]  # lm-eval adds the EOS text
        [(expected, _)] = generate_until(model, tokenizer, [tokenizer.encode(prompt)], stops, kwargs["max_gen_toks"],
                                         progress=False)
        assert text == expected and not any(s in text for s in kwargs["until"])


def write_tiny_tasks(tmp_path):
    """A multiple-choice (loglikelihood) and a perplexity (loglikelihood_rolling) task on local JSONL."""
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "The capital of France is", "choices": [" Paris", " Rome"], "label": 0},
        {"question": "The capital of Italy is", "choices": [" Paris", " Rome"], "label": 1},
    ]))
    (tmp_path / "ppl.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    common = "dataset_path: json\ntest_split: test\nmetadata:\n  version: 1.0\n"
    (tmp_path / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n"
    )
    (tmp_path / "tiny_ppl.yaml").write_text(
        f"task: tiny_ppl\n{common}dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'ppl.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )


def recall_file(path):
    rows = [{"text": f"Name: Alice. Phone: 555-01{i:02d}.\nName: Alice. Phone:", "value": v}
            for i, v in enumerate(["e", "555-0100", " ", "a"])]
    rows[2]["value"] = "zq-not-generated"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_simple_evaluate_on_tiny_local_tasks(lm, model, tokenizer, tmp_path):
    write_tiny_tasks(tmp_path)
    swde = recall_file(tmp_path / "swde.jsonl")
    tm = TaskManager(include_path=[str(TASKS_DIR), str(tmp_path)], include_defaults=False,
                     metadata={"swde_path": str(swde)})
    out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc", "tiny_ppl", "based_swde"], task_manager=tm,
                                  bootstrap_iters=0)
    results = out["results"]
    assert 0 <= results["tiny_mc"]["acc,none"] <= 1
    ours = evaluate_perplexity(model, tokenizer, TEXT, MAX_LENGTH, MAX_LENGTH, progress=False)
    assert results["tiny_ppl"]["bits_per_byte,none"] == pytest.approx(ours["bits_per_byte"], rel=1e-5)
    report, _ = evaluate_recall(model, tokenizer, load_examples(swde), batch_size=2, progress=False)
    assert results["based_swde"]["contains,none"] == pytest.approx(report["accuracy"])


def test_recall_tasks_need_their_data_file(lm):
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    with pytest.raises(ValueError, match=r'based_fda reads a local JSONL file: pass --metadata \'\{"fda_path"'):
        lm_eval.simple_evaluate(model=lm, tasks=["based_fda"], task_manager=tm)


def test_wrapper_cli_registers_the_model_and_the_tasks(checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    class OnlyIncluded(TaskManager):  # indexing lm-eval's thousands of built-in tasks takes ~20 s
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "include_defaults": False})

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", OnlyIncluded)
    data = recall_file(tmp_path / "fda.jsonl")
    main(["--model", "based", "--model_args", f"pretrained={checkpoint},max_length=64", "--tasks", "based_fda",
          "--metadata", json.dumps({"fda_path": str(data)}), "--limit", "2", "--batch_size", "2",
          "--output_path", str(tmp_path / "out")])
    [path] = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(path.read_text())["results"]["based_fda"]
    assert not math.isnan(results["contains,none"]) and 0 <= results["contains,none"] <= 1


def test_plain_lm_eval_command_finds_the_model_and_the_tasks(checkpoint, tmp_path):
    """`lm_eval --model based --tasks based_fda`, lm-eval's own console script in a fresh process: the
    based-lm-eval.pth that installing based puts in site-packages registers both (based_lm_eval_plugin)."""
    lm_eval_cli = shutil.which("lm_eval", path=str(Path(sys.executable).parent))
    assert lm_eval_cli, "lm-eval's `lm_eval` command is not installed next to this Python"
    data = recall_file(tmp_path / "fda.jsonl")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run(
        [lm_eval_cli, "--model", "based", "--model_args", f"pretrained={checkpoint},max_length=64",
         "--tasks", "based_fda", "--metadata", json.dumps({"fda_path": str(data)}), "--limit", "2",
         "--batch_size", "2", "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    [path] = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(path.read_text())["results"]["based_fda"]
    assert 0 <= results["contains,none"] <= 1
    assert json.loads(path.read_text())["config"]["model"] == "based"


def test_the_plugin_can_be_switched_off():
    code = "from lm_eval.api.registry import get_model; get_model('based')"
    env = {**os.environ, "BASED_LM_EVAL_PLUGIN": "0"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode != 0 and "no model for this name found" in run.stderr
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


def test_plugin_keeps_task_manager_calls_as_lm_eval_defines_them(tmp_path):
    """The wrapped TaskManager.__init__ takes positional and keyword arguments as the original does, puts
    our task folder first next to lm-eval's defaults, and leaves an exact set (no defaults) alone."""
    import types

    import based_lm_eval_plugin as plugin

    class Manager:  # lm-eval 0.4.13's signature
        def __init__(self, verbosity=None, include_path=None, include_defaults=True, metadata=None):
            self.include_path, self.include_defaults = include_path, include_defaults

    plugin._add_task_path(types.SimpleNamespace(TaskManager=Manager))
    ours = str(TASKS_DIR)
    assert Manager(None, str(tmp_path)).include_path == [ours, str(tmp_path)]
    assert Manager(include_path=[str(tmp_path)], metadata={}).include_path == [ours, str(tmp_path)]
    assert Manager().include_path == [ours]
    assert Manager(None, str(tmp_path), False).include_path == str(tmp_path)
    assert Manager(None, [ours]).include_path == [ours]  # not added twice


def test_batch_size_auto_gives_the_same_scores(lm, model, tokenizer):
    # Before: "auto" was refused ("batch_size must be a positive integer").
    auto = BasedLM(pretrained=model, tokenizer=tokenizer, batch_size="auto", max_batch_size=8, max_length=MAX_LENGTH)
    pairs = [(tokenizer.encode(c), tokenizer.encode(x)) for c, x in [("The capital of", " Paris"), ("Name:", " Bob")] * 5]
    requests = [(None, c, x) for c, x in pairs]
    got, expected = (x._loglikelihood_tokens(requests, disable_tqdm=True) for x in (auto, lm))
    assert [g for _, g in got] == [g for _, g in expected]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in expected], rel=1e-5, abs=1e-5)
    longest = max(len(c) + len(x) - 1 for c, x in pairs)
    assert auto.batch_sizes == {longest: 8}  # the debug model fits the largest size tried
    assert BasedLM(pretrained=model, tokenizer=tokenizer, batch_size="auto:4").auto_batch_size
    with pytest.raises(ValueError, match="positive integer or 'auto'"):
        BasedLM(pretrained=model, tokenizer=tokenizer, batch_size="automatic")


def test_batch_size_auto_halves_on_out_of_memory(model, tokenizer, monkeypatch):
    auto = BasedLM(pretrained=model, tokenizer=tokenizer, batch_size="auto", max_batch_size=16, max_length=MAX_LENGTH)
    tried = []
    forward = type(model).forward

    def small_memory(self, input_ids=None, *args, **kwargs):
        tried.append(input_ids.shape[0])
        if input_ids.shape[0] > 3:
            raise torch.OutOfMemoryError("pretend")
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", small_memory)
    texts = auto.generate_until([request("generate_until", "The capital of", {"until": ["\n"], "max_gen_toks": 3})] * 5)
    assert len(texts) == 5 and tried[:4] == [16, 8, 4, 2] and list(auto.batch_sizes.values()) == [2]
    tried.clear()
    with pytest.raises(ValueError, match="one sequence of 7 tokens does not fit in memory"):
        monkeypatch.setattr(type(model), "forward", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError()))
        auto._detect_batch_size(7)


def test_wrapper_cli_with_batch_size_auto(checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    class OnlyIncluded(TaskManager):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "include_defaults": False})

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", OnlyIncluded)
    data = recall_file(tmp_path / "fda.jsonl")
    main(["--model", "based", "--model_args", f"pretrained={checkpoint},max_length=64", "--tasks", "based_fda",
          "--metadata", json.dumps({"fda_path": str(data)}), "--limit", "2", "--batch_size", "auto",
          "--max_batch_size", "4", "--output_path", str(tmp_path / "out")])
    [path] = (tmp_path / "out").rglob("results_*.json")
    report = json.loads(path.read_text())
    assert 0 <= report["results"]["based_fda"]["contains,none"] <= 1
    assert report["config"]["batch_size"] == "auto" and report["config"]["batch_sizes"] == [4]
