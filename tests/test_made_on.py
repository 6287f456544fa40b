"""What a sample's bytes depend on besides its seed and settings is kept with it: each samples/ shard's marker
names the device it ran on (the GPU model, or the CPU's torch thread count: 1 and 2 threads differ in the last
bits, memex/sampling.py), the generation summary lists them all (two for a run resumed elsewhere), and the
report says them. It was documented only; a shard's PNGs said nothing about which made them. No Ray:
resources.executor=local."""

from __future__ import annotations

import torch

from memex.layout import RunLayout
from memex.report import _cost
from memex.sampling import made_on
from memex.stages import generate

from conftest import compose


def _threads(n: int) -> str:
    return f"cpu, {n} torch thread{'s' if n != 1 else ''}"


def test_each_shard_keeps_the_device_and_threads_it_ran_on(tiny_models, tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("a red apple\na lighthouse at dusk\n")
    cfg = compose(["model=local", f"model.path={tiny_models['pixel_text']}", "prompts=file", f"prompts.path={p}",
                   f"storage.root={tmp_path / 'runs'}", "resources.executor=local", "sampling.num_inference_steps=2",
                   "sampling.batch_size=4", "sampling.shard_size=4", "sampling.samples_per_prompt=4"])
    name = generate.prepare(cfg)
    layout = RunLayout(cfg.storage.root, name)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert generate.run(cfg, name)["made_on"] == [_threads(1)]
        assert [layout.samples.read_marker(i)["made_on"] for i in layout.samples.complete()] == [_threads(1)] * 2
        # shard 1 lost (its marker deleted: a preempted node) and made again with 2 threads: the summary says both
        layout.store.delete(layout.samples.marker(1))
        torch.set_num_threads(2)
        s = generate.run(cfg, name)
    finally:
        torch.set_num_threads(before)
    assert s["generated_shards"] == 1 and s["made_on"] == [_threads(1), _threads(2)]
    assert layout.samples.read_marker(0)["made_on"] == _threads(1)
    assert layout.samples.read_marker(1)["made_on"] == _threads(2)


def test_markers_written_before_it_was_kept_give_no_entry(tmp_path):
    """A run folder of before: its markers hold the evaluations only, and the summary claims no device."""
    layout = RunLayout(str(tmp_path), "old")
    layout.samples.mark_complete(0, {"unet_evaluations": 8, "padded_evaluations": 0})
    assert generate.unet_work(layout.samples) == {"unet_evaluations": 8, "padded_evaluations": 0}


def test_the_report_names_what_made_the_samples():
    summary = {"unet_evaluations": 16, "samples_made_on": [_threads(1), "cuda, NVIDIA <H100>"]}
    text = _cost(summary)
    assert "Samples made on cpu, 1 torch thread; cuda, NVIDIA &lt;H100&gt;." in text
    assert "made on" not in _cost({"unet_evaluations": 16})
    assert made_on(torch.device("cpu")) == _threads(torch.get_num_threads())
