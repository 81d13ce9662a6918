"""Fine-tuning the ICEdit LoRA-MoE on edit triplets laid out as diptychs, under `accelerate`.

FLUX Fill stays frozen; the trainable part is `moe.add_lora_moe`'s adapter. Each step is flow matching
as in the paper's (OminiControl-based) trainer: x_t = (1 - sigma) x0 + sigma noise with sigma drawn
logit-normal (sigmoid of a standard normal), the model predicts the velocity noise - x0, and the loss
is its mean squared error on the masked right half only (the left half is given). The prompt and the
masked canvas go through the engine's own `FillSampler.prepare`; latents are the VAE's means.

One `Accelerator` runs it on one device or, under `accelerate launch` / `torchrun`, on many (DDP,
DeepSpeed or FSDP from the accelerate config). Checkpoints (`save_state`) hold the adapter in the
published format plus optimizer, scheduler and step; batches and noise are pure functions of the seed
and the step, so a resumed run takes exactly the steps the uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
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
from plugins.icedit.sampler import FillSampler

WEIGHT_DTYPES = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}


class TrainConfig(BaseModel):
    """Everything a run needs besides the model settings; `train_config.json` in the output folder."""

    data: str
    columns: dict[str, str] = {}
    split: str = "train"
    limit: int | None = Field(None, ge=1)
    out: Path
    steps: int = Field(1000, ge=1, description="optimizer steps")
    experts: int = Field(4, ge=1, le=64)
    rank: int = Field(32, ge=1, le=1024)
    top_k: int = Field(
        1, ge=1, le=64, description="with 1 the router gets no gradient: it stays as initialised"
    )
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(0, ge=0, description="linear warm-up of the learning rate")
    max_grad_norm: float = Field(1.0, gt=0)
    batch_size: int = Field(1, ge=1, description="per process; examples of a batch must share a panel size")
    grad_accum: int = Field(1, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] | None = Field(
        None, description="default: bf16 on a GPU, no on a CPU"
    )
    gradient_checkpointing: bool = False
    seed: int = Field(0, ge=0, lt=2**32, description="set_seed takes 32 bits (numpy)")
    panel_width: int = Field(
        512, ge=16, multiple_of=16, description="diptych panel width (the engine uses 512)"
    )
    guidance: float = Field(
        1.0, gt=0, description="FLUX guidance embedding during training (the paper's trainer: 1)"
    )
    checkpoint_every: int = Field(500, ge=1)
    resume: str | None = Field(None, description="a checkpoint folder, or 'latest' under out/checkpoints")


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


@torch.no_grad()
def encode(sampler: FillSampler, batch: list[dict], guidance: float) -> dict[str, torch.Tensor]:
    """Prompt embeddings, masked-canvas condition, clean target latents and right-half token mask."""
    pipe = sampler.pipe
    conds = [
        sampler.prepare(
            ex["canvas"],
            ex["mask"],
            prompts.render("ic_edit.txt", instruction=ex["instruction"]),
            1,
            guidance,
        )
        for ex in batch
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
    condition = [torch.cat((_packed(pipe, c.masked_mean), c.mask), dim=-1) for c in conds]
    return {
        "x0": _packed(pipe, pipe.vae.encode(targets).latent_dist.mean),
        "condition": torch.cat(condition),
        "prompt_embeds": torch.cat([c.prompt_embeds for c in conds]),
        "pooled": torch.cat([c.pooled for c in conds]),
        "text_ids": first.text_ids,
        "image_ids": first.image_ids,
        "token_mask": torch.cat([c.mask.mean(-1) for c in conds]).to(torch.float32),
    }


def flow_matching_loss(
    model, inputs: dict[str, torch.Tensor], generator: torch.Generator, guidance: float | None
) -> torch.Tensor:
    """MSE between the predicted and the true velocity (noise - x0), over the right-half tokens."""
    x0 = inputs["x0"]
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    sigma = torch.sigmoid(torch.randn(x0.shape[0], generator=generator)).to(x0.device)
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
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=config.mixed_precision or ("no" if cpu else "bf16"),
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=config.grad_accum, sync_with_dataloader=False
        ),
    )
    set_seed(config.seed)
    resume_dir, step = _resume_point(config)
    with accelerator.main_process_first():
        edits = load_edits(config.data, config.columns, config.split, config.limit)
    pipe, random_weights, params = _trainable(config, options, accelerator)
    run = _wire(config, accelerator, pipe, params, edits)
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
    metrics_path = _run_files(config, accelerator, step)
    losses, checkpoints = _steps(config, run, step, metrics_path, progress)
    return _finish(config, run, step if resume_dir is not None else None, losses, checkpoints, random_weights)


def _resume_point(config: TrainConfig) -> tuple[Path | None, int]:
    """The checkpoint to continue from and its step; (None, 0) for a new run."""
    if not config.resume:
        return None, 0
    resume_dir = _checkpoint_dir(config.out, config.resume)
    step = json.loads((resume_dir / "trainer_state.json").read_text())["step"]
    if step >= config.steps:
        raise UserError(f"nothing to do: {resume_dir} is at step {step} already (ask for more with --steps)")
    return resume_dir, step


def _trainable(config: TrainConfig, options: IceditOptions, accelerator):
    """(pipeline, whether its weights are random, the new adapter's parameters): the base frozen on this
    process's device in the mixed-precision dtype, the LoRA-MoE added in fp32."""
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
    params = moe.add_lora_moe(transformer, config.experts, config.rank, config.top_k, seed=config.seed)
    for p in params:
        p.data = p.data.float()  # trainable weights in fp32 under any mixed precision
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    return pipe, random_weights, params


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


def _wire(config: TrainConfig, accelerator, pipe, params: list, edits) -> _Run:
    """Optimizer, warm-up schedule and data through accelerate; checkpoints hold the adapter only."""
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    warmup = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
    )
    loader = DataLoader(
        Diptychs(edits, config.panel_width),
        batch_size=config.batch_size,
        sampler=EpochSampler(len(edits), config.seed),
        collate_fn=list,
    )
    model, optimizer, loader = accelerator.prepare(pipe.transformer, optimizer, loader)
    accelerator.register_for_checkpointing(scheduler)

    def save_adapter(models, weights, output_dir):
        if accelerator.is_main_process:
            moe_checkpoint.save_lora_moe(accelerator.unwrap_model(models[0]), output_dir)
        weights.clear()  # the frozen base is not part of a checkpoint

    def load_adapter(models, input_dir):
        moe_checkpoint.restore_adapter(
            accelerator.unwrap_model(models.pop()), moe_checkpoint.read_checkpoint(input_dir)
        )

    accelerator.register_save_state_pre_hook(save_adapter)
    accelerator.register_load_state_pre_hook(load_adapter)
    guidance = config.guidance if pipe.transformer.config.guidance_embeds else None
    return _Run(accelerator, model, optimizer, scheduler, loader, params, FillSampler(pipe), guidance)


