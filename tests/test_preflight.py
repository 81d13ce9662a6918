"""What a command needs before anything loads: the artifacts of each part, the default rewriter, the
memory plan applied on a GPU (simulated capacities) with the person's own settings kept."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from assistant import plugins, preflight
from assistant.cli import cli
from assistant.errors import UserError
from assistant.memory import GiB
from assistant.settings import Settings
from plugins.icedit.presets import build_tiny


def refs(artifacts):
    return [(a.role, a.ref, a.required) for a in artifacts]


def test_real_weights_make_the_vlm_the_default_rewriter_and_its_weights_optional():
    settings = Settings()
    assert preflight.rewriter_name(settings) == "qwen_vl"
    assert refs(preflight.needs(settings)) == [
        ("FLUX.1 Fill pipeline", "black-forest-labs/FLUX.1-Fill-dev", True),
        ("LoRA", "RiverZ/normal-lora", True),
        ("VLM", "Qwen/Qwen2.5-VL-7B-Instruct", False),
    ]
    chosen = Settings(rewriter="qwen_vl", preset="moe")
    assert refs(preflight.needs(chosen)) == [
        ("FLUX.1 Fill pipeline", "black-forest-labs/FLUX.1-Fill-dev", True),
        ("LoRA", "sanaka87/ICEdit-MoE-LoRA", True),
        ("VLM", "Qwen/Qwen2.5-VL-7B-Instruct", True),
    ]


@pytest.mark.parametrize(
    "kw",
    [
        {"preset": "tiny"},
        {"preset": "tiny", "lora": "tiny-moe"},
        {"preset": "tiny", "lora": "someone/adapter"},
    ],
)
def test_random_weights_keep_the_rules_rewriter_even_with_an_adapter(kw):
    settings = Settings(**kw)
    assert preflight.rewriter_name(settings) == "rules"
    assert all(a.role == "LoRA" for a in preflight.needs(settings))


def test_the_judge_is_needed_when_the_early_filter_runs_and_shares_the_rewriters_vlm():
    assert refs(preflight.needs(Settings(preset="tiny", candidates=3, vlm="someone/vlm"))) == [
        ("VLM", "someone/vlm", True)
    ]
    assert preflight.needs(Settings(preset="tiny", candidates=1, vlm="someone/vlm")) == []
    assert preflight.needs(Settings(preset="tiny", candidates=3, vlm="none")) == []


def test_a_training_run_folder_gives_its_adapter_and_a_weight_name_is_honoured(tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (lora,) = preflight.needs(Settings(preset="tiny", lora=str(run)))
    assert (lora.ref, lora.filename) == (str(run / "adapter"), "pytorch_lora_weights.safetensors")
    (named,) = preflight.needs(
        Settings(preset="tiny", lora="someone/lora", lora_weight_name="edit.safetensors")
    )
    assert (named.ref, named.filename, named.layout) == ("someone/lora", "edit.safetensors", "file")


@pytest.fixture
def flux_folder(tmp_path):
    folder = tmp_path / "flux"
    build_tiny().save_pretrained(folder)
    return folder


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA GPU of the given GiB as far as the planner can tell (torch says so; its size is given)."""
    import torch

    def lend(gib: float) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr("assistant.memory.gpu_capacity", lambda device=None: (int(gib * GiB), (8, 9)))

    return lend


@pytest.fixture(autouse=True)
def empty_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.mark.parametrize("gib", [16, 24, 48, 80])
def test_on_a_gpu_the_plan_places_the_models_and_keeps_what_the_person_set(flux_folder, gpu, gib):
    gpu(gib)
    prepared = preflight.prepare(
        Settings(model=str(flux_folder), lora="none", rewriter="qwen_vl", vlm="none")
    )
    assert prepared.plan is not None and prepared.plan.fits
    assert prepared.plan.estimated_peak <= gib * GiB * (1 - prepared.plan.headroom)
    s = plugins.options_for("engines", "icedit", prepared.settings)
    if gib >= 48:  # FLUX.1 Fill alone (no VLM here) fits whole in bf16: ~36 GiB
        assert (s.device, s.offload, s.quantize) == ("cuda", "none", "none")
    else:
        assert s.quantize != "none" or s.offload != "none"
    forced = preflight.prepare(
        Settings(
            model=str(flux_folder),
            lora="none",
            rewriter="rules",
            vlm="none",
            offload="none",
            quantize="none",
            steps=3,
        )
    )
    given = plugins.options_for("engines", "icedit", forced.settings)
    assert (given.offload, given.quantize) == ("none", "none")
    assert forced.plan.forced == {"offload": "none", "quantize": "none"}  # placements only, not steps or home
    assert forced.plan.fits == (gib >= 48)
    if not forced.plan.fits:
        assert "expect out-of-memory errors" in forced.notes[0]


