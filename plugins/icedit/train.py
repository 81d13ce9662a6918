"""Fine-tuning an ICEdit adapter (LoRA-MoE or normal LoRA) on edit triplets laid out as diptychs, under
`accelerate`.

FLUX Fill stays frozen; the trainable part is `moe.add_lora_moe`'s or `moe.add_lora`'s adapter. The
defaults are the official trainer's (River-Zhang/ICEdit `train/`: `src/train/{model,data}.py`,
`train/config/{moe_lora,normal_lora}.yaml`), each a setting with our earlier choice as the option:

| setting | official (default) | option |
|---|---|---|
| loss_region | `full`: MSE over every latent token of the diptych (`mse_loss(pred, x_1 - x_0)`) | `right`: the painted half only |
| optimizer | `prodigy` (prodigyopt; lr 1, bias correction, safeguard warm-up, weight decay 0.01) | `adamw` (lr 1e-4) |
| max_grad_norm | 0.5 (Lightning's `gradient_clip_val`) | any |
| adapter_dtype | `bfloat16` (the official model is cast to bf16, LoRA included) | `float32` |
| text_dropout | 0.1: the whole prompt becomes " " | any, 0 for none |
| init | `gaussian`: A normal with std 1/r, peft's `init_lora_weights: gaussian` | `uniform` (nn.Linear's) |
| latents | `sample`: the VAE's posterior is sampled, for target and masked canvas | `mean` |
| panels | `square`: source and target stretched to panel x panel | `keep-aspect`: the engine's diptych |
| bottom_crop | 1/32 of the height for osunlp/MagicBrush (its watermark strip), 0 elsewhere | any fraction |

We offer the options because the engine paints aspect-kept diptychs (training on what inference sees),
AdamW is the better-known optimiser, and a right-half loss spends the gradient on the half that is
painted. The routers: under the published `topk` gate a top-1 router's weight is exactly 1, so it gets
no gradient (in the official trainer too); `gate="switch"` lets it learn (see `moe.LoraMoeLinear`), with
the Switch Transformer's load-balancing loss weighted by `balance_weight`.

Each step is flow matching as the official trainer does it: x_t = (1 - sigma) x0 + sigma noise with
sigma drawn logit-normal (sigmoid of a standard normal), the model predicts the velocity noise - x0.
The prompt and the masked canvas go through the engine's own `FillSampler.prepare`.

One `Accelerator` runs it on one device or, under `accelerate launch` / `torchrun`, on many (DDP,
DeepSpeed or FSDP from the accelerate config). Checkpoints (`save_state`) hold the adapter in the
published format plus optimizer, scheduler and step; batches, dropout and noise are pure functions of
the seed and the step, so a resumed run takes exactly the steps the uninterrupted one would have.
metrics.jsonl has a row per step: loss, lr (Prodigy's found step size as `d`), each MoE layer's share of
tokens per expert and its token total, and the load-balancing loss under the switch gate. A resumed run
must have the settings of the run it continues (each checkpoint keeps them; `check_resume`).

FSDP flattens parameters of one dtype: where the base is not in the adapter's dtype (a CPU's fp32 base
with the default bf16 adapter), pass `--adapter-dtype` to match it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch.utils.data import DataLoader, Sampler

import prompts
from assistant.errors import UserError
from assistant.files import write_file
from plugins.evaluation.data import load_edits
from plugins.icedit import moe, moe_checkpoint
from plugins.icedit.data import Diptychs
from plugins.icedit.options import IceditOptions
from plugins.icedit.presets import get_preset
from plugins.icedit.sampler import FillSampler, PromptCache

WEIGHT_DTYPES = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}
DEFAULT_LR = {"prodigy": 1.0, "adamw": 1e-4}
BOTTOM_CROPS = {"osunlp/magicbrush": 1 / 32}
"""Datasets whose pictures carry a strip at the bottom the official trainer cuts off (MagicBrush's watermark)."""
MOE_ONLY = ("experts", "top_k", "gate", "balance_weight")
OFFICIAL_BATCHES = {"moe": (1, 2, False), "lora": (2, 1, True)}
"""(batch size, gradient accumulation, gradient checkpointing) of moe_lora.yaml and normal_lora.yaml."""


class TrainConfig(BaseModel):
    """Everything a run needs besides the model settings; `train_config.json` in the output folder holds
    it with every default filled in (`resolved`)."""

    data: str
    columns: dict[str, str] = {}
    split: str = "train"
    limit: int | None = Field(None, ge=1)
    out: Path
    steps: int = Field(1000, ge=1, description="optimizer steps")
    adapter: Literal["moe", "lora"] = Field(
        "moe",
        description="moe: the LoRA-MoE (sanaka87/ICEdit-MoE-LoRA); lora: the normal LoRA (RiverZ/normal-lora)",
    )
    experts: int = Field(4, ge=1, le=64)
    rank: int = Field(32, ge=1, le=1024)
    top_k: int = Field(1, ge=1, le=64, description="experts per token")
    gate: moe.Gate = Field(
        "topk", description="topk: published (a top-1 router stays as initialised); switch"
    )
    balance_weight: float = Field(0.01, ge=0, description="switch gate: weight of the load-balancing loss")
    loss_region: Literal["full", "right"] = "full"
    optimizer: Literal["prodigy", "adamw"] = "prodigy"
    lr: float | None = Field(
        None, gt=0, description="default: 1 for Prodigy (it finds the step size), 1e-4 for AdamW"
    )
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(0, ge=0, description="linear warm-up of the learning rate")
    max_grad_norm: float = Field(0.5, gt=0)
    adapter_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    text_dropout: float = Field(0.1, ge=0, le=1, description="probability that an example's prompt is ' '")
    init: moe.Init = "gaussian"
    latents: Literal["sample", "mean"] = "sample"
    panels: Literal["square", "keep-aspect"] = "square"
    bottom_crop: float | None = Field(
        None,
        ge=0,
        lt=0.5,
        description="share of each picture's height cut off its bottom (default: per dataset)",
    )
    batch_size: int | None = Field(
        None, ge=1, description="per process (default: the official config's, 1 for moe, 2 for lora)"
    )
    grad_accum: int | None = Field(
        None, ge=1, description="default: the official config's, 2 for moe, 1 for lora"
    )
    mixed_precision: Literal["no", "fp16", "bf16"] | None = Field(
        None, description="default: bf16 on a GPU, no on a CPU"
    )
    gradient_checkpointing: bool | None = Field(
        None, description="default: the official config's, on for lora"
    )
    seed: int = Field(0, ge=0, lt=2**32, description="set_seed takes 32 bits (numpy)")
    panel_width: int | None = Field(
        None,
        ge=16,
        multiple_of=16,
        description="diptych panel width (default: the preset's, as the engine's)",
    )
    guidance: float = Field(
        1.0, gt=0, description="FLUX guidance embedding during training (the paper's trainer: 1)"
    )
    checkpoint_every: int = Field(500, ge=1)
    resume: str | None = Field(None, description="a checkpoint folder, or 'latest' under out/checkpoints")

    def resolved(self, mixed_precision: str, panel_width: int = 512) -> TrainConfig:
        """Every default that depends on other settings filled in; contradictions are one line."""
        if self.adapter == "lora" and (asked := [f for f in MOE_ONLY if f in self.model_fields_set]):
            raise UserError(f"{_flag(asked[0])} shapes the LoRA-MoE's experts: --adapter lora has none")
        if self.adapter == "moe" and self.top_k > self.experts:
            raise UserError(f"--top-k {self.top_k} asks for more experts than --experts {self.experts}")
        if self.gate == "topk" and "balance_weight" in self.model_fields_set:
            raise UserError(
                "--balance-weight weighs the switch gate's load-balancing loss: add --gate switch"
            )
        crop = self.bottom_crop
        if crop is None:
            crop = BOTTOM_CROPS.get(self.data.strip().lower(), 0.0)
        batch, accum, checkpointing = OFFICIAL_BATCHES[self.adapter]
        return self.model_copy(
            update={
                "lr": self.lr or DEFAULT_LR[self.optimizer],
                "bottom_crop": crop,
                "mixed_precision": self.mixed_precision or mixed_precision,
                "panel_width": self.panel_width or panel_width,
                "batch_size": self.batch_size or batch,
                "grad_accum": self.grad_accum or accum,
                "gradient_checkpointing": (
                    checkpointing if self.gradient_checkpointing is None else self.gradient_checkpointing
                ),
            }
        )


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


RESUMABLE = {"steps", "resume", "checkpoint_every", "out"}
"""What a resumed run may set anew; every other setting must be the checkpoint's."""


def check_resume(record: dict[str, Any], saved: dict[str, Any], where: Path) -> None:
    """A resumed run must continue the run it resumes: the first setting of `record` (this run's, as
    train_config.json keeps them) that differs from the checkpoint's `saved` ones is one line."""
    for key, value in record.items():
        if key in RESUMABLE or key not in saved or saved[key] == value:
            continue
        name = "--preset/--model" if key == "engine" else _flag(key)
        raise UserError(
            f"{name}: the run in {where} was trained with {json.dumps(saved[key])}, not {json.dumps(value)}: "
            "resume with its settings, or start a new run in another --out"
        )


class TrainReport(BaseModel):
    steps: int = Field(description="the step the run ended at")
    resumed_from: int | None = None
    loss_first: float = Field(description="mean loss of the first tenth of this run's steps (at least one)")
    loss_last: float = Field(description="mean loss of the last tenth of this run's steps (at least one)")
    adapter: str
    metrics: str
    checkpoints: list[str]
    num_processes: int
    distributed_type: str
    adapter_sha256: list[str] = Field(description="digest of the final adapter on each process: all equal")
    random_weights: bool


class EpochSampler(Sampler[int]):
    """A permutation of the examples drawn from (seed, epoch): the same order on every process and resume."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


def digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over an adapter state's keys and float32 values, in key order."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _generator(seed: int, micro: int, rank: int) -> torch.Generator:
    """The noise and sigma source of one micro-batch on one process: a pure function of the three."""
    return torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, micro, rank]).generate_state(1)[0])
    )


def _packed(pipe, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents -> the transformer's packed, shifted and scaled tokens."""
    config = pipe.vae.config
    latents = (latents - config.shift_factor) * config.scaling_factor
    b, c, h, w = latents.shape
    return pipe._pack_latents(latents, b, c, h, w)


def _draw(dist_mean: torch.Tensor, dist_std: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A sample of a VAE posterior drawn on the CPU, the same on every device; its mean without a generator."""
    if generator is None:
        return dist_mean
    noise = torch.randn(dist_mean.shape, generator=generator, dtype=torch.float32)
    return dist_mean + dist_std * noise.to(dist_mean.device, dist_mean.dtype)


@torch.no_grad()
def encode(
    sampler: FillSampler,
    batch: list[dict],
    guidance: float,
    generator: torch.Generator | None = None,
    text_dropout: float = 0.0,
    sample_latents: bool = False,
) -> dict[str, torch.Tensor]:
    """Prompt embeddings, masked-canvas condition, clean target latents and right-half token mask.

    Drawing from `generator`: each prompt is " " with probability `text_dropout`, and with
    `sample_latents` the target's and the masked canvas's latents are samples of the VAE posterior (the
    official trainer's `sample()`), else its means."""
    pipe = sampler.pipe
    texts = [prompts.render("ic_edit.txt", instruction=ex["instruction"]) for ex in batch]
    if generator is not None and text_dropout:
        dropped = torch.rand(len(batch), generator=generator) < text_dropout
        texts = [" " if drop else text for drop, text in zip(dropped.tolist(), texts, strict=True)]
    conds = [
        sampler.prepare(ex["canvas"], ex["mask"], text, 1, guidance)
        for ex, text in zip(batch, texts, strict=True)
    ]
    sizes = {(c.width, c.height) for c in conds}
    if len(sizes) > 1:
        raise UserError(
            f"a batch mixes diptych sizes {sorted(sizes)}: use --batch-size 1 for images of "
            "different aspect ratios"
        )
    first = conds[0]
    dtype = first.prompt_embeds.dtype
    targets = torch.cat(
        [
            pipe.image_processor.preprocess(ex["target"], height=first.height, width=first.width)
            for ex in batch
        ]
    ).to(sampler.device, dtype)
    posterior = pipe.vae.encode(targets).latent_dist
    draws = generator if sample_latents else None
    condition = [
        torch.cat((_packed(pipe, _draw(c.masked_mean, c.masked_std, draws)), c.mask), dim=-1) for c in conds
    ]
    return {
        "x0": _packed(pipe, _draw(posterior.mean, posterior.std, draws)),
        "condition": torch.cat(condition),
        "prompt_embeds": torch.cat([c.prompt_embeds for c in conds]),
        "pooled": torch.cat([c.pooled for c in conds]),
        "text_ids": first.text_ids,
        "image_ids": first.image_ids,
        "token_mask": torch.cat([c.mask.mean(-1) for c in conds]).to(torch.float32),
    }


def flow_matching_loss(
    model,
    inputs: dict[str, torch.Tensor],
    generator: torch.Generator,
    guidance: float | None,
    region: Literal["full", "right"] = "full",
    sigma_shift: float = 1.0,
) -> torch.Tensor:
    """MSE between the predicted and the true velocity (noise - x0), over every token of the diptych
    (`full`, the official loss) or the right half's (`right`).

    Sigma is logit-normal (the official trainer's), optionally shifted towards the noise end as SD3's
    resolution shift: sigma' = k·sigma / (1 + (k - 1)·sigma). Fine-tuning keeps k = 1; a model trained
    from scratch needs k > 1 (the toy world's 4) because only near sigma = 1 must it carry the left
    panel over to the right, and the logit-normal draw rarely goes there."""
    x0 = inputs["x0"]
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    sigma = torch.sigmoid(torch.randn(x0.shape[0], generator=generator)).to(x0.device)
    sigma = sigma_shift * sigma / (1 + (sigma_shift - 1) * sigma)
    s = sigma.view(-1, 1, 1)
    x_t = ((1 - s) * x0.float() + s * noise.float()).to(x0.dtype)
    guidance_t = None if guidance is None else torch.full_like(sigma, guidance)
    pred = model(
        hidden_states=torch.cat((x_t, inputs["condition"]), dim=2),
        timestep=sigma.to(x0.dtype),
        guidance=guidance_t,
        pooled_projections=inputs["pooled"],
        encoder_hidden_states=inputs["prompt_embeds"],
        txt_ids=inputs["text_ids"],
        img_ids=inputs["image_ids"],
        return_dict=False,
    )[0]
    per_token = (pred.float() - (noise.float() - x0.float())).pow(2).mean(-1)
    if region == "full":
        return per_token.mean()
    mask = inputs["token_mask"]
    return (per_token * mask).sum() / mask.sum()


def _checkpoint_dir(out: Path, resume: str) -> Path:
    if resume != "latest":
        path = Path(resume).expanduser()
        if not (path / "trainer_state.json").is_file():
            raise UserError(f"{resume}: not a training checkpoint (no trainer_state.json in it)")
        return path
    found = sorted((out / "checkpoints").glob("step-*/trainer_state.json"))
    if not found:
        raise UserError(f"--resume latest: no checkpoint under {out / 'checkpoints'}")
    return found[-1].parent


def _window(losses: list[float]) -> int:
    return max(1, len(losses) // 10)


def train(config: TrainConfig, options: IceditOptions, progress: bool = True) -> TrainReport | None:
    """Run (or continue) a training run; the report on the main process, None on the others.

    The stages: where to start (a checkpoint or step 0), the trainable model (the frozen pipeline with a
    new LoRA-MoE), the run wired through accelerate (optimizer, schedule, data, checkpoint hooks), the
    run's files, the steps, and the adapter with the report."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, set_seed

    cpu = (
        options.device == "cpu" or not torch.accelerator.is_available()
    )  # torchrun on CPUs: MULTI_CPU (gloo)
    preset = get_preset(options.preset)
    config = config.resolved("no" if cpu else "bf16", preset.panel_width)
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=config.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=config.grad_accum, sync_with_dataloader=False
        ),
    )
    set_seed(config.seed)
    engine = {
        "preset": options.preset,
        "model": options.model,
        "revision": options.revision,
        "max_sequence_length": preset.max_sequence_length,
    }
    record = config.model_dump(mode="json") | {"engine": engine}
    resume_dir, step = _resume_point(config, record)
    with accelerator.main_process_first():
        edits = load_edits(config.data, config.columns, config.split, config.limit)
    pipe, random_weights, params = _trainable(config, options, accelerator)
    run = _wire(config, accelerator, pipe, params, edits, preset.max_sequence_length, record)
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
    metrics_path = _run_files(config, accelerator, step, record)
    losses, checkpoints = _steps(config, run, step, metrics_path, progress)
    return _finish(config, run, step if resume_dir is not None else None, losses, checkpoints, random_weights)


def _resume_point(config: TrainConfig, record: dict[str, Any]) -> tuple[Path | None, int]:
    """The checkpoint to continue from and its step, checked to be this run's; (None, 0) for a new run."""
    if not config.resume:
        return None, 0
    resume_dir = _checkpoint_dir(config.out, config.resume)
    state = json.loads((resume_dir / "trainer_state.json").read_text())
    step = state["step"]
    check_resume(record, state.get("config", {}), resume_dir)
    if step >= config.steps:
        raise UserError(f"nothing to do: {resume_dir} is at step {step} already (ask for more with --steps)")
    return resume_dir, step


def _trainable(config: TrainConfig, options: IceditOptions, accelerator):
    """(pipeline, whether its weights are random, the new adapter's parameters): the base frozen on this
    process's device in the mixed-precision dtype, the adapter added in `adapter_dtype`."""
    from plugins.icedit.loading import load_pipeline

    model_options = options.model_copy(
        update={
            "lora": "none",
            "device": str(accelerator.device),
            "dtype": WEIGHT_DTYPES[accelerator.mixed_precision],
            "offload": "none",
            "quantize": "none",
            "compile": False,
        }
    )
    pipe, random_weights, *_ = load_pipeline(model_options)
    for part in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        part.requires_grad_(False)
    transformer = pipe.transformer
    if config.adapter == "lora":
        params = moe.add_lora(transformer, config.rank, seed=config.seed, init=config.init)
    else:
        params = moe.add_lora_moe(
            transformer,
            config.experts,
            config.rank,
            config.top_k,
            seed=config.seed,
            init=config.init,
            gate=config.gate,
        )
    for p in params:
        p.data = p.data.to(getattr(torch, config.adapter_dtype))
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    return pipe, random_weights, params


def _optimizer(config: TrainConfig, params: list) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    from prodigyopt import Prodigy

    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay": not --json
        return Prodigy(
            params,
            lr=config.lr,
            use_bias_correction=True,
            safeguard_warmup=True,
            weight_decay=config.weight_decay,
        )


@dataclass
class _Run:
    """A run wired through accelerate: what each step uses."""

    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    loader: Any
    params: list
    sampler: FillSampler
    guidance: float | None
    """The guidance embedding's value, for a transformer that has one."""
    experts: dict[str, moe.LoraMoeLinear]
    """The MoE layers by name, counting the tokens each expert gets."""
    record: dict[str, Any]
    """Every setting, as train_config.json and each checkpoint keep them."""


def _wire(
    config: TrainConfig,
    accelerator,
    pipe,
    params: list,
    edits,
    max_sequence_length: int,
    record: dict[str, Any],
) -> _Run:
    """Optimizer, warm-up schedule and data through accelerate; checkpoints hold the adapter only."""
    optimizer = _optimizer(config, params)
    warmup = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
    )
    loader = DataLoader(
        Diptychs(edits, config.panel_width, square=config.panels == "square", bottom_crop=config.bottom_crop),
        batch_size=config.batch_size,
        sampler=EpochSampler(len(edits), config.seed),
        collate_fn=list,
    )
    model, optimizer, loader = accelerator.prepare(pipe.transformer, optimizer, loader)
    accelerator.register_for_checkpointing(scheduler)

    def save_adapter(models, weights, output_dir):
        if accelerator.is_main_process:
            moe_checkpoint.save_adapter(accelerator.unwrap_model(models[0]), output_dir)
        weights.clear()  # the frozen base is not part of a checkpoint

    def load_adapter(models, input_dir):
        moe_checkpoint.restore_adapter(
            accelerator.unwrap_model(models.pop()), moe_checkpoint.read_checkpoint(input_dir)
        )

    accelerator.register_save_state_pre_hook(save_adapter)
    accelerator.register_load_state_pre_hook(load_adapter)
    guidance = config.guidance if pipe.transformer.config.guidance_embeds else None
    experts = moe.moe_layers(pipe.transformer)
    return _Run(
        accelerator,
        model,
        optimizer,
        scheduler,
        loader,
        params,
        FillSampler(pipe, PromptCache(size=0, max_sequence_length=max_sequence_length)),
        guidance,
        experts,
        record,
    )


def _run_files(config: TrainConfig, accelerator, step: int, record: dict[str, Any]) -> Path:
    """train_config.json, and metrics.jsonl cut back to the step the run continues from."""
    metrics_path = config.out / "metrics.jsonl"
    if accelerator.is_main_process:
        config.out.mkdir(parents=True, exist_ok=True)
        write_file(
            config.out / "train_config.json", (json.dumps(record, indent=2) + "\n").encode(), force=True
        )
        kept = []
        if step and metrics_path.is_file():
            kept = [
                line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= step
            ]
        write_file(metrics_path, "".join(line + "\n" for line in kept).encode(), force=True)
    return metrics_path


def _steps(
    config: TrainConfig, run: _Run, step: int, metrics_path: Path, progress: bool
) -> tuple[list[float], list[str]]:
    """Optimizer steps from `step` to `config.steps`: (each step's loss, the checkpoints saved)."""
    from tqdm.auto import tqdm

    accelerator = run.accelerator
    rank, per_epoch = accelerator.process_index, len(run.loader)
    micro = step * config.grad_accum
    losses, pending, pending_balance, checkpoints = [], [], [], []
    bar = tqdm(
        total=config.steps, initial=step, desc="train", disable=not (progress and accelerator.is_main_process)
    )
    while step < config.steps:
        epoch, skip = divmod(micro, per_epoch)
        batches = accelerator.skip_first_batches(run.loader, skip) if skip else run.loader
        batches.set_epoch(epoch)
        for batch in batches:
            if not pending:
                _count_tokens(run)
            with accelerator.accumulate(run.model):
                generator = _generator(config.seed, micro, rank)
                inputs = encode(
                    run.sampler,
                    batch,
                    config.guidance,
                    generator,
                    config.text_dropout,
                    sample_latents=config.latents == "sample",
                )
                for layer in run.experts.values():
                    layer.balance.clear()
                loss = flow_matching_loss(run.model, inputs, generator, run.guidance, config.loss_region)
                total = loss
                if (balance := _balance(run)) is not None:
                    pending_balance.append(balance.detach().float())
                    total = loss + config.balance_weight * balance
                accelerator.backward(total)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(run.params, config.max_grad_norm)
                run.optimizer.step()
                run.optimizer.zero_grad()
            micro += 1
            pending.append(loss.detach().float())
            if not accelerator.sync_gradients:
                continue
            lr = run.scheduler.get_last_lr()[0]
            run.scheduler.step()
            step += 1
            row = _metrics_row(run, step, lr, pending, pending_balance)
            pending, pending_balance = [], []
            losses.append(row["loss"])
            if accelerator.is_main_process:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}")
            if step % config.checkpoint_every == 0 or step == config.steps:
                checkpoints.append(_checkpoint(config, run, step))
            if step == config.steps:
                break
    bar.close()
    return losses, checkpoints


def _metrics_row(
    run: _Run, step: int, lr: float, losses: list[torch.Tensor], balances: list[torch.Tensor]
) -> dict[str, Any]:
    """One step's metrics.jsonl row, averaged over the micro-batches and the processes."""
    reduce = run.accelerator.reduce
    row: dict[str, Any] = {"step": step, "loss": reduce(torch.stack(losses).mean(), "mean").item(), "lr": lr}
    if "d" in run.optimizer.param_groups[0]:
        row["d"] = float(run.optimizer.param_groups[0]["d"])  # Prodigy's step size estimate
    if balances:
        row["balance"] = reduce(torch.stack(balances).mean(), "mean").item()
    if run.experts:
        counts = _token_counts(run)
        row["experts"] = _token_shares(counts, run.experts)
        row["tokens"] = {name: int(total) for name, total in zip(run.experts, counts.sum(-1), strict=True)}
    return row


def _count_tokens(run: _Run) -> None:
    """Start counting each MoE layer's tokens per expert afresh (one optimizer step's worth)."""
    for layer in run.experts.values():
        layer.counts = torch.zeros(layer.num_experts, dtype=torch.int64, device=layer.lora_A.device)


def _token_counts(run: _Run) -> torch.Tensor:
    """[layers, experts]: the tokens each expert of each MoE layer got this step, over every process."""
    return run.accelerator.reduce(torch.stack([layer.counts for layer in run.experts.values()]), "sum")


def _token_shares(counts: torch.Tensor, names) -> dict[str, list[float]]:
    shares = counts / counts.sum(-1, keepdim=True).clamp(min=1)
    return {name: [round(float(v), 4) for v in row] for name, row in zip(names, shares, strict=True)}


def _balance(run: _Run) -> torch.Tensor | None:
    """The switch gate's load-balancing loss of the last forward: the mean over the MoE layers' terms."""
    terms = [term for layer in run.experts.values() for term in layer.balance]
    return torch.stack(terms).mean() if terms else None


def _checkpoint(config: TrainConfig, run: _Run, step: int) -> str:
    """accelerate's state, and the step with the settings a resume must match."""
    where = config.out / "checkpoints" / f"step-{step:06d}"
    run.accelerator.save_state(str(where))
    if run.accelerator.is_main_process:
        state = {"step": step, "config": run.record}
        write_file(where / "trainer_state.json", (json.dumps(state, indent=2) + "\n").encode(), force=True)
    return str(where)


def _finish(
    config: TrainConfig,
    run: _Run,
    resumed_from: int | None,
    losses: list[float],
    checkpoints: list[str],
    random_weights: bool,
) -> TrainReport | None:
    """The adapter saved once by the main process, every process's digest of it, the report."""
    from accelerate.utils import gather_object

    accelerator = run.accelerator
    unwrapped = accelerator.unwrap_model(run.model)
    digests = gather_object([digest(moe_checkpoint.adapter_state(unwrapped))])
    adapter = None
    if accelerator.is_main_process:
        adapter = moe_checkpoint.save_adapter(unwrapped, config.out / "adapter")
    accelerator.wait_for_everyone()
    report = TrainReport(
        steps=config.steps,
        resumed_from=resumed_from,
        loss_first=float(np.mean(losses[: _window(losses)])),
        loss_last=float(np.mean(losses[-_window(losses) :])),
        adapter=str(adapter),
        metrics=str(config.out / "metrics.jsonl"),
        checkpoints=checkpoints,
        num_processes=accelerator.num_processes,
        distributed_type=str(accelerator.distributed_type.value),
        adapter_sha256=digests,
        random_weights=random_weights,
    )
    main = accelerator.is_main_process
    accelerator.end_training()
    return report if main else None
