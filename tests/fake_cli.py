"""A stand-in for `python -m quantdream.cli.main personalize|generate` in the server's API tests: it writes what
the real commands write (tqdm lines, samples, checkpoint, run.json, exports; grid.png) in milliseconds, honours
SIGINT like Ctrl-C (checkpoint, exit 130) and --resume (continues from the checkpoint's step).

Called as: fake_cli.py -m quantdream.cli.main COMMAND ARGS...  (the server puts its interpreter first)."""
import json
import os
import signal
import sys
import time
from pathlib import Path



def png(path: Path) -> None:
    from PIL import Image
    Image.new("RGB", (8, 8), (0, 140, 140)).save(path)


def opt(args, name, default=None):
    return args[args.index(name) + 1] if name in args else default


def personalize(args):
    out = Path(opt(args, "--out"))
    steps = int(opt(args, "--steps", "50"))
    every = int(opt(args, "--sample-every", "10"))
    delay = float(os.environ.get("FAKE_STEP_SECONDS", "0.05"))
    if opt(args, "--init-word") == "failword":
        print("quantdream personalize: error: the class word 'failword' is not one token", file=sys.stderr)
        return 2
    step = 0
    if "--resume" in args:
        step = json.loads((out / "checkpoint.pt").read_text())["step"]
        print(f"resuming from step {step}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    stop = []
    signal.signal(signal.SIGINT, lambda *a: stop.append(1))
    print("personalizing (fake)", file=sys.stderr, flush=True)
    while step < steps:
        if stop:
            (out / "checkpoint.pt").write_text(json.dumps({"step": step}))
            print(f"\ninterrupted at step {step}; continue with the same command plus --resume", file=sys.stderr)
            return 130
        time.sleep(delay)
        step += 1
        loss = 1.0 / step
        sys.stderr.write(f"\rfake <tok>: {step}/{steps} [00:01<00:02, 20.00step/s, loss={loss:.4f}, lr=1.0e-02]")
        sys.stderr.flush()
        if every and step % every == 0:
            (out / "checkpoint.pt").write_text(json.dumps({"step": step}))
            (out / "samples").mkdir(exist_ok=True)
            png(out / "samples" / f"step_{step:06d}.png")
    (out / "learned_embeds.safetensors").write_bytes(b"fake")
    (out / "losses.json").write_text(json.dumps([1.0 / (i + 1) for i in range(steps)]))
    (out / "run.json").write_text(json.dumps({
        "method": opt(args, "--method"), "weights": "int8", "steps": steps, "seconds": 1.0, "seconds_per_step": 0.05,
        "setup_seconds": 0.5, "unet_forward_passes": 3 * steps, "final_loss_mean_last_10pct": 0.1,
        "output_bytes": 4, "peak_memory_training": {"vmhwm_mib": 123.0}, "prompt_text": opt(args, "--token")}))
    print("\ndone", file=sys.stderr)
    return 0


def generate(args):
    out = Path(opt(args, "--out"))
    out.mkdir(parents=True, exist_ok=True)
    for j in range(int(opt(args, "-n", "4"))):
        png(out / f"000_prompt_{j}.png")
    png(out / "grid.png")
    print(f"wrote images and {out / 'grid.png'}")
    return 0


def evaluate(args):
    out = Path(opt(args, "--out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"means": [{"metrics": {"world_clip_i": 0.25, "prompt_accuracy": 0.5}}]}))
    return 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    assert argv[:2] == ["-m", "quantdream.cli.main"], argv
    sys.exit({"personalize": personalize, "generate": generate, "evaluate": evaluate}[argv[2]](argv[3:]))
