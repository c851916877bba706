import logging
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*fast path is not available.*")
logging.getLogger("transformers").setLevel(logging.ERROR)
torch.set_num_threads(1)


@pytest.fixture
def mixtral():
    from matrix.models import CASES_BY_ID

    return CASES_BY_ID["mixtral"].build()
