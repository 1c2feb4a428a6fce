"""lm-evaluation-harness's `local-completions` model (a client no one here wrote) runs a generate-until task
from local files against the server: no tokenizer (tokenizer_backend=None sends text), nothing downloaded."""
from __future__ import annotations

import json

import pytest
import requests

from .conftest import greedy_text

TASK = """task: based_serve_until
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
"""


def test_lm_eval_local_completions_generate_until(server, model, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    questions = ["2 + 2 =", "The capital of France is", "abc", "def main():"]
    # One answer is the model's own greedy text up to the first newline, so exact_match must be >= 1/4.
    first = greedy_text(model, questions[0], 6).split("\n")[0]
    rows = [{"question": q, "answer": first if i == 0 else "-"} for i, q in enumerate(questions)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "task.yaml").write_text(TASK.format(data=data))
    before = server.metrics()["based_generation_tokens_total"]
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"base_url={server.url}/v1/completions,model=tiny,tokenizer_backend=None,"
                   "tokenized_requests=False,num_concurrent=2,max_retries=1",
        tasks=["based_serve_until"], task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    samples = results["samples"]["based_serve_until"]
    assert len(samples) == 4
    got = {s["doc"]["question"]: s["resps"][0][0] for s in samples}
    for q in questions:
        assert got[q] == greedy_text(model, q, 6).split("\n")[0]
    assert results["results"]["based_serve_until"]["exact_match,none"] >= 0.25
    assert server.metrics()["based_generation_tokens_total"] > before
    assert requests.get(server.url + "/health").json()["status"] == "ok"
