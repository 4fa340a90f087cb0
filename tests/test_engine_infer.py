"""engine.run_inference / evaluate: batching does not change results, modes are restored, shapes."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import engine
from engine import ScoreCollector, evaluate, run_inference
from lora_utils import merge_lora
from models_mae import AnomalyScorer, create_model
from util.metrics import compute_metrics

SIZE = 56  # 8x8 patch grid for patch 7


class TinyTestSet(Dataset):
    """In-memory items in TestDataset's format: 3 good, 3 anomalous (a bright square + its mask)."""

    def __init__(self, n: int = 6, size: int = SIZE) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, size, size, generator=g) * 0.3
        self.masks = torch.zeros(n, size, size)
        self.labels = [0 if i < n // 2 else 1 for i in range(n)]
        for i, label in enumerate(self.labels):
            if label:
                self.images[i, :, 10 + i:24 + i, 12:30] += 2.0
                self.masks[i, 10 + i:24 + i, 12:30] = 1.0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        label = self.labels[i]
        return {"image": self.images[i], "label": label, "mask": self.masks[i], "has_mask": True,
                "defect": "good" if label == 0 else "blob", "rel_path": f"test/{i:03d}.png", "index": i}


def _scorer(merge: bool = True) -> AnomalyScorer:
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch7", img_size=SIZE, lora_rank=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.02)  # non-zero adapters, as after training
    if merge:
        merge_lora(model)
    return AnomalyScorer(model, num_masks=4, mask_pattern="stripes", sigma=2.0)


def _collect(scorer, batch_size: int, **kw) -> ScoreCollector:
    data = TinyTestSet()
    collector = ScoreCollector(len(data))
    for result in run_inference(scorer, DataLoader(data, batch_size=batch_size), torch.device("cpu"), None, **kw):
        collector.add(result)
    return collector


def test_batched_inference_equals_one_at_a_time():
    scorer = _scorer().eval()
    one = _collect(scorer, batch_size=1)
    three = _collect(scorer, batch_size=3)
    assert one.rel_paths == three.rel_paths
    np.testing.assert_allclose(three.maps, one.maps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(three.scores, one.scores, rtol=1e-5, atol=1e-6)


def test_run_inference_shapes_and_one_transfer_per_batch(monkeypatch):
    scorer = _scorer().eval()
    data = TinyTestSet(n=5)
    calls = []
    original = torch.Tensor.cpu

    def counting_cpu(self, *args, **kwargs):
        calls.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    results = list(run_inference(scorer, DataLoader(data, batch_size=3), torch.device("cpu"), None))
    monkeypatch.undo()
    assert len(calls) == len(results) == 2  # one device->host copy per batch, none per image
    for result, n in zip(results, (3, 2)):
        assert result.scores.shape == (n,) and result.scores.dtype == torch.float32
        assert result.anomaly_maps.shape == (n, SIZE, SIZE) and result.anomaly_maps.dtype == torch.float32
        assert result.reconstructions.shape == (n, 3, SIZE, SIZE)
        assert result.meta["rel_path"] == [data[int(i)]["rel_path"] for i in result.meta["index"]]
        # the score is the maximum of the smoothed map (score='max')
        torch.testing.assert_close(result.scores, result.anomaly_maps.flatten(1).amax(1))
        assert not result.scores.requires_grad
    no_recon = next(run_inference(scorer, DataLoader(data, batch_size=3), torch.device("cpu"), None,
                                  with_reconstructions=False))
    assert no_recon.reconstructions is None
    torch.testing.assert_close(no_recon.anomaly_maps, results[0].anomaly_maps)


def test_evaluate_restores_train_mode_and_matches_compute_metrics():
    scorer = _scorer(merge=False)  # mid-training: adapters unmerged, train mode
    scorer.train()
    scorer.model.decoder_blocks.eval()  # a mixed state must come back exactly as it was
    before = {name: m.training for name, m in scorer.named_modules()}
    loader = DataLoader(TinyTestSet(), batch_size=4)
    metrics = evaluate(scorer, loader, torch.device("cpu"), None)
    assert {name: m.training for name, m in scorer.named_modules()} == before
    assert all(p.grad is None for p in scorer.parameters())

    scorer.eval()
    collected = _collect(scorer, batch_size=4)
    expected = compute_metrics(collected.scores, collected.labels, collected.defects,
                               collected.maps, collected.masks, collected.has_mask)
    assert metrics.keys() == expected.keys()
    assert metrics["per_defect"] == pytest.approx(expected["per_defect"])
    assert {k: v for k, v in metrics.items() if k != "per_defect"} == pytest.approx(
        {k: v for k, v in expected.items() if k != "per_defect"})
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max"):
        assert metrics[key] is None or 0.0 <= metrics[key] <= 1.0
    assert metrics["n_images"] == 6 and metrics["n_anomalous"] == 3


def test_evaluate_keeps_eval_mode_and_rejects_unlabelled():
    scorer = _scorer().eval()
    evaluate(scorer, DataLoader(TinyTestSet(), batch_size=6), torch.device("cpu"), None)
    assert not any(m.training for m in scorer.modules())

    class Unlabelled(TinyTestSet):
        def __getitem__(self, i):
            return {**super().__getitem__(i), "label": -1}

    with pytest.raises(ValueError, match="labelled"):
        evaluate(scorer, DataLoader(Unlabelled(), batch_size=6), torch.device("cpu"), None)


def test_collector_preallocates_float32_maps():
    collector = _collect(_scorer().eval(), batch_size=4, with_reconstructions=False)
    assert collector.maps.dtype == np.float32 and collector.maps.shape == (6, SIZE, SIZE)
    assert collector.masks.dtype == bool and int(collector.masks.sum()) == 3 * 14 * 18
    assert engine.MASK_THRESHOLD == 0.5
