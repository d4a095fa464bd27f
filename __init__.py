"""sparseformer: sparse transformers (block-sparse attention, Mixture of Experts) in JAX / Flax NNX."""

__version__ = "0.1.0"
