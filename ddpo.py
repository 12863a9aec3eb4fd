"""DDPO: reinforcement-learning fine-tuning of a text-to-image diffusion model on a reward.

Black, Janner, Du, Kostrikov, Levine, "Training Diffusion Models with Reinforcement Learning",
ICLR 2024, arXiv:2305.13301. Official code: kvablack/ddpo-pytorch (PyTorch, diffusers).

Denoising is a T-step MDP: state (c, t, x_t), action x_{t-1}, policy the DDIM step at eta = 1,
p_theta(x_{t-1} | x_t, c) = N(mu_theta(x_t, t, c), sigma_t^2 I), reward r(x_0, c) at the end.

    sample K images with the current model, keeping x_T..x_0 and log p_old(x_{t-1} | x_t, c)
    A = clip((r - mean_c) / std_c, -5, 5)       per-prompt reward statistics (or the batch's)
    for each inner epoch, each sample (shuffled), each of its timesteps (in random order):
        rho  = p_theta(x_{t-1} | x_t, c) / p_old(x_{t-1} | x_t, c)
        L_IS = max(-A rho, -A clip(rho, 1 - eps, 1 + eps))    DDPO_IS (PPO's clipped ratio)
        L_SF = -A log p_theta(x_{t-1} | x_t, c)               DDPO_SF (one on-policy step)
    one AdamW step per gradient_accumulation_steps x T backward passes (T x timestep_fraction)
The log-density is averaged over the latent's dimensions (as officially; eps = 1e-4 fits it).

Usage:
    python ddpo.py                               # SD v1.4 + LoRA, JPEG compressibility
    python ddpo.py --reward aesthetic --aesthetic-head sac+logos+ava1-l14-linearMSE.pth
    accelerate launch --num_processes 8 ddpo.py  # every process samples; rewards are gathered
    python ddpo.py --model tiny --no-use-lora --learning-rate 3e-5 --sample-num-steps 20  # CPU

Differences from the official code that change the algorithm (docs/ddpo.md lists all):
- Defaults are its per-GPU values: one device samples 32 images per epoch (its 8 GPUs: 256).
- Prompts default to its 45 `simple_animals` for every reward (its compressibility: 398 ImageNet).
- A step's log-density is that of x_{t-1} after the cast to the latents' fp16/bf16, the one stored
  and re-scored (the official code scores the float32 x_{t-1}: ratios up to 1e-3 off 1).
- `--reward clip_score` (CLIP cosine) stands in for the paper's LLaVA + BERTScore alignment.
"""

import csv
import io
import json
import math
import os
import random
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import tyro
from PIL import Image
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


