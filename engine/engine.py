"""The engine loop: admit requests, then schedule -> run -> postprocess until every request is done."""
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import compress
from dataclasses import dataclass

import numpy as np
import torch

from engine.adapter_memory import pack_adapter
from engine.adapters import AdapterStore
from engine.config import EngineConfig
from engine.logprobs import GeneratedLogprobs
from engine.model import Transformer
from engine.model_runner import ModelRunner, StepTokens
from engine.prefix_cache import siblings_together
from engine.request import Request, RequestOutput
from engine.sampling import NONFINITE
from engine.scheduler import Scheduler
from engine.scoring import encode_request, logprob_fields, scored_output, scored_sequence, scoring_problem
from engine.sequence import Sequence
from engine.stats import EngineStats
from engine.tokenizer import Tokenizer

log = logging.getLogger("lorafleet.engine")


@dataclass
class LaunchedStep:
    """A step queued on the device whose tokens the host has not read yet."""
    seqs: list[Sequence]                    # its batch
    rows: np.ndarray                        # their RunningBatch rows
    epochs: np.ndarray                      # the rows' epochs at launch (RunningBatch.epoch)
    counts: np.ndarray                      # their token counts with the launched token
    tokens: StepTokens
    logprobs: GeneratedLogprobs | None      # of the rows that ask


def default_seed(request_id: str) -> int:
    """Unseeded sampling still repeats on a rerun (resume must reproduce outputs)."""
    return int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "little")


def nonfinite_error(seq: Sequence) -> str:
    """The error of a row whose logits came out NaN or Inf (only that row fails)."""
    culprit = f"adapter {seq.adapter_id!r}" if seq.adapter_id else "the base model"
    where = "scoring its continuation" if seq.is_scored else f"at output token {seq.num_output_tokens + 1}"
    return (f"non-finite logits (NaN or Inf) {where}: {culprit} computes NaN/Inf on this prompt (weights that "
            f"hold NaN/Inf or overflow the dtype); check {culprit}'s weights")


