"""All-reduce algorithms that labs and tools share, each in a short file of its own:

- ``ring``:  reduce-scatter then all-gather around a ring of isend/irecv (plus ``chunk_sizes``)
- ``naive``: everything to rank 0 and back
- ``tree``:  a binomial tree down and up
- ``shm``:   shared-memory buffers for ranks on one host

Each takes a tensor (summed in place over the default process group) and an optional
``CommCounter``; they import nothing of dtlab but the training runtime and the counter.
"""
from dtlab.collectives.naive import naive_all_reduce
from dtlab.collectives.ring import ring_all_reduce
from dtlab.collectives.tree import tree_all_reduce

# the point-to-point algorithms, by the name the labs' and the benchmark's flags use
ALGORITHMS = {"ring": ring_all_reduce, "naive": naive_all_reduce, "tree": tree_all_reduce}
