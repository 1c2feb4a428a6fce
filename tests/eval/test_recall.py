"""Recall tasks: data schema and its errors, the "contains" metric, Wilson intervals, batched generation
through Hugging Face generate (left padding, stop at newline), and `based eval --task swde|fda|...`."""
import json

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutput

from based import BasedConfig, BasedForCausalLM
from based.cli import main
from based.eval import contains, evaluate_recall, generate_until, load_examples, wilson_interval
from based.eval.recall import RecallExample, StopOnStrings, accuracy_by_length


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_schema_accepts_the_public_fields_and_variants(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "  Title:  ", "value": " Paris ", "doc_id": 3},
        "",
        {"prompt": "Q:", "answers": ["a", "b"]},
        {"context": "C:", "answers": {"text": ["x"], "answer_start": [0]}},
        {"text": "T:", "answer": "y", "value": "z"},  # "value" comes first
    ])
    examples = load_examples(path)
    assert [(e.prompt, e.answers, e.line) for e in examples] == [
        ("Title:", ["Paris"], 1), ("Q:", ["a", "b"], 3), ("C:", ["x"], 4), ("T:", ["z"], 5)
    ]


@pytest.mark.parametrize("row, message", [
    ({"value": "x"}, r"d.jsonl:2: no prompt field: expected one of \('text', 'prompt', 'context'\), found \['value'\]"),
    ({"text": "t"}, r"d.jsonl:2: no answer field: expected one of \('value', 'answer', 'answers'\)"),
    ({"text": "t", "value": 3}, r'd.jsonl:2: field "value" must be a string or a list of strings'),
    ({"text": "t", "value": " "}, r'd.jsonl:2: field "value" holds no non-empty answer'),
    ({"text": "", "value": "v"}, r'd.jsonl:2: field "text" must be a non-empty string'),
    ("{not json", r"d.jsonl:2: not valid JSON"),
])
def test_schema_errors_name_the_line_and_field(tmp_path, row, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok", "value": "ok"}, row])
    with pytest.raises(ValueError, match=message):
        load_examples(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_examples(tmp_path / "none.jsonl")
    with pytest.raises(ValueError, match="holds no examples"):
        load_examples(write_jsonl(tmp_path / "e.jsonl", [""]))


def test_contains_and_wilson():
    assert contains(" the city of PARIS, France", ["Paris"])
    assert contains("rome", ["Paris", "Rome"]) and not contains("Pari", ["Paris"])
    lo, hi = wilson_interval(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0
    lo, hi = wilson_interval(950, 1000)
    assert lo < 0.95 < hi and hi - lo < 0.03


def test_accuracy_by_length_bins():
    records = [{"prompt_tokens": n, "correct": n < 50} for n in range(100)]
    bins = accuracy_by_length(records, bins=4)
    assert [b["examples"] for b in bins] == [25] * 4
    assert [b["accuracy"] for b in bins] == [1.0, 1.0, 0.0, 0.0]
    assert bins[0]["min_tokens"] == 0 and bins[-1]["max_tokens"] == 99
    ties = accuracy_by_length([{"prompt_tokens": n // 3, "correct": True} for n in range(12)], bins=8)
    assert [(b["min_tokens"], b["examples"]) for b in ties] == [(0, 3), (1, 3), (2, 3), (3, 3)]


def test_stop_on_strings_is_per_sequence(tokenizer):
    stop = StopOnStrings(tokenizer, ["\n"], prompt_len=2)
    rows = [tokenizer("ab cd")["input_ids"][:2] + tokenizer(s)["input_ids"] for s in ("x\ny", "xyz")]
    n = min(len(r) for r in rows)
    assert stop(torch.tensor([r[:n] for r in rows]), None).tolist() == [True, False]


class Scripted(BasedForCausalLM):
    """Answers every prompt with `script`, token by token, through generate (one forward a token)."""

    def generate(self, *args, **kwargs):
        self.calls = 0
        return super().generate(*args, **kwargs)

    def forward(self, input_ids, **kwargs):
        logits = torch.full((*input_ids.shape, self.config.vocab_size), -1e4)
        logits[:, -1, self.script[min(self.calls, len(self.script) - 1)]] = 0
        self.calls += 1
        return CausalLMOutput(logits=logits)


def scripted(tokenizer, text):
    model = Scripted(BasedConfig.from_preset("debug", vocab_size=len(tokenizer))).eval()
    model.script = tokenizer(text)["input_ids"]
    return model


def test_generation_stops_at_the_newline_and_scores_contains(tokenizer):
    prompts = ["Phone:", "The capital of France is"]
    model = scripted(tokenizer, " 555-0100\nName: Bob")
    examples = [RecallExample(p, [a], i) for i, (p, a) in enumerate(zip(prompts, ["555-0100", "Bob"]), 1)]
    report, records = evaluate_recall(model, tokenizer, examples, "swde", batch_size=2, progress=False)
    assert [r["generation"] for r in records] == [" 555-0100"] * 2  # "Bob" comes after the newline
    assert [r["correct"] for r in records] == [True, False]
    assert report["accuracy"] == 0.5 and report["ci95"] == pytest.approx(list(wilson_interval(1, 2)))


def test_generation_budget_is_max_new_tokens(tokenizer):
    model = scripted(tokenizer, "a b c d e f g h i j k l m n o p")
    [(text, n)] = generate_until(model, tokenizer, ["Q:"], max_new_tokens=5, progress=False)
    assert len(tokenizer(text)["input_ids"]) == 5 and n == len(tokenizer("Q:")["input_ids"])


def test_left_padded_batches_generate_what_single_prompts_do(tokenizer):
    torch.manual_seed(1)
    model = BasedForCausalLM(BasedConfig.from_preset("debug", vocab_size=len(tokenizer))).eval()
    prompts = ["The capital of France is", "Name:", "<html><body><b>Title</b>:", "Phone: 555"]
    batched = generate_until(model, tokenizer, prompts, max_new_tokens=6, batch_size=4, progress=False)
    single = [generate_until(model, tokenizer, [p], max_new_tokens=6, progress=False)[0] for p in prompts]
    assert batched == single
    assert all("\n" not in text for text, _ in batched)


def test_models_without_generate_are_refused(tokenizer):
    class NoGenerate(torch.nn.Module):
        pass

    with pytest.raises(TypeError, match="has no generate"):
        generate_until(NoGenerate(), tokenizer, ["x"])


def test_cli_recall_report_predictions_and_plot(checkpoint, tmp_path, capsys):
    rows = [{"text": f"Name: Alice. Phone: 555-01{i:02d}.\n" * (1 + i % 3) + "Phone:", "value": f"555-01{i:02d}"}
            for i in range(6)]
    data = write_jsonl(tmp_path / "swde.jsonl", rows)
    out = tmp_path / "out"
    assert main(["eval", "--checkpoint", str(checkpoint), "--task", "swde", "--data", str(data), "--out", str(out),
                 "--batch-size", "4", "--max-new-tokens", "8", "--plot", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["task"] == "swde" and report["examples"] == 6 and 0 <= report["accuracy"] <= 1
    lo, hi = report["ci95"]
    assert lo <= report["accuracy"] <= hi
    predictions = [json.loads(line) for line in open(report["predictions"])]
    assert [p["line"] for p in predictions] == [1, 2, 3, 4, 5, 6]
    assert all(p["correct"] == contains(p["generation"], p["answers"]) for p in predictions)
    assert sum(b["examples"] for b in report["by_length"]) == 6
    assert open(report["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_recall_errors(checkpoint, tmp_path):
    bad = write_jsonl(tmp_path / "fda.jsonl", [{"text": "a", "value": "b"}, {"question": "q", "value": "v"}])
    with pytest.raises(SystemExit, match=r"fda.jsonl:2: no prompt field"):
        main(["eval", "--checkpoint", str(checkpoint), "--task", "fda", "--data", str(bad)])
    with pytest.raises(SystemExit, match="--plot draws recall accuracy"):
        main(["eval", "--checkpoint", str(checkpoint), "--task", "perplexity", "--data", str(bad), "--plot"])


def test_cli_max_new_tokens_has_serve_s_upper_bound(checkpoint, tmp_path):
    # --max-new-tokens 10**12 was accepted and generated without end (no answer reached its newline).
    data = write_jsonl(tmp_path / "swde.jsonl", [{"text": "The year is 1990. The year is", "value": "1990"}])
    with pytest.raises(SystemExit, match=r"^based eval: --max-new-tokens must be at most 2147483647 \(2\*\*31 - 1, as "
                                         r"based serve's max_tokens\), got 1000000000000: lower --max-new-tokens"):
        main(["eval", "--checkpoint", str(checkpoint), "--task", "swde", "--data", str(data),
              "--out", str(tmp_path / "o"), "--max-new-tokens", str(10**12)])
    assert not (tmp_path / "o").exists()


def test_cli_bad_out_and_non_utf8_data_are_one_line(checkpoint, tmp_path):
    # Before: --out an existing file was FileExistsError's traceback after the whole evaluation, and a
    # non-UTF-8 data file "'utf-8' codec can't decode byte 0xff ..." without the file's name.
    data = write_jsonl(tmp_path / "swde.jsonl", [{"text": "The year is 1990. The year is", "value": "1990"}])
    (tmp_path / "file").write_text("x")
    bad_outs = ((tmp_path / "file", "is an existing file"), (tmp_path / "file" / "sub", "is under .*file, a file"))
    for out, where in bad_outs:
        with pytest.raises(SystemExit, match=rf"^based eval: --out .*{where}, not a folder: choose another --out$"):
            main(["eval", "--checkpoint", str(checkpoint), "--task", "swde", "--data", str(data), "--out", str(out)])
    binary = tmp_path / "fda.jsonl"
    binary.write_bytes(b'{"text": "a", "value": "b"}\n\xff\xfe{"text"\n')
    with pytest.raises(SystemExit, match=r"^based eval: .*fda.jsonl:2: not UTF-8 text"):
        main(["eval", "--checkpoint", str(checkpoint), "--task", "fda", "--data", str(binary),
              "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
