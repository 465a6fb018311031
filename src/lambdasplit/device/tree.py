"""Draft trees (issue 24): a static tree drafted by the draft head, verified by the body in one frame.

A chain of drafts stops paying after 3-6 tokens: each extra token is accepted only if all before it
were. A tree spends the same positions on the head's second and third guesses where they are most
likely to be needed (EAGLE-1's static trees, shaped as Sequoia does from measured acceptance), and
the body verifies it in one round trip: each position attends to the sequence and its own ancestors
(wire/protocol.py's TREE). Measured offline on the held-out chat prompts, the shipped head's best
chain gives 2.00 tokens per round trip, a tree of 16 nodes 2.43 and of 32 nodes 2.67
(`python -m benchmarks draft-tree`).

`tree_decoding` is a `generate(custom_generate=...)` decoding loop, so every logits processor and
stopping criterion (max length, EOS, stop strings, cancellation) works as in any `generate()`, and
the streamer too once handed over as `token_streamer` (generate() passes a callable decoding loop
only the keywords `_sample` lacks, and `streamer` is one of them): greedy only (sampling keeps the chain and speculative sampling). After each
verification the accepted path's tokens are appended and head, body and tail are cropped to the
longest accepted prefix that lies in frame order (the top-1 chain is drafted first, so usually all
of it); accepted tokens past that prefix are sent again, in front of the next tree.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from lambdasplit import defaults
from lambdasplit.device.draft import Drafter, DraftHeadError, DraftStats, bound_drafter

log = logging.getLogger(__name__)

RankPath = tuple[int, ...]  # ranks from the root: (0, 1) is the second choice after the first choice


@dataclass(frozen=True)
class Shape:
    """A static draft tree: node i is the `paths[i][-1]`-th most likely token after its parent.
    Nodes are in depth-first order with the likelier child first, so the top-1 chain comes first
    and a node's parent always comes before it."""

    name: str
    paths: tuple[RankPath, ...]

    def __post_init__(self) -> None:
        known = set(self.paths)
        if len(known) != len(self.paths) or not self.paths:
            raise ValueError(f"{self.name}: paths must be distinct and non-empty")
        for path in self.paths:
            if not path or min(path) < 0 or (len(path) > 1 and path[:-1] not in known):
                raise ValueError(f"{self.name}: {path} needs its parent {path[:-1]} in the tree")
        object.__setattr__(self, "paths", tuple(sorted(self.paths)))

    @property
    def parents(self) -> list[int]:
        """Index of each node's parent (-1: the root, the last confirmed token)."""
        index = {p: i for i, p in enumerate(self.paths)}
        return [index.get(p[:-1], -1) for p in self.paths]

    @property
    def depth(self) -> int:
        return max(len(p) for p in self.paths)

    def cut(self, nodes: int, depth: int) -> Shape:
        """The first `nodes` nodes no deeper than `depth` (at least one: depth-first order keeps
        every parent)."""
        paths = [p for p in self.paths if len(p) <= max(depth, 1)][: max(nodes, 1)]
        return self if len(paths) == len(self.paths) else Shape(self.name, tuple(paths))


def chain(n: int) -> Shape:
    return Shape(f"chain-{n}", tuple((0,) * d for d in range(1, n + 1)))


def wide(n: int) -> Shape:
    return Shape(f"wide-{n}", tuple((r,) for r in range(n)))


def best_tree(n: int, accept: Sequence[Sequence[float]], depth: int | None = None) -> Shape:
    """The `n` nodes of highest estimated acceptance, `accept[d][r]` being the chance that the
    reference token has rank r at depth d + 1 given that its ancestors were accepted (a node's
    chance: the product along its path), at most `depth` deep. Grown from the root, so every
    node's parent is in."""
    deepest = len(accept) if depth is None else min(depth, len(accept))
    frontier = [(-accept[0][r], (r,)) for r in range(len(accept[0]))]
    heapq.heapify(frontier)
    chosen: list[RankPath] = []
    while frontier and len(chosen) < n:
        score, path = heapq.heappop(frontier)
        chosen.append(path)
        if len(path) < deepest:
            for r, p in enumerate(accept[len(path)]):
                heapq.heappush(frontier, (score * p, (*path, r)))
    return Shape(f"tree-{n}" if depth is None else f"tree-{n}-depth-{depth}", tuple(chosen))


