"""graft-eval on a checkpoint, with the run's config or another one (--config)."""

import torch

from graft import checkpoint
from graft.evaluate import evaluate_checkpoint
from graft.models import build_model


def test_a_config_that_takes_the_classes_from_the_data(tmp_path):
    """Every shipped config leaves num_classes at 0 ("from the data"): graft-eval built the model
    with 0 classes and refused the checkpoint's weights."""
    config = tmp_path / "cifar.yaml"
    config.write_text("model: resnet8\ndata:\n  name: synthetic\n")  # 10 classes, 256 test images
    torch.manual_seed(0)
    best = checkpoint.save_best(tmp_path / "run", 0, 2, 10.0, "test", {}, build_model("resnet8", 10).state_dict())
    result = evaluate_checkpoint(best, "test", device="cpu", config=config)
    assert (result["network"], result["epoch"], result["images"]) == (0, 2, 256)
    assert 0 <= result["test_acc"] <= 100
