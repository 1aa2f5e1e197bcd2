"""Installs vqvae2_jax: pip install -e ".[dev]"."""

import setuptools

setuptools.setup(
    name='vqvae2_jax',
    version='0.1.0',
    description='VQ-VAE-2 in JAX/Flax: hierarchical VQ-VAE, PixelCNN priors, '
                'fast cached sampling.',
    license='Apache-2.0',
    packages=setuptools.find_packages(include=['vqvae2_jax', 'vqvae2_jax.*']),
    package_data={'vqvae2_jax': ['data/checksums/*.tsv',
                                'evaluation/judges/*.msgpack',
                                'pretrained/*.msgpack']},
    python_requires='>=3.10',
    install_requires=[
        'absl-py',
        'chex',
        'clu',
        'flax',
        'jax',
        'ml-collections',
        'numpy',
        'optax',
        'orbax-checkpoint',
        'pillow',
        'tensorflow-cpu',
        'tensorboard',  # clu.metric_writers imports it.
        'tensorflow-datasets',
        # tfds imports it when preparing any dataset but declares it only for
        # Python < 3.9.
        'importlib_resources',
    ],
    extras_require={
        'dev': ['pytest', 'pytest-xdist', 'nbformat', 'nbclient', 'ipykernel'],
        # JAX's CUDA wheels bring their own CUDA: 13 needs an NVIDIA driver
        # >= 580, 12 one >= 525 (JAX's install guide).
        'gpu': ['jax[cuda13]'],
        'gpu-cuda12': ['jax[cuda12]'],
        'tpu': ['jax[tpu]'],
    },
)