def head_tree(meta: dict[str, Any], nodes: int) -> Shape:
    """The tree of `nodes` nodes for a draft head, from the acceptance its json records, at most
    `defaults.DRAFT_TREE_DEPTH` deep: each depth costs the device one head pass a round."""
    accept = meta.get("tree_acceptance")
    if not (isinstance(accept, list) and accept and all(isinstance(row, list) and row for row in accept)):
        raise DraftHeadError("this draft head records no tree_acceptance (train-draft writes it); use --speculate draft-head")
    return best_tree(nodes, accept, defaults.DRAFT_TREE_DEPTH)


def accepted_length(tokens: Sequence[int], parents: Sequence[int], reference: Sequence[int]) -> int:
    """Longest root path of the tree (node i: token `tokens[i]`, parent `parents[i]`, -1 the root)
    whose tokens equal the start of `reference`: the drafts a greedy verification accepts."""
    children: dict[int, list[int]] = {}
    for node, parent in enumerate(parents):
        children.setdefault(parent, []).append(node)
    best, stack = 0, [(-1, 0)]
    while stack:
        node, depth = stack.pop()
        best = max(best, depth)
        if depth < len(reference):
            stack.extend((child, depth + 1) for child in children.get(node, []) if tokens[child] == reference[depth])
    return best


