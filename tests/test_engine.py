"""The ICEdit engine on the tiny preset: real FluxFillPipeline code, real loaders, random weights."""

import threading

import numpy as np
import pytest
import torch

from assistant.errors import Cancelled, UserError, WeightsMissing
from assistant.models import EditPlan, EditRequest
from plugins.icedit.diptych import make_diptych, right_panel
from plugins.icedit.engine import IceditEngine
from plugins.icedit.options import IceditOptions
from plugins.icedit.presets import build_tiny

PLAN = EditPlan(intent="edit", instruction="make it look like winter")


def request(photo, **kw):
    return EditRequest(source=photo, plan=PLAN, **{"seed": 5, "steps": 3} | kw)


def run(engine, req, cancel=None):
    events = []
    result = engine.edit(req, events.append, cancel or threading.Event())
    return result, events


def pixels(img):
    return np.asarray(img, dtype=np.int16)


def test_edit_is_the_right_half_of_the_stock_pipeline_on_the_diptych(photo):
    result, _ = run(IceditEngine(IceditOptions(preset="tiny")), request(photo, native_size=True))
    canvas, mask = make_diptych(photo)
    expected = build_tiny()(
        prompt=result.prompt,
        image=canvas,
        mask_image=mask,
        height=canvas.height,
        width=canvas.width,
        guidance_scale=50.0,
        num_inference_steps=3,
        generator=torch.Generator("cpu").manual_seed(5),
    ).images[0]
    assert result.prompt.endswith("exactly the same as on the left but make it look like winter")
    assert result.image.tobytes() == right_panel(expected).tobytes()
    assert result.image.size == (512, 336)
    assert (result.nfe, result.seed, result.random_weights) == (3, 5, True)


def test_same_seed_same_image_other_seed_other_image_and_source_size_kept(photo):
    engine = IceditEngine(IceditOptions(preset="tiny"))
    a, _ = run(engine, request(photo))
    b, _ = run(engine, request(photo))
    c, _ = run(engine, request(photo, seed=6))
    assert a.image.size == photo.size == (150, 100)
    assert a.image.tobytes() == b.image.tobytes()
    assert np.abs(pixels(a.image) - pixels(c.image)).mean() > 5


def test_one_progress_event_per_step_and_cancel_between_steps(photo):
    engine = IceditEngine(IceditOptions(preset="tiny"))
    _, events = run(engine, request(photo, steps=4))
    assert [(e.i, e.n) for e in events if e.phase == "denoise"] == [(1, 4), (2, 4), (3, 4), (4, 4)]

    cancel = threading.Event()
    seen = []

    def stop_after_two(event):
        seen.append(event)
        if event.phase == "denoise" and event.i == 2:
            cancel.set()

    with pytest.raises(Cancelled, match="nothing was saved"):
        engine.edit(request(photo, steps=6), stop_after_two, cancel)
    assert max(e.i for e in seen if e.phase == "denoise") == 2


def test_a_pipeline_folder_loads_through_from_pretrained(photo, tmp_path):
    build_tiny().save_pretrained(tmp_path / "flux")
    loaded, _ = run(IceditEngine(IceditOptions(model=str(tmp_path / "flux"), lora="none")), request(photo))
    tiny, _ = run(IceditEngine(IceditOptions(preset="tiny")), request(photo))
    # Same weights, same pixels up to float summation order (weights reloaded from safetensors):
    # at most 1/255 anywhere, while another seed moves the mean by > 5 (test above).
    diff = np.abs(pixels(loaded.image) - pixels(tiny.image))
    assert diff.max() <= 1 and diff.mean() < 0.05
    assert loaded.random_weights is False  # a folder is somebody's weights; we can't tell they're random


