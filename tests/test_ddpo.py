"""ddpo.py: the DDIM log-density, the clipped objective, per-prompt advantages, rewards, the loop
through main() on the tiny model and on a saved diffusers folder, and bad input."""

import io
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import check_resume_refuses_non_checkpoints, run_script, tensorboard_events

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
import ddpo  # noqa: E402


def sd_scheduler(steps=10):
    s = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1)
    s.set_timesteps(steps)
    return s


def tiny_cli(tmp_path, *extra):
    return ["--model", "tiny", "--tiny-pretrain-steps", "0", "--sample-num-steps", "5", "--num-epochs", "1", "--sample-batch-size", "2",
            "--sample-num-batches-per-epoch", "1", "--train-batch-size", "2", "--gradient-accumulation-steps", "1",
            "--eval-images", "2", "--run-dir", str(tmp_path / "run"), *extra]


# ----------------------------------------------------------------------------- the policy's log-density
@pytest.mark.parametrize("t", [901, 501, 1])  # 1: the last step, whose x_{t-1} uses final_alpha_cumprod
def test_ddim_step_logprob_is_the_gaussian_density(t):
    scheduler = sd_scheduler(10)
    torch.manual_seed(0)
    x_t, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    prev, log_prob = ddpo.ddim_step_with_logprob(scheduler, eps, torch.tensor(t), x_t, eta=1.0)

    a = scheduler.alphas_cumprod
    a_t = a[t]
    a_prev = a[t - 100] if t >= 100 else scheduler.final_alpha_cumprod
    x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    sigma = ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps
    expected = torch.distributions.Normal(mean, sigma).log_prob(prev).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, expected, rtol=1e-5, atol=1e-5)
    # the mean is diffusers' own DDIM step without its noise
    ref = scheduler.step(eps, t, x_t, eta=1.0, variance_noise=torch.zeros_like(x_t)).prev_sample
    torch.testing.assert_close(mean, ref, rtol=1e-5, atol=1e-5)
    # scoring a given x_{t-1} gives the same number, and one timestep per sample works as a scalar does
    t_batch = torch.tensor([t, 501, 901])
    _, batched = ddpo.ddim_step_with_logprob(scheduler, eps, t_batch, x_t, eta=1.0, prev_sample=prev)
    assert torch.allclose(batched[0], log_prob[0], atol=1e-6)
    for i in (1, 2):
        _, single = ddpo.ddim_step_with_logprob(scheduler, eps[i:i + 1], t_batch[i], x_t[i:i + 1], 1.0, prev[i:i + 1])
        assert torch.allclose(batched[i], single[0], atol=1e-6)


def test_ratio_is_one_on_the_first_inner_step():
    """Re-scoring the sampled trajectory with the same weights, shuffled and in train mode, as the
    training loop does, gives exactly the sampler's log-probabilities."""
    args = ddpo.Args(model="tiny", sample_num_steps=6)
    model = ddpo.build_tiny(pretrain_steps=0)
    unet, text_encoder, tokenizer, scheduler, _ = model
    from peft import LoraConfig
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    ids = tokenizer(["cat", "dog", "fox"], return_tensors="pt", padding="max_length", max_length=77).input_ids
    neg_ids = tokenizer([""], return_tensors="pt", padding="max_length", max_length=77).input_ids
    with torch.no_grad():
        embeds, neg = text_encoder(ids)[0], text_encoder(neg_ids)[0].expand(3, -1, -1)
    unet.eval()
    torch.manual_seed(0)
    images, latents, old_log_probs, timesteps = ddpo.sample_with_logprob(model, embeds, neg, args,
                                                                         16)
    assert latents.shape == (3, 7, 3, 16, 16) and old_log_probs.shape == (3, 6)
    assert torch.equal(images, (latents[:, -1] / 2 + 0.5).clamp(0, 1))  # the reward sees x_0

    unet.train()
    perm = torch.tensor([2, 0, 1])
    for j in torch.randperm(6):
        eps = ddpo.guided_eps(unet, latents[perm, j], timesteps[j].repeat(3), embeds[perm], neg, args.guidance_scale)
        _, log_prob = ddpo.ddim_step_with_logprob(scheduler, eps, timesteps[j].repeat(3), latents[perm, j], 1.0,
                                                  prev_sample=latents[perm, j + 1])
        loss, ratio = ddpo.ddpo_loss(log_prob, old_log_probs[perm, j], torch.tensor([1.0, -1.0, 0.5]), args)
        assert torch.allclose(ratio, torch.ones(3), atol=1e-5), ratio
        loss.backward()  # and the surrogate has a gradient at ratio 1 (the unclipped branch)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.parameters() if p.requires_grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rescoring_a_low_precision_trajectory_gives_ratio_one(dtype):
    """Under mixed precision the latents are stored in fp16/bf16. Each step's log-density must be that of
    the stored x_{t-1}, so that re-scoring it (as training does) gives ratio 1; the official code scores
    the float32 x_{t-1} before the cast (ratios ~1e-4 to 1e-3 from 1 at the last steps, the clip's size)."""
    scheduler = sd_scheduler(50)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=g).to(dtype)
    for t in scheduler.timesteps:
        eps = torch.randn(x.shape, generator=g).to(dtype)
        prev, log_prob = ddpo.ddim_step_with_logprob(scheduler, eps, t, x, 1.0, generator=g)
        _, rescored = ddpo.ddim_step_with_logprob(scheduler, eps, t, x, 1.0, prev_sample=prev)
        assert prev.dtype == dtype and log_prob.dtype == torch.float32
        assert (rescored - log_prob).abs().max() < 1e-6, (int(t), (rescored - log_prob).abs().max())
        x = prev


