"""stica-export: the video trunk in torchvision's r2plus1d_18 layout, the rest beside it."""
import json
import re

import torch
from omegaconf import OmegaConf

from stica.config import load_config
from stica.model import R2Plus1D18, Stica
from stica.tools.export import main as export_main


def r2plus1d_18_layout() -> dict:
    """Key -> shape of torchvision's r2plus1d_18 without `fc`, written out from its documented
    architecture (VideoResNet with R2Plus1dStem, BasicBlock and Conv2Plus1D): a stem of a 1x7x7
    conv to 45 channels and a 3x1x1 conv to 64, each with BN; four layers of two blocks; each
    block's conv1/conv2 a (1x3x3 conv, BN, ReLU, 3x1x1 conv) sequence followed by BN, with
    midplanes = in*out*27 // (in*9 + 3*out); a 1x1x1 conv + BN downsample where shape changes."""
    def bn(prefix, c):
        return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}

    out = {"stem.0.weight": (45, 3, 1, 7, 7), **bn("stem.1", 45), "stem.3.weight": (64, 45, 3, 1, 1), **bn("stem.4", 64)}
    inplanes = 64
    for layer, planes in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            cin = inplanes if block == 0 else planes
            mid = cin * planes * 27 // (cin * 9 + 3 * planes)
            p = f"layer{layer}.{block}"
            for conv, c_in in (("conv1", cin), ("conv2", planes)):
                out[f"{p}.{conv}.0.0.weight"] = (mid, c_in, 1, 3, 3)
                out.update(bn(f"{p}.{conv}.0.1", mid))
                out[f"{p}.{conv}.0.3.weight"] = (planes, mid, 3, 1, 1)
                out.update(bn(f"{p}.{conv}.1", planes))
            if block == 0 and layer > 1:
                out[f"{p}.downsample.0.weight"] = (planes, cin, 1, 1, 1)
                out.update(bn(f"{p}.downsample.1", planes))
        inplanes = planes
    return out


def write_checkpoint(path, width=1.0):
    cfg = load_config("configs/pretrain_kinetics.yaml", [f"model.width={width}"])
    torch.manual_seed(0)
    model = Stica(cfg.model)
    with torch.no_grad():  # BN statistics that are not the defaults, so a lost buffer shows
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    torch.save({"model": model.state_dict(), "config": OmegaConf.to_container(cfg, resolve=True), "step": 700,
                "loader": {"epoch": 3, "batch": 0}, "samples_seen": 5600}, path)
    return model


def test_export_writes_torchvision_layout_and_round_trips(tmp_path, capsys):
    model = write_checkpoint(tmp_path / "checkpoint.pt")
    assert export_main([str(tmp_path / "checkpoint.pt"), "--out", str(tmp_path / "export")]) == 0
    video = torch.load(tmp_path / "export" / "video_r2plus1d_18.pt")
    assert {k: tuple(v.shape) for k, v in video.items()} == r2plus1d_18_layout()
    # torchvision documents 31,505,325 parameters with its 400-way fc (512 x 400 + 400 = 205,200).
    assert sum(v.numel() for k, v in video.items() if "running" not in k and "num_batches" not in k) == 31_300_125

    # Back into the project's trunk: the same outputs on a clip (eval mode: the BN statistics count).
    trunk = R2Plus1D18(1.0).eval()
    trunk.load_state_dict({re.sub(r"^layer(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}.", k): v
                           for k, v in video.items()})
    clip = torch.randn(1, 3, 8, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(trunk(clip), model.video.eval()(clip))

    audio = torch.load(tmp_path / "export" / "audio_resnet9.pt")
    assert all(torch.equal(v, model.audio.state_dict()[k]) for k, v in audio.items())
    assert audio.keys() == model.audio.state_dict().keys()
    heads = torch.load(tmp_path / "export" / "pooling_heads.pt")
    assert {k.split(".")[0] for k in heads} == {"pool", "video_head", "audio_head"}
    meta = json.loads((tmp_path / "export" / "export.json").read_text())
    assert (meta["step"], meta["epoch"], meta["samples_seen"]) == (700, 3, 5600) and len(meta["sha256"]) == 64
    assert meta["config"]["model"]["width"] == 1.0 and meta["files"]["video_r2plus1d_18.pt"] == len(video)
    assert "step 700 (epoch 3)" in capsys.readouterr().out


def test_export_refuses_what_cannot_map(tmp_path, capsys):
    write_checkpoint(tmp_path / "narrow.pt", width=0.125)
    assert export_main([str(tmp_path / "narrow.pt"), "--out", str(tmp_path / "x")]) == 1
    assert "model.width=0.125" in capsys.readouterr().err and not (tmp_path / "x").exists()
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    assert export_main([str(tmp_path / "other.pt"), "--out", str(tmp_path / "x")]) == 1
    assert "not a stica checkpoint" in capsys.readouterr().err
    assert export_main([str(tmp_path / "absent.pt"), "--out", str(tmp_path / "x")]) == 1
    assert "absent.pt: cannot read it" in capsys.readouterr().err
