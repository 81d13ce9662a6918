"""The memory planner: sizes from the real architectures (built on meta), plans for GPUs of each size."""

import json
import time

import pytest

from assistant import plugins
from assistant.memory import HEADROOM, GiB, Part, Placement, gpu_capacity, plan_for, plan_memory
from assistant.settings import Settings
from plugins.icedit import memory as flux_memory
from plugins.qwen_vl import memory as vlm_memory

CHAT = Settings(preset="default", rewriter="qwen_vl")  # real weights, the VLM rewrites: a whole chat turn
SIZES = [16, 24, 48, 80]
FULL_GPU = {"device": "cuda", "offload": "none", "quantize": "none"}


def flux_parts(settings: Settings) -> list[Part]:
    """The engine's parts as the host asks for them (its options from the settings)."""
    return plugins.call("engines", "icedit", "memory", settings)


def vlm_parts(settings: Settings) -> list[Part]:
    return plugins.call("rewriters", "qwen_vl", "memory", settings)


def components(settings: Settings):
    return flux_memory.components(settings, plugins.options_for("engines", "icedit", settings))


def option_values(settings: Settings, keys) -> dict:
    """Each key as the plugin declaring it reads it from these settings (the engine's, else the VLM's)."""
    found = {}
    for kind, name in (("engines", "icedit"), ("rewriters", "qwen_vl")):
        given = plugins.options_for(kind, name, settings)
        found |= {k: getattr(given, k) for k in keys if k in type(given).model_fields}
    return found


def chat_parts(settings: Settings = CHAT) -> list[Part]:
    return flux_parts(settings) + vlm_parts(settings)


def cost(plan) -> float:
    return sum(c.cost for c in plan.choices.values())


def test_sizes_from_meta_match_the_published_models():
    start = time.perf_counter()
    flux = flux_memory.sizes()
    seconds = time.perf_counter() - start
    published = {"transformer": 11.90e9, "text_encoder_2": 4.762e9, "text_encoder": 123.1e6, "vae": 83.8e6}
    for name, params in published.items():
        assert flux[name].params == pytest.approx(params, rel=0.01), name
    assert flux["transformer"].quantizable / flux["transformer"].params > 0.99  # nearly all in Linear weights
    assert vlm_memory.size("Qwen/Qwen2.5-VL-7B-Instruct").params == pytest.approx(8.29e9, rel=0.01)
    assert vlm_memory.size("Qwen/Qwen2.5-VL-3B-Instruct").params == pytest.approx(3.75e9, rel=0.01)
    start = time.perf_counter()
    assert flux_memory.sizes() is flux  # memoised: built once per process
    assert time.perf_counter() - start < seconds / 10 + 0.01


def test_the_estimates_agree_with_icedit_s_published_figures():
    """~35 GB with everything on the GPU, 24 GB with model offload (ICEdit's README, FLUX alone)."""
    options = {o.label: o for o in flux_parts(CHAT)[0].options}
    everything = options["bf16 on the GPU"]
    assert 33e9 < everything.resident_gpu + everything.activation_gpu < 37e9
    offload = options["bf16, model offload"]
    assert 23e9 < offload.resident_gpu + offload.transient_gpu + offload.activation_gpu < 26e9


def test_components_follow_the_settings():
    bf16 = components(CHAT)
    assert set(bf16) == {"transformer", "text_encoder", "text_encoder_2", "vae"}
    fp32 = components(CHAT.with_options(dtype="float32", lora="none"))
    assert fp32["text_encoder_2"].weights == 2 * bf16["text_encoder_2"].weights
    int8 = components(CHAT.with_options(quantize="int8"))["transformer"]
    assert 0.45 < int8.weights / bf16["transformer"].weights < 0.55  # 1 byte a weight, the adapter in bf16
    four = components(CHAT.model_copy(update={"candidates": 4}))
    assert four["transformer"].activation == pytest.approx(4 * bf16["transformer"].activation, rel=1e-6)


@pytest.mark.parametrize("capability", [(8, 9), (8, 0)])
@pytest.mark.parametrize("gib", SIZES)
def test_each_plan_fits_its_gpu(gib, capability):
    plan = plan_memory(chat_parts(), gib * GiB, capability=capability)
    assert plan.fits
    assert plan.usable == int(gib * GiB * (1 - HEADROOM))
    assert plan.estimated_peak <= plan.usable
    assert all(c.requires is None or c.requires <= capability for c in plan.choices.values())
    settings = Settings(**plan.settings_update())
    assert option_values(settings, plan.settings_update()) == plan.settings_update()
    assert json.loads(json.dumps(plan.model_dump()))["usable"] == plan.usable
    assert plan.explain().startswith(f"{gib} GiB GPU: FLUX.1 Fill ")
    assert f"peak ~{plan.estimated_peak / GiB:.1f} GiB" in plan.explain()


