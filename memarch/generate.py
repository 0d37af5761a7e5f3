"""Sampling from any registered model: greedy, temperature and top-k.

The prompt is prefilled in one parallel call, then tokens are decoded one at a time with the model's
cache inside a `lax.scan` (one compiled loop, not a Python loop of dispatches).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from memarch.models.lm import check_token_ids


def sample_logits(logits: jax.Array, rng: jax.Array, *, temperature: float = 0.0, top_k: int = 0) -> jax.Array:
  """Next token `[batch]` from logits `[batch, vocab]`: greedy if temperature == 0, else softmax(logits / T)
  restricted to the top_k most likely tokens (top_k = 0: all)."""
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}.")
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "cache_len"))
def _generate(model, params, prompt, rng, *, max_new_tokens, temperature, top_k, cache_len):
  cache = model.init_cache(prompt.shape[0], cache_len)
  logits, cache = model.apply(params, prompt, cache, method=model.prefill)
  rng, sub = jax.random.split(rng)
  first = sample_logits(logits[:, -1], sub, temperature=temperature, top_k=top_k)

  def step(carry, _):
    token, cache, rng = carry
    logits, cache = model.apply(params, token, cache, method=model.decode_step)
    rng, sub = jax.random.split(rng)
    nxt = sample_logits(logits, sub, temperature=temperature, top_k=top_k)
    return (nxt, cache, rng), token

  (last, _, _), tokens = jax.lax.scan(step, (first, cache, rng), None, length=max_new_tokens - 1)
  new = jnp.concatenate([tokens.T, last[:, None]], axis=1) if max_new_tokens > 1 else first[:, None]
  return jnp.concatenate([prompt, new], axis=1)


def generate(
    model,
    params,
    prompt: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    rng: jax.Array | None = None,
    cache_len: int | None = None,
) -> jax.Array:
  """Continues `prompt` `[batch, prompt_len]` by max_new_tokens tokens; returns `[batch, prompt_len + new]`.

  params: the variables dict (`{"params": ...}`). cache_len: the KV cache length for attention models
  (default prompt_len + max_new_tokens); a prompt plus continuation longer than it is refused up front.
  """
  if prompt.ndim != 2:
    raise ValueError(f"prompt must be [batch, prompt_len], got shape {prompt.shape}.")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
  check_token_ids(prompt, model.config.vocab_size)
  needed = prompt.shape[1] + max_new_tokens
  cache_len = needed if cache_len is None else cache_len
  if needed > cache_len:
    raise ValueError(f"prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) exceed cache_len {cache_len}.")
  rng = jax.random.key(0) if rng is None else rng
  return _generate(
      model, params, prompt.astype(jnp.int32), rng, max_new_tokens=max_new_tokens, temperature=float(temperature),
      top_k=int(top_k), cache_len=int(cache_len),
  )
