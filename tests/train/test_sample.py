"""train/sample.py: invalid sampling settings are rejected before the model is touched."""

import numpy as np
import pytest

from sparseformer.train import sample


@pytest.mark.parametrize("temperature, top_k", [(-0.1, 0), (0.8, -1)])
def test_negative_temperature_or_top_k_is_rejected(temperature, top_k):
  with pytest.raises(ValueError, match=rf"temperature \({temperature}\) and top_k \({top_k}\) must be >= 0"):
    sample.sample_tokens(None, np.array([1, 2]), num_tokens=4, window=8, temperature=temperature, top_k=top_k)
