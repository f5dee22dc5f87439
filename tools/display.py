"""What a player shows of a source video, and the packed frame that shows the same to every reader.

A source's pixels are not its picture. A phone stores its orientation as a display matrix, an
anamorphic camera stores non-square pixels, an MJPEG camera or an Android phone stores full-range
levels, HD video uses BT.709's colour matrix and HDR video 10 bits of BT.2020. The packed segments
hold one kind of frame, which DALI, NVDEC, PyAV and torchcodec all decode the same way whether or
not they read the tags: upright, square pixels, 8-bit, limited range, BT.601 (and tagged so).

Scaling, levels and matrices are FFmpeg's (libswscale through PyAV's `reformat`); the quarter
turns and mirrors are a reordering of the scaled planes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

# AVColorSpace -> libswscale's coefficient set (PyAV's names); where FFmpeg has no coefficients of
# its own (BT.2020 constant luminance), the non-constant set is the nearest.
MATRICES = {1: "itu709", 5: "itu601", 6: "itu601", 4: "fcc", 7: "smpte240m", 9: "bt2020", 10: "bt2020"}
MATRIX_NAMES = {"itu709": "bt709", "itu601": "bt601", "fcc": "fcc", "smpte240m": "smpte240m", "bt2020": "bt2020"}
HDR_TRANSFERS = {16: "pq", 18: "hlg"}  # AVColorTransferCharacteristic: SMPTE ST 2084, ARIB STD-B67
# Without accurate rounding libswscale's matrix change (BT.709 -> BT.601) moved grey 30 to 27.
SCALING = av.video.reformatter.Interpolation.AREA | av.video.reformatter.Interpolation.ACCURATE_RND
PACKED_MATRIX, PACKED_RANGE = 6, 1  # what the packed segments are tagged: SMPTE 170M (BT.601), limited


@dataclass(frozen=True)
class Display:
    """How a player shows a source: the source's (coded) size, the quarter turns counter-clockwise
    and the mirror its display matrix asks for, its pixel aspect, and how to read its levels."""
    width: int
    height: int
    rotation: int = 0  # 0, 90, 180 or 270
    hflip: bool = False  # mirrored left-right after the rotation
    sar: Fraction = Fraction(1)
    matrix: str = "itu601"  # libswscale's coefficient set for the source's YUV
    matrix_tagged: bool = True  # False: guessed from the frame size
    full_range: bool = False
    bit_depth: int = 8
    hdr: str | None = None  # "pq" or "hlg": converted plainly, not tone-mapped

    @property
    def upright(self) -> tuple[int, int]:
        """The shown width and height in square pixels, before scaling."""
        w, h = self.width * self.sar, Fraction(self.height)
        return (h, w) if self.rotation in (90, 270) else (w, h)

    def record(self) -> dict:
        """What the packer applied, for KEY.json."""
        return {"rotation": self.rotation, "hflip": self.hflip, "sar": f"{self.sar.numerator}:{self.sar.denominator}",
                "range": "full" if self.full_range else "limited", "matrix": MATRIX_NAMES[self.matrix],
                "matrix_tagged": self.matrix_tagged, "bit_depth": self.bit_depth, "hdr": self.hdr}


def applied(record: dict) -> list[str]:
    """What a KEY.json's display record says the packer changed, by the names the manifest counts."""
    return [name for name, hit in (
        ("rotated", record["rotation"] != 0), ("mirrored", record["hflip"]), ("non_square_pixels", record["sar"] != "1:1"),
        ("full_range", record["range"] == "full"), ("matrix_converted", record["matrix"] != "bt601"),
        ("matrix_guessed", not record["matrix_tagged"]), ("deeper_than_8_bit", record["bit_depth"] > 8),
        ("hdr_not_tone_mapped", record["hdr"] is not None)) if hit]


def orientation(matrix: np.ndarray) -> tuple[int, bool]:
    """(quarter turns counter-clockwise in degrees, mirrored) of an FFmpeg display matrix (9
    int32, 16.16 fixed point). A mirror is a negative determinant; FFmpeg writes it by negating
    the first column after the rotation (av_display_matrix_flip), so that is undone first."""
    a, b, c, d = (float(matrix[i]) for i in (0, 1, 3, 4))
    hflip = a * d - b * c < 0
    if hflip:
        a, c = -a, -c
    degrees = -math.degrees(math.atan2(b, a))  # av_display_rotation_get's angle, counter-clockwise
    turns = round(degrees / 90) % 4
    if abs(degrees - round(degrees / 90) * 90) > 1:
        raise ValueError(f"the display matrix rotates by {degrees:.1f} degrees, not a quarter turn")
    return 90 * turns, hflip


