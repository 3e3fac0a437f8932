"""`quantdream serve`: a local web app to personalize, watch and generate (quantdream.server)."""
from __future__ import annotations

import argparse
import ipaddress

EPILOG = """examples:
  quantdream serve                                   # http://127.0.0.1:7860, runs kept in ./qd-data
  quantdream serve --data ~/qd --model sd15=~/models/sd-1.5 --model sd15-int4=~/models/sd15-int4
  quantdream serve --host 0.0.0.0 --token "$(openssl rand -hex 16)"    # other machines: a token is required

Jobs run one at a time as separate `quantdream personalize` / `generate` processes; stopping a run is Ctrl-C
(a checkpoint is kept) and resume continues from it. A restarted server finds its runs in --data again.
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="a local web app: upload photos, start, watch samples, stop/resume, generate",
                       description="Serve a small web app to personalize, watch and generate. Binds 127.0.0.1 by "
                                   "default; any other host needs --token.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; anything else requires --token)")
    a("--port", type=int, default=7860, help="port (default 7860)")
    a("--data", default="qd-data", help="data folder: runs, photos, outputs (default ./qd-data)")
    a("--token", default="", help="secret every request must carry (?token= once in the browser, or a Bearer header)")
    a("--model", dest="models", action="append", default=[], metavar="NAME=PATH",
      help="offer a local Stable Diffusion diffusers folder or a `quantdream quantize` folder as NAME (repeatable); "
           "the embedded model is always offered")
    a("--examples", default="", help="folder of example subjects (default: examples/subjects if present)")
    a("--max-jobs", dest="max_jobs", type=int, default=1, help="jobs running at once (default 1)")
    a("--threads", type=int, default=0, help="torch CPU threads of each job (default: torch's choice)")
    a("--max-upload-mib", dest="max_upload_mib", type=float, default=10.0, help="size limit per photo (default 10)")
    return p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def config_from_args(args):
    from ..server.store import ServeConfig
    if not is_loopback(args.host) and not args.token:
        raise ValueError(f"--host {args.host} is reachable from other machines: give --token SECRET "
                         f"(checked on every request), or bind 127.0.0.1")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be 1-65535, got {args.port}")
    if args.max_jobs < 1:
        raise ValueError(f"--max-jobs must be >= 1, got {args.max_jobs}")
    if args.max_upload_mib <= 0:
        raise ValueError(f"--max-upload-mib must be > 0, got {args.max_upload_mib}")
    models = {}
    for spec in args.models:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path or not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"--model expects NAME=PATH (NAME: letters, digits, - or _), got {spec!r}")
        if name == "embedded" or name in models:
            raise ValueError(f"--model name {name!r} is taken")
        models[name] = path
    return ServeConfig(data=args.data, host=args.host, port=args.port, token=args.token, models=models,
                       examples=args.examples, max_jobs=args.max_jobs, threads=args.threads,
                       max_upload_mib=args.max_upload_mib)


def run(args) -> int:
    cfg = config_from_args(args)
    import uvicorn

    from ..server.app import create_app
    app = create_app(cfg)
    for name, m in app.state.models.items():
        if m["error"]:
            print(f"quantdream serve: model {name!r} is not usable: {m['error']}")
    shown = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    url = f"http://{shown}:{cfg.port}/" + (f"?token={cfg.token}" if cfg.token else "")
    print(f"quantdream serve: {url}  (data: {app.state.store.root}; Ctrl-C to quit, jobs keep running)", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    return 0
