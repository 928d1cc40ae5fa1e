"""The demo: a tiny trained fleet and three nights of evaluation with a planted regression (`nights`)."""
