"""Chain vs tree drafting (benchmarks/draft_tree.py, issue 24): the accepted length of a tree, the
tree shapes, drafting a tree in one pass per depth against drafting each path alone, and the replay's
counts on an answer whose drafts are accepted or not by construction."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from benchmarks.draft_tree import modelled, replay_tree
from lambdasplit.device.draft import Drafter, DraftHead
from lambdasplit.device.train_draft import Sample, replay_acceptance
from lambdasplit.device.tree import Shape, TreeDrafter, accepted_length, best_tree, chain, wide
from tests.conftest import TINY, TINY_COMMON

#        root
#       /    \
#   0:5      1:7 ------.
#    |       |         |
#   2:9     3:3       6:4
#    |       |
#   5:8     4:4
TOKENS = [5, 7, 9, 3, 4, 8, 4]
PARENTS = [-1, -1, 0, 1, 3, 2, 1]


@pytest.mark.parametrize(("reference", "expected"), [
    ([7, 3, 4, 1], 3),  # the second root child's branch, to its leaf
    ([5, 9, 8, 2], 3),
    ([5, 3, 4], 1),  # 3 follows 7 in the tree, not 5: parents matter
    ([7, 4, 8], 2),  # the later sibling
    ([6, 7], 0),  # no child of the root matches
    ([7, 3], 2),  # the reference ends first
    ([], 0),
])
def test_accepted_length_is_the_longest_root_path_equal_to_the_reference(reference, expected):
    assert accepted_length(TOKENS, PARENTS, reference) == expected


def test_accepted_length_follows_every_matching_sibling_not_just_the_first():
    assert accepted_length([5, 5, 6], [-1, -1, 1], [5, 6, 1]) == 2


def test_shapes_name_nodes_by_their_ranks_and_the_best_tree_grows_the_likeliest_paths():
    assert chain(3).paths == ((0,), (0, 0), (0, 0, 0)) and chain(3).parents == [-1, 0, 1]
    assert wide(3).paths == ((0,), (1,), (2,)) and wide(3).depth == 1
    # chances: (0) .6, (0,0) .3, (1) .2, (0,1) .18, (2) .1, (1,0) .1, ...
    tree = best_tree(4, [[0.6, 0.2, 0.1], [0.5, 0.3, 0.1]])
    # depth first, likelier child first: the top-1 chain leads, so a verified chain keeps its cache
    assert tree.paths == ((0,), (0, 0), (0, 1), (1,)) and tree.parents == [-1, 0, 0, -1]
    assert best_tree(2, [[0.6, 0.2], [0.5, 0.3]]).paths == ((0,), (0, 0))
    assert best_tree(3, [[0.6, 0.2, 0.1], [0.2, 0.5, 0.1]]).paths == ((0,), (0, 1), (1,))  # each depth's own chances
    capped = best_tree(3, [[0.6, 0.2, 0.1], [0.9, 0.5, 0.1]], depth=1)  # (0, 0) would come second uncapped
    assert capped.paths == ((0,), (1,), (2,)) and capped.name == "tree-3-depth-1"
    with pytest.raises(ValueError, match="parent"):
        Shape("orphan", ((0,), (1, 0)))


@pytest.fixture(scope="module")
def drafter() -> Drafter:
    """A random head over a tiny random Llama's embeddings and LM head (512-token draft vocabulary)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", **{**TINY_COMMON, **TINY["llama"]})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    head = DraftHead(config, 32, torch.arange(512)).eval()
    with torch.no_grad():
        for param in [*model.parameters(), *head.parameters()]:
            if param.dim() == 2:
                param.normal_(0, 0.08)
    return Drafter(head, model.model.embed_tokens, model.lm_head, config)


def _chain_features(drafter: Drafter, features: torch.Tensor, tokens: torch.Tensor, path: list[int]) -> torch.Tensor:
    """The head's predicted feature after the confirmed pairs and then `path`'s tokens, one at a time."""
    cache = drafter.head.new_cache()
    n = features.shape[1]
    with torch.inference_mode():
        predicted = drafter.head(features, drafter.embeddings(tokens), torch.arange(n)[None], cache)[:, -1:]
        for step, token in enumerate(path):
            predicted = drafter.head(predicted, drafter.embeddings(torch.tensor([[token]])), torch.tensor([[n + step]]), cache)
    return predicted[0, 0]


