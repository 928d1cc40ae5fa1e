"""One run: request table -> plan -> engine -> committed result shards + run records.

The CLI and Dagster both call `run_requests` / `plan_run`; nothing else holds pipeline logic.
"""
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from engine.adapter_memory import config_pages
from engine.config import EngineConfig
from engine.engine import Engine
from engine.loader import load_model_args
from engine.model import ModelArgs
from engine.model_runner import pool_geometry
from engine.request import Request, RequestOutput
from engine.scoring import encode_request
from engine.tokenizer import Tokenizer
from pipeline.formats.chat import ChatError, ChatPrompts
from pipeline.plan import AdapterShard, Plan, PlanBudget, PlanItem, plan_waves
from pipeline.preflight import adapter_root_problem, output_as_found
from pipeline.progress import Failures, GenerationProgress, per_second
from pipeline.requests import ParsedRequests, duplicates_summary, parse_requests, read_request_table
from pipeline.results import ResultStore, ShardWriter, output_lock, write_run_record
from pipeline.retry import read_committed, supersede
from pipeline.signals import StopSignals

LOG = logging.getLogger("lorafleet")
# RunSummary fields taken as they are from the engine's stats
ENGINE_FIELDS = ("prompt_tokens", "output_tokens", "adapter_loads", "adapter_bytes_loaded", "adapter_bytes_read",
                 "adapter_read_s", "adapter_load_wait_s", "peak_pool_pages_used", "pool_pages", "preemptions",
                 "mean_adapters_per_decode_step", "scored_tokens", "prefill_tokens_requested",
                 "prefill_tokens_computed")


class RunNotStarted(Exception):
    """The run could not start (model or tokenizer unreadable); nothing was written."""


