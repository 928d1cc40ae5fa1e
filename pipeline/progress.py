"""What a run shows while it generates: a progress bar, or with none a log line every LOG_EVERY_S, and at the
end one warning per adapter whose rows failed (with its row count), not one per row.

Throughput has one definition wherever it is shown (the bar, the log line, the run summary, Dagster's
metadata): tokens over the seconds since generation began, as output tokens/s and total (prompt + output)
tokens/s. Model loading and planning come before, and are counted in the run's wall time only."""
import logging
import time
from collections import Counter, defaultdict
from contextlib import nullcontext

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from engine.request import RequestOutput

LOG_EVERY_S = 10.0


def per_second(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


class GenerationProgress:
    """Rows done out of `total`, output tokens/s and adapter loads: on a bar (log records go through it, above
    it) or, without one, in a log line every LOG_EVERY_S."""

    def __init__(self, total: int, log: logging.Logger, show_bar: bool):
        self.total, self.log, self.done = total, log, 0
        self.bar = tqdm(total=total, unit="req", desc="generating", disable=not show_bar, dynamic_ncols=True)
        self._redirect = logging_redirect_tqdm() if show_bar else nullcontext()
        self.started = self.last_log = 0.0
        self.elapsed = 0.0                 # seconds from the start of generation to the last row so far

    def __enter__(self) -> "GenerationProgress":
        self._redirect.__enter__()
        self.started = self.last_log = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        self._redirect.__exit__(*exc)

    def update(self, output_tokens: int, adapter_loads: int) -> None:
        """One more row done; `output_tokens` and `adapter_loads` are the run's so far."""
        self.done += 1
        now = time.perf_counter()
        self.elapsed = now - self.started
        rate = per_second(output_tokens, self.elapsed)
        self.bar.set_postfix_str(f"{rate:,.0f} output tokens/s, {adapter_loads:,} adapter loads", refresh=False)
        self.bar.update(1)
        if self.bar.disable and now - self.last_log >= LOG_EVERY_S:
            self.last_log = now
            self.log.info("%s/%s requests, %s output tokens/s, %s adapter loads", f"{self.done:,}",
                          f"{self.total:,}", f"{rate:,.0f}", f"{adapter_loads:,}")


class Failures:
    """Failed rows by adapter, so that a broken adapter is one warning with its row count, not one per row."""

    def __init__(self):
        self.errors: dict[str | None, Counter] = defaultdict(Counter)

    def add(self, output: RequestOutput) -> None:
        self.errors[output.adapter_id][output.error] += 1

    def warn(self, log: logging.Logger) -> None:
        """One warning per adapter (most failed rows first) naming its most common error."""
        for adapter, errors in sorted(self.errors.items(), key=lambda kv: (-kv[1].total(), str(kv[0]))):
            rows = errors.total()
            error, n = errors.most_common(1)[0]
            others = f" ({rows - n:,} of them with other errors: see the error column)" if rows > n else ""
            log.warning("%s row%s of %s failed%s: %s", f"{rows:,}", "s" if rows > 1 else "",
                        "the base model" if adapter is None else f"adapter {adapter!r}", others, error)