def test_a_tree_drafted_in_one_pass_per_depth_equals_drafting_each_path_alone(drafter):
    shape = Shape("t", ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 1, 0), (1, 0, 2)))
    tree = TreeDrafter(drafter, shape)
    torch.manual_seed(1)
    features, tokens = torch.randn(1, 6, 64), torch.randint(0, 512, (1, 6))
    cache = drafter.head.new_cache()
    drafted = tree.draft(cache, features, tokens, torch.arange(6)[None])
    expanded = [i for i in range(len(shape.paths)) if i in set(tree.parents)]
    assert cache.get_seq_length() == 6 + len(expanded)  # the confirmed pairs and one per expanded node
    vocab = drafter.head.vocab
    for node, path in enumerate(shape.paths):
        ancestors = [drafted[i] for i, p in enumerate(shape.paths) if p == path[:len(p)] and len(p) < len(path)]
        alone = _chain_features(drafter, features, tokens, ancestors)
        parent = tree.parents[node]
        torch.testing.assert_close(tree.features[parent], alone, atol=1e-5, rtol=1e-5)
        assert drafted[node] == int(vocab[drafter.logits(alone[None]).topk(3).indices[0, path[-1]]])
        if node in expanded:
            torch.testing.assert_close(tree.features[node], _chain_features(drafter, features, tokens, [*ancestors, drafted[node]]),
                                       atol=1e-5, rtol=1e-5)


RANKS = [0, 0, 1, 0, 2, 0, 0, 0, 1, 1, 0, 3, 0, 0, 1, 0, 0, 0, 0, 2, 1, 0]  # of answer tokens 2.. in the head's top-k


@torch.inference_mode()
def _answer_with_ranks(drafter: Drafter, ranks: list[int], prompt: int = 5) -> Sample:
    """An answer whose "model" is the head itself: each feature is what the head predicts from the
    pairs before it, and each token after the first is the `ranks[i]`-th choice of the head. A
    draft path is then accepted exactly while its ranks equal the answer's."""
    torch.manual_seed(2)
    head, vocab = drafter.head, drafter.head.vocab
    features = torch.randn(prompt, 64)
    ids = torch.randint(0, 512, (prompt + 1,)).tolist()  # the prompt and the prefill's token
    for rank in ranks:
        n = len(features)
        f = head(features[None], drafter.embeddings(torch.tensor([ids[1:]])), torch.arange(n)[None])[0, -1]
        features = torch.cat([features, f[None]])
        ids.append(int(vocab[drafter.logits(f[None]).topk(8).indices[0, rank]]))
    return Sample(torch.tensor(ids), prompt, features)


def _expected_trips(shape: Shape, ranks: list[int]) -> tuple[int, list[int]]:
    """Round trips (the prefill's included) and accepted lengths, by walking the ranks."""
    paths, start, trips, lengths = set(shape.paths), 0, 1, []
    while start < len(ranks):
        depth = 0
        while start + depth < len(ranks) and tuple(ranks[start:start + depth + 1]) in paths:
            depth += 1
        lengths.append(depth)
        start += depth + 1
        trips += 1
    return trips, lengths


@pytest.mark.parametrize("shape", [chain(1), chain(3), wide(2), Shape("t", ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)))],
                         ids=lambda s: s.name)
def test_the_replay_counts_round_trips_and_accepted_lengths_exactly(drafter, shape):
    sample = _answer_with_ranks(drafter, RANKS)
    trips, lengths = _expected_trips(shape, RANKS)
    row = replay_tree(drafter, [sample], shape)
    assert row["round_trips"] == trips and row["answer_tokens"] == len(RANKS) + 1
    assert row["accepted_lengths"] == [lengths.count(d) for d in range(shape.depth + 1)]
    assert row["tokens_per_round_trip"] == (len(RANKS) + 1) / trips
    assert row["positions_per_verification"] == len(shape.paths) + 1
    if shape.name.startswith("chain"):  # the product's candidate generator, without its confidence stop, agrees
        product = replay_acceptance(drafter, [sample], len(shape.paths), 0.0)
        assert product["round_trips"] == trips and product["accepted"] == sum(lengths)


def test_the_network_model_pads_to_cheaper_counts_and_weighs_a_varying_chain_by_its_lengths():
    costs = {1: {"device": 10.0, "body": 40.0}, 2: {"device": 30.0, "body": 70.0}, 4: {"device": 20.0, "body": 60.0}}
    tree = {"shape": "tree", "tokens_per_verification": 2.0, "positions_per_verification": 2, "draft_ms_per_round": 5.0}
    chain_row = {"shape": "chain", "tokens_per_verification": 1.5, "positions_per_verification": 1.5, "draft_ms_per_round": 4.0,
                 "drafted_lengths": [1, 1]}  # one round drafted nothing (1 position), one drafted 1 token (2 positions)
    table = modelled([tree, chain_row], costs)["rows"]
    assert table["gpu@50"]["plain_tok_s"] == pytest.approx(1000 / (50 + 10 + 10))
    assert table["gpu@50"]["shapes"]["tree"]["tok_s"] == pytest.approx(2000 / (50 + 10 + 20 + 5))  # 2 positions cost 4's 20 ms
    assert table["cpu-linear@100"]["shapes"]["tree"]["tok_s"] == pytest.approx(2000 / (100 + 2 * 40 + 20 + 5))
    assert table["cpu-measured@50"]["shapes"]["tree"]["tok_s"] == pytest.approx(2000 / (50 + 60 + 20 + 5))
    assert table["gpu@100"]["shapes"]["chain"]["tok_s"] == pytest.approx(1500 / ((100 + 10 + 10 + 100 + 10 + 20) / 2 + 4))
    assert table["gpu@100"]["shapes"]["chain"]["vs_plain"] == pytest.approx(
        table["gpu@100"]["shapes"]["chain"]["tok_s"] / (1000 / 120))


