"""CLIP in Flax against OpenCLIP's own outputs (fixture made by tests/fixtures/clip/make_fixture.py).

The fixture holds a tiny randomly initialised OpenCLIP model saved as OpenCLIP
safetensors and as a TorchScript archive (OpenAI's release format), the token
ids OpenCLIP's tokenizer gave on a small BPE vocabulary, and the image and text
features both activations gave on fixed inputs.
"""

import dataclasses
import pathlib
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infd_jax.clip import convert, model, tokenizer
from infd_jax.convert import torch_pickle

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "clip"


@pytest.fixture(scope="module")
def ref():
  with np.load(FIXTURE / "outputs.npz") as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def converted():
  return {fmt: convert.convert(FIXTURE / name, head_width=24)
          for fmt, name in (("openclip", "tiny_openclip.safetensors"),
                            ("openai", "tiny_openai.pt"))}


def test_tokenizer_matches_open_clip(ref):
  tok = tokenizer.Tokenizer(FIXTURE / "tiny_bpe.txt.gz", context_length=16)
  np.testing.assert_array_equal(tok([str(t) for t in ref["texts"]]), ref["tokens"])


def test_tokenizer_pads_with_end_of_text_for_sd1(ref):
  """Hugging Face's SD 1.x tokenizer pads with end-of-text: open_clip's ids, the padding
  after the first end-of-text replaced (id 0 is also the byte "!")."""
  tok = tokenizer.Tokenizer(FIXTURE / "tiny_bpe.txt.gz", context_length=16, pad_with_eot=True)
  ids = ref["tokens"]
  after_eot = np.arange(ids.shape[1]) > np.argmax(ids == tok.eot, axis=1)[:, None]
  want = np.where(after_eot, tok.eot, ids)
  np.testing.assert_array_equal(tok([str(t) for t in ref["texts"]]), want)


def test_both_formats_map_to_the_same_params(converted):
  (cfg_oc, p_oc), (cfg_ai, p_ai) = converted["openclip"], converted["openai"]
  assert not cfg_oc.quick_gelu and cfg_ai.quick_gelu  # only the TorchScript is OpenAI's
  assert dataclasses.replace(cfg_oc, quick_gelu=True) == cfg_ai
  assert (cfg_ai.vision_heads, cfg_ai.text_heads, cfg_ai.vision_layers) == (2, 2, 2)
  jax.tree.map(np.testing.assert_array_equal, p_oc, p_ai)


@pytest.mark.parametrize("fmt,act", [("openclip", "gelu"), ("openai", "quickgelu")])
def test_features_match_open_clip(ref, converted, fmt, act):
  cfg, params = converted[fmt]
  clip = model.CLIP(**dataclasses.asdict(cfg))
  img, txt = jax.jit(lambda p, i, t: clip.apply({"params": p}, i, t))(
      params, jnp.asarray(ref["images_nhwc"]), jnp.asarray(ref["tokens"]))
  np.testing.assert_allclose(img, ref[f"{act}_image"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(txt, ref[f"{act}_text"], rtol=1e-4, atol=1e-5)


def test_converter_refuses_unknown_and_missing_keys(tmp_path):
  sd = convert.read_safetensors(FIXTURE / "tiny_openclip.safetensors")
  cfg = convert.find_config(sd, quick_gelu=False, head_width=24)
  extra = dict(sd, **{"visual.head.weight": np.zeros(3, np.float32),
                      "logit_bias": np.zeros((), np.float32)})
  with pytest.raises(convert.ConversionError, match=r"unknown keys: logit_bias, visual\.head\.weight"):
    convert.to_flax(extra, cfg)
  del extra["visual.head.weight"], extra["logit_bias"], extra["visual.ln_post.bias"]
  with pytest.raises(convert.ConversionError, match=r"missing parameters: visual/ln_post/bias"):
    convert.to_flax(extra, cfg)
  wrong = dict(sd, **{"visual.proj": np.zeros((5, 5), np.float32)})
  with pytest.raises(convert.ConversionError, match=r"shape mismatches: visual\.proj"):
    convert.to_flax(wrong, cfg)


def test_torchscript_code_is_never_run(tmp_path):
  """A global outside __torch__ types and tensor rebuilding is refused, not called."""
  src = FIXTURE / "tiny_openai.pt"
  bad = tmp_path / "bad.pt"
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
    for item in zin.infolist():
      data = zin.read(item)
      if item.filename.endswith("/data.pkl"):
        data = data.replace(b"ctorch._utils\n_rebuild_tensor_v2\n", b"cos\nsystem\n\n\n\n\n\n\n\n\n\n\n\n\n")
        assert b"cos\nsystem" in data
      zout.writestr(item, data)
  with pytest.raises(torch_pickle.UnsafeCheckpointError, match="os.system"):
    convert.read_state_dict(bad)


def test_convert_cli_round_trip(tmp_path, capsys):
  assert convert.main(["--input", str(FIXTURE / "tiny_openai.pt"), "--output", str(tmp_path),
                       "--head_width", "24"]) == 0
  cfg, params = convert.load(tmp_path)
  ref_cfg, ref_params = convert.convert(FIXTURE / "tiny_openai.pt", head_width=24)
  assert cfg == ref_cfg
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)
  assert convert.main(["--input", str(tmp_path / "missing.pt"), "--output", str(tmp_path)]) == 2
  assert "not found" in capsys.readouterr().out


def test_preprocess_resizes_and_normalises():
  white = jnp.ones((1, 40, 60, 3))  # [-1, 1] white -> (1 - MEAN) / STD everywhere
  out = model.preprocess(white, 32)
  assert out.shape == (1, 32, 32, 3)
  np.testing.assert_allclose(out[0, 5, 7], (1 - np.array(model.MEAN)) / np.array(model.STD),
                             rtol=1e-5)
