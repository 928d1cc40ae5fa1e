"""Where a deployment's data lives under its root URL (one folder per day, Hive-style), and which days."""
from datetime import datetime, timedelta, timezone

DEMO_NIGHTS = 3      # the demo evaluates the nights before today, so the Dagster partitions (to yesterday) hold them


def nights_before_today(count: int = DEMO_NIGHTS) -> list[str]:
    """The `count` days before today (UTC), oldest first."""
    today = datetime.now(timezone.utc).date()
    return [(today - timedelta(days=count - i)).isoformat() for i in range(count)]


def day_url(root: str, table: str, date: str) -> str:
    """`<root>/<table>/date=YYYY-MM-DD`; table is requests, results or metrics."""
    return f"{root.rstrip('/')}/{table}/date={date}"


def requests_url(root: str, date: str) -> str:
    return day_url(root, "requests", date)


def results_url(root: str, date: str) -> str:
    return day_url(root, "results", date)


def metrics_url(root: str, date: str) -> str:
    return day_url(root, "metrics", date)
