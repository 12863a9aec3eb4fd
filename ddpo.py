"""DDPO: reinforcement-learning fine-tuning of a text-to-image diffusion model on a reward.

Paper: Black, Janner, Du, Kostrikov, Levine, "Training Diffusion Models with Reinforcement
Learning", ICLR 2024, arXiv:2305.13301. Official code: kvablack/ddpo-pytorch (PyTorch,
diffusers), jannerm/ddpo (JAX).

Denoising is a T-step MDP: the state is (c, t, x_t), the action is x_{t-1}, the policy is
the sampler's Gaussian p_theta(x_{t-1} | x_t, c), and the reward r(x_0, c) comes at the end.
With DDIM at eta = 1 each step is x_{t-1} ~ N(mu_theta(x_t, t, c), sigma_t^2 I), so its
log-density is exact and cheap. Each epoch:

    sample K images with the current model, keeping x_T..x_0 and log p_old(x_{t-1} | x_t)
    A   = (r - mean_c) / std_c        per-prompt reward statistics (or the batch's), clipped to +-5
    for each inner epoch, each sample (shuffled), each of its timesteps (in random order):
        rho  = p_theta(x_{t-1} | x_t, c) / p_old(x_{t-1} | x_t, c)
        L_IS = max(-A rho, -A clip(rho, 1 - eps, 1 + eps))       DDPO_IS (PPO's clipped ratio)
        L_SF = -A log p_theta(x_{t-1} | x_t, c)                    DDPO_SF (one on-policy step)
    gradients accumulate over every trained timestep of `gradient_accumulation_steps` train batches:
    one AdamW step per gradient_accumulation_steps x T backward passes (T x timestep_fraction if < 1).

The log-density is averaged over the latent's dimensions, not summed (as the official code
does; the ratio clip eps = 1e-4 is tuned to that scale).

Usage:
    python ddpo.py --model tiny --no-use-lora --learning-rate 3e-5 --sample-num-steps 20 --num-epochs 30  # CPU, no download
    python ddpo.py                                  # SD v1.4 + LoRA, JPEG compressibility (official dgx config)
    python ddpo.py --reward jpeg_incompressibility
    python ddpo.py --reward aesthetic --prompts simple_animals --aesthetic-head sac+logos+ava1-l14-linearMSE.pth \
        --num-epochs 200 --gradient-accumulation-steps 4 --stat-buffer-size 32
    python ddpo.py --model path/to/diffusers-folder --prompts my_prompts.txt --reward clip_score
    accelerate launch --num_processes 8 ddpo.py     # multi-GPU: every process samples, rewards are gathered
    torchrun --nproc_per_node 2 ddpo.py --model tiny  # the same on CPU processes (gloo)
    python ddpo.py --help

Differences from the official code:
- Defaults are the per-GPU values of the official `config/dgx.py:compressibility` (8 samples x 4
  batches, train batch 4, 2 accumulation steps, LoRA rank 4, lr 3e-4). Its 8 GPUs gave 256 samples
  per epoch; one device gives 32. With `accelerate launch` the numbers scale the same way.
- Prompts: the official (in)compressibility runs use the first 398 ImageNet classes (the animals, an
  asset file); its aesthetic run uses `simple_animals` (45 animal names). Here `--prompts` defaults to
  `simple_animals` (the same 45 names, in this file) or takes a text file with one prompt per line, so
  the official compressibility prompts are `--prompts imagenet_animals.txt` (those 398 lines).
- LoRA through peft (`unet.add_adapter`, rank 4 on to_q/to_k/to_v/to_out) instead of the older
  diffusers LoRAAttnProcessor; the adapted layers are the same.
- The prompt-image alignment reward of the paper (LLaVA + BERTScore through a VLM server) is
  replaced by a local CLIP score (cosine of CLIP image and text embeddings, `--reward clip_score`).
- Rewards are computed right after each sampling batch, not in a background thread.
- `--model tiny` (not in the official code): a pixel-space UNet (3x16x16 images) and a random
  2-layer CLIP text encoder with a character-level tokenizer, built in this file and pretrained for
  `--tiny-pretrain-steps` (1,500) steps of 32 synthetic images each (colour gradients, half with film
  grain) from a fixed seed, cached in ~/.cache/ddpo (or $DDPO_CACHE_DIR). The whole loop then runs on
  a CPU; the sampler, scheduler, loss and loop are the ones the real model uses.
- The DDIM step with log-probability is written here from the DDIM update (the official code
  patches diffusers' scheduler); for x_{-1} it uses `final_alpha_cumprod` where the official
  code clamps the index to 0 (the same number for Stable Diffusion's scheduler).
- Fix: each step's log-density is that of x_{t-1} after the cast to the latents' dtype (fp16/bf16 under
  mixed precision), the x_{t-1} that is stored and re-scored in training. The official code scores the
  float32 x_{t-1} and stores the fp16 one, so re-scoring the stored trajectory gives ratios ~1e-4 (fp16)
  to ~1e-3 (bf16) away from 1 at the last timesteps, as large as the 1e-4 clip; here they are 1.
- No `--compile` / `--cuda-graph`: the UNet's forward and backward passes are the whole cost, and
  mixed precision (fp16 by default on CUDA, as officially) is the speed lever.
- A checkpoint (trainable weights, optimizer, per-prompt statistics) is written every `--save-freq`
  epochs and at the end, for `--resume`; `--save-model` also writes the LoRA weights or the UNet
  in diffusers' format.
- Each evaluation samples a fixed grid (same prompts, same noise) and saves it as a PNG, so the
  images before and after training can be compared.
"""