class Engine:
    def __init__(self, config: EngineConfig, model: Transformer | None = None):
        self.config = config
        self.tokenizer = Tokenizer(config.model, config.storage_options)
        self.runner = ModelRunner(config, model)
        args = self.runner.args
        self.max_model_len = self.runner.max_model_len
        pool, max_rank = self.runner.pool, config.max_lora_rank
        pin = config.device.startswith("cuda")   # pinned host buffers: copies to the GPU run asynchronously
        self.adapter_store = AdapterStore(
            config.adapters, args, config.torch_dtype, max_rank, config.host_cache_bytes,
            lambda file: pack_adapter(file, args, pool.page_numel, max_rank, pin_memory=pin),
            config.storage_options, config.base_model_name, pin_memory=pin)
        self.scheduler = Scheduler(config, self.runner.pool, self.runner.adapters, self.adapter_store,
                                   self.runner.pool.blocks_needed(self.max_model_len))
        self.stats = EngineStats(pool_pages=self.runner.pool.num_pages)
        self.overlap = config.overlap_steps if config.overlap_steps is not None else config.device.startswith("cuda")
        self.in_flight: LaunchedStep | None = None   # launched, its tokens not read yet

    def add_request(self, request: Request) -> RequestOutput | None:
        """Queue a request; a request that can never run comes back at once as an error output."""
        seq = self._sequence(request)
        if isinstance(seq, RequestOutput):
            return seq
        self.scheduler.add(seq)
        return None

    def _sequence(self, request: Request) -> Sequence | RequestOutput:
        """The request's sequence, or its error output."""
        if request.prompt_token_ids is None and not request.prompt and not request.is_scored:
            return RequestOutput.failed(request, "empty prompt: give a non-empty prompt or prompt_token_ids")
        try:
            ids, continuation = encode_request(self.tokenizer, request)
        except ValueError as e:   # a scored row's empty prompt, and no token to stand for it
            return RequestOutput.failed(request, str(e))
        vocab = self.runner.args.vocab_size
        if not ids:
            return RequestOutput.failed(request, "the prompt encodes to no tokens")
        if any(not 0 <= t < vocab for t in ids):
            return RequestOutput.failed(request, f"prompt_token_ids outside the vocabulary [0, {vocab})", len(ids))
        if request.is_scored:
            if error := scoring_problem(ids, continuation, vocab, self.max_model_len):
                return RequestOutput.failed(request, error, len(ids))
            n_tokens = len(ids) + len(continuation)
        elif len(ids) >= self.max_model_len:
            return RequestOutput.failed(request, f"prompt has {len(ids)} tokens; the context allows "
                                                 f"{self.max_model_len} (prompt + at least one new token)", len(ids))
        else:
            max_new = min(request.sampling.max_new_tokens, self.max_model_len - len(ids))
            n_tokens = len(ids) + max_new
        pool = self.runner.pool
        if pool.blocks_needed(n_tokens) > pool.num_pages:
            return RequestOutput.failed(request, f"needs {pool.blocks_needed(n_tokens)} KV pages; the pool "
                                                 f"has {pool.num_pages} in all (raise num_pages)", len(ids))
        if request.is_scored:
            return scored_sequence(request, ids, continuation, pool.block_size if self.config.prefix_sharing else None)
        seed = request.sampling.seed if request.sampling.seed is not None else default_seed(request.request_id)
        return Sequence(request, ids, max_new, seed)

    def step(self) -> list[RequestOutput]:
        """Schedule and launch a step, then read the step before it: with overlapped steps (on CUDA) the host
        reads step N's tokens and schedules N + 1 while the device runs N + 1 (the next step's inputs are the
        device's own tokens, ModelRunner.row_tokens); otherwise each step is read as soon as it is launched."""
        sched = self.scheduler
        sched.read_ahead()
        seqs, is_prefill = sched.schedule()
        outputs = [self._output(seq, error) for seq, error in sched.failed]
        sched.failed.clear()
        launched = None
        if seqs:
            try:
                launched = self._launch(seqs, is_prefill, outputs)
            except torch.OutOfMemoryError:
                outputs += self._out_of_memory(seqs, is_prefill)
        elif not outputs and self.in_flight is None and sched.waiting and not len(sched.running):
            # Nothing runs and nothing can be admitted: the head of the queue cannot fit at all.
            seq = sched.reject_head()
            outputs.append(self._output(seq, "does not fit in the page pool" +
                                        (" next to its adapter" if seq.adapter_id else "")))
        if self.in_flight is not None:
            outputs += self._read(self.in_flight)
        self.in_flight = launched
        if launched is not None and not self.overlap:
            outputs += self._read(launched)
            self.in_flight = None
        self._collect_stats()
        return outputs

    def is_finished(self) -> bool:
        return self.scheduler.is_finished() and self.in_flight is None

    def _launch(self, seqs: list[Sequence], is_prefill: bool, outputs: list[RequestOutput]) -> "LaunchedStep":
        """Queue the step's forward pass and sampling; the scored sequences of a prefill are done with it."""
        running = self.scheduler.running
        if is_prefill:
            rows, decode_inputs = running.rows_of(seqs), None
        else:
            rows, _, tiles = running.decode_rows()
            decode_inputs = running.decode_inputs(rows, tiles)
        tokens, logits = self.runner.run(seqs, rows, decode_inputs, running.sampling(rows))
        logprobs = GeneratedLogprobs.of(logits, tokens.device, running.logprobs[rows])   # may run out of memory too
        launched = LaunchedStep(seqs, rows, running.epoch[rows], running.advance(rows), tokens, logprobs)
        self.stats.steps += 1
        if not is_prefill:
            self.stats.decode_steps += 1
            self.stats.adapters_per_decode_step += len(running.adapters)
            return launched
        self.runner.pool.prefix_cache.mark_computed()   # the pages this batch keyed now hold its K/V
        # A preempted sequence's recompute is not new prompt work: count each prompt once.
        self.stats.prompt_tokens += sum(s.num_prompt_tokens for s in seqs if not s.preemptions)
        self.stats.prefill_tokens_requested += sum(s.num_tokens for s in seqs)
        self.stats.prefill_tokens_computed += sum(s.num_tokens - s.num_cached_tokens for s in seqs)
        for seq in seqs:
            if seq.is_scored:   # its log-probs were read in the prefill: done (its sampled token is not read)
                self.stats.scored_tokens += seq.num_scored_tokens
                finite = math.isfinite(seq.logprobs.total)
                outputs.append(scored_output(seq, self.tokenizer, self._sha256(seq)) if finite else
                               self._output(seq, nonfinite_error(seq)))
                self.scheduler.finish(seq)
        return launched

    def _out_of_memory(self, seqs: list[Sequence], is_prefill: bool) -> list[RequestOutput]:
        self.runner.release_cached_memory()
        if len(seqs) > 1:
            log.warning("out of device memory on a batch of %d; retrying with smaller batches", len(seqs))
            self.scheduler.back_off(seqs, is_prefill)
            return []
        self.scheduler.finish(seqs[0])
        return [self._output(seqs[0], "out of device memory even alone: shorten the prompt or max_new_tokens, or "
                                      "run on a larger device")]

    def _read(self, step: "LaunchedStep") -> list[RequestOutput]:
        """Take a launched step's tokens: rows whose logits were NaN or Inf fail, the others get their token,
        and the sequences it finishes are output. Sequences that stopped running since the launch (finished
        by the step before, scored, preempted: a preempted one recomputes the token) are passed over: their
        row's epoch moved on."""
        tokens = step.tokens.read()
        keep = self.scheduler.running.epoch[step.rows] == step.epochs     # still the same sequence on the row
        outputs = []
        for i in np.flatnonzero(keep & (tokens == NONFINITE)).tolist():
            keep[i] = False
            self.scheduler.finish(step.seqs[i])
            outputs.append(self._output(step.seqs[i], nonfinite_error(step.seqs[i])))
        if step.logprobs is not None:
            step.logprobs.record(step.seqs, keep)
        seqs, tokens = list(compress(step.seqs, keep)), tokens[keep]
        self.scheduler.running.append_tokens(seqs, tokens)
        self.stats.output_tokens += len(seqs)
        for seq in self._finished(seqs, step.rows[keep], tokens, step.counts[keep]):
            outputs.append(self._output(seq))
            self.scheduler.finish(seq)
        return outputs

    def _finished(self, seqs: list[Sequence], rows: np.ndarray, tokens: np.ndarray,
                  counts: np.ndarray) -> list[Sequence]:
        """The sequences the newest tokens finish (EOS, a stop string, or their length: `counts` tokens with
        them), each with its finish_reason set; checked for the whole batch at once, stop strings only where
        a row has them."""
        running = self.scheduler.running
        eos = np.isin(tokens, list(self.tokenizer.eos_token_ids))
        full = counts >= running.max_tokens[rows]
        done = []
        for i in np.flatnonzero(eos | full | running.has_stop[rows]).tolist():
            seq = seqs[i]
            if eos[i]:
                seq.finish_reason = "stop"
            elif seq.sampling.stop and self._stop_string(seq):
                seq.finish_reason = "stop"
            elif full[i]:
                seq.finish_reason = "length"
            else:
                continue
            done.append(seq)
        return done

    def _stop_string(self, seq: Sequence) -> bool:
        """Whether a stop string ends in the newest token; if so the output text is cut before it."""
        if not self._tail_has_stop(seq):
            return False
        text = self.tokenizer.decode(seq.output_token_ids)
        hits = [i for i in (text.find(s) for s in seq.sampling.stop) if i >= 0]
        if hits:
            seq.output_text = text[:min(hits)]
        return bool(hits)

    def _tail_has_stop(self, seq: Sequence) -> bool:
        """Whether a stop string may end in the newest token. Only the last tokens are decoded (decoding the
        whole output every step is quadratic): a match must end in the newest token (it was not there one
        token ago), and each token gives at least a byte of text, so 4 tokens per character plus a margin
        (a decoder may treat the window's first token differently) cover it."""
        window = 4 * max(len(s) for s in seq.sampling.stop) + 4
        tail = self.tokenizer.decode(seq.token_ids[max(seq.num_prompt_tokens, seq.num_tokens - window):])
        return any(s in tail for s in seq.sampling.stop)

    def _output(self, seq: Sequence, error: str | None = None) -> RequestOutput:
        if error is not None:
            return RequestOutput.failed(seq.request, error, seq.num_prompt_tokens)
        text = seq.output_text if seq.output_text is not None else self.tokenizer.decode(seq.output_token_ids)
        return RequestOutput(seq.request_id, seq.adapter_id, text, seq.output_token_ids, seq.num_prompt_tokens,
                             seq.num_output_tokens, seq.finish_reason, None, self._sha256(seq),
                             **logprob_fields(seq, self.tokenizer))

    def _sha256(self, seq: Sequence) -> str | None:
        return self.runner.adapters.sha256(seq.adapter_id) if seq.adapter_id else None

    def generate(self, requests: Iterable[Request],
                 should_stop: Callable[[], bool] = lambda: False) -> Iterator[RequestOutput]:
        """Run requests to completion, yielding each output as soon as it finishes (in any order); return early,
        between two steps, once should_stop() says so (leaving the rest unfinished)."""
        seqs = []
        for request in requests:
            seq = self._sequence(request)
            if isinstance(seq, RequestOutput):
                yield seq
            else:
                seqs.append(seq)
        for seq in siblings_together(seqs):   # the choices of a question in one batch: they share its prompt
            self.scheduler.add(seq)
        started = time.perf_counter()
        while not self.is_finished() and not should_stop():
            yield from self.step()
        log.info("engine done in %.1fs: %s", time.perf_counter() - started, self.stats)

    def _collect_stats(self) -> None:
        adapters, pool = self.runner.adapters, self.runner.pool
        self.stats.adapter_loads, self.stats.adapter_bytes_loaded = adapters.loads, adapters.bytes_loaded
        store = self.adapter_store
        self.stats.adapter_reads, self.stats.adapter_bytes_read = store.reads, store.bytes_read
        self.stats.adapter_read_s, self.stats.adapter_load_wait_s = store.read_s, store.wait_s
        self.stats.peak_pool_pages_used = pool.peak_used
        self.stats.preemptions = self.scheduler.preemptions

    def close(self) -> None:
        self.adapter_store.close()