def test_the_tiny_sampler_in_bf16_rescores_its_trajectory_at_ratio_one():
    args = ddpo.Args(model="tiny", sample_num_steps=4)
    model = ddpo.build_tiny(pretrain_steps=0)
    unet, text_encoder, tokenizer, scheduler, _ = model
    unet.to(torch.bfloat16).eval()
    ids = tokenizer(["cat", "dog", ""], return_tensors="pt", padding="max_length", max_length=77).input_ids
    with torch.no_grad():
        e = text_encoder(ids)[0].to(torch.bfloat16)
        embeds, neg = e[:2], e[2:].expand(2, -1, -1)
        _, latents, old_log_probs, timesteps = ddpo.sample_with_logprob(model, embeds, neg, args, 16)
        assert latents.dtype == torch.bfloat16
        for j in range(4):
            eps = ddpo.guided_eps(unet, latents[:, j], timesteps[j].repeat(2), embeds, neg, args.guidance_scale)
            _, log_prob = ddpo.ddim_step_with_logprob(scheduler, eps, timesteps[j].repeat(2), latents[:, j], 1.0,
                                                      prev_sample=latents[:, j + 1])
            assert (log_prob - old_log_probs[:, j]).abs().max() < 1e-6, (j, log_prob - old_log_probs[:, j])


def spy_on_the_loss(monkeypatch):
    """Record every call main() makes to ddpo_loss: (log_prob, old_log_prob, advantages, ratio)."""
    calls, real = [], ddpo.ddpo_loss

    def spy(log_prob, old_log_prob, advantages, args):
        loss, ratio = real(log_prob, old_log_prob, advantages, args)
        calls.append([x.detach().clone() for x in (log_prob, old_log_prob, advantages, ratio)])
        return loss, ratio
    monkeypatch.setattr(ddpo, "ddpo_loss", spy)
    return calls


def test_main_rescores_at_ratio_one_until_the_first_update(tmp_path, monkeypatch):
    """Inside main()'s loop the stored x_t, x_{t-1}, t and log p_old stay aligned through the shuffles:
    every backward pass before the first optimizer step (2 batches x 4 timesteps) has ratio 1."""
    calls = spy_on_the_loss(monkeypatch)
    args = ddpo.Args(model="tiny", tiny_pretrain_steps=0, sample_num_steps=4, num_epochs=1, sample_batch_size=4,
                     sample_num_batches_per_epoch=2, train_batch_size=2, gradient_accumulation_steps=2,
                     sample_eta=0.8, eval_images=2, run_dir=str(tmp_path / "run"), device="cpu")
    out = ddpo.main(args)
    assert out["updates"] == 2 and len(calls) == 16
    for log_prob, old, _, ratio in calls[:8]:
        assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5), ratio
    # the first step moved the policy: max |ratio - 1| 1.8e-4 to 1.2e-3, seeds 0-9 (before: <1.3e-6)
    assert any((ratio - 1).abs().max() > 2e-5 for *_, ratio in calls[8:])


