"""Adapter loads of the planner's order against the request table's own order, on workloads whose
adapter popularity follows a power law (a few adapters get most requests, most get a handful).

  naive     table order, one adapter resident: a load whenever the adapter changes
  FIFO-LRU  table order, an online server keeping as many adapters as the pool's adapter pages hold
            (least recently used evicted)
  plan      plan_waves' order, only the max_active_adapters slots as residency

CPU only; runs in seconds:  python -m bench.bench_planner
"""
import argparse
import random
import time

from pipeline.plan import PlanBudget, PlanItem, plan_waves

RANKS = [8, 16, 32, 64]
TARGET_COUNTS = [2, 4, 7]          # q,v / q,k,v,o / all seven projections
WORKLOADS = [(100, 2_000), (500, 10_000), (2_000, 50_000)]   # (adapters, requests)


def workload(n_adapters: int, n_requests: int, base_share: float, zipf: float, seed: int):
    """Requests whose adapters follow a Zipf law, in shuffled table order; mixed ranks and targets."""
    rng = random.Random(seed)
    names = [f"adapter-{k:05d}" for k in range(n_adapters)]
    pages = {a: rng.choice(RANKS) * rng.choice(TARGET_COUNTS) // 4 for a in names}
    weights = [1 / (k + 1) ** zipf for k in range(n_adapters)]
    picks = rng.choices(names, weights, k=n_requests)
    items = [PlanItem(f"req-{i:06d}", None if rng.random() < base_share else a,
                      rng.randint(16, 512), rng.randint(16, 256)) for i, a in enumerate(picks)]
    return items, pages


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-active-adapters", type=int, default=8)
    parser.add_argument("--resident", type=int, default=32, help="average-size adapters the pool holds at once")
    parser.add_argument("--zipf", type=float, default=1.1, help="power-law exponent of adapter popularity")
    parser.add_argument("--base-share", type=float, default=0.1, help="share of base-model requests")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    header = (f"{'adapters':>8} {'requests':>9} {'waves':>6} {'plan':>7} {'naive':>8} {'FIFO-LRU':>9} "
              f"{'naive/plan':>11} {'LRU/plan':>9} {'plan ms':>8}")
    print(f"adapter loads; {args.max_active_adapters} active adapters, pool room for ~{args.resident} "
          f"average adapters, Zipf {args.zipf}, {args.base_share:.0%} base-model rows")
    print(header)
    for n_adapters, n_requests in WORKLOADS:
        items, pages = workload(n_adapters, n_requests, args.base_share, args.zipf, args.seed)
        mean_pages = sum(pages.values()) / len(pages)
        budget = PlanBudget(adapter_pages=round(args.resident * mean_pages), kv_pages=8192,
                            max_active_adapters=args.max_active_adapters, block_size=16)
        start = time.perf_counter()
        plan = plan_waves(items, pages, budget)
        ms = (time.perf_counter() - start) * 1e3
        s = plan.summary()
        loads, naive, lru = s["predicted_adapter_loads"], s["naive_loads"], s["fifo_lru_loads"]
        print(f"{s['adapters']:>8,} {s['requests']:>9,} {s['waves']:>6,} {loads:>7,} {naive:>8,} {lru:>9,} "
              f"{naive / loads:>10.1f}x {lru / loads:>8.1f}x {ms:>8.0f}")


if __name__ == "__main__":
    main()