def probe(frame: av.VideoFrame, stream) -> Display:
    """The source's display from its first decoded frame (the display matrix travels as frame
    side data) and its stream (the pixel aspect, where the container or the codec sets it)."""
    rotation, hflip = 0, False
    for side in frame.side_data:
        if side.type == av.sidedata.sidedata.Type.DISPLAYMATRIX:
            rotation, hflip = orientation(np.frombuffer(bytes(side), np.int32))
    sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
    sar = Fraction(sar) if sar and sar > 0 else Fraction(1)
    if frame.colorspace in MATRICES:
        matrix, tagged = MATRICES[frame.colorspace], True
    else:  # untagged: HD as BT.709, else BT.601, the guess players make (mpv, libplacebo)
        matrix, tagged = ("itu709" if frame.width >= 1280 or frame.height > 576 else "itu601"), False
    name = frame.format.name
    full = frame.color_range == 2 or name.startswith("yuvj")  # AVCOL_RANGE_JPEG; yuvj* formats are full by definition
    return Display(frame.width, frame.height, rotation, hflip, sar, matrix, tagged, full,
                   max(c.bits for c in frame.format.components), HDR_TRANSFERS.get(frame.color_trc))


def probe_file(path) -> Display:
    """The display of a source file, from its first video frame."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return probe(next(container.decode(stream)), stream)


def output_size(display: Display, short_side: int) -> tuple[int, int]:
    """The packed width and height: the shown picture's aspect, short side `short_side`, even
    (yuv420p)."""
    w, h = display.upright
    scale = short_side / min(w, h)
    even = lambda x: max(2, int(round(float(x * scale) / 2)) * 2)
    return even(w), even(h)


def packed_frame(frame: av.VideoFrame, display: Display, width: int, height: int) -> av.VideoFrame:
    """One source frame as the packed picture: scaled to (width, height) once turned upright,
    limited-range BT.601 8-bit 4:2:0."""
    scaled = _scaled(frame, display, width, height, "yuv420p", dst_colorspace="itu601", dst_color_range="MPEG")
    if not (display.rotation or display.hflip):
        return scaled
    planes = [_turned(p, display) for p in yuv420p_planes(scaled)]
    return av.VideoFrame.from_ndarray(np.concatenate([p.ravel() for p in planes]).reshape(height * 3 // 2, width),
                                      format="yuv420p")


def shown_rgb(frame: av.VideoFrame, display: Display) -> np.ndarray:
    """One source frame as RGB (H, W, 3 uint8) the way a player shows it, at its shown size."""
    w, h = (round(float(x)) for x in display.upright)
    return np.ascontiguousarray(_turned(_scaled(frame, display, w, h, "rgb24").to_ndarray(), display))


def _scaled(frame: av.VideoFrame, display: Display, width: int, height: int, format: str, **dst) -> av.VideoFrame:
    """The frame in its stored orientation, scaled to what turns upright into width x height, its
    levels and matrix read as the source's."""
    turned = display.rotation in (90, 270)
    return frame.reformat(width=height if turned else width, height=width if turned else height, format=format,
                          src_colorspace=display.matrix, src_color_range="JPEG" if display.full_range else "MPEG",
                          interpolation=SCALING, **dst)


def _turned(image: np.ndarray, display: Display) -> np.ndarray:
    """A stored-orientation image (or plane) as shown: the display matrix's quarter turns, then its mirror."""
    image = np.rot90(image, display.rotation // 90)
    return image[:, ::-1] if display.hflip else image


def yuv420p_planes(frame: av.VideoFrame) -> list[np.ndarray]:
    flat, h, w = frame.to_ndarray().ravel(), frame.height, frame.width
    y, u = flat[:h * w].reshape(h, w), flat[h * w:h * w * 5 // 4].reshape(h // 2, w // 2)
    return [y, u, flat[h * w * 5 // 4:].reshape(h // 2, w // 2)]
