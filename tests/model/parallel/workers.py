"""What each rank runs in the parity test (module level, so torch.multiprocessing can spawn it).

`run_case(engine, ...)` is the scenario, the same on 1 rank (the parent, plain Engine) and on the
leader of N ranks: logits of a prompt, a 64-token greedy generation off a prefilled prefix (with
a snapshot of the running request's paged caches at token 63), the prefix's snapshot, and a
generation off a restored snapshot made by the other side.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dsa_rag.model.engine.engine import Snapshot
from dsa_rag.model.engine.sampling import SamplingParams
from dsa_rag.model.parallel import layers
from dsa_rag.model.parallel.dist import ParallelContext
from dsa_rag.model.parallel.engine import LeaderEngine, ReplicaDiverged, ReplicaEngine, follow
from dsa_rag.model.parallel.load import load_sharded

N_NEW = 64
GREEDY = SamplingParams(max_tokens=N_NEW, temperature=0.0, stop_token_ids=[])


def prompts(vocab: int) -> tuple[list[int], list[int], list[int]]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(2, vocab, (150,), generator=g).tolist()
    return ids, ids[:100], ids[100:112]  # full prompt; a prefix (> index_topk 64); a question


def logits_of(model) -> torch.Tensor:
    """fp32 logits [1, 150, vocab] of the full prompt (a collective under TP: every rank calls it)."""
    with torch.inference_mode():
        return model(torch.tensor([prompts(model.cfg.vocab_size)[0]])).float()


def run_case(engine, out: dict, restore_from: Path | None) -> dict:
    """Drive `engine` (the leader's, or a plain Engine) through the scenario; fill `out`."""
    _, prefix, question = prompts(engine.cfg.vocab_size)
    h = engine.prefill_prefix(prefix)
    out["prefix_snapshot"] = engine.snapshot(h)
    rid = engine.add_request(question, GREEDY, prefix=h)
    tokens = []
    while rid in engine.running:
        r = engine.running[rid]
        if len(r.out_ids) == N_NEW - 1:
            out["running_snapshot"] = engine.snapshot(rid)  # the paged caches after 63 tokens
        for ev in engine.step():
            if ev.request_id == rid and ev.token_id >= 0:
                tokens.append(ev.token_id)
    out["tokens"] = tokens
    if restore_from is not None:
        h2 = engine.restore(Snapshot.load(restore_from))
        out["restored_tokens"] = engine.complete(question, GREEDY, prefix=h2).token_ids
        engine.release(h2)
    # teacher-forced log-probs and a traced (citations) generation off the same prefix
    out["score"] = engine.score(question, out["tokens"][:8], prefix=h)
    traced = engine.complete(question, SamplingParams(max_tokens=4, temperature=0.0, stop_token_ids=[], trace=True,
                                                      trace_layers=True), prefix=h)
    out["traces"] = [(t.positions, t.mass, t.layers) for t in traced.traces]
    engine.release(h)
    out["fingerprint"] = engine.fingerprint
    return out


def score_inputs():
    """Random indexer inputs: q [5, 4, 16], k [20, 16], w [5, 4], k_scale [20]; queries at 15..19."""
    g = torch.Generator().manual_seed(3)
    return (torch.randn(5, 4, 16, generator=g), torch.randn(20, 16, generator=g), torch.randn(5, 4, generator=g),
            torch.rand(20, generator=g) + 0.5)


def reduced_scores(ctx: ParallelContext) -> dict:
    """reduce_index_scores of every score type, this rank holding heads [2r, 2r + 2)."""
    q, k, w, ks = score_inputs()
    h0, h1 = 2 * ctx.rank, 2 * ctx.rank + 2
    return {score: layers.reduce_index_scores(ctx, q[:, h0:h1], k, w[:, h0:h1], ks, 15, score)
            for score in ("relu", "mixture", "softmax_mixture")}


def parity_worker(rank: int, world: int, init_method: str, ckpts: dict, out_dir: str, cases: list) -> None:
    """For each (family, tp, ep, fp8_numerics): load this rank's pieces of ckpts[family], run the
    scenario led by rank 0; rank 0 saves its results and writes its prefix snapshot (the only writer)."""
    base = ParallelContext.init(rank, world, 1, 1, init_method=init_method, timeout_s=60)
    out_dir = Path(out_dir)
    scores = reduced_scores(ParallelContext(rank, world, world, 1, base.group, base.cpu_group))
    if rank == 0:
        torch.save(scores, out_dir / "reduced_scores.pt")
    for case in cases:
        family, tp, ep, fp8_numerics = case
        ctx = ParallelContext(rank, world, tp, ep, base.group, base.cpu_group)
        model = load_sharded(ckpts[family], ctx, dtype=torch.float32, fp8_numerics=fp8_numerics)
        tag = case_tag(case)
        logits = logits_of(model)
        if ctx.is_leader:
            eng = LeaderEngine(model, ctx)
            res = run_case(eng, {"logits": logits, "load_stats": model.load_stats},
                           out_dir / f"snap_1rank_{ref_tag(case)}.safetensors")
            eng.shutdown_followers()
            res["prefix_snapshot"].save(out_dir / f"snap_{tag}.safetensors")
            res["prefix_snapshot"] = res["prefix_snapshot"].tensors
            res["running_snapshot"] = res["running_snapshot"].tensors
            torch.save(res, out_dir / f"{tag}.pt")
        else:
            eng = ReplicaEngine(model, ctx)
            follow(eng)
            torch.save({"load_stats": model.load_stats}, out_dir / f"{tag}_rank{rank}.pt")
    diverge(rank, ParallelContext(rank, world, 2, 2, base.group, base.cpu_group), ckpts["deepseek_v32"], out_dir)


def diverge(rank: int, ctx: ParallelContext, ckpt: str, out_dir: Path) -> None:
    """A follower whose engine holds a request the leader never sent (what a one-rank failure
    leaves behind): the next step must raise ReplicaDiverged on both ranks, not hang or drift."""
    model = load_sharded(ckpt, ctx, dtype=torch.float32)
    outcome = "no error"
    if ctx.is_leader:
        eng = LeaderEngine(model, ctx)
        eng.add_request([5, 6, 7], GREEDY)
        try:
            eng.step()
        except ReplicaDiverged as e:
            outcome = str(e)
    else:
        eng = ReplicaEngine(model, ctx)
        eng.add_request([9, 9], GREEDY, request_id=99)
        try:
            follow(eng)
        except ReplicaDiverged as e:
            outcome = str(e)
    torch.save(outcome, out_dir / f"diverged_rank{rank}.pt")


def case_tag(case) -> str:
    family, tp, ep, fp8_numerics = case
    return f"{family}_tp{tp}_ep{ep}_fp8{int(fp8_numerics)}"


def ref_tag(case) -> str:
    """The 1-rank reference a case compares with: same checkpoint, same numerics."""
    return f"{case[0]}_fp8{int(case[3])}"
