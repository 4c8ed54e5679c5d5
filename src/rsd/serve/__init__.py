"""`rsd serve`: RSD behind an OpenAI-compatible HTTP API, batched across requests.

    cli.py        the command's options and start-up (uvicorn; SIGTERM drains)
    app.py        the Starlette app: routes, API key, limits, errors in the OpenAI shape, streaming, time-outs
    schemas.py    the request bodies (pydantic)
    requests.py   from a request to its trajectories: prompt, question, budgets, sampling, weighting function
    responses.py  the OpenAI response and chunk shapes with RSD's records; stop strings
    engine.py     where trajectories are decoded: the step-level scheduler (in-process models) or asyncio tasks
                  (served models)
    metrics.py    Prometheus metrics

The server libraries come with `pip install 'rsd[serve]'` and are imported only when the command runs.
"""
