"""Worker for tests/test_sequence_parallel.py (run under torchrun, gloo): every layer type with the sequence
sharded over all ranks equals the single-device model on the full sequence: loss, every rank's logits and every
gradient.
argv: shard backend out.json [documents]: with "documents", packed documents (document masking) whose
boundaries fall inside shards and whose documents cross them."""

import copy
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from dsv4 import build_model  # noqa: E402
from dsv4.parallel import SequenceParallel  # noqa: E402
from dsv4.parallel.collectives import all_reduce_sum  # noqa: E402

TINY = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, intermediate_size=48, num_attention_heads=4,
            head_dim=16, qk_rope_head_dim=8, q_lora_rank=16, o_groups=2, o_lora_rank=8, sliding_window=6,
            index_n_heads=2, index_head_dim=8, index_topk=3, num_key_value_heads=2)
CASES = [([0, 0], "sparse"), ([4, 4], "dense"), ([4, 4], "indexer_warmup"), ([4, 0], "sparse"), ([8, 4], "sparse"),
         ([-1, 8], "sparse")]
COEF = 0.5


def traffic_formula(cfg, shard: int, world: int, phase: str, batch: int) -> dict[str, float]:
    """What the layer kinds (dsv4/layer_kinds.py) say this rank's forward collectives send, keyed like
    SequenceParallel.bytes_sent, fp32. Its Ulysses counter counts the whole tensors handed to the all-to-all, the
    formula the (P - 1) / P of them that leave the rank."""
    total: dict[str, float] = {}
    for spec, ratio in zip(cfg.layer_specs(), cfg.compress_ratios):
        for key, size in spec.sp_bytes(cfg, ratio, shard, world, element_size=4, phase=phase).items():
            scale = world / (world - 1) if key == "ulysses_all_to_all" else 1
            total[key] = total.get(key, 0) + batch * size * scale
    return total


def main() -> None:
    import deepspeed  # Ulysses (the dense baseline under SP) runs on deepspeed.comm

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    shard = int(sys.argv[1])
    backend = sys.argv[2]
    documents = len(sys.argv) > 4 and sys.argv[4] == "documents"
    seq_len = shard * world
    positions = None
    if documents:  # two layouts: documents of 5, 1, 13, 4, ... and 11, 2, 7, ... tokens
        rows = []
        for lengths in ([5, 1, 13, 4, 9, 3, 17], [11, 2, 7, 12, 6, 1, 20]):
            pos = torch.cat([torch.arange(n) for n in lengths * (seq_len // sum(lengths) + 1)])
            rows.append(pos[:seq_len])
        positions = torch.stack(rows)
    sp = SequenceParallel(group=dist.group.WORLD, rank=rank, world=world, shard_len=shard)
    results = []
    for ratios, phase in CASES:
        torch.manual_seed(0)
        ref = build_model(dict(TINY, compress_ratios=ratios), backend=backend, chunk_size=8, phase=phase)
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if name.endswith("ape") or name.endswith("attn_sink"):
                    p.normal_()
        model = copy.deepcopy(ref)
        model.set_sequence_parallel(sp)
        ids = torch.randint(0, 61, (2, seq_len + 1), generator=torch.Generator().manual_seed(1))
        inputs, labels = ids[:, :-1], ids[:, 1:]  # labels shifted on the FULL sequence, then sharded

        out = ref(inputs, labels=labels, positions=positions)
        ref_loss = out.lm_loss + (COEF * out.indexer_loss if out.indexer_loss is not None else 0)
        ref_loss.backward()

        mine = slice(rank * shard, (rank + 1) * shard)
        sp.bytes_sent.clear()
        out_sp = model(inputs[:, mine], labels=labels[:, mine],
                       positions=positions[:, mine] if positions is not None else None)
        bytes_sent = dict(sp.bytes_sent)  # the forward's collectives (the backward's are not counted)
        total_tokens = all_reduce_sum(out_sp.num_tokens, sp)
        loss = out_sp.lm_loss_sum / total_tokens  # local sum / global count; gradients summed over SP ranks
        if out_sp.indexer_loss is not None:
            loss = loss + COEF * out_sp.indexer_loss
        loss.backward()
        sp_loss = all_reduce_sum(loss.detach(), sp)
        worst = 0.0
        worst_name = ""
        for (name, p_ref), (_, p_sp) in zip(ref.named_parameters(), model.named_parameters()):
            g_ref = p_ref.grad if p_ref.grad is not None else torch.zeros_like(p_ref)
            g_sp = p_sp.grad if p_sp.grad is not None else torch.zeros_like(p_sp)
            g_sp = all_reduce_sum(g_sp, sp)
            err = float((g_sp - g_ref).abs().max() / g_ref.abs().max().clamp_min(1e-6))
            if err > worst:
                worst, worst_name = err, name
        # every rank's own shard of the logits against the reference's same positions
        logits_err = [0.0] * world
        dist.all_gather_object(logits_err, float((out_sp.logits - out.logits[:, mine]).abs().max()))
        results.append(dict(ratios=ratios, phase=phase, ref_loss=float(ref_loss), sp_loss=float(sp_loss),
                            worst_grad_rel_err=worst, worst_grad=worst_name, logits_err_per_rank=logits_err,
                            bytes_sent=bytes_sent, bytes_formula=traffic_formula(ref.config, shard, world, phase,
                                                                                 batch=inputs.shape[0])))
    if rank == 0:
        with open(sys.argv[3], "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