@pytest.mark.parametrize("gib", [80, 141])
def test_a_large_gpu_holds_everything_unquantized(gib):
    plan = plan_memory(chat_parts(), gib * GiB, capability=(9, 0))
    assert plan.choices["flux"].settings == FULL_GPU
    assert plan.choices["vlm"].settings == {"vlm_device": "cuda"}
    assert plan.settings_update() == FULL_GPU | {"vlm_device": "cuda"}


def test_fp8_only_where_the_gpu_runs_it():
    newer = plan_memory(chat_parts(), 48 * GiB, capability=(8, 9))
    older = plan_memory(chat_parts(), 48 * GiB, capability=(8, 0))
    assert newer.choices["flux"].settings["quantize"] == "fp8"
    assert older.choices["flux"].settings["quantize"] == "int8"
    assert cost(newer) < cost(older)


@pytest.mark.parametrize("capability", [(8, 9), (8, 0)])
def test_a_bigger_gpu_never_gets_a_slower_plan(capability):
    plans = [plan_memory(chat_parts(), gib * GiB, capability=capability) for gib in range(2, 161, 2)]
    costs = [cost(p) for p in plans]
    assert costs == sorted(costs, reverse=True)
    assert costs[0] > 10 * costs[-1]  # from streaming every layer to everything resident
    assert all(p.fits and p.estimated_peak <= p.usable for p in plans)


def test_at_24_gib_the_7b_goes_to_the_cpu_and_the_3b_is_offered():
    plan = plan_memory(chat_parts(), 24 * GiB, capability=(8, 9))
    assert plan.choices["vlm"].settings == {"vlm_device": "cpu"}
    assert plan.choices["flux"].on_gpu
    assert plan.remarks["vlm"].endswith("; Qwen2.5-VL-3B would")
    offer = next(n for n in plan.notes if n.startswith("Qwen2.5-VL-3B ("))
    assert "7.0 GiB" in offer and offer.endswith("--vlm Qwen/Qwen2.5-VL-3B-Instruct")
    assert "Qwen2.5-VL-7B fp32 on the CPU (" in plan.explain()
    smaller = CHAT.with_options(vlm="Qwen/Qwen2.5-VL-3B-Instruct")
    with_3b = plan_memory(chat_parts(smaller), 24 * GiB, capability=(8, 9))
    assert with_3b.fits and with_3b.choices["vlm"].settings == {"vlm_device": "cuda"}  # the offer holds


def test_the_3b_is_offered_only_where_it_would_run_on_the_gpu():
    plan = plan_memory(chat_parts(), 16 * GiB, capability=(8, 9))
    assert plan.choices["vlm"].settings == {"vlm_device": "cpu"}
    assert plan.remarks["vlm"] == "does not fit beside FLUX.1 Fill"
    assert not any("--vlm" in n for n in plan.notes)


def test_only_the_7b_has_the_3b_as_an_alternative():
    [seven] = vlm_parts(CHAT)
    assert seven.title == "Qwen2.5-VL-7B"
    assert [a.title for a in seven.alternatives] == ["Qwen2.5-VL-3B"]
    [three] = vlm_parts(CHAT.with_options(vlm="Qwen/Qwen2.5-VL-3B-Instruct"))
    assert three.title == "Qwen2.5-VL-3B" and three.alternatives == []
    assert three.weights == seven.alternatives[0].weights < seven.weights / 2


def test_a_local_folder_is_sized_from_its_own_config(tmp_path):
    config = vlm_memory.CONFIGS["Qwen/Qwen2.5-VL-3B-Instruct"] | {"num_hidden_layers": 18}
    (tmp_path / "config.json").write_text(json.dumps(config))
    [part] = vlm_parts(CHAT.with_options(vlm=str(tmp_path)))
    assert part.title == "Qwen2.5-VL-3B"
    full, half = vlm_memory.size("Qwen/Qwen2.5-VL-3B-Instruct"), vlm_memory.size(str(tmp_path))
    assert half.layers == 18 and half.params < full.params - 1e9


def test_forced_settings_are_kept_even_when_they_do_not_fit():
    forced = {"offload": "none", "quantize": "none"}
    plan = plan_memory(chat_parts(), 24 * GiB, forced=forced, capability=(8, 9))
    assert plan.choices["flux"].settings == FULL_GPU  # on the GPU as asked, not moved to the CPU
    assert not plan.fits and plan.estimated_peak > plan.usable
    assert plan.notes[0].startswith("the settings given (offload=none, quantize=none) need ~")
    assert "expect out-of-memory errors" in plan.notes[0]
    assert plan.explain().endswith(f", over the {plan.usable / GiB:.1f} GiB usable")
    assert plugins.option("engines", "icedit", "offload", Settings(**plan.settings_update())) == "none"


