"""`python -m pipeline.demo`: the demo's nights through the pipeline calls (pipeline.demo.nights)."""
from pipeline.demo.nights import main

main()