def test_without_a_gpu_or_with_the_engine_sent_to_the_cpu_nothing_is_planned_or_changed(flux_folder, gpu):
    settings = Settings(model=str(flux_folder), lora="none", rewriter="rules")
    prepared = preflight.prepare(settings)  # this machine: no CUDA
    assert prepared.plan is None and prepared.settings == settings
    gpu(24)
    on_cpu = Settings(model=str(flux_folder), lora="none", rewriter="rules", device="cpu")
    prepared = preflight.prepare(on_cpu)
    assert prepared.plan is None and prepared.settings == on_cpu
    assert preflight.memory_plan(on_cpu).capacity is None  # icedit models --device cpu: the CPU's plan


def test_a_command_without_the_engine_plans_the_vlm_alone(gpu):
    gpu(24)
    alone = preflight.memory_plan(Settings(rewriter="qwen_vl"), engine=False, judge=False)
    assert set(alone.choices) == {"vlm"} and alone.choices["vlm"].on_gpu  # 7B fits a 24 GiB GPU by itself
    both = preflight.memory_plan(Settings(rewriter="qwen_vl"))
    assert set(both.choices) == {"flux", "vlm"} and not both.choices["vlm"].on_gpu


@pytest.mark.parametrize("name", ["ICEdit-MoE-LoRA.safetensors", "pytorch_lora_weights.safetensors"])
def test_an_adapter_folder_holding_one_safetensors_file_of_another_name_loads_it(tmp_path, name):
    from assistant import hub
    from plugins.icedit.loading import lora_artifact

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / name).write_bytes(b"x")
    (folder / "README.md").write_text("an adapter")
    assert hub.locate(lora_artifact(str(folder))) == folder / name
    (folder / "other.safetensors").write_bytes(b"y")
    if name == "pytorch_lora_weights.safetensors":  # the default name wins over the others
        assert hub.locate(lora_artifact(str(folder))) == folder / name
    else:
        with pytest.raises(UserError, match="no pytorch_lora_weights.safetensors in it"):
            hub.locate(lora_artifact(str(folder)))
        assert (
            hub.locate(lora_artifact(str(folder), weight_name="other.safetensors"))
            == folder / "other.safetensors"
        )


@pytest.mark.parametrize("gib", [16, 24, 48, 80])
def test_models_json_plans_for_the_gpu_memory_given(monkeypatch, gib):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(cli, ["models", "--json", "--gpu-memory", str(gib)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    plan = report["plan"]
    assert plan["capacity"] == gib * GiB and plan["fits"]
    assert plan["estimated_peak"] <= plan["usable"] <= gib * GiB
    assert set(plan["choices"]) == {"flux", "vlm"} and plan["explain"].startswith(f"{gib} GiB GPU: ")
    assert [a["role"] for a in report["artifacts"]] == [
        "FLUX.1 Fill pipeline",
        "LoRA",
        "VLM",
        "CLIP model",
        "DINO model",
    ]
    assert all(
        a["cached"] is False and a["download_command"].startswith(f"hf download {a['ref']} --include ")
        for a in report["artifacts"]
    )
    if gib == 24:
        assert any(
            "Qwen2.5-VL-3B" in note and "--vlm Qwen/Qwen2.5-VL-3B-Instruct" in note for note in plan["notes"]
        )


def test_the_plan_sets_each_placement_for_the_plugins_whose_part_it_is(flux_folder, gpu):
    """The engine's device, offload and quantize go to the engine alone: another plugin in use that
    takes a `device` of its own keeps it. The Qwen rewriter and judge share their VLM's placement."""
    from pydantic import BaseModel

    from assistant.hookspecs import hookimpl
    from assistant.plugins import RewriterSpec
    from assistant.testing import registered
    from plugins.rules.rewriter import RulesRewriter

    class Placed(BaseModel):
        device: str | None = None

    class PlacedPlugin:
        @hookimpl
        def register_rewriters(self, register):
            register(RewriterSpec("placed", lambda settings, options: RulesRewriter(), options=Placed))

    gpu(80)
    with registered(PlacedPlugin(), "placed"):
        prepared = preflight.prepare(
            Settings(model=str(flux_folder), lora="none", rewriter="placed", vlm="none", offload="none")
        )
        update = prepared.plan.settings_update()
        assert set(update) == {"engine:icedit.device", "engine:icedit.offload", "engine:icedit.quantize"}
        assert update["engine:icedit.offload"] == "none"  # as given
        assert plugins.options_for("engines", "icedit", prepared.settings).device == "cuda"
        assert plugins.options_for("rewriters", "placed", prepared.settings).device is None
    shared = preflight.memory_plan(Settings(rewriter="qwen_vl", candidates=2), 80)
    assert shared.owners["vlm"] == ["rewriter:qwen_vl", "judge:qwen_vl"]
    assert {k for k in shared.settings_update() if k.endswith("vlm_device")} == {
        "rewriter:qwen_vl.vlm_device",
        "judge:qwen_vl.vlm_device",
    }
