"""Scored requests: the log-likelihood of a continuation after a prompt, as evaluation harnesses ask for it.

A request with a continuation (text or token ids) is scored, not generated: one prefill over prompt +
continuation through the base model with the request's adapter, logits only at the positions that predict
the continuation (engine/logprobs.py), then the sequence finishes, with no decode step and no KV kept.
Scored and generating sequences share prefill batches. Scored sequences of one adapter and prompt share the
prompt's KV pages (engine/prefix_cache.py) unless EngineConfig.prefix_sharing is off.

Its result row: output_text / output_token_ids are the continuation (the text as the row gave it),
output_tokens its length, finish_reason "scored", continuation_logprob the summed log-probs (float64),
continuation_tokens, is_greedy, and with `logprobs: N` each token's log-prob and its N most likely alternatives.
"""
from engine.prefix_cache import prefix_keys
from engine.request import Request, RequestOutput
from engine.sequence import Sequence
from engine.tokenizer import Tokenizer


def encode_request(tokenizer: Tokenizer, request: Request) -> tuple[list[int], list[int]]:
    """(prompt ids, continuation ids; empty when generating). Ids given on the request are used as they are;
    a continuation text after prompt text is split as the harness does (Tokenizer.encode_pair), after prompt
    ids it is encoded alone, without special tokens. A scored request's empty prompt is the prefix token."""
    if request.continuation_token_ids is None and request.prompt_token_ids is None and request.is_scored:
        return tokenizer.encode_pair(request.prompt or "", request.continuation)
    if request.prompt_token_ids is not None:
        prompt = list(request.prompt_token_ids)
    elif request.prompt or not request.is_scored:
        prompt = tokenizer.encode(request.prompt)
    else:
        prompt = [tokenizer.prefix_token_id]
    if request.continuation_token_ids is not None:
        return prompt, list(request.continuation_token_ids)
    if request.continuation is not None:
        return prompt, tokenizer.encode(request.continuation, add_special_tokens=False)
    return prompt, []


def scoring_problem(prompt: list[int], continuation: list[int], vocab_size: int, max_model_len: int) -> str | None:
    """Why a scored request cannot run, or None."""
    if not continuation:
        return "the continuation encodes to no tokens: give a non-empty continuation (or continuation_token_ids)"
    if any(not 0 <= t < vocab_size for t in continuation):
        return f"continuation_token_ids outside the vocabulary [0, {vocab_size})"
    if len(prompt) + len(continuation) > max_model_len:
        return (f"prompt + continuation have {len(prompt) + len(continuation)} tokens; the context allows "
                f"{max_model_len}: shorten the prompt")
    return None


def scored_sequence(request: Request, prompt: list[int], continuation: list[int],
                    share_block_size: int | None) -> Sequence:
    """share_block_size: the KV page size when prompt pages may be shared with its siblings, else None."""
    seq = Sequence(request, prompt, 0, 0, continuation)
    if share_block_size:
        seq.prefix_keys = prefix_keys(request.adapter_id, prompt, share_block_size)
    return seq


def logprob_fields(seq: Sequence, tokenizer: Tokenizer) -> dict:
    """token_logprobs and top_logprobs of a result row (None unless the request asked for logprobs)."""
    if seq.request.logprobs is None:
        return {"token_logprobs": None, "top_logprobs": None}
    record = seq.logprobs
    text = {token_id: tokenizer.token_text(token_id) for top in record.top for token_id, _ in top}
    return {"token_logprobs": list(record.values),
            "top_logprobs": [[{"token_id": t, "token": text[t], "logprob": lp} for t, lp in top] for top in record.top]}


def scored_output(seq: Sequence, tokenizer: Tokenizer, adapter_sha256: str | None) -> RequestOutput:
    continuation = seq.token_ids[seq.num_prompt_tokens:]
    text = seq.request.continuation if seq.request.continuation is not None else tokenizer.decode(continuation)
    return RequestOutput(seq.request_id, seq.adapter_id, text, continuation, seq.num_prompt_tokens, len(continuation),
                         "scored", None, adapter_sha256, continuation_logprob=seq.logprobs.total,
                         continuation_tokens=len(continuation), is_greedy=seq.logprobs.is_greedy,
                         **logprob_fields(seq, tokenizer))
