"""MemoryTracer: byte accounting, the RSS fields of its report, the timeline and its plot."""

from __future__ import annotations

import itertools
import json
import struct
import sys
from pathlib import Path

import pytest
import torch

from accel_zero import memory_plot
from accel_zero.tracer import TIMELINE_ENV, MemoryTracer, TimelineSample, load_timeline

MiB = 2**20
LINUX = sys.platform.startswith("linux") and Path("/proc/self/status").exists()


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(key)


def test_counts_per_kind_and_device_with_peaks() -> None:
    tracer = MemoryTracer()
    t = torch.empty(1000, dtype=torch.float32)
    tracer.add_tensor("params", t)
    tracer.add("gathered_params", "cpu", 8000)
    tracer.sub("gathered_params", torch.device("cpu"), 8000)
    tracer.add("optimizer_state", "nvme", 5000)  # offloaded state: no torch device type
    tracer.add("grads", "nvme:0", 100)
    report = tracer.report()
    cpu, nvme = report["per_device"]["cpu"], report["per_device"]["nvme"]  # type: ignore[index]
    assert cpu["params"] == 4000 and cpu["gathered_params"] == 0
    assert cpu["peak_gathered_params"] == 8000 and cpu["peak_total"] == 12000
    assert nvme["optimizer_state"] == 5000 and nvme["grads"] == 100
    assert report["total_bytes"] == 9100
    assert report["model_state_bytes"] == 9100
    with pytest.raises(AssertionError, match="negative"):
        tracer.sub("grads", "nvme", 101)
    with pytest.raises(RuntimeError):
        tracer.add("params", "not-a-device", 1)


@pytest.mark.skipif(not LINUX, reason="reads /proc (Linux)")
def test_report_rss_fields_match_proc_status() -> None:
    tracer = MemoryTracer()
    held = torch.ones(48 * MiB // 4)  # 48 MiB of real, resident model data
    tracer.add_tensor("params", held)
    tracer.add("optimizer_state", "nvme", 10 * MiB)  # on disk: not part of RSS
    before_rss, before_hwm = _status_bytes("VmRSS"), _status_bytes("VmHWM")
    report = tracer.report()
    after_rss, after_hwm = _status_bytes("VmRSS"), _status_bytes("VmHWM")
    rss, peak = report["rss_bytes"], report["peak_rss_bytes"]
    assert isinstance(rss, int) and isinstance(peak, int)
    slack = 2 * MiB
    assert min(before_rss, after_rss) - slack <= rss <= max(before_rss, after_rss) + slack
    assert before_hwm <= peak <= after_hwm
    # Only host bytes are subtracted; what is left is what the tracer does not explain.
    assert report["tracked_host_bytes"] == 48 * MiB
    assert report["untracked_rss_bytes"] == rss - 48 * MiB
    assert rss >= 48 * MiB  # the traced tensor is really resident
    free = report["allocator_free_bytes"]
    assert free is None or 0 <= free < rss  # glibc: freed heap bytes it still holds
    del held


def test_timeline_off_records_nothing() -> None:
    tracer = MemoryTracer()
    if tracer.recording:
        pytest.skip(f"{TIMELINE_ENV} is set in this environment")
    tracer.add("params", "cpu", 10)
    tracer.mark("forward", "0")
    assert tracer.timeline() == []


def test_timeline_samples_bytes_and_rss() -> None:
    tracer = MemoryTracer()
    tracer.record_timeline()
    tracer.mark("start")
    tracer.add("params", "cpu", 3 * MiB)
    tracer.add("gathered_params", "cpu", 5 * MiB)
    tracer.mark("gather", "h.0")
    tracer.sub("gathered_params", "cpu", 5 * MiB)
    tracer.add("optimizer_state", "nvme", 7 * MiB)
    tracer.mark("release", "h.0")
    tracer.record_timeline(False)
    tracer.mark("ignored")
    samples = tracer.timeline()
    assert [s.event for s in samples] == ["start", "gather", "release"]
    assert samples[0].bytes == {}
    assert samples[1].bytes == {"cpu": {"params": 3 * MiB, "gathered_params": 5 * MiB}}
    assert samples[2].bytes == {"cpu": {"params": 3 * MiB}, "nvme": {"optimizer_state": 7 * MiB}}
    assert samples[1].detail == "h.0"
    assert all(b.t >= a.t for a, b in itertools.pairwise(samples))
    if LINUX:
        assert all(s.rss_bytes > 0 for s in samples)


def test_timeline_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TIMELINE_ENV, "1")
    assert MemoryTracer().recording
    monkeypatch.setenv(TIMELINE_ENV, "0")
    assert not MemoryTracer().recording