@pytest.mark.parametrize("per_prompt", [True, False])
def test_one_update_raises_the_log_prob_of_high_advantage_samples(tmp_path, monkeypatch, per_prompt):
    """Rewards 0, 1, 2, 3 by sample; after main()'s one optimizer step (seen by the second inner epoch),
    each trajectory's log-probability sum_t log p(x_{t-1} | x_t) moved in the direction of its advantage."""
    sampled = []
    real_sample = ddpo.sample_with_logprob

    def sample_spy(*a, **k):
        out = real_sample(*a, **k)
        sampled.append(out[2])
        return out
    monkeypatch.setattr(ddpo, "sample_with_logprob", sample_spy)
    monkeypatch.setattr(ddpo, "make_reward", lambda args, device: lambda images, prompts: np.arange(len(images), dtype=float))
    calls = spy_on_the_loss(monkeypatch)
    args = ddpo.Args(model="tiny", tiny_pretrain_steps=0, sample_num_steps=4, num_epochs=1, sample_batch_size=4,
                     sample_num_batches_per_epoch=1, train_batch_size=2, gradient_accumulation_steps=2,
                     num_inner_epochs=2, use_lora=False, learning_rate=1e-5, per_prompt_stat_tracking=per_prompt,
                     eval_images=2, run_dir=str(tmp_path / "run"), device="cpu")
    assert ddpo.main(args)["updates"] == 2
    old_log_probs = sampled[1]  # sampled[0] is the evaluation before training
    assert len(calls) == 16 and old_log_probs.shape == (4, 4)
    expected_advantages = (np.arange(4) - 1.5) / np.std(np.arange(4))  # the batch's statistics (per prompt: < min_count)
    moved = torch.zeros(4)
    for log_prob, old, advantages, _ in calls[8:]:  # the second inner epoch: after exactly one update
        for lp, o, a in zip(log_prob, old, advantages):
            sample = (old_log_probs == o).any(dim=1).nonzero().item()  # which trajectory this row is
            assert a.item() == pytest.approx(expected_advantages[sample], abs=1e-5)  # its own advantage
            moved[sample] += lp - o
    assert moved[0] < 0 and moved[1] < 0 and moved[2] > 0 and moved[3] > 0, moved


def test_ddpo_loss_by_hand():
    args = ddpo.Args(clip_range=0.2, adv_clip_max=5.0)
    old = torch.zeros(4)
    log_prob = torch.log(torch.tensor([1.5, 0.5, 1.1, 1.0]))
    adv = torch.tensor([2.0, -1.0, 7.0, -9.0])  # the last two are clipped to +-5
    loss, ratio = ddpo.ddpo_loss(log_prob, old, adv, args)
    # per sample max(-A r, -A clip(r)): max(-3, -2.4), max(.5, .8), max(-5.5, -5.5), max(5, 5)
    assert torch.allclose(loss, torch.tensor((-2.4 + 0.8 - 5.5 + 5.0) / 4))
    assert torch.allclose(ratio, torch.tensor([1.5, 0.5, 1.1, 1.0]))
    # at ratio 1, DDPO_IS and DDPO_SF have the same gradient: d rho = rho d log p
    lp = torch.zeros(4, requires_grad=True)
    g_is, = torch.autograd.grad(ddpo.ddpo_loss(lp, old, adv, args)[0], lp)
    g_sf, = torch.autograd.grad(ddpo.ddpo_loss(lp, old, adv, ddpo.Args(objective="sf"))[0], lp)
    assert torch.allclose(g_is, g_sf) and torch.allclose(g_is, -adv.clamp(-5, 5) / 4)


def test_guidance_by_hand():
    """eps_u + w (eps_c - eps_u), eps_u from the empty prompt: a stub UNet returns x c[0, 0]."""
    def unet(x, t, encoder_hidden_states):
        assert t.shape == (len(x),)
        return SimpleNamespace(sample=x * encoder_hidden_states[:, :1, :1, None])
    x, c, u = torch.ones(2, 3, 4, 4), torch.full((2, 77, 8), 3.0), torch.full((2, 77, 8), 1.0)
    assert torch.all(ddpo.guided_eps(unet, x, torch.tensor(5), c, u, 5.0) == 1 + 5 * (3 - 1))
    assert torch.all(ddpo.guided_eps(unet, x, torch.tensor(5), c, u, 5.0, cfg=False) == 3)