@dataclass
class Args:
    exp_name: str = "ddpo"  # name of this experiment (part of the run folder's name)
    seed: int = 42  # seed of python, numpy and torch (each process adds its index)
    model: str = "CompVis/stable-diffusion-v1-4"  # a diffusers SD pipeline (hub id, folder) or tiny
    tiny_pretrain_steps: int = 1500  # --model tiny: noise-prediction steps before DDPO (cached)
    revision: Optional[str] = None  # hub revision of --model
    reward: Literal["jpeg_compressibility", "jpeg_incompressibility",  # the reward r(x_0, c)
                    "aesthetic", "clip_score"] = "jpeg_compressibility"
    prompts: str = "simple_animals"  # `simple_animals` (built in) or a file with one prompt a line
    clip_model: str = "openai/clip-vit-large-patch14"  # CLIP of the aesthetic, clip_score rewards
    aesthetic_head: Optional[str] = None  # LAION's aesthetic MLP, sac+logos+ava1-l14-linearMSE.pth
    num_epochs: int = 100  # epochs; each samples a batch of images and trains on it
    sample_num_steps: int = 50  # DDIM steps T
    sample_eta: float = 1.0  # DDIM eta (1.0: DDPM-like); > 0 for a log-density
    guidance_scale: float = 5.0  # classifier-free guidance weight w (1.0: no guidance)
    sample_batch_size: int = 8  # images per sampling batch (per process)
    sample_num_batches_per_epoch: int = 4  # sampling batches per epoch (per process)
    image_size: Optional[int] = None  # image side in pixels (default: the model's; 16 for tiny)
    objective: Literal["is", "sf"] = "is"  # DDPO_IS (PPO-clipped ratio) or DDPO_SF (score function)
    train_batch_size: int = 4  # samples per training batch (per process)
    gradient_accumulation_steps: int = 2  # train batches (x T x timestep_fraction passes) per step
    num_inner_epochs: int = 1  # passes over each epoch's samples
    train_cfg: bool = True  # recompute log-probabilities with classifier-free guidance, as sampled
    timestep_fraction: float = 1.0  # fraction of each trajectory's timesteps trained on (random)
    adv_clip_max: float = 5.0  # advantages are clipped to [-adv_clip_max, adv_clip_max]
    clip_range: float = 1e-4  # PPO clip range eps of the ratio
    learning_rate: float = 3e-4  # AdamW learning rate
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # gradient-norm clip
    per_prompt_stat_tracking: bool = True  # per-prompt reward statistics (else the batch's)
    stat_buffer_size: int = 16  # rewards kept per prompt, across epochs
    stat_min_count: int = 16  # a prompt with fewer rewards gets the batch's statistics
    use_lora: bool = True  # LoRA adapters on the UNet's attention; False: fine-tune the whole UNet
    lora_rank: int = 4  # LoRA rank (and alpha)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"  # auto: fp16 on CUDA, no on CPU
    allow_tf32: bool = True  # TF32 matmuls on Ampere+ GPUs
    eval_interval: int = 10  # epochs between evaluations of a fixed grid; 0: before and after only
    eval_images: int = 8  # images in the evaluation grid (fixed prompts and noise)
    device: str = "auto"  # auto, cpu, cuda (with accelerate launch: the process's device)
    track: bool = False  # log to Weights & Biases too
    wandb_project_name: str = "rl-reference"
    save_model: bool = False  # write the fine-tuned UNet (or its LoRA weights) at the end
    save_freq: int = 20  # epochs between checkpoints (checkpoint.pt, for --resume)
    resume: Optional[str] = None  # continue from a checkpoint.pt (same --model and --use-lora)
    run_dir: Optional[str] = None  # default runs/{model}__{exp_name}__{seed}__{time}; never reused


# ======== The policy: a DDIM step is a Gaussian p_theta(x_{t-1} | x_t, c) with an exact density
def encode_prompts(model, prompts) -> tuple:
    """The text encoder's embeddings c of the prompts (B, 77, D), and their token ids."""
    _, text_encoder, tokenizer, _, _ = model
    ids = tokenizer(list(prompts), return_tensors="pt", padding="max_length", truncation=True,
                    max_length=tokenizer.model_max_length).input_ids.to(text_encoder.device)
    return text_encoder(ids)[0], ids


def guided_eps(unet, x, t, embeds, neg_embeds, guidance_scale: float, cfg: bool = True):
    """eps_theta with classifier-free guidance, eps_u + w (eps_c - eps_u), in one batched call."""
    t = t.expand(x.shape[0])  # a scalar t for every row
    if not cfg:
        return unet(x, t, encoder_hidden_states=embeds).sample
    neg_embeds = neg_embeds.expand_as(embeds)  # the empty prompt's, for every row
    eps_u, eps_c = unet(torch.cat([x, x]), torch.cat([t, t]),
                        encoder_hidden_states=torch.cat([neg_embeds, embeds])).sample.chunk(2)
    return eps_u + guidance_scale * (eps_c - eps_u)


def ddim_step_with_logprob(scheduler, model_output, t, x_t, eta: float, prev_sample=None,
                           generator=None):
    """One DDIM step x_t -> x_{t-1} ~ N(mu, sigma_t^2 I) (DDIM eqs. 12, 16) and the log-density of
    x_{t-1} (given as prev_sample, or drawn), averaged over all but the batch; t: scalar or (B,)."""
    t = t.to(x_t.device).long().expand(x_t.shape[0])
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    alphas = scheduler.alphas_cumprod.to(x_t.device)
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a_t = alphas[t].view(shape)
    final = scheduler.final_alpha_cumprod.to(x_t.device)  # a_prev of the last step, for x_{-1}
    a_prev = torch.where(prev_t >= 0, alphas[prev_t.clamp(min=0)], final).view(shape)
    kind, sqrt_a, sqrt_b = scheduler.config.prediction_type, a_t.sqrt(), (1 - a_t).sqrt()
    if kind == "epsilon":
        x0, eps = (x_t - sqrt_b * model_output) / sqrt_a, model_output
    elif kind == "v_prediction":
        x0, eps = sqrt_a * x_t - sqrt_b * model_output, sqrt_a * model_output + sqrt_b * x_t
    else:  # "sample"
        x0, eps = model_output, (x_t - sqrt_a * model_output) / sqrt_b
    if scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()  # sigma_t(eta)
    mean = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps
    if prev_sample is None:
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        prev_sample = (mean + sigma * noise).to(x_t.dtype)  # the stored x_{t-1} is the one scored
    log_prob = (-((prev_sample.detach() - mean) ** 2) / (2 * sigma**2) - sigma.log()
                - math.log(math.sqrt(2 * math.pi)))
    return prev_sample, log_prob.mean(dim=tuple(range(1, x_t.ndim)))


