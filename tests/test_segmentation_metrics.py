import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from tasks.segmentation.metrics import ConfusionMatrix, multiscale_flip_logits


def _pair(truth, pred):
    return [{"mask": torch.tensor(truth)}], [{"mask": torch.tensor(pred)}]


def test_hand_computed_case():
    # Confusion (rows truth, columns prediction): [[1, 1, 0], [0, 2, 0], [1, 0, 1]]; the 255 column is ignored.
    targets, predictions = _pair([[0, 0, 1, 255], [1, 2, 2, 255]], [[0, 1, 1, 2], [1, 2, 0, 0]])
    metric = ConfusionMatrix(3, class_names=["a", "b", "c"])
    metric.update(targets, predictions)
    assert metric.matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    result = metric.compute()
    assert result["IoU/a"] == pytest.approx(1 / 3)
    assert result["IoU/b"] == pytest.approx(2 / 3)
    assert result["IoU/c"] == pytest.approx(1 / 2)
    assert result["mIoU"] == pytest.approx(0.5)
    assert result["pixel_acc"] == pytest.approx(4 / 6)
    assert result["mean_acc"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert metric.primary == "mIoU"


def test_absent_classes():
    metric = ConfusionMatrix(4)
    metric.update(*_pair([[0, 0, 1, 255], [1, 2, 2, 255]], [[0, 1, 1, 2], [1, 2, 0, 0]]))
    result = metric.compute()
    assert math.isnan(result["IoU/3"]) and result["mIoU"] == pytest.approx(0.5)  # absent from both: excluded
    metric.update(*_pair([[0]], [[3]]))  # predicted but not in the truth: IoU 0, counted
    result = metric.compute()
    assert result["IoU/3"] == 0.0
    assert result["mIoU"] == pytest.approx((1 / 4 + 2 / 3 + 1 / 2 + 0) / 4)


def test_matches_torchmetrics_on_random_label_maps():
    generator = torch.Generator().manual_seed(0)
    k = 6
    truth = torch.randint(0, k, (4, 37, 41), generator=generator)
    pred = torch.where(torch.rand(truth.shape, generator=generator) < 0.6, truth,
                       torch.randint(0, k, truth.shape, generator=generator))
    truth[:, :3] = 255
    ours = ConfusionMatrix(k)
    ours.update([{"mask": t} for t in truth[:2]], [{"mask": p} for p in pred[:2]])
    ours.update([{"mask": t} for t in truth[2:]], [{"mask": p} for p in pred[2:]])
    result = ours.compute()
    jaccard = MulticlassJaccardIndex(num_classes=k, ignore_index=255, average="macro")
    per_class = MulticlassJaccardIndex(num_classes=k, ignore_index=255, average="none")
    micro = MulticlassAccuracy(num_classes=k, ignore_index=255, average="micro")
    macro = MulticlassAccuracy(num_classes=k, ignore_index=255, average="macro")
    assert result["mIoU"] == pytest.approx(jaccard(pred, truth).item(), abs=1e-6)
    assert [result[f"IoU/{i}"] for i in range(k)] == pytest.approx(per_class(pred, truth).tolist(), abs=1e-6)
    assert result["pixel_acc"] == pytest.approx(micro(pred, truth).item(), abs=1e-6)
    assert result["mean_acc"] == pytest.approx(macro(pred, truth).item(), abs=1e-6)


def test_merge_of_states_equals_one_pass():
    generator = torch.Generator().manual_seed(1)
    masks = [torch.randint(0, 5, (16, 16), generator=generator) for _ in range(6)]
    preds = [torch.randint(0, 5, (16, 16), generator=generator) for _ in range(6)]
    whole = ConfusionMatrix(5)
    whole.update(masks, preds)
    parts = [ConfusionMatrix(5) for _ in range(3)]
    for i, part in enumerate(parts):
        part.update(masks[2 * i:2 * i + 2], preds[2 * i:2 * i + 2])
    merged = ConfusionMatrix(5)
    merged.merge([p.state() for p in parts])
    assert torch.equal(merged.matrix, whole.matrix)
    assert merged.compute() == pytest.approx(whole.compute())


def test_bad_inputs_raise():
    metric = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="does not match its target"):
        metric.update([torch.zeros(4, 4, dtype=torch.long)], [torch.zeros(4, 5, dtype=torch.long)])
    with pytest.raises(ValueError, match="target mask holds class 7"):
        metric.update(*_pair([[7]], [[0]]))
    with pytest.raises(ValueError, match="predicted mask holds class 3"):
        metric.update(*_pair([[0]], [[3]]))


def _all_reduce_worker(rank: int, world: int, init_file: str, out_file: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    metric = ConfusionMatrix(3)
    metric.update([torch.tensor([[rank, 2]])], [torch.tensor([[rank, 0]])])
    metric.all_reduce()
    torch.save(metric.matrix, f"{out_file}.{rank}")
    dist.destroy_process_group()


def test_all_reduce_sums_over_processes(tmp_path):
    mp.start_processes(_all_reduce_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2,
                       start_method="fork")
    expected = [[1, 0, 0], [0, 1, 0], [2, 0, 0]]
    for rank in range(2):
        assert torch.load(tmp_path / f"out.{rank}", weights_only=True).tolist() == expected


def test_multiscale_flip_averages_probabilities():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    fixed = torch.randn(2, 5, 32, 32)
    seen = []

    def position_dependent(x):
        seen.append(tuple(x.shape[-2:]))
        return fixed  # ignores its input, so mirrored runs disagree with plain ones
    probs = multiscale_flip_logits(position_dependent, images, scales=(0.5, 1.0, 1.5), flip=True)
    assert seen == [(16, 16), (16, 16), (32, 32), (32, 32), (48, 48), (48, 48)]
    expected = (fixed.softmax(1) + fixed.softmax(1).flip(-1)) / 2
    assert torch.allclose(probs, expected, atol=1e-6)
    pointwise = torch.nn.Conv2d(3, 5, 1)  # mirror-equivariant: flipping changes nothing
    with torch.no_grad():
        single = pointwise(images).softmax(1)
    assert torch.allclose(multiscale_flip_logits(pointwise, images, scales=(1.0,)), single, atol=1e-6)
    assert torch.allclose(probs.sum(1), torch.ones(2, 32, 32), atol=1e-5)