@dataclass
class RunSummary:
    run_id: str
    output_url: str
    rows_ok: int = 0
    rows_failed: int = 0
    rows_skipped: int = 0          # committed by an earlier run of the same output
    rows_retried: int = 0          # error rows of an earlier run run again (retry_errors)
    duplicates: dict = field(default_factory=dict)   # repeated request_ids: requests.duplicates_summary
    prompt_tokens: int = 0
    output_tokens: int = 0
    distinct_adapters: int = 0
    adapter_loads: int = 0
    adapter_bytes_loaded: int = 0
    adapter_bytes_read: int = 0    # read from storage, checked and packed
    adapter_read_s: float = 0.0    # wall seconds with at least one adapter read under way
    adapter_load_wait_s: float = 0.0   # seconds the engine loop (so the device) waited for adapter reads
    peak_pool_pages_used: int = 0
    pool_pages: int = 0
    preemptions: int = 0
    mean_adapters_per_decode_step: float = 0.0
    scored_tokens: int = 0         # continuation tokens of scored rows
    prefill_tokens_requested: int = 0
    prefill_tokens_computed: int = 0   # fewer than requested where scored rows shared their prompt's pages
    started_at: float = 0.0        # unix time
    wall_s: float = 0.0            # setup_s (model load, tokenizing, planning) + generate_s + the last commit
    setup_s: float = 0.0
    generate_s: float = 0.0        # from the first request handed to the engine to its last row
    output_tokens_per_s: float = 0.0   # over generate_s, as the progress bar counts them (pipeline.progress)
    total_tokens_per_s: float = 0.0    # prompt + output tokens, over generate_s

    def to_dict(self) -> dict:
        return dict(asdict(self), adapter_read_gb_per_s=per_second(self.adapter_bytes_read, self.adapter_read_s) / 1e9)

    @classmethod
    def combine(cls, parts: list["RunSummary"]) -> "RunSummary":
        """One summary for the adapter shards of a night: counts add up (shards have disjoint rows and
        adapters), pool figures are per GPU (the largest), wall time spans the first start to the last end."""
        total = cls(parts[0].run_id, parts[0].output_url, duplicates=parts[0].duplicates)
        for name in ("rows_ok", "rows_failed", "rows_skipped", "rows_retried", "prompt_tokens", "output_tokens",
                     "distinct_adapters", "adapter_loads", "adapter_bytes_loaded", "adapter_bytes_read",
                     "adapter_read_s", "adapter_load_wait_s", "preemptions", "scored_tokens",
                     "prefill_tokens_requested", "prefill_tokens_computed"):
            setattr(total, name, sum(getattr(p, name) for p in parts))
        total.peak_pool_pages_used = max(p.peak_pool_pages_used for p in parts)
        total.pool_pages = max(p.pool_pages for p in parts)
        total.mean_adapters_per_decode_step = sum(p.mean_adapters_per_decode_step for p in parts) / len(parts)
        total.started_at = min(p.started_at for p in parts)
        total.wall_s = max(p.started_at + p.wall_s for p in parts) - total.started_at
        # generation spans the first shard's start of it to the last shard's end of it
        generating = min(p.started_at + p.setup_s for p in parts)
        total.setup_s = generating - total.started_at
        total.generate_s = max(p.started_at + p.setup_s + p.generate_s for p in parts) - generating
        total.set_rates()
        return total

    def set_rates(self) -> None:
        self.output_tokens_per_s = per_second(self.output_tokens, self.generate_s)
        self.total_tokens_per_s = per_second(self.prompt_tokens + self.output_tokens, self.generate_s)

    def lines(self) -> list[str]:
        """What the CLI prints at the end."""
        return [f"rows ok {self.rows_ok:,}  failed {self.rows_failed:,}  skipped (already done) {self.rows_skipped:,}"
                + (f"  retried {self.rows_retried:,}" if self.rows_retried else "")
                + (f"  duplicate ids {self.duplicates['rows']:,}" if self.duplicates.get("rows") else ""),
                f"tokens: prompt {self.prompt_tokens:,}  output {self.output_tokens:,}  in {self.generate_s:,.1f}s of "
                f"generation: {self.output_tokens_per_s:,.1f} output tokens/s, {self.total_tokens_per_s:,.1f} "
                "total tokens/s" + (f"  scored {self.scored_tokens:,}" if self.scored_tokens else ""),
                f"prefill tokens: computed {self.prefill_tokens_computed:,} of {self.prefill_tokens_requested:,} "
                "requested (the rest read from shared prompt pages)",
                f"adapters: {self.distinct_adapters:,} distinct, {self.adapter_loads:,} loads, "
                f"{self.adapter_bytes_loaded / 2**20:,.1f} MiB loaded, "
                f"{self.mean_adapters_per_decode_step:.1f} per decode step",
                f"adapter reads: {self.adapter_bytes_read / 2**20:,.1f} MiB in {self.adapter_read_s:,.2f}s "
                f"({per_second(self.adapter_bytes_read, self.adapter_read_s) / 1e9:,.2f} GB/s); the device waited "
                f"{self.adapter_load_wait_s:,.2f}s "
                f"for them",
                f"pool: peak {self.peak_pool_pages_used:,} of {self.pool_pages:,} pages; "
                f"preemptions {self.preemptions:,}",
                f"wall time {self.wall_s:,.1f}s (setup {self.setup_s:,.1f}s, generation {self.generate_s:,.1f}s)"
                f"  ->  {self.output_url}"]


