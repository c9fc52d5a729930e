"""A real multi-node cluster on one machine: every node a network namespace with its own address,
interface, host name, sshd (and slurmd), the links between nodes shaped to a bandwidth.

    dtlab cluster up --nodes 2 --inter-node 1gbit      (root)
    dtlab cluster status
    dtlab cluster down

``netns.py`` builds and removes the nodes and links; ``slurm.py`` runs Slurm on them. Tools
reach the nodes through ``node_argv`` (a command run inside a node). docs/cluster.md explains it.
"""