def test_a_stock_diffusers_lora_file_changes_the_edit(photo, tmp_path):
    from diffusers import FluxFillPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = build_tiny()
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v"])
    pipe.transformer.add_adapter(config)
    layers = {
        k: v * 30 if "lora_B" in k else v for k, v in get_peft_model_state_dict(pipe.transformer).items()
    }
    FluxFillPipeline.save_lora_weights(tmp_path, transformer_lora_layers=layers, safe_serialization=True)
    base, _ = run(IceditEngine(IceditOptions(preset="tiny")), request(photo))
    adapted, _ = run(
        IceditEngine(IceditOptions(preset="tiny", lora=str(tmp_path / "pytorch_lora_weights.safetensors"))),
        request(photo),
    )
    assert np.abs(pixels(base.image) - pixels(adapted.image)).mean() > 1


def test_missing_weights_are_one_line_naming_what_to_get(photo, tmp_path):
    with pytest.raises(UserError, match="no model_index.json"):
        run(IceditEngine(IceditOptions(model=str(tmp_path))), request(photo))
    with pytest.raises(UserError, match=r"LoRA '.*nope\.safetensors' \(--lora\): no such file or folder"):
        run(
            IceditEngine(IceditOptions(preset="tiny", lora=str(tmp_path / "nope.safetensors"))),
            request(photo),
        )
    with pytest.raises(WeightsMissing) as e:
        run(IceditEngine(IceditOptions(preset="tiny", lora="nobody/no-such-lora")), request(photo))
    assert "\n" not in str(e.value) and "hf download nobody/no-such-lora" in str(e.value)


def test_tiny_moe_adapter_runs_end_to_end_and_top_k_and_scale_matter(photo):
    def edit(**kw):
        engine = IceditEngine(IceditOptions(preset="tiny", **kw))
        return run(engine, request(photo))[0]

    plain = edit()
    moe = edit(lora="tiny-moe")
    assert moe.adapter.kind == "lora-moe" and moe.adapter.num_experts == 4 and moe.adapter.top_k == 1
    assert plain.adapter is None
    assert np.abs(pixels(plain.image) - pixels(moe.image)).mean() > 1
    assert np.abs(pixels(moe.image) - pixels(edit(lora="tiny-moe", top_k=2).image)).mean() > 0.2
    off = edit(lora="tiny-moe", lora_scale=0.0)
    assert np.abs(pixels(plain.image) - pixels(off.image)).max() <= 1


def test_a_repeated_prompt_skips_the_text_encoders_and_paints_the_same(photo):
    engine = IceditEngine(IceditOptions(preset="tiny"))
    calls = []
    engine.pipeline().text_encoder_2.register_forward_hook(lambda *_: calls.append(1))
    run(engine, request(photo))
    again, _ = run(engine, request(photo, seed=6))  # another seed: the same prompt
    assert len(calls) == 1
    assert (
        again.image.tobytes()
        == run(IceditEngine(IceditOptions(preset="tiny")), request(photo, seed=6))[0].image.tobytes()
    )
    other = EditPlan(intent="edit", instruction="make it night")
    run(engine, EditRequest(source=photo, plan=other, seed=5, steps=3))
    assert len(calls) == 2


def test_the_prompt_cache_keeps_the_latest_prompts():
    from plugins.icedit.sampler import PromptCache

    class Pipe:
        def encode_prompt(self, prompt, prompt_2, device, max_sequence_length=512):
            calls.append(prompt)
            return (torch.tensor([len(calls)]),)

    calls, cache, pipe = [], PromptCache(size=2), Pipe()
    for prompt in ["a", "b", "a", "c", "a", "b"]:
        cache.encode(pipe, prompt, torch.device("cpu"))
    assert calls == ["a", "b", "c", "b"]  # "b" fell out when "c" came; "a" stayed, used most recently
    uncached = PromptCache(size=0)
    uncached.encode(pipe, "a", torch.device("cpu"))
    uncached.encode(pipe, "a", torch.device("cpu"))
    assert calls[4:] == ["a", "a"]