def build_plan(config: EngineConfig, args: ModelArgs, geometry: tuple[int, int, int], requests: list[Request],
               prompt_lens: dict[str, int]) -> Plan:
    """Plan `requests` for a pool of geometry (block_size, page_numel, num_pages)."""
    block_size, page_numel, num_pages = geometry
    adapters = sorted({r.adapter_id for r in requests if r.adapter_id is not None})
    pages = {a: config_pages(config.adapters, a, args, page_numel, config.max_lora_rank, config.storage_options)
             for a in adapters}
    items = _plan_items(requests, prompt_lens)
    mean_tokens = sum(i.est_tokens for i in items) / max(len(items), 1)
    kv_pages = min(num_pages - 1, int(config.max_num_seqs * (mean_tokens / block_size + 1)))
    budget = PlanBudget(adapter_pages=max(num_pages - kv_pages, num_pages // 4, 1), kv_pages=max(kv_pages, 1),
                        max_active_adapters=config.max_active_adapters, block_size=block_size)
    return plan_waves(items, pages, budget)


def _plan_items(requests: list[Request], prompt_lens: dict[str, int]) -> list[PlanItem]:
    return [PlanItem(r.request_id, r.adapter_id, prompt_lens[r.request_id],
                     0 if r.is_scored else r.sampling.max_new_tokens) for r in requests]


def _shard_requests(requests: list[Request], prompt_lens: dict[str, int], shard: AdapterShard) -> list[Request]:
    """The requests of one adapter shard (all of them for a whole night)."""
    if shard.count == 1:
        return requests
    by_id = {r.request_id: r for r in requests}
    return [by_id[it.request_id] for it in shard.select(_plan_items(requests, prompt_lens))]


def _tokenize(config: EngineConfig, tokenizer: Tokenizer, parsed: ParsedRequests) -> dict[str, int]:
    """Tokenize once, here: the plan needs prompt lengths (with a scored row's continuation) and the engine then
    uses the ids as given. A chat row is rendered with its chat template first; one that cannot be moves to
    parsed.rejected."""
    chats = ChatPrompts(tokenizer, config.model, config.adapters, config.storage_options) if parsed.messages else None
    ready = []
    for r in parsed.requests:
        try:
            if r.request_id in parsed.messages:
                r.prompt_token_ids = chats.token_ids(parsed.messages[r.request_id], r.adapter_id)
            r.prompt_token_ids, continuation = encode_request(tokenizer, r)
            if r.is_scored:
                r.continuation_token_ids = continuation
            ready.append(r)
        except (ChatError, ValueError) as e:   # a template that fails; an empty prompt with nothing to stand for it
            parsed.rejected.append(RequestOutput.failed(r, str(e)))
    parsed.requests = ready
    return {r.request_id: len(r.prompt_token_ids) + len(r.continuation_token_ids or ()) for r in ready}


def _read(config: EngineConfig, requests_url: str) -> ParsedRequests:
    table = read_request_table(requests_url, config.storage_options, config.base_model_name)
    return parse_requests(table, config.default_max_new_tokens)


def plan_run(config: EngineConfig, requests_url: str,
             adapter_shards: Sequence[AdapterShard] = (AdapterShard(),)) -> list[Plan]:
    """The plan a run of each adapter shard would follow, without loading the model weights (the table is
    read and tokenized once for all of them)."""
    parsed = _read(config, requests_url)
    _check_adapter_root(config, parsed.requests)
    prompt_lens = _tokenize(config, Tokenizer(config.model, config.storage_options), parsed)
    args = load_model_args(config.model, config.storage_options)
    geometry = pool_geometry(config, args)
    return [build_plan(config, args, geometry, _shard_requests(parsed.requests, prompt_lens, shard), prompt_lens)
            for shard in adapter_shards]


def _check_adapter_root(config: EngineConfig, requests: list[Request]) -> None:
    if problem := adapter_root_problem(config, requests):
        raise RunNotStarted(problem)


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def load_engine(config: EngineConfig) -> Engine:
    try:
        return Engine(config)
    except (ValueError, OSError, KeyError) as e:
        raise RunNotStarted(f"cannot load model {config.model}: {type(e).__name__}: {e}") from e


def run_requests(config: EngineConfig, requests_url: str, output_url: str, *, run_id: str | None = None,
                 adapter_shard: AdapterShard = AdapterShard(), progress: bool = True, retry_errors: bool = False,
                 log: logging.Logger | None = None, rows_per_shard: int = 256,
                 stop: StopSignals | None = None) -> RunSummary:
    """Generate a result row for every request (of `adapter_shard`) not yet committed under output_url; with
    retry_errors, also for those whose committed rows are errors (the new rows supersede them: pipeline.retry).

    The shards of one night may run at once, each on its own GPU, into the same output: each writes its
    own result files under its own lock, and the invalid rows go with shard 0.
    Raises, before any work and leaving the output as it was: pipeline.schema.TableError (the table cannot be
    a request table), pipeline.results.OutputUnavailable (another run writes this output, or it cannot be
    written) or RunNotStarted (model unreadable, adapter root missing). Mid-run:
    pipeline.results.OutputWriteError (the output stopped taking writes) or pipeline.signals.RunInterrupted
    (`stop`, the CLI's signals, asked the loop to stop); the rows committed by then stay, and the lock is
    released."""
    log = log or LOG
    started = time.perf_counter()
    run_id = run_id or new_run_id()
    so = config.storage_options
    parsed = _read(config, requests_url)
    _check_adapter_root(config, parsed.requests)
    summary = RunSummary(run_id, output_url, duplicates=duplicates_summary(parsed.duplicates), started_at=time.time())
    if parsed.duplicates:
        d = summary.duplicates
        log.warning("duplicate request_ids: %d rows repeat the id of an earlier row (%d distinct ids; first %s): "
                    "only the first row of each id is run", d["rows"], d["ids"], ", ".join(map(repr, d["first"])))
    tag = adapter_shard.tag
    failures = Failures()
    with output_as_found(output_url, so), output_lock(output_url, so, tag):
        store = ResultStore(output_url, so)
        engine = load_engine(config)
        try:
            prompt_lens = _tokenize(config, engine.tokenizer, parsed)
            mine = _shard_requests(parsed.requests, prompt_lens, adapter_shard)
            invalid = parsed.rejected if adapter_shard.index == 0 else []
            my_ids = {r.request_id for r in mine} | {o.request_id for o in invalid if o.request_id is not None}
            committed = read_committed(store, retry_errors)
            if committed.duplicated & my_ids:   # a retry that crashed before superseding its old rows
                supersede(store, committed.duplicated & my_ids, log)
            todo = [r for r in mine if r.request_id not in committed.done]
            rejected = _not_yet_written(invalid, committed.done, committed.rows_without_id)
            retried = committed.retried & my_ids
            summary.rows_retried = len(retried)
            summary.rows_skipped = len(mine) + len(invalid) - len(todo) - len(rejected)
            log.info("run %s%s: %d requests (%d already done, %d invalid rows%s) -> %s", run_id,
                     f" (adapter shard {adapter_shard.index}/{adapter_shard.count})" if tag else "", len(todo),
                     summary.rows_skipped, len(rejected),
                     f", {len(retried)} error rows retried" if retry_errors else "", output_url)
            pool = engine.runner.pool
            plan = build_plan(config, engine.runner.args, (pool.block_size, pool.page_numel, pool.num_pages), todo,
                              prompt_lens)
            write_run_record(output_url, run_id, "plan.json", plan.to_json(), so, tag)
            by_id = {r.request_id: r for r in todo}
            ordered = [by_id[rid] for rid in plan.request_order()]
            summary.distinct_adapters = len({r.adapter_id for r in todo if r.adapter_id})
            with ShardWriter(store, run_id, config.model, parsed.pass_through, rows_per_shard=rows_per_shard,
                             tag=tag) as writer:
                for output in rejected:
                    writer.add(output)
                    failures.add(output)
                stop = stop or StopSignals()
                with stop.between_steps():   # a stop signal ends the loop at a step boundary: RunInterrupted
                    shown = _generate(engine, ordered, writer, summary, progress, log, failures, stop.requested)
        finally:
            engine.close()
        if retried:   # the new rows are committed: now drop the old ones
            supersede(store, retried, log)
        failures.warn(log)
        summary.rows_failed += len(rejected)
        stats = engine.stats
        for name in ENGINE_FIELDS:
            setattr(summary, name, getattr(stats, name))
        summary.setup_s, summary.generate_s = shown.started - started, shown.elapsed
        summary.wall_s = time.perf_counter() - started
        summary.set_rates()
        write_run_record(output_url, run_id, "summary.json", json.dumps(summary.to_dict(), indent=1), so, tag)
    return summary


def _not_yet_written(rejected: list[RequestOutput], done: set[str], done_without_id: int) -> list[RequestOutput]:
    """The error rows of invalid requests still to write. Rows without a request_id cannot be matched one
    by one; they are parsed (and written) in table order, so the first `done_without_id` of them are done."""
    without_id = [o for o in rejected if o.request_id is None]
    return [o for o in rejected if o.request_id is not None and o.request_id not in done] + \
        without_id[done_without_id:]


def _generate(engine: Engine, requests: list[Request], writer: ShardWriter, summary: RunSummary, progress: bool,
              log: logging.Logger, failures: Failures, should_stop: Callable[[], bool]) -> GenerationProgress:
    with GenerationProgress(len(requests), log, show_bar=progress) as shown:
        for output in engine.generate(requests, should_stop=should_stop):
            writer.add(output)
            if output.finish_reason == "error":
                summary.rows_failed += 1
                failures.add(output)
            else:
                summary.rows_ok += 1
            shown.update(engine.stats.output_tokens, engine.runner.adapters.loads)
    return shown
