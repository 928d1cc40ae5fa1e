"""One partition per night: the `date=YYYY-MM-DD` folders under <root>/requests, results and metrics."""
from dagster import DailyPartitionsDefinition

# The last partition is yesterday (the last complete day); the demo writes its nights before today.
daily = DailyPartitionsDefinition(start_date="2024-01-01", timezone="UTC")
