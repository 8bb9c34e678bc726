import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def digits():
    """Real MNIST test digits when ../shared is there, else the module's drawn digits (tests pass on both)."""
    import data
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return data.load_digits(download=False)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The quickstart on the tiny preset (every stage but dmd), trained once for the whole session. Tests only read
    it; one that trains on or writes into a run works on a copy (test_cli.py's run)."""
    import train
    out = tmp_path_factory.mktemp("tiny_run")
    train.main(["--config", "tiny", "--device", "cpu", "--out", str(out)])
    return out


def randomised(model):
    """Zero-initialised heads and AdaLN gates would hide every difference: give all weights random values."""
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()
