"""Every documented setting given a bad value on the command line: one line, exit code 2, and
nothing compiled or read from the dataset before it (one driver process, a fork per case)."""

import json
import pathlib
import subprocess
import sys

import pytest

from infd_jax import defaults
from tests import processes

ROOT = pathlib.Path(__file__).resolve().parents[1]
PARSE = "flag --config."  # flag parsing refuses a value of the wrong type (and names it)
TEXT = '[{"kind": "text", "size": 32, "prompt": "a face"}]'

# (setting, extra flags, what the one error line must say). Settings checked once the
# devices are known are in DEVICE_CASES; every other case must fail before jax is imported.
CASES = [
    ("stage", ["stage=train"], "config.stage='train'"),
    ("seed", ["seed=x"], PARSE),
    ("compile_cache", ["compile_cache={file}"], "is a file, not a folder"),
    ("contact_sheet", ["contact_sheet=maybe"], PARSE),
    ("data.name", ["data.name=imagenet"], "config.data.name='imagenet': choose one of"),
    ("data.data_dir", ["data.data_dir=gs://bucket/data"], "local or mounted directory"),
    ("data.variant", ["data.name=ffhq", "data.variant=huge"], "config.data.variant='huge'"),
    ("data.split", ["data.split=train val"], "config.data.split='train val'"),
    ("data.eval_split", ["data.eval_split=v@l"], "config.data.eval_split='v@l'"),
    ("data.dm_variant", ["stage=dm", "data.name=ffhq", "data.dm_variant=mix7k"],
     "config.data.dm_variant='mix7k'"),
    ("data.dm_split", ["data.dm_split=+"], "config.data.dm_split='+'"),
    ("data.source", ["data.source={missing}"], "folder not found"),
    ("data.inp_res", ["data.inp_res=33"], "multiple of 2"),
    ("data.patch", ["data.patch=48"], "patch <= gt_res_min"),
    ("data.gt_res_min", ["data.gt_res_min=0"], "config.data.gt_res_min=0"),
    ("data.gt_res_max", ["data.gt_res_max=16"], "gt_res_max=16"),
    ("data.p_whole", ["data.p_whole=1.5"], "config.data.p_whole=1.5"),
    ("data.p_max", ["data.p_max=-0.1"], "config.data.p_max=-0.1"),
    ("data.p_lr", ["data.p_lr=2.0"], "config.data.p_lr=2.0"),
    ("data.resize", ["data.resize=-1"], "config.data.resize=-1"),
    ("data.dm_resize", ["data.dm_resize=-5"], "config.data.dm_resize=-5"),
    ("data.fast_crop", ["data.fast_crop=sometimes"], PARSE),
    ("data.read_threads", ["data.read_threads=0"], "config.data.read_threads=0"),
    ("data.num_workers", ["data.num_workers=-1"], "config.data.num_workers=-1"),
    ("data.prefetch_buffer", ["data.prefetch_buffer=0"], "config.data.prefetch_buffer=0"),
    ("data.inp_crop", ["data.inp_crop=3.0"], "config.data.inp_crop=3.0"),
    ("ae.ch", ["ae.ch=48"], "config.ae.ch=48: must be a multiple of 32"),
    ("ae.ch_mult", ["ae.ch_mult=(1,0)"], "config.ae.ch_mult=(1, 0)"),
    ("ae.num_res_blocks", ["ae.num_res_blocks=0"], "config.ae.num_res_blocks=0"),
    ("ae.z_channels", ["ae.z_channels=0"], "config.ae.z_channels=0"),
    ("ae.num_codes", ["ae.num_codes=-8"], "config.ae.num_codes=-8"),
    ("ae.vq_beta", ["ae.vq_beta=-0.25"], "config.ae.vq_beta=-0.25"),
    ("ae.renderer_hidden", ["ae.renderer_hidden=48"], "config.ae.renderer_hidden=48"),
    ("ae.codebook_init", ["ae.codebook_init=-1.0"], "config.ae.codebook_init=-1.0"),
    ("ae.norm_groups", ["ae.norm_groups=0"], "config.ae.norm_groups=0"),
    ("ae.renderer_normalize", ["ae.renderer_normalize=perhaps"], PARSE),
    ("ae.mid_attention", ["ae.mid_attention=2"], PARSE),
    ("ae.kl_encoder", ["ae.kl_encoder=kl"], PARSE),
    ("ae.decoder_ch_mult", ["ae.decoder_ch_mult=(1,0)"], "config.ae.decoder_ch_mult=(1, 0)"),
    ("ae.input_colour", ["ae.input_colour=(1.0,2.0)"], "config.ae.input_colour=(1.0, 2.0)"),
    ("disc.ndf", ["disc.ndf=0"], "config.disc.ndf=0"),
    ("disc.n_layers", ["disc.n_layers=0"], "config.disc.n_layers=0"),
    ("loss.l1", ["loss.l1=-1.0"], "config.loss.l1=-1.0"),
    ("loss.perc", ["loss.perc=-1.0"], "config.loss.perc=-1.0"),
    ("loss.quant", ["loss.quant=-1.0"], "config.loss.quant=-1.0"),
    ("loss.gan_g", ["loss.gan_g=-0.75"], "config.loss.gan_g=-0.75"),
    ("loss.adaptive_gan_weight", ["loss.adaptive_gan_weight=x"], PARSE),
    ("loss.gan_start_step", ["loss.gan_start_step=-1"], "config.loss.gan_start_step=-1"),
    ("loss.lpips_train_dropout", ["loss.lpips_train_dropout=x"], PARSE),
    ("dm.model_channels", ["dm.model_channels=40"], "config.dm.model_channels=40"),
    ("dm.channel_mult", ["dm.channel_mult=()"], "config.dm.channel_mult=()"),
    ("dm.num_res_blocks", ["dm.num_res_blocks=0"], "config.dm.num_res_blocks=0"),
    ("dm.attention_resolutions", ["dm.attention_resolutions=(0,)"],
     "config.dm.attention_resolutions=(0,)"),
    ("dm.num_head_channels", ["dm.num_head_channels=24"], "must divide the 64 channels"),
    ("dm.attention_impl", ["dm.attention_impl=flash"], "config.dm.attention_impl='flash'"),
    ("dm.norm_groups", ["dm.norm_groups=-1"], "config.dm.norm_groups=-1"),
    ("diffusion.num_train_steps", ["diffusion.num_train_steps=0"],
     "config.diffusion.num_train_steps=0"),
    ("diffusion.beta_start", ["diffusion.beta_start=0.0"], "config.diffusion.beta_start=0.0"),
    ("diffusion.beta_end", ["diffusion.beta_end=0.001"], "must exceed diffusion.beta_start"),
    ("diffusion.sample_steps", ["diffusion.sample_steps=2000"], "use 1..1000"),
    ("diffusion.eta", ["diffusion.eta=-1.0"], "config.diffusion.eta=-1.0"),
    ("diffusion.latent_scale", ["diffusion.latent_scale=0.0", "train.latent_cache=False"],
     "needs config.train.latent_cache=True"),
    ("diffusion.x0_rms_max", ["diffusion.x0_rms_max=-1.0"], "config.diffusion.x0_rms_max=-1.0"),
    ("optim.ae_lr", ["optim.ae_lr=0.0"], "config.optim.ae_lr=0.0"),
    ("optim.ae_b1", ["optim.ae_b1=1.0"], "config.optim.ae_b1=1.0"),
    ("optim.ae_b2", ["optim.ae_b2=-0.9"], "config.optim.ae_b2=-0.9"),
    ("optim.dm_lr", ["optim.dm_lr=-1e-4"], "config.optim.dm_lr=-0.0001"),
    ("optim.dm_weight_decay", ["optim.dm_weight_decay=-0.01"], "config.optim.dm_weight_decay"),
    ("optim.dm_ema", ["optim.dm_ema=1.5"], "config.optim.dm_ema=1.5"),
    ("optim.cosine_decay", ["optim.cosine_decay=often"], PARSE),
    ("optim.ae_frozen", ["optim.ae_frozen=('encoder','codebook')"], "config.optim.ae_frozen="),
    ("train.ae_steps", ["train.ae_steps=-1"], "config.train.ae_steps=-1"),
    ("train.dm_steps", ["train.dm_steps=-1"], "config.train.dm_steps=-1"),
    ("train.compute_dtype", ["train.compute_dtype=float8"], "config.train.compute_dtype='float8'"),
    ("train.log_every", ["train.log_every=0"], "config.train.log_every=0"),
    ("train.ckpt_every", ["train.ckpt_every=0"], "config.train.ckpt_every=0"),
    ("train.keep_checkpoints", ["train.keep_checkpoints=0"], "config.train.keep_checkpoints=0"),
    ("train.vis_every", ["train.vis_every=-1"], "config.train.vis_every=-1"),
    ("train.eval_every", ["train.eval_every=-1"], "config.train.eval_every=-1"),
    ("train.eval_batches", ["train.eval_batches=-2"], "config.train.eval_batches=-2"),
    ("train.on_nonfinite", ["train.on_nonfinite=ignore"], "config.train.on_nonfinite='ignore'"),
    ("train.latent_cache", ["train.latent_cache=x"], PARSE),
    ("sample.num_samples", ["stage=sample", "sample.num_samples=0"],
     "config.sample.num_samples=0"),
    ("sample.batch_size", ["stage=sample", "sample.batch_size=0"], "config.sample.batch_size=0"),
    ("sample.sizes", ["stage=sample", "sample.sizes=('12xx4',)"], "not N or HxW"),
    ("sample.tile", ["stage=sample", "sample.sizes=(64,)", "sample.stream_above=8",
                     "sample.tile=20"], "a streamed BigTIFF needs a multiple of 16"),
    ("sample.pad", ["sample.pad=-8"], "config.sample.pad=-8"),
    ("sample.tiles_per_call", ["sample.tiles_per_call=0"], "config.sample.tiles_per_call=0"),
    ("sample.use_ema", ["sample.use_ema=x"], PARSE),
    ("sample.quantize", ["sample.quantize=x"], PARSE),
    ("sample.seed", ["sample.seed=x"], PARSE),
    ("sample.out_dir", ["sample.out_dir={file}"], "is a file, not a folder"),
    ("sample.window", ["stage=sample", "sample.window=(30,0,4,4)"], "not inside the 32x32 image"),
    ("sample.stream_above", ["sample.stream_above=0"], "config.sample.stream_above=0"),
    ("sample.sampler", ["stage=all", "sample.sampler=ddmi"], "config.sample.sampler='ddmi'"),
    ("sample.spacing", ["sample.spacing=cosine"], "config.sample.spacing='cosine'"),
    ("condition.regions", ["stage=condition", "condition.regions=[{"], "is not a JSON list"),
    ("condition.sizes", ["condition.sizes=()"], "config.condition.sizes=()"),
    ("condition.window", ["stage=condition", f"condition.regions={TEXT}",
                          "condition.clip_checkpoint={file}", "condition.clip_vocab={file}",
                          "condition.window=(0,0,300,4)"], "config.condition.window: window"),
    ("condition.num_samples", ["condition.num_samples=0"], "config.condition.num_samples=0"),
    ("condition.batch_size", ["condition.batch_size=-1"], "config.condition.batch_size=-1"),
    ("condition.seed", ["condition.seed=x"], PARSE),
    ("condition.guide_start", ["stage=condition", f"condition.regions={TEXT}",
                               "condition.clip_checkpoint={file}", "condition.clip_vocab={file}",
                               "condition.guide_start=4"], "must be below diffusion.sample_steps"),
    ("condition.guide_stop", ["condition.guide_stop=-2"], "config.condition.guide_stop=-2"),
    ("condition.guide_every", ["condition.guide_every=0"], "config.condition.guide_every=0"),
    ("condition.clip_checkpoint", ["stage=condition", f"condition.regions={TEXT}"],
     "text regions need config.condition.clip_checkpoint"),
    ("condition.clip_vocab", ["stage=condition", f"condition.regions={TEXT}",
                              "condition.clip_checkpoint={file}",
                              "condition.clip_vocab={missing}"],
     "config.condition.clip_vocab="),
    ("condition.out_dir", ["condition.out_dir={file}"], "is a file, not a folder"),
    ("condition.init_image", ["stage=condition", f"condition.regions={TEXT}",
                              "condition.clip_checkpoint={file}", "condition.clip_vocab={file}",
                              "condition.init_image={missing}"],
     "config.condition.init_image="),
    ("condition.start", ["stage=condition", f"condition.regions={TEXT}",
                         "condition.clip_checkpoint={file}", "condition.clip_vocab={file}",
                         "condition.start=0.5"], "below 1 needs condition.init_image"),
    ("condition.fit_steps", ["condition.fit_steps=-1"], "config.condition.fit_steps=-1"),
    ("condition.fit_lr", ["condition.fit_lr=0"], "config.condition.fit_lr=0"),
    ("condition.fit_zeta", ["condition.fit_zeta=2"], "config.condition.fit_zeta=2"),
    ("eval.real_dir", ["stage=eval", "eval.real_dir={missing}"], "folder not found"),
    ("eval.fake_dir", ["stage=eval", "eval.real_dir={workdir}", "eval.fake_dir={missing}"],
     "no generated images in"),
    ("eval.resolution", ["eval.resolution=0"], "config.eval.resolution=0"),
    ("eval.inception_weights", ["stage=eval", "eval.inception_weights={missing}"], "not found"),
    ("eval.patch_sizes", ["eval.patch_sizes=(0,)"], "config.eval.patch_sizes=(0,)"),
    ("eval.batch_size", ["eval.batch_size=0"], "config.eval.batch_size=0"),
    ("eval.max_images", ["eval.max_images=-1"], "config.eval.max_images=-1"),
    ("eval.recon_resolutions", ["eval.recon_resolutions=()"], "config.eval.recon_resolutions=()"),
    ("eval.scale_consistency_base", ["eval.scale_consistency_base=0"],
     "config.eval.scale_consistency_base=0"),
    ("eval.scale_factors", ["eval.scale_factors=(2,-4)"], "config.eval.scale_factors=(2, -4)"),
    ("t2i.sd_weights", ["stage=t2i_unet", "t2i.vocab={file}", "t2i.sd_weights={missing}"],
     "folder not found"),
    ("t2i.vocab", ["stage=t2i", "t2i.vocab={missing}"], "config.t2i.vocab="),
    ("t2i.caption_feature", ["t2i.caption_feature="], "config.t2i.caption_feature=''"),
    ("t2i.uncond_prob", ["t2i.uncond_prob=1.5"], "config.t2i.uncond_prob=1.5"),
    ("t2i.prompts", ["t2i.prompts=(1,)"], "config.t2i.prompts=(1,)"),
    ("t2i.guidance_scale", ["t2i.guidance_scale=-1.0"], "config.t2i.guidance_scale=-1.0"),
    ("ckpt.ae_checkpoint", ["stage=sample", "ckpt.ae_checkpoint={missing}"], "not found"),
    ("ckpt.dm_checkpoint", ["stage=dm", "ckpt.dm_checkpoint={missing}"], "not found"),
    ("mesh.data", ["mesh.data=0"], "config.mesh.data=0"),
    ("mesh.rules", ["mesh.rules=(('conv_out','tensor'),)"], "config.mesh.rules="),
]
DEVICE_CASES = [  # 8 CPU devices, one process
    ("mesh.fsdp", ["mesh.data=2", "mesh.fsdp=3"], "data=2 x fsdp=3 does not use the 8 devices"),
    ("train.ae_batch_size", ["train.ae_batch_size=6"], "train.ae_batch_size=6 does not split"),
    ("train.dm_batch_size", ["stage=all", "train.dm_batch_size=12"],
     "train.dm_batch_size=12 does not split"),
    ("dm.attention_impl (GPU only)", ["dm.attention_impl=cudnn", "train.compute_dtype=bfloat16"],
     "needs an NVIDIA GPU; this run is on cpu"),
    ("train.compute_dtype (x64 only)", ["train.compute_dtype=float64"], "needs JAX's x64 mode"),
]


