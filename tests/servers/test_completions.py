"""`/v1/completions` on the fast path, against vLLM's own server with fastpath off.

Two real servers with the same engine flags: `fastpath serve` and `FASTPATH_DISABLE=1
fastpath serve` (vLLM unchanged: the standard path, `prompt_logprobs`). An echo + logprobs
request (lm-eval's `local-completions`) must get the same JSON from both: same fields,
token strings and offsets, every float the same float32 bits; and the fastpath server must
have answered it on the fast path (its own count, `GET /fastpath/exactness`). Requests are
sent one at a time, so each server computes each prompt alone (the same schedule). Then
lm-eval's `local-completions` against each server, and `fastpath-vllm` offline with the
same engine flags, give the same per-request log-likelihoods and is_greedy.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import httpx
import pytest

from fastpath import zoo
from fastpath.server.serve import EXACTNESS_ROUTE
from tests.helpers import Server, answers, assert_same_float64, lm_eval_cli

pytestmark = [pytest.mark.engine, pytest.mark.correctness]

ROOT = Path(__file__).resolve().parents[2]
MODEL = "trained-llama"  # trained on the bundled text: lm-eval's is_greedy takes both values
MAX_MODEL_LEN = 256
KV_BYTES = 128 << 20
SERVE_FLAGS = ["--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
               "--kv-cache-memory-bytes", str(KV_BYTES)]
TEXT = "The quick brown fox jumps over the lazy dog. It was the best of times, it was"


def _token_ids() -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(zoo.get_model(MODEL)))(TEXT)["input_ids"]


IDS = _token_ids()
PROMPTS = {
    "text": TEXT,
    "ids": IDS,
    "texts": [TEXT, "Hello", "It was"],
    "id-lists": [IDS, IDS[:1], IDS[:5]],  # a one-token prompt has no scored row
}
LM_EVAL_TASKS = ["fastpath_lambada", "fastpath_mc"]  # log-likelihood tasks, greedy or not
TASKS_DIR = "tests/data/lm_eval_tasks"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """(fastpath serve, vLLM with fastpath off), started together."""
    logs = tmp_path_factory.mktemp("completions")
    model = str(zoo.get_model(MODEL))
    fast = Server(model, SERVE_FLAGS, logs / "fast.log")
    reference = Server(model, SERVE_FLAGS, logs / "reference.log",
                       env={"FASTPATH_DISABLE": "1"})
    try:
        fast.wait_ready()
        reference.wait_ready()
        yield fast, reference
    finally:
        fast.stop()
        reference.stop()


def completions(url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": served_model(url), **body},
                      timeout=300)


_names: dict[str, str] = {}


def served_model(url: str) -> str:
    """The served model's name (its path)."""
    if url not in _names:
        _names[url] = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    return _names[url]


def fast_path_count(url: str) -> dict[str, int]:
    return httpx.get(f"{url}{EXACTNESS_ROUTE}", timeout=60).json()["completions_fast_path"]


def assert_json_bitwise_equal(got: Any, want: Any, path: str = "$") -> None:
    """Same structure, key order, strings and ints; every float the same float32 bits."""
    if isinstance(got, float) or isinstance(want, float):
        assert isinstance(got, (int, float)) and isinstance(want, (int, float)), (path, got, want)
        assert struct.pack("<f", got) == struct.pack("<f", want) and got == want, \
            f"{path}: {got!r} != {want!r}"
    elif isinstance(got, dict):
        assert isinstance(want, dict) and list(got) == list(want), \
            f"{path}: keys {list(got)} != {list(want)}"
        for key in got:
            assert_json_bitwise_equal(got[key], want[key], f"{path}.{key}")
    elif isinstance(got, list):
        assert isinstance(want, list) and len(got) == len(want), f"{path}: lengths differ"
        for index, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_json_bitwise_equal(a, b, f"{path}[{index}]")
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def without_ids(response: dict[str, Any]) -> dict[str, Any]:
    """The response without what differs by construction (request id, creation time)."""
    return {k: v for k, v in response.items() if k not in ("id", "created")}