def _run_files(config: TrainConfig, accelerator, step: int) -> Path:
    """train_config.json, and metrics.jsonl cut back to the step the run continues from."""
    metrics_path = config.out / "metrics.jsonl"
    if accelerator.is_main_process:
        config.out.mkdir(parents=True, exist_ok=True)
        write_file(
            config.out / "train_config.json", (config.model_dump_json(indent=2) + "\n").encode(), force=True
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
    losses, pending, checkpoints = [], [], []
    bar = tqdm(
        total=config.steps, initial=step, desc="train", disable=not (progress and accelerator.is_main_process)
    )
    while step < config.steps:
        epoch, skip = divmod(micro, per_epoch)
        batches = accelerator.skip_first_batches(run.loader, skip) if skip else run.loader
        batches.set_epoch(epoch)
        for batch in batches:
            with accelerator.accumulate(run.model):
                inputs = encode(run.sampler, batch, config.guidance)
                loss = flow_matching_loss(
                    run.model, inputs, _generator(config.seed, micro, rank), run.guidance
                )
                accelerator.backward(loss)
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
            step_loss = accelerator.reduce(torch.stack(pending).mean(), "mean").item()
            pending = []
            losses.append(step_loss)
            if accelerator.is_main_process:
                with metrics_path.open("a") as f:
                    f.write(json.dumps({"step": step, "loss": step_loss, "lr": lr}) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
            if step % config.checkpoint_every == 0 or step == config.steps:
                checkpoints.append(_checkpoint(config, accelerator, step))
            if step == config.steps:
                break
    bar.close()
    return losses, checkpoints


def _checkpoint(config: TrainConfig, accelerator, step: int) -> str:
    where = config.out / "checkpoints" / f"step-{step:06d}"
    accelerator.save_state(str(where))
    if accelerator.is_main_process:
        write_file(where / "trainer_state.json", (json.dumps({"step": step}) + "\n").encode(), force=True)
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
        adapter = moe_checkpoint.save_lora_moe(unwrapped, config.out / "adapter")
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