class TreeDrafter:
    """Drafts a static tree with the head: one pass for the newly confirmed pairs (the root), then
    one pass per depth over the nodes that have children, each attending to the confirmed pairs and
    to its own ancestors (an additive mask over the draft cache).

    The tree's shape is fixed, so which rank of which node's top-k becomes which node, and which
    drafted pairs each pass may see, are index tensors and mask patterns worked out once. A round
    then stays on the head's device until its tokens are read, once, at the end: on a GPU every
    read (or copy of a host tensor) waits for the work queued before it."""

    def __init__(self, drafter: Drafter, shape: Shape) -> None:
        self.drafter, self.shape = drafter, shape
        self.parents = shape.parents
        depths = [len(p) for p in shape.paths]
        self.children: dict[int, list[int]] = {}
        for node, parent in enumerate(self.parents):
            self.children.setdefault(parent, []).append(node)
        # per depth d >= 1: the nodes of depth d that are expanded (have children), in order
        levels = [[i for i, d in enumerate(depths) if d == depth and i in self.children] for depth in range(1, shape.depth)]
        self.levels = levels[: next((d for d, level in enumerate(levels) if not level), len(levels))]
        self.top = max(max(p[-1] for p in shape.paths) + 1, 1)
        device = drafter.lm_rows.device
        self.vocab = drafter.head.vocab.to(device)
        self._picks = [self._picks_of(nodes, device) for nodes in [[-1], *self.levels]]
        self._nodes = [torch.tensor(level, device=device) for level in self.levels]
        rows = [{node: row for row, node in enumerate(nodes)} for nodes in [[-1], *self.levels]]
        self._parent_rows = [torch.tensor([rows[d][self.parents[n]] for n in level], device=device)
                             for d, level in enumerate(self.levels)]  # each node's parent among the pass before
        self._patterns = self._masks(device)
        self.features: dict[int, torch.Tensor] = {}  # the last draft's predicted feature of each expanded node (-1: the root)

    def _picks_of(self, nodes: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a pass over `nodes`: each child's row among them, its rank, and the child."""
        picks = [(row, self.shape.paths[kid][-1], kid) for row, node in enumerate(nodes) for kid in self.children[node]]
        return tuple(torch.tensor(column, device=device) for column in zip(*picks, strict=True))  # type: ignore[return-value]

    def _masks(self, device: torch.device) -> list[torch.Tensor]:
        """Per depth pass: which of this round's drafted pairs (those after the confirmed ones)
        each of its nodes sees: its ancestors' and its own."""
        slots: dict[int, int] = {}  # node -> its pair's index among the round's drafted pairs
        patterns = []
        for level in self.levels:
            start = len(slots)
            allowed = torch.zeros(len(level), start + len(level), dtype=torch.bool)
            for row, node in enumerate(level):
                allowed[row, start + row] = True
                ancestor = self.parents[node]
                while ancestor >= 0:
                    allowed[row, slots[ancestor]] = True
                    ancestor = self.parents[ancestor]
            slots.update({node: start + row for row, node in enumerate(level)})
            patterns.append(allowed.to(device))
        return patterns

    @torch.inference_mode()
    def draft(self, cache: DynamicCache, features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> list[int]:
        """Token of every node, given the confirmed pairs not yet in `cache` (features (1, n, H),
        the tokens after them (1, n), their positions (1, n)). The cache keeps the drafted pairs
        (the caller crops them)."""
        head, drafter = self.drafter.head, self.drafter
        root = head(features, drafter.embeddings(tokens), positions, cache)[:, -1]
        confirmed = cache.get_seq_length()
        out = torch.zeros(len(self.shape.paths), dtype=torch.long, device=root.device)
        self._children(0, root, out)
        predicted = root  # (rows, H): the last pass's predicted features, in its level's order
        self.features = {-1: root[0]}
        where = positions[:, -1:] + 1  # the first depth's position, on the device
        for depth, level in enumerate(self.levels):
            inputs = predicted[self._parent_rows[depth]][None]
            seen = torch.ones(len(level), confirmed, dtype=torch.bool, device=root.device)
            allowed = torch.cat([seen, self._patterns[depth]], dim=1)
            mask = torch.zeros(allowed.shape, dtype=inputs.dtype, device=root.device).masked_fill_(~allowed, torch.finfo(inputs.dtype).min)
            predicted = head(inputs, drafter.embeddings(out[self._nodes[depth]][None]), (where + depth).expand(1, len(level)),
                             cache, mask[None, None])[0]
            self.features.update(zip(level, predicted, strict=True))
            self._children(depth + 1, predicted, out)
        return out.tolist()

    def _children(self, index: int, features: torch.Tensor, out: torch.Tensor) -> None:
        """Tokens of the children of pass `index`'s nodes (each has children; `features`
        (nodes, H)) into `out`: the ranks their paths name in the draft vocabulary's top-k."""
        rows, ranks, kids = self._picks[index]
        top = self.drafter.logits(features).topk(self.top, dim=-1).indices
        out[kids] = self.vocab[top[rows, ranks]]


@torch.inference_mode()
def reference_ranks(drafter: Drafter, samples: Sequence[Any], depth: int, top: int) -> list[list[int]]:
    """`counts[d][r]`: how often the reference token had rank r (r == top: not in the top `top`)
    at depth d + 1 of a chain that follows the reference from every answer position, stopping at
    the first rank outside the top (`samples`: train_draft.Sample, the model's answers and features)."""
    counts = [[0] * (top + 1) for _ in range(depth)]
    head, vocab = drafter.head, drafter.head.vocab
    for s in samples:
        cache = head.new_cache()
        confirmed = 0
        for length in range(s.answer + 1, len(s.ids)):
            known = length - 1
            if cache.get_seq_length() > confirmed:
                cache.crop(confirmed - cache.get_seq_length())
            features, ids = s.features[None, confirmed:known], s.ids[None, confirmed + 1:length]
            positions = torch.arange(confirmed, known)[None]
            confirmed = known
            for d in range(min(depth, len(s.ids) - length)):
                predicted = head(features, drafter.embeddings(ids), positions, cache)[:, -1:]
                top_ids = vocab[drafter.logits(predicted[0, 0]).topk(top).indices].tolist()
                truth = int(s.ids[length + d])
                rank = top_ids.index(truth) if truth in top_ids else top
                counts[d][rank] += 1
                if rank == top:
                    break
                features, ids, positions = predicted, s.ids[None, length + d:length + d + 1], positions[:, -1:] + 1
    return counts


def acceptance_table(counts: Sequence[Sequence[int]]) -> list[list[float]]:
    """`counts` (reference_ranks) as chances per depth and rank, given the depth was reached."""
    return [[c / max(sum(row), 1) for c in row[:-1]] for row in counts]


def tree_frame(ids: torch.Tensor, cached: int, drafted: list[int], parents: list[int]) -> tuple[torch.Tensor, list[int]]:
    """The ids and parents of one verification frame: the confirmed tokens the cache lacks (a
    chain; the last is the tree's root) and the drafted nodes under it."""
    resent = ids.shape[1] - cached
    frame = torch.cat([ids[:, cached:], torch.tensor([drafted], dtype=ids.dtype, device=ids.device)], dim=1)
    return frame, list(range(-1, resent - 1)) + [resent - 1 if p < 0 else resent + p for p in parents]


def walk(tokens: list[int], parents: list[int], root: int, choose: Callable[[int, list[int]], int]) -> tuple[list[int], list[int]]:
    """Greedy verification of a tree: from `root`, follow the child whose token is the model's
    choice at its parent (`choose(node, path so far)` -> token) while there is one. The accepted
    nodes, and the tokens they give: the accepted drafts, then the model's own token after them."""
    children: dict[int, list[int]] = {}
    for node, parent in enumerate(parents):
        children.setdefault(parent, []).append(node)
    path: list[int] = []
    node = root
    while True:
        token = choose(node, path)
        child = next((c for c in children.get(node, []) if tokens[c] == token), None)
        if child is None:
            return path, [tokens[n] for n in path] + [token]
        path.append(child)
        node = child


def verify(ids: torch.Tensor, frame: torch.Tensor, parents: list[int], root: int, logits: torch.Tensor,
           processors: LogitsProcessorList) -> tuple[list[int], list[int], list[torch.Tensor]]:
    """`walk` with the model's greedy choice at each node: the argmax of its logits after the
    generation's processors, which see the sequence up to that node. Also the processed scores."""
    chosen: list[torch.Tensor] = []

    def choose(node: int, path: list[int]) -> int:
        prefix = torch.cat([ids, frame[:, path]], dim=1) if path else ids
        chosen.append(processors(prefix, logits[:, node].float()))
        return int(chosen[-1].argmax(-1))

    path, new = walk(frame[0].tolist(), parents, root, choose)
    return path, new, chosen


def kept_prefix(resent: int, path: list[int]) -> int:
    """Positions of a verified frame whose cache stays: the re-sent chain and the accepted nodes
    as long as they lie in frame order right after it."""
    kept = resent
    for offset, node in enumerate(path):
        if node != resent + offset:
            break
        kept += 1
    return kept


def _cut(new: list[int], room: int, eos: set[int]) -> list[int]:
    """The new tokens up to `room` and through the first EOS (as transformers' assisted decoding)."""
    new = new[:room]
    return new[: next((i + 1 for i, t in enumerate(new) if t in eos), len(new))]


def tree_decoding(model: Any, input_ids: torch.LongTensor, logits_processor: LogitsProcessorList,
                  stopping_criteria: StoppingCriteriaList, generation_config: GenerationConfig,
                  synced_gpus: bool = False, streamer: Any = None, drafter: Drafter | None = None,
                  tree_shape: Shape | None = None, token_streamer: Any = None,
                  **model_kwargs: Any) -> torch.LongTensor | GenerateDecoderOnlyOutput:
    """Greedy decoding of a `SplitModelForCausalLM` whose body verifies a draft tree per round trip
    (`generate(custom_generate=tree_decoding, drafter=..., tree_shape=..., token_streamer=...)`):
    the tokens of plain greedy decoding, with the processors and stopping criteria generate()
    prepared; `token_streamer` gets the new tokens (generate() itself gave it the prompt)."""
    streamer = streamer if streamer is not None else token_streamer
    if drafter is None or tree_shape is None or generation_config.do_sample:
        raise ValueError("tree_decoding is greedy and needs a drafter and a tree shape")
    cache = model_kwargs.get(model.cache_kwarg)  # generate()'s name for the SplitCache
    mask = model_kwargs.get("attention_mask")
    if cache is None or input_ids.shape[0] != 1 or (mask is not None and not bool(mask.all())):
        raise ValueError("tree decoding drafts for one unpadded sequence with a split cache")
    limit = cache.body.tree_positions()
    if limit is None:
        raise ValueError("this body verifies no draft trees")
    context = min(model.max_context, cache.body.context_limit() or model.max_context)
    eos_ids = generation_config._eos_token_tensor
    eos = set(eos_ids.view(-1).tolist()) if eos_ids is not None else set()
    max_length = int(generation_config.max_length)
    raw: list[torch.Tensor] = []  # the tail's logits of every new token (float32 copies, as generate()'s), for output_logits
    stats = cache.draft_stats = DraftStats()
    start = cache.get_seq_length()  # a continued cache: its positions have no features for the head
    features: list[torch.Tensor] = []

    def record(out: torch.Tensor) -> None:  # the tail's post-norm features of a forward's positions
        features[:] = [out.detach().to(drafter.lm_rows.dtype)]

    cache.on_features = record
    logits = model(input_ids[:, start:], cache=cache, logits_to_keep=1).logits  # the features come for every position
    scores = logits_processor(input_ids, logits[:, -1].float())
    raw.append(logits[:, -1].to(dtype=torch.float32, copy=True))
    ids = torch.cat([input_ids, scores.argmax(-1, keepdim=True)], dim=1)
    if streamer is not None:
        streamer.put(ids[:, -1:].cpu())
    known, base = features[0], start  # (1, n, H): the features of positions base .. base + n - 1
    drafters: dict[tuple[RankPath, ...], TreeDrafter] = {}
    draft_cache, confirmed, device = drafter.head.new_cache(), 0, drafter.lm_rows.device
    while not bool(stopping_criteria(ids, scores).any()):
        length, cached = ids.shape[1], cache.get_seq_length()
        resent = length - cached  # confirmed tokens the cache lacks; the last is the tree's root
        # The frame's positions must fit the body's limits; a draft deeper than the tokens left is never used.
        shape = tree_shape.cut(min(context - length, limit - resent), max_length - length)
        began = time.perf_counter()
        if draft_cache.get_seq_length() > confirmed:  # drop the last tree's guessed pairs
            draft_cache.crop(confirmed - draft_cache.get_seq_length())
        pairs = length - 1 - start  # pairs (f_i, x_(i+1)) with i < length - 1 are confirmed
        positions = torch.arange(start + confirmed, start + pairs, device=device)[None]
        tree = drafters.get(shape.paths) or drafters.setdefault(shape.paths, TreeDrafter(drafter, shape))
        new_pairs = known[:, start + confirmed - base:start + pairs - base].to(device)
        drafted = tree.draft(draft_cache, new_pairs, ids[:, start + confirmed + 1:length].to(device), positions)
        confirmed = pairs
        stats.seconds += time.perf_counter() - began
        frame, parents = tree_frame(ids, cached, drafted, shape.parents)
        logits = model(frame, cache=cache, tree=parents).logits
        verified = features[0]
        path, new, chosen = verify(ids, frame, parents, resent - 1, logits, logits_processor)
        new = _cut(new, max_length - length, eos)
        path = path[: len(new) - 1]
        raw += [logits[:, n].to(dtype=torch.float32, copy=True) for n in [resent - 1, *path]]
        scores = chosen[len(new) - 1]
        stats.drafted += len(drafted)
        stats.accepted += len(path)
        stats.rounds += 1
        stats.lengths.append(len(path))
        cache.crop(cached + kept_prefix(resent, path))
        # Features before `cached` are never read again (the head has their pairs): keep the frame's path.
        known, base = verified[:, [*range(resent), *path]], cached
        added = torch.tensor([new], dtype=ids.dtype, device=ids.device)
        ids = torch.cat([ids, added], dim=1)
        if streamer is not None:
            streamer.put(added.cpu())
    if streamer is not None:
        streamer.end()
    if generation_config.return_dict_in_generate and generation_config.output_logits:
        return GenerateDecoderOnlyOutput(sequences=ids, logits=tuple(raw))
    return ids


def tree_kwargs(model: Any, spec: str, body: Any, nodes: int) -> dict[str, Any] | None:
    """`generate()` arguments for `--speculate draft-tree[:DIR]`; None when `body` verifies no trees."""
    if body is None or body.tree_positions() is None:
        return None
    drafter, meta = bound_drafter(model, spec.replace("draft-tree", "draft-head", 1))
    return {"custom_generate": tree_decoding, "drafter": drafter, "tree_shape": head_tree(meta, nodes)}
