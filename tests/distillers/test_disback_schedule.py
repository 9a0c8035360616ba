"""DisBack's stage-2 target schedule: the recorded nodes last-first, then the teacher (index -1)."""

from collections import Counter
from types import SimpleNamespace

import pytest

from stepdistill.distillers.disback import DisBack, DisBackOptions


def _targets(max_steps, degradation, nodes, teacher_share=0.5):
    fake = SimpleNamespace(ctx=SimpleNamespace(config=SimpleNamespace(train=SimpleNamespace(max_steps=max_steps))),
                           options=DisBackOptions(degradation_steps=degradation, path_nodes=nodes, teacher_share=teacher_share))
    return [DisBack.target_index(fake, i) for i in range(degradation, max_steps)]


@pytest.mark.parametrize("share,teacher_iters", [(0.5, 850), (0.6, 1020), (0.2, 340)])
def test_nodes_are_followed_last_first_then_the_teacher(share, teacher_iters):
    seq = _targets(2000, 300, 3, share)
    assert seq == sorted(seq, reverse=True)  # last snapshot first, never back to an earlier target
    counts = Counter(seq)
    assert set(counts) == {2, 1, 0, -1}
    assert counts[-1] == teacher_iters and seq[-1] == -1
    node_counts = [counts[k] for k in (2, 1, 0)]
    assert max(node_counts) - min(node_counts) <= 1  # the nodes share the rest equally


def test_teacher_share_out_of_range_is_refused():
    with pytest.raises(ValueError, match="method_args.teacher_share"):
        DisBackOptions(teacher_share=1.0)


@pytest.mark.parametrize("degradation,nodes", [(300, 3), (200, 4), (3, 2)])
def test_no_node_is_the_end_of_the_path(degradation, nodes):
    """The end of stage 1 is the fake score's own start in stage 2, so the first target (the last
    snapshot) is taken an interval before it (the authors' algorithm); snapshots are evenly spaced."""
    fake = SimpleNamespace(options=DisBackOptions(degradation_steps=degradation, path_nodes=nodes))
    due = [DisBack._node_due(fake, k) for k in range(nodes)]
    assert due[0] >= 1 and due == sorted(set(due)) and due[-1] < degradation
    gaps = [b - a for a, b in zip([0, *due], [*due, degradation])]
    assert max(gaps) - min(gaps) <= 1