import csv
import io
import json
import math
import os
import random
import sys
import time
from collections import defaultdict, deque
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from PIL import Image
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


@dataclass
class Args:
    exp_name: str = "ddpo"
    """name of this experiment (part of the run folder's name)"""
    seed: int = 42
    """seed of python, numpy and torch (each process adds its index; official default: 42)"""
    model: str = "CompVis/stable-diffusion-v1-4"
    """a diffusers Stable Diffusion pipeline: a hub id, a local folder, or `tiny` (built here, no download)"""
    tiny_pretrain_steps: int = 1500
    """--model tiny: noise-prediction steps on synthetic images before DDPO starts (a few minutes on a CPU)"""
    revision: Optional[str] = None
    """hub revision of --model"""
    reward: Literal["jpeg_compressibility", "jpeg_incompressibility", "aesthetic", "clip_score"] = "jpeg_compressibility"
    """the reward r(x_0, c)"""
    prompts: str = "simple_animals"
    """`simple_animals` (built in) or a text file with one prompt per line"""
    clip_model: str = "openai/clip-vit-large-patch14"
    """the CLIP model (hub id or folder) of the aesthetic and clip_score rewards"""
    aesthetic_head: Optional[str] = None
    """the LAION aesthetic predictor's MLP weights (sac+logos+ava1-l14-linearMSE.pth) for --reward aesthetic"""
    num_epochs: int = 100
    """epochs; each samples a batch of images and trains on it"""
    sample_num_steps: int = 50
    """DDIM steps T"""
    sample_eta: float = 1.0
    """DDIM eta: 1.0 is the DDPM-like stochastic sampler; it must be > 0 for a log-density"""
    guidance_scale: float = 5.0
    """classifier-free guidance weight w (1.0: no guidance)"""
    sample_batch_size: int = 8
    """images per sampling batch (per process)"""
    sample_num_batches_per_epoch: int = 4
    """sampling batches per epoch (per process)"""
    image_size: Optional[int] = None
    """image side in pixels (default: the model's; 16 for tiny)"""
    objective: Literal["is", "sf"] = "is"
    """`is`: DDPO_IS, the PPO-clipped importance ratio; `sf`: DDPO_SF, score function, one step per epoch"""
    train_batch_size: int = 4
    """samples per training batch (per process)"""
    gradient_accumulation_steps: int = 2
    """train batches per AdamW step (each batch is T x timestep_fraction backward passes, one per timestep)"""
    num_inner_epochs: int = 1
    """passes over each epoch's samples"""
    train_cfg: bool = True
    """recompute log-probabilities with classifier-free guidance, as in sampling"""
    timestep_fraction: float = 1.0
    """fraction of each trajectory's timesteps trained on (a random subset)"""
    adv_clip_max: float = 5.0
    """advantages are clipped to [-adv_clip_max, adv_clip_max]"""
    clip_range: float = 1e-4
    """PPO clip range eps of the ratio"""
    learning_rate: float = 3e-4
    """AdamW learning rate"""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    """gradient-norm clip"""
    per_prompt_stat_tracking: bool = True
    """advantages from per-prompt reward statistics (else the batch's mean and std)"""
    stat_buffer_size: int = 16
    """rewards kept per prompt, across epochs"""
    stat_min_count: int = 16
    """below this many rewards for a prompt, the batch's statistics are used"""
    use_lora: bool = True
    """train LoRA adapters on the UNet's attention; False: fine-tune the whole UNet"""
    lora_rank: int = 4
    """LoRA rank (and alpha)"""
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """auto: fp16 on CUDA, no on CPU"""
    allow_tf32: bool = True
    """TF32 matmuls on Ampere+ GPUs"""
    eval_interval: int = 10
    """epochs between evaluations (a fixed grid of images and its reward); 0: only before and after"""
    eval_images: int = 8
    """images in the evaluation grid (fixed prompts and noise)"""
    device: str = "auto"
    """auto, cpu, cuda (with accelerate launch: the process's device)"""
    track: bool = False
    """log to Weights & Biases too"""
    wandb_project_name: str = "rl-reference"
    save_model: bool = False
    """write the fine-tuned UNet (or its LoRA weights) under the run folder at the end"""
    save_freq: int = 20
    """epochs between checkpoints (checkpoint.pt, for --resume)"""
    resume: Optional[str] = None
    """continue from a checkpoint.pt (same --model and --use-lora)"""
    run_dir: Optional[str] = None
    """output folder (default runs/{model}__{exp_name}__{seed}__{time}); never overwritten"""


# ==================================================================================================
# The policy: one DDIM step is a Gaussian p_theta(x_{t-1} | x_t, c) with an exact log-density
# ==================================================================================================

def encode_prompts(model, prompts) -> tuple:
    """The text encoder's embeddings c of the prompts (B, 77, D), and their token ids."""
    _, text_encoder, tokenizer, _, _ = model
    ids = tokenizer(list(prompts), return_tensors="pt", padding="max_length", truncation=True,
                    max_length=tokenizer.model_max_length).input_ids.to(text_encoder.device)
    return text_encoder(ids)[0], ids


def guided_eps(unet, x, t, embeds, neg_embeds, guidance_scale: float, cfg: bool = True) -> torch.Tensor:
    """eps_theta with classifier-free guidance: eps_u + w (eps_c - eps_u), both from one batched call."""
    t = t.expand(x.shape[0]) if t.ndim == 0 else t
    if not cfg:
        return unet(x, t, encoder_hidden_states=embeds).sample
    eps_u, eps_c = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([neg_embeds, embeds])).sample.chunk(2)
    return eps_u + guidance_scale * (eps_c - eps_u)