def _settings() -> set[str]:
  def walk(d, prefix=""):
    for k, v in d.items():
      yield from walk(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
  return set(walk(defaults.base().to_dict()))


def _filled(flag: str, names: dict) -> str:
  for name, path in names.items():
    flag = flag.replace("{" + name + "}", str(path))
  return flag


def test_the_table_names_every_documented_setting():
  named = {key.split(" ")[0] for key, _, _ in CASES + DEVICE_CASES}
  assert named == _settings(), (sorted(_settings() - named), sorted(named - _settings()))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("config_errors")
  data, workdir, file = tmp / "data", tmp / "work", tmp / "a_file"
  from infd_jax.data import prepare  # pylint: disable=g-import-not-at-top
  prepare.prepare("demo", str(data))  # a real dataset, so that an early read would show
  workdir.mkdir()
  file.write_text("not a folder")
  names = dict(file=file, missing=tmp / "missing", workdir=workdir)
  cases = [{"argv": ["--config=configs/tiny.py", f"--workdir={workdir}",
                     f"--config.data.data_dir={data}",
                     *(f"--config.{_filled(flag, names)}" for flag in flags)],
            "watch": [str(data)], "with_jax": devices}
           for cases, devices in ((CASES, False), (DEVICE_CASES, True))
           for _, flags, _ in cases]
  (tmp / "cases.json").write_text(json.dumps(cases))
  subprocess.run([sys.executable, "-m", "tests.config_errors_driver", str(tmp / "cases.json"),
                  str(tmp / "results.json")], cwd=ROOT, env=processes.cpu_env(8), check=True,
                 timeout=600)
  out = json.loads((tmp / "results.json").read_text())
  assert not list(workdir.iterdir())  # nothing written either
  return dict(zip([key for key, _, _ in CASES + DEVICE_CASES], out))


@pytest.mark.parametrize("key,flags,message", CASES + DEVICE_CASES,
                         ids=[key for key, _, _ in CASES + DEVICE_CASES])
def test_a_bad_value_is_one_line_exit_2_before_any_work(results, key, flags, message):
  r = results[key]
  if message == PARSE:
    message = f"{PARSE}{flags[-1]}"
  assert r["code"] == 2, r
  lines = [l for l in r["stderr"].splitlines() if l.startswith("infd_jax: error:")]
  assert len(lines) == 1 and message in lines[0], r["stderr"][-2000:]
  assert "Traceback" not in r["stderr"], r["stderr"][-3000:]
  assert not r["opened"], r["opened"]  # nothing of the dataset read
  assert not r["compiles"], r["compiles"]  # nothing compiled
  if (key, flags, message) in CASES:
    assert not r["jax"]  # refused before jax was even imported