def test_each_process_keeps_its_own_advantages():
    """Two processes: the rewards are gathered (process 0's first), statistics over all four, and
    process 1 trains on the last two advantages."""
    acc = SimpleNamespace(num_processes=2, process_index=1, device=torch.device("cpu"),
                          gather=lambda x: torch.cat([torch.tensor([11.0, 12.0]), x]))
    args = ddpo.Args(per_prompt_stat_tracking=False)
    adv, rewards = ddpo.compute_advantages(args, acc, None, None, torch.tensor([1.0, 2.0]), None)
    np.testing.assert_allclose(rewards, [11, 12, 1, 2])
    std = math.sqrt((5.5**2 + 4.5**2) / 2)  # of 11, 12, 1, 2 around their mean 6.5
    torch.testing.assert_close(adv, torch.tensor([(1 - 6.5) / std, (2 - 6.5) / std]))


def test_main_per_prompt_advantages_by_hand(tmp_path, monkeypatch):
    """Through main(), 3 epochs (the last two after --resume) of 4 samples with chosen prompts and
    rewards: each advantage uses its own prompt's last 3 rewards (buffer 3, min count 2), carried
    across epochs and through the checkpoint, or the batch's statistics below 2."""
    (tmp_path / "prompts.txt").write_text("grid\ncat\ndog\n")  # the 1-image eval grid is "grid"
    order = iter("cat cat cat dog  dog dog cat cat  cat dog dog dog".split())
    real_choice = ddpo.random.choice
    monkeypatch.setattr(ddpo.random, "choice",
                        lambda seq: next(order) if "dog" in seq else real_choice(seq))
    n = iter(range(1, 13))  # sample k's reward: k, +10 for a dog
    monkeypatch.setattr(ddpo, "make_reward", lambda args, device: lambda images, prompts: np.array(
        [0.0 if p == "grid" else next(n) + 10.0 * (p == "dog") for p in prompts]))
    seen, real_train = [], ddpo.train_epoch
    monkeypatch.setattr(ddpo, "train_epoch",
                        lambda *a: seen.append(a[5]["advantages"].clone()) or real_train(*a))
    args = ddpo.Args(model="tiny", tiny_pretrain_steps=0, prompts=str(tmp_path / "prompts.txt"),
                     sample_num_steps=2, num_epochs=1, sample_batch_size=4,
                     sample_num_batches_per_epoch=1, train_batch_size=2,
                     gradient_accumulation_steps=2, stat_buffer_size=3, stat_min_count=2,
                     eval_interval=0, eval_images=1, run_dir=str(tmp_path / "run"), device="cpu")
    ddpo.main(args)
    resume = str(tmp_path / "run" / "checkpoint.pt")
    ddpo.main(ddpo.Args(**{**vars(args), "num_epochs": 3, "resume": resume, "run_dir": None}))
    s3, s4 = np.std([1, 2, 3]), np.std([1, 2, 3, 14])  # of 3 consecutive rewards; epoch 1's batch
    expected = [[-1 / s3, 0, 1 / s3, (14 - 5) / s4],  # epoch 1: cats 1, 2, 3 (own), dog 14 (batch)
                [0, 1 / s3, 1 / np.std([3, 7, 8]), 2 / np.std([3, 7, 8])],  # dogs 15, 16; cats 7, 8
                [1 / s3, -1 / s3, 0, 1 / s3]]  # cat 9 (7, 8, 9); dogs 20, 21, 22
    assert len(seen) == 3
    for got, want in zip(seen, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)  # std + 1e-6: < 2e-6