def ddim_step_with_logprob(scheduler, model_output, t, x_t, eta: float, prev_sample=None, generator=None):
    """One DDIM step x_t -> x_{t-1} ~ N(mu, sigma_t^2 I) (DDIM paper eqs. 12 and 16) and the log-density
    of x_{t-1}, averaged over all but the batch dimension. t may be a scalar or one timestep per sample.
    With prev_sample given, that x_{t-1} is scored instead of drawing one."""
    t = t.to(x_t.device).long()
    t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    alphas = scheduler.alphas_cumprod.to(x_t.device)
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a_t = alphas[t].view(shape)
    a_prev = torch.where(prev_t >= 0, alphas[prev_t.clamp(min=0)], scheduler.final_alpha_cumprod.to(x_t.device)).view(shape)

    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        x0, eps = (x_t - (1 - a_t).sqrt() * model_output) / a_t.sqrt(), model_output
    elif kind == "v_prediction":
        x0, eps = a_t.sqrt() * x_t - (1 - a_t).sqrt() * model_output, a_t.sqrt() * model_output + (1 - a_t).sqrt() * x_t
    else:  # "sample"
        x0, eps = model_output, (x_t - a_t.sqrt() * model_output) / (1 - a_t).sqrt()
    if scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)

    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()  # sigma_t(eta)
    mean = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps
    if prev_sample is None:
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        prev_sample = (mean + sigma * noise).to(x_t.dtype)  # the x_{t-1} that is stored (fp16/bf16) is the one scored
    log_prob = -((prev_sample.detach() - mean) ** 2) / (2 * sigma**2) - sigma.log() - math.log(math.sqrt(2 * math.pi))
    return prev_sample, log_prob.mean(dim=tuple(range(1, x_t.ndim)))


def latent_scale(vae) -> int:
    """Image pixels per latent pixel: the VAE halves the side once per extra block; pixel space is 1."""
    return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1


