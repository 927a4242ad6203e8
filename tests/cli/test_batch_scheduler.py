"""`sd35 batch` distribution: which server gets the next job (a pure function of queue depths), and how the
jobs of a server that goes away return to the queue. The real thing runs in tests/host/test_batch_host.py."""

from dataclasses import dataclass

import pytest

from sd35_cli.batch.scheduler import JobQueue, ServerLoad, choose_server


def fill(loads, max_queue, n):
    """Queue up to ``n`` jobs the way the runner does (each one deepens its server's queue); returns the picks."""
    picks = []
    for _ in range(n):
        i = choose_server(loads, max_queue)
        if i is None:
            break
        loads[i].depth += 1
        loads[i].ours += 1
        picks.append(i)
    return picks


def test_idle_servers_take_turns_up_to_the_queue_limit():
    loads = [ServerLoad(), ServerLoad(), ServerLoad()]
    assert fill(loads, 2, 10) == [0, 1, 2, 0, 1, 2]
    assert choose_server(loads, 2) is None


def test_a_server_busy_with_other_clients_work_gets_rows_only_when_its_queue_is_short():
    loads = [ServerLoad(depth=5), ServerLoad(depth=0)]
    assert fill(loads, 2, 5) == [1, 1]
    loads[0].depth = 1  # its queue drained to one other prompt
    assert fill(loads, 2, 5) == [0]


def test_the_shortest_queue_wins_then_the_server_with_fewer_of_ours():
    assert choose_server([ServerLoad(depth=1), ServerLoad(depth=0)], 4) == 1
    assert choose_server([ServerLoad(depth=1, ours=1), ServerLoad(depth=1, ours=0)], 4) == 1
    assert choose_server([ServerLoad(depth=1, ours=0), ServerLoad(depth=1, ours=0)], 4) == 0


def test_dead_servers_get_nothing():
    loads = [ServerLoad(alive=False), ServerLoad(depth=1)]
    assert fill(loads, 3, 5) == [1, 1]
    assert choose_server([ServerLoad(alive=False)], 2) is None
    with pytest.raises(ValueError, match="max_queue"):
        choose_server(loads, 0)


@dataclass(frozen=True)
class J:
    key: str


def test_a_lost_servers_jobs_go_back_to_the_front_in_their_original_order():
    q = JobQueue([J(str(i)) for i in range(6)])
    taken = [q.take() for _ in range(4)]
    q.assign(0, taken[0])
    q.assign(1, taken[1])
    q.assign(0, taken[3])
    q.assign(1, taken[2])
    assert len(q) == 6
    assert q.finish("0") == (0, J("0"))
    assert q.finish("0") is None
    assert q.server_lost(1) == [J("1"), J("2")]
    assert [j.key for j in q.pending] == ["1", "2", "4", "5"]
    assert q.in_flight(0) == [J("3")] and q.in_flight(1) == []
    q.put_back(J("3"))
    assert q.finish("3") == (0, J("3")) and q.take() == J("3")
