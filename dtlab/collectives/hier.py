"""Hierarchical all-reduce: shared memory inside each node, rings between the nodes.

On a cluster the links between nodes are the slow ones. A flat ring of W = N x L ranks (N nodes,
L ranks each, neighbours on the same node next to each other) crosses every node boundary with
2(W-1) chunks of S/W: 2(W-1)/W * S bytes on each inter-node link in each direction, 1.5 S for
2 nodes x 2 ranks. Reducing inside the node first leaves one tensor per node to send:

    1. node reduce-scatter: the L ranks of a node sum their tensors through shared memory
                        (shm.py); local rank l ends with slice l (S/L) of the node's sum.
    2. across nodes:    local rank l of every node all-reduces slice l with the ring of ring.py
                        over the network, L rings side by side: per link and direction
                        L * 2(N-1)/N * S/L = 2(N-1)/N * S bytes (S for 2 nodes: 1.5x less than
                        the flat ring of 4).
    3. node all-gather: every rank copies the other slices from its node's peers' buffers.

Sending the whole node sum from one leader puts the same bytes on the link, but costs a full
all-reduce and a broadcast in memory and one network stream; split over the L ranks, the memory
passes are a reduce-scatter and an all-gather and the L streams run at once. NCCL does the same
on real clusters (NVLink inside the node, the network between nodes). Nodes are told apart by
host name, so the namespace cluster's nodes (dtlab cluster) count as nodes although they share
one machine. Every node must have the same number of ranks (torchrun starts them so).
"""
from __future__ import annotations

import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dtlab.collectives.ring import ring_all_reduce
from dtlab.collectives.shm import buffers_for, shm_tensor
from dtlab.errors import UsageError


@dataclass
class Hierarchy:
    nodes: list[list[int]]  # global ranks of each node, in order of their first rank
    local: object           # this node's process group
    across: object          # this local rank's group across the nodes (same local rank)
    local_rank: int
    world: object           # the default group these groups were made in


_HIERARCHY: list[Hierarchy] = []  # one per process (a cache: new_group is collective and slow)


def hierarchy() -> Hierarchy:
    """The nodes of the default group, found by host name, with their process groups.
    Collective the first time: every rank must call it."""
    if _HIERARCHY and _HIERARCHY[0].world is dist.group.WORLD:
        return _HIERARCHY[0]
    hosts = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    nodes = [[r for r, h in enumerate(hosts) if h == host] for host in dict.fromkeys(hosts)]
    sizes = sorted({len(n) for n in nodes})
    if len(sizes) > 1:
        raise UsageError(f"the hierarchical all-reduce needs the same number of ranks on every "
                         f"node; these have {', '.join(str(len(n)) for n in nodes)} (hosts "
                         f"{', '.join(dict.fromkeys(hosts))}): start as many on each")
    me = dist.get_rank()
    mine = next(n for n in nodes if me in n)
    local_rank = mine.index(me)
    groups = {}
    for ranks in nodes:                      # every rank creates every group, in the same order
        groups[("node", ranks[0])] = dist.new_group(ranks)
    for lr in range(sizes[0]):
        groups[("across", lr)] = dist.new_group([n[lr] for n in nodes])
    h = Hierarchy(nodes, groups[("node", mine[0])], groups[("across", local_rank)], local_rank,
                  dist.group.WORLD)
    _HIERARCHY[:] = [h]
    return h


def hier_tensor(numel: int, dtype: torch.dtype = torch.float32, name=None) -> torch.Tensor:
    """A tensor in this rank's shared buffer of its node: compute into it and step 1 reduces in
    place (as ``shm_tensor``). Collective: every rank calls it with the same size and name."""
    return shm_tensor(numel, dtype, name=name, group=hierarchy().local)


class _Sent:
    """Takes the ring's count of bytes sent, so that the call is counted once, at x's size."""
    bytes = 0

    def record(self, op, t, sent_bytes):
        self.bytes = sent_bytes


def hier_all_reduce(x: torch.Tensor, counter=None) -> torch.Tensor:
    """Sum ``x`` over all ranks in place: node reduce-scatter, rings across nodes, node
    all-gather."""
    h = hierarchy()
    flat = x.view(-1)
    sb = buffers_for(flat, group=h.local)
    mine, me = sb.buffers[sb.rank], sb.rank
    inplace = flat.data_ptr() == mine.data_ptr()
    if not inplace:
        mine.copy_(flat)                        # publish (skipped when x is the buffer)
    sb.barrier()
    part = mine[sb.slices[me]]                  # 1. my slice of the node's sum
    for r, b in enumerate(sb.buffers):
        if r != me:
            part.add_(b[sb.slices[me]])
    sent = _Sent()
    if len(h.nodes) > 1:                        # 2. the same slice of every node, summed
        ring_all_reduce(part, sent, group=h.across)
    if counter is not None:                     # what this rank put on the network
        counter.record("all_reduce", x, sent_bytes=sent.bytes)
    sb.barrier()
    for r, b in enumerate(sb.buffers):          # 3. the other slices from their owners
        if r != me or not inplace:
            flat[sb.slices[r]].copy_(b[sb.slices[r]])
    sb.barrier()                                # nobody reads my buffer any more
    return x
