"""Shared defaults for every infd_jax config, in one place.

Numbers follow the official FFHQ setting (REFERENCE.md 2, 4 and 6).
Experiment files (`ffhq.py`, `ffhq_mix6k.py`, `custom.py`, `demo.py`,
`tiny.py`) start from `base()` and override only what differs.

The `stage` field picks the job: `ae` (train the autoencoder), `dm` (train the
latent diffusion model), `sample` (generate images at any resolution), `eval`
(pFID and reconstruction metrics), `condition` (guided sampling: super-resolution,
inpainting, text on regions), `all` (ae -> dm -> sample, used by the demo), and
the text-to-image recipe on Stable Diffusion (docs/text_to_image.md): `t2i_unet`
(fine-tune SD's UNet on captioned images) and `t2i` (generate from prompts).
"""

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `key=value,key2=value2` (the part after `:` in `--config=f.py:arg`).

  Values are typed after the defaults; unknown keys fail with their name.
  """
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise KeyError(f"Unknown config arg {key!r}; known: {sorted(defaults)}")
    kind = type(defaults[key])
    parsed[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
  return parsed


def base() -> ml_collections.ConfigDict:
  """The official full-size FFHQ setting; experiment configs override parts of it."""
  c = ml_collections.ConfigDict()
  c.stage = "ae"
  c.seed = 0
  # JAX's persistent compilation cache (infd_jax/compile_cache.py): "default"
  # (~/.cache/infd_jax/jax, or $JAX_COMPILATION_CACHE_DIR), "off", or a folder.
  c.compile_cache = "default"
  # Stage `all` ends with <workdir>/contact_sheet.png and demo.json (the demo's summary).
  c.contact_sheet = False

  # Data (infd_jax/data/pipeline.py documents every key; "" and 0 mean unset: variant ""
  # is the dataset's default, native for ffhq). The pipeline takes its defaults from here.
  # An empty data_dir means `<workdir>/data`.
  c.data = ml_collections.ConfigDict(dict(
      name="ffhq", data_dir="", variant="", split="train", eval_split="val",
      dm_variant="lanczos256", dm_split="train", source="",
      inp_res=256, patch=256, gt_res_min=256, gt_res_max=1024, p_whole=0.0, p_max=0.0,
      p_lr=0.5, resize=0, dm_resize=0, fast_crop=True, read_threads=4, num_workers=4,
      prefetch_buffer=2, inp_crop=0.0))  # inp_crop > 0: demo-only stage-1 windows

  # Stage 1 (REFERENCE.md 2.1, 3): VQ-f4 autoencoder + CLIF renderer.
  c.ae = ml_collections.ConfigDict(dict(
      ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, z_channels=3, num_codes=8192,
      vq_beta=0.25, renderer_hidden=256,
      codebook_init=0.0,   # 0: official U(-1/N, 1/N) codes; the demo starts them wider
      norm_groups=32,      # GroupNorm groups (32: official; the demo's narrow nets use fewer)
      renderer_normalize=True,  # the renderer's GroupNorms (official); the demo drops them
      mid_attention=True,  # self-attention in the encoder's and decoder's mid stage (official)
      kl_encoder=False,    # True: Stable Diffusion's KL encoder (mean of 2 z_channels moments)
      decoder_ch_mult=(),  # the decoder's levels if not ch_mult's: more upsample phi further
      input_colour=()))    # 12 numbers: an affine RGB map before the encoder (3x3, offsets)
  c.disc = ml_collections.ConfigDict(dict(ndf=64, n_layers=3))
  c.loss = ml_collections.ConfigDict(dict(
      l1=1.0, perc=1.0, quant=1.0, gan_g=0.75, adaptive_gan_weight=True,
      gan_start_step=0, lpips_train_dropout=True))

  # Stage 2 (REFERENCE.md 2.2, 6): ADM UNet on the pre-quantization latent.
  c.dm = ml_collections.ConfigDict(dict(
      model_channels=224, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
      attention_resolutions=(8, 4, 2), num_head_channels=32,
      attention_impl="xla",       # or "cudnn" (fused flash attention; GPU, bfloat16 compute)
      norm_groups=32))            # GroupNorm groups (32: official)
  # latent_scale: the DM trains on latent_scale * z and sampled latents are divided by
  # it before decoding (LDM's `scale_factor`). 1.0 = the official INFD (no scaling);
  # 0 = 1 / std of the cached stage-2 training latents, computed when stage 2 starts
  # and saved with its checkpoint (later stages read it from there).
  c.diffusion = ml_collections.ConfigDict(dict(
      num_train_steps=1000, beta_start=0.0015, beta_end=0.0195,
      sample_steps=200, eta=1.0, latent_scale=1.0,
      x0_rms_max=0.0))  # > 0: demo-only bound on the RMS of each step's x0 (0: official)

  c.optim = ml_collections.ConfigDict(dict(
      ae_lr=3.6e-5, ae_b1=0.5, ae_b2=0.9,
      dm_lr=9.6e-5, dm_weight_decay=0.01, dm_ema=0.9999,
      cosine_decay=False,  # False: constant rates (official); True: cosine to 0 at each stage's end
      ae_frozen=()))       # stage-1 parts left untouched, e.g. ("encoder",) on SD's latents

  c.train = ml_collections.ConfigDict(dict(
      ae_batch_size=8, ae_steps=1_000_000,
      dm_batch_size=48, dm_steps=600_000,
      compute_dtype="float32",     # "bfloat16" for speed (params stay float32); "float64" with x64
      log_every=100, ckpt_every=10_000, keep_checkpoints=3,
      vis_every=100_000, eval_every=50_000, eval_batches=0,  # 0 = whole split
      on_nonfinite="stop",         # "stop" (keep last good checkpoint) or "skip" the step
      latent_cache=True))          # encode the DM dataset once instead of every step

  # Generation (REFERENCE.md 7): official tiling 256 + 8 context.
  # `window` = (top, left, height, width): render only that region of each size.
  # Sizes above `stream_above` pixels a side stream into pyramidal BigTIFFs.
  # The latent sampler makes diffusion.sample_steps model calls: "ddim" (official;
  # eta = diffusion.eta), or the ODE solvers "dpmpp_2m" (DPM-Solver++ 2M) and "unipc"
  # (UniPC-2, B(h) = e^h - 1), which need far fewer steps (docs/samplers.md).
  # spacing picks the steps: "uniform" (DDIM's strides; the official), "logsnr"
  # (uniform in log-SNR), "quadratic".
  c.sample = ml_collections.ConfigDict(dict(
      num_samples=8, batch_size=8, sizes=(256, 1024), tile=256, pad=8,
      tiles_per_call=16, use_ema=True, quantize=True, seed=0, out_dir="",
      window=(), stream_above=16384, sampler="ddim", spacing="uniform"))

  # Guided sampling (`stage=condition`, infd_jax/guidance/task.py documents `regions`):
  # conditions on boxes of virtual images, DPS guidance on sampler iterations
  # guide_start, +guide_every, ... < guide_stop (-1 = all; 0 = the noisiest).
  # Outputs are written as `sample`'s: `window` crops each size, sizes above
  # sample.stream_above stream into BigTIFFs, the tiling is sample.tile / pad.
  # init_image + start < 1: begin at that share of the DDIM iterations from the
  # image's latent (SDEdit / CCDF; e.g. the low-resolution observation itself);
  # fit_steps > 0: refine each guided step's x0 by that many Adam steps (fit_lr)
  # instead of DPS's gradient through the UNet, then re-noise it with DiffPIR's
  # fit_zeta (1: fresh noise; guidance.sampler.Refine).
  c.condition = ml_collections.ConfigDict(dict(
      regions="", sizes=(256,), window=(), num_samples=1, batch_size=1, seed=0,
      guide_start=0, guide_stop=-1, guide_every=1, init_image="", start=1.0, fit_steps=0,
      fit_lr=0.05, fit_zeta=1.0,
      clip_checkpoint="", clip_vocab="", out_dir=""))

  # Evaluation (REFERENCE.md 8) and scale consistency.
  c.eval = ml_collections.ConfigDict(dict(
      real_dir="", fake_dir="", resolution=1024, inception_weights="",
      patch_sizes=(),  # pFID patch sizes; empty = the protocol's sizes for the resolution
      batch_size=32, max_images=0, recon_resolutions=(256, 512, 1024),
      scale_consistency_base=256, scale_factors=(2, 4)))

  # Text to image on Stable Diffusion (docs/text_to_image.md). sd_weights: the folder of
  # `python -m infd_jax.convert.sd` (UNet, KL autoencoder, text tower); with ae.kl_encoder
  # a fresh stage 1 starts its encoder from it. vocab: CLIP's BPE merges file
  # (bpe_simple_vocab_16e6.txt.gz). caption_feature: the record feature holding each
  # image's caption (image_folder: the sidecar <image>.txt). `t2i_unet` trains with the
  # stage-2 settings (train.dm_*, optim.dm_*, data.dm_*, data.inp_res) and replaces
  # captions by the empty one with probability uncond_prob; `t2i` writes
  # sample.num_samples images per prompt at sample.sizes with classifier-free guidance.
  c.t2i = ml_collections.ConfigDict(dict(
      sd_weights="", vocab="", caption_feature="caption", uncond_prob=0.1,
      prompts=(), guidance_scale=7.5))

  # Checkpoints: stage 2 reads stage 1 read-only from `ae_checkpoint`
  # (a workdir or a converted official checkpoint); empty = this workdir.
  c.ckpt = ml_collections.ConfigDict(dict(ae_checkpoint="", dm_checkpoint=""))

  # Mesh: -1 = all remaining devices. Rules map logical parameter axes to mesh
  # axes; with fsdp > 1 parameters and optimizer state shard over `fsdp`.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.mesh.rules = (("conv_out", "fsdp"), ("mlp_out", "fsdp"), ("codes", "fsdp"))
  return c
