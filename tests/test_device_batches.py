"""--data_on_device: the device-resident batches are the DataLoader's batches (same images, same shifts)."""
import pytest
import torch
from torch.utils.data import DataLoader

import main_train
from util.datasets import JitteredSampler, TrainDataset, jitter_offsets
from util.device_batches import AUTO_BUDGET_BYTES, DeviceBatches, dataset_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("world_size", [1, 2])
def test_device_batches_equal_the_dataloader_batches(synthetic_category, world_size):
    dataset = TrainDataset(synthetic_category, 56, jitter=True)  # 8 images, shifts of up to 1 px
    assert dataset.margin == 1
    for rank in range(world_size):
        sampler = JitteredSampler(dataset, num_replicas=world_size, rank=rank, seed=3)
        loader = DataLoader(dataset, batch_size=3, sampler=sampler, num_workers=0, drop_last=True)
        resident = DeviceBatches(dataset, sampler, 3, drop_last=True, device=torch.device("cpu"))
        assert len(resident) == len(loader) == (8 // world_size) // 3
        shifted = False
        for epoch in range(3):
            sampler.set_epoch(epoch)
            expected, got = list(loader), list(resident)
            assert len(got) == len(expected)
            for a, b in zip(expected, got):
                assert torch.equal(a, b)  # bit for bit: same crops, same normalisation arithmetic
            plan = sampler.plan()
            shifted |= bool((plan[:, 1:] != 1).any())
        assert shifted  # the shifts are not all zero (centre crop = offset 1)


def test_the_plan_is_distributed_samplers_shares_with_seeded_shifts(synthetic_category):
    dataset = TrainDataset(synthetic_category, 56, jitter=True)
    plans = []
    for rank in range(2):
        sampler = JitteredSampler(dataset, num_replicas=2, rank=rank, seed=0)
        sampler.set_epoch(5)
        reference = torch.utils.data.DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        reference.set_epoch(5)
        plan = sampler.plan()
        assert plan[:, 0].tolist() == list(reference)  # the same images as DistributedSampler gives this rank
        assert plan[:, 1:].min() >= 0 and plan[:, 1:].max() <= 2
        plans.append(plan)
    assert sorted(plans[0][:, 0].tolist() + plans[1][:, 0].tolist()) == list(range(8))
    assert torch.equal(jitter_offsets(4, 1, 0, 5, 1), plans[1][:, 1:])  # a function of (seed, epoch, rank) alone
    assert not torch.equal(jitter_offsets(64, 1, 0, 5, 1), jitter_offsets(64, 1, 0, 6, 1))
    unshifted = JitteredSampler(TrainDataset(synthetic_category, 56, jitter=False), 1, 0, 0)
    assert (unshifted.plan()[:, 1:] == 0).all()


def test_data_on_device_choice(synthetic_category):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert main_train.resolve_data_on_device("auto", cuda, AUTO_BUDGET_BYTES)
    assert not main_train.resolve_data_on_device("auto", cuda, AUTO_BUDGET_BYTES + 1)
    assert not main_train.resolve_data_on_device("auto", cpu, 1)  # the CPU recipe keeps its DataLoader
    assert main_train.resolve_data_on_device("on", cpu, AUTO_BUDGET_BYTES + 1)
    assert not main_train.resolve_data_on_device("off", cuda, 1)
    _, loader = main_train.build_data(str(synthetic_category), 56, True, 4, 0, False, 0, 1, 0, [], "on", cpu)
    assert isinstance(loader, DeviceBatches) and len(loader.dataset) == 8
    assert dataset_bytes(loader.dataset) == 8 * 3 * 58 * 58
    _, loader = main_train.build_data(str(synthetic_category), 56, True, 4, 0, False, 0, 1, 0, [], "auto", cpu)
    assert isinstance(loader, DataLoader)


def test_training_with_resident_data_runs_end_to_end(synthetic_category, tmp_path, capsys):
    argv = ["--data_path", str(synthetic_category), "--output_dir", str(tmp_path), "--model", "mae_vit_tiny_patch7",
            "--input_size", "56", "--batch_size", "4", "--epochs", "3", "--warmup_epochs", "1", "--holdout", "0",
            "--data_on_device", "on", "--save_every", "0"]
    assert main_train.main(main_train.get_args_parser().parse_args(argv)) == 0
    assert "resident on the device" in capsys.readouterr().out
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert len(lines) == 3  # every epoch logged, the deferred ones included, in order
    assert [int(line.split('"epoch": ')[1].split(",")[0]) for line in lines] == [0, 1, 2]