def test_forced_settings_steer_the_other_parts():
    plan = plan_memory(chat_parts(), 24 * GiB, forced={"vlm_device": "cuda"}, capability=(8, 9))
    assert plan.fits and plan.choices["vlm"].settings == {"vlm_device": "cuda"}
    assert plan.choices["flux"].settings["offload"] == "sequential"  # the only FLUX placement beside it
    forced = {"vlm_device": "cpu", "device": "cuda:1"}
    plan = plan_memory(chat_parts(), 80 * GiB, forced=forced, capability=(8, 9))
    assert plan.choices["vlm"].settings == {"vlm_device": "cpu"}
    assert plan.settings_update() == FULL_GPU | {"device": "cuda:1", "vlm_device": "cpu"}


def test_a_forced_fp8_on_an_older_gpu_is_kept_with_a_warning():
    plan = plan_memory(chat_parts(), 48 * GiB, forced={"quantize": "fp8"}, capability=(8, 0))
    assert plan.choices["flux"].settings["quantize"] == "fp8"
    assert any("needs CUDA compute capability 8.9 (this GPU: 8.0)" in n for n in plan.notes)


def test_without_a_gpu_everything_runs_on_the_cpu():
    plan = plan_memory(chat_parts(), None)
    assert plan.fits and plan.capacity is None and plan.usable is None
    assert not any(c.on_gpu for c in plan.choices.values())
    assert plan.settings_update() == {
        "device": "cpu",
        "offload": "none",
        "quantize": "none",
        "vlm_device": "cpu",
    }
    assert plan.notes[0] == "no CUDA GPU: every model runs on the CPU, slowly"
    assert plan.explain() == "no GPU: FLUX.1 Fill fp32 on the CPU; Qwen2.5-VL-7B fp32 on the CPU"
    Settings(**plan.settings_update())
    forced = plan_memory(chat_parts(), None, forced={"offload": "model"})
    assert not forced.fits and forced.choices["flux"].settings["offload"] == "model"
    assert any("needs a CUDA GPU" in n for n in forced.notes)


def test_plan_for_a_named_size_and_for_this_machine():
    assert plan_for(chat_parts(), 24) == plan_memory(chat_parts(), 24 * GiB, capability=(8, 9))
    assert plan_for(chat_parts(), 48, capability=(8, 0)).choices["flux"].settings["quantize"] == "int8"
    capacity, capability = gpu_capacity()
    here = plan_for(chat_parts())
    assert here.capacity == capacity
    assert here == plan_memory(chat_parts(), capacity, capability=capability)


def test_parts_only_for_what_the_settings_load():
    assert flux_parts(Settings(preset="tiny")) == []
    assert vlm_parts(CHAT.with_options(vlm="none")) == []
    assert vlm_parts(CHAT.model_copy(update={"rewriter": "rules", "candidates": 1})) == []
    [judge_only] = vlm_parts(CHAT.model_copy(update={"rewriter": "rules", "candidates": 4}))
    [rewrite] = vlm_parts(CHAT)
    assert judge_only.options[0].activation_gpu > rewrite.options[0].activation_gpu  # 2 x 3 images at once


def test_the_peak_is_the_residents_plus_the_busiest_phase():
    def part(name, *options):
        return Part(name=name, title=name.upper(), weights=0, options=list(options))

    a = part(
        "a",
        Placement(label="on", resident_gpu=10 * GiB, activation_gpu=2 * GiB, cost=1),
        Placement(label="off", cpu=10 * GiB, cost=5),
    )
    b = part(
        "b",
        Placement(label="swapped", resident_gpu=GiB, transient_gpu=6 * GiB, activation_gpu=GiB, cost=2),
        Placement(label="fast", resident_gpu=7 * GiB, activation_gpu=GiB, cost=1, requires=(9, 0)),
    )

    def labels(plan):
        return [c.label for c in plan.choices.values()]

    plan = plan_memory([a, b], 30 * GiB, headroom=0.1, capability=(9, 0))
    assert plan.estimated_peak == 19 * GiB and labels(plan) == ["on", "fast"]  # 10 + 7 resident, then a's 2
    plan = plan_memory([a, b], 30 * GiB, headroom=0.1, capability=(8, 0))  # "fast" needs 9.0
    assert plan.estimated_peak == 18 * GiB and labels(plan) == ["on", "swapped"]  # 10 + 1, then b's 6 + 1
    plan = plan_memory([a, b], 20 * GiB, headroom=0.1, capability=(9, 0))  # 18 usable: 19 does not fit
    assert plan.estimated_peak == 18 * GiB and labels(plan) == ["on", "swapped"]
    plan = plan_memory([a, b], 15 * GiB, headroom=0.1, capability=(9, 0))  # 13.5 usable
    assert plan.estimated_peak == 8 * GiB and labels(plan) == ["off", "fast"]
    assert plan.remarks == {"a": "does not fit beside B"}