@torch.no_grad()
def sample_with_logprob(model, embeds, neg_embeds, args: Args, side: int, generator=None):
    """Run the sampler from side x side latents, keeping the trajectory: images in [0, 1], latents
    (B, T + 1, ...), log-probs (B, T), timesteps (T,)."""
    unet, _, _, scheduler, vae = model
    scheduler.set_timesteps(args.sample_num_steps, device=embeds.device)
    x = torch.randn((embeds.shape[0], unet.config.in_channels, side, side), generator=generator,
                    device=embeds.device, dtype=embeds.dtype) * scheduler.init_noise_sigma
    latents, log_probs, cfg = [x], [], args.guidance_scale > 1.0
    for t in scheduler.timesteps:
        eps = guided_eps(unet, x, t, embeds, neg_embeds, args.guidance_scale, cfg)
        x, log_prob = ddim_step_with_logprob(scheduler, eps, t, x, args.sample_eta,
                                             generator=generator)
        latents.append(x)
        log_probs.append(log_prob)
    images = x if vae is None else vae.decode(x.to(vae.dtype) / vae.config.scaling_factor).sample
    images = (images.float() / 2 + 0.5).clamp(0, 1)
    return images, torch.stack(latents, 1), torch.stack(log_probs, 1), scheduler.timesteps.clone()


# ======== The method: rewards, advantages, DDPO's loss, one epoch of sampling and of training
def make_reward(args: Args, device: torch.device):
    """fn(images in [0, 1] (B, 3, H, W), prompts) -> rewards (B,) as numpy: -kB (or kB) of each
    image as JPEG at quality 95, LAION's aesthetic score, or the CLIP cosine of image and prompt."""
    to_uint8 = lambda images: (images * 255).round().clamp(0, 255).to(torch.uint8).cpu()  # noqa
    if args.reward.startswith("jpeg"):
        sign = -1 if args.reward == "jpeg_compressibility" else 1

        def jpeg(images, prompts):
            buffers = [io.BytesIO() for _ in images]
            for pixels, buffer in zip(to_uint8(images).permute(0, 2, 3, 1).numpy(), buffers):
                Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
            return sign * np.array([buffer.tell() for buffer in buffers]) / 1000
        return jpeg
    from transformers import CLIPModel, CLIPProcessor
    if args.reward == "aesthetic" and not os.path.isfile(args.aesthetic_head or ""):
        fail(f"--reward aesthetic needs --aesthetic-head, the file "
             f"sac+logos+ava1-l14-linearMSE.pth (got {args.aesthetic_head})")
    try:
        clip = CLIPModel.from_pretrained(args.clip_model).to(device).eval()
        processor = CLIPProcessor.from_pretrained(args.clip_model)
    except (OSError, ValueError) as e:
        fail(f"--clip-model {args.clip_model} could not be loaded ({e})")
    features = lambda out: getattr(out, "pooler_output", out)  # transformers 5: an object # noqa
    if args.reward == "aesthetic":  # LAION's MLP, sizes from the file (idle dropouts: Identity)
        state = torch.load(args.aesthetic_head, map_location="cpu")
        head = nn.Sequential(*[nn.Linear(*state[f"layers.{i}.weight"].shape[::-1])
                               if i in (0, 2, 4, 6, 7) else nn.Identity() for i in range(8)])
        head.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
        head = head.to(device).eval()

    @torch.no_grad()
    def clip_reward(images, prompts):
        inputs = processor(images=list(to_uint8(images)), return_tensors="pt")
        image = features(clip.get_image_features(pixel_values=inputs["pixel_values"].to(device)))
        image = image / image.norm(dim=-1, keepdim=True)
        if args.reward == "aesthetic":
            return head(image).squeeze(1).float().cpu().numpy()
        # clip_score, cos(image, text): the local stand-in for LLaVA + BERTScore
        tokens = processor(text=list(prompts), return_tensors="pt", padding=True, truncation=True)
        text = features(clip.get_text_features(**{k: v.to(device) for k, v in tokens.items()}))
        text = text / text.norm(dim=-1, keepdim=True)
        return (image * text).sum(-1).float().cpu().numpy()
    return clip_reward