@pytest.mark.parametrize("max_tokens", [0, 1])
@pytest.mark.parametrize("logprobs", [0, 1, 5])
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_echo_logprobs_json_equals_vllm_bitwise(servers, prompt, logprobs, max_tokens):
    fast, reference = servers
    body = {"prompt": PROMPTS[prompt], "echo": True, "logprobs": logprobs,
            "max_tokens": max_tokens, "temperature": 0.0}
    before = fast_path_count(fast.url)["echo"]
    got = completions(fast.url, body)
    want = completions(reference.url, body)
    assert got.status_code == want.status_code == 200, (got.text[:500], want.text[:500])
    got, want = got.json(), want.json()
    assert_json_bitwise_equal(without_ids(got), without_ids(want))
    prompt_lengths = [len(c["logprobs"]["tokens"]) - max_tokens for c in got["choices"]]
    assert fast_path_count(fast.url)["echo"] - before == sum(n > 1 for n in prompt_lengths)
    choice = got["choices"][0]
    assert choice["logprobs"]["token_logprobs"][0] is None  # the first token has none
    tops = [t for t in choice["logprobs"]["top_logprobs"][1:] if t is not None]
    assert tops and all(1 <= len(t) <= logprobs + 1 for t in tops)  # N, plus the token


def test_other_completions_requests_go_to_vllm_unchanged(servers):
    """Not echo + logprobs + max_tokens 0/1: vLLM answers as it would without fastpath."""
    fast, reference = servers
    before = fast_path_count(fast.url)
    for body in ({"prompt": TEXT, "max_tokens": 3, "logprobs": 2, "temperature": 0.0},
                 {"prompt": TEXT, "echo": True, "logprobs": 1, "max_tokens": 2,
                  "temperature": 0.0},
                 {"prompt": TEXT, "echo": True, "logprobs": 1, "max_tokens": 1,
                  "prompt_logprobs": 2, "temperature": 0.0}):
        got, want = completions(fast.url, body), completions(reference.url, body)
        assert got.status_code == want.status_code == 200, got.text[:500]
        assert_json_bitwise_equal(without_ids(got.json()), without_ids(want.json()))
    assert fast_path_count(fast.url) == before


def test_target_token_ids_answered_as_float32_array(servers):
    """`target_token_ids` (and `target_start`) on a completions request: the choice's
    `target_logprobs`, the standard path's values for those tokens bit for bit."""
    fast, reference = servers
    standard = completions(reference.url, {"prompt": IDS, "echo": True, "logprobs": 0,
                                           "max_tokens": 0}).json()
    expected = standard["choices"][0]["logprobs"]["token_logprobs"][1:]
    before = fast_path_count(fast.url)["targets"]
    whole = completions(fast.url, {"prompt": IDS, "max_tokens": 1, "temperature": 0.0,
                                   "target_token_ids": IDS[1:]})
    assert whole.status_code == 200, whole.text[:500]
    assert_json_bitwise_equal(whole.json()["choices"][0]["target_logprobs"], expected)
    tail = completions(fast.url, {"prompt": IDS, "max_tokens": 1, "target_start": 5,
                                  "target_token_ids": IDS[6:]})
    assert_json_bitwise_equal(tail.json()["choices"][0]["target_logprobs"], expected[5:])
    batch = completions(fast.url, {"prompt": [IDS, IDS[:6]], "max_tokens": 1,
                                   "target_token_ids": [IDS[1:], IDS[1:6]]})
    choices = batch.json()["choices"]
    assert_json_bitwise_equal(choices[0]["target_logprobs"], expected)
    assert_json_bitwise_equal(choices[1]["target_logprobs"], expected[:5])
    assert fast_path_count(fast.url)["targets"] - before == 4