def test_each_optimizer_step_is_the_clipped_mean_of_its_backward_passes(tmp_path, monkeypatch):
    """One AdamW step per gradient_accumulation_steps x T backward passes, on the mean of their
    gradients (accelerate divides each loss by that count), clipped to max_grad_norm."""
    params, pass_grads, step_grads = [], [], []
    real_loss = ddpo.ddpo_loss

    def loss_spy(*a):
        loss, ratio = real_loss(*a)
        grads = torch.autograd.grad(loss, params, retain_graph=True, materialize_grads=True)
        pass_grads.append(torch.cat([g.flatten() for g in grads]))
        return loss, ratio

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, trainable, **kwargs):  # main() gives it the trainable weights
            params.extend(trainable)
            super().__init__(params, **kwargs)

        def step(self, closure=None):
            step_grads.append(torch.cat([p.grad.flatten() for p in params]))
            return super().step(closure)
    monkeypatch.setattr(ddpo, "ddpo_loss", loss_spy)
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    args = ddpo.Args(model="tiny", tiny_pretrain_steps=0, sample_num_steps=3, num_epochs=1,
                     sample_batch_size=4, sample_num_batches_per_epoch=1, train_batch_size=2,
                     gradient_accumulation_steps=2, num_inner_epochs=2, max_grad_norm=1e-5,
                     eval_images=1, run_dir=str(tmp_path / "run"), device="cpu")
    assert ddpo.main(args)["updates"] == 2 and len(step_grads) == 2 and len(pass_grads) == 2 * 2 * 3
    for k, got in enumerate(step_grads):
        mean = torch.stack(pass_grads[6 * k:6 * k + 6]).mean(0)
        assert mean.norm() > 10 * args.max_grad_norm  # so the clip acts (160-10,000x, seeds 0-9)
        want = mean * args.max_grad_norm / (mean.norm() + 1e-6)
        assert (got - want).norm() < 1e-4 * want.norm(), (k, (got - want).norm() / want.norm())


def test_per_prompt_stat_tracking_by_hand():
    """compute_advantages on one process: prompts decoded from their token ids (a stub tokenizer)."""
    names = ["a", "b"]
    acc = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"), gather=lambda x: x)
    tokenizer = SimpleNamespace(batch_decode=lambda ids, skip_special_tokens: [names[i] for i in ids])
    args, stats = ddpo.Args(stat_buffer_size=4, stat_min_count=3), {}

    def update(prompts, rewards):
        ids = torch.tensor([names.index(p) for p in prompts])
        rewards = torch.tensor(rewards, dtype=torch.float64)
        return ddpo.compute_advantages(args, acc, stats, tokenizer, rewards, ids)[0].numpy()
    batch_std = np.std([1.0, 3.0, 5.0]) + 1e-6
    adv = update(["a", "a", "b"], [1.0, 3.0, 5.0])
    np.testing.assert_allclose(adv, [(1 - 3) / batch_std, 0.0, (5 - 3) / batch_std], rtol=1e-6)  # too few: the batch's
    adv = update(["a", "b"], [5.0, 7.0])
    # a has 3 rewards now (1, 3, 5): its own stats; b has 2 (5, 7): the batch's (5, 7)
    np.testing.assert_allclose(adv, [(5 - 3) / (np.std([1, 3, 5]) + 1e-6), (7 - 6) / (1 + 1e-6)], rtol=1e-6)
    adv = update(["a", "a"], [7.0, 9.0])
    # the buffer keeps the last 4: 3, 5, 7, 9
    np.testing.assert_allclose(adv, (np.array([7.0, 9.0]) - 6) / (np.std([3, 5, 7, 9]) + 1e-6), rtol=1e-6)
    assert list(stats["a"]) == [3, 5, 7, 9] and list(stats["b"]) == [5, 7]


