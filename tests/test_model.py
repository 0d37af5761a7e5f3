"""The decoder LM: shapes, causality, the cached decoding path, the model interface, clear errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import transformer
from memarch.generate import generate
from memarch.models import build_model

pytestmark = pytest.mark.timeout(120)

VOCAB = 97


def jitted(model, method=None, **kwargs):
  """model.apply under jit (eager Flax dispatches op by op, which is slow on CPU)."""
  if method is None:
    return jax.jit(lambda p, *a: model.apply(p, *a, **kwargs))
  return jax.jit(lambda p, *a: model.apply(p, *a, method=getattr(model, method), **kwargs))


def make_model(**overrides):
  m = transformer.get_config("size=tiny").model.to_dict()
  m.update(vocab_size=VOCAB, embed_dim=32, mlp_dim=64, num_heads=4, num_kv_heads=2, attention_impl="reference",
           layer_blocks=("attention", "mlp"))
  m.update(overrides)
  model = build_model(ml_collections.FrozenConfigDict(m))
  tokens = jax.random.randint(jax.random.key(0), (2, 13), 0, VOCAB)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens))
  return model, params, tokens


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False, "num_kv_heads": 4}, {"window": 4}])
def test_shapes_and_causality(overrides):
  model, params, tokens = make_model(**overrides)
  fwd = jitted(model)
  logits = fwd(params, tokens)
  assert logits.shape == (2, 13, VOCAB) and logits.dtype == jnp.float32
  t = 6
  changed = tokens.at[:, t + 1].set((tokens[:, t + 1] + 1) % VOCAB)
  logits2 = fwd(params, changed)
  np.testing.assert_allclose(logits[:, : t + 1], logits2[:, : t + 1], atol=1e-6)
  assert np.abs(np.asarray(logits[:, t + 1 :] - logits2[:, t + 1 :])).max() > 1e-4


@pytest.mark.parametrize("overrides", [{}, {"window": 4}, {"position_embedding": "learned"}])
def test_prefill_then_decode_matches_parallel_forward(overrides):
  model, params, tokens = make_model(**overrides)
  full = jitted(model)(params, tokens)
  cache = model.init_cache(2, 16)
  logits, cache = jitted(model, "prefill")(params, tokens[:, :5], cache)
  steps = [logits]
  decode = jitted(model, "decode_step")
  for i in range(5, 13):
    step_logits, cache = decode(params, tokens[:, i], cache)
    steps.append(step_logits[:, None])
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5, rtol=1e-5)
  assert int(cache["index"]) == 13


def test_chunked_prefill_matches_parallel_forward():
  model, params, tokens = make_model()
  full = jitted(model)(params, tokens)
  cache = model.init_cache(2, 13)
  prefill = jitted(model, "prefill")
  a, cache = prefill(params, tokens[:, :7], cache)
  b, cache = prefill(params, tokens[:, 7:], cache)
  np.testing.assert_allclose(jnp.concatenate([a, b], axis=1), full, atol=2e-5, rtol=1e-5)


def test_cache_overflow_is_a_clear_error():
  model, params, tokens = make_model()
  cache = model.init_cache(2, 8)
  with pytest.raises(ValueError, match="KV cache holds 8"):
    model.apply(params, tokens, cache, method=model.prefill)
  # Under jit the overflow cannot raise: the logits are poisoned instead of silently wrapping.
  _, cache = jitted(model, "prefill")(params, tokens[:, :8], cache)
  logits, _ = jitted(model, "decode_step")(params, tokens[:, 8], cache)
  assert np.isnan(np.asarray(logits)).all()


def test_learned_positions_are_limited_to_max_len():
  model, params, tokens = make_model(position_embedding="learned", max_len=16)
  with pytest.raises(ValueError, match="learned position embeddings cover model.max_len=16"):
    model.init_cache(2, 17)
  with pytest.raises(ValueError, match="learned position embeddings"):
    jitted(model)(params, jnp.zeros((1, 17), jnp.int32))


def test_inputs_embeds_and_return_hidden():
  model, params, tokens = make_model()
  logits, hidden = jitted(model, return_hidden=True)(params, tokens)
  assert hidden["hidden"].shape == (2, 13, 32) and hidden["ffn_input"].shape == (2, 13, 32)
  embeds = jnp.take(params["params"]["embedding"], tokens, axis=0)
  from_embeds = jax.jit(lambda p, e: model.apply(p, None, inputs_embeds=e))(params, embeds)
  np.testing.assert_allclose(from_embeds, logits, atol=1e-5)
  # The head reads the final hidden state: logits = hidden @ embedding^T (tied).
  np.testing.assert_allclose(hidden["hidden"] @ params["params"]["embedding"].T, logits, atol=1e-4)


def test_segment_ids_isolate_documents():
  model, params, tokens = make_model()
  seg = jnp.array([[1] * 6 + [2] * 7] * 2)
  pos = jnp.array([list(range(6)) + list(range(7))] * 2)
  packed = jax.jit(lambda p, t, s, q: model.apply(p, t, segment_ids=s, positions=q))(params, tokens, seg, pos)
  alone = jitted(model)(params, tokens[:, 6:])
  np.testing.assert_allclose(packed[:, 6:], alone, atol=2e-5)


def test_bad_input_errors():
  model, params, tokens = make_model()
  with pytest.raises(ValueError, match="token ids must be in"):
    model.apply(params, tokens.at[0, 0].set(VOCAB))  # eager: the ids are concrete, so they are checked
  with pytest.raises(ValueError, match=r"tokens must be \[batch, seq\]"):
    jitted(model)(params, tokens[0])
  with pytest.raises(ValueError, match="unknown block type"):
    make_model(layer_blocks=("attention", "mpl"))
  with pytest.raises(ValueError, match="unknown model.name"):
    make_model(name="transfomer")


def test_generate_greedy_matches_argmax_loop_and_checks_length():
  model, params, tokens = make_model()
  prompt = tokens[:, :5]
  out = generate(model, params, prompt, max_new_tokens=4)
  seq = prompt
  fwd = jitted(model)
  for _ in range(4):
    seq = jnp.concatenate([seq, jnp.argmax(fwd(params, seq)[:, -1], -1)[:, None].astype(seq.dtype)], 1)
  np.testing.assert_array_equal(out, seq)
  sampled = generate(model, params, prompt, max_new_tokens=4, temperature=0.8, top_k=3, rng=jax.random.key(2))
  assert sampled.shape == (2, 9) and int(sampled.max()) < VOCAB
  with pytest.raises(ValueError, match="exceed cache_len"):
    generate(model, params, prompt, max_new_tokens=10, cache_len=8)


def test_sliding_window_cache_has_a_fixed_size():
  """With model.window the attention cache keeps the last `window` keys only: its size does not depend on the
  context, and decoding runs past any preallocated length, equal to the parallel forward."""
  model, params, tokens = make_model(window=4)
  small, large = model.init_cache(2, 4), model.init_cache(2, 4096)
  shapes = lambda c: [x.shape for x in jax.tree.leaves(c["layers"])]
  assert shapes(small) == shapes(large)
  full = jitted(model)(params, tokens)
  logits, cache = jitted(model, "prefill")(params, tokens[:, :3], small)
  steps = [logits]
  for i in range(3, 13):  # 13 tokens through a cache allocated for 4
    step_logits, cache = jitted(model, "decode_step")(params, tokens[:, i], cache)
    steps.append(step_logits[:, None])
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5, rtol=1e-5)
