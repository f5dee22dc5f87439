import io, time, av, numpy as np, spdl.io
from stica.shards import read_index, shard_paths, split_segments
tars, idxs = shard_paths("/tmp/footage-shards2", "train")
pieces = []
with open(tars[0], "rb") as f:
    for key, m in read_index(idxs[0])[:20]:
        f.seek(m["segs"][0]); segs = f.read(m["segs"][1]); f.seek(m["info"][0]); info = f.read(m["info"][1])
        pieces += split_segments(segs, info)[:3]
def t(fn, reps=3):
    best = None
    for _ in range(reps):
        c = time.process_time()
        for p in pieces: fn(p)
        ms = (time.process_time() - c) * 1000 / len(pieces)
        best = ms if best is None else min(best, ms)
    return round(best, 3)
def pyav(p):
    with av.open(io.BytesIO(p)) as c:
        return [pk for pk in c.demux(c.streams.video[0])]
def pyav_fmt(p):
    with av.open(io.BytesIO(p), format="matroska") as c:
        return [pk for pk in c.demux(c.streams.video[0])]
print("segments", len(pieces), "mean bytes", np.mean([len(p) for p in pieces]))
print("spdl demux_video", t(lambda p: spdl.io.demux_video(p)))
print("spdl demux_video webm fmt", t(lambda p: spdl.io.demux_video(p, demux_config=spdl.io.demux_config(format="matroska"))))
print("pyav open+demux", t(pyav))
print("pyav matroska", t(pyav_fmt))
def to_ivf(p):
    out = io.BytesIO()
    with av.open(io.BytesIO(p)) as c, av.open(out, "w", format="ivf") as o:
        s = c.streams.video[0]
        os_ = o.add_stream_from_template(s)
        for pk in c.demux(s):
            if pk.size == 0: continue
            pk.stream = os_
            o.mux(pk)
    return out.getvalue()
ivf = [to_ivf(p) for p in pieces]
print("ivf mean bytes", np.mean([len(p) for p in ivf]))
pieces[:] = ivf
print("spdl demux ivf", t(lambda p: spdl.io.demux_video(p)))
print("spdl demux ivf fmt", t(lambda p: spdl.io.demux_video(p, demux_config=spdl.io.demux_config(format="ivf"))))
def ivf_frames(p):
    b = memoryview(p); hdr = int.from_bytes(b[6:8], "little"); pos = hdr; out = []
    while pos < len(b):
        n = int.from_bytes(b[pos:pos + 4], "little"); out.append(b[pos + 12:pos + 12 + n]); pos += 12 + n
    return out
print("python ivf parse", t(ivf_frames))
print("frames", len(ivf_frames(ivf[0])))