# ----------------------------------------------------------------------------- rewards
def test_jpeg_rewards():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noise])
    compress = ddpo.make_reward(ddpo.Args(reward="jpeg_compressibility"), torch.device("cpu"))
    incompress = ddpo.make_reward(ddpo.Args(reward="jpeg_incompressibility"), torch.device("cpu"))
    sizes = incompress(images, ["a", "b"])
    buffer = io.BytesIO()
    Image.fromarray((noise[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buffer, "JPEG", quality=95)
    assert sizes[1] == pytest.approx(len(buffer.getvalue()) / 1000)
    assert sizes[0] < sizes[1] / 5
    np.testing.assert_allclose(compress(images, ["a", "b"]), -incompress(images, ["a", "b"]))
    assert compress(images, ["a", "b"])[0] > compress(images, ["a", "b"])[1]


def test_synthetic_pretraining_data_spans_the_reward():
    """Half the tiny model's pretraining images are smooth gradients, half are grainy; JPEG tells them apart."""
    g = torch.Generator().manual_seed(0)
    x = ddpo.synthetic_images(torch.zeros(200, 3), 16, g)
    assert x.shape == (200, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    grainy = (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(1, 2, 3)) > 0.1  # a smooth gradient steps by < 0.04
    assert 0.35 < grainy.float().mean() < 0.65
    sizes = ddpo.make_reward(ddpo.Args(reward="jpeg_incompressibility"), torch.device("cpu"))(x / 2 + 0.5, None)
    assert sizes[grainy].mean() > sizes[~grainy].mean() + 0.05


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny CLIP (image 32x32, projection 16) and an aesthetic head for it, saved as files."""
    folder = tmp_path_factory.mktemp("clip")
    tokenizer = ddpo.build_tiny(pretrain_steps=0)[2]  # the character-level CLIP tokenizer
    vocab = tokenizer.get_vocab()
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8), projection_dim=16)
    transformers.CLIPModel(config).save_pretrained(folder / "clip")
    processor = transformers.CLIPProcessor(
        image_processor=transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer)
    processor.save_pretrained(folder / "clip")
    head = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Dropout(0.2), torch.nn.Linear(24, 8),
                               torch.nn.Dropout(0.2), torch.nn.Linear(8, 6), torch.nn.Dropout(0.1),
                               torch.nn.Linear(6, 4), torch.nn.Linear(4, 1))
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, folder / "head.pth")
    return str(folder / "clip"), str(folder / "head.pth"), head


def test_aesthetic_and_clip_score_rewards(tiny_clip):
    clip_dir, head_path, head = tiny_clip
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    prompts = ["a cat", "a dog", "a fox"]
    clip = transformers.CLIPModel.from_pretrained(clip_dir).eval()
    processor = transformers.CLIPProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        pixels = processor(images=list((images * 255).round().to(torch.uint8)), return_tensors="pt")["pixel_values"]
        features = lambda out: getattr(out, "pooler_output", out)  # noqa: E731 (transformers 5: an object)
        img = features(clip.get_image_features(pixel_values=pixels))
        img = img / img.norm(dim=-1, keepdim=True)
        tokens = processor(text=prompts, return_tensors="pt", padding=True)
        txt = features(clip.get_text_features(**tokens))
        txt = txt / txt.norm(dim=-1, keepdim=True)
        expected_aesthetic = head.eval()(img).squeeze(1).numpy()
    aesthetic = ddpo.make_reward(ddpo.Args(reward="aesthetic", clip_model=clip_dir, aesthetic_head=head_path),
                                 torch.device("cpu"))
    np.testing.assert_allclose(aesthetic(images, prompts), expected_aesthetic, rtol=1e-5, atol=1e-6)
    clip_score = ddpo.make_reward(ddpo.Args(reward="clip_score", clip_model=clip_dir), torch.device("cpu"))
    scores = clip_score(images, prompts)
    np.testing.assert_allclose(scores, (img * txt).sum(-1).numpy(), rtol=1e-5, atol=1e-6)
    assert np.all(np.abs(scores) <= 1 + 1e-6)


# ----------------------------------------------------------------------------- the loop
def test_main_tiny_lora_then_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPO_CACHE_DIR", str(tmp_path / "cache"))
    args = ddpo.Args(model="tiny", tiny_pretrain_steps=20, sample_num_steps=10, num_epochs=2, sample_batch_size=4,
                     sample_num_batches_per_epoch=2, train_batch_size=2, gradient_accumulation_steps=2,
                     num_inner_epochs=2, eval_interval=1, eval_images=4, save_freq=1, save_model=True,
                     run_dir=str(tmp_path / "run"), device="cpu")
    out = ddpo.main(args)
    # 2 epochs x 2 inner epochs x 4 batches x 10 timesteps backward passes; one optimizer step per 2 batches
    assert out["backward_passes"] == 160 and out["updates"] == 8
    for k in ("losses/ddpo", "approx_kl", "clipfrac", "reward_mean", "eval/reward"):
        assert math.isfinite(out[k]), k
    run = tmp_path / "run"
    assert sorted(os.listdir(run / "images")) == ["epoch_0000.png", "epoch_0001.png", "epoch_0002.png"]
    assert Image.open(run / "images" / "epoch_0000.png").size == (4 * 16, 16)
    assert (run / "train.csv").read_text().count("\n") == 3 and (run / "eval.csv").read_text().count("\n") == 4
    assert tensorboard_events(str(run)) and (run / "checkpoint.pt").exists()
    assert any(f.endswith(".safetensors") for f in os.listdir(run / "lora"))
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and all("lora" in k for k in ckpt["trainable"]) and ckpt["stats"]

    # the pretrained tiny UNet was cached, and a second build loads exactly it
    cached = torch.load(tmp_path / "cache" / "tiny-unet-v1-20-0.pt")
    rebuilt = ddpo.build_tiny(pretrain_steps=20)[0].state_dict()
    assert all(torch.equal(cached[k], rebuilt[k]) for k in cached)
    assert not all(torch.equal(cached[k], v) for k, v in ddpo.build_tiny(pretrain_steps=0)[0].state_dict().items())

    resumed = ddpo.main(ddpo.Args(**{**vars(args), "num_epochs": 3, "resume": str(run / "checkpoint.pt"),
                                     "run_dir": None, "save_model": False}))
    assert resumed["backward_passes"] == 80 and (run / "train.csv").read_text().count("\n") == 4


def test_resume_loads_exactly_the_checkpoint_and_refuses_a_mismatched_one(tmp_path):
    args = ddpo.Args(model="tiny", tiny_pretrain_steps=0, sample_num_steps=3, num_epochs=1, sample_batch_size=2,
                     sample_num_batches_per_epoch=1, train_batch_size=2, gradient_accumulation_steps=1,
                     use_lora=False, eval_images=2, run_dir=str(tmp_path / "run"), device="cpu")
    ddpo.main(args)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    fresh = ddpo.build_tiny(pretrain_steps=0)[0].state_dict()
    assert set(ckpt["trainable"]) == set(fresh) and any(not torch.equal(v, fresh[k]) for k, v in ckpt["trainable"].items())
    # resumed with nothing left to train, --save-model writes the weights main() holds after loading
    ddpo.main(ddpo.Args(**{**vars(args), "resume": str(tmp_path / "run" / "checkpoint.pt"), "run_dir": None,
                           "save_model": True}))
    loaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "run" / "unet").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in ckpt["trainable"].items())

    def resume_from(name, trainable, **overrides):
        (tmp_path / name).mkdir()
        torch.save({**ckpt, "trainable": trainable}, tmp_path / name / "checkpoint.pt")
        return ddpo.Args(**{**vars(args), "resume": str(tmp_path / name / "checkpoint.pt"), "run_dir": None, **overrides})

    renamed = {"module." + k: v for k, v in ckpt["trainable"].items()}  # loaded with strict=False: nothing at all
    with pytest.raises(SystemExit, match="does not match the model"):
        ddpo.main(resume_from("renamed", renamed))
    partial = dict(list(ckpt["trainable"].items())[:5])
    with pytest.raises(SystemExit, match="does not match the model"):
        ddpo.main(resume_from("partial", partial))
    reshaped = {k: v[..., :1] if k == "conv_in.weight" else v for k, v in ckpt["trainable"].items()}
    with pytest.raises(SystemExit, match="does not match the model"):
        ddpo.main(resume_from("reshaped", reshaped))


def test_resume_refuses_a_file_that_is_not_a_ddpo_checkpoint(tmp_path):
    sibling = tmp_path / "iql.pt"
    torch.save({"script": "iql.py", "step": 10, "agent": {}}, sibling)
    check_resume_refuses_non_checkpoints(ddpo, tmp_path, lambda path: ddpo.Args(
        model="tiny", tiny_pretrain_steps=0, resume=path, run_dir=str(tmp_path / "run"),
        device="cpu"), sibling)


def tiny_sd_folder(path):
    """A Stable Diffusion pipeline in diffusers' folder layout: VAE (4-channel latents at 1/2 scale),
    UNet, CLIP text encoder and tokenizer, SD's default PNDM scheduler."""
    _, text_encoder, tokenizer, _, _ = ddpo.build_tiny(pretrain_steps=0)  # the tiny model's text side
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                                  sample_size=32)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    scheduler = diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                      scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False).save_pretrained(path)
    return unet


@pytest.mark.parametrize("use_lora", [False, True])
def test_main_loads_a_saved_diffusers_folder(tmp_path, use_lora):
    unet = tiny_sd_folder(tmp_path / "sd")
    args = ddpo.Args(model=str(tmp_path / "sd"), sample_num_steps=4, num_epochs=1, sample_batch_size=4,
                     sample_num_batches_per_epoch=1, train_batch_size=4, gradient_accumulation_steps=1,
                     use_lora=use_lora, save_model=True, eval_images=2, run_dir=str(tmp_path / "run"), device="cpu")
    out = ddpo.main(args)
    assert out["backward_passes"] == 4 and out["updates"] == 1 and math.isfinite(out["losses/ddpo"])
    assert out["reward_std"] > 0  # else every advantage is 0 and nothing trains
    assert Image.open(tmp_path / "run" / "images" / "epoch_0001.png").size == (2 * 32, 32)  # 16x16 latents -> 32 px
    x, t, e = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        before = unet(x, t, encoder_hidden_states=e).sample
        if use_lora:  # the saved adapter loads into the pipeline the diffusers way
            pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "sd")
            pipe.load_lora_weights(str(tmp_path / "run" / "lora"))
            tuned = pipe.unet
        else:  # the whole UNet was fine-tuned and saved
            tuned = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "run" / "unet")
        after = tuned(x, t, encoder_hidden_states=e).sample
    assert (after - before).abs().max() > 0  # bit-identical if nothing was trained or loaded