def sample_epoch(args, accelerator, model, neg_embed, prompts_all, reward_fn, side: int):
    """The epoch's trajectories under the current policy, scored: samples (c, t, x_t, x_{t-1},
    log p_old(x_{t-1} | x_t, c); a row per trajectory), their rewards and prompt token ids."""
    model[0].eval()
    batches = []
    for _ in range(args.sample_num_batches_per_epoch):
        prompts = [random.choice(prompts_all) for _ in range(args.sample_batch_size)]
        embeds, ids = encode_prompts(model, prompts)
        with accelerator.autocast():
            images, latents, log_probs, timesteps = sample_with_logprob(
                model, embeds, neg_embed, args, side)
        rewards = torch.as_tensor(reward_fn(images, prompts), device=accelerator.device,
                                  dtype=torch.float32)
        batches.append(dict(ids=ids, embeds=embeds, timesteps=timesteps.repeat(len(prompts), 1),
                            latents=latents[:, :-1], next_latents=latents[:, 1:],
                            log_probs=log_probs, rewards=rewards))
    samples = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    return samples, samples.pop("rewards"), samples.pop("ids")


def compute_advantages(args: Args, accelerator, stats: dict, tokenizer, rewards, ids):
    """A = (r - mean) / std over all processes' rewards, by the batch's statistics or each prompt's
    (its last stat_buffer_size rewards, in `stats`; the batch's below stat_min_count)."""
    rewards = accelerator.gather(rewards).cpu().numpy()
    advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-8)
    if args.per_prompt_stat_tracking:
        ids = accelerator.gather(ids).cpu()
        prompts = np.array(tokenizer.batch_decode(ids, skip_special_tokens=True))
        for prompt in np.unique(prompts):
            mine = rewards[prompts == prompt]
            buffer = stats.setdefault(prompt, deque(maxlen=args.stat_buffer_size))
            buffer.extend(mine)
            ref = rewards if len(buffer) < args.stat_min_count else np.array(buffer)
            advantages[prompts == prompt] = (mine - ref.mean()) / (ref.std() + 1e-6)
    advantages = torch.as_tensor(advantages, dtype=torch.float32)
    mine = advantages.reshape(accelerator.num_processes, -1)[accelerator.process_index]
    return mine.to(accelerator.device), rewards


def ddpo_loss(log_prob, old_log_prob, advantages, args: Args):
    """(loss, ratio): DDPO_IS, PPO's clipped surrogate of the per-step ratio, or DDPO_SF's."""
    ratio = torch.exp(log_prob - old_log_prob)
    advantages = advantages.clamp(-args.adv_clip_max, args.adv_clip_max)
    if args.objective == "sf":
        return -(advantages * log_prob).mean(), ratio
    clipped = ratio.clamp(1.0 - args.clip_range, 1.0 + args.clip_range)
    return torch.maximum(-advantages * ratio, -advantages * clipped).mean(), ratio


def train_epoch(args: Args, accelerator, unet, optimizer, scheduler, samples: dict, neg_embed,
                num_train_timesteps: int):
    """num_inner_epochs passes: shuffled trajectories and timesteps, x_{t-1} re-scored, ddpo_loss
    minimized. Returns mean loss, approx. KL and clip fraction, optimizer steps, backward passes."""
    unet.train()
    n, steps = samples["timesteps"].shape
    timed = ("latents", "timesteps", "next_latents", "log_probs")  # (trajectory, timestep, ...)
    stats, updates = {"loss": [], "approx_kl": [], "clipfrac": []}, 0
    for _ in range(args.num_inner_epochs):
        perm = torch.randperm(n, device=accelerator.device)
        perms = torch.stack([torch.randperm(steps, device=accelerator.device) for _ in range(n)])
        order = {k: v[perm[:, None], perms] if k in timed else v[perm] for k, v in samples.items()}
        for i in range(0, n, args.train_batch_size):
            batch = {k: v[i:i + args.train_batch_size] for k, v in order.items()}
            for j in range(num_train_timesteps):
                x_t, t, x_prev, old = (batch[k][:, j] for k in timed)
                with accelerator.accumulate(unet):
                    with accelerator.autocast():
                        eps = guided_eps(unet, x_t, t, batch["embeds"], neg_embed,
                                         args.guidance_scale, cfg=args.train_cfg)
                        log_prob = ddim_step_with_logprob(
                            scheduler, eps, t, x_t, args.sample_eta, prev_sample=x_prev)[1]
                    loss, ratio = ddpo_loss(log_prob.float(), old, batch["advantages"], args)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                        updates += 1
                    optimizer.step()  # accelerate skips it until the accumulation is complete
                    optimizer.zero_grad()
                stats["loss"].append(loss.detach())
                stats["approx_kl"].append(0.5 * ((log_prob.float() - old) ** 2).mean().detach())
                stats["clipfrac"].append(((ratio - 1).abs() > args.clip_range).float().mean())
    info = {k: accelerator.reduce(torch.stack(v).mean(), reduction="mean").item()
            for k, v in stats.items()}
    return info, updates, len(stats["loss"])


