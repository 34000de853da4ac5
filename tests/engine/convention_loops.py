"""Each tool's own perplexity loop, transcribed with transformers: the references the
conventions are checked against.

Written from the tools' code, not from `fastpath.metrics.conventions`: the Hugging Face guide's loop
(labels with -100 and `outputs.loss`), lm-evaluation-harness's rolling windows
(`get_rolling_token_windows` + `make_disjoint_window`, scored as its HF backend scores a
(context, continuation) pair) and llama-perplexity's chunk loop (BOS first, second half
scored, log-softmax with a float max and a double sum of float exps). Each returns the
perplexity as the tool computes it, and the stream position and log-prob of every scored
token, in scoring order. With `model=None` only the positions are computed.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def hf_guide(model, input_ids: list[int], max_length: int, stride: int):
    """The guide's loop, literally (float32 NLL accumulation included)."""
    encodings = torch.tensor([input_ids])
    seq_len = encodings.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    positions, values = [], []
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        window = encodings[:, begin_loc:end_loc]
        target_ids = window.clone()
        target_ids[:, :-trg_len] = -100
        # The tokens the loss averages: shifted labels that are not -100.
        labels = target_ids[0, 1:]
        rows = torch.nonzero(labels != -100)[:, 0]
        positions.extend((begin_loc + 1 + rows).tolist())
        if model is not None:
            with torch.no_grad():
                outputs = model(window, labels=target_ids)
                neg_log_likelihood = outputs.loss
            num_valid_tokens = (target_ids != -100).sum().item()
            num_loss_tokens = num_valid_tokens - target_ids.size(0)
            nll_sum += neg_log_likelihood * num_loss_tokens
            n_tokens += num_loss_tokens
            logprobs = outputs.logits[0, :-1].float().log_softmax(-1)
            values.extend(logprobs[rows, labels[rows]].tolist())
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    ppl = float(torch.exp(nll_sum / n_tokens)) if model is not None else math.nan
    return ppl, np.asarray(positions), np.asarray(values)


def rolling_token_windows(token_list, prefix_token, max_seq_len, context_len):
    """lm-eval's generator: (input tokens, tokens to predict) pairs."""
    assert 1 <= context_len <= max_seq_len
    if not token_list:
        return
    pred_len = max_seq_len - context_len + 1
    predicted = 0
    first_seq_len = min(max_seq_len, len(token_list))
    yield [prefix_token] + token_list[: first_seq_len - 1], token_list[:first_seq_len]
    predicted += first_seq_len
    while predicted < len(token_list):
        window_pred_len = min(len(token_list) - predicted, pred_len)
        window_end = predicted + window_pred_len
        yield (token_list[window_end - max_seq_len - 1 : window_end - 1],
               token_list[window_end - window_pred_len : window_end])
        predicted += window_pred_len


def disjoint_window(pair):
    """lm-eval's make_disjoint_window: the context stops where the continuation starts."""
    a, b = pair
    return a[: len(a) - (len(b) - 1)], b


def lm_eval_rolling(model, token_list: list[int], prefix_token: int, max_length: int):
    """loglikelihood_rolling of one document on lm-eval's HF backend (max_seq_len = its
    max_length): (sum of log-likelihoods, positions in [prefix] + tokens, log-probs)."""
    total, positions, values, predicted = 0.0, [], [], 0
    for context, continuation in map(disjoint_window, rolling_token_windows(
            token_list, prefix_token, max_length, 1)):
        assert continuation == token_list[predicted : predicted + len(continuation)]
        positions.extend(range(predicted + 1, predicted + 1 + len(continuation)))
        predicted += len(continuation)
        if model is None:
            continue
        inp = (context + continuation)[-(max_length + 1):][:-1]
        with torch.no_grad():
            logits = model(torch.tensor([inp])).logits[0].float()
        rows = logits.log_softmax(-1)[len(inp) - len(continuation):]
        scores = rows.gather(-1, torch.tensor(continuation)[:, None])[:, 0]
        total += float(scores.double().sum())
        values.extend(scores.tolist())
    return total, np.asarray(positions), np.asarray(values)


def llama_cpp_perplexity(model, tokens: list[int], n_ctx: int, bos: int | None):
    """llama-perplexity's loop (no --ppl-stride): (PPL, positions, log-probs)."""
    assert len(tokens) >= 2 * n_ctx
    n_chunk = len(tokens) // n_ctx
    first = n_ctx // 2
    nll, count, positions, values = 0.0, 0, [], []
    for i in range(n_chunk):
        start = i * n_ctx
        batch = list(tokens[start : start + n_ctx])
        if bos is not None:
            batch[0] = bos
        positions.extend(range(start + first + 1, start + n_ctx))
        if model is None:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([batch])).logits[0].float().numpy()
        for j in range(first, n_ctx - 1):
            row = logits[j]
            max_logit = row.max()
            sum_exp = float(np.exp(row - max_logit).astype(np.float64).sum())
            token = tokens[start + j + 1]
            logprob = float(row[token]) - float(max_logit) - math.log(sum_exp)
            nll += -logprob
            count += 1
            values.append(logprob)
    ppl = math.exp(nll / count) if count else math.nan
    return ppl, np.asarray(positions), np.asarray(values)