def test_bf16_mixed_precision_keeps_trainable_weights_in_float32(tmp_path):
    """The GPU path's casts, on a CPU: frozen weights in bf16, LoRA weights in float32, autocast.
    (A separate process: accelerate keeps one precision per process.)"""
    import json
    proc = run_script("ddpo.py", *tiny_cli(tmp_path, "--mixed-precision", "bf16"))
    assert proc.returncode == 0 and "epoch=1 " in proc.stdout, proc.stderr[-3000:]
    assert json.load(open(tmp_path / "run" / "args.json"))["resolved"]["mixed_precision"] == "bf16"
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ckpt["trainable"] and all(v.dtype == torch.float32 for v in ckpt["trainable"].values())


def test_two_processes_gather_rewards(tmp_path):
    """torchrun with 2 CPU processes (gloo): each samples its own batch, advantages use both."""
    import json
    import subprocess
    import sys
    cli = tiny_cli(tmp_path, "--sample-num-steps", "3", "--num-epochs", "2")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           os.path.join(os.path.dirname(os.path.dirname(__file__)), "ddpo.py"), *cli],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("4 samples per epoch") == 1  # 2 per process, gathered; printed once
    assert json.load(open(tmp_path / "run" / "args.json"))["resolved"]["processes"] == 2
    assert (tmp_path / "run" / "train.csv").read_text().count("\n") == 3


