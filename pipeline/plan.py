"""The planner: order a night's requests into waves of adapters that fit the device pool together,
so that each adapter is copied onto the device once.

A wave is a set of adapters whose pages fit the pool's adapter budget at the same time, with all of
their requests. Adapters are dealt biggest first, each to the wave with the fewest pages so far, into
as few waves as that fits: every wave mixes big and small adapters. An adapter bigger than the budget
gets a wave of its own. Base-model rows need no adapter; they go to the waves with the least work,
which evens out the work per wave. Within a wave, requests are grouped by adapter, the adapter with
the most work first (LPT), so no adapter's long tail is left running alone at the wave's end.
"""
import heapq
import json
import math
from collections import OrderedDict, defaultdict
from dataclasses import asdict, dataclass, field, fields, replace

WAVE_ADAPTERS_PER_ACTIVE = 4   # a wave holds at most this many times max_active_adapters adapters
PREVIEW = 4                    # adapter ids a table line or a note names before "(+n)"


@dataclass
class PlanItem:
    request_id: str
    adapter_id: str | None          # None = base model
    prompt_tokens: int
    max_new_tokens: int

    def __post_init__(self):
        assert self.prompt_tokens >= 0 and self.max_new_tokens >= 0, f"{self.request_id}: negative token count"

    @property
    def est_tokens(self) -> int:
        return self.prompt_tokens + self.max_new_tokens


@dataclass(frozen=True)
class AdapterShard:
    """Part `index` (0-based) of `count` parts of a night, split by adapter so that each part can run on
    its own GPU and every adapter is still loaded on one GPU only."""
    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"adapter shard {self.index}/{self.count}: want 0 <= index < count")

    @classmethod
    def parse(cls, text: str) -> "AdapterShard":
        """'I/N', e.g. '0/4' .. '3/4'."""
        index, sep, count = text.partition("/")
        if not (sep and index.isdigit() and count.isdigit()):
            raise ValueError(f"adapter shard wants I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
        return cls(int(index), int(count))

    @property
    def tag(self) -> str:
        """What names this part's result files, lock and run records ('' for a whole night)."""
        return f"s{self.index}of{self.count}" if self.count > 1 else ""

    def select(self, items: list["PlanItem"]) -> list["PlanItem"]:
        return split_by_adapter(items, self.count)[self.index] if self.count > 1 else items


@dataclass
class PlanBudget:
    adapter_pages: int              # pool pages that may hold adapters at once
    kv_pages: int
    max_active_adapters: int
    block_size: int                 # tokens per KV page

    def __post_init__(self):
        for f in fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"{f.name} must be >= 1, got {getattr(self, f.name)}")

    @property
    def max_wave_adapters(self) -> int:
        # More adapters than this would sit resident and idle, holding pages the KV cache could use.
        return WAVE_ADAPTERS_PER_ACTIVE * self.max_active_adapters


@dataclass
class Wave:
    index: int
    adapter_ids: list[str | None]   # in request order; None = base-model rows (always last)
    request_ids: list[str]          # grouped by adapter, groups in adapter_ids order
    est_tokens: int                 # prompt + max new tokens of its requests
    pages: int                      # adapter pages resident while the wave runs
    group_sizes: list[int]          # requests of each entry of adapter_ids