def test_timeline_is_bounded() -> None:
    tracer = MemoryTracer(max_samples=3)
    tracer.record_timeline()
    for i in range(5):
        tracer.mark("step", str(i))
    assert [s.detail for s in tracer.timeline()] == ["0", "1", "2"]


def test_timeline_json_round_trip(tmp_path: Path) -> None:
    tracer = MemoryTracer()
    tracer.record_timeline()
    tracer.add("params", "cpu", 1234)
    tracer.mark("prepare")
    tracer.mark("forward", "0")
    path = tracer.save_timeline(tmp_path / "sub" / "t.json", meta={"rank": 1, "world_size": 2})
    meta, samples = load_timeline(path)
    assert meta["rank"] == 1 and meta["world_size"] == 2
    assert samples == tracer.timeline()
    data = json.loads(path.read_text())
    assert data["format"] == "accel_zero.memory_timeline"
    (tmp_path / "other.json").write_text(json.dumps({"samples": []}))
    with pytest.raises(ValueError, match=r"other\.json: not an accel_zero memory timeline"):
        load_timeline(tmp_path / "other.json")


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def _synthetic_timeline() -> list[TimelineSample]:
    """Two steps of a 2-unit ZeRO-3 run, with per-unit gathers between the phases."""
    samples = []
    t = 0.0
    params = {"cpu": {"params": 50 * MiB}}

    def add(event: str, detail: str = "", gathered: int = 0, opt: int = 0, rss: int = 0) -> None:
        nonlocal t
        t += 0.5
        cpu = dict(params["cpu"])
        if gathered:
            cpu["gathered_params"] = gathered
        if opt:
            cpu["optimizer_state"] = opt
        samples.append(
            TimelineSample(t=t, event=event, detail=detail, rss_bytes=rss, bytes={"cpu": cpu})
        )

    add("prepare", rss=300 * MiB)
    for step in range(2):
        for unit in ("h.0", "h.1"):
            add("gather", unit, gathered=20 * MiB, opt=100 * MiB * step, rss=360 * MiB)
            add("release", unit, opt=100 * MiB * step, rss=350 * MiB)
        add("forward", str(step), opt=100 * MiB * step, rss=380 * MiB)
        add("backward", str(step), opt=100 * MiB * step, rss=420 * MiB)
        add("step", str(step), opt=100 * MiB, rss=470 * MiB)
    return samples


def test_memory_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "t.json"
    # The file format, written by hand: a recorded run without running one.
    payload = {
        "format": "accel_zero.memory_timeline",
        "version": 1,
        "meta": {"run": "test run", "rank": 0, "world_size": 2},
        "samples": [s.to_json() for s in _synthetic_timeline()],
    }
    path.write_text(json.dumps(payload))
    png = memory_plot.plot_timeline_file(path)
    assert png == tmp_path / "t.png"
    width, height = _png_size(png)
    assert width > 800 and height > 300
    # A timeline with a device besides the host gets a second panel (taller figure).
    two = [*_synthetic_timeline()]
    two.append(
        TimelineSample(t=99.0, event="step", detail="", rss_bytes=0, bytes={"cuda": {"params": 1}})
    )
    png2 = memory_plot.plot_timeline(two, tmp_path / "two.png", title="two devices")
    assert _png_size(png2)[1] > height


def test_memory_plot_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    import argparse

    parser = argparse.ArgumentParser()
    memory_plot.add_arguments(parser)
    empty = MemoryTracer()
    empty.save_timeline(tmp_path / "empty.json")
    args = parser.parse_args([str(tmp_path / "empty.json")])
    with pytest.raises(SystemExit, match="no samples"):
        memory_plot.main(args)
    tracer = MemoryTracer()
    tracer.record_timeline()
    tracer.add("params", "cpu", MiB)
    tracer.mark("prepare")
    tracer.mark("forward", "0")
    tracer.save_timeline(tmp_path / "run.json")
    args = parser.parse_args([str(tmp_path / "run.json"), "-o", str(tmp_path / "out.png")])
    assert memory_plot.main(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out.png")
    _png_size(tmp_path / "out.png")