# ======== The prompts and the model: the data DDPO samples from and the policy it starts from
SIMPLE_ANIMALS = """cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger
bear raccoon fox wolf lizard beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake
turtle frog chicken duck goose bee pig turkey fly llama camel bat gorilla hedgehog kangaroo
""".split()


def load_prompts(spec: str) -> list:
    if spec == "simple_animals":
        return SIMPLE_ANIMALS
    if not os.path.isfile(spec):
        fail(f"--prompts {spec}: no such file (give `simple_animals` or a text file with one "
             "prompt per line)")
    with open(spec) as f:
        prompts = [line.strip() for line in f if line.strip()]
    return prompts or fail(f"--prompts {spec} has no prompts")


def load_model(args: Args, device, precision: str):
    """(unet, text_encoder, tokenizer, DDIM scheduler, vae or None for pixel space) on the device,
    and the trainable weights: the DDIM schedule on the device once (no host copy per step), the
    frozen parts in the inference dtype, the trainable ones (LoRA or the whole UNet) in float32."""
    if args.model == "tiny":
        unet, text_encoder, tokenizer, scheduler, vae = build_tiny(args.tiny_pretrain_steps)
    else:
        from diffusers import DDIMScheduler, StableDiffusionPipeline
        if os.path.isdir(args.model) and not os.path.isfile(f"{args.model}/model_index.json"):
            fail(f"--model {args.model} is a folder without model_index.json, so not a diffusers "
                 "pipeline")
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                args.model, revision=args.revision, safety_checker=None,
                requires_safety_checker=False)
        except (OSError, ValueError, TypeError, KeyError) as e:
            fail(f"--model {args.model} could not be loaded as a diffusers Stable Diffusion "
                 f"pipeline ({e})")
        unet, text_encoder, tokenizer, vae = pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae
        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.to(device)
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    for frozen in [m for m in (text_encoder, vae) if m is not None]:
        frozen.requires_grad_(False).to(device, dtype=dtype)
    unet.requires_grad_(not args.use_lora)
    unet.to(device, dtype=dtype if args.use_lora else torch.float32)
    if args.use_lora:
        from peft import LoraConfig
        unet.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank,
                                    init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    for p in trainable:  # LoRA's weights in float32 (the whole UNet already is)
        p.data = p.data.float()
    return (unet, text_encoder, tokenizer, scheduler, vae), trainable


