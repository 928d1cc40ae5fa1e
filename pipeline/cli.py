"""`lorafleet run | plan | report | export`: the same calls Dagster makes, for people without Dagster.

Exit codes of `run`: 0 every row succeeded, 1 some rows failed (they are error rows), 2 the run could
not start (usage, unreadable table, wrong schema, output locked or not writable, model unreadable, adapter
root missing), 3 the output stopped taking writes mid-run (disk full, turned read-only), 129 / 130 / 143 stopped
by SIGHUP / SIGINT / SIGTERM. After 3 and 129-143 the rows committed so far stay: run the same command again to
finish.
"""
import argparse
import json
import logging
import sys

from engine.config import EngineConfig
from pipeline.formats.batch_export import ExportError, export_openai_batch
from pipeline.plan import AdapterShard
from pipeline.results import OutputUnavailable, OutputWriteError
from pipeline.run import RunNotStarted, plan_run, run_requests
from pipeline.schema import TableError
from pipeline.signals import RunInterrupted, StopSignals

log = logging.getLogger("lorafleet")


def _storage_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--storage-option wants key=value, got {text!r}")
    try:
        return key, json.loads(value)     # numbers, booleans and {"nested": "dicts"}
    except json.JSONDecodeError:
        return key, value


def _adapter_shard(text: str) -> AdapterShard:
    try:
        return AdapterShard.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF checkpoint directory (any fsspec URL)")
    p.add_argument("--adapters", help="adapter root: <root>/<adapter_id>/adapter_model.safetensors")
    p.add_argument("--requests", required=True, help="request Parquet file, OpenAI batch .jsonl file, or a directory "
                   "of them (any fsspec URL)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--adapter-shard", type=_adapter_shard, default=AdapterShard(), metavar="I/N",
                   help="run part I (0-based) of N parts with disjoint adapters, e.g. one per GPU: "
                        "--adapter-shard 0/4 --device cuda:0 ... 3/4 cuda:3, all into the same --output")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-active-adapters", type=int, help="distinct adapters in one batch (default 8)")
    p.add_argument("--max-resident-adapters", type=int, help="adapters kept in the device pool (default 64)")
    p.add_argument("--max-num-seqs", type=int, help="sequences in one batch (default 64)")
    p.add_argument("--max-num-batched-tokens", type=int, help="prompt tokens in one prefill (default 4096)")
    p.add_argument("--max-model-len", type=int, help="context length (default: the checkpoint's)")
    p.add_argument("--max-lora-rank", type=int, help="largest adapter rank accepted (default 64)")
    p.add_argument("--base-model-name", help="the base's name (e.g. meta-llama/Llama-2-7b-hf): adapters whose "
                   "base_model_name_or_path names another base fail their rows; in a .jsonl batch file, "
                   "body.model = this name means the base model")
    p.add_argument("--num-pages", type=int, help="page pool size (default: from free memory)")
    p.add_argument("--max-new-tokens", dest="default_max_new_tokens", type=int,
                   help="default for rows without max_new_tokens (default 128)")
    p.add_argument("--no-prefix-sharing", dest="prefix_sharing", action="store_false", default=None,
                   help="scored rows of one adapter and prompt each compute the prompt (default: they share it)")
    _storage_args(p)
    p.add_argument("-v", "--verbose", action="store_true")


def _storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-option", dest="storage_options", action="append", type=_storage_option, default=[],
                   metavar="KEY=VALUE", help="fsspec option for every URL, e.g. endpoint_url=http://127.0.0.1:9000")


class UsageError(Exception):
    """Arguments that parse but make no valid engine config."""


def _config(args: argparse.Namespace) -> EngineConfig:
    try:
        return EngineConfig.from_kwargs(**dict(vars(args), storage_options=dict(args.storage_options)))
    except ValueError as e:
        raise UsageError(str(e)) from None


def _cmd_run(args, stop: StopSignals) -> int:
    summary = run_requests(_config(args), args.requests, args.output, run_id=args.run_id,
                           adapter_shard=args.adapter_shard, progress=not args.no_progress,
                           retry_errors=args.retry_errors, rows_per_shard=args.rows_per_shard, stop=stop)
    for line in summary.lines():
        print(line)
    return 1 if summary.rows_failed else 0


def _cmd_plan(args) -> int:
    try:
        [plan] = plan_run(_config(args), args.requests, (args.adapter_shard,))
    except (ValueError, OSError) as e:
        raise RunNotStarted(f"cannot plan: {type(e).__name__}: {e}") from e
    print(plan.to_json() if args.json else plan.format_table())
    return 0


def _cmd_report(args) -> int:
    from pipeline.evaluation.report import report   # here: matplotlib would double the start-up of every run and plan
    try:
        chart = report(args.root, args.date, args.png)
    except FileNotFoundError as e:   # no metrics (or none for that date): one line, no traceback
        print(f"lorafleet: error: {e}", file=sys.stderr)
        return 2
    print(f"chart: {chart}")
    return 0


def _cmd_export(args) -> int:
    lines = export_openai_batch(args.results, args.output, dict(args.storage_options), args.model)
    print(f"wrote {lines:,} lines to {args.output}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorafleet", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="generate a result row for every request")
    _engine_args(run)
    run.add_argument("--output", required=True, help="results directory (any fsspec URL); a rerun resumes")
    run.add_argument("--run-id", help="default: a timestamp")
    run.add_argument("--no-progress", action="store_true", help="no progress bar (a log line every 10 s instead)")
    run.add_argument("--retry-errors", action="store_true",
                     help="run the output's error rows again; their new rows replace the old ones")
    run.add_argument("--rows-per-shard", type=int, default=256, help="rows per committed result shard")
    run.set_defaults(func=_cmd_run)
    plan = sub.add_parser("plan", help="print the waves a run would follow, without running it")
    _engine_args(plan)
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(func=_cmd_plan)
    rep = sub.add_parser("report", help="per-adapter metrics of a deployment root, with regressions")
    rep.add_argument("root", help="deployment root URL (holds results/ and metrics/)")
    rep.add_argument("--date", help="YYYY-MM-DD (default: the latest night)")
    rep.add_argument("--png", help="chart path (default: <root>/metrics/scores.png)")
    rep.set_defaults(func=_cmd_report)
    exp = sub.add_parser("export", help="write a results directory in another format")
    exp.add_argument("results", help="results directory (any fsspec URL)")
    exp.add_argument("--format", required=True, choices=["openai-batch"],
                     help="openai-batch: the OpenAI Batch API's output file (JSON Lines)")
    exp.add_argument("--output", required=True, help="the file to write (any fsspec URL)")
    exp.add_argument("--model", help="checkpoint whose tokenizer spells the tokens of logprobs "
                                     "(default: the rows' base_model)")
    _storage_args(exp)
    exp.set_defaults(func=_cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        with StopSignals() as stop:   # other commands stop at once; run commits its finished rows first
            return args.func(args, stop) if args.command == "run" else args.func(args)
    except (TableError, OutputUnavailable, RunNotStarted, UsageError, ExportError) as e:
        # Raised before any row ran: the run could not start. One line, no traceback.
        print(f"lorafleet: error: {e}", file=sys.stderr)
        return 2
    except OutputWriteError as e:
        print(f"lorafleet: error: {e}; the rows committed before it are kept: free the space (or make the "
              "output writable) and run the same command again", file=sys.stderr)
        return 3
    except RunInterrupted as e:
        committed = (f": the rows finished so far are committed to {args.output}; run the same command again to "
                     "finish the rest") if args.command == "run" else ""
        print(f"lorafleet: {e}{committed}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
