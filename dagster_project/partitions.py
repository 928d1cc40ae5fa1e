"""One partition per night: the `date=YYYY-MM-DD` folders under <root>/requests, results and metrics.

The set starts at the deployment's first night, found when the code loads: LORAFLEET_START_DATE if set, else
the earliest day with request files under the root (on the demo's data, its first night), else the first night
the demo would write (so the demo, which loads this before it writes its data, can materialize its nights).
It ends yesterday, the last complete day."""
import os
from datetime import date

from dagster import DailyPartitionsDefinition

from pipeline.layout import nights_before_today

from .resources import LorafleetResource


def first_night(environ=os.environ) -> str:
    if environ.get("LORAFLEET_START_DATE"):
        return environ["LORAFLEET_START_DATE"]
    try:
        days = LorafleetResource.from_env(environ).request_days()
    except Exception:  # noqa: BLE001 - unreachable storage must not stop the code from loading
        days = {}
    nights = []
    for day in days:
        try:
            nights.append(date.fromisoformat(day))
        except ValueError:   # a folder named date=<not a date> is no night
            pass
    return min(nights, default=date.fromisoformat(nights_before_today()[0])).isoformat()


daily = DailyPartitionsDefinition(start_date=first_night(), timezone="UTC")