def synthetic_images(colors: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """The tiny model's pretraining data in [-1, 1]: a linear colour gradient around each prompt's
    colour, half of them with film grain of random strength (smooth compresses well, grain not)."""
    n = colors.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    slope = (u(n, 2, 3) - 0.5) * 0.6
    image = (colors[:, :, None, None] + slope[:, 0, :, None, None] * xx
             + slope[:, 1, :, None, None] * yy)
    grain = torch.randn(image.shape, generator=generator)
    contrast = (0.15 + 0.25 * u(n)) * (u(n) < 0.5)
    return (image + contrast[:, None, None, None] * grain).clamp(-1, 1)


def build_tiny(pretrain_steps: int, seed: int = 0):
    """A pixel-space UNet on 3x16x16 images, cross-attending to a random frozen 2-layer CLIP text
    encoder (CLIP's tokenizer with no merges: each of byte-level BPE's 256 characters is a token),
    pretrained for `pretrain_steps` on synthetic images (10% with the empty prompt)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    words = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {c: i for i, c in enumerate(words)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)  # SD's
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the same "pretrained" model for every run seed
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).eval()
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
            layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
            attention_head_dim=8, norm_num_groups=8)
        cache = os.path.join(os.environ.get("DDPO_CACHE_DIR", os.path.expanduser("~/.cache/ddpo")),
                             f"tiny-unet-v1-{pretrain_steps}-{seed}.pt")
        if pretrain_steps > 0 and os.path.isfile(cache):
            unet.load_state_dict(torch.load(cache, map_location="cpu"))
        elif pretrain_steps > 0:
            g, n = torch.Generator().manual_seed(seed), len(SIMPLE_ANIMALS)
            ids = tokenizer(SIMPLE_ANIMALS + [""], return_tensors="pt", padding="max_length",
                            max_length=77).input_ids
            embeds = text_encoder(ids)[0].detach()
            colors = torch.rand(n, 3, generator=g) * 1.2 - 0.6
            optimizer = torch.optim.Adam(unet.parameters(), lr=1e-3)
            for _ in tqdm(range(pretrain_steps), desc="pretraining the tiny model",
                          disable=not sys.stdout.isatty()):
                k = torch.randint(n, (32,), generator=g)
                x0 = synthetic_images(colors[k], 16, g)
                noise = torch.randn(x0.shape, generator=g)
                t = torch.randint(0, scheduler.config.num_train_timesteps, (32,), generator=g)
                k = torch.where(torch.rand(32, generator=g) < 0.1, n, k)  # 10%: the empty prompt
                x_t = scheduler.add_noise(x0, noise, t)
                eps = unet(x_t, t, encoder_hidden_states=embeds[k]).sample
                loss = nn.functional.mse_loss(eps, noise)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            torch.save(unet.state_dict(), f"{cache}.{os.getpid()}.tmp")
            os.replace(f"{cache}.{os.getpid()}.tmp", cache)  # atomic for parallel runs
    return unet, text_encoder, tokenizer, scheduler, None


# ======== The loop: sample -> advantages -> train -> log / evaluate / checkpoint, every epoch
def main(args: Args) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    n_samples, n_steps = check_args(args)  # per epoch and process
    prompts_all = load_prompts(args.prompts)
    cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    precision = {"auto": "no" if cpu else "fp16"}.get(args.mixed_precision, args.mixed_precision)
    if cpu and precision == "fp16":
        fail("--mixed-precision fp16 needs a GPU; use no or bf16 on a CPU")
    num_train_timesteps = max(1, int(args.sample_num_steps * args.timestep_fraction))
    passes_per_step = args.gradient_accumulation_steps * num_train_timesteps  # backward passes
    accelerator = Accelerator(mixed_precision=precision, cpu=cpu,
                              gradient_accumulation_steps=passes_per_step)
    if args.allow_tf32 and accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    device, main_process = accelerator.device, accelerator.is_main_process
    name = os.path.basename(os.path.normpath(args.model))
    run_dir = args.run_dir or (os.path.dirname(os.path.abspath(args.resume)) if args.resume else
                               f"runs/{name}__{args.exp_name}__{args.seed}__{int(time.time())}")
    resume_dir = args.resume and os.path.realpath(os.path.dirname(args.resume))  # may be reused
    if main_process and os.path.exists(run_dir) and os.path.realpath(run_dir) != resume_dir:
        fail(f"run folder {run_dir} already exists; choose another --run-dir "
             "(runs are never overwritten)")
    set_seed(args.seed, device_specific=True)  # seed + process index: each process its own images
    reward_fn = make_reward(args, device)
    model, trainable = load_model(args, device, precision)  # LoRA adapters or the whole UNet
    unet, _, tokenizer, scheduler, vae = model
    scale = 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)  # pixels per latent
    image_size = args.image_size or unet.config.sample_size * scale
    side = image_size // scale  # of the latents
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, eps=args.adam_epsilon,
                                  betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay)
    epochs_done, history, stats = load_checkpoint(args, accelerator, unet, optimizer)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    neg_embed = encode_prompts(model, [""])[0]  # guidance's unconditional branch: the empty prompt
    if main_process:  # the run folder: images/, args.json (with the resolved settings), TensorBoard
        os.makedirs(os.path.join(run_dir, "images"), exist_ok=True)
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump({**vars(args), "resolved": dict(device=str(device), mixed_precision=precision,
                       image_size=image_size, processes=accelerator.num_processes)}, f, indent=2)
        writer = SummaryWriter(run_dir)
        table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
        if args.track:
            import wandb
            wandb.init(project=args.wandb_project_name, config=vars(args), dir=run_dir,
                       name=os.path.basename(run_dir), sync_tensorboard=True)
    accelerator.print(f"{n_samples * accelerator.num_processes} samples per epoch, "
                      f"{n_steps} optimizer steps per epoch, "
                      f"{sum(p.numel() for p in trainable):,} trainable parameters")

    def evaluate(epoch: int) -> dict:  # a fixed grid: the first prompts, the same noise every time
        prompts = [prompts_all[i % len(prompts_all)] for i in range(args.eval_images)]
        generator = torch.Generator(device).manual_seed(args.seed)
        with accelerator.autocast():
            embeds = encode_prompts(model, prompts)[0]
            images = sample_with_logprob(model, embeds, neg_embed, args, side, generator)[0]
        rewards = reward_fn(images, prompts)
        save_grid(images, os.path.join(run_dir, "images", f"epoch_{epoch:04d}.png"))
        history["eval"].append({"epoch": epoch, "reward_mean": float(rewards.mean()),
                                "reward_std": float(rewards.std())})
        return history["eval"][-1]

    if epochs_done == 0 and main_process:
        evaluate(0)
    updates, backward_passes, info, t0 = 0, 0, {}, time.time()
    for epoch in tqdm(range(epochs_done + 1, args.num_epochs + 1), desc="ddpo",
                      disable=not sys.stdout.isatty()):
        # 1. sample with the current policy, 2. advantages from all processes' rewards, 3. train
        samples, rewards, ids = sample_epoch(args, accelerator, model, neg_embed, prompts_all,
                                             reward_fn, side)
        samples["advantages"], rewards = compute_advantages(args, accelerator, stats, tokenizer,
                                                            rewards, ids)
        info, n_updates, n_passes = train_epoch(args, accelerator, unet, optimizer, scheduler,
                                                samples, neg_embed, num_train_timesteps)
        updates, backward_passes = updates + n_updates, backward_passes + n_passes
        # 4. log, evaluate, checkpoint
        if not math.isfinite(info["loss"]):  # checked once an epoch: no host sync per backward pass
            fail(f"the DDPO loss became {info['loss']} in epoch {epoch}; lower --learning-rate")
        info.update(reward_mean=float(rewards.mean()), reward_std=float(rewards.std()))
        history["train"].append({"epoch": epoch, **info})
        if main_process:
            for k, v in info.items():
                writer.add_scalar(f"train/{k}", v, epoch)
            print(f"epoch={epoch} reward={info['reward_mean']:.4g}+-{info['reward_std']:.3g} "
                  f"loss={info['loss']:.3g} approx_kl={info['approx_kl']:.2e} "
                  f"clipfrac={info['clipfrac']:.3f}")
            last = epoch == args.num_epochs
            if last or (args.eval_interval > 0 and epoch % args.eval_interval == 0):
                reward = evaluate(epoch)["reward_mean"]
                writer.add_scalar("eval/reward_mean", reward, epoch)
                print(f"eval epoch={epoch} reward={reward:.4g}")
            for name in ("train", "eval"):  # rewritten whole each epoch
                with open(os.path.join(run_dir, f"{name}.csv"), "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=list(history[name][-1]))
                    w.writeheader()
                    w.writerows(history[name])
            if last or epoch % args.save_freq == 0:
                save_checkpoint(run_dir, args, accelerator, unet, optimizer, stats, history, epoch)
        accelerator.wait_for_everyone()

    if main_process:
        writer.close()
        if args.save_model:  # in diffusers' formats: lora/ (for pipe.load_lora_weights) or unet/
            final = accelerator.unwrap_model(unet)
            if args.use_lora:
                from diffusers import StableDiffusionPipeline
                from peft.utils import get_peft_model_state_dict
                StableDiffusionPipeline.save_lora_weights(
                    f"{run_dir}/lora", unet_lora_layers=get_peft_model_state_dict(final))
            else:
                final.save_pretrained(f"{run_dir}/unet")
    evals = [e["reward_mean"] for e in history["eval"]] or [None]
    return {"updates": updates, "backward_passes": backward_passes,
            "updates_per_second": updates / max(time.time() - t0, 1e-9),
            "losses/ddpo": info.get("loss"), **{k: v for k, v in info.items() if k != "loss"},
            "eval/reward": evals[-1], "eval/reward_before": evals[0], "run_dir": run_dir}


# ======== Plumbing: everything below runs the experiment; none of it changes a result
def fail(message: str):
    """Bad input: one clear sentence on stderr and exit status 1."""
    raise SystemExit(f"ddpo.py: error: {message}")


def check_args(args: Args):
    """Fail early, with one sentence, on settings the loop cannot run. Returns the samples and the
    optimizer steps per epoch (per process)."""
    if min(args.num_epochs, args.sample_num_steps, args.sample_batch_size, args.num_inner_epochs,
           args.sample_num_batches_per_epoch, args.train_batch_size,
           args.gradient_accumulation_steps) < 1:
        fail("epochs, steps, batch sizes and accumulation steps must be positive")
    if not 0 < args.timestep_fraction <= 1:
        fail(f"--timestep-fraction must be in (0, 1], got {args.timestep_fraction}")
    if args.sample_eta <= 0:
        fail("--sample-eta must be > 0: with eta = 0 DDIM is deterministic and has no log-density "
             "to train")
    if args.sample_batch_size % args.train_batch_size:
        fail(f"--sample-batch-size {args.sample_batch_size} must be a multiple of "
             f"--train-batch-size {args.train_batch_size}")
    samples = args.sample_batch_size * args.sample_num_batches_per_epoch
    per_step = args.train_batch_size * args.gradient_accumulation_steps
    if samples % per_step:
        fail(f"the {samples} samples per epoch must split into optimizer steps of "
             f"--train-batch-size x --gradient-accumulation-steps = {per_step}")
    if args.objective == "sf" and (args.num_inner_epochs != 1 or samples != per_step):
        fail(f"DDPO_SF is on-policy: one gradient step per epoch, so --num-inner-epochs 1 and "
             f"--gradient-accumulation-steps {samples // args.train_batch_size}")
    return samples, samples // per_step * args.num_inner_epochs


def load_checkpoint(args: Args, accelerator, unet, optimizer):
    """--resume: a ddpo.py checkpoint's trainable weights (exactly the model's: strict=False alone
    loads nothing on a name mismatch), optimizer and per-prompt statistics, or one sentence.
    Returns the epochs done, the run's history and the per-prompt statistics (none to start)."""
    path = args.resume
    if path is None:
        return 0, {"train": [], "eval": []}, {}
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
    if ck["use_lora"] != args.use_lora or ck["model"] != args.model:
        fail(f"{path} was trained with --model {ck['model']} --use-lora {ck['use_lora']}")
    state = ck["trainable"]
    shapes = {n: p.shape for n, p in unet.named_parameters() if p.requires_grad}
    wrong = sorted(set(state) ^ set(shapes))
    wrong += sorted(n for n in set(state) & set(shapes) if state[n].shape != shapes[n])
    if wrong:
        fail(f"{path} does not match the model's trainable weights ({len(wrong)} names or "
             f"shapes differ, e.g. {wrong[0]}; same --model, --use-lora and --lora-rank?)")
    unet.load_state_dict(state, strict=False)  # strict=False: the frozen weights are not in it
    optimizer.load_state_dict(ck["optimizer"])
    accelerator.print(f"resumed from {path} after epoch {ck['epoch']}")
    stats = {k: deque(v, maxlen=args.stat_buffer_size) for k, v in ck["stats"].items()}
    return ck["epoch"] + 1, ck["history"], stats