@torch.no_grad()
def sample_with_logprob(model, embeds, neg_embeds, args: Args, image_size: int, generator=None):
    """Run the sampler, keeping the trajectory: images in [0, 1], latents (B, T + 1, ...), log-probs (B, T),
    timesteps (T,)."""
    unet, _, _, scheduler, vae = model
    scale = latent_scale(vae)
    scheduler.set_timesteps(args.sample_num_steps, device=embeds.device)
    x = torch.randn((embeds.shape[0], unet.config.in_channels, image_size // scale, image_size // scale),
                    generator=generator, device=embeds.device, dtype=embeds.dtype) * scheduler.init_noise_sigma
    latents, log_probs = [x], []
    for t in scheduler.timesteps:
        eps = guided_eps(unet, x, t, embeds, neg_embeds, args.guidance_scale, cfg=args.guidance_scale > 1.0)
        x, log_prob = ddim_step_with_logprob(scheduler, eps, t, x, args.sample_eta, generator=generator)
        latents.append(x)
        log_probs.append(log_prob)
    images = vae.decode(x.to(vae.dtype) / vae.config.scaling_factor).sample if vae is not None else x
    return ((images.float() / 2 + 0.5).clamp(0, 1), torch.stack(latents, 1), torch.stack(log_probs, 1),
            scheduler.timesteps.clone())


# ==================================================================================================
# The method: DDPO's loss and advantages, and one epoch of sampling and of training
# ==================================================================================================

def ddpo_loss(log_prob, old_log_prob, advantages, args: Args):
    """DDPO_IS: PPO's pessimistic clipped surrogate on the per-step ratio; DDPO_SF: the score function.
    Returns (loss, ratio)."""
    ratio = torch.exp(log_prob - old_log_prob)
    advantages = advantages.clamp(-args.adv_clip_max, args.adv_clip_max)
    if args.objective == "sf":
        return -(advantages * log_prob).mean(), ratio
    clipped = ratio.clamp(1.0 - args.clip_range, 1.0 + args.clip_range)
    return torch.maximum(-advantages * ratio, -advantages * clipped).mean(), ratio


class PerPromptStatTracker:
    """Advantage (r - mean) / std with each prompt's statistics over its last `buffer_size` rewards
    (across epochs); the whole batch's statistics while a prompt has fewer than `min_count`."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count, self.stats = buffer_size, min_count, {}

    def update(self, prompts: np.ndarray, rewards: np.ndarray) -> np.ndarray:
        advantages = np.empty_like(rewards)
        for prompt in np.unique(prompts):
            mine = rewards[prompts == prompt]
            buffer = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(mine)
            ref = rewards if len(buffer) < self.min_count else np.array(buffer)
            advantages[prompts == prompt] = (mine - ref.mean()) / (ref.std() + 1e-6)
        return advantages


def sample_epoch(args: Args, accelerator, model, neg_embed, prompts_all: list, reward_fn, image_size: int):
    """Sample the epoch's trajectories with the current policy (sample_num_batches_per_epoch batches of
    sample_batch_size random prompts) and score their images. Returns the samples (prompt embeddings c,
    timesteps, x_t, x_{t-1}, log p_old(x_{t-1} | x_t, c), one row per trajectory), their rewards and prompt ids."""
    unet = model[0]
    unet.eval()
    batches = []
    for _ in range(args.sample_num_batches_per_epoch):
        prompts = [random.choice(prompts_all) for _ in range(args.sample_batch_size)]
        embeds, ids = encode_prompts(model, prompts)
        with accelerator.autocast():
            images, latents, log_probs, timesteps = sample_with_logprob(
                model, embeds, neg_embed.expand(len(prompts), -1, -1), args, image_size)
        batches.append({"ids": ids, "embeds": embeds, "timesteps": timesteps.repeat(len(prompts), 1),
                        "latents": latents[:, :-1], "next_latents": latents[:, 1:], "log_probs": log_probs,
                        "rewards": torch.as_tensor(reward_fn(images, prompts), device=accelerator.device,
                                                   dtype=torch.float32)})
    samples = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    return samples, samples.pop("rewards"), samples.pop("ids")


def compute_advantages(args: Args, accelerator, tracker: PerPromptStatTracker, tokenizer, rewards, ids):
    """A = (r - mean) / std over the rewards of all processes: each prompt's statistics (the tracker) or the
    batch's. Returns this process's advantages (a tensor) and all rewards (numpy)."""
    rewards = accelerator.gather(rewards).cpu().numpy()
    if args.per_prompt_stat_tracking:
        prompts = np.array(tokenizer.batch_decode(accelerator.gather(ids).cpu(), skip_special_tokens=True))
        advantages = tracker.update(prompts, rewards)
    else:
        advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-8)
    per_process = torch.as_tensor(advantages, dtype=torch.float32).reshape(accelerator.num_processes, -1)
    return per_process[accelerator.process_index].to(accelerator.device), rewards


def train_epoch(args: Args, accelerator, unet, optimizer, scheduler, samples: dict, neg_embed):
    """num_inner_epochs passes over the samples: shuffle the trajectories and each one's timesteps, re-score
    x_{t-1} under the current policy, and minimize ddpo_loss. Gradients accumulate over every trained
    timestep of gradient_accumulation_steps train batches, then one AdamW step (accelerate counts the
    backward passes). Returns the mean loss, approx. KL and clip fraction over all processes, the number of
    optimizer steps and of backward passes."""
    num_train_timesteps = max(1, int(args.sample_num_steps * args.timestep_fraction))
    device = accelerator.device
    unet.train()
    n, steps = samples["timesteps"].shape
    stats, updates, backward_passes = defaultdict(list), 0, 0
    for _ in range(args.num_inner_epochs):
        perm = torch.randperm(n, device=device)
        order = {k: v[perm] for k, v in samples.items()}
        perms = torch.stack([torch.randperm(steps, device=device) for _ in range(n)])
        for k in ("timesteps", "latents", "next_latents", "log_probs"):
            order[k] = order[k][torch.arange(n, device=device)[:, None], perms]
        for i in range(0, n, args.train_batch_size):
            batch = {k: v[i:i + args.train_batch_size] for k, v in order.items()}
            neg = neg_embed.expand(len(batch["embeds"]), -1, -1)
            for j in range(num_train_timesteps):
                with accelerator.accumulate(unet):
                    with accelerator.autocast():
                        eps = guided_eps(unet, batch["latents"][:, j], batch["timesteps"][:, j], batch["embeds"],
                                         neg, args.guidance_scale, cfg=args.train_cfg)
                        _, log_prob = ddim_step_with_logprob(scheduler, eps, batch["timesteps"][:, j],
                                                             batch["latents"][:, j], args.sample_eta,
                                                             prev_sample=batch["next_latents"][:, j])
                    loss, ratio = ddpo_loss(log_prob.float(), batch["log_probs"][:, j], batch["advantages"], args)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                        updates += 1
                    optimizer.step()  # accelerate skips it until the accumulation is complete
                    optimizer.zero_grad()
                backward_passes += 1
                stats["loss"].append(loss.detach())
                stats["approx_kl"].append(0.5 * ((log_prob.float() - batch["log_probs"][:, j]) ** 2).mean().detach())
                stats["clipfrac"].append(((ratio - 1).abs() > args.clip_range).float().mean().detach())
    info = {k: accelerator.reduce(torch.stack(v).mean(), reduction="mean").item() for k, v in stats.items()}
    return info, updates, backward_passes


# ==================================================================================================
# The loop: sample -> advantages -> train -> log / evaluate / checkpoint, every epoch
# ==================================================================================================

def main(args: Args) -> dict:
    from accelerate.utils import set_seed
    check_args(args)
    prompts_all = load_prompts(args.prompts)
    accelerator, precision = make_accelerator(args)
    device, main_process = accelerator.device, accelerator.is_main_process
    resume = read_checkpoint(args.resume)
    run_dir = new_run_dir(args, resume, main_process)

    set_seed(args.seed, device_specific=True)  # seed + process index: every process samples different images
    model = load_model(args)
    unet, _, tokenizer, scheduler, vae = model
    image_size = args.image_size or unet.config.sample_size * latent_scale(vae)
    reward_fn = make_reward(args, device)
    trainable = prepare_model(model, args, device, precision)  # LoRA adapters or the whole UNet
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    tracker = PerPromptStatTracker(args.stat_buffer_size, args.stat_min_count)
    first_epoch, history = restore_checkpoint(resume, args, accelerator, unet, optimizer, tracker)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    neg_embed = encode_prompts(model, [""])[0]  # the unconditional branch of guidance: the empty prompt
    writer = open_run(args, run_dir, accelerator, precision, image_size) if main_process else None
    samples_per_epoch = args.sample_batch_size * args.sample_num_batches_per_epoch
    steps_per_epoch = samples_per_epoch // (args.train_batch_size * args.gradient_accumulation_steps) * args.num_inner_epochs
    accelerator.print(f"{samples_per_epoch * accelerator.num_processes} samples per epoch, {steps_per_epoch} optimizer "
                      f"steps per epoch, {sum(p.numel() for p in trainable):,} trainable parameters")

    def evaluate(epoch: int) -> dict:  # the fixed grid: the same prompts and noise every time
        return evaluate_grid(args, accelerator, model, neg_embed, prompts_all, reward_fn, image_size, run_dir, epoch)

    if first_epoch == 0 and main_process:
        history["eval"].append(evaluate(0))
    updates, backward_passes, info, t0 = 0, 0, {}, time.time()
    for epoch in tqdm(range(first_epoch, args.num_epochs), disable=not sys.stdout.isatty(), desc="ddpo"):
        # 1. sample trajectories with the current policy, 2. advantages from the rewards of all processes
        samples, rewards, ids = sample_epoch(args, accelerator, model, neg_embed, prompts_all, reward_fn, image_size)
        samples["advantages"], rewards = compute_advantages(args, accelerator, tracker, tokenizer, rewards, ids)
        # 3. train on them
        info, n_updates, n_passes = train_epoch(args, accelerator, unet, optimizer, scheduler, samples, neg_embed)
        updates, backward_passes = updates + n_updates, backward_passes + n_passes

        # 4. log, evaluate, checkpoint
        if not math.isfinite(info["loss"]):  # checked once per epoch: no host sync per backward pass
            fail(f"the DDPO loss became {info['loss']} in epoch {epoch + 1}; lower --learning-rate")
        info.update(reward_mean=float(rewards.mean()), reward_std=float(rewards.std()))
        history["train"].append({"epoch": epoch + 1, **info})
        if main_process:
            log_train(writer, epoch + 1, info)
            last = epoch + 1 == args.num_epochs
            if last or (args.eval_interval > 0 and (epoch + 1) % args.eval_interval == 0):
                history["eval"].append(evaluate(epoch + 1))
                log_eval(writer, history["eval"][-1])
            write_csvs(run_dir, history)
            if last or (epoch + 1) % args.save_freq == 0:
                save_checkpoint(run_dir, args, accelerator, unet, optimizer, tracker, history, epoch)
        accelerator.wait_for_everyone()

    if main_process and args.save_model:
        save_model(run_dir, args, accelerator, unet)
    if main_process:
        writer.close()
    elapsed = time.time() - t0
    evals = history["eval"]
    return {"updates": updates, "backward_passes": backward_passes, "updates_per_second": updates / max(elapsed, 1e-9),
            "losses/ddpo": info.get("loss"), **{k: v for k, v in info.items() if k != "loss"},
            "eval/reward": evals[-1]["reward_mean"] if evals else None,
            "eval/reward_before": evals[0]["reward_mean"] if evals else None, "run_dir": run_dir}


# ==================================================================================================
# Plumbing: everything below runs the experiment; none of it is the method
# ==================================================================================================

def fail(message: str):
    """Bad input: one clear sentence on stderr and exit status 1."""
    raise SystemExit(f"ddpo.py: error: {message}")


# ----------------------------------------------------------------------------- setup and evaluation

def check_args(args: Args):
    """Fail early, with one sentence, on settings the loop cannot run."""
    if min(args.num_epochs, args.sample_num_steps, args.sample_batch_size, args.sample_num_batches_per_epoch,
           args.train_batch_size, args.gradient_accumulation_steps, args.num_inner_epochs) < 1:
        fail("epochs, steps, batch sizes and accumulation steps must be positive")
    if not 0 < args.timestep_fraction <= 1:
        fail(f"--timestep-fraction must be in (0, 1], got {args.timestep_fraction}")
    if args.sample_eta <= 0:
        fail("--sample-eta must be > 0: with eta = 0 DDIM is deterministic and has no log-density to train")
    if args.sample_batch_size % args.train_batch_size:
        fail(f"--sample-batch-size {args.sample_batch_size} must be a multiple of --train-batch-size {args.train_batch_size}")
    samples_per_epoch = args.sample_batch_size * args.sample_num_batches_per_epoch
    if samples_per_epoch % (args.train_batch_size * args.gradient_accumulation_steps):
        fail(f"the {samples_per_epoch} samples per epoch must split into optimizer steps of --train-batch-size "
             f"x --gradient-accumulation-steps = {args.train_batch_size * args.gradient_accumulation_steps}")
    if args.objective == "sf" and (args.num_inner_epochs != 1 or
                                   samples_per_epoch != args.train_batch_size * args.gradient_accumulation_steps):
        fail(f"DDPO_SF is on-policy: one gradient step per epoch, so --num-inner-epochs 1 and --gradient-accumulation-steps "
             f"{samples_per_epoch // args.train_batch_size}")


def make_accelerator(args: Args):
    """accelerate's Accelerator (device, processes, mixed precision) with gradient accumulation over
    gradient_accumulation_steps x the trained timesteps backward passes. Returns it and the precision."""
    from accelerate import Accelerator
    cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    precision = ("no" if cpu else "fp16") if args.mixed_precision == "auto" else args.mixed_precision
    if cpu and precision == "fp16":
        fail("--mixed-precision fp16 needs a GPU; use no or bf16 on a CPU")
    num_train_timesteps = max(1, int(args.sample_num_steps * args.timestep_fraction))
    accelerator = Accelerator(mixed_precision=precision, cpu=cpu,
                              gradient_accumulation_steps=args.gradient_accumulation_steps * num_train_timesteps)
    if args.allow_tf32 and accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator, precision


def prepare_model(model, args: Args, device, precision: str) -> list:
    """Move the model to the device: the DDIM schedule once (no host copy per step), the frozen parts in
    the inference dtype, the trainable weights (LoRA adapters or the whole UNet) in float32. Returns them."""
    unet, text_encoder, _, scheduler, vae = model
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.to(device)
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    text_encoder.requires_grad_(False).to(device, dtype=dtype)
    if vae is not None:
        vae.requires_grad_(False).to(device, dtype=dtype)
    unet.requires_grad_(not args.use_lora).to(device, dtype=dtype if args.use_lora else torch.float32)
    if args.use_lora:
        from peft import LoraConfig
        unet.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return [p for p in unet.parameters() if p.requires_grad]


def evaluate_grid(args: Args, accelerator, model, neg_embed, prompts_all: list, reward_fn, image_size: int,
                  run_dir: str, epoch: int) -> dict:
    """A fixed grid: the first prompts, the same noise at every evaluation; saved as images/epoch_XXXX.png."""
    prompts = [prompts_all[i % len(prompts_all)] for i in range(args.eval_images)]
    generator = torch.Generator(accelerator.device).manual_seed(args.seed)
    with accelerator.autocast():
        images = sample_with_logprob(model, encode_prompts(model, prompts)[0], neg_embed.expand(len(prompts), -1, -1),
                                     args, image_size, generator)[0]
    rewards = reward_fn(images, prompts)
    save_grid(images, os.path.join(run_dir, "images", f"epoch_{epoch:04d}.png"))
    return {"epoch": epoch, "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std())}


# ----------------------------------------------------------------------------- prompts

SIMPLE_ANIMALS = """cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox
wolf lizard beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog chicken duck goose
bee pig turkey fly llama camel bat gorilla hedgehog kangaroo""".split()


def load_prompts(spec: str) -> list:
    if spec == "simple_animals":
        return SIMPLE_ANIMALS
    if not os.path.isfile(spec):
        fail(f"--prompts {spec}: no such file (give `simple_animals` or a text file with one prompt per line)")
    with open(spec) as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        fail(f"--prompts {spec} has no prompts")
    return prompts


# ----------------------------------------------------------------------------- rewards

def jpeg_size_kb(images: torch.Tensor) -> np.ndarray:
    """Size in kB of each image saved as JPEG (quality 95), images in [0, 1], (B, 3, H, W)."""
    pixels = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for p in pixels:
        buffer = io.BytesIO()
        Image.fromarray(p).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return np.array(sizes)


class AestheticHead(nn.Module):
    """The LAION aesthetic predictor's MLP on normalized CLIP ViT-L/14 image embeddings (768 -> 1).
    Its dropouts are inactive at inference; the sizes are read from the weights."""

    def __init__(self, state_dict: dict):
        super().__init__()
        shapes = [state_dict[f"layers.{i}.weight"].shape for i in (0, 2, 4, 6, 7)]
        self.layers = nn.Sequential(nn.Linear(shapes[0][1], shapes[0][0]), nn.Dropout(0.2),
                                    nn.Linear(*shapes[1][::-1]), nn.Dropout(0.2),
                                    nn.Linear(*shapes[2][::-1]), nn.Dropout(0.1),
                                    nn.Linear(*shapes[3][::-1]), nn.Linear(*shapes[4][::-1]))
        self.load_state_dict(state_dict)


def clip_features(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5 returns an output object


def make_reward(args: Args, device: torch.device):
    """fn(images in [0, 1] (B, 3, H, W), prompts) -> rewards (B,) as numpy."""
    if args.reward == "jpeg_compressibility":
        return lambda images, prompts: -jpeg_size_kb(images)
    if args.reward == "jpeg_incompressibility":
        return lambda images, prompts: jpeg_size_kb(images)
    from transformers import CLIPModel, CLIPProcessor
    if args.reward == "aesthetic" and (args.aesthetic_head is None or not os.path.isfile(args.aesthetic_head)):
        fail(f"--reward aesthetic needs --aesthetic-head, the file sac+logos+ava1-l14-linearMSE.pth "
             f"(got {args.aesthetic_head})")
    try:
        clip = CLIPModel.from_pretrained(args.clip_model).to(device).eval()
        processor = CLIPProcessor.from_pretrained(args.clip_model)
    except (OSError, ValueError) as e:
        fail(f"--clip-model {args.clip_model} could not be loaded ({e})")

    def image_embeddings(images):
        pixels = (images * 255).round().clamp(0, 255).to(torch.uint8).cpu()
        inputs = processor(images=list(pixels), return_tensors="pt")
        e = clip_features(clip.get_image_features(pixel_values=inputs["pixel_values"].to(device)))
        return e / e.norm(dim=-1, keepdim=True)

    if args.reward == "aesthetic":
        head = AestheticHead(torch.load(args.aesthetic_head, map_location="cpu")).to(device).eval()

        @torch.no_grad()
        def aesthetic(images, prompts):
            return head.layers(image_embeddings(images)).squeeze(1).float().cpu().numpy()
        return aesthetic

    @torch.no_grad()
    def clip_score(images, prompts):  # cos(image, text) of CLIP: the local stand-in for LLaVA + BERTScore
        tokens = processor(text=list(prompts), return_tensors="pt", padding=True, truncation=True)
        text = clip_features(clip.get_text_features(**{k: v.to(device) for k, v in tokens.items()}))
        text = text / text.norm(dim=-1, keepdim=True)
        return (image_embeddings(images) * text).sum(-1).float().cpu().numpy()
    return clip_score


# ------------------------------------------------------------------ models: diffusers, or the tiny one built here

def load_model(args: Args):
    """(unet, text_encoder, tokenizer, DDIM scheduler, vae or None for pixel space)."""
    if args.model == "tiny":
        return build_tiny(args.tiny_pretrain_steps)
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    if os.path.isdir(args.model) and not os.path.isfile(os.path.join(args.model, "model_index.json")):
        fail(f"--model {args.model} is a folder without model_index.json, so not a diffusers pipeline")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(args.model, revision=args.revision, safety_checker=None,
                                                       requires_safety_checker=False)
    except (OSError, ValueError, TypeError, KeyError) as e:
        fail(f"--model {args.model} could not be loaded as a diffusers Stable Diffusion pipeline ({e})")
    return pipe.unet, pipe.text_encoder, pipe.tokenizer, DDIMScheduler.from_config(pipe.scheduler.config), pipe.vae


def byte_level_chars() -> list:
    """The 256 printable characters GPT-2/CLIP byte-level BPE maps the bytes to."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]


