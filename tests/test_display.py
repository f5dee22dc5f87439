"""The packed picture is the one a player shows: sources stored turned (a display matrix), with
non-square pixels, full-range levels, BT.709 or BT.2020 matrices or 10 bits pack upright, square,
limited-range BT.601 8-bit. Each source here is an upright test card, stored the way a camera or
phone stores it; the packed frames, decoded the way a reader that ignores every tag decodes them
(BT.601, limited range), must give the card back: geometry and levels."""
import json
from fractions import Fraction

import av
import numpy as np
import pytest

from stica.media import iter_frames
from stica.shards import load_manifest
from stica.tools.display import probe_file
from stica.tools.transcode import PackOptions, transcode

OPTS = PackOptions(fps=15, short_side=64, seg_frames=15, min_frames=15, allow_no_audio=True)
COLOURS = [(30, 30, 30), (200, 30, 30), (30, 200, 30), (30, 30, 200),
           (128, 128, 128), (235, 235, 235), (200, 200, 30), (16, 16, 16)]  # saturated ones tell the matrices apart


def card(height: int, width: int) -> np.ndarray:
    """Two rows of four flat blocks: any turn, mirror or stretch moves a colour to another block."""
    img = np.zeros((height, width, 3), np.uint8)
    for k, colour in enumerate(COLOURS):
        i, j = divmod(k, 4)
        img[i * height // 2:(i + 1) * height // 2, j * width // 4:(j + 1) * width // 4] = colour
    return img


def write_source(path, upright, rotation=0, hflip=False, sar=Fraction(1), full_range=False, matrix=("itu601", 6),
                 codec="libx264", pix_fmt="yuv420p", transfer=None, primaries=None, tag_matrix=True):
    """`upright` stored so that a player shows it: turned back by the display matrix's rotation,
    mirrored, squeezed by the pixel aspect, converted to YUV with `matrix` and range."""
    stored = np.rot90(upright[:, ::-1] if hflip else upright, -(rotation // 90))
    height, width = stored.shape[:2]
    coded_width = int(round(width / sar / 2)) * 2
    rgb = av.VideoFrame.from_ndarray(np.ascontiguousarray(stored), format="rgb24")
    yuv = rgb.reformat(width=coded_width, height=height, format=pix_fmt, dst_colorspace=matrix[0],
                       dst_color_range="JPEG" if full_range else "MPEG", interpolation="AREA")
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=15)
        stream.width, stream.height, stream.pix_fmt = coded_width, height, pix_fmt
        cc = stream.codec_context
        cc.sample_aspect_ratio = sar
        cc.color_range = 2 if full_range else 1
        if tag_matrix:
            cc.colorspace = matrix[1]
        cc.color_trc, cc.color_primaries = transfer or 2, primaries or 2  # 2: unspecified
        if codec == "libx264":
            stream.options = {"crf": "4", "preset": "veryfast"}
        if rotation or hflip:
            stream.set_display_rotation(rotation, hflip=hflip)
        for i in range(20):
            yuv.pts = i
            out.mux(stream.encode(yuv))
        out.mux(stream.encode())
    return path


def pack(path):
    """(KEY.json, the first packed frame as a tag-blind reader decodes it, that frame)."""
    result = transcode(path, "k", "card", 0, OPTS)
    frame = next(iter_frames(result["members"]["segs"]))
    rgb = frame.reformat(format="rgb24", src_colorspace="itu601", src_color_range="MPEG").to_ndarray()
    return json.loads(result["members"]["json"]), rgb, frame


def block_errors(got: np.ndarray, upright: np.ndarray) -> np.ndarray:
    """Per block of the card, the largest channel error inside it (4 px from its edges, where
    scaling blurs), against the card scaled to the packed size."""
    h, w = got.shape[:2]
    want = av.VideoFrame.from_ndarray(upright, format="rgb24").reformat(width=w, height=h,
                                                                        interpolation="AREA").to_ndarray()
    err = np.abs(got.astype(int) - want.astype(int))
    return np.array([err[i * h // 2 + 4:(i + 1) * h // 2 - 4, j * w // 4 + 4:(j + 1) * w // 4 - 4].max()
                     for i in range(2) for j in range(4)])


UPRIGHT = card(64, 96)


@pytest.mark.parametrize("rotation,hflip", [(90, False), (180, False), (270, False), (90, True), (0, True)])
def test_a_turned_or_mirrored_source_packs_upright(tmp_path, rotation, hflip):
    source = write_source(tmp_path / "phone.mp4", UPRIGHT, rotation=rotation, hflip=hflip)
    meta, rgb, _ = pack(source)
    assert (meta["width"], meta["height"]) == (96, 64)  # stored 64x96 when turned a quarter
    assert rgb.shape == (64, 96, 3)
    assert block_errors(rgb, UPRIGHT).max() <= 10  # a turn or mirror left in moves colours: 60-200 off
    assert meta["display"]["rotation"] == rotation and meta["display"]["hflip"] == hflip


@pytest.mark.parametrize("sar,coded,shown", [(Fraction(16, 9), (128, 128), (114, 64)),  # square storage shown 16:9
                                             (Fraction(3, 4), (256, 144), (86, 64))])  # 16:9 storage shown 4:3
def test_non_square_pixels_pack_at_the_shown_aspect(tmp_path, sar, coded, shown):
    upright = card(coded[1], int(round(coded[0] * sar)))
    source = write_source(tmp_path / "anamorphic.mp4", upright, sar=sar)
    with av.open(str(source)) as c:
        assert (c.streams.video[0].width, c.streams.video[0].height) == coded
    meta, rgb, _ = pack(source)
    assert (meta["width"], meta["height"]) == shown
    assert block_errors(rgb, upright).max() <= 10
    assert meta["display"]["sar"] == f"{sar.numerator}:{sar.denominator}"


@pytest.mark.parametrize("codec,pix_fmt", [("libx264", "yuv420p"), ("mjpeg", "yuvj420p")])
def test_full_range_levels_pack_as_limited_range_with_the_same_picture(tmp_path, codec, pix_fmt):
    """Full-range levels read as limited stretch by 255/219: 12 levels off on average on this
    card, highlights clipped. Converted, they come back within the codec's error."""
    source = write_source(tmp_path / f"camera.{'mov' if codec == 'mjpeg' else 'mp4'}", UPRIGHT, full_range=True,
                          codec=codec, pix_fmt=pix_fmt)
    meta, rgb, frame = pack(source)
    errors = block_errors(rgb, UPRIGHT)
    assert errors.max() <= 8 and errors.mean() <= 4, errors
    assert meta["display"]["range"] == "full"
    assert frame.color_range == 1  # the packed segments say limited, as they hold


@pytest.mark.parametrize("matrix", [("itu601", 6), ("itu709", 1)])
def test_bt709_and_bt601_sources_give_the_same_packed_picture(tmp_path, matrix):
    """A BT.709 source read with BT.601's coefficients is off by up to 28 levels in its
    saturated blocks; converted, every block is within the codec's error."""
    meta, rgb, frame = pack(write_source(tmp_path / "hd.mp4", UPRIGHT, matrix=matrix))
    assert block_errors(rgb, UPRIGHT).max() <= 8
    assert meta["display"]["matrix"] == {"itu601": "bt601", "itu709": "bt709"}[matrix[0]]
    assert frame.colorspace == 6  # tagged as what it holds: SMPTE 170M (BT.601)


def test_an_untagged_hd_source_is_read_as_bt709(tmp_path):
    upright = card(720, 1280)
    meta, rgb, _ = pack(write_source(tmp_path / "hd.mp4", upright, matrix=("itu709", 1), tag_matrix=False))
    assert meta["display"]["matrix"] == "bt709" and meta["display"]["matrix_tagged"] is False
    assert block_errors(rgb, upright).max() <= 8


def test_ten_bit_and_hdr_sources_pack_to_eight_bits(tmp_path):
    """10-bit BT.709 converts to the same card; 10-bit BT.2020 PQ is converted plainly (its
    code values kept, not tone-mapped) and recorded so."""
    meta, rgb, _ = pack(write_source(tmp_path / "ten.mp4", UPRIGHT, pix_fmt="yuv420p10le", matrix=("itu709", 1)))
    assert block_errors(rgb, UPRIGHT).max() <= 8
    assert meta["display"]["bit_depth"] == 10 and meta["display"]["hdr"] is None
    meta, rgb, _ = pack(write_source(tmp_path / "hdr.mp4", UPRIGHT, pix_fmt="yuv420p10le", matrix=("bt2020", 9),
                                     transfer=16, primaries=9))
    assert block_errors(rgb, UPRIGHT).max() <= 8
    assert meta["display"]["matrix"] == "bt2020" and meta["display"]["hdr"] == "pq"


def test_every_display_matrix_orientation_reads_back_as_written(tmp_path):
    """The eight EXIF orientations, written by FFmpeg's muxer as display matrices."""
    for rotation in (0, 90, 180, 270):
        for hflip in (False, True):
            path = write_source(tmp_path / f"r{rotation}{hflip}.mp4", card(16, 32), rotation=rotation, hflip=hflip)
            display = probe_file(path)
            assert (display.rotation, display.hflip) == (rotation, hflip)


def test_the_manifest_counts_what_was_applied_and_verify_checks_the_geometry(tmp_path):
    from stica.tools.shard import main as shard_main
    from stica.tools.verify import verify

    root = tmp_path / "videos"
    (root / "card").mkdir(parents=True)
    write_source(root / "card" / "upright.mp4", UPRIGHT)
    write_source(root / "card" / "phone.mp4", UPRIGHT, rotation=90)
    write_source(root / "card" / "phone2.mp4", UPRIGHT, rotation=270, full_range=True)
    write_source(root / "card" / "dv.mp4", card(64, 114), sar=Fraction(16, 9))
    out = tmp_path / "shards"
    assert shard_main(["pack", "--root", str(root), "--out", str(out), "--short-side", "64", "--fps", "15",
                       "--seg-frames", "15", "--min-frames", "15", "--allow-no-audio", "--workers", "1",
                       "--codec", "vp9"]) == 0
    manifest = load_manifest(out)
    assert manifest["normalised"] == {"rotated": 2, "full_range": 1, "non_square_pixels": 1}
    assert verify(out, sources=root) == []
    # The source of one sample now shows otherwise (re-recorded upright): verify names it.
    write_source(root / "card" / "phone.mp4", card(96, 64))
    problems = verify(out, sources=root)
    assert len(problems) == 1 and "phone" in problems[0] and "shows as 64x96" in problems[0], problems
    assert probe_file(root / "card" / "phone.mp4").rotation == 0
