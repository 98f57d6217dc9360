import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# "ci" (the default) draws the same examples every run, so that a CI run is repeatable;
# "thorough" draws new ones: run it to explore (HYPOTHESIS_PROFILE=thorough)
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