def char_clip_tokenizer():
    """CLIP's tokenizer with no merges: every character is a token (no vocabulary file to download)."""
    from transformers import CLIPTokenizer
    chars = byte_level_chars()
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77), vocab


def synthetic_images(colors: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """The tiny model's "pretraining data", in [-1, 1]: a linear colour gradient around each prompt's
    colour, and on half of the images film grain (white noise) of random strength. Smooth images
    compress well as JPEG, grainy ones do not, so the pretrained model's samples span a range of
    rewards for DDPO to move along."""
    n = colors.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    slope = (u(n, 2, 3) - 0.5) * 0.6
    image = colors[:, :, None, None] + slope[:, 0, :, None, None] * xx + slope[:, 1, :, None, None] * yy
    grain = torch.randn(image.shape, generator=generator)
    contrast = (0.15 + 0.25 * u(n)) * (u(n) < 0.5)
    return (image + contrast[:, None, None, None] * grain).clamp(-1, 1)


def build_tiny(pretrain_steps: int, seed: int = 0):
    """A small pixel-space text-to-image model: a UNet on 3x16x16 images with cross-attention to a
    2-layer CLIP text encoder (random, frozen; its tokenizer is CLIP's with single characters as the
    vocabulary), pretrained for `pretrain_steps` with the usual noise-prediction loss on synthetic
    images, 10% of them with the empty prompt for classifier-free guidance."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    tokenizer, vocab = char_clip_tokenizer()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)  # Stable Diffusion's
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the same "pretrained" model for every run seed
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"])).eval()
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
        cache = os.path.join(os.environ.get("DDPO_CACHE_DIR", os.path.expanduser("~/.cache/ddpo")),
                             f"tiny-unet-v1-{pretrain_steps}-{seed}.pt")
        if pretrain_steps > 0 and os.path.isfile(cache):
            unet.load_state_dict(torch.load(cache, map_location="cpu"))
        elif pretrain_steps > 0:
            generator = torch.Generator().manual_seed(seed)
            ids = tokenizer(SIMPLE_ANIMALS + [""], return_tensors="pt", padding="max_length", max_length=77).input_ids
            with torch.no_grad():
                embeds = text_encoder(ids)[0]
            colors = torch.rand(len(SIMPLE_ANIMALS), 3, generator=generator) * 1.2 - 0.6
            optimizer = torch.optim.Adam(unet.parameters(), lr=1e-3)
            for _ in tqdm(range(pretrain_steps), desc="pretraining the tiny model", disable=not sys.stdout.isatty()):
                k = torch.randint(len(SIMPLE_ANIMALS), (32,), generator=generator)
                x0 = synthetic_images(colors[k], 16, generator)
                noise = torch.randn(x0.shape, generator=generator)
                t = torch.randint(0, scheduler.config.num_train_timesteps, (32,), generator=generator)
                k = torch.where(torch.rand(32, generator=generator) < 0.1, len(SIMPLE_ANIMALS), k)  # empty prompt
                loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=embeds[k]).sample, noise)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            torch.save(unet.state_dict(), f"{cache}.{os.getpid()}.tmp")
            os.replace(f"{cache}.{os.getpid()}.tmp", cache)  # atomic: parallel runs never read half a file
    return unet, text_encoder, tokenizer, scheduler, None


# ----------------------------------------------------------------------------- checkpoint and resume

def read_checkpoint(path: Optional[str]) -> Optional[dict]:
    if path is None:
        return None
    if not os.path.isfile(path):
        fail(f"checkpoint {path} does not exist")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        fail(f"{path} is not a readable checkpoint ({type(e).__name__})")
    if not isinstance(ck, dict) or "script" not in ck:
        fail(f"{path} is not a checkpoint of ddpo.py")
    if ck["script"] != "ddpo.py":
        fail(f"{path} is a checkpoint of {ck['script']}, not of ddpo.py")
    return ck


def restore_checkpoint(resume: Optional[dict], args: Args, accelerator, unet, optimizer, tracker) -> tuple:
    """The trainable weights, optimizer and per-prompt statistics of a checkpoint. Returns the first epoch
    to run and the run's history (0 and an empty one without a checkpoint)."""
    if resume is None:
        return 0, {"train": [], "eval": []}
    if resume["use_lora"] != args.use_lora or resume["model"] != args.model:
        fail(f"{args.resume} was trained with --model {resume['model']} --use-lora {resume['use_lora']}")
    load_trainable(unet, resume["trainable"], args.resume)
    optimizer.load_state_dict(resume["optimizer"])
    tracker.stats = {k: deque(v, maxlen=args.stat_buffer_size) for k, v in resume["stats"].items()}
    accelerator.print(f"resumed from {args.resume} after epoch {resume['epoch']}")
    return resume["epoch"] + 1, resume["history"]


def load_trainable(unet, state: dict, path: str):
    """Load a checkpoint's trainable weights (LoRA or the whole UNet): exactly the model's trainable
    tensors, same names and shapes, or fail (load_state_dict(strict=False) alone would load nothing on
    a name mismatch and say nothing)."""
    names = {n for n, p in unet.named_parameters() if p.requires_grad}
    shapes = {n: p.shape for n, p in unet.named_parameters()}
    wrong = sorted(set(state) ^ names) + sorted(n for n in set(state) & names if state[n].shape != shapes[n])
    if wrong:
        fail(f"{path} does not match the model's trainable weights ({len(wrong)} names or shapes differ, "
             f"e.g. {wrong[0]}; same --model, --use-lora and --lora-rank?)")
    unet.load_state_dict(state, strict=False)  # strict=False only because the frozen weights are not in it


def save_checkpoint(run_dir: str, args: Args, accelerator, unet, optimizer, tracker, history: dict, epoch: int):
    """checkpoint.pt: the trainable weights, optimizer, per-prompt statistics and history, for --resume."""
    unwrapped = accelerator.unwrap_model(unet)
    trainable_names = {n for n, p in unwrapped.named_parameters() if p.requires_grad}
    state = {n: p for n, p in unwrapped.state_dict().items() if n in trainable_names}
    path = os.path.join(run_dir, "checkpoint.pt")
    torch.save({"script": "ddpo.py", "trainable": state, "optimizer": optimizer.state_dict(),
                "epoch": epoch, "model": args.model, "use_lora": args.use_lora, "history": history,
                "stats": {k: list(v) for k, v in tracker.stats.items()}}, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a crash never leaves half a checkpoint


def save_model(run_dir: str, args: Args, accelerator, unet):
    """--save-model: the LoRA weights (lora/, for pipe.load_lora_weights) or the UNet (unet/), diffusers' format."""
    final = accelerator.unwrap_model(unet)
    if args.use_lora:
        from diffusers import StableDiffusionPipeline
        from peft.utils import get_peft_model_state_dict
        StableDiffusionPipeline.save_lora_weights(os.path.join(run_dir, "lora"),
                                                  unet_lora_layers=get_peft_model_state_dict(final))
    else:
        final.save_pretrained(os.path.join(run_dir, "unet"))


# ----------------------------------------------------------------------------- run folder and logging

def new_run_dir(args: Args, resume: Optional[dict], main_process: bool) -> str:
    """--run-dir, or the checkpoint's folder when resuming, or runs/{model}__{exp_name}__{seed}__{time};
    an existing folder is never overwritten (except the one a run resumes in)."""
    model_name = os.path.basename(os.path.normpath(args.model)).replace("/", "_")
    run_dir = args.run_dir or (os.path.dirname(os.path.abspath(args.resume)) if resume else
                               f"runs/{model_name}__{args.exp_name}__{args.seed}__{int(time.time())}")
    if main_process and os.path.exists(run_dir) and not (resume and os.path.samefile(run_dir, os.path.dirname(args.resume) or ".")):
        fail(f"run folder {run_dir} already exists; choose another --run-dir (runs are never overwritten)")
    return run_dir


def open_run(args: Args, run_dir: str, accelerator, precision: str, image_size: int):
    """Create the run folder: images/, args.json (with the resolved settings), TensorBoard, optional W&B.
    Returns the TensorBoard writer."""
    os.makedirs(os.path.join(run_dir, "images"), exist_ok=True)
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump({**asdict(args), "resolved": dict(device=str(accelerator.device), mixed_precision=precision,
                   image_size=image_size, processes=accelerator.num_processes)}, f, indent=2)
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    if args.track:
        import wandb
        wandb.init(project=args.wandb_project_name, config=vars(args), name=os.path.basename(run_dir),
                   dir=run_dir, sync_tensorboard=True)
    return writer


def log_train(writer, epoch: int, info: dict):
    for k, v in info.items():
        writer.add_scalar(f"train/{k}", v, epoch)
    print(f"epoch={epoch} reward={info['reward_mean']:.4g}+-{info['reward_std']:.3g} "
          f"loss={info['loss']:.3g} approx_kl={info['approx_kl']:.2e} clipfrac={info['clipfrac']:.3f}")


def log_eval(writer, result: dict):
    writer.add_scalar("eval/reward_mean", result["reward_mean"], result["epoch"])
    print(f"eval epoch={result['epoch']} reward={result['reward_mean']:.4g}")


def write_csvs(run_dir: str, history: dict):
    """train.csv and eval.csv, rewritten whole each epoch."""
    for name in ("train", "eval"):
        with open(os.path.join(run_dir, f"{name}.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(history[name][-1]))
            w.writeheader()
            w.writerows(history[name])


def save_grid(images: torch.Tensor, path: str, columns: int = 8):
    """Images (B, 3, H, W) in [0, 1] side by side in rows of `columns`, as one PNG."""
    b, _, h, w = images.shape
    rows = math.ceil(b / columns)
    grid = torch.ones(3, rows * h, min(b, columns) * w)
    for i, im in enumerate(images.float().cpu()):
        grid[:, (i // columns) * h:(i // columns + 1) * h, (i % columns) * w:(i % columns + 1) * w] = im
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)


if __name__ == "__main__":
    main(tyro.cli(Args))
