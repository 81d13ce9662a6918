"""The Kontext engine on its tiny preset: real FluxKontextPipeline code and loaders, random weights."""

import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from assistant import early_filter
from assistant import plugins as host
from assistant.errors import Cancelled, UserError
from assistant.models import EditPlan, EditRequest, WeightsInfo
from assistant.plugins import get_plugin_manager
from assistant.protocols import CandidateEngine
from assistant.settings import Settings
from assistant.testing import BrighterJudge
from plugins.kontext.engine import KontextEngine
from plugins.kontext.loading import artifacts, load_pipeline
from plugins.kontext.options import KontextOptions
from plugins.kontext.presets import build_tiny
from plugins.kontext.sizing import RESOLUTIONS, TINY_SHRINK, working_size
from sessions.identity import encode_png

PLAN = EditPlan(intent="edit", instruction="make it look like winter")


@pytest.fixture(scope="module")
def engine():
    """One tiny engine for the module: its pipeline loads once (every edit is seeded on its own)."""
    return KontextEngine(KontextOptions(preset="tiny"))


def request(photo, **kw):
    return EditRequest(source=photo, plan=PLAN, **{"seed": 5, "steps": 3, "guidance": 2.5} | kw)


def run(engine, req, cancel=None):
    events = []
    result = engine.edit(req, events.append, cancel or threading.Event())
    return result, events


def pixels(img):
    return np.asarray(img, dtype=np.int16)


def test_edit_equals_the_stock_pipeline_at_the_working_size(engine, photo):
    result, _ = run(engine, request(photo, native_size=True))
    width, height = working_size(photo.size, TINY_SHRINK)
    assert (width, height) == result.image.size == (144, 96)
    expected = build_tiny()(
        image=photo.resize((width, height), Image.Resampling.LANCZOS),  # the stock pipeline's own resize
        prompt=PLAN.instruction,
        height=height,
        width=width,
        max_area=height * width,
        _auto_resize=False,  # it would pick a full-size resolution; tiny works at an eighth of each side
        guidance_scale=2.5,
        num_inference_steps=3,
        generator=torch.Generator("cpu").manual_seed(5),
    ).images[0]
    assert result.image.tobytes() == expected.tobytes()
    assert (result.prompt, result.nfe, result.seed, result.random_weights) == (PLAN.instruction, 3, 5, True)
    assert result.extras == {"working_size": "144x96"}


def test_same_seed_same_bytes_other_seed_other_image_at_the_source_size(engine, photo):
    a, _ = run(engine, request(photo))
    b, _ = run(engine, request(photo))
    c, _ = run(engine, request(photo, seed=6))
    assert a.image.size == photo.size == (150, 100)
    assert encode_png(a.image) == encode_png(b.image)
    assert np.abs(pixels(a.image) - pixels(c.image)).mean() > 5


def test_working_size_is_the_trained_resolution_nearest_the_aspect_ratio():
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    assert list(RESOLUTIONS) == PREFERRED_KONTEXT_RESOLUTIONS
    assert [working_size(s) for s in [(150, 100), (100, 150), (640, 640), (4000, 100)]] == [
        (1248, 832),
        (832, 1248),
        (1024, 1024),
        (1568, 672),
    ]
    assert [working_size(s, TINY_SHRINK) for s in [(150, 100), (640, 640), (4000, 100)]] == [
        (144, 96),
        (128, 128),
        (192, 80),
    ]


