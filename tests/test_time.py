"""Wall-clock time to a token: the time plan (--dry-run, --max-hours), the precision guard (bench zo-noise),
and ZOODiP across processes (the same token from 2 gloo ranks as from one process)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from quantdream.cli.main import main
from quantdream.distributed import share
from quantdream.plan import TimePlan, grid_passes
from quantdream.bench.zo_noise import NoiseSpec, zo_noise
from quantdream.precision import check_zo_precision


def args(model, images, out, *extra):
    return ["personalize", "--images", str(images), "--token", "<my-bag>", "--init-word", "bag", "--model", str(model),
            "--weights", "none", "--out", str(out), "--threads", "1", "--set", "sample_images=0", *extra]


# ----------------------------------------------------------------------------- the plan
def test_dry_run_prints_the_plan_and_writes_nothing(tiny_model, photos, tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level("INFO"):
        assert main(args(tiny_model, photos, out, "--steps", "40", "--dry-run")) == 0
    assert not out.exists()
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("time plan"))
    assert "40 steps x 3 UNet passes = 120 passes" in line and "ETA" in line and "MiB" in line


def test_max_hours_refuses_a_long_run_naming_the_levers(tiny_model, photos, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(tiny_model, photos, out, "--steps", "30000", "--max-hours", "0.001")) == 2
    err = capsys.readouterr().err
    assert not out.exists()
    assert "--max-hours 0.001" in err and "fewer --steps" in err and "zoodip-fast" in err and "--nproc" in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1


def test_plan_arithmetic_and_refusal():
    p = TimePlan(method="zoodip", steps=1000, passes_per_step=9, seconds_per_step=2.0)
    assert p.passes == 9000 and p.seconds_per_pass == pytest.approx(2 / 9) and p.eta() == 2000
    assert p.eta(done=400) == 1200 and p.eta(done=400, seconds_per_step=1.0) == 600
    p.check(1.0)                                           # 2000 s fits in an hour
    with pytest.raises(ValueError, match=r"about 900 fit"):
        p.check(0.5)
    assert grid_passes(1000, 0, 500, 2, 25, 3) == 2 * 25 * 2 * 3 * 2      # step 500 and the final grid
    assert grid_passes(1000, 0, 0, 2, 25, 3) == 25 * 2 * 3 * 2 and grid_passes(10, 0, 5, 0, 25, 3) == 0


# ----------------------------------------------------------------------------- precision
def test_bf16_at_mu_1e_3_is_refused_with_what_to_use(tiny_model, photos, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(tiny_model, photos, out, "--steps", "2", "--dtype", "bfloat16")) == 2
    err = capsys.readouterr().err
    assert "zoodip.mu = 0.001 in bfloat16" in err and "--dtype float32" in err and "zoodip.mu=0.1" in err
    assert not out.exists()


def test_guard_table():
    from quantdream.methods.zoodip import ZoodipConfig
    from quantdream.methods.ti import TIConfig
    assert check_zo_precision("zoodip", ZoodipConfig(mu=0.1), torch.bfloat16) == torch.bfloat16
    assert check_zo_precision("zoodip", ZoodipConfig(), torch.float16, explicit=False) == torch.float32  # auto
    with pytest.raises(ValueError, match="zoodip.mu=0.01"):
        check_zo_precision("zoodip", ZoodipConfig(), torch.float16)
    assert check_zo_precision("ti", TIConfig(), torch.bfloat16) == torch.bfloat16    # not a ZO method


def test_zo_noise_fp32_matches_float64_and_bf16_does_not_at_small_mu(tiny_model):
    r = zo_noise(NoiseSpec(model=str(tiny_model), dtypes=("fp32", "bf16"), mus=(1e-3,), n=8, timesteps=(850,)))
    corr = {row["dtype"]: row["correlation"] for row in r["rows"]}
    assert corr["fp32"] > 0.999
    assert corr["bf16"] < 0.9


def test_zo_noise_on_a_cuda_device_torch_cannot_see_is_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    out = tmp_path / "zo.json"
    assert main(["bench", "zo-noise", "--model", "tiny", "--device", "cuda", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "torch sees no CUDA device; use --device cpu or auto" in err and err.count("\n") == 0, err
    assert not out.exists()


# ----------------------------------------------------------------------------- processes
def test_share_splits_candidates_evenly_and_in_order():
    for K in (1, 3, 9, 20):
        for R in (1, 2, 3, 4):
            parts = [share(K, r, R) for r in range(R)]
            assert parts[0][0] == 0 and parts[-1][1] == K
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            sizes = [hi - lo for lo, hi in parts]
            assert max(sizes) - min(sizes) <= 1


def test_nproc_refuses_a_gradient_method(tiny_model, photos, tmp_path, capsys):
    assert main(args(tiny_model, photos, tmp_path / "r", "--method", "ti", "--nproc", "2")) == 2
    assert "--method ti backpropagates" in capsys.readouterr().err
    assert main(args(tiny_model, photos, tmp_path / "r", "--method", "ti", "--set", "candidate_shards=2")) == 2
    assert "--method ti does not run across processes or candidate shards" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_candidate_shards_in_one_process_keep_the_stream_and_the_losses(frozen_tiny):
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    from quantdream.data.dataset import Batch
    from quantdream.distributed import Ranks, sharded
    from quantdream.methods.base import DenoisingObjective, add_placeholder
    from quantdream.models import embedded
    tok = CLIPTokenizer.from_pretrained(str(embedded.TOKENIZER_DIR))
    ph = add_placeholder(tok, frozen_tiny["text_encoder"], "<x>", "bag")
    u = frozen_tiny["unet"].config
    batch = Batch(latents=torch.randn(1, u.in_channels, u.sample_size, u.sample_size), captions=["a <x>"],
                  index=[0], flipped=[False])
    obj = DenoisingObjective(tok, frozen_tiny["text_encoder"], frozen_tiny["unet"],
                             DDPMScheduler(**embedded.SCHEDULER_CONFIG), ph)
    theta = ph.init_vectors[None] + 1e-2 * torch.randn(5, *ph.init_vectors.shape)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    whole = obj(theta, batch, g1)
    parts = torch.cat([obj(theta[:3], batch, torch.Generator().manual_seed(3)),
                       obj(theta[3:], batch, torch.Generator().manual_seed(3))])
    shard = sharded(obj, Ranks(), shards=2)(theta, batch, g2)
    assert torch.equal(shard, parts) and torch.allclose(shard, whole, atol=1e-5)
    assert torch.equal(g1.get_state(), g2.get_state())            # one draw of (t, eps), as in one batch
    assert obj.forward_passes == 5 + 5 + 5


@pytest.mark.slow
def test_two_gloo_ranks_learn_the_token_of_one_process_with_the_same_shards_bit_for_bit(tiny_model, photos, tmp_path):
    """zoodip-fast and gf-ti, 50 steps: benchmarks/distributed.py."""
    extra = ("--method", "zoodip", "--steps", "3", "--checkpoint-every", "2")
    assert main(args(tiny_model, photos, tmp_path / "one", *extra, "--set", "candidate_shards=2")) == 0
    assert main(args(tiny_model, photos, tmp_path / "two", *extra, "--nproc", "2")) == 0
    one, two = (load_file(tmp_path / d / "learned_embeds.safetensors")["<my-bag>"] for d in ("one", "two"))
    assert torch.equal(one, two) and not torch.equal(one, torch.zeros_like(one))
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["processes"] == 2 and run["unet_forward_passes"] == json.loads(
        (tmp_path / "one" / "run.json").read_text())["unet_forward_passes"]


def test_scale_candidates_multiplies_directions_or_population_by_the_ranks():
    from quantdream.distributed import Ranks, scaled
    from quantdream.methods.gfti import GFTIConfig
    from quantdream.methods.zoodip import ZoodipConfig
    two = Ranks(rank=0, world=2)
    assert scaled("zoodip", ZoodipConfig(n=8), two).n == 16
    assert scaled("gf-ti", GFTIConfig(popsize=20), two).popsize == 40
    assert scaled("zoodip", ZoodipConfig(n=8), Ranks()).n == 8
