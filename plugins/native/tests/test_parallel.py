"""Tensor + expert parallel runtime: 2 ranks over gloo on the CPU give the tokens of 1 rank."""

from __future__ import annotations

import os
import socket

import pytest

from qwenhw.engine.base import Sampling

pytestmark = pytest.mark.slow


def _rank(rank: int, world: int, port: int, path: str, prompt: list[int], out, fused: bool = False,
          experts: str = "ep") -> None:
    if fused:  # the Triton decode kernels through the interpreter (read when triton.jit decorates them)
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from qwenhw_native.sharding import shard
    from qwenhw_native.runtime import Runtime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # fp32: sums agree to ~1e-6
    shard(model, rank, world, experts)
    rt = Runtime(model, 64, "cpu", graphs=False if fused else "emulate", group=dist.group.WORLD, batch=2)
    rt.prefill_chunk = 4  # the 6-token prompts prefill one sequence and one chunk at a time on the ranks
    assert rt.step.fused == fused
    logits = rt.prefill([prompt, prompt[::-1]])
    tokens = [logits.argmax(-1)]
    for _ in range(5):
        tokens.append(rt.decode(tokens[-1]).argmax(-1))
    out.put((rank, torch.stack(tokens, 1).tolist()))
    dist.destroy_process_group()


@pytest.mark.parametrize("experts", ["ep", "tp", "replicated"], ids=["whole-experts", "split-experts", "dealt"])
@pytest.mark.parametrize("fused", [False, True], ids=["torch", "fused-kernels"])
def test_two_ranks_match_one(tiny_moe, fused, experts):
    """Each rank's experts through transformers' kernels (expert-parallel sentinel) or the fused Triton
    MoE kernels (expert ids outside the rank's range skipped), with whole experts per rank, every expert
    split by its intermediate size, or every expert on both ranks (decode steps deal the touched ones out),
    the prompts prefilled in chunks of 4 tokens: the same tokens as one process prefilling them in one pass."""
    if fused:
        pytest.importorskip("triton")
    import torch
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM

    from qwenhw_native.runtime import Runtime

    prompt = [785, 6722, 315, 9625, 374, 264]
    model = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32)
    rt = Runtime(model, 64, "cpu", graphs=False, batch=2)
    logits = rt.prefill([prompt, prompt[::-1]])
    single = [logits.argmax(-1)]
    for _ in range(5):
        single.append(rt.decode(single[-1]).argmax(-1))
    single = torch.stack(single, 1).tolist()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, str(tiny_moe), prompt, out, fused, experts))
             for r in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results[0] == results[1] == single


def test_load_starts_a_rank_job_and_matches_one_process(tiny_moe, texts):
    """A transformers-tp plan (made for a 2-GPU profile) loads as a 2-rank torchrun job qwenhw drives;
    here on the CPU over gloo, in fp32 so the split sums agree with one process to the last token."""
    import qwenhw

    plan = qwenhw.plan(str(tiny_moe), hardware="2xH100-80G", backend="native", engine="tensor-parallel",
                       context=128, concurrency=2)
    assert plan.engine == "tensor-parallel" and plan.parallel.tp == 2
    assert plan.config["experts"] == "replicated" and plan.parallel.ep == 2  # all 8 experts on each rank
    fp32 = plan.replace(config={**plan.config, "dtype": "fp32", "threads": 1})
    prompts = ["The capital of France is", "Hello"]
    greedy = [Sampling(max_tokens=6, temperature=0), Sampling(max_tokens=3, temperature=0)]
    with qwenhw.load(fp32) as engine:
        ranks = engine.generate("The capital of France is", max_tokens=6, temperature=0)[0]
        chat = engine.chat([{"role": "user", "content": "hi"}], thinking=False, max_tokens=4, temperature=0)
        # the server's path: two requests decoded together on the ranks' batched runtime
        assert engine.max_batch == 2
        together = texts(engine.stream_batch(prompts, greedy))
        left = engine.stream_batch(prompts, greedy)  # a reader that leaves after one piece: the ranks run the
        next(left)                                   # batch to its end; its pieces must not answer the next
        left.close()
        again = engine.generate("The capital of France is", max_tokens=6, temperature=0)[0]
    single_plan = qwenhw.plan(str(tiny_moe), backend="native", engine="one-gpu", context=128)
    with qwenhw.load(single_plan.replace(config={**single_plan.config, "dtype": "fp32"})) as engine:
        one = engine.generate("The capital of France is", max_tokens=6, temperature=0)[0]
        alone = [texts(engine.stream_batch([p], [s]))[0] for p, s in zip(prompts, greedy)]
    assert ranks.token_ids == one.token_ids == again.token_ids and chat.completion_tokens == 4
    assert together == alone


def test_a_rank_job_with_split_experts_matches_one_process(tiny_moe):
    """The other expert split through the product path: each rank loads a slice of every expert from the
    per-expert checkpoint tensors (load_shard), and reports its load's read and copy seconds (fp32, CPU)."""
    import qwenhw

    plan = qwenhw.plan(str(tiny_moe), hardware="2xH100-80G", backend="native", engine="tensor-parallel",
                       context=128)
    split = plan.replace(config={**plan.config, "experts": "tp", "dtype": "fp32", "threads": 1})
    with qwenhw.load(split) as engine:
        ranks = engine.generate("The capital of France is", max_tokens=6, temperature=0)[0]
        info = engine.info
    single = qwenhw.plan(str(tiny_moe), backend="native", engine="one-gpu", context=128)
    with qwenhw.load(single.replace(config={**single.config, "dtype": "fp32"})) as engine:
        one = engine.generate("The capital of France is", max_tokens=6, temperature=0)[0]
    assert ranks.token_ids == one.token_ids
    assert info["experts"] == "tp" and info["copy_s"] >= 0 and info["read_s"] >= 0


