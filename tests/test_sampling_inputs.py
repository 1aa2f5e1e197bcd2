"""The sampler's public functions refuse out-of-range labels and codes.

Such inputs do not fail inside XLA (an embedding lookup past the table
gives NaN logits, and the sampler then returns all-zero codes), so they are
checked on the host where the values are concrete.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqvae2_jax import sampling
from tests.models import pixelcnn_util


def _conditional_lower_prior():
  # 3 classes, conditioned on a 2x2 upper level with a codebook of 5.
  model = pixelcnn_util.make_prior(num_classes=3, cond_num_embeddings=(5,),
                                   cond_stack_blocks=1)
  codes = jnp.zeros((2, 4, 4), jnp.int32)
  cond = (jnp.zeros((2, 2, 2), jnp.int32),)
  variables = pixelcnn_util.random_variables(
      model, codes, cond, jnp.zeros((2,), jnp.int32))
  return model, variables, codes, cond


@pytest.mark.parametrize('labels, message', [
    ([0, 4], r'labels has values in \[0, 4\], outside \[0, 3\]'),
    ([-1, 0], r'labels has values in \[-1, 0\].*-1 is not "no label"'),
])
def test_labels_out_of_range_are_refused(labels, message):
  model, variables, _, cond = _conditional_lower_prior()
  for sample in (sampling.sample_level, sampling.reference_sample_level):
    with pytest.raises(ValueError, match=message):
      sample(model, variables, shape=(2, 4, 4), cond_codes=cond,
             labels=np.array(labels), rng=jax.random.key(0))
  with pytest.raises(ValueError, match='Fix: use class indices 0..2'):
    sampling.cached_logits(model, variables, jnp.zeros((2, 4, 4), jnp.int32),
                           cond_codes=cond, labels=np.array(labels))


def test_the_no_label_index_and_none_are_accepted():
  model, variables, _, cond = _conditional_lower_prior()
  a = sampling.sample_level(model, variables, shape=(2, 4, 4), cond_codes=cond,
                            labels=np.array([3, 3]), rng=jax.random.key(1))
  b = sampling.sample_level(model, variables, shape=(2, 4, 4), cond_codes=cond,
                            labels=None, rng=jax.random.key(1))
  np.testing.assert_array_equal(a, b)


def test_codes_out_of_range_are_refused():
  model, variables, codes, cond = _conditional_lower_prior()
  bad_cond = (jnp.full((2, 2, 2), 5, jnp.int32),)
  with pytest.raises(ValueError,
                     match=r'cond_codes\[0\] has values in \[5, 5\], outside '
                     r'\[0, 4\]\. Fix'):
    sampling.sample_level(model, variables, shape=(2, 4, 4),
                          cond_codes=bad_cond, labels=None,
                          rng=jax.random.key(0))
  with pytest.raises(ValueError, match=r'codes has values in \[0, 7\], '
                     r'outside \[0, 6\]'):
    sampling.cached_logits(model, variables, codes.at[0, 1, 1].set(7),
                           cond_codes=cond)
  with pytest.raises(ValueError, match=r'cond_codes\[0\] has values in '
                     r'\[-2, 0\]'):
    sampling.cached_logits(model, variables, codes,
                           cond_codes=(cond[0].at[1, 0, 0].set(-2),))
  # In range: finite logits.
  logits = sampling.cached_logits(model, variables, codes, cond_codes=cond)
  assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize('change, message', [
    (dict(temperature=0.0), r'temperature is 0\.0\. Fix: use a value > 0'),
    (dict(top_k=-1), r'top_k is -1\. Fix:'),
    (dict(top_p=1.5), r'top_p is 1\.5\. Fix:'),
    (dict(shape=(2, 0, 4)), r'positive sizes.*\. Fix:'),
    (dict(cond_codes=()), r'conditioning code maps.*\. Fix: pass the codes'),
    (dict(cond_codes=(jnp.zeros((1, 2, 2), jnp.int32),)),
     r'cond_codes\[0\] has shape \(1, 2, 2\)\. Fix:'),
    (dict(labels=np.array([0])), r'labels has shape \(1,\)\. Fix:'),
])
def test_every_refusal_says_how_to_fix_it(change, message):
  model, variables, _, cond = _conditional_lower_prior()
  kwargs = dict(shape=(2, 4, 4), cond_codes=cond, labels=np.array([0, 1]),
                rng=jax.random.key(0))
  with pytest.raises(ValueError, match=message):
    sampling.sample_level(model, variables, **{**kwargs, **change})


def test_labels_for_an_unconditional_prior_are_refused():
  model = pixelcnn_util.make_prior()
  codes = jnp.zeros((2, 4, 4), jnp.int32)
  variables = pixelcnn_util.random_variables(model, codes)
  with pytest.raises(ValueError, match=r'num_classes=0\. Fix: pass '
                     r'labels=None'):
    sampling.sample_level(model, variables, shape=(2, 4, 4),
                          labels=np.array([0, 1]), rng=jax.random.key(0))
  with pytest.raises(ValueError, match=r'num_positions is 17\. Fix: use '
                     r'0\.\.16'):
    sampling.reference_sample_level(model, variables, shape=(2, 4, 4),
                                    rng=jax.random.key(0), num_positions=17)


@pytest.mark.parametrize('rng', [0, jnp.zeros((3,), jnp.uint32),
                                 jax.random.split(jax.random.key(0))],
                         ids=['int', 'uint32[3]', 'two keys'])
def test_anything_but_one_key_is_refused(rng):
  model, variables, _, cond = _conditional_lower_prior()
  for sample in (sampling.sample_level, sampling.reference_sample_level):
    with pytest.raises(sampling.SamplingInputError,
                       match=r'not one PRNG key\. Fix: pass jax\.random\.key'):
      sample(model, variables, shape=(2, 4, 4), cond_codes=cond,
             labels=np.array([0, 1]), rng=rng)