def save_checkpoint(run_dir, args: Args, accelerator, unet, optimizer, stats, history, epoch):
    """checkpoint.pt, atomically: trainable weights, optimizer, per-prompt statistics, history."""
    trainable = {n: p.detach() for n, p in accelerator.unwrap_model(unet).named_parameters()
                 if p.requires_grad}
    path = os.path.join(run_dir, "checkpoint.pt")
    torch.save({"script": "ddpo.py", "trainable": trainable, "optimizer": optimizer.state_dict(),
                "epoch": epoch - 1, "model": args.model, "use_lora": args.use_lora,  # 0-based
                "history": history, "stats": {k: list(v) for k, v in stats.items()}},
               path + ".tmp")
    os.replace(path + ".tmp", path)


def save_grid(images: torch.Tensor, path: str, columns: int = 8):
    """Images (B, 3, H, W) in [0, 1] side by side in rows of `columns` (white after the last), as
    one PNG."""
    b, _, h, w = images.shape
    rows, columns = math.ceil(b / columns), min(b, columns)
    grid = torch.cat([images.float().cpu(), torch.ones(rows * columns - b, 3, h, w)])
    grid = grid.view(rows, columns, 3, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, -1, 3)
    Image.fromarray((grid.numpy() * 255).round().astype(np.uint8)).save(path)


if __name__ == "__main__":
    main(tyro.cli(Args))