@pytest.mark.parametrize("cli, message", [
    (["--reward", "sharpness"], "invalid choice"),
    (["--model", "{empty}"], "not a diffusers pipeline"),
    (["--model", "{notes}"], "could not be loaded"),
    (["--prompts", "{missing}"], "no such file"),
    (["--sample-eta", "0"], "eta = 0"),
    (["--objective", "sf", "--num-inner-epochs", "2"], "on-policy"),
    (["--reward", "aesthetic"], "needs --aesthetic-head"),
    (["--sample-batch-size", "3"], "multiple of --train-batch-size"),
])
def test_bad_input(tmp_path, cli, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "model_index.json").write_text("{}")
    cli = [c.format(empty=tmp_path / "empty", notes=tmp_path / "notes", missing=tmp_path / "no.txt") for c in cli]
    proc = run_script("ddpo.py", *tiny_cli(tmp_path, *cli))
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_nan_loss_stops_and_says_so(tmp_path, monkeypatch):
    real = ddpo.ddpo_loss
    monkeypatch.setattr(ddpo, "ddpo_loss", lambda *a: (real(*a)[0] * float("nan"), real(*a)[1]))
    args = ddpo.Args(model="tiny", tiny_pretrain_steps=0, sample_num_steps=3, num_epochs=2, sample_batch_size=2,
                     sample_num_batches_per_epoch=1, train_batch_size=2, gradient_accumulation_steps=1,
                     eval_images=2, run_dir=str(tmp_path / "run"), device="cpu")
    with pytest.raises(SystemExit, match="DDPO loss became nan in epoch 1"):
        ddpo.main(args)


def test_existing_run_folder_is_never_overwritten(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("old run")
    proc = run_script("ddpo.py", *tiny_cli(tmp_path))
    assert proc.returncode != 0 and "already exists" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "run" / "keep.txt").read_text() == "old run"