def test_candidates_batched_resume_to_a_plain_edits_bytes(engine, photo):
    assert isinstance(engine, CandidateEngine)
    req = request(photo, steps=4, early_steps=2)
    batches, events = [], []
    hook = engine.pipeline().transformer.register_forward_hook(
        lambda m, args, kw, out: batches.append(kw["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        started = engine.start_candidates(req, [7, 8, 9], events.append, threading.Event())
        finished = started.finish(1, events.append, threading.Event())
    finally:
        hook.remove()
    assert batches == [3, 3, 1, 1]  # the early steps for all seeds at once, then the winner alone
    assert (finished.seed, finished.nfe) == (8, 3 * 2 + 4 - 2)
    assert [(e.i, e.phase) for e in events if e.phase in ("candidates", "finish")] == [
        (1, "candidates"),
        (2, "candidates"),
        (3, "finish"),
        (4, "finish"),
    ]
    plain, _ = run(engine, request(photo, seed=8, steps=4))
    assert encode_png(finished.image) == encode_png(plain.image)
    assert len(started.previews) == 3 and all(p.size == photo.size for p in started.previews)
    alone = engine.start_candidates(req, [9], lambda e: None, threading.Event())
    assert encode_png(alone.previews[0]) == encode_png(started.previews[2])  # no candidate leaks into another
    assert np.abs(pixels(started.previews[0]) - pixels(started.previews[1])).mean() > 1


def test_progress_per_step_and_cancel_between_steps_returns_nothing(engine, photo):
    _, events = run(engine, request(photo, steps=3))
    assert [(e.i, e.n, e.phase) for e in events] == [
        (0, 3, "load"),
        (0, 3, "encode"),
        (1, 3, "denoise"),
        (2, 3, "denoise"),
        (3, 3, "denoise"),
        (3, 3, "decode"),
    ]
    cancel, seen = threading.Event(), []

    def on_event(event):
        seen.append(event)
        if event.phase == "denoise" and event.i == 2:
            cancel.set()

    with pytest.raises(Cancelled, match="^edit cancelled: nothing was saved$"):
        engine.edit(request(photo, steps=5), on_event, cancel)
    assert [e.i for e in seen if e.phase == "denoise"] == [1, 2]
    assert not any(e.phase == "decode" for e in seen)


def test_bad_input_is_one_line_before_anything_loads(photo):
    with pytest.raises(UserError) as e:
        KontextEngine(KontextOptions(preset="moe"))
    assert str(e.value) == "unknown kontext preset 'moe' (available: default, tiny)"
    with pytest.raises(UserError, match="^unknown kontext preset 'moe'"):
        artifacts(KontextOptions(preset="moe"))
    engine = KontextEngine(KontextOptions(preset="tiny"))
    for instruction in (None, "   "):
        plan = EditPlan(intent="edit", instruction=instruction)
        with pytest.raises(UserError) as e:
            engine.edit(EditRequest(source=photo, plan=plan, seed=1), lambda e: None, threading.Event())
        assert str(e.value) == "the plan has no instruction to edit with"
    assert engine._pipe is None  # refused before the model loaded
    with pytest.raises(UserError, match=r"^--early-steps must be between 1 and --steps - 1 \(2\), not 3$"):
        early_filter.run(
            engine,
            request(photo, early_steps=3, candidates=2),
            BrighterJudge(),
            lambda e: None,
            threading.Event(),
        )
    assert engine._pipe is None  # the host refused it before the engine started


def test_plugin_registers_kontext_and_names_its_weights_without_importing_torch():
    pm = get_plugin_manager()
    added = not pm.has_plugin("plugins.kontext")
    if added:  # until the host lists it among its built-ins
        import plugins.kontext

        pm.register(plugins.kontext, name="plugins.kontext")
    try:
        spec = host.get("engines", "kontext")
        assert isinstance(host.build("engines", "kontext", Settings(preset="tiny")), KontextEngine)
        assert host.call("engines", "kontext", "artifacts", Settings(preset="tiny")) == []
        [model] = host.call("engines", "kontext", "artifacts", Settings(revision="abc"))
        assert (model.role, model.ref, model.revision, model.layout, model.option) == (
            "FLUX.1 Kontext pipeline",
            "black-forest-labs/FLUX.1-Kontext-dev",
            "abc",
            "diffusers",
            "--model",
        )
        assert spec.options is KontextOptions
        described = host.call("engines", "kontext", "describe", Settings(preset="tiny"))
        assert described["model"] == "built in-process (random weights)"
    finally:
        if added:
            pm.unregister(name="plugins.kontext")
    code = (
        "import sys, plugins.kontext as k; from assistant.settings import Settings; s = Settings(); "
        "k.register_engines(lambda spec: (spec.artifacts(s, spec.options()), spec.describe(s, spec.options()))); "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert (proc.returncode, proc.stdout) == (0, "[]\n"), proc.stderr


def test_a_stock_lora_changes_the_edit_and_a_lora_moe_is_refused(engine, photo, tmp_path):
    from diffusers import FluxKontextPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = build_tiny().transformer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer.add_adapter(
            LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v"])
        )
    layers = {k: v * 30 if "lora_B" in k else v for k, v in get_peft_model_state_dict(transformer).items()}
    FluxKontextPipeline.save_lora_weights(tmp_path, transformer_lora_layers=layers, safe_serialization=True)
    adapted_engine = KontextEngine(KontextOptions(preset="tiny", lora=str(tmp_path)))
    adapted, _ = run(adapted_engine, request(photo))
    base, _ = run(engine, request(photo))
    assert (adapted.adapter.kind, adapted.adapter.keys) == ("lora", len(layers))
    assert np.abs(pixels(base.image) - pixels(adapted.image)).mean() > 1
    with pytest.raises(UserError, match="^tiny-moe is a LoRA-MoE adapter .*stock diffusers LoRAs only"):
        load_pipeline(KontextOptions(preset="tiny", lora="tiny-moe"))


def test_a_local_kontext_folder_loads_with_real_weights_flags_and_a_missing_one_is_one_line(tmp_path):
    rng = torch.random.get_rng_state()
    tiny = build_tiny()
    assert torch.equal(torch.random.get_rng_state(), rng)  # seeded on its own, the global RNG untouched
    assert (tiny.transformer.config.in_channels, tiny.transformer.config.guidance_embeds) == (64, True)
    tiny.save_pretrained(tmp_path / "kontext", safe_serialization=True)
    pipe, random_weights, adapter, model = load_pipeline(KontextOptions(model=str(tmp_path / "kontext")))
    assert (type(pipe).__name__, random_weights, adapter) == ("FluxKontextPipeline", False, None)
    assert model == WeightsInfo(source=str(tmp_path / "kontext"), revision=None)  # a folder has no commit
    assert torch.equal(pipe.transformer.x_embedder.weight, build_tiny().transformer.x_embedder.weight)
    with pytest.raises(UserError) as e:
        load_pipeline(KontextOptions(model=str(tmp_path / "nowhere")))
    assert "\n" not in str(e.value) and "--model" in str(e.value)


def test_cli_edits_with_kontext_offline_and_its_early_filter_asks_the_qwen_judge(
    icedit_home, tmp_path, monkeypatch
):
    """`--engine kontext --preset tiny` edits offline; `--candidates 3` runs the host's tournament over kontext's
    previews with the real Qwen2.5-VL judge (a tiny one built from its config), and replay repeats it."""
    import json
    from pathlib import Path

    from click.testing import CliRunner
    from tiny_qwen import save_tiny_qwen

    from assistant.cli import cli

    monkeypatch.chdir(tmp_path)
    vlm = save_tiny_qwen(tmp_path / "vlm")
    args = [
        "edit",
        str(Path(__file__).parent.parent / "examples" / "chelsea.png"),
        "add snow",
        "--engine",
        "kontext",
        "--preset",
        "tiny",
        "--steps",
        "3",
        "--seed",
        "4",
        "--json",
        "--session",
        "k",
    ]
    plain = CliRunner().invoke(cli, [*args, "-o", "plain.png"])
    assert plain.exit_code == 0, plain.output
    data = json.loads(plain.stdout)
    assert (data["engine"], data["seed"], data["nfe"], data["rewriter"]) == ("kontext", 4, 3, "rules")
    filtered = CliRunner().invoke(
        cli,
        [
            *args,
            "-o",
            "best.png",
            "--candidates",
            "3",
            "--early-steps",
            "1",
            "--judge",
            "qwen_vl",
            "--vlm",
            str(vlm),
            "--rewriter",
            "rules",
        ],
    )
    assert filtered.exit_code == 0, filtered.output
    data = json.loads(filtered.stdout)
    assert [c["seed"] for c in data["candidates"]] == [4, 5, 6] and len(data["verdicts"]) == 2
    assert data["nfe"] == 3 * 1 + 3 - 1 and data["seed"] in (4, 5, 6)
    assert all(0 <= v["p"] <= 1 and v["note"] is None for v in data["verdicts"])
    if data["seed"] == 4:  # the winner finished is the picture a plain run of its seed paints
        assert (tmp_path / "best.png").read_bytes() == (tmp_path / "plain.png").read_bytes()
