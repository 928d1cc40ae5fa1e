"""Where a deployment's data lives under its root URL (one folder per day, Hive-style)."""


def day_url(root: str, table: str, date: str) -> str:
    """`<root>/<table>/date=YYYY-MM-DD`; table is requests, results or metrics."""
    return f"{root.rstrip('/')}/{table}/date={date}"


def requests_url(root: str, date: str) -> str:
    return day_url(root, "requests", date)


def results_url(root: str, date: str) -> str:
    return day_url(root, "results", date)


def metrics_url(root: str, date: str) -> str:
    return day_url(root, "metrics", date)