def test_data_parallel_replicas_split_a_batch_and_match_one_process(tiny_moe, texts):
    """A transformers-dp plan: 2 replicas (one per GPU of the profile; here 2 CPU ranks over gloo) each
    decode their share of a batch of prompts; rank 0 answers with all of them, in order."""
    import qwenhw

    plan = qwenhw.plan(str(tiny_moe), hardware="2xH100-80G", backend="native", engine="replicas",
                       context=128, concurrency=4)
    assert plan.engine == "replicas" and plan.parallel.dp == 2 and plan.parallel.tp == 1
    prompts = ["The capital of France is", "1, 2, 3,", "Hello", "def add(a, b):", "Qwen is"]
    greedy = [Sampling(max_tokens=5 - i % 2, temperature=0) for i in range(len(prompts))]
    with qwenhw.load(plan.replace(config={**plan.config, "dtype": "fp32", "threads": 1})) as engine:
        split = engine.generate(prompts, max_tokens=5, temperature=0)
        streamed = "".join(engine.stream(prompts[0], max_tokens=5, temperature=0))
        # the server's path: a batch split over the replicas, whole texts or streamed pieces
        assert engine.max_batch == 4
        whole = texts(engine.stream_batch(prompts[:4], greedy[:4], stream=False))
        order = list(engine.stream_batch(prompts[:4], greedy[:4]))
        pieces = texts(order)
    single_plan = qwenhw.plan(str(tiny_moe), backend="native", engine="one-gpu", context=128)
    with qwenhw.load(single_plan.replace(config={**single_plan.config, "dtype": "fp32"})) as engine:
        one = engine.generate(prompts, max_tokens=5, temperature=0)
        alone = [texts(engine.stream_batch([p], [s]))[0] for p, s in zip(prompts, greedy)]
    assert [c.token_ids for c in split] == [c.token_ids for c in one]
    assert streamed == one[0].text
    # rows 1 and 3 can only come from replica 1, and replica 0 decodes rows 0 and 2 together
    assert whole == alone[:4] and pieces == alone[:4]
    rows = [p.row for p in order]
    assert rows.index(2) < len(rows) - 1 - rows[::-1].index(0)


@pytest.mark.parametrize("experts", ["ep", "tp", "replicated"])
@pytest.mark.parametrize("world", [2, 4])
def test_shard_loader_reads_each_ranks_slices_from_the_checkpoint(tiny_moe, world, experts):
    """load_shard builds a rank's shard from the safetensors slices alone (the experts fused from the
    checkpoint's per-expert tensors): the same parameters as loading the whole model and cutting it."""
    import torch
    from transformers import AutoModelForCausalLM

    from qwenhw_native.sharding import Share, load_shard, shard, share_of

    whole = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32)
    gate_up = whole.model.layers[0].mlp.experts.gate_up_proj.detach().clone()  # [8, 2 x inter, hidden]
    inter = gate_up.shape[1] // 2
    for rank in range(world):
        whole = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32)
        shard(whole, rank, world, experts)
        part = load_shard(str(tiny_moe), rank, world, "cpu", torch.float32, experts)
        mine, ref = dict(part.named_parameters()), dict(whole.named_parameters())
        assert mine.keys() == ref.keys()
        for name, value in ref.items():
            assert torch.equal(mine[name], value), name
        assert torch.equal(part.model.rotary_emb.inv_freq, whole.model.rotary_emb.inv_freq)
        got = part.model.layers[0].mlp.experts
        if experts == "ep":
            assert share_of(got).ep_start == rank * 8 // world and got.gate_up_proj.shape[0] == 8 // world
            continue
        if experts == "replicated":
            assert torch.equal(got.gate_up_proj, gate_up) and share_of(got) == Share(0, rank, world)
            continue
        n = inter // world  # every expert, rows [rank*n, (rank+1)*n) of its gate and of its up projection
        assert got.gate_up_proj.shape == (8, 2 * n, gate_up.shape[2]) and got.down_proj.shape[-1] == n
        assert torch.equal(got.gate_up_proj[:, :n], gate_up[:, rank * n:(rank + 1) * n])
        assert torch.equal(got.gate_up_proj[:, n:], gate_up[:, inter + rank * n:inter + (rank + 1) * n])


def test_shard_loader_refuses_quantized_and_foreign_checkpoints(tiny_moe, tmp_path):
    """A quantized checkpoint or one missing a tensor the shard needs stops with a message that says so."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from qwenhw_native.sharding import load_shard

    quantized = tmp_path / "fp8"
    shutil.copytree(tiny_moe, quantized)
    config = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(ValueError, match="quantized checkpoint \\(fp8\\)"):
        load_shard(str(quantized), 0, 2, "cpu", torch.float32)
    partial = tmp_path / "partial"
    shutil.copytree(tiny_moe, partial)
    tensors = load_file(str(partial / "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(tensors, str(partial / "model.safetensors"))
    with pytest.raises(ValueError, match="no tensor model.layers.1.mlp.experts.5.up_proj.weight"):
        load_shard(str(partial), 1, 2, "cpu", torch.float32)  # rank 1 holds experts 4..7