@pytest.mark.parametrize("mode", ["encoders", "model", "sequential"])
def test_offload_needs_a_gpu(photo, mode):
    with pytest.raises(
        UserError, match=f"--offload {mode} moves weights between the CPU and a GPU; there is no GPU"
    ):
        run(IceditEngine(IceditOptions(preset="tiny", offload=mode, device="cpu")), request(photo))


def test_offload_encoders_keeps_the_prompt_encoders_on_the_cpu(monkeypatch):
    from plugins.icedit.loading import place

    pipe, moved = build_tiny(), {}
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        monkeypatch.setattr(
            getattr(pipe, name), "to", lambda device, name=name: moved.setdefault(name, device)
        )
    place(pipe, "cuda:1", "encoders")  # no GPU needed: where each part is sent is the behaviour
    assert moved == {"transformer": "cuda:1", "vae": "cuda:1", "text_encoder": "cpu", "text_encoder_2": "cpu"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offload_encoders_paints_what_the_gpu_alone_paints(photo):
    kw = {"preset": "tiny", "device": "cuda", "dtype": "float32"}
    on_gpu = run(IceditEngine(IceditOptions(**kw)), request(photo))[0]
    engine = IceditEngine(IceditOptions(**kw, offload="encoders"))
    split = run(engine, request(photo))[0]
    pipe = engine.pipeline()
    assert (pipe.text_encoder_2.device.type, pipe.transformer.device.type, pipe.vae.device.type) == (
        "cpu",
        "cuda",
        "cuda",
    )
    assert np.abs(pixels(split.image) - pixels(on_gpu.image)).mean() < 1


def test_layer_by_layer_offload_hooks_stream_the_moe_layers_too(photo):
    """`--offload sequential` is accelerate's hooks on every module with weights of its own; the
    LoRA-MoE layer has its experts and a child Linear. Streamed from `meta`, it paints the same."""
    from accelerate import cpu_offload

    from plugins.icedit.moe import LoraMoeLinear

    engine = IceditEngine(IceditOptions(preset="tiny", lora="tiny-moe"))
    plain = run(engine, request(photo))[0]
    cpu_offload(engine.pipeline().transformer, torch.device("cpu"))
    layer = next(m for m in engine.pipeline().transformer.modules() if isinstance(m, LoraMoeLinear))
    assert layer.lora_A.device.type == layer.base.weight.device.type == "meta"
    assert run(engine, request(photo))[0].image.tobytes() == plain.image.tobytes()


def test_int8_quantized_transformer_runs_and_stays_close(photo):
    pytest.importorskip("torchao")
    plain = run(IceditEngine(IceditOptions(preset="tiny", lora="tiny-moe")), request(photo))[0]
    engine = IceditEngine(IceditOptions(preset="tiny", lora="tiny-moe", quantize="int8"))
    quantized = run(engine, request(photo))[0]
    weight = engine.pipeline().transformer.transformer_blocks[0].ff.net[2].base.weight
    assert type(weight).__name__ == "Int8Tensor"  # the base layer is quantized ...
    assert type(engine.pipeline().transformer.transformer_blocks[0].ff.net[2].lora_A) is torch.nn.Parameter
    diff = np.abs(pixels(plain.image) - pixels(quantized.image))
    assert 0 < diff.mean() < 8  # ... so the picture moves a little, not a lot


def test_fp8_needs_a_recent_gpu(photo):
    pytest.importorskip("torchao")
    with pytest.raises(UserError, match="compute capability 8.9"):
        run(IceditEngine(IceditOptions(preset="tiny", quantize="fp8")), request(photo))


def test_compile_wraps_the_transformer_for_the_first_step(photo):
    engine = IceditEngine(IceditOptions(preset="tiny", compile=True))
    transformer = engine.pipeline().transformer
    assert transformer._compiled_call_impl is not None  # compiled lazily, at its first call
    assert IceditEngine(IceditOptions(preset="tiny")).pipeline().transformer._compiled_call_impl is None
