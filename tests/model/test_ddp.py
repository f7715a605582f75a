"""DDP over 2 gloo processes equals one process on the same global batch, on one node and on two;
launch() reports failures.

The 2 workers run exactly what torchrun runs (torchrun's environment variables, then
``model.train.main``), after a one-step gradient check through ``parallelize``.
"""

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from model import distributed
from model.checkpoint import load_model
from model.config import GPTConfig, TrainConfig
from model.data import TokenWindows
from model.distributed import DistInfo
from model.gpt import GPT
from model.launch import Rendezvous, launch
from model.train import TrainSpec, main, run
from tests.ports import free_port

torch.set_num_threads(1)

TINY = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)
MICRO = 2  # rows per rank; the single process takes 2 * MICRO
CPU = DistInfo(rank=0, local_rank=0, world=1, device=torch.device("cpu"))


def spec_for(tmp: Path, out: str, micro_batch_size: int) -> TrainSpec:
    return TrainSpec(
        out_dir=tmp / out,
        model=TINY,
        train=TrainConfig(
            max_steps=3,
            micro_batch_size=micro_batch_size,
            grad_accum_steps=2,
            block_size=16,
            warmup_steps=1,
            lr=1e-2,
            min_lr=1e-3,
            log_every=1,
            eval_every=2,
            eval_batches=2,
            ckpt_every=2,
        ),
        train_files=[(tmp / "train.bin", "uint16")],
        val_files=[(tmp / "val.bin", "uint16")],
    )


def grads_of(model, x, y):
    model.zero_grad()
    model(x, y)[1].backward()


def _worker(rank: int, world: int, tmp: str, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        CUDA_VISIBLE_DEVICES="",
    )  # gloo on CPU
    info = distributed.init_distributed()
    assert (info.rank, info.world, distributed.world_size()) == (rank, world, world)
    tmp = Path(tmp)
    torch.manual_seed(0)
    model = GPT(TINY)
    ddp = distributed.parallelize(model, info.device)
    x, y = TokenWindows([(tmp / "train.bin", "uint16")], seed=5).batch(0, 0, rank, world, MICRO, 16)
    grads_of(ddp, x, y)
    if rank == 0:
        save_file({n: p.grad.contiguous() for n, p in model.named_parameters()}, str(tmp / "ddp_grads.safetensors"))
    main(["--spec", str(tmp / "ddp.json")])  # what torchrun runs; leaves the process group at the end


def test_ddp_matches_single_process(tmp_path):
    (np.arange(4000) * 5 % 23).astype("<u2").tofile(tmp_path / "train.bin")
    (np.arange(800) * 5 % 23).astype("<u2").tofile(tmp_path / "val.bin")
    spec_for(tmp_path, "ddp", MICRO).save(tmp_path / "ddp.json")
    mp.spawn(_worker, args=(2, str(tmp_path), free_port()), nprocs=2, join=True)

    torch.manual_seed(0)
    model = GPT(TINY)
    x, y = TokenWindows([(tmp_path / "train.bin", "uint16")], seed=5).batch(0, 0, 0, 1, 2 * MICRO, 16)
    grads_of(model, x, y)
    ddp_grads = load_file(str(tmp_path / "ddp_grads.safetensors"))
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp_grads[name], p.grad, rtol=1e-5, atol=1e-6)

    single = run(spec_for(tmp_path, "single", 2 * MICRO), CPU)
    ddp_summary = json.loads((tmp_path / "ddp" / "final" / "summary.json").read_text())
    assert ddp_summary["world"] == 2 and single["world"] == 1
    assert ddp_summary["tokens"] == single["tokens"] == 3 * 2 * 2 * MICRO * 16
    assert ddp_summary["train_loss"] == pytest.approx(single["train_loss"], rel=1e-5)
    assert ddp_summary["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
    a = load_model(tmp_path / "ddp" / "final").state_dict()
    b = load_model(tmp_path / "single" / "final").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    ckpt = torch.load(tmp_path / "ddp" / "ckpt-00000003" / "trainer.pt", weights_only=True)
    assert len(ckpt["rng_cpu"]) == 2 and not torch.equal(ckpt["rng_cpu"][0], ckpt["rng_cpu"][1])


def test_two_torchrun_nodes_give_one_process_losses(tmp_path):
    """Two launchers, as two hosts would run them: torchrun's c10d rendezvous, one gloo process each."""
    (np.arange(4000) * 5 % 23).astype("<u2").tofile(tmp_path / "train.bin")
    (np.arange(800) * 5 % 23).astype("<u2").tofile(tmp_path / "val.bin")
    spec_for(tmp_path, "nodes", MICRO).save(tmp_path / "nodes.json")
    meet = Rendezvous(f"127.0.0.1:{free_port()}", nnodes=2, job_id="lmforge-test")
    lines: list[list[str]] = [[], []]
    with ThreadPoolExecutor(2) as pool:
        nodes = [
            pool.submit(
                launch, tmp_path / "nodes.json", 1, lines[i].append, {"CUDA_VISIBLE_DEVICES": ""}, rendezvous=meet
            )
            for i in range(2)
        ]
        for node in nodes:
            node.result(timeout=600)
    single = run(spec_for(tmp_path, "single", 2 * MICRO), CPU)
    summary = json.loads((tmp_path / "nodes" / "final" / "summary.json").read_text())
    assert summary["world"] == 2 and summary["tokens"] == single["tokens"]
    assert summary["train_loss"] == pytest.approx(single["train_loss"], rel=1e-5)
    assert summary["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
    assert any(line.startswith("step 3/3") for node in lines for line in node)  # rank 0's log, on one of the nodes


@pytest.mark.parametrize(
    "endpoint, nnodes, job_id, field",
    [("head", 2, "a", "host:port"), ("head:29400", 0, "a", "nnodes"), ("head:1", 2, "a b", "job id")],
)
def test_a_bad_rendezvous_is_refused_by_name(endpoint, nnodes, job_id, field):
    with pytest.raises(ValueError, match=field):
        Rendezvous(endpoint, nnodes, job_id)


def test_launch_streams_output_and_raises_with_the_child_error(tmp_path):
    spec = spec_for(tmp_path, "run", MICRO)  # train.bin is never written
    spec.save(tmp_path / "spec.json")
    lines = []
    with pytest.raises(RuntimeError) as err:
        launch(tmp_path / "spec.json", nproc=1, on_line=lines.append, env={"CUDA_VISIBLE_DEVICES": ""})
    message = str(err.value)
    assert "exit code" in message and "torch.distributed.run" in message
    assert "FileNotFoundError" in message and "train.bin" in message
    assert any("token file not found" in line for line in lines)