def test_python_dash_m_benchmarks_draft_tree_is_the_subcommand():
    """`python -m benchmarks.draft_tree` ran the full benchmark with its defaults, whatever it was given."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.draft_tree", "--prompts", "41"], cwd=Path(__file__).parents[1],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Invalid value for '--prompts'" in out.stderr


def test_more_calibration_prompts_than_the_head_set_aside_are_refused_not_capped():
    """`--calibration 500` ran on the 300 validation prompts the shipped head set aside and reported nothing."""
    from benchmarks.draft_tree import CalibrationError, validation_prompts
    from lambdasplit.device.draft import SHIPPED, read_meta

    meta = read_meta(SHIPPED)
    held_back = round(meta["training"]["settings"]["validation"] * meta["training"]["settings"]["prompt_count"])
    assert len(validation_prompts(meta, held_back)) == held_back
    with pytest.raises(CalibrationError, match=f"^{held_back + 1}: .*choose at most {held_back}"):
        validation_prompts(meta, held_back + 1)


def test_the_device_parts_run_a_tree_as_each_root_path_alone(llama):
    """Head and tail with a tree: every node's output equals running its root path as a chain
    (the positions one past the parent's, the siblings unseen), and the cache keeps the nodes in order."""
    from lambdasplit.device.runtime import SplitRuntime
    from lambdasplit.split.parts import PartRunner

    model = SplitRuntime.load(llama, (2, 2)).model
    prompt = torch.tensor([[1, 504, 3458, 282, 4649]])
    nodes = torch.tensor([[30, 41, 52, 63, 74, 85]])
    parents = [-1, 0, 0, 1, 3, 2]
    for runner in (model.head, model.tail):
        ours = PartRunner(runner.module, runner.role, runner.config)
        x = prompt if runner.role == "head" else model.head_module.embed_tokens(prompt).detach()
        ours(x)
        new = nodes if runner.role == "head" else model.head_module.embed_tokens(nodes).detach()
        out = ours(new, tree=parents)
        assert ours.seq_len == 5 + 6
        for node in range(6):
            path, at = [], node
            while at >= 0:
                path.insert(0, at)
                at = parents[at]
            alone = PartRunner(runner.module, runner.role, runner.config)
            alone(x)
            expected = alone(new[:, path])[:, -1]
            torch.testing.assert_close(out[:, node], expected, atol=1e-5, rtol=1e-5)


def test_a_verified_frame_keeps_the_accepted_prefix_in_frame_order_and_resends_the_rest():
    from lambdasplit.device.tree import kept_prefix, tree_frame, walk

    ids = torch.tensor([[7, 8, 9, 10]])
    frame, parents = tree_frame(ids, 2, [11, 12, 13], [-1, 0, -1])  # 9, 10 re-sent; 11 -> 12 and 13 under 10
    assert frame.tolist() == [[9, 10, 11, 12, 13]] and parents == [-1, 0, 1, 2, 1]
    model = {1: 13, 4: 99}  # the model's token after each node
    path, new = walk(frame[0].tolist(), parents, 1, lambda node, path: model[node])
    assert path == [4] and new == [13, 99]
    assert kept_prefix(2, path) == 2  # 13 lies after 11 and 12: it is sent again next time
    assert kept_prefix(2, [2, 3]) == 4 and kept_prefix(1, []) == 1


def test_the_products_tree_is_the_shipped_heads_likeliest_nodes_within_the_depth_cap():
    """`--speculate draft-tree` drafts `DRAFT_TREE_NODES` nodes at most `DRAFT_TREE_DEPTH` deep
    (each depth is one head pass a round); uncapped, the shipped head's tree of 32 is deeper."""
    from lambdasplit import defaults
    from lambdasplit.device.draft import SHIPPED, read_meta
    from lambdasplit.device.tree import head_tree

    meta = read_meta(SHIPPED)
    shape = head_tree(meta, defaults.DRAFT_TREE_NODES)
    assert len(shape.paths) == defaults.DRAFT_TREE_NODES and shape.depth == defaults.DRAFT_TREE_DEPTH
    assert best_tree(defaults.DRAFT_TREE_NODES, meta["tree_acceptance"]).depth > defaults.DRAFT_TREE_DEPTH
