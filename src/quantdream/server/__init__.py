"""`quantdream serve`: a local web app to personalize, watch and generate.

    create_app(ServeConfig(data="qd-data")) -> FastAPI app

Layout (each module light to import: torch and diffusers never load in the server process):
    store.py   the data folder: one folder per run (job.json, photos/, out/, log.txt, generations/), safe paths,
               upload checks
    jobs.py    the queue: each job is a separate process of the CLI (`personalize`, `generate`); stop = SIGINT
               (personalize keeps a checkpoint), resume = `--resume`; progress read from the job's log and files
    plan.py    the time plan and memory estimate shown before a run starts
    app.py     the FastAPI app: pages, JSON API, server-sent events, the token check
"""