@dataclass
class Plan:
    waves: list[Wave]
    budget: PlanBudget
    notes: list[str] = field(default_factory=list)
    # Loads of the same requests in table order: "naive" keeps one adapter resident (a load whenever
    # the adapter changes), "fifo_lru" keeps as many as the adapter pages hold, least recently used out.
    baseline_loads: dict[str, int] = field(default_factory=dict)

    @classmethod
    def concat(cls, plans: list["Plan"]) -> "Plan":
        """The plans of a night's adapter shards as one plan (each shard's waves in turn). Shards have
        disjoint adapters, so loads add up: predicted_adapter_loads is the sum of the shards'."""
        waves = [replace(w, index=i) for i, w in enumerate(w for p in plans for w in p.waves)]
        baselines = {k: sum(p.baseline_loads[k] for p in plans) for k in plans[0].baseline_loads}
        return cls(waves, plans[0].budget, [n for p in plans for n in p.notes], baselines)

    def request_order(self) -> list[str]:
        """Every request id once, wave by wave: the order the engine receives them."""
        return [rid for w in self.waves for rid in w.request_ids]

    def adapter_sequence(self) -> list[str | None]:
        """The adapter of each request in request_order()."""
        return [a for w in self.waves for a, n in zip(w.adapter_ids, w.group_sizes) for _ in range(n)]

    def predicted_adapter_loads(self) -> int:
        # Only the active slots as residency: LRU is a stack algorithm, so a larger pool never loads more.
        return count_adapter_loads(self.adapter_sequence(), self.budget.max_active_adapters)

    def summary(self) -> dict:
        adapters = {a for w in self.waves for a in w.adapter_ids if a is not None}
        base = sum(n for w in self.waves for a, n in zip(w.adapter_ids, w.group_sizes) if a is None)
        return {"waves": len(self.waves), "adapters": len(adapters),
                "requests": sum(len(w.request_ids) for w in self.waves), "base_requests": base,
                "est_tokens": sum(w.est_tokens for w in self.waves),
                "max_wave_pages": max((w.pages for w in self.waves), default=0),
                "predicted_adapter_loads": self.predicted_adapter_loads(),
                "naive_loads": self.baseline_loads.get("naive"),
                "fifo_lru_loads": self.baseline_loads.get("fifo_lru"), "notes": self.notes}

    def to_json(self) -> str:
        return json.dumps({"summary": self.summary(), "budget": asdict(self.budget), "notes": self.notes,
                           "baseline_loads": self.baseline_loads,
                           "waves": [asdict(w) for w in self.waves]}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        d = json.loads(text)
        return cls([Wave(**w) for w in d["waves"]], PlanBudget(**d["budget"]), d["notes"], d["baseline_loads"])

    def format_table(self) -> str:
        """What `lorafleet plan` prints."""
        s, b = self.summary(), self.budget
        lines = [f"{'wave':>5} {'adapters':>9} {'requests':>10} {'est tokens':>13} {'pages':>13}  adapter ids"]
        for w in self.waves:
            # the base model is no adapter: its rows are counted apart, so the number and the list agree
            names = [a for a in w.adapter_ids if a is not None]
            base = sum(n for a, n in zip(w.adapter_ids, w.group_sizes) if a is None)
            lines.append(f"{w.index:>5} {len(names):>9,} {len(w.request_ids):>10,} {w.est_tokens:>13,} "
                         f"{f'{w.pages:,}/{b.adapter_pages:,}':>13}  {_preview(names)}"
                         + (f"{'; ' if names else ''}{base:,} base-model requests" if base else ""))
        lines.append(f"{'total':>5} {s['adapters']:>9,} {s['requests']:>10,} {s['est_tokens']:>13,} "
                     f"{'max ' + format(s['max_wave_pages'], ','):>13}"
                     f"  {s['base_requests']:,} base-model requests")
        lines.append(f"predicted adapter loads: {s['predicted_adapter_loads']:,}"
                     + (f" (table order: naive {s['naive_loads']:,}, FIFO-LRU {s['fifo_lru_loads']:,})"
                        if self.baseline_loads else ""))
        lines.append(f"budget: {b.adapter_pages:,} adapter pages, {b.kv_pages:,} KV pages of {b.block_size} tokens,"
                     f" {b.max_active_adapters} active adapters, up to {b.max_wave_adapters} per wave")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def plan_waves(items: list[PlanItem], adapter_pages: dict[str, int], budget: PlanBudget) -> Plan:
    """Order `items` into waves; `adapter_pages` gives the pool pages each adapter occupies."""
    ids = [it.request_id for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError("request_id must be unique among planned items")
    groups, base, work = _by_adapter(items)
    notes = []
    unknown = sorted(a for a in groups if a not in adapter_pages)
    if unknown:
        notes.append(f"adapters with no page size (unreadable?), planned as 0 pages: {_preview(unknown)}"
                     f" ({len(unknown):,} in all)")
    pages = {a: adapter_pages.get(a, 0) for a in groups}
    too_long = sum(math.ceil(it.est_tokens / budget.block_size) > budget.kv_pages for it in items)
    if too_long:
        notes.append(f"requests needing more KV pages than the pool's {budget.kv_pages:,}: {too_long:,}")

    bins = _pack(pages, work, budget, notes)
    bin_work = [sum(work[a] for a in adapters) for adapters in bins] or [0]
    base_per_wave = _spread(base, bin_work)
    waves = []
    for adapters, base_rows in zip(bins or [[]], base_per_wave):
        ordered = [(a, groups[a]) for a in sorted(adapters, key=lambda a: (-work[a], a))]
        if base_rows:  # last: they need no adapter slot, so they fill the batch while the wave drains
            ordered.append((None, base_rows))
        if ordered:
            waves.append(_wave(ordered, sum(pages[a] for a in adapters)))
    # Heaviest waves first, so the run ends on light work and its tail is short.
    waves.sort(key=lambda w: -w.est_tokens)
    for i, w in enumerate(waves):
        w.index = i

    table_order = [it.adapter_id for it in items]
    baselines = {"naive": count_adapter_loads(table_order, 1),
                 "fifo_lru": count_adapter_loads(table_order, budget.adapter_pages, pages=pages)}
    return Plan(waves, budget, notes, baselines)


def _by_adapter(items: list[PlanItem]) -> tuple[dict[str, list[PlanItem]], list[PlanItem], dict[str, int]]:
    """Items grouped by adapter, the base-model items, and each adapter's work (estimated tokens)."""
    groups: dict[str | None, list[PlanItem]] = defaultdict(list)
    for it in items:
        groups[it.adapter_id].append(it)
    base = groups.pop(None, [])
    return groups, base, {a: sum(it.est_tokens for it in reqs) for a, reqs in groups.items()}


def split_by_adapter(items: list[PlanItem], count: int) -> list[list[PlanItem]]:
    """Split a night into `count` parts with disjoint adapters: adapters, most work first, each to the part
    with the least work so far; then base-model rows even out the work, as they do for waves. The split
    depends only on `items`, so every part's process computes the same one."""
    groups, base, work = _by_adapter(items)
    parts: list[list[PlanItem]] = [[] for _ in range(count)]
    heap = [(0, i) for i in range(count)]
    for a in sorted(groups, key=lambda a: (-work[a], a)):
        load, i = heapq.heappop(heap)
        parts[i] += groups[a]
        heapq.heappush(heap, (load + work[a], i))
    for part, base_rows in zip(parts, _spread(base, [sum(it.est_tokens for it in p) for p in parts])):
        part += base_rows
    return parts


def count_adapter_loads(adapter_sequence: list[str | None], capacity: int, *,
                        pages: dict[str, int] | None = None) -> int:
    """Adapter loads of an online server that admits requests in this order (FIFO) and keeps `capacity`
    adapters resident, evicting the least recently used. With `pages`, capacity counts pool pages and
    adapter a takes pages[a]. None (base model) needs no adapter."""
    assert capacity >= 1, "capacity must be >= 1"
    resident: OrderedDict[str, int] = OrderedDict()   # adapter -> its size, least recently used first
    used = loads = 0
    for a in adapter_sequence:
        if a is None:
            continue
        if a in resident:
            resident.move_to_end(a)
            continue
        loads += 1
        size = pages[a] if pages is not None else 1
        while resident and used + size > capacity:
            used -= resident.popitem(last=False)[1]
        resident[a] = size
        used += size
    return loads


def _pack(pages: dict[str, int], work: dict[str, int], budget: PlanBudget, notes: list[str]) -> list[list[str]]:
    """Split adapters into waves; returns the adapters of each wave. Oversize adapters get a wave
    each; the rest are packed into the fewest waves that worst-fit decreasing manages."""
    oversize = sorted((a for a in pages if pages[a] > budget.adapter_pages), key=lambda a: (-pages[a], a))
    for a in oversize:
        notes.append(f"adapter {a} needs {pages[a]:,} pages, more than the budget of "
                     f"{budget.adapter_pages:,}: it runs in a wave of its own")
    rest = sorted((a for a in pages if pages[a] <= budget.adapter_pages), key=lambda a: (-pages[a], -work[a], a))
    n_waves = max(math.ceil(sum(pages[a] for a in rest) / budget.adapter_pages),
                  math.ceil(len(rest) / budget.max_wave_adapters))
    while (waves := _worst_fit(rest, pages, work, budget, n_waves)) is None:
        n_waves += 1
    return [[a] for a in oversize] + waves


def _worst_fit(adapters: list[str], pages: dict[str, int], work: dict[str, int], budget: PlanBudget,
               n_waves: int) -> list[list[str]] | None:
    """Deal adapters, biggest first, each to the wave with the fewest pages so far (then the least
    work): every wave gets a mix of big and small adapters and similar pages. None if one does not fit."""
    waves: list[list[str]] = [[] for _ in range(n_waves)]
    heap = [(0, 0, i) for i in range(n_waves)]   # (pages, work, wave) of waves with a free adapter slot
    for a in adapters:
        if not heap:
            return None
        used, load, i = heapq.heappop(heap)
        if used + pages[a] > budget.adapter_pages:   # the emptiest wave is too full: so is every other
            return None
        waves[i].append(a)
        if len(waves[i]) < budget.max_wave_adapters:
            heapq.heappush(heap, (used + pages[a], load + work[a], i))
    return waves


def _spread(base: list[PlanItem], wave_work: list[int]) -> list[list[PlanItem]]:
    """Give each base-model row, longest first, to the wave with the least work so far: every wave
    then carries similar work, keeping batches full and giving the next wave's loads time to hide."""
    per_wave: list[list[PlanItem]] = [[] for _ in wave_work]
    heap = [(w, i) for i, w in enumerate(wave_work)]
    heapq.heapify(heap)
    for it in sorted(base, key=lambda it: (-it.est_tokens, it.request_id)):
        w, i = heapq.heappop(heap)
        per_wave[i].append(it)
        heapq.heappush(heap, (w + it.est_tokens, i))
    return per_wave


def _wave(groups: list[tuple[str | None, list[PlanItem]]], pages: int) -> Wave:
    request_ids = [it.request_id for _, reqs in groups
                   for it in sorted(reqs, key=lambda it: (-it.est_tokens, it.request_id))]
    return Wave(0, [a for a, _ in groups], request_ids,
                sum(it.est_tokens for _, reqs in groups for it in reqs), pages, [len(r) for _, r in groups])


def _preview(names: list[str]) -> str:
    shown = ", ".join(names[:PREVIEW])
    return shown + (f", … (+{len(names) - PREVIEW})" if len(names) > PREVIEW else "")