@pytest.mark.parametrize("body, field", [
    ({"prompt": IDS, "target_token_ids": IDS[2:]}, "target_token_ids"),  # one short
    ({"prompt": IDS, "target_token_ids": "abc"}, "target_token_ids"),
    ({"prompt": IDS, "target_token_ids": [1.5] * (len(IDS) - 1)}, "target_token_ids"),
    ({"prompt": IDS, "target_token_ids": [10 ** 9] * (len(IDS) - 1)}, "target_token_ids"),
    ({"prompt": IDS, "target_start": 2}, "target_start"),
    ({"prompt": IDS, "target_token_ids": IDS[3:], "target_start": -1}, "target_start"),
    ({"prompt": [IDS, IDS], "target_token_ids": IDS[1:]}, "target_token_ids"),
    ({"prompt": [IDS, IDS], "target_token_ids": [IDS[1:]]}, "target_token_ids"),
    ({"prompt": IDS, "target_token_ids": IDS[1:], "echo": True, "logprobs": 1},
     "target_token_ids"),
    ({"prompt": IDS, "target_token_ids": IDS[1:], "stream": True}, "target_token_ids"),
], ids=["short", "string", "floats", "out-of-vocabulary", "start-alone", "negative-start",
        "batch-flat", "batch-one-list", "with-echo", "streamed"])
def test_bad_target_fields_refused_with_400_naming_the_field(servers, body, field):
    fast, _ = servers
    reply = completions(fast.url, {"max_tokens": 1, **body})
    assert reply.status_code == 400, reply.text[:500]
    error = reply.json()["error"]
    assert error["param"] == field, error
    assert field in error["message"], error
    after = completions(fast.url, {"prompt": IDS, "echo": True, "logprobs": 1, "max_tokens": 0})
    assert after.status_code == 200  # the server keeps serving


def run_lm_eval(model: str, model_args: str, tasks: list[str], out: Path
                ) -> dict[str, list[dict]]:
    """`fastpath lm-eval` on log-likelihood tasks: the samples it saved, by task."""
    return lm_eval_cli(model, model_args, tasks, TASKS_DIR, out, timeout=1800)["samples"]


# CI: lambada (is_greedy takes both values) on the two servers; the nightly and
# `-m correctness` add the multiple-choice task and fastpath-vllm offline.
@pytest.mark.parametrize("tasks, offline", [
    (["fastpath_lambada"], False),
    pytest.param(["fastpath_lambada", "fastpath_mc"], True, marks=pytest.mark.slow),
], ids=["servers", "servers-and-offline"])
def test_lm_eval_local_completions_identical(servers, tmp_path, tasks, offline):
    """lm-eval's `local-completions` against fastpath serve and against vLLM's server (and
    `fastpath-vllm` offline, same engine flags): every request's log-likelihood has the
    same float64 bits and is_greedy is identical; the fastpath server answered every
    request on the fast path."""
    fast, reference = servers
    model = str(zoo.get_model(MODEL))
    api_args = (f"model={served_model(fast.url)},tokenizer={model},"
                f"tokenizer_backend=huggingface,max_length={MAX_MODEL_LEN},num_concurrent=1,"
                "max_retries=1")
    before = fast_path_count(fast.url)["echo"]
    on_fast = run_lm_eval("local-completions", f"base_url={fast.url}/v1/completions,{api_args}",
                          tasks, tmp_path / "fast")
    served = fast_path_count(fast.url)["echo"] - before
    others = {"vLLM server": run_lm_eval(
        "local-completions", f"base_url={reference.url}/v1/completions,{api_args}", tasks,
        tmp_path / "vllm")}
    if offline:
        offline_args = (f"pretrained={model},dtype=float32,kv_cache_memory_bytes={KV_BYTES},"
                        f"max_model_len={MAX_MODEL_LEN},enforce_eager=True,seed=0,"
                        "max_num_seqs=1,enable_chunked_prefill=False")
        others["fastpath-vllm offline"] = run_lm_eval("fastpath-vllm", offline_args, tasks,
                                                      tmp_path / "offline")
    requests = 0
    for task in tasks:
        fast_ll, fast_greedy = answers(on_fast[task])
        for name, other in others.items():
            other_ll, other_greedy = answers(other[task])
            assert_same_float64(fast_ll, other_ll, f"{task}: fastpath serve against {name}")
            assert fast_greedy == other_greedy, (task, name)
        if task == "fastpath_lambada":
            assert 0 < sum(fast_greedy) < len(fast_greedy), "is_greedy is constant: no test"
        requests += fast_ll.size
    assert served == requests  # every lm-eval request took the fast path
